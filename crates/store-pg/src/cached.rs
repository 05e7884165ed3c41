//! The statements on a fill's way to its protection, written so that their
//! prepared form is cached per connection.
//!
//! diesel caches a prepared statement only when it can prove the SQL text is
//! fixed: raw `sql_query`, multi-row inserts and every `UPDATE` are prepared
//! again on each call, which through diesel-async costs one more round trip
//! (Parse, then Bind/Execute) and a server-side parse. These types push a
//! fixed text with binds, so diesel keys its cache on the text and each
//! connection parses them once.

use diesel::QueryResult;
use diesel::deserialize::QueryableByName;
use diesel::pg::Pg;
use diesel::pg::data_types::{PgNumeric, PgTimestamp};
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{
    Array, Bool, Int2, Int4, Int8, Jsonb, Nullable, Numeric, Text, Timestamptz, Untyped,
};

use oco_core::model::{EntryEventRecord, LegUpdate};
use oco_core::{Entry, EntryId, StoreError};

use crate::convert::{numeric, timestamp};
use crate::rows::{
    EntryProtectionColumns, EntryRow, FillRow, LegUpdateColumns, NewEntryRow, NewLegRow, fees_json,
    leg_key_columns,
};

/// Implements the traits that let diesel run a fragment as an untyped query
/// (rows read by name) whose cache key is its SQL text.
macro_rules! untyped_query {
    ($ty:ty) => {
        impl QueryId for $ty {
            type QueryId = ();
            const HAS_STATIC_QUERY_ID: bool = false;
        }

        impl Query for $ty {
            type SqlType = Untyped;
        }
    };
}

/// The evidence columns of an entry as read, exactly as stored, and how many
/// fills were stored under it: what a merge's compare-and-set compares
/// against.
#[derive(Clone)]
pub(crate) struct SeenEntry {
    /// Fills stored under the entry. Fills are only ever added, so an equal
    /// count is the same set. Another writer can store fills under the entry
    /// and then fail its own compare-and-set, leaving the row as it was: the
    /// row alone would not show them, and a merge without them would write
    /// amounts short of them.
    pub stored_fills: i64,
    pub executed_qty: PgNumeric,
    pub cumulative_quote: PgNumeric,
    pub status: String,
    pub base_commission: PgNumeric,
    pub fills_qty: PgNumeric,
    pub exchange_order_id: Option<i64>,
    pub filled_at: Option<PgTimestamp>,
    pub protection: String,
}

impl SeenEntry {
    /// `row` as read, with `stored_fills` fills stored under it.
    pub(crate) fn of(row: &EntryRow, stored_fills: usize) -> Self {
        Self {
            stored_fills: i64::try_from(stored_fills).unwrap_or(i64::MAX),
            executed_qty: row.executed_qty.clone(),
            cumulative_quote: row.cumulative_quote.clone(),
            status: row.status.clone(),
            base_commission: row.base_commission.clone(),
            fills_qty: row.fills_qty.clone(),
            exchange_order_id: row.exchange_order_id,
            filled_at: row.filled_at,
            protection: row.protection.clone(),
        }
    }
}

/// The write half of an evidence merge: the new fills and the entry's
/// evidence columns in one statement, applied only if the entry still holds
/// what was read (`seen`) and every new fill was stored as this entry's (a
/// trade stored meanwhile for another entry makes the update match nothing,
/// and the next read leaves it out). `RETURNING *`: the entry as written.
pub(crate) struct MergeWrite<'a> {
    pub account: i64,
    pub symbol: &'a str,
    pub entry: i64,
    pub trade_ids: Vec<i64>,
    pub prices: Vec<PgNumeric>,
    pub qtys: Vec<PgNumeric>,
    pub commissions: Vec<PgNumeric>,
    pub commission_assets: Vec<String>,
    pub traded_at: Vec<PgTimestamp>,
    pub executed_qty: PgNumeric,
    pub cumulative_quote: PgNumeric,
    pub order_id: Option<i64>,
    pub status: &'a str,
    pub base_commission: PgNumeric,
    /// The fills' commissions by asset, as `merge_evidence` computed them.
    pub fees: serde_json::Value,
    pub fills_qty: PgNumeric,
    pub filled_at: Option<PgTimestamp>,
    pub protection: &'a str,
    pub protection_reason: Option<String>,
    pub seen: &'a SeenEntry,
    /// Set for a write planned from hints (nothing read before it): the
    /// account's version they hold. The write then also requires the
    /// account's row at that version and no leg stored for the entry (the
    /// hint's fill count, 0, is checked as any).
    pub hinted: Option<i64>,
}

