-- Back to the original checks, validated at once: this scans both tables
-- under the exclusive lock (a revert is an operator's act, not a rolling start).
SET LOCAL lock_timeout = '10s';
LOCK TABLE entries, protection_legs IN ACCESS EXCLUSIVE MODE;

ALTER TABLE entries
    DROP CONSTRAINT entries_state,
    DROP CONSTRAINT entries_values,
    ADD CONSTRAINT entries_order_type CHECK (
        (order_type = 'market' AND limit_price IS NULL)
        OR (order_type = 'limit' AND limit_price IS NOT NULL AND limit_price > 0)),
    ADD CONSTRAINT entries_size_one_of CHECK ((requested_qty IS NULL) <> (requested_quote IS NULL)),
    ADD CONSTRAINT entries_status CHECK (status IN
        ('pending_new', 'new', 'partially_filled', 'filled', 'canceled', 'expired', 'rejected')),
    ADD CONSTRAINT entries_amounts_not_negative CHECK (
        executed_qty >= 0 AND cumulative_quote >= 0 AND base_commission >= 0 AND fills_qty >= 0),
    ADD CONSTRAINT entries_protection CHECK (
        protection IN ('not_needed', 'unprotected', 'closed')
        OR (protection = 'protected' AND protected_at IS NOT NULL AND protected_by IS NOT NULL)
        OR (protection IN ('unprotectable', 'exited') AND protection_reason IS NOT NULL)),
    ADD CONSTRAINT entries_protected_by CHECK (protected_by IN ('websocket', 'sync', 'direct'));
DROP FUNCTION entries_state_ok(TEXT, TEXT, TIMESTAMPTZ, TEXT, TEXT);
DROP FUNCTION entries_values_ok(TEXT, NUMERIC, NUMERIC, NUMERIC, NUMERIC, NUMERIC, NUMERIC, NUMERIC);

ALTER TABLE protection_legs
    DROP CONSTRAINT protection_legs_state,
    DROP CONSTRAINT protection_legs_values,
    ADD CONSTRAINT protection_legs_leg_check CHECK (leg IN (1, 2)),
    ADD CONSTRAINT protection_legs_generation_check CHECK (generation >= 0),
    ADD CONSTRAINT protection_legs_qty_check CHECK (qty >= 0),
    ADD CONSTRAINT protection_legs_take_profit_price_check CHECK (take_profit_price > 0),
    ADD CONSTRAINT protection_legs_stop_price_check CHECK (stop_price > 0),
    ADD CONSTRAINT protection_legs_stop_limit_price_check CHECK (stop_limit_price > 0),
    ADD CONSTRAINT protection_legs_source_check CHECK (source IN ('websocket', 'sync', 'direct')),
    ADD CONSTRAINT protection_legs_state CHECK (
        (state IN ('claimed', 'unknown', 'take_profit_filled', 'stop_loss_filled', 'replaced')
            AND not_placed_code IS NULL AND state_reason IS NULL AND external_end IS NULL)
        OR (state = 'placed' AND order_list_id IS NOT NULL
            AND not_placed_code IS NULL AND state_reason IS NULL AND external_end IS NULL)
        OR (state = 'not_placed' AND state_reason IS NOT NULL AND external_end IS NULL)
        OR (state = 'unprotectable' AND state_reason IS NOT NULL
            AND not_placed_code IS NULL AND external_end IS NULL)
        OR (state = 'canceled_externally'
            AND external_end IN ('canceled', 'stop_expired', 'take_profit_partial')
            AND not_placed_code IS NULL AND state_reason IS NULL));
DROP FUNCTION protection_legs_state_ok(TEXT, BIGINT, INTEGER, TEXT, TEXT);
DROP FUNCTION protection_legs_values_ok(SMALLINT, INTEGER, NUMERIC, NUMERIC, NUMERIC, NUMERIC, TEXT);
DROP FUNCTION IF EXISTS oco_check_failed(TEXT, TEXT, TEXT);
