-- The entries' idempotency keys (2026-12-05-000016), unique per account;
-- NULL keys are left out. `Store::create_entry`'s insert names this index by
-- its columns and predicate (`ON CONFLICT (account_id, idempotency_key) WHERE
-- idempotency_key IS NOT NULL`): change neither without the other.
--
-- Built CONCURRENTLY, so that the live processes writing `entries` while a
-- starting one migrates are not held up for the length of the scan (a plain
-- build blocks every write of the table until it ends). PostgreSQL refuses
-- that inside a transaction, so this migration runs outside one
-- (`metadata.toml`), and it is a single statement: PostgreSQL runs a string
-- of several as one implicit transaction all the same.
--
-- IF NOT EXISTS: a build that completed in a run stopped before the
-- migration was recorded is not built again. A build that failed half way
-- leaves an INVALID index under this name instead, which IF NOT EXISTS would
-- take for built: `store_pg::migrate` drops every INVALID index before it
-- runs a migration outside a transaction, and takes its advisory lock
-- without waiting in a statement (a waiting statement's snapshot is one this
-- build waits for, a deadlock that cancels it).
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS entries_idempotency_key_unique
    ON entries (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
