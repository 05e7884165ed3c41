//! The reconciler: one pass per account, full passes over every active
//! account, and the loop that runs them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{self, FuturesUnordered, StreamExt};
use oco_core::ids::OrderRole;
use oco_core::model::Protection;
use oco_core::ports::{ApiCredentials, Balance, OrderListSnapshot, event};
use oco_core::protect::{Idle, Protector};
use oco_core::state::ExternalEnd;
use oco_core::{
    AccountId, Clock, Entry, EntryId, EntryStatus, Evidence, Exchange, ExchangeError, Fill, Leg,
    LegKey, LegState, ProtectOutcome, ProtectorConfig, Qty, Source, Store, StoreError,
};
use rust_decimal::Decimal;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::breaker::{Admission, Breakers, OpenReason, Tripped};
use crate::budget::{MeteredExchange, OrderMeter, WeightMeter, urgent};
use crate::config::SyncConfig;
use crate::error::SyncError;
use crate::metrics::{Metrics, MetricsSnapshot, outcome_name};

/// Rate-limited reads are retried this many times (each after the node's pause).
const READ_RETRIES: u32 = 3;

/// Orders one `protect` call may send at most: two OCO lists of two orders.
const ORDERS_PER_PROTECT: u32 = 4;

/// What one account's pass found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountReport {
    /// The account.
    pub account: AccountId,
    /// Disabled accounts are left alone.
    pub inactive: bool,
    /// Open entries examined.
    pub entries: usize,
    /// Entry orders looked up (`GET order`).
    pub orders_queried: usize,
    /// Trade lists fetched (`GET myTrades`).
    pub trades_fetched: usize,
    /// Legs the store still had as claimed or unknown while their list was
    /// open on the exchange (a crash after the send): adopted, not placed again.
    pub legs_adopted: Vec<LegKey>,
    /// Lists that ended while nobody listened, with the state recorded.
    pub lists_ended: Vec<(LegKey, LegState)>,
    /// Legs whose list was not open (or open without its stop) and whose
    /// lookup did not show its end: it failed, or read a database lagging
    /// the end. They still count as working; the account is retried after
    /// a backoff.
    pub lists_unread: Vec<LegKey>,
    /// Entries the exchange never received, recorded as rejected.
    pub never_sent: Vec<EntryId>,
    /// Entries the exchange does not know yet, still within the grace period.
    pub awaiting_send: Vec<EntryId>,
    /// `protect` calls and their outcomes.
    pub protections: Vec<(EntryId, ProtectOutcome)>,
    /// Entries that could not be reconciled this time, and why.
    pub entry_errors: Vec<(EntryId, SyncError)>,
    /// Open lists carrying one of our list ids that match no leg of an open
    /// entry (a restored database, another namespace's twin): reported only.
    pub unknown_lists: Vec<String>,
    /// Open lists carrying the list id of a leg of an open entry that the
    /// store holds in a state that is not live (see [`StrayList`]): reported
    /// only, sorted by list id.
    pub stray_lists: Vec<StrayList>,
}

/// A stray list: open on the exchange under the list id of a leg the store
/// holds in a state that is not live (not claimed, placed or unknown), e.g.
/// `not_placed` after a list sent under a claim that was taken over failed to
/// be withdrawn. Sync reports it and leaves it alone: canceling it could free
/// coins another entry of the symbol needs, and whether it is extra is for
/// the owner to decide after checking the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrayList {
    /// The entry of its leg.
    pub entry: EntryId,
    /// Its leg.
    pub leg: LegKey,
    /// Its `listClientOrderId`.
    pub client_id: String,
    /// Its leg's state in the store, as read in the pass.
    pub state: LegState,
}

impl AccountReport {
    fn new(account: AccountId) -> Self {
        Self {
            account,
            inactive: false,
            entries: 0,
            orders_queried: 0,
            trades_fetched: 0,
            legs_adopted: Vec::new(),
            lists_ended: Vec::new(),
            lists_unread: Vec::new(),
            never_sent: Vec::new(),
            awaiting_send: Vec::new(),
            protections: Vec::new(),
            entry_errors: Vec::new(),
            unknown_lists: Vec::new(),
            stray_lists: Vec::new(),
        }
    }

    /// The outcome of the `protect` call for `entry`, if one was made.
    pub fn outcome(&self, entry: EntryId) -> Option<&ProtectOutcome> {
        self.protections
            .iter()
            .find(|(e, _)| *e == entry)
            .map(|(_, o)| o)
    }
}

/// What a full pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Active accounts at the start of the pass.
    pub accounts: usize,
    /// Accounts reconciled.
    pub reconciled: Vec<AccountReport>,
    /// Accounts skipped by an open breaker, with the reason.
    pub skipped: Vec<(AccountId, String)>,
    /// Accounts that failed.
    pub failed: Vec<(AccountId, SyncError)>,
    /// Accounts another task of this process was reconciling.
    pub busy: Vec<AccountId>,
    /// Weight charged to the node's meter during the pass.
    pub weight_used: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl PassReport {
    fn new(accounts: usize) -> Self {
        Self {
            accounts,
            reconciled: Vec::new(),
            skipped: Vec::new(),
            failed: Vec::new(),
            busy: Vec::new(),
            weight_used: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn add(&mut self, results: Vec<(AccountId, Result<AccountReport, SyncError>)>) {
        for (id, result) in results {
            match result {
                Ok(r) => self.reconciled.push(r),
                Err(SyncError::BreakerOpen { reason, .. }) => self.skipped.push((id, reason)),
                Err(SyncError::InProgress { .. }) => self.busy.push(id),
                Err(err) => self.failed.push((id, err)),
            }
        }
    }

    /// `protect` outcomes of the pass by label (`placed`, `covered`, …).
    pub fn outcomes(&self) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for r in &self.reconciled {
            for (_, o) in &r.protections {
                *counts.entry(outcome_name(o)).or_default() += 1;
            }
        }
        counts
    }
}

/// Layer 2: reconciles accounts against the exchange and protects whatever
/// the real-time layer missed. See the crate documentation.
pub struct Reconciler {
    exchange: Arc<dyn Exchange>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    protector: Arc<Protector>,
    config: SyncConfig,
    meter: Arc<WeightMeter>,
    orders: OrderMeter,
    breakers: Breakers,
    metrics: Metrics,
    busy: Mutex<HashSet<AccountId>>,
    /// How far the retries of accounts whose passes left work undone have
    /// gone. When the next one is due lives in the store
    /// (`Store::defer_reconcile`), where it outlives this process and any
    /// sync process takes it; this process keeps only the count behind the
    /// backoff.
    retries: Mutex<HashMap<AccountId, RetryState>>,
    /// Rung when an account was flagged: the flag loop takes flags at once
    /// instead of at its next poll.
    flag_bell: Arc<Notify>,
    /// Stray lists whose `stray_list` event is in their entry's history, by
    /// account: the history is read only the first time this process sees a
    /// stray. A list is forgotten once it is no longer open (or its account
    /// has no open entry left), so the set holds no more than the strays
    /// open now.
    strays_noted: Mutex<HashMap<AccountId, HashSet<String>>>,
}

/// The kind of the history line a stray list gets, once.
const STRAY_EVENT: &str = "stray_list";

/// What one read of the account's book showed: its open lists by client
/// id, and the client ids of its open orders on those lists' symbols
/// (`None` when the exchange cannot say).
struct Book<'a> {
    lists: &'a HashMap<String, OrderListSnapshot>,
    orders: Option<&'a HashSet<String>>,
    /// The account's balances, read when an entry's legs first need them.
    balances: BalanceRead,
}

