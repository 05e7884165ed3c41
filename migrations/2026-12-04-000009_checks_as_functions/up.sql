-- The same rules on protection_legs and entries, each table's checks folded
-- into two calls of functions that hold them.
--
-- Why: PostgreSQL re-reads a table's check constraints from their stored
-- expression trees in every statement that writes the table (parse, fold,
-- compile), and these two tables are written on every fill's path: 11 KB of
-- node text on protection_legs, 10 KB on entries, about 60 µs per claim. A
-- call's tree is 0.8-1.2 KB; the function is compiled once per session.
--
-- Each rule is the expression it replaces, word for word, and passes when it
-- is true or NULL, as a check does. A row that breaks one rule is refused with
-- the message and the constraint name of the check it replaces, and a detail
-- naming the values (a row breaking several may name another of them than
-- before: PostgreSQL tried checks in name order). The RAISE is written in each
-- function rather than in a shared one, so that no call depends on the
-- search_path (pg_restore empties it).
--
-- To change a rule later, write a new migration that replaces the function
-- AND re-validates the constraint: CREATE OR REPLACE does not re-check stored
-- rows.
--
-- Live processes keep writing while a starting one migrates. The constraints
-- are added NOT VALID, so the exclusive locks are held for catalog changes
-- only; the next migration validates them without blocking writes. Taking the
-- locks waits at most a second: while this waits for one table, statements on
-- the other queue behind it. A migration that cannot get them fails;
-- `PgStore::connect_patiently` tries again within its patience. Other
-- statements lock the two tables in either order (the claim entries first,
-- the outcomes legs first), so a deadlock can abort one side: an aborted
-- claim or outcome is retried or reconciled like any failed write.

SET LOCAL lock_timeout = '1s';
LOCK TABLE entries, protection_legs IN ACCESS EXCLUSIVE MODE;