impl<'a> MergeWrite<'a> {
    /// The statement that stores `fills` and the evidence columns of
    /// `merged`, if the entry still holds what `seen` read.
    pub(crate) fn new(
        merged: &'a Entry,
        seen: &'a SeenEntry,
        fills: &[FillRow],
    ) -> Result<Self, StoreError> {
        let protection = EntryProtectionColumns::from_protection(&merged.protection)?;
        Ok(Self {
            account: merged.account.0,
            symbol: &merged.symbol.name,
            entry: merged.id.0,
            trade_ids: fills.iter().map(|f| f.trade_id).collect(),
            prices: fills.iter().map(|f| f.price.clone()).collect(),
            qtys: fills.iter().map(|f| f.qty.clone()).collect(),
            commissions: fills.iter().map(|f| f.commission.clone()).collect(),
            commission_assets: fills.iter().map(|f| f.commission_asset.clone()).collect(),
            traded_at: fills.iter().map(|f| f.traded_at).collect(),
            executed_qty: numeric(merged.executed_qty.get()),
            cumulative_quote: numeric(merged.cumulative_quote),
            order_id: merged.order_id,
            status: merged.status.name(),
            base_commission: numeric(merged.base_commission.get()),
            fees: fees_json(&merged.fees),
            fills_qty: numeric(merged.fills_qty.get()),
            filled_at: merged.filled_at.map(timestamp).transpose()?,
            protection: protection.protection,
            protection_reason: protection.protection_reason.flatten(),
            seen,
            hinted: None,
        })
    }
}

impl QueryFragment<Pg> for MergeWrite<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH ");
        self.walk_fills(out.reborrow())?;
        out.push_sql(" ");
        self.walk_update(out)
    }
}