/// The account's balances as read once in an account's pass, for every
/// `Protected` entry whose legs are smaller than its position
/// ([`Reconciler::legs_cover`]): one `account` read (weight 20) per pass,
/// not one per such entry. Forgotten after each `protect` call of the pass,
/// which may place or cancel lists and so move coins between free and
/// locked. `Some(None)`: the read failed; not tried again until then.
#[derive(Default)]
struct BalanceRead(Mutex<Option<Option<Vec<Balance>>>>);

impl BalanceRead {
    fn get(&self) -> Option<Option<Vec<Balance>>> {
        lock(&self.0).clone()
    }

    fn set(&self, read: Option<Vec<Balance>>) {
        *lock(&self.0) = Some(read);
    }

    fn forget(&self) {
        *lock(&self.0) = None;
    }
}

/// Why an account is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// The pass completed: forget the account.
    No,
    /// A protection was left incomplete.
    Protection,
    /// A read failed (an entry's or the account's).
    Errors,
}

impl Retry {
    /// What the pass that produced `report` left undone.
    fn of(report: &AccountReport) -> Retry {
        if !report.entry_errors.is_empty() {
            Retry::Errors
        } else if !report.lists_unread.is_empty() {
            // Lists gone from the book whose lookup did not show their end:
            // `protect` counted them covering.
            Retry::Protection
        } else if report.protections.iter().any(|(_, o)| left_incomplete(o)) {
            Retry::Protection
        } else {
            Retry::No
        }
    }

    /// The entries the pass that produced `report` left undone: an error, a
    /// list whose end is unread, a protection left incomplete.
    fn reasons(report: &AccountReport) -> BTreeSet<EntryId> {
        let errors = report.entry_errors.iter().map(|(id, _)| *id);
        let unread = report.lists_unread.iter().map(|key| key.entry);
        let incomplete = report
            .protections
            .iter()
            .filter(|(_, o)| left_incomplete(o))
            .map(|(id, _)| *id);
        errors.chain(unread).chain(incomplete).collect()
    }
}

/// Whether a `protect` outcome leaves the account to be retried.
fn left_incomplete(outcome: &ProtectOutcome) -> bool {
    matches!(
        outcome,
        ProtectOutcome::Failed { .. }
            | ProtectOutcome::Pending { .. }
            // A claimant in flight may have died: its claim is
            // looked up once stale (the claim timeout).
            | ProtectOutcome::Nothing(Idle::InFlight | Idle::Busy)
    )
}

/// What an account's open entries were when its retries ran out.
type EntryFacts = Vec<(EntryId, EntryStatus, Qty)>;

/// An account whose retries ran out: while its open entries stay as they
/// were and its passes leave undone only entries among `reasons`, it is
/// retried once per interval only.
#[derive(Debug, Clone)]
struct Exhausted {
    /// The account's open entries then.
    facts: EntryFacts,
    /// The entries its passes had left undone (none when the account's
    /// pass as a whole failed).
    reasons: BTreeSet<EntryId>,
}

