//! [`PgStore`]: the [`Store`] port on PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use deadpool::Runtime;
use diesel::pg::data_types::{PgNumeric, PgTimestamp};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Bool, Nullable, Numeric, Timestamptz};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::scoped_futures::ScopedFutureExt as _;
use diesel_async::{
    AsyncConnection as _, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection as _,
};
use futures_util::FutureExt as _;
use oco_core::mem::{is_open, merge_evidence};
use oco_core::model::{
    EntryEventRecord, EntryKind, Evidence, LegClaim, LegUpdate, NewEntry, OrderSize, Protection,
    Realized, SaleSide,
};
use oco_core::ports::{ClaimPlanner, FillContext, NewAccount, RecordedFill, RecordedOutcomes};
use oco_core::state::{EntryStatus, LegSold};
use oco_core::{
    Account, AccountId, ApiCredentials, ClientOrderId, Entry, EntryId, IdempotencyKey, Leg, LegKey,
    Millis, ProtectionConfig, Store, StoreError,
};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret as _, SecretString};

use crate::cached::{
    ClaimLegs, EntryIdRow, FirstNew, InsertEntry, MergeAndClaim, MergeWrite, MergedClaimRow,
    NextEntryId, OutcomeRow, RecordOutcomes, SeenEntry,
};
use crate::config::PgConfig;
use crate::convert::{numeric, timestamp};
use crate::crypto::Cipher;
use crate::error::{corrupt, db, is_foreign_key, not_found, pool};
use crate::hints::{AccountHint, HintStats, Hints};
use crate::migrate::migrate;
use crate::rows::{
    AccountRow, EntryProtectionColumns, EntryRow, EventRow, FillRow, LegRow, LegTradeRow,
    LegUpdateColumns, NewEntryRow, NewLegRow, ProtectionColumns, leg_key_columns, metadata,
};
use crate::schema::{
    accounts, entries, entry_events, fills, leg_trades, protection_legs, secret_key_check,
};

diesel::define_sql_function! {
    /// PostgreSQL's `GREATEST` on two numerics: the store's monotonic merge.
    fn greatest(a: Numeric, b: Numeric) -> Numeric;
}

diesel::define_sql_function! {
    /// PostgreSQL's `COALESCE` on two timestamps: the first set one.
    #[sql_name = "coalesce"]
    fn coalesce_time(a: Nullable<Timestamptz>, b: Nullable<Timestamptz>) -> Nullable<Timestamptz>;
}

/// A leg key a claim inserted.
#[derive(diesel::QueryableByName)]
struct ClaimedKey {
    #[diesel(sql_type = BigInt)]
    entry_id: i64,
    #[diesel(sql_type = diesel::sql_types::SmallInt)]
    leg: i16,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    generation: i32,
}

/// The leg a trade is recorded for, locked: its entry's account and its symbol.
#[derive(diesel::QueryableByName)]
struct LockedLeg {
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    symbol: String,
}

/// Locks a leg's row and reads what its trades are keyed by.
const LOCK_LEG: &str = "SELECT e.account_id, l.symbol FROM protection_legs l \
     JOIN entries e ON e.id = l.entry_id \
     WHERE l.entry_id = $1 AND l.leg = $2 AND l.generation = $3 FOR UPDATE OF l";

/// Sets a leg's sums from its stored trades.
const SUM_LEG_TRADES: &str = "UPDATE protection_legs SET \
     traded_take_profit = COALESCE((SELECT sum(qty) FROM leg_trades \
         WHERE entry_id = $1 AND leg = $2 AND generation = $3 AND side = 'take_profit'), 0), \
     traded_stop_loss = COALESCE((SELECT sum(qty) FROM leg_trades \
         WHERE entry_id = $1 AND leg = $2 AND generation = $3 AND side = 'stop_loss'), 0), \
     fees = COALESCE((SELECT jsonb_object_agg(commission_asset, total::text) FROM \
         (SELECT commission_asset, sum(commission) AS total FROM leg_trades \
          WHERE entry_id = $1 AND leg = $2 AND generation = $3 \
          GROUP BY commission_asset HAVING sum(commission) <> 0) AS per_asset), '{}'::jsonb) \
     WHERE entry_id = $1 AND leg = $2 AND generation = $3";

#[derive(diesel::QueryableByName)]
struct AccountIdRow {
    #[diesel(sql_type = BigInt)]
    account_id: i64,
}

/// How many times a merge of evidence is read and written again when other
/// writers keep changing the entry in between; past that the call fails as
/// `Unavailable` and its caller retries later.
const MERGE_ATTEMPTS: usize = 64;

// A writing statement's rows are read with `load`, to the end, never with
// `get_result`: diesel-async's `get_result` returns at the first row, but
// PostgreSQL commits a statement run outside a transaction only after its
// rows (at the protocol's Sync), so a write acknowledged at the first row can
// still be lost (backend killed, server crash before the WAL flush). `load`
// reads up to ReadyForQuery: what it returns is committed.

/// The row of a writing statement that touches at most one row.
fn last<T>(mut rows: Vec<T>) -> Option<T> {
    rows.pop()
}

/// What a merge that kept losing its compare-and-set reports.
fn kept_changing(id: EntryId) -> StoreError {
    StoreError::Unavailable(format!(
        "recording evidence of entry {id}: the entry kept changing under {MERGE_ATTEMPTS} attempts"
    ))
}

/// An entry and its stored fills as one statement read them.
struct Snapshot {
    entry: Entry,
    /// The evidence columns as stored, for the write's compare-and-set.
    seen: SeenEntry,
    /// This entry's fills by trade id.
    stored: BTreeMap<i64, oco_core::model::Fill>,
    /// Trades of the evidence already stored under another entry.
    elsewhere: BTreeSet<i64>,
}

/// Evidence merged into a [`Snapshot`].
struct Merge {
    /// The entry with the evidence merged.
    entry: Entry,
    /// Fills not yet stored.
    new_fills: Vec<FillRow>,
    /// Nothing to write: the evidence was already known.
    unchanged: bool,
}

impl Snapshot {
    fn merge(&self, evidence: &Evidence) -> Result<Merge, StoreError> {
        // A trade id already recorded under another entry of the same
        // account and symbol is not this entry's: leave it out.
        let mut own = evidence.clone();
        own.fills.retain(|f| !self.elsewhere.contains(&f.trade_id));
        let mut stored = self.stored.clone();
        let mut merged = self.entry.clone();
        merge_evidence(&mut merged, &mut stored, &own);
        let new_fills = stored
            .values()
            .filter(|f| !self.stored.contains_key(&f.trade_id))
            .map(|f| FillRow::from_fill(&merged, f))
            .collect::<Result<_, _>>()?;
        Ok(Merge {
            unchanged: merged == self.entry,
            entry: merged,
            new_fills,
        })
    }
}

/// The row of a writing statement that touches exactly one row.
fn only<T>(rows: Vec<T>) -> diesel::QueryResult<T> {
    last(rows).ok_or(diesel::result::Error::NotFound)
}

/// How long a caller waits for a pooled connection, or for a new one to open,
/// before the call fails as `Unavailable`.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections of the account leases' own pool, on top of the durable and
/// evidence pools ([`PgConfig`]'s `pool_size` each); opened at first use or
/// by [`PgStore::warm_up`]. A gateway makes its lease calls one at a time,
/// so one would serve it. The second keeps them going while a statement the
/// gateway gave up on (its bound) still runs on the first (the pool hands
/// idle connections out in turn), and serves a second gateway on the same
/// store (tests run several).
pub const LEASE_CONNECTIONS: usize = 2;

/// How many times `create_entry` inserts again when its key's holder
/// released the key between the insert and the read that looked for it.
const KEY_RETRIES: usize = 3;

/// How long a service waits at start for an unreachable database before it
/// gives up (`PgStore::connect_patiently`): long enough for a database that
/// boots or restarts alongside it, short enough that a wrong address is
/// reported within a minute.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// The PostgreSQL store. Cheap to share behind an `Arc`; every method takes a
/// pooled connection for the duration of one statement or transaction.
pub struct PgStore {
    pool: Pool<AsyncPgConnection>,
    /// Connections whose commits do not wait for the WAL flush, for evidence
    /// only. Evidence is a copy of the exchange's facts, which `sync` reads
    /// again after any outage, and every durable commit (a claim, above all)
    /// flushes the log up to itself, so the evidence a claim was planned from
    /// is on disk before the claim is acknowledged. What a server crash can
    /// lose is evidence that nothing durable followed yet: the same as a
    /// crash just before it was written. A fill then waits for one flush
    /// (its claim's), not two.
    evidence_pool: Pool<AsyncPgConnection>,
    /// Connections for the account leases alone, with durable commits like
    /// `pool`'s. A gateway lets every account go when no renewal has gone
    /// through for its lease hold: on the pool the fills write through, a
    /// burst of fills would delay a renewal long enough to look like a lost
    /// database. Here a renewal waits for no fill.
    lease_pool: Pool<AsyncPgConnection>,
    cipher: Cipher,
    /// Entries with nothing filled and accounts, as last written or read
    /// here: a first fill written from them skips its read.
    hints: Hints,
    /// New entries to announce (see [`PgStore::announce_entry`]); the task
    /// that sends them ends when the store is dropped.
    announcements: tokio::sync::mpsc::Sender<(AccountId, EntryId)>,
    // Kept for LISTEN connections; may hold a password, so never shown.
    url: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PgStore")
            .field("pool_size", &status.max_size)
            .field("pool_open", &status.size)
            .field("pool_idle", &status.available)
            .field("lease_pool_open", &self.lease_pool.status().size)
            .field("url", &"[redacted]")
            .field("secret_key", &"[redacted]")
            .finish()
    }
}

/// One call of each function the checks of `entries` and `protection_legs`
/// call (migration `2026-12-04-000009`), with values that keep every rule.
const CHECKS_WARM_UP: &str = "SELECT \
    entries_state_ok('new', 'not_needed', NULL, NULL, NULL), \
    entries_values_ok('market', NULL, 1, NULL, 0, 0, 0, 0), \
    protection_legs_state_ok('claimed', NULL, NULL, NULL, NULL), \
    protection_legs_values_ok(1::SMALLINT, 0, 0, 1, 1, NULL, 'sync')";

/// New entries waiting to be announced, at most; see [`announce`].
const ANNOUNCE_QUEUE: usize = 4096;

/// New entries announced in one transaction, at most.
const ANNOUNCE_BATCH: usize = 256;

