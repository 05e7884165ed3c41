-- A pass that leaves work undone (a protection refused or unanswered, an
-- entry unread) is not a reconciliation: last_reconciled_at keeps the last
-- complete one, and retry_at says when the account is due again, for any
-- sync process, whatever last_reconciled_at says. Kept here rather than in a
-- process's memory, so that a retry outlives the process that scheduled it.
-- NULL: no retry pending (the interval rules). On the database clock.
--
-- Live sync processes take rows of this table every few seconds; the
-- exclusive lock for the new column is waited for at most a second, and a
-- migration that cannot get it fails and is tried again by
-- `PgStore::connect_patiently`.
SET LOCAL lock_timeout = '1s';

ALTER TABLE reconcile_schedule ADD COLUMN retry_at TIMESTAMPTZ;

-- Retries are polled several times a second; only the few pending are indexed.
CREATE INDEX reconcile_schedule_retry_idx
    ON reconcile_schedule (retry_at, account_id) WHERE retry_at IS NOT NULL;