impl MergeWrite<'_> {
    /// The `new_fills` CTE: the new fills inserted, one row per insert.
    fn walk_fills<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "new_fills AS (INSERT INTO fills (account_id, symbol, trade_id, entry_id, \
             price, qty, commission, commission_asset, traded_at) SELECT ",
        );
        out.push_bind_param::<Int8, _>(&self.account)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(self.symbol)?;
        out.push_sql(", t.trade_id, ");
        out.push_bind_param::<Int8, _>(&self.entry)?;
        out.push_sql(
            ", t.price, t.qty, t.commission, t.commission_asset, t.traded_at FROM unnest(",
        );
        out.push_bind_param::<Array<Int8>, _>(&self.trade_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Numeric>, _>(&self.prices)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Numeric>, _>(&self.qtys)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Numeric>, _>(&self.commissions)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.commission_assets)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamptz>, _>(&self.traded_at)?;
        out.push_sql(
            ") AS t (trade_id, price, qty, commission, commission_asset, traded_at) \
             ON CONFLICT DO NOTHING RETURNING 1)",
        );
        Ok(())
    }

    /// The entry's compare-and-set, after `new_fills`; `RETURNING *`.
    fn walk_update<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE entries SET executed_qty = GREATEST(executed_qty, ");
        out.push_bind_param::<Numeric, _>(&self.executed_qty)?;
        out.push_sql("), cumulative_quote = GREATEST(cumulative_quote, ");
        out.push_bind_param::<Numeric, _>(&self.cumulative_quote)?;
        out.push_sql("), exchange_order_id = ");
        out.push_bind_param::<Nullable<Int8>, _>(&self.order_id)?;
        out.push_sql(", status = ");
        out.push_bind_param::<Text, _>(self.status)?;
        out.push_sql(", base_commission = ");
        out.push_bind_param::<Numeric, _>(&self.base_commission)?;
        out.push_sql(", fees = ");
        out.push_bind_param::<Jsonb, _>(&self.fees)?;
        out.push_sql(", fills_qty = ");
        out.push_bind_param::<Numeric, _>(&self.fills_qty)?;
        out.push_sql(", filled_at = ");
        out.push_bind_param::<Nullable<Timestamptz>, _>(&self.filled_at)?;
        out.push_sql(", protection = ");
        out.push_bind_param::<Text, _>(self.protection)?;
        // The reason changes only with the protection state.
        out.push_sql(", protection_reason = CASE WHEN protection = ");
        out.push_bind_param::<Text, _>(self.protection)?;
        out.push_sql(" THEN protection_reason ELSE ");
        out.push_bind_param::<Nullable<Text>, _>(&self.protection_reason)?;
        // An exit's result stands only while the entry is exited (or closed):
        // coins filled after the exit reopen it, and its close says the result.
        out.push_sql(" END, realized_quote = CASE WHEN ");
        out.push_bind_param::<Text, _>(self.protection)?;
        out.push_sql(" IN ('exited', 'closed') THEN realized_quote END WHERE id = ");
        out.push_bind_param::<Int8, _>(&self.entry)?;
        out.push_sql(" AND executed_qty = ");
        out.push_bind_param::<Numeric, _>(&self.seen.executed_qty)?;
        out.push_sql(" AND cumulative_quote = ");
        out.push_bind_param::<Numeric, _>(&self.seen.cumulative_quote)?;
        out.push_sql(" AND status = ");
        out.push_bind_param::<Text, _>(&self.seen.status)?;
        out.push_sql(" AND base_commission = ");
        out.push_bind_param::<Numeric, _>(&self.seen.base_commission)?;
        out.push_sql(" AND fills_qty = ");
        out.push_bind_param::<Numeric, _>(&self.seen.fills_qty)?;
        out.push_sql(" AND exchange_order_id IS NOT DISTINCT FROM ");
        out.push_bind_param::<Nullable<Int8>, _>(&self.seen.exchange_order_id)?;
        out.push_sql(" AND filled_at IS NOT DISTINCT FROM ");
        out.push_bind_param::<Nullable<Timestamptz>, _>(&self.seen.filled_at)?;
        out.push_sql(" AND protection = ");
        out.push_bind_param::<Text, _>(&self.seen.protection)?;
        // The statement's snapshot: `new_fills`' own rows are not counted.
        // Counted as the snapshot read them (the entry's account and symbol).
        out.push_sql(" AND (SELECT count(*) FROM fills WHERE account_id = ");
        out.push_bind_param::<Int8, _>(&self.account)?;
        out.push_sql(" AND symbol = ");
        out.push_bind_param::<Text, _>(self.symbol)?;
        out.push_sql(" AND entry_id = ");
        out.push_bind_param::<Int8, _>(&self.entry)?;
        out.push_sql(") = ");
        out.push_bind_param::<Int8, _>(&self.seen.stored_fills)?;
        if let Some(version) = &self.hinted {
            out.push_sql(" AND (SELECT version FROM accounts WHERE id = ");
            out.push_bind_param::<Int8, _>(&self.account)?;
            out.push_sql(") = ");
            out.push_bind_param::<Int8, _>(version)?;
            out.push_sql(" AND NOT EXISTS (SELECT 1 FROM protection_legs WHERE entry_id = ");
            out.push_bind_param::<Int8, _>(&self.entry)?;
            out.push_sql(")");
        }
        out.push_sql(" AND (SELECT count(*) FROM new_fills) = cardinality(");
        out.push_bind_param::<Array<Int8>, _>(&self.trade_ids)?;
        out.push_sql(") RETURNING *");
        Ok(())
    }
}

untyped_query!(MergeWrite<'_>);

/// A merge and the claims planned from its result in one statement, so in
/// one durable commit: the claims are inserted only if the merge's
/// compare-and-set applied. One row per leg won (`claimed_leg`,
/// `claimed_generation` set), or one with them null when none was; no row
/// when the entry had changed since it was read.
pub(crate) struct MergeAndClaim<'a> {
    pub merge: MergeWrite<'a>,
    pub claims: ClaimLegs<'a>,
}

