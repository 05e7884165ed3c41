DROP INDEX reconcile_schedule_retry_idx;
ALTER TABLE reconcile_schedule DROP COLUMN retry_at;