/// Sends the announcements of new entries queued by
/// [`PgStore::announce_entry`], as many as are waiting (up to
/// [`ANNOUNCE_BATCH`]) in one transaction of `NOTIFY`s, one transaction at a
/// time, until the store is dropped.
///
/// Not in the entries' own transactions: PostgreSQL holds one lock from a
/// notifying transaction's commit through its WAL flush, so every entry's
/// durable commit would queue behind the others'. On `connections`, whose
/// commits do not wait for the flush, the lock is held for no flush. Only a
/// connection free at that moment is taken (or opened, within the pool's
/// size), tried 50 times 1 ms apart: fills read on the same pool and must not
/// queue behind an announcement. A batch that finds none, or fails, is
/// dropped (its entries are read at their fills).
async fn announce(
    connections: Pool<AsyncPgConnection>,
    mut queued: tokio::sync::mpsc::Receiver<(AccountId, EntryId)>,
) {
    let mut batch = Vec::with_capacity(ANNOUNCE_BATCH);
    while queued.recv_many(&mut batch, ANNOUNCE_BATCH).await > 0 {
        let mut conn = None;
        for _ in 0..50 {
            if let Ok(free) = connections.timeout_get(&NO_WAIT).await {
                conn = Some(free);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let Some(mut conn) = conn else {
            tracing::debug!(
                entries = batch.len(),
                "no connection free to announce new entries: read at their fills"
            );
            batch.clear();
            continue;
        };
        // Ids only: nothing to quote.
        let notify: String = batch
            .iter()
            .map(|(account, id)| format!("NOTIFY {}, '{account} {id}';", crate::ENTRY_CHANNEL))
            .collect();
        if let Err(err) = conn.batch_execute(&notify).await {
            tracing::debug!(entries = batch.len(), error = %err, "new entries not announced: read at their fills");
        }
        batch.clear();
    }
}

/// `account`'s keys and settings as a hint, when `read` holds them for it at
/// one version (read at two, they straddled a change: the fill reads them).
fn account_hint(
    account: AccountId,
    read: Option<(ApiCredentials, Account, Option<i64>)>,
) -> Option<AccountHint> {
    match read {
        Some((credentials, settings, Some(version))) if settings.id == account => {
            Some(AccountHint {
                version,
                credentials,
                account: settings,
            })
        }
        _ => None,
    }
}

/// A pool checkout that takes a free connection (or opens one, within the
/// pool's size) but never waits for one in use: for work that may be skipped.
const NO_WAIT: deadpool::managed::Timeouts = deadpool::managed::Timeouts {
    wait: Some(Duration::ZERO),
    create: Some(POOL_TIMEOUT),
    recycle: Some(POOL_TIMEOUT),
};

/// PostgreSQL plans a prepared statement anew at each of its first five
/// executions on a connection (custom plans) and builds its generic plan at
/// the sixth; only after that is a bind cheap. For the merge with its claims
/// that planning takes about 1.2 ms, which the first six fills of every new
/// connection would pay on their way to the exchange: the warm-up takes
/// those executions instead.
const PLAN_WARM_ROUNDS: usize = 6;

/// The symbol of the warm-up's scratch entry (no exchange lists it).
const SCRATCH_SYMBOL: &str = "WARMUPSCRATCH";

/// An account and an entry that exist only inside the warm-up's transaction,
/// which is always rolled back. Their ids (the backend's pid, negated) and
/// keys (with a space, which no exchange key or client id has) collide with
/// no real row nor with another connection's warm-up.
const SCRATCH_ROWS: &str = "WITH a AS (INSERT INTO accounts (id, owner, exchange, api_key, \
     secret_ciphertext, split, stop_kind, late_policy, active) VALUES (-pg_backend_pid(), '', \
     'binance', 'warm-up ' || pg_backend_pid(), '\\x00'::bytea, 1, 'market', 'record_only', \
     false) RETURNING id, version) \
     INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, client_order_id, \
     order_type, requested_qty, status, created_at) SELECT -pg_backend_pid(), a.id, \
     'WARMUPSCRATCH', 'W', 'U', 'warm-up ' || pg_backend_pid(), 'market', 1, 'new', now() \
     FROM a RETURNING id, account_id, (SELECT version FROM a) AS version";

/// [`SCRATCH_ROWS`]' answer.
#[derive(diesel::QueryableByName)]
struct ScratchRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

/// A claim row for the scratch entry, shaped as a real one; never inserted
/// (the scratch entry's compare-and-set matches nothing).
fn scratch_leg(entry_id: i64, leg: i16, one: &PgNumeric) -> NewLegRow {
    let id = format!("warm-up {entry_id} {leg}");
    NewLegRow {
        entry_id,
        leg,
        generation: 0,
        list_client_id: id.clone(),
        take_profit_client_id: id.clone(),
        stop_loss_client_id: id,
        symbol: SCRATCH_SYMBOL.to_owned(),
        qty: one.clone(),
        take_profit_price: one.clone(),
        stop_price: one.clone(),
        stop_limit_price: None,
        state: "claimed",
        source: "websocket",
        attempts: 1,
        claimed_at: PgTimestamp(0),
        updated_at: PgTimestamp(0),
    }
}

impl PgStore {
    /// Applies pending migrations (under an advisory lock), opens the pool and
    /// checks the secret key against the key check value stored by the first
    /// process that ran with this database (storing it if none is there yet).
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached or migrated;
    /// `Corrupt` naming the secret key when the configured key is not the one
    /// the stored secrets were encrypted under; `Conflict` for a pool size of 0.
    pub async fn connect(config: PgConfig) -> Result<PgStore, StoreError> {
        if config.pool_size == 0 {
            return Err(StoreError::Conflict(
                "pool size must be at least 1, got 0".to_owned(),
            ));
        }
        migrate(&config.url).await?;
        let pool = build_pool(&config.url, config.pool_size, None)?;
        let evidence_pool = build_pool(
            &config.url,
            config.pool_size,
            Some("SET synchronous_commit = off"),
        )?;
        let lease_pool = build_pool(&config.url, LEASE_CONNECTIONS, None)?;
        let (announcements, to_announce) = tokio::sync::mpsc::channel(ANNOUNCE_QUEUE);
        tokio::spawn(announce(evidence_pool.clone(), to_announce));
        let store = PgStore {
            pool,
            evidence_pool,
            lease_pool,
            cipher: Cipher::new(&config.secret_key),
            hints: Hints::default(),
            announcements,
            url: config.url,
        };
        store.check_secret_key().await?;
        Ok(store)
    }

    /// [`PgStore::connect`], retried while the database is unreachable, for
    /// up to `patience`: a service started before its database (a boot, a
    /// database restart under a supervisor) waits for it instead of exiting.
    /// Waits 250 ms between attempts, doubling up to 5 s; logs each failure.
    ///
    /// # Errors
    /// The last `Unavailable` once `patience` is spent; any other error (a
    /// wrong secret key, a pool size of 0) at once, since waiting cannot fix it.
    pub async fn connect_patiently(
        config: PgConfig,
        patience: Duration,
    ) -> Result<PgStore, StoreError> {
        // A URL that does not parse will not parse later either: no waiting.
        if let Err(e) = config.url.parse::<tokio_postgres::Config>() {
            return Err(StoreError::Unavailable(format!(
                "the database URL is not a PostgreSQL URL: {e}"
            )));
        }
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(250);
        loop {
            match PgStore::connect(config.clone()).await {
                Err(StoreError::Unavailable(why)) if started.elapsed() + wait < patience => {
                    tracing::warn!(error = %why, retry_in_ms = wait.as_millis(), "database unavailable at start, waiting for it");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Applies pending migrations to this store's database (the `migrate`
    /// subcommand); returns the versions applied.
    ///
    /// # Errors
    /// As [`crate::migrate`].
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        migrate(&self.url).await
    }

    /// Opens every connection of the three pools and prepares on those of
    /// the fills' two the statements a fill is read with. Without it the
    /// first fills after a start pay for what a pool does lazily: a server
    /// process per connection, its catalog caches and a parse per statement,
    /// several milliseconds each, at the moment a restarted gateway meets the
    /// fills it missed. The leases' connections are only opened (their
    /// statements are not prepared ones), so the first renewal does not wait
    /// for a server process either. Nothing is written.
    ///
    /// # Errors
    /// `Unavailable` when a connection cannot be opened or a statement fails.
    pub async fn warm_up(&self) -> Result<(), StoreError> {
        // Every pool, each whatever becomes of the others.
        let (durable, evidence, leases) = futures_util::future::join3(
            self.warm_pool(&self.pool, true),
            self.warm_pool(&self.evidence_pool, false),
            Self::open_all(&self.lease_pool),
        )
        .await;
        durable.and(evidence).and(leases.map(drop))
    }

    /// Every connection `connections` may hold, opened and checked out at
    /// once (one at a time, the pool would hand the same one back).
    async fn open_all(
        connections: &Pool<AsyncPgConnection>,
    ) -> Result<Vec<Object<AsyncPgConnection>>, StoreError> {
        futures_util::future::try_join_all(
            (0..connections.status().max_size)
                .map(|_| async { connections.get().await.map_err(pool) }),
        )
        .await
    }

    /// Warms every connection of `connections`: the checks' functions are
    /// called once each (their first call in a session compiles them), and
    /// `durable` ones also call the outcomes' function once (its first call
    /// compiles and plans it), with nothing to record.
    async fn warm_pool(
        &self,
        connections: &Pool<AsyncPgConnection>,
        durable: bool,
    ) -> Result<(), StoreError> {
        // Ids no row has: each read finds nothing, and is prepared all the same.
        let (nobody, nothing) = (AccountId(0), EntryId(0));
        let conns = Self::open_all(connections).await?;
        futures_util::future::try_join_all(conns.into_iter().map(|mut conn| async move {
            for _ in 0..PLAN_WARM_ROUNDS {
                let snapshot = Self::start_snapshot(&mut conn, nothing, Some(nobody), Vec::new());
                let context = self.start_context(&mut conn, nobody, nothing);
                let entry = Self::load_entry(&mut conn, nothing);
                let (snapshot, context, entry) =
                    futures_util::future::join3(snapshot, context, entry).await;
                snapshot?;
                for absent in [context.map(drop), entry.map(drop)] {
                    match absent {
                        Ok(()) | Err(StoreError::NotFound { .. }) => {}
                        Err(err) => return Err(err),
                    }
                }
            }
            if durable {
                RecordOutcomes::new(nothing, &[], &[], None)?
                    .load::<OutcomeRow>(&mut conn)
                    .await
                    .map_err(|e| db("preparing the outcomes' statement", e))?;
            }
            Self::prepare_merges(&mut conn, durable).await?;
            // Both pools write the checked tables.
            diesel::sql_query(CHECKS_WARM_UP)
                .execute(&mut conn)
                .await
                .map_err(|e| db("compiling the checks' functions", e))?;
            Ok::<_, StoreError>(())
        }))
        .await?;
        Ok(())
    }

    /// Prepares and plans the evidence writes a fill takes on a connection
    /// of this kind: on `durable` ones the merge with its claims, as read and
    /// as hinted (their texts differ), else the merge alone, each
    /// [`PLAN_WARM_ROUNDS`] times, shaped as a first fill's (one trade, two
    /// legs). They run in a transaction always rolled back, against rows that
    /// exist only inside it ([`SCRATCH_ROWS`]): the fill goes in as a real
    /// one does, and the entry's compare-and-set matches nothing (its status
    /// is never ''), so no claim is made. The first fills on the connection
    /// then skip the parse, the catalog lookups and the custom plans (several
    /// ms, then about 1.2 ms a fill for the merge with its claims).
    async fn prepare_merges(conn: &mut AsyncPgConnection, durable: bool) -> Result<(), StoreError> {
        let zero = numeric(Decimal::ZERO);
        let one = numeric(Decimal::ONE);
        let seen = SeenEntry {
            stored_fills: 0,
            executed_qty: zero.clone(),
            cumulative_quote: zero.clone(),
            status: String::new(),
            base_commission: zero.clone(),
            fills_qty: zero.clone(),
            exchange_order_id: None,
            filled_at: None,
            protection: String::new(),
        };
        let doing = "preparing the evidence writes";
        // In a transaction always rolled back: the statements stay prepared,
        // and whatever the tables hold, nothing is kept.
        let mut written = 0;
        let counted = &mut written;
        let result = conn
            .transaction::<(), DieselError, _>(|conn| {
                async move {
                    let scratch: ScratchRow =
                        diesel::sql_query(SCRATCH_ROWS).get_result(conn).await?;
                    let write = |round: usize, hinted| MergeWrite {
                        account: scratch.account_id,
                        symbol: SCRATCH_SYMBOL,
                        entry: scratch.id,
                        trade_ids: vec![i64::try_from(round).unwrap_or(0)],
                        prices: vec![one.clone()],
                        qtys: vec![one.clone()],
                        commissions: vec![zero.clone()],
                        commission_assets: vec!["W".to_owned()],
                        traded_at: vec![PgTimestamp(0)],
                        executed_qty: one.clone(),
                        cumulative_quote: one.clone(),
                        order_id: Some(0),
                        status: "filled",
                        base_commission: zero.clone(),
                        fees: serde_json::json!({}),
                        fills_qty: one.clone(),
                        filled_at: Some(PgTimestamp(0)),
                        protection: "unprotected",
                        protection_reason: None,
                        seen: &seen,
                        hinted,
                    };
                    let legs: Vec<NewLegRow> = (1..=2)
                        .map(|leg| scratch_leg(scratch.id, leg, &one))
                        .collect();
                    for round in 0..PLAN_WARM_ROUNDS {
                        if durable {
                            for hinted in [None, Some(scratch.version)] {
                                let statement = MergeAndClaim {
                                    merge: write(round, hinted),
                                    claims: ClaimLegs::of(&legs),
                                };
                                let rows: Vec<MergedClaimRow> = statement.load(conn).await?;
                                *counted += rows.len();
                            }
                        } else {
                            *counted += write(round, None).load::<EntryRow>(conn).await?.len();
                        }
                    }
                    Err(DieselError::RollbackTransaction)
                }
                .scope_boxed()
            })
            .await;
        match result {
            Err(DieselError::RollbackTransaction) if written == 0 => Ok(()),
            Err(DieselError::RollbackTransaction) => Err(corrupt(format!(
                "{doing}: the scratch entry matched ({written} rows, rolled back)"
            ))),
            Err(e) => Err(db(doing, e)),
            Ok(()) => Ok(()),
        }
    }

    /// The pool of connections that commit without waiting for the WAL flush
    /// (evidence only), for tests and tools that inspect it.
    pub fn evidence_pool(&self) -> &Pool<AsyncPgConnection> {
        &self.evidence_pool
    }

    /// The connection pool, for tests and tools that need plain SQL.
    pub fn pool(&self) -> &Pool<AsyncPgConnection> {
        &self.pool
    }

    /// The pool the account leases are taken, renewed and released on
    /// ([`LEASE_CONNECTIONS`] connections), for tests and tools that inspect it.
    pub fn lease_pool(&self) -> &Pool<AsyncPgConnection> {
        &self.lease_pool
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) async fn conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.pool.get().await.map_err(pool)
    }

    /// A connection of the leases' own pool: never one a fill holds.
    pub(crate) async fn lease_conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        self.lease_pool.get().await.map_err(pool)
    }

    async fn check_secret_key(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let doing = "checking the secret key";
        let fresh = self.cipher.key_check().map_err(|_| {
            StoreError::Unavailable("cannot compute the key check value".to_owned())
        })?;
        // The first process stores its key's check value; every later one compares.
        diesel::insert_into(secret_key_check::table)
            .values((
                secret_key_check::id.eq(1i16),
                secret_key_check::check_blob.eq(&fresh),
            ))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await
            .map_err(|e| db(doing, e))?;
        let stored: Vec<u8> = secret_key_check::table
            .find(1i16)
            .select(secret_key_check::check_blob)
            .first(&mut conn)
            .await
            .map_err(|e| db(doing, e))?;
        if self.cipher.verify_key_check(&stored) {
            Ok(())
        } else {
            Err(StoreError::Corrupt(
                "the configured secret key is not the key this database's API secrets are encrypted under \
                 (key check value mismatch): check the secret key setting"
                    .to_owned(),
            ))
        }
    }

    async fn load_entry(conn: &mut AsyncPgConnection, id: EntryId) -> Result<Entry, StoreError> {
        entries::table
            .find(id.0)
            .select(EntryRow::as_select())
            .first(conn)
            .await
            .optional()
            .map_err(|e| db(&format!("reading entry {id}"), e))?
            .ok_or_else(|| not_found("entry", id))?
            .into_entry()
    }

    /// `account`'s entry stored under idempotency key `key`, if any.
    pub(crate) async fn load_entry_by_key(
        conn: &mut AsyncPgConnection,
        account: AccountId,
        key: &IdempotencyKey,
    ) -> Result<Option<Entry>, StoreError> {
        entries::table
            .filter(entries::account_id.eq(account.0))
            .filter(entries::idempotency_key.eq(key.as_str()))
            .select(EntryRow::as_select())
            .first(conn)
            .await
            .optional()
            .map_err(|e| {
                db(
                    &format!("reading the entry of account {account} under key '{key}'"),
                    e,
                )
            })?
            .map(EntryRow::into_entry)
            .transpose()
    }

    /// `account`'s keys and settings and entry `id`'s legs, their three
    /// statements started on `conn` at once (pipelined): one round trip and
    /// one server process, where three connections would wake three.
    fn start_context<'s>(
        &'s self,
        conn: &mut AsyncPgConnection,
        account: AccountId,
        id: EntryId,
    ) -> impl Future<Output = Result<FillContext, StoreError>> + Send + use<'s> {
        let keys_and_settings = self.start_keys_and_settings(conn, account);
        let legs = Self::start_legs(conn, id);
        async move {
            let (keys_and_settings, legs) =
                futures_util::future::join(keys_and_settings, legs).await;
            let (credentials, account, _) = keys_and_settings?;
            Ok(FillContext {
                credentials,
                account,
                legs: legs?,
            })
        }
    }

    /// `account`'s keys and settings, both statements started on `conn` at
    /// once, with the row's version when both read the same one (`None`:
    /// they straddled a change of the account).
    fn start_keys_and_settings<'s>(
        &'s self,
        conn: &mut AsyncPgConnection,
        account: AccountId,
    ) -> impl Future<Output = Result<(ApiCredentials, Account, Option<i64>), StoreError>> + Send + use<'s>
    {
        let keys = self.start_credentials(conn, account);
        let settings = Self::start_account(conn, account);
        async move {
            let (keys, settings) = futures_util::future::join(keys, settings).await;
            let ((credentials, keys_at), (account, settings_at)) = (keys?, settings?);
            Ok((
                credentials,
                account,
                (keys_at == settings_at).then_some(keys_at),
            ))
        }
    }

    /// Keeps `entry`, accepted with nothing filled and stored as `seen`, and
    /// `account`'s keys and settings when read with it: hints for its first
    /// fill. Only for a caller that follows the entry's account (`owner`, the
    /// gateway on that account's stream, which said so with
    /// [`Store::following`] and has not let it go since): it is the one to
    /// see the fill, and no other process keeps decrypted keys it has no use
    /// for.
    fn learn(
        &self,
        owner: Option<AccountId>,
        entry: &Entry,
        seen: &SeenEntry,
        account: Option<(ApiCredentials, Account, Option<i64>)>,
    ) {
        if !Self::worth_learning(owner, entry) {
            return;
        }
        self.hints
            .entry_learnt(entry, seen, account_hint(entry.account, account));
    }

    /// Whether hints of `entry` serve: the caller follows its account's
    /// stream, and the entry is accepted with its fill still to come.
    fn worth_learning(owner: Option<AccountId>, entry: &Entry) -> bool {
        owner == Some(entry.account) && entry.status == EntryStatus::New
    }

    /// [`PgStore::learn`] for an acceptance that was not this store's write
    /// (the API recorded it from its own response first): the account's
    /// keys and settings, when not known yet, cost a round trip now rather
    /// than at the fill.
    async fn learn_later(
        &self,
        conn: &mut AsyncPgConnection,
        owner: Option<AccountId>,
        entry: &Entry,
        seen: &SeenEntry,
    ) {
        if !Self::worth_learning(owner, entry) {
            return;
        }
        let account =
            if self.hints.knows_account(entry.account) || !self.hints.follows(entry.account) {
                None
            } else {
                // A hint only: a failed read leaves the fill to read them.
                self.start_keys_and_settings(conn, entry.account).await.ok()
            };
        self.learn(owner, entry, seen, account);
    }

    /// Queues entry `id` of `account`, committed, to be announced on
    /// [`crate::ENTRY_CHANNEL`] for the gateway that follows the account
    /// ([`crate::learn_announced_entries`]); the caller (the API, about to
    /// send the order) does not wait for it. Best effort, as any
    /// notification: past [`ANNOUNCE_QUEUE`] waiting, or when the send
    /// fails, the entry is read at its fill. See [`announce`].
    fn announce_entry(&self, account: AccountId, id: EntryId) {
        if self.announcements.try_send((account, id)).is_err() {
            tracing::debug!(entry = %id, "new entry not announced (queue full): read at its fill");
        }
    }

    /// Whether this store's process follows `account`'s stream
    /// ([`Store::following`]).
    pub(crate) fn follows(&self, account: AccountId) -> bool {
        self.hints.follows(account)
    }

    /// Reads entry `id` of `account`, announced as new (see
    /// [`crate::learn_announced_entries`]), ahead of its first fill, and
    /// keeps it as a hint when this store's process follows the account and
    /// nothing of the entry is filled yet; the account's keys and settings
    /// too, when not known. Its first fill is then written and claimed
    /// without a read on its way to the exchange. Whether it was kept.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be read; a hint is then not
    /// kept, and the fill reads what it needs.
    pub async fn learn_announced(
        &self,
        account: AccountId,
        id: EntryId,
    ) -> Result<bool, StoreError> {
        if !self.hints.follows(account) {
            return Ok(false);
        }
        // Only a connection free now: the fills' own reads must never queue
        // behind a read ahead.
        let Ok(mut conn) = self.evidence_pool.timeout_get(&NO_WAIT).await else {
            return Ok(false);
        };
        let snapshot = Self::start_snapshot(&mut conn, id, Some(account), Vec::new());
        let keys = (!self.hints.knows_account(account))
            .then(|| self.start_keys_and_settings(&mut conn, account));
        let (snapshot, keys) = futures_util::future::join(snapshot, async move {
            match keys {
                Some(read) => Some(read.await),
                None => None,
            }
        })
        .await;
        let Some(snapshot) = snapshot? else {
            return Ok(false);
        };
        let account_hint = account_hint(account, keys.transpose()?);
        let entry = &snapshot.entry;
        // A hint is planned as if nothing were stored: only an entry with
        // nothing filled, still to be accepted or resting, serves.
        let unfilled = snapshot.seen.stored_fills == 0
            && entry.executed_qty.is_zero()
            && matches!(entry.status, EntryStatus::PendingNew | EntryStatus::New);
        Ok(unfilled && self.hints.entry_read(entry, &snapshot.seen, account_hint))
    }

    /// Counts of first fills written from what this store already knew of
    /// their entry and account (see [`HintStats`]).
    #[must_use]
    pub fn hint_stats(&self) -> HintStats {
        self.hints.stats()
    }

    /// Entries with nothing filled that this store keeps as hints for their
    /// first fill.
    #[must_use]
    pub fn hinted_entries(&self) -> usize {
        self.hints.entries_known()
    }

    /// Accounts whose keys and settings this store keeps as hints: the
    /// accounts whose streams this process follows (see
    /// [`Store::unfollowed`]).
    #[must_use]
    pub fn hinted_accounts(&self) -> usize {
        self.hints.accounts_known()
    }

    /// `account`'s API key and secret and the row's version, the statement
    /// started on `conn` at once (see [`PgStore::start_snapshot`]).
    fn start_credentials<'s>(
        &'s self,
        conn: &mut AsyncPgConnection,
        account: AccountId,
    ) -> impl Future<Output = Result<(ApiCredentials, i64), StoreError>> + Send + use<'s> {
        let keys = accounts::table
            .find(account.0)
            .select((
                accounts::api_key,
                accounts::secret_ciphertext,
                accounts::version,
            ))
            .first::<(String, Vec<u8>, i64)>(conn)
            .boxed();
        async move {
            let (api_key, blob, version) = keys
                .await
                .optional()
                .map_err(|e| db(&format!("reading the credentials of account {account}"), e))?
                .ok_or_else(|| not_found("account", account))?;
            Ok((self.open_credentials(account, api_key, &blob)?, version))
        }
    }

    /// `account`'s settings and the row's version, the statement started on
    /// `conn` at once.
    fn start_account(
        conn: &mut AsyncPgConnection,
        account: AccountId,
    ) -> impl Future<Output = Result<(Account, i64), StoreError>> + Send + use<> {
        let row = accounts::table
            .find(account.0)
            .select((AccountRow::as_select(), accounts::version))
            .first::<(AccountRow, i64)>(conn)
            .boxed();
        async move {
            let (row, version) = row
                .await
                .optional()
                .map_err(|e| db(&format!("reading account {account}"), e))?
                .ok_or_else(|| not_found("account", account))?;
            Ok((row.into_account()?, version))
        }
    }

    /// Entry `id`'s legs by leg and generation, the statement started on
    /// `conn` at once.
    fn start_legs(
        conn: &mut AsyncPgConnection,
        id: EntryId,
    ) -> impl Future<Output = Result<Vec<Leg>, StoreError>> + Send + use<> {
        let rows = protection_legs::table
            .filter(protection_legs::entry_id.eq(id.0))
            .order((protection_legs::leg, protection_legs::generation))
            .select(LegRow::as_select())
            .load::<LegRow>(conn)
            .boxed();
        async move {
            rows.await
                .map_err(|e| db(&format!("reading the legs of entry {id}"), e))?
                .into_iter()
                .map(LegRow::into_leg)
                .collect()
        }
    }

    /// The API key and the secret decrypted from its stored `blob`.
    fn open_credentials(
        &self,
        account: AccountId,
        api_key: String,
        blob: &[u8],
    ) -> Result<ApiCredentials, StoreError> {
        let secret = self.cipher.open_secret(&api_key, blob).map_err(|_| {
            corrupt(format!(
                "the API secret of account {account} does not decrypt with the configured secret key"
            ))
        })?;
        Ok(ApiCredentials {
            api_key,
            secret: SecretString::from(secret.as_str()),
        })
    }

    /// Merges `evidence` into entry `id` (of `owner`, when given) in two round
    /// trips and no explicit transaction: one read of the entry with its fills,
    /// the merge in Rust, and one statement that stores the new fills and
    /// updates the entry only if it is still as read (compare-and-set). A
    /// writer that got in between makes the update match nothing; the merge
    /// is then done again from a fresh read. `None` when there is no such
    /// entry of `owner`; an unchanged entry costs the read only.
    async fn merge(
        &self,
        id: EntryId,
        owner: Option<AccountId>,
        evidence: &Evidence,
    ) -> Result<Option<Entry>, StoreError> {
        let mut conn = self.evidence_pool.get().await.map_err(pool)?;
        if let Some(first) = Self::start_first_new(&mut conn, id, owner, evidence) {
            // An entry accepted with nothing filled will fill: what its first
            // fill would read first is learnt now, in the same round trip.
            // Keys are decrypted only for an account followed here.
            let account = owner
                .filter(|a| self.hints.follows(*a) && !self.hints.knows_account(*a))
                .map(|a| self.start_keys_and_settings(&mut conn, a));
            let (accepted, account) = futures_util::future::join(first, async move {
                // A hint only: a failed read leaves the fill to read them.
                match account {
                    Some(read) => read.await.ok(),
                    None => None,
                }
            })
            .await;
            if let Some(row) = accepted? {
                // Fills stored beside a row with nothing filled are not
                // expected; if there are any, the first fill's write from
                // this count matches nothing and reads them.
                let seen = SeenEntry::of(&row, 0);
                let entry = row.into_entry()?;
                if owner.is_none() {
                    // Written by the API or sync: a hint of it read ahead in
                    // this process (`ocoguard run`) no longer matches.
                    self.hints.forget(id);
                }
                self.learn(owner, &entry, &seen, account);
                return Ok(Some(entry));
            }
        }
        // Anything else moves the entry past what a hint of it holds (a fill,
        // a cancel): a hint left would only cost its first fill a write that
        // matches nothing.
        self.hints.forget(id);
        for _ in 0..MERGE_ATTEMPTS {
            let Some(snapshot) = Self::snapshot(&mut conn, id, owner, evidence).await? else {
                return Ok(None);
            };
            let merge = snapshot.merge(evidence)?;
            if merge.unchanged {
                self.learn_later(&mut conn, owner, &merge.entry, &snapshot.seen)
                    .await;
                return Ok(Some(merge.entry));
            }
            let updated =
                Self::write_merge(&mut conn, &merge.entry, &snapshot.seen, &merge.new_fills)
                    .await?;
            if let Some(row) = updated {
                let seen = SeenEntry::of(&row, snapshot.stored.len() + merge.new_fills.len());
                let entry = row.into_entry()?;
                self.learn_later(&mut conn, owner, &entry, &seen).await;
                return Ok(Some(entry));
            }
        }
        Err(kept_changing(id))
    }

    /// The entry `id` (of `owner`, when given) and what is stored of its
    /// fills, read in one statement (one snapshot), with any trade of
    /// `evidence` already stored under another entry.
    async fn snapshot(
        conn: &mut AsyncPgConnection,
        id: EntryId,
        owner: Option<AccountId>,
        evidence: &Evidence,
    ) -> Result<Option<Snapshot>, StoreError> {
        Self::start_snapshot(conn, id, owner, trade_ids(evidence)).await
    }

    /// [`PgStore::snapshot`], its statement started on `conn` at once: the
    /// future borrows no connection, so statements started on `conn` before
    /// it is awaited go out together (pipelined) and are answered in order.
    fn start_snapshot(
        conn: &mut AsyncPgConnection,
        id: EntryId,
        owner: Option<AccountId>,
        trade_ids: Vec<i64>,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send + use<> {
        let rows = entries::table
            .left_join(
                fills::table.on(fills::account_id
                    .eq(entries::account_id)
                    .and(fills::symbol.eq(entries::symbol))
                    .and(
                        fills::entry_id
                            .eq(entries::id)
                            .or(fills::trade_id.eq_any(trade_ids)),
                    )),
            )
            .filter(entries::id.eq(id.0))
            .filter(
                entries::account_id
                    .eq(owner.map_or(0, |a| a.0))
                    .or(owner.is_none().into_sql::<Bool>()),
            )
            .select((EntryRow::as_select(), Option::<FillRow>::as_select()))
            .load::<(EntryRow, Option<FillRow>)>(conn)
            .boxed();
        async move {
            let rows = rows
                .await
                .map_err(|e| db(&format!("recording evidence of entry {id}"), e))?;
            Self::snapshot_of(id, rows)
        }
    }

    fn snapshot_of(
        id: EntryId,
        rows: Vec<(EntryRow, Option<FillRow>)>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let mut rows = rows.into_iter();
        let Some((row, first_fill)) = rows.next() else {
            return Ok(None);
        };
        let mut seen = SeenEntry::of(&row, 0);
        let entry = row.into_entry()?;
        let mut stored = BTreeMap::new();
        let mut elsewhere = BTreeSet::new();
        for fill in std::iter::once(first_fill)
            .chain(rows.map(|(_, f)| f))
            .flatten()
        {
            if fill.entry_id == id.0 {
                let fill = fill.into_fill()?;
                stored.insert(fill.trade_id, fill);
            } else {
                elsewhere.insert(fill.trade_id);
            }
        }
        seen.stored_fills = i64::try_from(stored.len()).unwrap_or(i64::MAX);
        Ok(Some(Snapshot {
            entry,
            seen,
            stored,
            elsewhere,
        }))
    }

    /// A merge and its claims in one statement on a durable connection: the
    /// entry as written and, per claim, whether it was won; `None` when the
    /// entry changed since `seen` was read (nothing written).
    async fn write_merge_and_claims(
        &self,
        merged: &Entry,
        seen: &SeenEntry,
        new_fills: &[FillRow],
        claims: &[LegClaim],
        hinted: Option<i64>,
    ) -> Result<Option<(Entry, Vec<bool>)>, StoreError> {
        let mut legs = Vec::with_capacity(claims.len());
        for claim in claims {
            legs.push(new_leg_row(claim)?);
        }
        let mut merge = MergeWrite::new(merged, seen, new_fills)?;
        merge.hinted = hinted;
        let statement = MergeAndClaim {
            merge,
            claims: ClaimLegs::of(&legs),
        };
        let mut conn = self.conn().await?;
        let rows: Vec<MergedClaimRow> = statement.load(&mut conn).await.map_err(|e| {
            db(
                &format!(
                    "recording evidence of entry {} and claiming its legs",
                    merged.id
                ),
                e,
            )
        })?;
        let won = claims
            .iter()
            .map(|c| {
                let (_, leg, generation) = leg_key_columns(c.key);
                rows.iter()
                    .any(|r| r.claimed_leg == Some(leg) && r.claimed_generation == Some(generation))
            })
            .collect();
        match last(rows) {
            Some(row) => Ok(Some((row.entry.into_entry()?, won))),
            None => Ok(None),
        }
    }

    /// The exchange's first word on an order (NEW, nothing filled) only moves
    /// `pending_new` to `new` and names the order: one statement instead of a
    /// merge's two, because on the stream it comes just before the first fill.
    /// `None` when `evidence` is not such a word; else the statement started
    /// on `conn` at once (see [`PgStore::start_snapshot`]), answering the row
    /// as written, or `None` when the row was not in that state.
    fn start_first_new(
        conn: &mut AsyncPgConnection,
        id: EntryId,
        owner: Option<AccountId>,
        evidence: &Evidence,
    ) -> Option<impl Future<Output = Result<Option<EntryRow>, StoreError>> + Send + use<>> {
        let (EntryStatus::New, Some(order_id), true) = (
            evidence.status,
            evidence.order_id,
            evidence.executed_qty.is_zero()
                && evidence.cumulative_quote.is_zero()
                && evidence.fills.is_empty(),
        ) else {
            return None;
        };
        let rows = FirstNew {
            entry: id.0,
            owner: owner.map(|a| a.0),
            order_id,
        }
        .load::<EntryRow>(conn)
        .boxed();
        Some(async move {
            rows.await
                .map(last)
                .map_err(|e| db(&format!("recording evidence of entry {id}"), e))
        })
    }

    /// Stores `new_fills` and sets the evidence columns of `merged`, in one
    /// statement (one commit), if the row still holds what `seen` read and
    /// every new fill was stored as this entry's. `None` when it did not.
    async fn write_merge(
        conn: &mut AsyncPgConnection,
        merged: &Entry,
        seen: &SeenEntry,
        new_fills: &[FillRow],
    ) -> Result<Option<EntryRow>, StoreError> {
        MergeWrite::new(merged, seen, new_fills)?
            .load::<EntryRow>(conn)
            .await
            .map(last)
            .map_err(|e| db(&format!("recording evidence of entry {}", merged.id), e))
    }

    /// An entry's first fill written and claimed from what this store knows
    /// of the entry (as its acceptance left it) and of its account, without
    /// reading either first. `None` when nothing is known, when the plan
    /// claims nothing, or when the write matched nothing because the entry
    /// or the account had changed since: the caller then reads and writes
    /// as without hints.
    async fn fill_from_hints(
        &self,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
        plan: &ClaimPlanner<'_>,
    ) -> Result<Option<RecordedFill>, StoreError> {
        let Some((known, keys)) = self.hints.take(account, id) else {
            return Ok(None);
        };
        // Planned as if nothing were stored: only a hint that says so serves.
        if known.seen.stored_fills != 0 {
            return Ok(None);
        }
        let snapshot = Snapshot {
            entry: known.entry,
            seen: known.seen,
            stored: BTreeMap::new(),
            elsewhere: BTreeSet::new(),
        };
        let merge = snapshot.merge(evidence)?;
        // No legs: the write requires none (and no fill) stored.
        let context = FillContext {
            credentials: keys.credentials,
            account: keys.account,
            legs: Vec::new(),
        };
        let claims = plan(&merge.entry, &context);
        if merge.unchanged || claims.is_empty() {
            return Ok(None);
        }
        let written = self
            .write_merge_and_claims(
                &merge.entry,
                &snapshot.seen,
                &merge.new_fills,
                &claims,
                Some(keys.version),
            )
            .await?;
        let Some((entry, won)) = written else {
            self.hints.stale(account);
            return Ok(None);
        };
        self.hints.used();
        Ok(Some(RecordedFill {
            entry,
            context,
            claims,
            won,
        }))
    }

    /// Whether a compare-and-set on leg `key` wrote it (`n` rows): `false`
    /// when the leg exists but was not as asked, `NotFound` when it does not.
    async fn leg_written(
        conn: &mut AsyncPgConnection,
        key: LegKey,
        n: usize,
    ) -> Result<bool, StoreError> {
        if n == 1 {
            return Ok(true);
        }
        if Self::leg_exists(conn, key).await? {
            Ok(false)
        } else {
            Err(not_found("leg", key))
        }
    }

    async fn leg_exists(conn: &mut AsyncPgConnection, key: LegKey) -> Result<bool, StoreError> {
        let (entry, leg, generation) = leg_key_columns(key);
        diesel::select(diesel::dsl::exists(
            protection_legs::table.find((entry, leg, generation)),
        ))
        .get_result(conn)
        .await
        .map_err(|e| db(&format!("looking leg {key} up"), e))
    }
}