impl QueryFragment<Pg> for MergeAndClaim<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH ");
        self.merge.walk_fills(out.reborrow())?;
        out.push_sql(", merged AS (");
        self.merge.walk_update(out.reborrow())?;
        out.push_sql("), ");
        self.claims
            .walk_claims(out.reborrow(), " AND EXISTS (SELECT 1 FROM merged)")?;
        out.push_sql(
            " SELECT merged.*, claimed.leg AS claimed_leg, \
             claimed.generation AS claimed_generation \
             FROM merged LEFT JOIN claimed ON true",
        );
        Ok(())
    }
}

untyped_query!(MergeAndClaim<'_>);

/// A row of [`MergeAndClaim`]'s answer.
#[derive(diesel::QueryableByName)]
pub(crate) struct MergedClaimRow {
    /// The entry as written.
    #[diesel(embed)]
    pub entry: EntryRow,
    /// A leg won, if any.
    #[diesel(sql_type = Nullable<Int2>)]
    pub claimed_leg: Option<i16>,
    /// Its generation.
    #[diesel(sql_type = Nullable<Int4>)]
    pub claimed_generation: Option<i32>,
}

/// An order's first `NEW` (nothing filled): `pending_new` → `new` with the
/// order id, for an entry of `owner` when given. `RETURNING *`.
pub(crate) struct FirstNew {
    pub entry: i64,
    pub owner: Option<i64>,
    pub order_id: i64,
}

impl QueryFragment<Pg> for FirstNew {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE entries SET status = 'new', exchange_order_id = ");
        out.push_bind_param::<Int8, _>(&self.order_id)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Int8, _>(&self.entry)?;
        out.push_sql(" AND (");
        out.push_bind_param::<Nullable<Int8>, _>(&self.owner)?;
        out.push_sql("::int8 IS NULL OR account_id = ");
        out.push_bind_param::<Nullable<Int8>, _>(&self.owner)?;
        out.push_sql(
            ") AND status = 'pending_new' AND executed_qty = 0 \
             AND (exchange_order_id IS NULL OR exchange_order_id = ",
        );
        out.push_bind_param::<Int8, _>(&self.order_id)?;
        out.push_sql(") RETURNING *");
        Ok(())
    }
}

untyped_query!(FirstNew);

/// Claims every leg of a generation in one statement (`unnest` of column
/// arrays, so one text whatever the number of legs), the generation whole or
/// not at all. Either unique key makes a later claimer insert nothing; the
/// keys inserted are returned.
pub(crate) struct ClaimLegs<'a> {
    pub entry_ids: Vec<i64>,
    pub legs: Vec<i16>,
    pub generations: Vec<i32>,
    pub list_client_ids: Vec<&'a str>,
    pub take_profit_client_ids: Vec<&'a str>,
    pub stop_loss_client_ids: Vec<&'a str>,
    pub symbols: Vec<&'a str>,
    pub qtys: Vec<PgNumeric>,
    pub take_profit_prices: Vec<PgNumeric>,
    pub stop_prices: Vec<PgNumeric>,
    pub stop_limit_prices: Vec<Option<PgNumeric>>,
    pub states: Vec<&'a str>,
    pub sources: Vec<&'a str>,
    pub attempts: Vec<i32>,
    pub claimed_at: Vec<PgTimestamp>,
    pub updated_at: Vec<PgTimestamp>,
}

impl<'a> ClaimLegs<'a> {
    /// The statement for `rows`.
    pub(crate) fn of(rows: &'a [NewLegRow]) -> Self {
        Self {
            entry_ids: rows.iter().map(|r| r.entry_id).collect(),
            legs: rows.iter().map(|r| r.leg).collect(),
            generations: rows.iter().map(|r| r.generation).collect(),
            list_client_ids: rows.iter().map(|r| r.list_client_id.as_str()).collect(),
            take_profit_client_ids: rows
                .iter()
                .map(|r| r.take_profit_client_id.as_str())
                .collect(),
            stop_loss_client_ids: rows
                .iter()
                .map(|r| r.stop_loss_client_id.as_str())
                .collect(),
            symbols: rows.iter().map(|r| r.symbol.as_str()).collect(),
            qtys: rows.iter().map(|r| r.qty.clone()).collect(),
            take_profit_prices: rows.iter().map(|r| r.take_profit_price.clone()).collect(),
            stop_prices: rows.iter().map(|r| r.stop_price.clone()).collect(),
            stop_limit_prices: rows.iter().map(|r| r.stop_limit_price.clone()).collect(),
            states: rows.iter().map(|r| r.state).collect(),
            sources: rows.iter().map(|r| r.source).collect(),
            attempts: rows.iter().map(|r| r.attempts).collect(),
            claimed_at: rows.iter().map(|r| r.claimed_at).collect(),
            updated_at: rows.iter().map(|r| r.updated_at).collect(),
        }
    }
}

