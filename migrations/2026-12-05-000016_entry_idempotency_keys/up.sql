-- The client's idempotency key of an entry request (the API's
-- `Idempotency-Key` header), unique per account: a request that carries a
-- key its account already used finds that entry (`INSERT ... ON CONFLICT DO
-- NOTHING` on the unique index of 2026-12-05-000017) and nothing is stored
-- or sent again. NULL: no key, as every entry stored before this migration,
-- or a key released because the entry's order never reached the exchange;
-- the index leaves those out. The key's form (1 to 64 printable ASCII
-- characters) is checked by `oco_core::IdempotencyKey`, not by a check here:
-- every check on `entries` costs each statement that writes it (see
-- 2026-12-04-000009).
--
-- Live processes write entries while a starting one migrates. The new column
-- has no default (a catalogue change, no rewrite), so the lock is held for
-- no longer than that change. The index is not built here: under this lock
-- its scan of `entries` would hold up every fill's and claim's write, so the
-- next migration builds it CONCURRENTLY. Taking the lock waits at most a
-- second; a migration that cannot get it fails and
-- `PgStore::connect_patiently` tries again.
SET LOCAL lock_timeout = '1s';
LOCK TABLE entries IN ACCESS EXCLUSIVE MODE;

ALTER TABLE entries ADD COLUMN idempotency_key TEXT;
