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
-- is true or NULL, as a check does. A broken rule is refused with the message
-- and the constraint name of the check it replaces (RAISE ... CONSTRAINT), so
-- an error still says which rule a row broke.
--
-- To change a rule later, write a new migration that replaces the function
-- AND re-validates the constraint: CREATE OR REPLACE does not re-check stored
-- rows.
--
-- Live processes keep writing while a starting one migrates: the tables are
-- locked in the order the claim statement locks them, the wait for a lock is
-- bounded (a migration that cannot get them fails and is retried at the next
-- start, rather than queueing every fill behind it), and the constraints are
-- added NOT VALID so the exclusive lock is held for catalog changes only. The
-- next migration validates them without blocking writes.

SET LOCAL lock_timeout = '10s';
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

-- Refuses a row of `relation` that broke the check `rule`, as PostgreSQL
-- would have with that check.
CREATE FUNCTION oco_check_failed(relation TEXT, rule TEXT, detail TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RAISE EXCEPTION 'new row for relation "%" violates check constraint "%"', relation, rule
        USING ERRCODE = 'check_violation', CONSTRAINT = rule, TABLE = relation,
            DETAIL = detail;
END
$$;

CREATE FUNCTION protection_legs_values_ok(
    leg SMALLINT, generation INTEGER, qty NUMERIC, take_profit_price NUMERIC,
    stop_price NUMERIC, stop_limit_price NUMERIC, source TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF (leg IN (1, 2)) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_leg_check',
            format('leg = %s', leg));
    END IF;
    IF (generation >= 0) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_generation_check',
            format('generation = %s', generation));
    END IF;
    IF (qty >= 0) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_qty_check',
            format('qty = %s', qty));
    END IF;
    IF (take_profit_price > 0) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_take_profit_price_check',
            format('take_profit_price = %s', take_profit_price));
    END IF;
    IF (stop_price > 0) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_stop_price_check',
            format('stop_price = %s', stop_price));
    END IF;
    IF (stop_limit_price > 0) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_stop_limit_price_check',
            format('stop_limit_price = %s', stop_limit_price));
    END IF;
    IF (source IN ('websocket', 'sync', 'direct')) IS FALSE THEN
        RETURN oco_check_failed('protection_legs', 'protection_legs_source_check',
            format('source = %s', source));
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
            ('pending_new', 'new', 'partially_filled', 'filled', 'canceled', 'expired', 'rejected'))
            IS FALSE THEN
        RETURN oco_check_failed('entries', 'entries_status', format('status = %s', status));
    END IF;
    -- protected_at/protected_by stay once set (history); the state decides what they mean.
    IF (protection IN ('not_needed', 'unprotected', 'closed')
            OR (protection = 'protected' AND protected_at IS NOT NULL AND protected_by IS NOT NULL)
            OR (protection IN ('unprotectable', 'exited') AND protection_reason IS NOT NULL))
            IS FALSE THEN
        RETURN oco_check_failed('entries', 'entries_protection',
            format('protection = %s, protected_at = %s, protected_by = %s, protection_reason = %s',
                protection, protected_at, protected_by, protection_reason));
    END IF;
    IF (protected_by IN ('websocket', 'sync', 'direct')) IS FALSE THEN
        RETURN oco_check_failed('entries', 'entries_protected_by',
            format('protected_by = %s', protected_by));
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
            OR (order_type = 'limit' AND limit_price IS NOT NULL AND limit_price > 0))
            IS FALSE THEN
        RETURN oco_check_failed('entries', 'entries_order_type',
            format('order_type = %s, limit_price = %s', order_type, limit_price));
    END IF;
    IF ((requested_qty IS NULL) <> (requested_quote IS NULL)) IS FALSE THEN
        RETURN oco_check_failed('entries', 'entries_size_one_of',
            format('requested_qty = %s, requested_quote = %s', requested_qty, requested_quote));
    END IF;
    IF (executed_qty >= 0 AND cumulative_quote >= 0 AND base_commission >= 0 AND fills_qty >= 0)
            IS FALSE THEN
        RETURN oco_check_failed('entries', 'entries_amounts_not_negative',
            format('executed_qty = %s, cumulative_quote = %s, base_commission = %s, fills_qty = %s',
                executed_qty, cumulative_quote, base_commission, fills_qty));
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
