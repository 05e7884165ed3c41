SET LOCAL lock_timeout = '1s';
LOCK TABLE entries IN ACCESS EXCLUSIVE MODE;

DROP INDEX entries_idempotency_key_unique;
ALTER TABLE entries DROP COLUMN idempotency_key;
