ALTER TABLE reconcile_schedule DROP COLUMN retry_written_at;
