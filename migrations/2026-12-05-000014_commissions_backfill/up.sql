-- The commissions of the fills already stored, on the entries not settled
-- (`entries.fees`, added empty by the previous migration): their next merge
-- would write them too, but a filled entry may see no more evidence. Settled
-- entries keep the result they were recorded with.
--
-- Apart from the previous migration, as 2026-12-04-000010 is from 000009:
-- this transaction takes no table lock beyond ROW EXCLUSIVE, so fills keep
-- being written and protected while it runs; only the rows it updates wait
-- for it. A merge that wrote an entry's fees first wins: the update skips an
-- entry whose fees are no longer empty (re-checked on the row it locks), so
-- an older view of the fills never replaces a newer one.
-- Bounded: a row held elsewhere fails the migration (tried again at the
-- next start) rather than holding the rows already updated, and the
-- migration lock, for as long as it waits.
SET LOCAL lock_timeout = '5s';
UPDATE entries SET fees = f.fees
FROM (
    SELECT entry_id, jsonb_object_agg(commission_asset, total::text) AS fees
    FROM (
        SELECT fills.entry_id, fills.commission_asset, sum(fills.commission) AS total
        FROM fills
        JOIN entries AS open ON open.id = fills.entry_id
        WHERE open.protection NOT IN ('closed', 'exited')
        GROUP BY fills.entry_id, fills.commission_asset
        HAVING sum(fills.commission) <> 0
    ) AS per_asset
    GROUP BY entry_id
) AS f
WHERE entries.id = f.entry_id
    AND entries.protection NOT IN ('closed', 'exited')
    AND entries.fees = '{}'::jsonb;
