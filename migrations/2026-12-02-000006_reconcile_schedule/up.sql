-- Periodic reconciliation shared by several sync processes: when each account
-- was last reconciled, and which process has it taken for the pass under way.
-- A take expires at taken_until, so the accounts of a sync process that died
-- mid-pass become due again. Times are on the database clock (now()).
CREATE TABLE reconcile_schedule (
    account_id         BIGINT PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    last_reconciled_at TIMESTAMPTZ,
    taken_by           TEXT,
    taken_until        TIMESTAMPTZ
);

CREATE INDEX reconcile_schedule_due_idx
    ON reconcile_schedule (last_reconciled_at NULLS FIRST, account_id);

INSERT INTO reconcile_schedule (account_id) SELECT id FROM accounts;

-- Every account has its row from the start, so that takers lock existing rows
-- (FOR UPDATE SKIP LOCKED) instead of racing to insert them.
CREATE FUNCTION reconcile_schedule_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reconcile_schedule (account_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NEW;
END
$$;

CREATE TRIGGER accounts_reconcile_schedule
    AFTER INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION reconcile_schedule_add();