/// How far an account's retries have gone.
#[derive(Debug, Default)]
struct RetryState {
    /// Retries scheduled since its last complete pass.
    attempts: u32,
    /// Set when the retries ran out.
    exhausted: Option<Exhausted>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Sets of ids only: a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reconciler {
    /// A reconciler with its own weight meter. Only the reconciler's own
    /// reads are charged to it; use [`Reconciler::wired`] (or
    /// [`Reconciler::with_meter`] and a [`MeteredExchange`] under the
    /// protector) to charge and pace the calls made inside `protect` too.
    pub fn new(
        exchange: Arc<dyn Exchange>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        protector: Arc<Protector>,
        config: SyncConfig,
    ) -> Self {
        let meter = Arc::new(WeightMeter::new(config.weight_budget_per_minute));
        Self::with_meter(exchange, store, clock, protector, config, meter)
    }

    /// A reconciler charging its reads to `meter`. `exchange` must be the bare
    /// exchange (not already metered by `meter`), or reads are counted twice.
    pub fn with_meter(
        exchange: Arc<dyn Exchange>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        protector: Arc<Protector>,
        config: SyncConfig,
        meter: Arc<WeightMeter>,
    ) -> Self {
        let exchange: Arc<dyn Exchange> = Arc::new(MeteredExchange::new(exchange, meter.clone()));
        Self {
            exchange,
            store,
            clock,
            orders: OrderMeter::new(config.order_budget_per_10s),
            breakers: Breakers::new(config.breaker),
            metrics: Metrics::default(),
            busy: Mutex::new(HashSet::new()),
            retries: Mutex::new(HashMap::new()),
            flag_bell: Arc::new(Notify::new()),
            strays_noted: Mutex::new(HashMap::new()),
            protector,
            config,
            meter,
        }
    }

    /// The whole wiring: one weight meter, charged by the reconciler's reads
    /// and by a [`Protector`] built here over a [`MeteredExchange`].
    pub fn wired(
        exchange: Arc<dyn Exchange>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        protector: ProtectorConfig,
        config: SyncConfig,
    ) -> Self {
        let meter = Arc::new(WeightMeter::new(config.weight_budget_per_minute));
        let metered: Arc<dyn Exchange> =
            Arc::new(MeteredExchange::new(exchange.clone(), meter.clone()));
        let protector = Arc::new(Protector::new(
            metered,
            store.clone(),
            clock.clone(),
            protector,
        ));
        Self::with_meter(exchange, store, clock, protector, config, meter)
    }

    /// The bell to ring when an account was flagged for reconciliation
    /// (`store_pg::ring_on_flags` rings it on each `NOTIFY oco_reconcile`):
    /// [`Reconciler::run`] then takes the flags at once rather than at its
    /// next `flag_poll`, which stays as the fallback. Rings that come while
    /// flags are being handled are kept (one is enough), so none is lost.
    pub fn flag_bell(&self) -> Arc<Notify> {
        self.flag_bell.clone()
    }

    /// The settings.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// The node's weight meter.
    pub fn meter(&self) -> &Arc<WeightMeter> {
        &self.meter
    }

    /// The protector `protect` is called on.
    pub fn protector(&self) -> &Arc<Protector> {
        &self.protector
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics
            .snapshot(self.meter.total(), self.meter.rate_limited())
    }

    /// Accounts whose breaker is open, with the reason.
    pub fn open_breakers(&self) -> Vec<(AccountId, OpenReason)> {
        self.breakers.open()
    }

    /// Runs until `shutdown` completes: flagged accounts, then accounts whose
    /// retry is due, are taken whenever the [`Reconciler::flag_bell`] rings
    /// or one of the flag loop's accounts is done, and polled every
    /// `flag_poll` from the start in case a ring was missed, up to
    /// `concurrency` in flight; after `startup_delay`, accounts due for
    /// their periodic reconciliation are polled every `due_poll` (at most
    /// `interval`) and reconciled by [`Reconciler::due_pass`], so each
    /// account is reconciled about once per `interval` by one of the sync
    /// processes sharing the store. Work in flight when
    /// `shutdown` fires is dropped, which is the crash case `protect` is
    /// built for (a claim without an answer is resolved by lookup later).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let periodic = async {
            tokio::time::sleep(self.config.startup_delay).await;
            // Polling slower than the interval would stretch it.
            let mut ticker = tokio::time::interval(self.config.due_poll.min(self.config.interval));
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match self.due_pass().await {
                    Ok(report) if report.accounts == 0 => {}
                    Ok(report) => info!(
                        accounts = report.accounts,
                        reconciled = report.reconciled.len(),
                        failed = report.failed.len(),
                        skipped = report.skipped.len(),
                        weight = report.weight_used,
                        elapsed_ms = report.elapsed.as_millis(),
                        "sync pass finished"
                    ),
                    Err(err) => warn!(error = %err, "sync pass failed"),
                }
            }
        };
        let flagged = async {
            let slots = self.config.concurrency.max(1);
            // Accounts flagged while another task of this process had them.
            let mut reruns = BTreeSet::new();
            // Accounts run as they come, each slot refilled as soon as its
            // account is done: one slow account (many entries paced by its
            // order budget) must not hold up the flags behind it.
            let mut running = FuturesUnordered::new();
            let mut ticker = tokio::time::interval(self.config.flag_poll);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = self.flag_bell.notified() => {}
                    Some((id, result)) = running.next() => {
                        flagged_done(id, result, &mut reruns);
                    }
                }
                let free = slots.saturating_sub(running.len());
                if free == 0 {
                    continue;
                }
                let mut ids = take_reruns(&lock(&self.busy), &mut reruns, free);
                let take = self.take_flag_work(free - ids.len());
                tokio::pin!(take);
                // The accounts in flight are polled while the store is asked:
                // one holding a pooled connection must not stall the take.
                let taken = loop {
                    tokio::select! {
                        taken = &mut take => break taken,
                        Some((id, result)) = running.next() => {
                            flagged_done(id, result, &mut reruns);
                        }
                    }
                };
                for id in taken {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                for id in ids {
                    running.push(self.reconcile_urgent(id));
                }
            }
        };
        tokio::select! {
            () = shutdown => info!("sync shutting down"),
            () = periodic => {}
            () = flagged => {}
        }
    }

    /// One full pass over every active account, `concurrency` at a time, due
    /// or not, and by this process alone (for tools and tests; [`Reconciler::run`]
    /// uses [`Reconciler::due_pass`]).
    ///
    /// # Errors
    /// [`SyncError::Store`] when the accounts cannot be listed; each
    /// account's own failure is in the report.
    pub async fn pass(&self) -> Result<PassReport, SyncError> {
        let started = Instant::now();
        let weight_before = self.meter.total();
        let accounts = self.store.active_accounts().await?;
        let ids: Vec<AccountId> = accounts.iter().map(|a| a.id).collect();
        let mut report = PassReport::new(ids.len());
        report.add(self.reconcile_many(ids).await);
        report.reconciled.sort_by_key(|r| r.account);
        report.weight_used = self.meter.total() - weight_before;
        report.elapsed = started.elapsed();
        self.metrics.pass();
        Ok(report)
    }

    /// The periodic pass, shared with every other sync process on the store:
    /// takes the accounts due (`Store::take_due_accounts`: last reconciled
    /// `interval` ago or never, or whose retry is due, and not taken by a
    /// live pass), reconciles up to `concurrency` at a time, taking the next
    /// as each one is done, and marks each one reconciled (or, when its pass
    /// left work undone, due again after a backoff), until none is due.
    /// Several processes running it at once split the accounts; an account a
    /// process took and did not finish (it died) is due again after
    /// `pass_lease`.
    ///
    /// # Errors
    /// [`SyncError::Store`] when due accounts cannot be taken (the accounts
    /// already taken are reconciled first); each account's own failure is in
    /// the report.
    pub async fn due_pass(&self) -> Result<PassReport, SyncError> {
        let started = Instant::now();
        let weight_before = self.meter.total();
        let slots = self.config.concurrency.max(1);
        let mut report = PassReport::new(0);
        let mut seen = HashSet::new();
        let mut running = FuturesUnordered::new();
        let mut taking = true;
        let mut failure = None;
        loop {
            let free = slots.saturating_sub(running.len());
            if taking && free > 0 {
                let take = self.store.take_due_accounts(
                    &self.config.holder,
                    self.config.interval,
                    self.config.pass_lease,
                    free,
                );
                tokio::pin!(take);
                // The accounts in flight are polled while the store is asked:
                // one holding a pooled connection must not stall the take.
                let taken = loop {
                    tokio::select! {
                        taken = &mut take => break taken,
                        Some((id, result)) = running.next() => report.add(vec![(id, result)]),
                    }
                };
                match taken {
                    Ok(ids) => {
                        // Fewer than asked: none other is due now. An account
                        // due again within the same pass (an interval shorter
                        // than the pass) ends it too: the next poll goes on.
                        taking = ids.len() == free;
                        for id in ids {
                            taking &= seen.insert(id);
                            running.push(self.reconcile_tagged(id));
                        }
                        report.accounts = seen.len();
                    }
                    Err(err) => {
                        taking = false;
                        failure = Some(err);
                    }
                }
            }
            match running.next().await {
                Some((id, result)) => report.add(vec![(id, result)]),
                None => break,
            }
        }
        if let Some(err) = failure {
            return Err(err.into());
        }
        report.reconciled.sort_by_key(|r| r.account);
        report.weight_used = self.meter.total() - weight_before;
        report.elapsed = started.elapsed();
        if report.accounts > 0 {
            self.metrics.pass();
        }
        Ok(report)
    }

    async fn reconcile_many(
        &self,
        ids: Vec<AccountId>,
    ) -> Vec<(AccountId, Result<AccountReport, SyncError>)> {
        stream::iter(ids)
            .map(|id| async move { (id, self.reconcile_exclusive(id).await) })
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await
    }

    /// [`Reconciler::reconcile_exclusive`], with the account's id.
    async fn reconcile_tagged(
        &self,
        account: AccountId,
    ) -> (AccountId, Result<AccountReport, SyncError>) {
        (account, self.reconcile_exclusive(account).await)
    }

    /// [`Reconciler::reconcile_tagged`] as urgent work (see [`urgent`]).
    async fn reconcile_urgent(
        &self,
        account: AccountId,
    ) -> (AccountId, Result<AccountReport, SyncError>) {
        urgent(self.reconcile_tagged(account)).await
    }

    /// Up to `limit` accounts for the flag loop from the store: flagged
    /// accounts, then accounts whose retry is due (`Store::take_due_retries`,
    /// whichever process scheduled it). Flags before retries: a fresh gap
    /// must not wait behind a crowd of retries. Flags left in the store are
    /// taken as slots free up, or by another sync process.
    async fn take_flag_work(&self, limit: usize) -> Vec<AccountId> {
        let mut ids = Vec::new();
        if limit == 0 {
            return ids;
        }
        match self.store.take_flagged(limit).await {
            Ok(taken) => {
                self.metrics.flagged(taken.len());
                ids = taken;
            }
            Err(err) => warn!(error = %err, "taking flagged accounts failed"),
        }
        if ids.len() < limit {
            match self
                .store
                .take_due_retries(
                    &self.config.holder,
                    self.config.pass_lease,
                    limit - ids.len(),
                )
                .await
            {
                Ok(taken) => {
                    for id in taken {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
                Err(err) => warn!(error = %err, "taking accounts due for a retry failed"),
            }
        }
        ids
    }

    async fn reconcile_exclusive(&self, account: AccountId) -> Result<AccountReport, SyncError> {
        if !lock(&self.busy).insert(account) {
            return Err(SyncError::InProgress { account });
        }
        struct Release<'a>(&'a Mutex<HashSet<AccountId>>, AccountId);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                lock(self.0).remove(&self.1);
            }
        }
        let _release = Release(&self.busy, account);
        // Std's clock, not tokio's: the store compares it with when a retry
        // was written, and a store in this process reads the same clock.
        let started = std::time::Instant::now();
        let result = self.reconcile_account(account).await;
        // Still busy: no other pass of the account in this process can race
        // this record; another process's retry written meanwhile is kept.
        self.follow_up(account, started, &result).await;
        result
    }

    /// Records in the store, for every sync process, when the account is
    /// next due after a pass, whichever trigger ran it: a complete pass marks
    /// it reconciled (due an interval from now); a pass that left work
    /// undone is not a reconciliation, and defers it by a backoff; a pass an
    /// open breaker skipped defers it until the breaker lets a trial pass
    /// through, so that a flag taken meanwhile is not lost. The mark keeps
    /// a retry written after the pass began at `started`: another process's
    /// pass of the account that failed meanwhile may have seen what this one
    /// read before.
    async fn follow_up(
        &self,
        account: AccountId,
        started: std::time::Instant,
        result: &Result<AccountReport, SyncError>,
    ) {
        let (retry, reasons) = match result {
            Ok(report) => (Retry::of(report), Retry::reasons(report)),
            Err(SyncError::BreakerOpen { retry_in, .. }) => {
                self.defer(account, *retry_in).await;
                return;
            }
            // Another task has the account and records its own pass.
            Err(SyncError::InProgress { .. }) => return,
            // The account's own failure, no entry's: the breaker paces it.
            Err(_) => (Retry::Errors, BTreeSet::new()),
        };
        if retry == Retry::No {
            lock(&self.retries).remove(&account);
            if let Err(err) = self.store.mark_reconciled(account, started).await {
                warn!(account = %account, error = %err, "could not record the reconciliation");
            }
            return;
        }
        let wait = self.backoff(account, retry, reasons).await;
        self.defer(account, wait).await;
    }

    /// The wait before the account's next attempt after a pass that left
    /// work undone (`reasons`: the entries it left undone): the configured
    /// backoff, doubling per attempt; once the attempts ran out, the
    /// interval, until the account's open entries change (a new entry, a
    /// fill, a status) or a pass leaves undone an entry that was not among
    /// the reasons when they ran out (a list of a protected entry canceled by
    /// hand, its replacement refused), when the backoff starts over. Without
    /// that memory each periodic pass of an account whose error persists (an
    /// entry the exchange no longer knows) would start a new series of
    /// retries; without the reasons, that one entry would leave every other
    /// failure of the account to one pass per interval.
    async fn backoff(
        &self,
        account: AccountId,
        retry: Retry,
        reasons: BTreeSet<EntryId>,
    ) -> Duration {
        let first = match retry {
            Retry::Protection => self.config.retry.after_protection,
            Retry::Errors | Retry::No => self.config.retry.after_errors,
        };
        let exhausted = lock(&self.retries)
            .get(&account)
            .and_then(|s| s.exhausted.clone());
        if let Some(then) = exhausted {
            if !reasons.is_subset(&then.reasons) {
                debug!(account = %account, "another entry left undone, retrying the account again");
                lock(&self.retries).remove(&account);
            } else {
                // Unread counts as unchanged: a failing store is no reason to retry faster.
                match self.entry_facts(account).await {
                    Some(now) if now != then.facts => {
                        debug!(account = %account, "entries changed, retrying the account again");
                        lock(&self.retries).remove(&account);
                    }
                    _ => return self.config.interval,
                }
            }
        }
        let attempts = lock(&self.retries).get(&account).map_or(0, |s| s.attempts);
        if attempts >= self.config.retry.attempts {
            warn!(account = %account, attempts, entries = ?reasons, "account still incomplete after its retries; retried once per interval until its entries change or another entry fails");
            let facts = self.entry_facts(account).await.unwrap_or_default();
            lock(&self.retries).insert(
                account,
                RetryState {
                    attempts,
                    exhausted: Some(Exhausted { facts, reasons }),
                },
            );
            return self.config.interval;
        }
        let wait = first
            .saturating_mul(1 << attempts.min(16))
            .min(self.config.retry.max);
        debug!(account = %account, attempts, wait_ms = wait.as_millis(), "pass incomplete, retrying the account");
        lock(&self.retries).insert(
            account,
            RetryState {
                attempts: attempts + 1,
                exhausted: None,
            },
        );
        wait
    }

    /// The account's open entries as far as its retries care (`None`: unread).
    async fn entry_facts(&self, account: AccountId) -> Option<EntryFacts> {
        match self.store.open_entries(account).await {
            Ok(entries) => {
                let mut facts: EntryFacts = entries
                    .iter()
                    .map(|e| (e.id, e.status, e.executed_qty))
                    .collect();
                facts.sort_by_key(|f| f.0);
                Some(facts)
            }
            Err(err) => {
                debug!(account = %account, error = %err, "open entries unread");
                None
            }
        }
    }

    /// Makes the account due again `after` from now, in the store.
    async fn defer(&self, account: AccountId, after: Duration) {
        if let Err(err) = self.store.defer_reconcile(account, after).await {
            warn!(account = %account, error = %err, "could not schedule the account's retry; it is due again when its take or its interval runs out");
        }
    }

    /// Reconciles one account: its open entries against the exchange, with
    /// `protect` (source `sync`) for whatever is missing. Honours and feeds the
    /// account's circuit breaker.
    ///
    /// # Errors
    /// [`SyncError::BreakerOpen`] while the breaker is open; otherwise the
    /// failure that stopped the account's pass (refused keys, the store, the
    /// open-list read). Failures of single entries are in the report.
    pub async fn reconcile_account(&self, account: AccountId) -> Result<AccountReport, SyncError> {
        if let Admission::Skip { retry_in, reason } = self.breakers.admit(account) {
            self.metrics.skipped();
            debug!(account = %account, "breaker open, account skipped");
            return Err(SyncError::BreakerOpen {
                account,
                retry_in,
                reason: reason.to_string(),
            });
        }
        let result = self
            .account_pass(account)
            .instrument(info_span!("sync_account", account = %account))
            .await;
        let failure = match &result {
            // An error of one entry (its lookup, its protection) is that
            // entry's, reported and retried: counted, it would keep the
            // account's other entries from being reconciled while open.
            // Account-wide failures (refused keys, the store) end the pass.
            Ok(_) => {
                self.metrics.reconciled();
                None
            }
            Err(err) => {
                self.metrics.failed();
                let counts = match err.exchange_error() {
                    Some(ExchangeError::RateLimited { .. } | ExchangeError::NotFound) | None => {
                        false
                    }
                    Some(_) => true,
                };
                counts.then_some(err)
            }
        };
        match failure {
            None => {
                if self.breakers.success(account) {
                    info!(account = %account, "circuit breaker closed");
                }
            }
            Some(err) => match self
                .breakers
                .failure(account, err.is_auth(), &err.to_string())
            {
                Tripped::No => {}
                Tripped::Opened(reason) | Tripped::Reopened(reason) => {
                    self.metrics.breaker_opened();
                    warn!(account = %account, %reason, open_for_s = self.config.breaker.open_for.as_secs(), "circuit breaker opened: account not reconciled meanwhile");
                }
            },
        }
        result
    }

    async fn account_pass(&self, id: AccountId) -> Result<AccountReport, SyncError> {
        let mut report = AccountReport::new(id);
        let account = self.store.account(id).await?;
        if !account.active {
            report.inactive = true;
            lock(&self.strays_noted).remove(&id);
            return Ok(report);
        }
        let entries = self.store.open_entries(id).await?;
        report.entries = entries.len();
        if entries.is_empty() {
            // Nothing to check: no request at all.
            lock(&self.strays_noted).remove(&id);
            return Ok(report);
        }
        let creds = self.store.credentials(id).await?;
        // One call for every open list of the account, instead of one per leg.
        let open: HashMap<String, OrderListSnapshot> = self
            .read(|| self.exchange.open_order_lists(&creds))
            .await?
            .into_iter()
            .map(|l| (l.list_client_id.clone(), l))
            .collect();
        let orders = self.open_order_ids(&creds, &open).await?;
        let book = Book {
            lists: &open,
            orders: orders.as_ref(),
            balances: BalanceRead::default(),
        };
        let mut matched = HashSet::new();
        for entry in &entries {
            let span = info_span!("sync_entry", entry = %entry.id, client_id = %entry.client_id);
            let result = self
                .entry_pass(&creds, entry, &book, &mut report, &mut matched)
                .instrument(span)
                .await;
            if let Err(err) = result {
                // Refused keys and a failing store stop the account; the rest is one entry's.
                if err.is_auth() || err.store_error().is_some() {
                    return Err(err);
                }
                warn!(account = %id, entry = %entry.id, client_id = %entry.client_id, error = %err, "entry not reconciled");
                report.entry_errors.push((entry.id, err));
            }
        }
        for list_id in open.keys() {
            if !matched.contains(list_id)
                && matches!(
                    self.protector.ids().parse(list_id),
                    Some(OrderRole::List(_))
                )
            {
                warn!(account = %id, client_id = %list_id, "open list of ours matches no open entry");
                report.unknown_lists.push(list_id.clone());
            }
        }
        self.metrics.entry_errors(report.entry_errors.len());
        report.unknown_lists.sort();
        report
            .stray_lists
            .sort_by(|a, b| a.client_id.cmp(&b.client_id));
        self.note_strays(&open, &report).await;
        Ok(report)
    }

    /// Logs and counts the pass's stray lists, and writes each to its
    /// entry's history once. Nothing is canceled or adopted: the list may
    /// hold coins another entry of the symbol needs. With no stray and
    /// nothing remembered for the account, this costs nothing; otherwise the
    /// store is read and written only for a stray this process has not
    /// noted yet. A failed read or write is logged and tried again on the
    /// next pass; it stops nothing.
    async fn note_strays(&self, open: &HashMap<String, OrderListSnapshot>, report: &AccountReport) {
        let account = report.account;
        {
            let mut noted = lock(&self.strays_noted);
            if let Some(lists) = noted.get_mut(&account) {
                lists.retain(|id| open.contains_key(id));
                if lists.is_empty() {
                    noted.remove(&account);
                }
            }
        }
        if report.stray_lists.is_empty() {
            return;
        }
        self.metrics.strays(report.stray_lists.len());
        for stray in &report.stray_lists {
            warn!(account = %account, entry = %stray.entry, leg = %stray.leg, client_id = %stray.client_id, state = stray.state.name(), advice = stray_advice(&stray.state), "open list of ours whose leg is not live: reported only");
            let noted = lock(&self.strays_noted)
                .get(&account)
                .is_some_and(|lists| lists.contains(&stray.client_id));
            if noted {
                continue;
            }
            match self.write_stray_event(stray).await {
                Ok(()) => {
                    lock(&self.strays_noted)
                        .entry(account)
                        .or_default()
                        .insert(stray.client_id.clone());
                }
                Err(err) => {
                    warn!(account = %account, entry = %stray.entry, client_id = %stray.client_id, error = %err, "stray list not written to the entry's history; tried again next pass");
                }
            }
        }
    }

    /// Appends the `stray_list` event unless the history has it already (a
    /// restarted process, or another sync process, may have written it).
    async fn write_stray_event(&self, stray: &StrayList) -> Result<(), StoreError> {
        let head = format!("{}: list {} ", stray.leg, stray.client_id);
        let events = self.store.events(stray.entry).await?;
        if events
            .iter()
            .any(|e| e.kind == STRAY_EVENT && e.detail.starts_with(&head))
        {
            return Ok(());
        }
        let detail = format!(
            "{head}open on the exchange while its leg is {}; reported only: {}",
            stray.state.name(),
            stray_advice(&stray.state)
        );
        self.store
            .append_event(&event(
                stray.entry,
                STRAY_EVENT,
                detail,
                Some(Source::Sync),
                self.clock.now(),
            ))
            .await
    }

    /// The client ids of the account's open orders on every symbol where a
    /// list of ours is open (one read per symbol; none without such a
    /// list). `None` when the exchange cannot say.
    async fn open_order_ids(
        &self,
        creds: &ApiCredentials,
        open: &HashMap<String, OrderListSnapshot>,
    ) -> Result<Option<HashSet<String>>, SyncError> {
        let symbols: BTreeSet<&str> = open
            .values()
            .filter(|l| {
                matches!(
                    self.protector.ids().parse(&l.list_client_id),
                    Some(OrderRole::List(_))
                )
            })
            .map(|l| l.symbol.as_str())
            .collect();
        let mut ids = HashSet::new();
        for symbol in symbols {
            match self
                .read(|| self.exchange.open_order_ids(creds, symbol))
                .await?
            {
                Some(found) => ids.extend(found),
                None => return Ok(None),
            }
        }
        Ok(Some(ids))
    }

    /// Reconciles one entry (see [`Reconciler::entry_steps`]). When a step
    /// fails after the entry's legs were read, a stop this pass found gone
    /// is not left behind a `Protected` label: see
    /// [`Reconciler::stops_gone_after_error`].
    async fn entry_pass(
        &self,
        creds: &ApiCredentials,
        entry: &Entry,
        book: &Book<'_>,
        report: &mut AccountReport,
        matched: &mut HashSet<String>,
    ) -> Result<(), SyncError> {
        let mut legs = None;
        let result = self
            .entry_steps(creds, entry, book, report, matched, &mut legs)
            .await;
        if result.is_err()
            && let Some(legs) = legs
        {
            self.stops_gone_after_error(entry, &legs, report).await;
        }
        result
    }

    /// The entry's order looked up, its legs followed, `protect` called;
    /// `legs_read` gets the legs as read before they were followed.
    async fn entry_steps(
        &self,
        creds: &ApiCredentials,
        entry: &Entry,
        book: &Book<'_>,
        report: &mut AccountReport,
        matched: &mut HashSet<String>,
        legs_read: &mut Option<Vec<Leg>>,
    ) -> Result<(), SyncError> {
        let open = book.lists;
        let now = self.clock.now();
        let mut evidence = None;
        let mut news = false;
        if !entry.status.is_final() {
            let symbol = entry.symbol.name.as_str();
            let snap = match self
                .read(|| {
                    self.exchange
                        .query_order(creds, symbol, entry.client_id.as_str())
                })
                .await
            {
                Ok(snap) => snap,
                Err(ExchangeError::NotFound) => return self.not_found(entry, report).await,
                Err(err) => return Err(err.into()),
            };
            report.orders_queried += 1;
            let mut fills = snap.fills.clone();
            let seen: Qty = fills.iter().map(|f| f.qty).sum();
            if snap.executed_qty > entry.fills_qty
                && seen < snap.executed_qty
                && let Some(trades) = self.trades(creds, entry, snap.order_id, report).await?
            {
                // Fills the store has not seen one by one: fetched for their commission.
                fills = trades;
            }
            let fills_qty: Qty = fills.iter().map(|f| f.qty).sum();
            let ev = Evidence {
                order_id: Some(snap.order_id),
                status: snap.status,
                executed_qty: snap.executed_qty,
                cumulative_quote: snap.cumulative_quote,
                fills,
                holding: None,
                observed_at: now,
            };
            if snap.executed_qty.is_zero() {
                if snap.status != entry.status || entry.order_id.is_none() {
                    // Accepted, or ended unfilled: the status is all there is to record.
                    self.store.record_evidence(entry.id, &ev).await?;
                }
                return Ok(());
            }
            news = snap.executed_qty > entry.executed_qty
                || snap.status != entry.status
                || fills_qty > entry.fills_qty;
            evidence = Some(ev);
        } else if entry.executed_qty.is_zero() {
            return Ok(());
        } else if entry.fills_qty < entry.executed_qty
            && let Some(order_id) = entry.order_id
            && let Some(fills) = self.trades(creds, entry, order_id, report).await?
        {
            // Ended while some of its trades were unread (a pass whose trade
            // read failed recorded the order's own figures, or a layer saw
            // only some fills one by one): read for their commissions, which
            // may shrink the position, as they would have been while the
            // order was open.
            let fills_qty: Qty = fills.iter().map(|f| f.qty).sum();
            if fills_qty > entry.fills_qty {
                news = true;
                evidence = Some(Evidence {
                    order_id: Some(order_id),
                    status: entry.status,
                    executed_qty: entry.executed_qty,
                    cumulative_quote: entry.cumulative_quote,
                    fills,
                    holding: None,
                    observed_at: now,
                });
            }
        }

        let legs = self.store.legs(entry.id).await?;
        *legs_read = Some(legs.clone());
        let mut ended = Vec::new();
        let mut adopted = false;
        for leg in &legs {
            let id = leg.ids.list.as_str();
            let on_book = open.get(id);
            if on_book.is_some() {
                matched.insert(id.to_owned());
            }
            let stop_gone = book
                .orders
                .is_some_and(|ids| !ids.contains(leg.ids.stop_loss.as_str()));
            match (&leg.state, on_book) {
                (LegState::Placed { .. }, None) => {
                    // Ended while nobody listened: TP or SL filled, or canceled outside.
                    self.protector.refresh_leg(creds, leg).await?;
                    ended.push(leg.key);
                }
                (LegState::Placed { .. }, Some(_)) if stop_gone => {
                    // Still executing without its stop: the take-profit
                    // filled in part while nobody listened (the exchange
                    // cancels the stop then), and its rest has no stop.
                    self.protector.refresh_leg(creds, leg).await?;
                    ended.push(leg.key);
                }
                (LegState::Claimed | LegState::Unknown, Some(snap)) => {
                    // Sent, but the store never heard the answer (crash after send).
                    let placed = LegState::Placed {
                        list_id: snap.list_id,
                    };
                    if self.protector.transition_leg(leg, placed).await? {
                        info!(entry = %entry.id, leg = %leg.key, client_id = %id, "leg found on the exchange by client id, adopted");
                        self.metrics.adopted();
                        report.legs_adopted.push(leg.key);
                        adopted = true;
                        if stop_gone {
                            // Adopted executing without its stop, as a placed
                            // leg can be: its take-profit filled in part
                            // meanwhile. Looked up as placed (read again: a
                            // lagging lookup must not count from the claim's
                            // age), so its sale and end are recorded.
                            let fresh = self.store.legs(entry.id).await?;
                            if let Some(adopted) = fresh.iter().find(|l| l.key == leg.key) {
                                self.protector.refresh_leg(creds, adopted).await?;
                                ended.push(leg.key);
                            }
                        }
                    }
                }
                (state, Some(_)) if is_stray(state) => {
                    // Left alone: see `StrayList`. Logged and noted by the account's pass.
                    report.stray_lists.push(StrayList {
                        entry: entry.id,
                        leg: leg.key,
                        client_id: id.to_owned(),
                        state: state.clone(),
                    });
                }
                _ => {}
            }
        }
        // Legs whose list left the book while no lookup has shown its end.
        let mut unread = Vec::new();
        if !ended.is_empty() {
            let after = self.store.legs(entry.id).await?;
            for key in ended {
                let Some(leg) = after.iter().find(|l| l.key == key) else {
                    continue;
                };
                let how = leg.state.name();
                self.metrics.list_ended(how);
                match &leg.state {
                    LegState::CanceledExternally { why } => {
                        warn!(entry = %entry.id, leg = %key, client_id = %leg.ids.list, why = why.name(), "list ended outside ocoguard; protecting what remains");
                    }
                    LegState::Placed { .. } => {
                        // Gone from the book (or its stop gone), yet its
                        // lookup failed or lagged the end: `protect` below
                        // counts its coins covered, so the account is not
                        // reconciled until a lookup shows the end.
                        warn!(entry = %entry.id, leg = %key, client_id = %leg.ids.list, "list not open, its lookup did not show its end; the account is retried");
                        report.lists_unread.push(key);
                        unread.push(leg.clone());
                        continue;
                    }
                    _ => {
                        info!(entry = %entry.id, leg = %key, client_id = %leg.ids.list, state = how, "list ended")
                    }
                }
                report.lists_ended.push((key, leg.state.clone()));
            }
            news = true;
        }
        let in_doubt = legs
            .iter()
            .any(|l| matches!(l.state, LegState::Claimed | LegState::Unknown));
        let protected = matches!(entry.protection, Protection::Protected { .. });
        if protected
            && !news
            && !in_doubt
            && !adopted
            && self.legs_cover(creds, entry, &legs, &book.balances).await
        {
            // Covered, nothing new, every placed list still open: nothing to ask.
            return Ok(());
        }
        self.orders
            .wait_for_room(entry.account, ORDERS_PER_PROTECT)
            .await;
        let called = self
            .protector
            .protect(entry.id, evidence.as_ref(), Source::Sync)
            .await;
        book.balances.forget();
        let outcome = called?.outcome;
        self.orders.record(entry.account, orders_sent(&outcome));
        self.metrics.protection(&outcome);
        match &outcome {
            ProtectOutcome::Placed { legs, .. } => {
                info!(entry = %entry.id, client_id = %entry.client_id, legs = legs.len(), source = "sync", "protection placed by sync");
            }
            ProtectOutcome::Exited { reason } => {
                warn!(entry = %entry.id, client_id = %entry.client_id, %reason, "late protection: exited at market");
            }
            ProtectOutcome::Unprotectable { reason } => {
                warn!(entry = %entry.id, client_id = %entry.client_id, %reason, "entry unprotectable");
            }
            ProtectOutcome::Failed { errors } => {
                warn!(entry = %entry.id, client_id = %entry.client_id, errors = ?errors, "protection failed, the account is retried after a backoff");
            }
            other => debug!(entry = %entry.id, outcome = outcome_name(other), "protect"),
        }
        // `protect` counted the unread legs as covering their coins, and
        // may have labelled the entry protected for them: their stops are gone.
        if !unread.is_empty() {
            // Only legs still working: `protect` may have looked one up and
            // seen its end meanwhile.
            let now = self.store.legs(entry.id).await?;
            for leg in &unread {
                if now.iter().any(|l| l.key == leg.key && l.state.is_active()) {
                    self.protector
                        .list_end_unread(entry.id, leg, Source::Sync)
                        .await?;
                }
            }
        }
        report.protections.push((entry.id, outcome));
        Ok(())
    }

    /// After a step of the entry's pass failed (a lookup, `protect` before
    /// it decided): a leg that was working when the pass read it and has
    /// ended outside since (canceled, stop expired, take-profit filled in
    /// part) left coins without a stop that nothing covered, so an entry
    /// labelled `Protected` is labelled `unprotected` (the dashboard and the
    /// unprotected-age alert see it); a leg the pass found gone from the
    /// book with its end unread and still working gets what `protect`'s
    /// success would have given it ([`Protector::list_end_unread`]). The
    /// account is retried for the error. Best-effort: a store failure here
    /// is logged, the error that stopped the pass is what is returned.
    async fn stops_gone_after_error(&self, entry: &Entry, before: &[Leg], report: &AccountReport) {
        let now = match self.store.legs(entry.id).await {
            Ok(legs) => legs,
            Err(err) => {
                warn!(entry = %entry.id, error = %err, "legs unread after a failed pass of the entry; its label is left as it is");
                return;
            }
        };
        for key in report.lists_unread.iter().filter(|k| k.entry == entry.id) {
            if let Some(leg) = now.iter().find(|l| l.key == *key && l.state.is_active())
                && let Err(err) = self
                    .protector
                    .list_end_unread(entry.id, leg, Source::Sync)
                    .await
            {
                warn!(entry = %entry.id, leg = %key, error = %err, "entry not labelled unprotected for a list whose end is unread");
            }
        }
        let ended_outside = now.iter().any(|l| {
            matches!(l.state, LegState::CanceledExternally { .. })
                && before.iter().any(|b| b.key == l.key && b.state.is_active())
        });
        if !ended_outside {
            return;
        }
        let labelled = match self.store.entry(entry.id).await {
            Ok(current) if matches!(current.protection, Protection::Protected { .. }) => self
                .store
                .set_protection(entry.id, &Protection::Unprotected)
                .await
                .map(|()| true),
            Ok(_) => Ok(false),
            Err(err) => Err(err),
        };
        match labelled {
            Ok(true) => {
                warn!(entry = %entry.id, client_id = %entry.client_id, "a list ended outside and its coins are not covered yet: entry labelled unprotected, the account is retried");
            }
            Ok(false) => {}
            Err(err) => {
                warn!(entry = %entry.id, error = %err, "entry not labelled unprotected after a list ended outside");
            }
        }
    }

    /// The trades of the entry's order `order_id` (`myTrades`), or `None`
    /// when they cannot be read: the failure is logged and reported as an
    /// error of the entry (so the account is retried and the trades read
    /// again), and the caller protects from what the order itself shows.
    /// Only the commissions need the trades; a fill must not wait for them
    /// without a stop. A base-asset commission left out makes the plan ask
    /// for more than the account holds: `protect` plans again from the free
    /// balance on the refusal. Fills are merged by trade id, so the trades
    /// read later count once.
    ///
    /// # Errors
    /// Refused keys, which end the account's pass.
    async fn trades(
        &self,
        creds: &ApiCredentials,
        entry: &Entry,
        order_id: i64,
        report: &mut AccountReport,
    ) -> Result<Option<Vec<Fill>>, SyncError> {
        let symbol = entry.symbol.name.as_str();
        match self
            .read(|| self.exchange.order_trades(creds, symbol, order_id))
            .await
        {
            Ok(trades) => {
                report.trades_fetched += 1;
                Ok(Some(trades))
            }
            Err(err @ ExchangeError::Auth(_)) => Err(err.into()),
            Err(err) => {
                warn!(entry = %entry.id, client_id = %entry.client_id, order_id, error = %err, "trades unread, protecting from the order's own figures; read again on a retry");
                report.entry_errors.push((entry.id, err.into()));
                Ok(None)
            }
        }
    }

    /// Whether `entry`'s working legs hold its whole position (each what it
    /// has not sold): net filled minus what legs sold, floored to the step
    /// when the symbol's rules are at hand. `Protected` alone does not say so: a fill recorded while
    /// another caller replaced the legs leaves the entry protected with less
    /// covered. With no working leg the answer is no: only `protect` can tell
    /// whether the coins are sold or bare.
    async fn legs_cover(
        &self,
        creds: &ApiCredentials,
        entry: &Entry,
        legs: &[Leg],
        balances: &BalanceRead,
    ) -> bool {
        // The rest of a partly filled take-profit may rest with no stop, its
        // coins locked (so not free below): `protect` cancels it, and tries
        // again after a cancel that failed.
        let rest = LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial,
        };
        if legs.iter().any(|l| l.state == rest) {
            return false;
        }
        // What the working lists still hold: a stop that triggered and sold
        // part of its list holds only the rest, and `sold` below takes that
        // sale off the position already.
        let active: Qty = legs
            .iter()
            .filter(|l| l.state.is_active())
            .map(|l| l.unsold())
            .sum();
        if active.is_zero() {
            return false;
        }
        let sold: Qty = legs.iter().map(|l| l.sold.total()).sum();
        let mut position = entry.net_qty().saturating_sub(sold);
        let rules = self.exchange.cached_symbol_rules(&entry.symbol.name);
        if let Some(rules) = &rules {
            position = position.floor_to(rules.step);
        }
        if active >= position {
            return true;
        }
        // Coins sold by hand leave legs smaller than the position for good:
        // what the account no longer holds is no reason to replace working
        // stops every pass. Coins free on the account are.
        let read = match balances.get() {
            Some(read) => read,
            None => {
                let read = match self.read(|| self.exchange.balances(creds)).await {
                    Ok(read) => Some(read),
                    Err(err) => {
                        debug!(entry = %entry.id, error = %err, "balance unread, protect decides");
                        None
                    }
                };
                balances.set(read.clone());
                read
            }
        };
        let Some(read) = read else {
            return false;
        };
        let free = read
            .iter()
            .find(|b| b.asset == entry.symbol.base.0)
            .map_or(Qty::ZERO, |b| b.free);
        let free = rules.map_or(free, |r| free.floor_to(r.step));
        free.is_zero()
    }

    /// The exchange has no order under the entry's client id.
    async fn not_found(&self, entry: &Entry, report: &mut AccountReport) -> Result<(), SyncError> {
        let now = self.clock.now();
        let age = now.since(entry.created_at);
        if entry.status != EntryStatus::PendingNew {
            // Acknowledged once, unknown now: never guess about an order that existed.
            warn!(entry = %entry.id, client_id = %entry.client_id, status = %entry.status, "exchange no longer knows an acknowledged entry");
            report
                .entry_errors
                .push((entry.id, SyncError::Exchange(ExchangeError::NotFound)));
            return Ok(());
        }
        if age <= self.config.not_found_grace {
            // The API may be sending it right now.
            report.awaiting_send.push(entry.id);
            return Ok(());
        }
        let ev = Evidence {
            order_id: None,
            status: EntryStatus::Rejected,
            executed_qty: Qty::ZERO,
            cumulative_quote: Decimal::ZERO,
            fills: Vec::new(),
            holding: None,
            observed_at: now,
        };
        self.store.record_evidence(entry.id, &ev).await?;
        let detail = format!(
            "the exchange has no order {} {}s after it was stored: never sent, recorded as rejected",
            entry.client_id,
            age.as_secs()
        );
        self.store
            .append_event(&event(
                entry.id,
                "never_sent",
                detail,
                Some(Source::Sync),
                now,
            ))
            .await?;
        warn!(entry = %entry.id, client_id = %entry.client_id, age_s = age.as_secs(), "entry never reached the exchange, recorded as rejected");
        self.metrics.never_sent();
        report.never_sent.push(entry.id);
        Ok(())
    }

    /// A read, retried after the node's pause when the exchange says "rate limited".
    async fn read<T, F, Fut>(&self, call: F) -> Result<T, ExchangeError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ExchangeError>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                // The metered exchange paused the node; the next call waits it out.
                Err(ExchangeError::RateLimited { .. }) if attempt < READ_RETRIES => attempt += 1,
                other => return other,
            }
        }
    }
}

