//! Coverage queries: filled, protected and unprotected entries, acknowledged
//! lists by layer, and an owner's recent history, for metrics and the
//! coverage page.

use async_trait::async_trait;
use diesel::QueryableByName;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::RunQueryDsl;
use oco_core::model::{EntryEventRecord, Source};
use oco_core::ports::{Coverage, CoverageReport, UnprotectedEntry};
use oco_core::{AccountId, EntryId, Millis, StoreError};

use crate::error::db;
use crate::rows::EventRow;
use crate::schema::{accounts, entries, entry_events};
use crate::store::PgStore;

#[derive(QueryableByName)]
struct CountsRow {
    #[diesel(sql_type = BigInt)]
    filled: i64,
    #[diesel(sql_type = BigInt)]
    protected: i64,
}

#[derive(QueryableByName)]
struct UnprotectedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = Text)]
    client_order_id: String,
    #[diesel(sql_type = Text)]
    symbol: String,
    #[diesel(sql_type = Text)]
    protection: String,
    #[diesel(sql_type = BigInt)]
    filled_ms: i64,
}

#[derive(QueryableByName)]
struct SourceRow {
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

// `$1` is the owner, NULL for every account.
const COUNTS: &str = "SELECT \
     count(*) FILTER (WHERE e.protection IN ('protected', 'unprotected', 'unprotectable')) AS filled, \
     count(*) FILTER (WHERE e.protection = 'protected') AS protected \
     FROM entries e JOIN accounts a ON a.id = e.account_id \
     WHERE ($1::text IS NULL OR a.owner = $1)";

const UNPROTECTED: &str = "SELECT e.id, e.account_id, e.client_order_id, e.symbol, e.protection, \
     (extract(epoch FROM coalesce(e.filled_at, e.created_at)) * 1000)::int8 AS filled_ms \
     FROM entries e JOIN accounts a ON a.id = e.account_id \
     WHERE e.protection IN ('unprotected', 'unprotectable') AND ($1::text IS NULL OR a.owner = $1) \
     ORDER BY coalesce(e.filled_at, e.created_at), e.id LIMIT $2";

// The states of a leg the exchange acknowledged (`oco_core::mem::was_placed`).
const PLACEMENTS: &str = "SELECT l.source, count(*) AS n \
     FROM protection_legs l JOIN entries e ON e.id = l.entry_id JOIN accounts a ON a.id = e.account_id \
     WHERE l.state IN ('placed', 'take_profit_filled', 'stop_loss_filled', 'canceled_externally', 'replaced') \
     AND ($1::text IS NULL OR a.owner = $1) \
     GROUP BY l.source";

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl Coverage for PgStore {
    #[tracing::instrument(level = "debug", skip(self))]
    async fn coverage(
        &self,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<CoverageReport, StoreError> {
        let mut conn = self.conn().await?;
        let counts: CountsRow = diesel::sql_query(COUNTS)
            .bind::<Nullable<Text>, _>(owner)
            .get_result(&mut conn)
            .await
            .map_err(|e| db("counting covered entries", e))?;
        let rows: Vec<UnprotectedRow> = diesel::sql_query(UNPROTECTED)
            .bind::<Nullable<Text>, _>(owner)
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(&mut conn)
            .await
            .map_err(|e| db("listing unprotected entries", e))?;
        let by_source: Vec<SourceRow> = diesel::sql_query(PLACEMENTS)
            .bind::<Nullable<Text>, _>(owner)
            .load(&mut conn)
            .await
            .map_err(|e| db("counting placements by layer", e))?;
        let unprotected = rows
            .into_iter()
            .map(|r| {
                let state = match r.protection.as_str() {
                    "unprotected" => "unprotected",
                    _ => "unprotectable",
                };
                UnprotectedEntry {
                    entry: EntryId(r.id),
                    account: AccountId(r.account_id),
                    client_id: r.client_order_id,
                    symbol: r.symbol,
                    filled_at: Millis(r.filled_ms),
                    state,
                }
            })
            .collect();
        let placements = [Source::Websocket, Source::Sync, Source::Direct]
            .into_iter()
            .map(|s| {
                let n = by_source
                    .iter()
                    .filter(|r| r.source == s.name())
                    .map(|r| count(r.n))
                    .sum();
                (s, n)
            })
            .collect();
        let (filled, protected) = (count(counts.filled), count(counts.protected));
        Ok(CoverageReport {
            filled,
            protected,
            unprotected_count: filled.saturating_sub(protected),
            unprotected,
            placements,
        })
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn recent_events(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<EntryEventRecord>, StoreError> {
        let mut conn = self.conn().await?;
        entry_events::table
            .inner_join(entries::table.inner_join(accounts::table))
            .filter(accounts::owner.eq(owner))
            .order((entry_events::at.desc(), entry_events::id.desc()))
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .select(EventRow::as_select())
            .load(&mut conn)
            .await
            .map_err(|e| db(&format!("reading the recent history of {owner}"), e))?
            .into_iter()
            .map(EventRow::into_event)
            .collect()
    }
}