#[async_trait]
impl Store for PgStore {
    #[tracing::instrument(level = "debug", skip_all, fields(api_key = %account.credentials.api_key))]
    async fn create_account(&self, account: NewAccount) -> Result<Account, StoreError> {
        let api_key = account.credentials.api_key.clone();
        let blob = self
            .cipher
            .seal_secret(&api_key, account.credentials.secret.expose_secret())
            .map_err(|_| StoreError::Unavailable("cannot encrypt the API secret".to_owned()))?;
        let mut conn = self.conn().await?;
        let created = diesel::insert_into(accounts::table)
            .values((
                accounts::owner.eq(&account.owner),
                accounts::exchange.eq(&account.exchange),
                accounts::api_key.eq(&api_key),
                accounts::secret_ciphertext.eq(&blob),
                ProtectionColumns::from_config(&account.protection),
            ))
            .returning(AccountRow::as_returning())
            .load(&mut conn)
            .await
            .and_then(only);
        match created {
            Ok(row) => row.into_account(),
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => Err(StoreError::Conflict(format!(
                "api key {api_key} is already registered"
            ))),
            Err(e) => Err(db(
                &format!("registering the account of api key {api_key}"),
                e,
            )),
        }
    }

    async fn account(&self, id: AccountId) -> Result<Account, StoreError> {
        let mut conn = self.conn().await?;
        Self::start_account(&mut conn, id)
            .await
            .map(|(account, _)| account)
    }

