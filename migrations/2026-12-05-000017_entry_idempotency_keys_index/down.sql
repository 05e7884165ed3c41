-- One statement, outside a transaction, as up.sql.
DROP INDEX CONCURRENTLY IF EXISTS entries_idempotency_key_unique;