CREATE FUNCTION protection_legs_state_ok(
    state TEXT, order_list_id BIGINT, not_placed_code INTEGER, state_reason TEXT,
    external_end TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN (state IN ('claimed', 'unknown', 'take_profit_filled', 'stop_loss_filled', 'replaced')
            AND not_placed_code IS NULL AND state_reason IS NULL AND external_end IS NULL)
        OR (state = 'placed' AND order_list_id IS NOT NULL
            AND not_placed_code IS NULL AND state_reason IS NULL AND external_end IS NULL)
        OR (state = 'not_placed' AND state_reason IS NOT NULL AND external_end IS NULL)
        OR (state = 'unprotectable' AND state_reason IS NOT NULL
            AND not_placed_code IS NULL AND external_end IS NULL)
        OR (state = 'canceled_externally'
            AND external_end IN ('canceled', 'stop_expired', 'take_profit_partial')
            AND not_placed_code IS NULL AND state_reason IS NULL);
END
$$;

CREATE FUNCTION protection_legs_values_ok(
    leg SMALLINT, generation INTEGER, qty NUMERIC, take_profit_price NUMERIC,
    stop_price NUMERIC, stop_limit_price NUMERIC, source TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF (leg IN (1, 2)) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_leg_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_leg_check', TABLE = 'protection_legs',
                DETAIL = format('leg = %L', leg);
    END IF;
    IF (generation >= 0) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_generation_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_generation_check', TABLE = 'protection_legs',
                DETAIL = format('generation = %L', generation);
    END IF;
    IF (qty >= 0) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_qty_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_qty_check', TABLE = 'protection_legs',
                DETAIL = format('qty = %L', qty);
    END IF;
    IF (take_profit_price > 0) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_take_profit_price_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_take_profit_price_check', TABLE = 'protection_legs',
                DETAIL = format('take_profit_price = %L', take_profit_price);
    END IF;
    IF (stop_price > 0) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_stop_price_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_stop_price_check', TABLE = 'protection_legs',
                DETAIL = format('stop_price = %L', stop_price);
    END IF;
    IF (stop_limit_price > 0) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_stop_limit_price_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_stop_limit_price_check', TABLE = 'protection_legs',
                DETAIL = format('stop_limit_price = %L', stop_limit_price);
    END IF;
    IF (source IN ('websocket', 'sync', 'direct')) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "protection_legs" violates check constraint "protection_legs_source_check"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'protection_legs_source_check', TABLE = 'protection_legs',
                DETAIL = format('source = %L', source);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION entries_state_ok(
    status TEXT, protection TEXT, protected_at TIMESTAMPTZ, protected_by TEXT,
    protection_reason TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF (status IN
            ('pending_new', 'new', 'partially_filled', 'filled', 'canceled', 'expired', 'rejected')) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "entries" violates check constraint "entries_status"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_status', TABLE = 'entries',
                DETAIL = format('status = %L', status);
    END IF;
    -- protected_at/protected_by stay once set (history); the state decides what they mean.
    IF (protection IN ('not_needed', 'unprotected', 'closed')
            OR (protection = 'protected' AND protected_at IS NOT NULL AND protected_by IS NOT NULL)
            OR (protection IN ('unprotectable', 'exited') AND protection_reason IS NOT NULL)) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "entries" violates check constraint "entries_protection"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_protection', TABLE = 'entries',
                DETAIL = format('protection = %L, protected_at = %L, protected_by = %L, protection_reason = %L', protection, protected_at, protected_by, protection_reason);
    END IF;
    IF (protected_by IN ('websocket', 'sync', 'direct')) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "entries" violates check constraint "entries_protected_by"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_protected_by', TABLE = 'entries',
                DETAIL = format('protected_by = %L', protected_by);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION entries_values_ok(
    order_type TEXT, limit_price NUMERIC, requested_qty NUMERIC, requested_quote NUMERIC,
    executed_qty NUMERIC, cumulative_quote NUMERIC, base_commission NUMERIC, fills_qty NUMERIC)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF ((order_type = 'market' AND limit_price IS NULL)
            OR (order_type = 'limit' AND limit_price IS NOT NULL AND limit_price > 0)) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "entries" violates check constraint "entries_order_type"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_order_type', TABLE = 'entries',
                DETAIL = format('order_type = %L, limit_price = %L', order_type, limit_price);
    END IF;
    IF ((requested_qty IS NULL) <> (requested_quote IS NULL)) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "entries" violates check constraint "entries_size_one_of"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_size_one_of', TABLE = 'entries',
                DETAIL = format('requested_qty = %L, requested_quote = %L', requested_qty, requested_quote);
    END IF;
    IF (executed_qty >= 0 AND cumulative_quote >= 0 AND base_commission >= 0
            AND fills_qty >= 0) IS FALSE THEN
        RAISE EXCEPTION 'new row for relation "entries" violates check constraint "entries_amounts_not_negative"'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_amounts_not_negative', TABLE = 'entries',
                DETAIL = format('executed_qty = %L, cumulative_quote = %L, base_commission = %L, fills_qty = %L', executed_qty, cumulative_quote, base_commission, fills_qty);
    END IF;
    RETURN true;
END
$$;

ALTER TABLE entries
    DROP CONSTRAINT entries_order_type,
    DROP CONSTRAINT entries_size_one_of,
    DROP CONSTRAINT entries_status,
    DROP CONSTRAINT entries_amounts_not_negative,
    DROP CONSTRAINT entries_protection,
    DROP CONSTRAINT entries_protected_by,
    ADD CONSTRAINT entries_state CHECK (
        entries_state_ok(status, protection, protected_at, protected_by, protection_reason))
        NOT VALID,
    ADD CONSTRAINT entries_values CHECK (
        entries_values_ok(order_type, limit_price, requested_qty, requested_quote,
            executed_qty, cumulative_quote, base_commission, fills_qty))
        NOT VALID;

ALTER TABLE protection_legs
    DROP CONSTRAINT protection_legs_state,
    DROP CONSTRAINT protection_legs_leg_check,
    DROP CONSTRAINT protection_legs_generation_check,
    DROP CONSTRAINT protection_legs_qty_check,
    DROP CONSTRAINT protection_legs_take_profit_price_check,
    DROP CONSTRAINT protection_legs_stop_price_check,
    DROP CONSTRAINT protection_legs_stop_limit_price_check,
    DROP CONSTRAINT protection_legs_source_check,
    ADD CONSTRAINT protection_legs_state CHECK (
        protection_legs_state_ok(state, order_list_id, not_placed_code, state_reason, external_end))
        NOT VALID,
    ADD CONSTRAINT protection_legs_values CHECK (
        protection_legs_values_ok(leg, generation, qty, take_profit_price, stop_price,
            stop_limit_price, source))
        NOT VALID;