/// Up to `limit` of the accounts whose flag came while another task had them,
/// those no task has now; the rest stay.
fn take_reruns(
    busy: &HashSet<AccountId>,
    reruns: &mut BTreeSet<AccountId>,
    limit: usize,
) -> Vec<AccountId> {
    let mut ids = Vec::new();
    reruns.retain(|id| {
        if ids.len() < limit && !busy.contains(id) {
            ids.push(*id);
            false
        } else {
            true
        }
    });
    ids
}

/// Handles a flag loop's account that is done.
fn flagged_done(
    id: AccountId,
    result: Result<AccountReport, SyncError>,
    reruns: &mut BTreeSet<AccountId>,
) {
    match result {
        // Being reconciled by the full pass, which may have read the account
        // before the flag's cause: go again once it is done.
        Err(SyncError::InProgress { .. }) => {
            reruns.insert(id);
        }
        // Due again in the store when the breaker lets a trial pass through.
        Err(err @ SyncError::BreakerOpen { .. }) => {
            debug!(account = %id, error = %err, "flagged account not reconciled, breaker open")
        }
        // Due again in the store after a backoff; errors that persist open
        // the breaker, which then paces the account.
        Err(err) => {
            warn!(account = %id, error = %err, "flagged account not reconciled, retrying after a backoff");
        }
        Ok(_) => debug!(account = %id, "flagged account reconciled"),
    }
}