impl QueryFragment<Pg> for ClaimLegs<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH ");
        self.walk_claims(out.reborrow(), "")?;
        out.push_sql(" SELECT entry_id, leg, generation FROM claimed");
        Ok(())
    }
}

impl ClaimLegs<'_> {
    /// The claims as common table expressions ending in `claimed` (the keys
    /// won), each generation's first claim inserted only where `condition`
    /// (SQL text appended to its `WHERE`, empty for always) holds.
    ///
    /// A generation is won whole or not at all. Its lowest leg in the call
    /// (its lead: every plan has the first leg), whatever the order of the
    /// claims, is inserted alone; the rest only if that insert went in. Racing claimers of one generation
    /// conflict on the lead's key, so the unique index makes all but one of
    /// them wait and then insert nothing: two plans of different shapes (one
    /// leg from a smaller fill, two from a larger) never split a generation
    /// between them, which would cover more or less than either meant.
    fn walk_claims<'b>(
        &'b self,
        mut out: AstPass<'_, 'b, Pg>,
        condition: &'static str,
    ) -> QueryResult<()> {
        const COLUMNS: &str = "entry_id, leg, generation, list_client_id, \
             take_profit_client_id, stop_loss_client_id, symbol, qty, take_profit_price, \
             stop_price, stop_limit_price, state, source, attempts, claimed_at, updated_at";
        out.push_sql(
            "wanted AS (SELECT w.*, \
             w.leg = min(w.leg) OVER (PARTITION BY w.entry_id, w.generation) AS lead FROM unnest(",
        );
        out.push_bind_param::<Array<Int8>, _>(&self.entry_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int2>, _>(&self.legs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int4>, _>(&self.generations)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.list_client_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.take_profit_client_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.stop_loss_client_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.symbols)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Numeric>, _>(&self.qtys)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Numeric>, _>(&self.take_profit_prices)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Numeric>, _>(&self.stop_prices)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Numeric>>, _>(&self.stop_limit_prices)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.states)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.sources)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int4>, _>(&self.attempts)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamptz>, _>(&self.claimed_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamptz>, _>(&self.updated_at)?;
        out.push_sql(") WITH ORDINALITY AS w (");
        out.push_sql(COLUMNS);
        out.push_sql(", n)), led AS (INSERT INTO protection_legs (");
        out.push_sql(COLUMNS);
        out.push_sql(") SELECT ");
        out.push_sql(COLUMNS);
        out.push_sql(" FROM wanted WHERE lead");
        out.push_sql(condition);
        out.push_sql(
            // One order for every caller, so that two claiming several
            // generations never wait for each other's rows crosswise.
            " ORDER BY entry_id, generation, leg ON CONFLICT DO NOTHING \
             RETURNING entry_id, leg, generation), \
             followed AS (INSERT INTO protection_legs (",
        );
        out.push_sql(COLUMNS);
        out.push_sql(") SELECT ");
        out.push_sql(COLUMNS);
        out.push_sql(
            " FROM wanted w WHERE NOT w.lead AND EXISTS (SELECT 1 FROM led \
             WHERE led.entry_id = w.entry_id AND led.generation = w.generation) \
             ORDER BY entry_id, generation, leg ON CONFLICT DO NOTHING \
             RETURNING entry_id, leg, generation), \
             claimed AS (SELECT entry_id, leg, generation FROM led \
             UNION ALL SELECT entry_id, leg, generation FROM followed)",
        );
        Ok(())
    }
}

