-- `record_outcomes` (migration 2026-12-04-000007) no longer overwrites the
-- protection of a closed entry; everything else is as it was.
--
-- Why: the placer writes its outcomes from a copy of the entry read before it
-- placed. A take-profit can fill, and the fill's update end the leg and close
-- the entry, before that write lands; setting `protected` then reopened an
-- entry whose every coin is sold. `closed` is the one final protection state
-- (`exited` is not: coins filled after an exit are protected again), so the
-- write keeps it, and `PgStore::set_protection` does the same.
--
-- The row is still updated (to its own values) rather than filtered out:
-- `entries_set` keeps saying that the entry was found, whatever the state a
-- concurrent close left it in, and the CASE reads the row as the UPDATE
-- finally locks it, so a close committed meanwhile is kept too.

CREATE OR REPLACE FUNCTION record_outcomes(
    p_entry             BIGINT,
    p_leg_entries       BIGINT[],
    p_legs              SMALLINT[],
    p_generations       INTEGER[],
    p_from              TEXT[],
    p_states            TEXT[],
    p_order_list_ids    BIGINT[],
    p_not_placed_codes  INTEGER[],
    p_state_reasons     TEXT[],
    p_external_ends     TEXT[],
    p_last_errors       TEXT[],
    p_updated_at        TIMESTAMPTZ[],
    p_event_entries     BIGINT[],
    p_event_kinds       TEXT[],
    p_event_details     TEXT[],
    p_event_sources     TEXT[],
    p_event_at          TIMESTAMPTZ[],
    p_set_protection    BOOLEAN,
    p_protection        TEXT,
    p_protection_reason TEXT,
    p_protected_at      TIMESTAMPTZ,
    p_protected_by      TEXT)
RETURNS TABLE (entries_set BIGINT, n BIGINT, leg_found BOOLEAN, applied BOOLEAN)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH u AS (
        SELECT * FROM unnest(p_leg_entries, p_legs, p_generations, p_from, p_states,
            p_order_list_ids, p_not_placed_codes, p_state_reasons, p_external_ends,
            p_last_errors, p_updated_at)
        WITH ORDINALITY AS u (entry_id, leg, generation, from_state, state, order_list_id,
            not_placed_code, state_reason, external_end, last_error, updated_at, n)),
    present AS (
        SELECT u.n, x.entry_id IS NOT NULL AS found
        FROM u LEFT JOIN protection_legs x
            ON x.entry_id = u.entry_id AND x.leg = u.leg AND x.generation = u.generation),
    ok AS (SELECT COALESCE(bool_and(present.found), true) AS all_found FROM present),
    moved AS (
        UPDATE protection_legs l SET state = u.state,
            order_list_id = COALESCE(u.order_list_id, l.order_list_id),
            not_placed_code = u.not_placed_code, state_reason = u.state_reason,
            external_end = u.external_end, last_error = COALESCE(u.last_error, l.last_error),
            updated_at = u.updated_at
        FROM u, ok
        WHERE ok.all_found AND l.entry_id = u.entry_id AND l.leg = u.leg
            AND l.generation = u.generation AND l.state = u.from_state
        RETURNING u.n),
    history AS (
        INSERT INTO entry_events (entry_id, kind, detail, source, at)
        SELECT e.entry_id, e.kind, e.detail, e.source, e.at
        FROM unnest(p_event_entries, p_event_kinds, p_event_details, p_event_sources,
            p_event_at) WITH ORDINALITY AS e (entry_id, kind, detail, source, at, n), ok
        WHERE ok.all_found
        ORDER BY e.n),
    protection AS (
        UPDATE entries SET
            protection = CASE WHEN entries.protection = 'closed' THEN entries.protection
                ELSE p_protection END,
            protection_reason = CASE WHEN entries.protection = 'closed'
                THEN entries.protection_reason ELSE p_protection_reason END,
            protected_at = CASE WHEN entries.protection = 'closed' THEN entries.protected_at
                ELSE COALESCE(p_protected_at, entries.protected_at) END,
            protected_by = CASE WHEN entries.protection = 'closed' THEN entries.protected_by
                ELSE COALESCE(p_protected_by, entries.protected_by) END
        FROM ok
        WHERE ok.all_found AND p_set_protection AND id = p_entry
        RETURNING 1)
    SELECT (SELECT count(*) FROM protection), present.n, present.found,
        EXISTS (SELECT 1 FROM moved WHERE moved.n = present.n)
    FROM ok LEFT JOIN present ON true
    ORDER BY present.n;
END
$$;