    async fn credentials(&self, id: AccountId) -> Result<ApiCredentials, StoreError> {
        let mut conn = self.conn().await?;
        self.start_credentials(&mut conn, id)
            .await
            .map(|(credentials, _)| credentials)
    }

    async fn update_account(
        &self,
        id: AccountId,
        protection: Option<ProtectionConfig>,
        active: Option<bool>,
    ) -> Result<Account, StoreError> {
        let mut conn = self.conn().await?;
        if protection.is_none() && active.is_none() {
            // Nothing to set: an UPDATE with no column is no statement.
            return Self::start_account(&mut conn, id)
                .await
                .map(|(account, _)| account);
        }
        // Only the columns given are set: the others keep what the row
        // holds when the update runs, not what the caller read before.
        diesel::update(accounts::table.find(id.0))
            .set((
                protection.as_ref().map(ProtectionColumns::from_config),
                active.map(|active| accounts::active.eq(active)),
            ))
            .returning(AccountRow::as_returning())
            .load(&mut conn)
            .await
            .map(last)
            .map_err(|e| db(&format!("updating account {id}"), e))?
            .ok_or_else(|| not_found("account", id))?
            .into_account()
    }

    async fn active_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let mut conn = self.conn().await?;
        accounts::table
            .filter(accounts::active.eq(true))
            .order(accounts::id)
            .select(AccountRow::as_select())
            .load(&mut conn)
            .await
            .map_err(|e| db("listing active accounts", e))?
            .into_iter()
            .map(AccountRow::into_account)
            .collect()
    }

    async fn create_entry(
        &self,
        entry: NewEntry,
        client_id_of: &(dyn Fn(EntryId) -> ClientOrderId + Send + Sync),
        at: Millis,
    ) -> Result<Entry, StoreError> {
        let mut conn = self.conn().await?;
        // The id comes first: the client order id is derived from it.
        let id = NextEntryId
            .load::<EntryIdRow>(&mut conn)
            .await
            .and_then(only)
            .map_err(|e| db("allocating an entry id", e))?
            .id;
        let client_id = client_id_of(EntryId(id));
        let (order_type, limit_price) = match entry.kind {
            EntryKind::Market => ("market", None),
            EntryKind::Limit { price } => ("limit", Some(numeric(price.get()))),
        };
        let (requested_qty, requested_quote) = match entry.size {
            OrderSize::Base(q) => (Some(numeric(q.get())), None),
            OrderSize::Quote(q) => (None, Some(numeric(q))),
        };
        let row = NewEntryRow {
            id,
            account_id: entry.account.0,
            symbol: entry.symbol.name.clone(),
            base_asset: entry.symbol.base.0.clone(),
            quote_asset: entry.symbol.quote.0.clone(),
            client_order_id: client_id.as_str().to_owned(),
            order_type,
            limit_price,
            requested_qty,
            requested_quote,
            status: EntryStatus::PendingNew.name(),
            metadata: metadata(&entry.levels, &entry.tags),
            protection: "not_needed",
            created_at: timestamp(at)?,
            idempotency_key: entry
                .idempotency_key
                .as_ref()
                .map(|k| k.as_str().to_owned()),
        };
        // A key released between the insert's conflict and the read that
        // looks for its holder (the holder's send never reached the
        // exchange) leaves the insert free to go: tried again, a few times.
        let mut tries = 0;
        loop {
            let created = InsertEntry { row: &row }
                .load::<EntryRow>(&mut conn)
                .await
                .and_then(only);
            match created {
                Ok(row) => {
                    drop(conn);
                    self.announce_entry(entry.account, EntryId(id));
                    return row.into_entry();
                }
                // Nothing inserted: the key is taken, or the account is
                // disabled or absent. Only a refusal reads again, to say
                // which; the key first, as a used key answers with its entry
                // whatever the account's state.
                Err(DieselError::NotFound) => {
                    if let Some(key) = &entry.idempotency_key
                        && let Some(stored) =
                            Self::load_entry_by_key(&mut conn, entry.account, key).await?
                    {
                        return Err(StoreError::IdempotencyKeyUsed(Box::new(stored)));
                    }
                    let active = accounts::table
                        .find(entry.account.0)
                        .select(accounts::active)
                        .first::<bool>(&mut conn)
                        .await
                        .optional()
                        .map_err(|e| db(&format!("reading account {}", entry.account), e))?;
                    match active {
                        Some(true) if entry.idempotency_key.is_some() && tries < KEY_RETRIES => {
                            tries += 1;
                        }
                        Some(_) => {
                            return Err(StoreError::AccountInactive {
                                account: entry.account,
                            });
                        }
                        None => return Err(not_found("account", entry.account)),
                    }
                }
                Err(e) => return Err(db(&format!("creating entry {id} ({client_id})"), e)),
            }
        }
    }

    async fn release_idempotency_key(&self, id: EntryId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // By the entry's id, never by the key: one another entry took since
        // is that entry's.
        let n = diesel::update(entries::table.find(id.0))
            .set(entries::idempotency_key.eq(None::<String>))
            .execute(&mut conn)
            .await
            .map_err(|e| db(&format!("releasing the idempotency key of entry {id}"), e))?;
        if n == 0 {
            return Err(not_found("entry", id));
        }
        Ok(())
    }

    async fn entry(&self, id: EntryId) -> Result<Entry, StoreError> {
        let mut conn = self.conn().await?;
        Self::load_entry(&mut conn, id).await
    }

    async fn open_entries(&self, account: AccountId) -> Result<Vec<Entry>, StoreError> {
        let mut conn = self.conn().await?;
        let finals: Vec<&str> = EntryStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(EntryStatus::name)
            .collect();
        let rows = entries::table
            .filter(entries::account_id.eq(account.0))
            .filter(
                entries::status
                    .ne_all(finals)
                    .or(entries::protection.ne_all(["closed", "exited", "not_needed"])),
            )
            .order(entries::id)
            .select(EntryRow::as_select())
            .load(&mut conn)
            .await
            .map_err(|e| db(&format!("listing open entries of account {account}"), e))?;
        let mut open = Vec::with_capacity(rows.len());
        for row in rows {
            let entry = row.into_entry()?;
            // The SQL filter is the same rule; the domain's own word is final.
            if is_open(&entry) {
                open.push(entry);
            }
        }
        Ok(open)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(entry = %id))]
    async fn record_evidence(&self, id: EntryId, evidence: &Evidence) -> Result<Entry, StoreError> {
        self.merge(id, None, evidence)
            .await?
            .ok_or_else(|| not_found("entry", id))
    }

    fn following(&self, account: AccountId) {
        self.hints.follow(account);
    }

    fn unfollowed(&self, account: AccountId) {
        self.hints.forget_account(account);
    }

    #[tracing::instrument(level = "debug", skip_all, fields(entry = %id, account = %account))]
    async fn record_evidence_of(
        &self,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
    ) -> Result<Option<Entry>, StoreError> {
        self.merge(id, Some(account), evidence).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(entry = %id, account = %account))]
    async fn record_fill_and_claim(
        &self,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
        plan: &ClaimPlanner<'_>,
    ) -> Result<Option<RecordedFill>, StoreError> {
        // The snapshot and the context are read in one pipelined round trip;
        // the claims ride on the merge's own write, so a first fill waits
        // for one commit. No connection is held across another's wait: a
        // fill waiting for its durable write must not keep an evidence
        // connection from others.
        if let Some(recorded) = self.fill_from_hints(account, id, evidence, plan).await? {
            return Ok(Some(recorded));
        }
        let evidence_conn = || async { self.evidence_pool.get().await.map_err(pool) };
        for _ in 0..MERGE_ATTEMPTS {
            let (snapshot, context) = {
                let mut conn = evidence_conn().await?;
                let read = Self::start_snapshot(&mut conn, id, Some(account), trade_ids(evidence));
                let context = self.start_context(&mut conn, account, id);
                futures_util::future::join(read, context).await
            };
            let Some(snapshot) = snapshot? else {
                return Ok(None);
            };
            let merge = snapshot.merge(evidence)?;
            let context = match context {
                Ok(context) => context,
                // The evidence is a fact whatever failed beside it: keep it
                // (as the port's default does), then report the failure.
                Err(err) => {
                    if !merge.unchanged {
                        let mut conn = evidence_conn().await?;
                        Self::write_merge(
                            &mut conn,
                            &merge.entry,
                            &snapshot.seen,
                            &merge.new_fills,
                        )
                        .await?;
                    }
                    return Err(err);
                }
            };
            let claims = plan(&merge.entry, &context);
            let written = if merge.unchanged {
                let won = self.claim_legs(&claims).await?;
                Some((merge.entry, won))
            } else if claims.is_empty() {
                let mut conn = evidence_conn().await?;
                Self::write_merge(&mut conn, &merge.entry, &snapshot.seen, &merge.new_fills)
                    .await?
                    .map(|row| row.into_entry().map(|e| (e, Vec::new())))
                    .transpose()?
            } else {
                self.write_merge_and_claims(
                    &merge.entry,
                    &snapshot.seen,
                    &merge.new_fills,
                    &claims,
                    None,
                )
                .await?
            };
            if let Some((entry, won)) = written {
                return Ok(Some(RecordedFill {
                    entry,
                    context,
                    claims,
                    won,
                }));
            }
        }
        Err(kept_changing(id))
    }

    async fn set_protection(&self, id: EntryId, protection: &Protection) -> Result<(), StoreError> {
        let columns = EntryProtectionColumns::from_protection(protection)?;
        // An exit's result stands only while the entry is exited.
        let kept = matches!(protection, Protection::Exited { .. });
        let mut conn = self.conn().await?;
        // A closed entry stays closed: the caller's copy may predate the close.
        let open = entries::table
            .find(id.0)
            .filter(entries::protection.ne("closed"));
        let written = if kept {
            diesel::update(open).set(columns).execute(&mut conn).await
        } else {
            diesel::update(open)
                .set((columns, entries::realized_quote.eq(None::<PgNumeric>)))
                .execute(&mut conn)
                .await
        };
        let n = written.map_err(|e| db(&format!("setting the protection of entry {id}"), e))?;
        if n == 0 {
            // Closed (nothing to write), or not there at all.
            let found = entries::table
                .find(id.0)
                .select(entries::id)
                .first::<i64>(&mut conn)
                .await
                .optional()
                .map_err(|e| db(&format!("reading entry {id}"), e))?;
            if found.is_none() {
                return Err(not_found("entry", id));
            }
        }
        Ok(())
    }

    async fn close_entry(
        &self,
        id: EntryId,
        realized: Realized,
        at: Millis,
    ) -> Result<(), StoreError> {
        let closed_at = timestamp(at)?;
        let mut conn = self.conn().await?;
        let n = diesel::update(entries::table.find(id.0))
            .set((
                EntryProtectionColumns::from_protection(&Protection::Closed)?,
                entries::realized_quote.eq(Some(numeric(realized.quote))),
                entries::fees_complete.eq(realized.fees_complete),
                // Closed again (a sale recorded late): the result changes, the
                // time it closed does not.
                entries::closed_at.eq(coalesce_time(entries::closed_at, Some(closed_at))),
            ))
            .execute(&mut conn)
            .await
            .map_err(|e| db(&format!("closing entry {id}"), e))?;
        if n == 0 {
            return Err(not_found("entry", id));
        }
        Ok(())
    }

    async fn exit_entry(
        &self,
        id: EntryId,
        reason: &str,
        realized: Realized,
        read: &Entry,
    ) -> Result<bool, StoreError> {
        let columns = EntryProtectionColumns::from_protection(&Protection::Exited {
            reason: reason.to_owned(),
        })?;
        let was = EntryProtectionColumns::from_protection(&read.protection)?;
        let was_reason = was.protection_reason.flatten();
        let mut conn = self.conn().await?;
        // A compare-and-set on the entry as read: the same executed quantity
        // and protection (a fill recorded since reopened it), and, as
        // `set_protection`, never over a close.
        let n = diesel::update(
            entries::table
                .find(id.0)
                .filter(entries::protection.ne("closed"))
                .filter(entries::protection.eq(was.protection))
                .filter(entries::protection_reason.is_not_distinct_from(was_reason))
                .filter(entries::executed_qty.eq(numeric(read.executed_qty.get()))),
        )
        .set((
            columns,
            entries::realized_quote.eq(Some(numeric(realized.quote))),
            entries::fees_complete.eq(realized.fees_complete),
        ))
        .execute(&mut conn)
        .await
        .map_err(|e| db(&format!("recording the exit of entry {id}"), e))?;
        if n == 0 {
            let found = entries::table
                .find(id.0)
                .select(entries::id)
                .first::<i64>(&mut conn)
                .await
                .optional()
                .map_err(|e| db(&format!("reading entry {id}"), e))?;
            if found.is_none() {
                return Err(not_found("entry", id));
            }
        }
        Ok(n > 0)
    }

    async fn fill_context(
        &self,
        account: AccountId,
        id: EntryId,
    ) -> Result<FillContext, StoreError> {
        let mut conn = self.conn().await?;
        self.start_context(&mut conn, account, id).await
    }

    async fn legs(&self, entry: EntryId) -> Result<Vec<Leg>, StoreError> {
        let mut conn = self.conn().await?;
        Self::start_legs(&mut conn, entry).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(leg = %claim.key, source = %claim.source))]
    async fn claim_leg(&self, claim: &LegClaim) -> Result<bool, StoreError> {
        let row = new_leg_row(claim)?;
        let mut conn = self.conn().await?;
        // Either unique key (entry + leg + generation, or the list client id)
        // makes a later claimer insert nothing: exactly one wins.
        let inserted = diesel::insert_into(protection_legs::table)
            .values(&row)
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await;
        match inserted {
            Ok(n) => Ok(n == 1),
            Err(e) if is_foreign_key(&e) => Err(not_found("entry", claim.key.entry)),
            Err(e) => Err(db(&format!("claiming leg {}", claim.key), e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(leg = %update.key, from = update.from, to = update.to.name()))]
    async fn update_leg(&self, update: &LegUpdate) -> Result<bool, StoreError> {
        let (entry_id, leg, generation) = leg_key_columns(update.key);
        let columns =
            LegUpdateColumns::new(&update.to, update.error.clone(), timestamp(update.at)?);
        let mut conn = self.conn().await?;
        // Compare-and-set on the state's name.
        let n = diesel::update(
            protection_legs::table
                .find((entry_id, leg, generation))
                .filter(protection_legs::state.eq(update.from)),
        )
        .set(columns)
        .execute(&mut conn)
        .await
        .map_err(|e| {
            db(
                &format!("updating leg {} to {}", update.key, update.to.name()),
                e,
            )
        })?;
        Self::leg_written(&mut conn, update.key, n).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(leg = %update.key, from = update.from, to = update.to.name()))]
    async fn take_over_leg(
        &self,
        update: &LegUpdate,
        stale_after: Duration,
    ) -> Result<bool, StoreError> {
        let (entry_id, leg, generation) = leg_key_columns(update.key);
        let columns =
            LegUpdateColumns::new(&update.to, update.error.clone(), timestamp(update.at)?);
        // Judged on the taker's clock, as every leg time in this table is
        // written on the writer's clock (claims are stamped in the statements
        // of a fill's hot path): comparing them with the database's `now()`
        // would trade the skew between two processes for the skew between a
        // process and the database, not remove it.
        let stale_before =
            timestamp(Millis(update.at.0.saturating_sub(
                i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX),
            )))?;
        let mut conn = self.conn().await?;
        // Compare-and-set on the state and on the last write's time, in one
        // statement: a fence written since the taker read the leg makes it
        // match nothing.
        let n = diesel::update(
            protection_legs::table
                .find((entry_id, leg, generation))
                .filter(protection_legs::state.eq(update.from))
                .filter(protection_legs::updated_at.lt(stale_before)),
        )
        .set(columns)
        .execute(&mut conn)
        .await
        .map_err(|e| {
            db(
                &format!("taking leg {} over to {}", update.key, update.to.name()),
                e,
            )
        })?;
        Self::leg_written(&mut conn, update.key, n).await
    }

    async fn record_leg_sold(
        &self,
        key: LegKey,
        sold: LegSold,
        at: Millis,
    ) -> Result<(), StoreError> {
        let (entry_id, leg, generation) = leg_key_columns(key);
        let at = timestamp(at)?;
        let mut conn = self.conn().await?;
        use protection_legs::dsl as l;
        let n = diesel::update(l::protection_legs.find((entry_id, leg, generation)))
            .set((
                l::sold_take_profit.eq(greatest(
                    l::sold_take_profit,
                    numeric(sold.take_profit.get()),
                )),
                l::sold_take_profit_quote.eq(greatest(
                    l::sold_take_profit_quote,
                    numeric(sold.take_profit_quote),
                )),
                l::sold_stop_loss.eq(greatest(l::sold_stop_loss, numeric(sold.stop_loss.get()))),
                l::sold_stop_loss_quote.eq(greatest(
                    l::sold_stop_loss_quote,
                    numeric(sold.stop_loss_quote),
                )),
                l::updated_at.eq(at),
            ))
            .execute(&mut conn)
            .await
            .map_err(|e| db(&format!("recording what leg {key} sold"), e))?;
        if n == 0 {
            return Err(not_found("leg", key));
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(leg = %key, side = side.name(), trades = trades.len()))]
    async fn record_leg_trades(
        &self,
        key: LegKey,
        side: SaleSide,
        trades: &[oco_core::model::Fill],
    ) -> Result<(), StoreError> {
        let (entry_id, leg, generation) = leg_key_columns(key);
        let mut conn = self.conn().await?;
        // One transaction under the leg's row lock: recorders of one leg take
        // turns, and each sums what the ones before it committed. The lock is
        // the leg's alone (never the entry's), taken first.
        let result = conn
            .transaction::<(), DieselError, _>(|conn| {
                async move {
                    let locked: Vec<LockedLeg> = diesel::sql_query(LOCK_LEG)
                        .bind::<BigInt, _>(entry_id)
                        .bind::<diesel::sql_types::SmallInt, _>(leg)
                        .bind::<diesel::sql_types::Integer, _>(generation)
                        .load(conn)
                        .await?;
                    let Some(locked) = last(locked) else {
                        return Err(DieselError::NotFound);
                    };
                    let rows = trades
                        .iter()
                        .map(|t| {
                            LegTradeRow::new(
                                AccountId(locked.account_id),
                                &locked.symbol,
                                key,
                                side,
                                t,
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| DieselError::SerializationError(Box::new(e)))?;
                    if rows.is_empty() {
                        return Ok(());
                    }
                    // A trade stored before, for this leg or by another
                    // report of it, is not stored again.
                    let added = diesel::insert_into(leg_trades::table)
                        .values(&rows)
                        .on_conflict_do_nothing()
                        .execute(conn)
                        .await?;
                    if added > 0 {
                        diesel::sql_query(SUM_LEG_TRADES)
                            .bind::<BigInt, _>(entry_id)
                            .bind::<diesel::sql_types::SmallInt, _>(leg)
                            .bind::<diesel::sql_types::Integer, _>(generation)
                            .execute(conn)
                            .await?;
                    }
                    Ok(())
                }
                .scope_boxed()
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(DieselError::NotFound) => Err(not_found("leg", key)),
            Err(e) => Err(db(&format!("recording trades of leg {key}"), e)),
        }
    }

    async fn append_event(&self, event: &EntryEventRecord) -> Result<(), StoreError> {
        let at = timestamp(event.at)?;
        let mut conn = self.conn().await?;
        let inserted = diesel::insert_into(entry_events::table)
            .values((
                entry_events::entry_id.eq(event.entry.0),
                entry_events::kind.eq(&event.kind),
                entry_events::detail.eq(&event.detail),
                entry_events::source.eq(event.source.map(|s| s.name())),
                entry_events::at.eq(at),
            ))
            .execute(&mut conn)
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key(&e) => Err(not_found("entry", event.entry)),
            Err(e) => Err(db(
                &format!("appending an event to entry {}", event.entry),
                e,
            )),
        }
    }

    async fn events(&self, entry: EntryId) -> Result<Vec<EntryEventRecord>, StoreError> {
        let mut conn = self.conn().await?;
        entry_events::table
            .filter(entry_events::entry_id.eq(entry.0))
            .order(entry_events::id)
            .select(EventRow::as_select())
            .load(&mut conn)
            .await
            .map_err(|e| db(&format!("reading the history of entry {entry}"), e))?
            .into_iter()
            .map(EventRow::into_event)
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = %account, reason = reason))]
    async fn flag_reconcile(
        &self,
        account: AccountId,
        reason: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.flag_reconcile_many(&[(account, reason.to_owned())], at)
            .await
    }

    async fn flag_reconcile_many(
        &self,
        flags: &[(AccountId, String)],
        at: Millis,
    ) -> Result<(), StoreError> {
        // One row per account (an upsert may not touch a row twice), the last
        // reason given for it kept.
        let mut latest: BTreeMap<i64, &str> = BTreeMap::new();
        for (account, reason) in flags {
            latest.insert(account.0, reason);
        }
        if latest.is_empty() {
            return Ok(());
        }
        let at = timestamp(at)?;
        let (accounts, reasons): (Vec<i64>, Vec<&str>) = latest.into_iter().unzip();
        let mut conn = self.conn().await?;
        // Flag and announce in one statement; NOTIFY is delivered at commit.
        let flagged = diesel::sql_query(
            "WITH f AS (INSERT INTO reconcile_flags (account_id, reason, flagged_at) \
             SELECT t.account_id, t.reason, $3 FROM unnest($1, $2) AS t (account_id, reason) \
             ON CONFLICT (account_id) DO UPDATE SET reason = EXCLUDED.reason RETURNING account_id) \
             SELECT pg_notify('oco_reconcile', account_id::text) FROM f",
        )
        .bind::<diesel::sql_types::Array<BigInt>, _>(&accounts)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&reasons)
        .bind::<diesel::sql_types::Timestamptz, _>(at)
        .execute(&mut conn)
        .await;
        match flagged {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key(&e) => Err(match accounts.as_slice() {
                [one] => not_found("account", AccountId(*one)),
                many => not_found("account", format!("one of {many:?}")),
            }),
            Err(e) => Err(db(
                &format!("flagging {} accounts for reconciliation", accounts.len()),
                e,
            )),
        }
    }

    async fn take_flagged(&self, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut conn = self.conn().await?;
        // Rows another taker holds are skipped, never waited for or shared.
        let mut taken: Vec<i64> = diesel::sql_query(
            "DELETE FROM reconcile_flags WHERE account_id IN ( \
                 SELECT account_id FROM reconcile_flags ORDER BY flagged_at, account_id \
                 LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING account_id",
        )
        .bind::<BigInt, _>(limit)
        .load::<AccountIdRow>(&mut conn)
        .await
        .map_err(|e| db("taking flagged accounts", e))?
        .into_iter()
        .map(|r| r.account_id)
        .collect();
        taken.sort_unstable();
        Ok(taken.into_iter().map(AccountId).collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(holder = holder, limit = limit))]
    async fn take_due_accounts(
        &self,
        holder: &str,
        interval: Duration,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<AccountId>, StoreError> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let mut conn = self.conn().await?;
        // Rows another taker holds are skipped; a row taken and committed since
        // this statement's snapshot is re-checked against the condition when
        // locked (READ COMMITTED), so it is not taken twice.
        let mut taken: Vec<i64> = diesel::sql_query(
            "UPDATE reconcile_schedule s \
                 SET taken_by = $1, taken_until = now() + $3 * interval '1 millisecond' \
             WHERE s.account_id IN ( \
                 SELECT d.account_id FROM reconcile_schedule d \
                 JOIN accounts a ON a.id = d.account_id \
                 WHERE a.active \
                   AND (d.retry_at <= now() \
                        OR d.retry_at IS NULL \
                           AND (d.last_reconciled_at IS NULL \
                                OR d.last_reconciled_at <= now() - $2 * interval '1 millisecond')) \
                   AND (d.taken_until IS NULL OR d.taken_until <= now()) \
                 ORDER BY d.last_reconciled_at NULLS FIRST, d.account_id \
                 LIMIT $4 \
                 FOR UPDATE OF d SKIP LOCKED) \
             RETURNING s.account_id",
        )
        .bind::<diesel::sql_types::Text, _>(holder)
        .bind::<BigInt, _>(ms(interval))
        .bind::<BigInt, _>(ms(lease))
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .load::<AccountIdRow>(&mut conn)
        .await
        .map_err(|e| {
            db(
                &format!("taking accounts due for reconciliation for {holder}"),
                e,
            )
        })?
        .into_iter()
        .map(|r| r.account_id)
        .collect();
        taken.sort_unstable();
        Ok(taken.into_iter().map(AccountId).collect())
    }

    async fn mark_reconciled(
        &self,
        account: AccountId,
        since: std::time::Instant,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // The pass's start on the database clock: now() less the time since it
        // began, measured once the connection is at hand (not before waiting
        // for the pool). Only the statement's way to the server is left over,
        // by which the start reads late: a retry written in that window (well
        // under a millisecond on a local network) is taken as older.
        let began_us = i64::try_from(since.elapsed().as_micros()).unwrap_or(i64::MAX);
        // An upsert: the row exists from account creation on, but a missing one
        // must not lose the fact. A retry written since the pass began stays.
        let marked = diesel::sql_query(
            "INSERT INTO reconcile_schedule (account_id, last_reconciled_at) VALUES ($1, now()) \
             ON CONFLICT (account_id) DO UPDATE \
                 SET last_reconciled_at = now(), taken_by = NULL, taken_until = NULL, \
                     retry_at = CASE WHEN reconcile_schedule.retry_written_at \
                                          >= now() - $2 * interval '1 microsecond' \
                                     THEN reconcile_schedule.retry_at END, \
                     retry_written_at = CASE WHEN reconcile_schedule.retry_written_at \
                                          >= now() - $2 * interval '1 microsecond' \
                                     THEN reconcile_schedule.retry_written_at END",
        )
        .bind::<BigInt, _>(account.0)
        .bind::<BigInt, _>(began_us)
        .execute(&mut conn)
        .await;
        match marked {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key(&e) => Err(not_found("account", account)),
            Err(e) => Err(db(
                &format!("recording the reconciliation of account {account}"),
                e,
            )),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = %account, after_ms = after.as_millis()))]
    async fn defer_reconcile(&self, account: AccountId, after: Duration) -> Result<(), StoreError> {
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let mut conn = self.conn().await?;
        // An upsert, as `mark_reconciled`; the take ends, so that the retry,
        // not the lease, says when the account is due.
        let deferred = diesel::sql_query(
            "INSERT INTO reconcile_schedule (account_id, retry_at, retry_written_at) \
             VALUES ($1, now() + $2 * interval '1 millisecond', now()) \
             ON CONFLICT (account_id) DO UPDATE \
                 SET retry_at = EXCLUDED.retry_at, retry_written_at = EXCLUDED.retry_written_at, \
                     taken_by = NULL, taken_until = NULL",
        )
        .bind::<BigInt, _>(account.0)
        .bind::<BigInt, _>(after)
        .execute(&mut conn)
        .await;
        match deferred {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key(&e) => Err(not_found("account", account)),
            Err(e) => Err(db(&format!("scheduling the retry of account {account}"), e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(holder = holder, limit = limit))]
    async fn take_due_retries(
        &self,
        holder: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<AccountId>, StoreError> {
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let mut conn = self.conn().await?;
        // As `take_due_accounts`: rows another taker holds are skipped, and a
        // row taken since the statement's snapshot is re-checked when locked.
        let mut taken: Vec<i64> = diesel::sql_query(
            "UPDATE reconcile_schedule s \
                 SET taken_by = $1, taken_until = now() + $2 * interval '1 millisecond' \
             WHERE s.account_id IN ( \
                 SELECT d.account_id FROM reconcile_schedule d \
                 JOIN accounts a ON a.id = d.account_id \
                 WHERE d.retry_at <= now() AND a.active \
                   AND (d.taken_until IS NULL OR d.taken_until <= now()) \
                 ORDER BY d.retry_at, d.account_id \
                 LIMIT $3 \
                 FOR UPDATE OF d SKIP LOCKED) \
             RETURNING s.account_id",
        )
        .bind::<diesel::sql_types::Text, _>(holder)
        .bind::<BigInt, _>(lease)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .load::<AccountIdRow>(&mut conn)
        .await
        .map_err(|e| db(&format!("taking accounts due for a retry for {holder}"), e))?
        .into_iter()
        .map(|r| r.account_id)
        .collect();
        taken.sort_unstable();
        Ok(taken.into_iter().map(AccountId).collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(legs = claims.len()))]
    async fn claim_legs(&self, claims: &[LegClaim]) -> Result<Vec<bool>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = Vec::with_capacity(claims.len());
        for claim in claims {
            rows.push(new_leg_row(claim)?);
        }
        let mut conn = self.conn().await?;
        // One statement, one commit; each row is still claimed by exactly one
        // inserter (either unique key makes a later one insert nothing).
        let inserted: Result<Vec<ClaimedKey>, _> = ClaimLegs::of(&rows).load(&mut conn).await;
        match inserted {
            Ok(won) => Ok(claims
                .iter()
                .map(|c| {
                    let (entry, leg, generation) = leg_key_columns(c.key);
                    won.iter()
                        .any(|w| (w.entry_id, w.leg, w.generation) == (entry, leg, generation))
                })
                .collect()),
            Err(e) if is_foreign_key(&e) => Err(not_found("entry", claims[0].key.entry)),
            Err(e) => Err(db(&format!("claiming {} legs", claims.len()), e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(entry = %entry, legs = updates.len()))]
    async fn record_outcomes(
        &self,
        entry: EntryId,
        updates: &[LegUpdate],
        events: &[EntryEventRecord],
        protection: Option<&Protection>,
    ) -> Result<RecordedOutcomes, StoreError> {
        let protection = protection
            .map(EntryProtectionColumns::from_protection)
            .transpose()?;
        let keys: Vec<LegKey> = updates.iter().map(|u| u.key).collect();
        let mut conn = self.conn().await?;
        let doing = format!("recording the outcomes of entry {entry}");
        // One statement, one commit: the legs' compare-and-sets, the history
        // and the protection, all or nothing.
        let statement = RecordOutcomes::new(entry, updates, events, protection)?;
        let set_protection = statement.set_protection;
        // The entry's read is pipelined behind the write on the same
        // connection: it runs after the write committed, in the same round trip.
        let written = statement.load::<OutcomeRow>(&mut conn).boxed();
        let after = entries::table
            .find(entry.0)
            .select(EntryRow::as_select())
            .first::<EntryRow>(&mut conn)
            .boxed();
        let (rows, after) = futures_util::future::join(written, after).await;
        let rows = rows.map_err(|e| match e {
            e if is_foreign_key(&e) => not_found("entry", entry),
            e => db(&doing, e),
        })?;
        let mut applied = Vec::with_capacity(keys.len());
        for row in &rows {
            let Some(n) = row.n else { continue };
            let key = usize::try_from(n - 1)
                .ok()
                .and_then(|i| keys.get(i))
                .ok_or_else(|| corrupt(format!("{doing}: an outcome row for no update")))?;
            if row.found == Some(false) {
                return Err(not_found("leg", key));
            }
            applied.push(row.applied);
        }
        if set_protection && rows.as_slice().first().is_none_or(|r| r.entries_set == 0) {
            return Err(not_found("entry", entry));
        }
        let entry = after
            .optional()
            .map_err(|e| db(&format!("reading entry {entry} after its outcomes"), e))?
            .ok_or_else(|| not_found("entry", entry))?
            .into_entry()?;
        Ok(RecordedOutcomes { applied, entry })
    }
}

/// The trades `evidence` reports, by id.
fn trade_ids(evidence: &Evidence) -> Vec<i64> {
    evidence.fills.iter().map(|f| f.trade_id).collect()
}

/// The row a claim inserts.
fn new_leg_row(claim: &LegClaim) -> Result<NewLegRow, StoreError> {
    let (entry_id, leg, generation) = leg_key_columns(claim.key);
    let at = timestamp(claim.at)?;
    Ok(NewLegRow {
        entry_id,
        leg,
        generation,
        list_client_id: claim.ids.list.as_str().to_owned(),
        take_profit_client_id: claim.ids.take_profit.as_str().to_owned(),
        stop_loss_client_id: claim.ids.stop_loss.as_str().to_owned(),
        symbol: claim.symbol.clone(),
        qty: numeric(claim.qty.get()),
        take_profit_price: numeric(claim.take_profit.get()),
        stop_price: numeric(claim.stop.get()),
        stop_limit_price: claim.stop_limit.map(|p| numeric(p.get())),
        state: "claimed",
        source: claim.source.name(),
        attempts: 1,
        claimed_at: at,
        updated_at: at,
    })
}

/// How a pooled connection reaches the server: `url` with a connect timeout,
/// TCP keepalives and a TCP user timeout. Without them a server gone without
/// closing the connection (a host lost, a partition, NAT state dropped)
/// leaves every statement on it waiting for TCP to give up, 15 minutes to
/// hours, while fills wait behind it; with them the statement fails in about
/// 25 s and the caller retries, flags or reconciles.
pub(crate) fn pooled_connection_config(url: &str) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("the database URL is not a PostgreSQL URL: {e}"))?;
    config
        .connect_timeout(POOL_CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(25));
    Ok(config)
}

/// How long opening a pooled connection may take at the TCP level.
const POOL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of `size` connections to `url`; each new connection is opened as
/// [`pooled_connection_config`] says and runs `session` (session settings)
/// first, when given.
fn build_pool(
    url: &str,
    size: usize,
    session: Option<&'static str>,
) -> Result<Pool<AsyncPgConnection>, StoreError> {
    let mut manager_config = ManagerConfig::default();
    // A closed connection is seen without a round trip (tokio-postgres
    // marks it closed when the server goes away); anything else fails its
    // statement, which the caller retries.
    manager_config.recycling_method = RecyclingMethod::Fast;
    manager_config.custom_setup = Box::new(move |url| {
        let url = url.to_owned();
        async move {
            let config = pooled_connection_config(&url)
                .map_err(diesel::ConnectionError::InvalidConnectionUrl)?;
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
            let mut conn =
                AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
            if let Some(settings) = session {
                conn.batch_execute(settings)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            }
            Ok(conn)
        }
        .boxed()
    });
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, manager_config);
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Unavailable(format!("building the postgres pool: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_connections_give_up_on_a_server_that_went_silent() {
        let config = pooled_connection_config("postgres://u@127.0.0.1:5432/test").unwrap();
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(25))
        );
        assert_eq!(config.get_connect_timeout(), Some(&POOL_CONNECT_TIMEOUT));
    }

    #[test]
    fn a_url_that_is_not_postgres_is_named() {
        let err = pooled_connection_config("http://[::1").unwrap_err();
        assert!(err.contains("not a PostgreSQL URL"), "{err}");
    }
}