untyped_query!(ClaimLegs<'_>);

/// A placement's outcomes in one call of the `record_outcomes` function:
/// each leg update as a compare-and-set on its state, the history appended
/// and the entry's protection set, all or nothing. When any leg does not exist nothing is
/// written (`found` tells which); a missing entry fails the events' foreign
/// key. Returns one row per update: whether it applied.
pub(crate) struct RecordOutcomes<'a> {
    pub entry: i64,
    pub leg_entries: Vec<i64>,
    pub legs: Vec<i16>,
    pub generations: Vec<i32>,
    pub from: Vec<&'a str>,
    pub states: Vec<&'static str>,
    pub order_list_ids: Vec<Option<i64>>,
    pub not_placed_codes: Vec<Option<i32>>,
    pub state_reasons: Vec<Option<String>>,
    pub external_ends: Vec<Option<&'static str>>,
    pub last_errors: Vec<Option<String>>,
    pub updated_at: Vec<PgTimestamp>,
    pub event_entries: Vec<i64>,
    pub event_kinds: Vec<&'a str>,
    pub event_details: Vec<&'a str>,
    pub event_sources: Vec<Option<&'static str>>,
    pub event_at: Vec<PgTimestamp>,
    pub set_protection: bool,
    pub protection: &'static str,
    pub protection_reason: Option<String>,
    pub protected_at: Option<PgTimestamp>,
    pub protected_by: Option<&'static str>,
}

impl<'a> RecordOutcomes<'a> {
    /// The statement for `updates`, `events` and `protection` of `entry`.
    pub(crate) fn new(
        entry: EntryId,
        updates: &'a [LegUpdate],
        events: &'a [EntryEventRecord],
        protection: Option<EntryProtectionColumns>,
    ) -> Result<Self, StoreError> {
        let mut columns = Vec::with_capacity(updates.len());
        for u in updates {
            columns.push(LegUpdateColumns::new(
                &u.to,
                u.error.clone(),
                timestamp(u.at)?,
            ));
        }
        let keys: Vec<(i64, i16, i32)> = updates.iter().map(|u| leg_key_columns(u.key)).collect();
        let event_at = events
            .iter()
            .map(|e| timestamp(e.at))
            .collect::<Result<_, _>>()?;
        let set_protection = protection.is_some();
        let protection = protection.unwrap_or(EntryProtectionColumns {
            protection: "not_needed",
            protection_reason: None,
            protected_at: None,
            protected_by: None,
        });
        Ok(Self {
            entry: entry.0,
            leg_entries: keys.iter().map(|k| k.0).collect(),
            legs: keys.iter().map(|k| k.1).collect(),
            generations: keys.iter().map(|k| k.2).collect(),
            from: updates.iter().map(|u| u.from).collect(),
            states: columns.iter().map(|c| c.state).collect(),
            order_list_ids: columns.iter().map(|c| c.order_list_id).collect(),
            not_placed_codes: columns
                .iter()
                .map(|c| c.not_placed_code.flatten())
                .collect(),
            state_reasons: columns
                .iter()
                .map(|c| c.state_reason.clone().flatten())
                .collect(),
            external_ends: columns.iter().map(|c| c.external_end.flatten()).collect(),
            last_errors: columns.iter().map(|c| c.last_error.clone()).collect(),
            updated_at: columns.iter().map(|c| c.updated_at).collect(),
            event_entries: events.iter().map(|e| e.entry.0).collect(),
            event_kinds: events.iter().map(|e| e.kind.as_str()).collect(),
            event_details: events.iter().map(|e| e.detail.as_str()).collect(),
            event_sources: events.iter().map(|e| e.source.map(|s| s.name())).collect(),
            event_at,
            set_protection,
            protection: protection.protection,
            protection_reason: protection.protection_reason.flatten(),
            protected_at: protection.protected_at,
            protected_by: protection.protected_by,
        })
    }
}

