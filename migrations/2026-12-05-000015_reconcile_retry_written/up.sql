-- When the pending retry_at was written (on the database clock), so that a
-- complete pass clears only a retry written before it began: a pass of one
-- sync process that read the account before another process's pass failed
-- and deferred it must not wipe that retry (mark_reconciled keeps a retry
-- written after the pass began). NULL with a retry_at written before this
-- column existed: counts as written before any pass that ends now.
--
-- Live sync processes take rows of this table every few seconds; the
-- exclusive lock for the new column is waited for at most a second, and a
-- migration that cannot get it fails and is tried again by
-- `PgStore::connect_patiently`.
SET LOCAL lock_timeout = '1s';

ALTER TABLE reconcile_schedule ADD COLUMN retry_written_at TIMESTAMPTZ;
