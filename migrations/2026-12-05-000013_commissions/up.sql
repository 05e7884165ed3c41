-- Commissions, for the realised result and the entry's view.
--
-- Why: the result was what the legs sold less what the entry cost, the
-- commissions of the sales nowhere (a take-profit charged 0.101 USDT showed
-- 0.101 too much; one charged in BNB appeared nowhere), nor those the entry's
-- own fills paid in any asset but the base.
--
-- `leg_trades`: the trades of our protective orders (take-profits, stops,
-- market exits), each stored once, keyed like `fills` (a trade id is unique
-- per symbol and one account is on one side of it): a trade the stream and a
-- lookup both report counts once. `protection_legs` keeps their sums
-- (`traded_take_profit`, `traded_stop_loss`: base the recorded trades sold,
-- by side; `fees`: commissions by asset), written in the same transaction as
-- the trades under the leg's row lock, so that reading a leg needs no join.
-- `entries.fees`: the commissions of the entry's fills by asset, written by
-- the evidence merge with the fills. Both JSONB objects map an asset to a
-- decimal string. `entries.fees_complete`: whether the realised result,
-- written with it, counts every commission of the legs' sales (false when
-- some were learnt by lookup, without their trades; false too for results
-- recorded before this migration, which counted none).
--
-- Live processes write both tables while a starting one migrates, and every
-- fill's protection writes them: the locks the new table and columns need
-- are taken first, as in 2026-12-04-000009, each waited for at most a second,
-- and held only for catalogue changes (constant defaults: no rewrite, no
-- scan). A migration that cannot get them fails and
-- `PgStore::connect_patiently` tries again. The open entries' fees from the
-- fills already stored are filled in by the next migration, in a
-- transaction of its own that takes no table lock.

SET LOCAL lock_timeout = '1s';
-- The new table's key to `accounts` takes SHARE ROW EXCLUSIVE on it: taken
-- here first, under the same timeout, so that it is never waited for while
-- the exclusive locks below hold every fill (it does not conflict with the
-- row locks an entry's insert takes on its account).
LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE entries, protection_legs IN ACCESS EXCLUSIVE MODE;

CREATE TABLE leg_trades (
    account_id       BIGINT NOT NULL REFERENCES accounts (id),
    symbol           TEXT NOT NULL,
    trade_id         BIGINT NOT NULL,
    entry_id         BIGINT NOT NULL,
    leg              SMALLINT NOT NULL,
    generation       INTEGER NOT NULL,
    side             TEXT NOT NULL CHECK (side IN ('take_profit', 'stop_loss')),
    price            NUMERIC NOT NULL,
    qty              NUMERIC NOT NULL,
    commission       NUMERIC NOT NULL,
    commission_asset TEXT NOT NULL,
    traded_at        TIMESTAMPTZ NOT NULL,
    CONSTRAINT leg_trades_trade_unique PRIMARY KEY (account_id, symbol, trade_id),
    CONSTRAINT leg_trades_leg_fkey FOREIGN KEY (entry_id, leg, generation)
        REFERENCES protection_legs (entry_id, leg, generation),
    CONSTRAINT leg_trades_amounts CHECK (price > 0 AND qty >= 0)
);

CREATE INDEX leg_trades_leg_idx ON leg_trades (entry_id, leg, generation);

ALTER TABLE protection_legs
    ADD COLUMN traded_take_profit NUMERIC NOT NULL DEFAULT 0,
    ADD COLUMN traded_stop_loss   NUMERIC NOT NULL DEFAULT 0,
    ADD COLUMN fees               JSONB NOT NULL DEFAULT '{}'::jsonb;

ALTER TABLE entries
    ADD COLUMN fees          JSONB NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN fees_complete BOOLEAN NOT NULL DEFAULT false;
