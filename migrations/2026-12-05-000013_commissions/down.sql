SET LOCAL lock_timeout = '10s';
LOCK TABLE entries, protection_legs IN ACCESS EXCLUSIVE MODE;

DROP TABLE leg_trades;
ALTER TABLE protection_legs
    DROP COLUMN traded_take_profit,
    DROP COLUMN traded_stop_loss,
    DROP COLUMN fees;
ALTER TABLE entries DROP COLUMN fees, DROP COLUMN fees_complete;