impl QueryFragment<Pg> for RecordOutcomes<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // The statement is the `record_outcomes` function (migration
        // 2026-12-04-000007): planned once per connection, with index lookups only.
        out.push_sql("SELECT entries_set, n, leg_found AS found, applied FROM record_outcomes(");
        out.push_bind_param::<Int8, _>(&self.entry)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int8>, _>(&self.leg_entries)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int2>, _>(&self.legs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int4>, _>(&self.generations)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.from)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.states)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Int8>>, _>(&self.order_list_ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Int4>>, _>(&self.not_placed_codes)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.state_reasons)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.external_ends)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.last_errors)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamptz>, _>(&self.updated_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int8>, _>(&self.event_entries)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.event_kinds)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.event_details)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.event_sources)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamptz>, _>(&self.event_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Bool, _>(&self.set_protection)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(self.protection)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&self.protection_reason)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Timestamptz>, _>(&self.protected_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&self.protected_by)?;
        out.push_sql(")");
        Ok(())
    }
}

untyped_query!(RecordOutcomes<'_>);

/// One row of [`RecordOutcomes`]' answer per update, in order (a single
/// row with no update when there were none).
#[derive(diesel::QueryableByName)]
pub(crate) struct OutcomeRow {
    /// Entries whose protection was set (0 or 1).
    #[diesel(sql_type = Int8)]
    pub entries_set: i64,
    /// The update's position, from 1.
    #[diesel(sql_type = Nullable<Int8>)]
    pub n: Option<i64>,
    /// Whether its leg exists.
    #[diesel(sql_type = Nullable<Bool>)]
    pub found: Option<bool>,
    /// Whether it applied (the leg was in its `from` state).
    #[diesel(sql_type = Bool)]
    pub applied: bool,
}

/// The next entry id. diesel prepares a `sql()` literal again on each call.
pub(crate) struct NextEntryId;

impl QueryFragment<Pg> for NextEntryId {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("SELECT nextval('entry_ids') AS id");
        Ok(())
    }
}

untyped_query!(NextEntryId);

/// [`NextEntryId`]'s answer.
#[derive(diesel::QueryableByName)]
pub(crate) struct EntryIdRow {
    /// The id.
    #[diesel(sql_type = Int8)]
    pub id: i64,
}

/// A new entry, every column bound (an absent value as NULL), so that one
/// text serves every entry: diesel's own insert writes `DEFAULT` for an
/// absent value, which makes the text vary and the statement prepared again
/// on each call.
///
/// Inserted only while its account is active, and the account's row is
/// locked `FOR SHARE` until the insert commits: a disable (an `UPDATE` of
/// the row) that commits first is seen (PostgreSQL re-checks `active` on the
/// row as updated, and the insert matches nothing); one that comes later
/// waits for the commit, so the open entries it reads after its write hold
/// this one. The foreign key's own `FOR KEY SHARE` would not make it wait.
/// With an idempotency key its account already holds (on a committed row,
/// or on one being inserted, whose commit it waits for), nothing is inserted
/// (`ON CONFLICT DO NOTHING` on `entries_idempotency_key_unique`, inferred
/// from its columns and predicate, which migration `2026-12-05-000017`
/// must keep equal to these; a NULL key never conflicts).
/// `RETURNING *`: one row, or none when the account is disabled or absent,
/// or the key taken.
pub(crate) struct InsertEntry<'a> {
    pub row: &'a NewEntryRow,
}

impl QueryFragment<Pg> for InsertEntry<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let row = self.row;
        out.push_sql(
            "INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, \
             client_order_id, order_type, limit_price, requested_qty, requested_quote, status, \
             metadata, protection, created_at, idempotency_key) SELECT ",
        );
        out.push_bind_param::<Int8, _>(&row.id)?;
        out.push_sql(", a.id, ");
        out.push_bind_param::<Text, _>(&row.symbol)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.base_asset)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.quote_asset)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&row.client_order_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(row.order_type)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Numeric>, _>(&row.limit_price)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Numeric>, _>(&row.requested_qty)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Numeric>, _>(&row.requested_quote)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(row.status)?;
        out.push_sql(", ");
        out.push_bind_param::<Jsonb, _>(&row.metadata)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(row.protection)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamptz, _>(&row.created_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&row.idempotency_key)?;
        out.push_sql(" FROM accounts a WHERE a.id = ");
        out.push_bind_param::<Int8, _>(&row.account_id)?;
        out.push_sql(
            " AND a.active FOR SHARE ON CONFLICT (account_id, idempotency_key) \
             WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING *",
        );
        Ok(())
    }
}

untyped_query!(InsertEntry<'_>);
