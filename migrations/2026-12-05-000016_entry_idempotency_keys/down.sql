SET LOCAL lock_timeout = '1s';
LOCK TABLE entries IN ACCESS EXCLUSIVE MODE;

ALTER TABLE entries DROP COLUMN idempotency_key;