/// What the operator is told to do about a stray list. A leg read as ended
/// outside (`canceled`, `stop_expired`) while its list still executes may
/// have had its end read from one order's update: the list may hold the
/// entry's only stop; `protect` looks it up again once no other leg of the
/// entry works.
fn stray_advice(state: &LegState) -> &'static str {
    match state {
        LegState::CanceledExternally {
            why: ExternalEnd::Canceled | ExternalEnd::StopExpired,
        } => {
            "do not cancel it by hand: it may hold this entry's stop (protect looks such a list up again once no other leg of the entry works)"
        }
        _ => "cancel it by hand after checking the account",
    }
}

/// Whether an open list whose leg is in `state` is a stray: its leg is not
/// live (claimed, placed, unknown). The rest of a partly filled take-profit is
/// not one: it stays on the book by design until `protect` cancels it.
fn is_stray(state: &LegState) -> bool {
    !state.is_active()
        && *state
            != LegState::CanceledExternally {
                why: ExternalEnd::TakeProfitPartial,
            }
}

/// Orders a `protect` outcome sent (an OCO is two orders).
fn orders_sent(outcome: &ProtectOutcome) -> u32 {
    match outcome {
        ProtectOutcome::Placed { legs, .. } => u32::try_from(legs.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(2),
        ProtectOutcome::Exited { .. } => 1,
        // A refusal may still count; charge the most a call sends.
        ProtectOutcome::Failed { .. } | ProtectOutcome::Pending { .. } => ORDERS_PER_PROTECT,
        ProtectOutcome::Nothing(_) | ProtectOutcome::Unprotectable { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_whose_leg_was_read_as_ended_is_not_given_to_cancel_by_hand() {
        for why in [ExternalEnd::Canceled, ExternalEnd::StopExpired] {
            let advice = stray_advice(&LegState::CanceledExternally { why });
            assert!(advice.starts_with("do not cancel it by hand"), "{advice}");
        }
        for state in [
            LegState::NotPlaced {
                code: None,
                reason: "lookup found no such list".into(),
            },
            LegState::Replaced,
        ] {
            assert_eq!(
                stray_advice(&state),
                "cancel it by hand after checking the account"
            );
        }
    }
}
