//! Layer 1 of ocoguard: one user-data stream per leased account, and
//! `protect` (source `websocket`) on every fill of an entry, in real time.
//!
//! Accounts are leased through the store, so several gateway processes split
//! them and a dead gateway's accounts move to a live one within the lease
//! period. Each account runs in its own task: a slow or failing account never
//! holds up another. After any gap (drop, stall, expiry, lease takeover, a
//! fresh subscription) the account is flagged for immediate reconciliation by
//! `sync`, because streams replay nothing.
//!
//! Not here: any exchange protocol (behind `UserStream`), SQL (behind `Store`
//! and `Leases`), or process wiring (`bins/ws-gateway`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use oco_core::follow::{Bookkeeping, Followed};
use oco_core::ids::{LegKey, OrderRole};
use oco_core::model::Source;
use oco_core::ports::{
    Clock, Exchange, ExecutionUpdate, Leases, ListUpdate, Store, StoreError, StreamEvent,
    UserStream, UserStreamSession,
};
use oco_core::protect::{Idle, ProtectOutcome, ProtectReport, Protector};
use oco_core::{AccountId, EntryId, EntryStatus, ExchangeError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

pub mod wakeup;

pub use wakeup::{CpuWakeupLatency, WakeupError};

/// Settings of a gateway process.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This process's lease holder name; unique per process.
    pub holder: String,
    /// How long a lease lasts without renewal: the longest an account can go
    /// unstreamed after its gateway dies.
    pub lease_ttl: Duration,
    /// How often leases are renewed and new accounts picked up. Keep it well
    /// under `lease_ttl`: accounts are let go once no renewal has gone
    /// through for [`GatewayConfig::lease_hold`].
    pub renew_every: Duration,
    /// Most accounts this process streams.
    pub max_accounts: usize,
    /// First wait after a stream fails to open; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest wait between attempts to open a stream.
    pub max_backoff: Duration,
    /// At shutdown or when a lease moves away, how long an account's task
    /// may take to finish the events it already received (a protection
    /// claimed but not yet sent) and the bookkeeping it queued before it is
    /// aborted. Aborted halfway, a claimed protection waits for the claim
    /// timeout and a lookup, and a leg trade not yet written is lost (its
    /// entry's `fees_complete` stays false). Keep it well under `lease_ttl`.
    pub drain_grace: Duration,
    /// While an account's stream stays down, how often it is flagged for
    /// reconciliation again: each flag has `sync` look for fills the stream
    /// missed, so a long outage protects them within this, not the interval.
    pub reflag_while_down: Duration,
}

impl GatewayConfig {
    /// How long after a renewal began its accounts are still streamed when
    /// no renewal has gone through since: the lease period less a margin, so
    /// that the accounts are let go before their leases end and another
    /// gateway takes them. The margin is one renewal interval, or half of
    /// what the period leaves past one interval when that is less: the next
    /// renewal, due one interval after the last, must have time to go
    /// through before the accounts are let go.
    pub fn lease_hold(&self) -> Duration {
        let slack = self.lease_ttl.saturating_sub(self.renew_every);
        self.lease_ttl
            .saturating_sub(self.renew_every.min(slack / 2))
    }

    /// Leases of 30 s renewed every 10 s, up to 1,000 accounts, reopen
    /// backoff from 500 ms to 30 s, 5 s to finish the events in hand.
    pub fn standard(holder: impl Into<String>) -> Self {
        Self {
            holder: holder.into(),
            lease_ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            max_accounts: 1000,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            drain_grace: Duration::from_secs(5),
            reflag_while_down: Duration::from_secs(30),
        }
    }
}

/// What stopped the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The lease store could not be reached at shutdown.
    #[error("releasing leases: {0}")]
    Release(oco_core::StoreError),
}

/// Counters of a gateway, for metrics and tests.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Accounts with an open, subscribed stream.
    pub streams_up: AtomicU64,
    /// Events received.
    pub events: AtomicU64,
    /// Entry fills handled.
    pub entry_fills: AtomicU64,
    /// Entry acceptances (NEW, nothing filled) not written because the
    /// order's next update had already arrived.
    pub superseded: AtomicU64,
    /// Protection placements made by this gateway.
    pub placements: AtomicU64,
    /// Gaps seen (each flags the account).
    pub gaps: AtomicU64,
    /// Failures of `protect` (each flags the account).
    pub failures: AtomicU64,
    /// Accounts flagged for reconciliation.
    pub flags: AtomicU64,
    /// Writes those flags took (several flags queued together share one).
    pub flag_writes: AtomicU64,
    /// Flag writes that failed (each is retried, or refused for good).
    pub flag_failures: AtomicU64,
    /// Accounts owed a flag not written yet (the database is down or slow).
    pub flags_owed: AtomicU64,
    /// Stream state of every account leased here: up or down.
    accounts: std::sync::Mutex<BTreeMap<AccountId, (u64, bool)>>,
    /// Numbers each lease taken here, so that a task of an earlier lease of
    /// an account (still ending) cannot report the account of a later one.
    leases: AtomicU64,
}

/// A snapshot of [`GatewayStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Accounts with an open stream.
    pub streams_up: u64,
    /// Events received.
    pub events: u64,
    /// Entry fills handled.
    pub entry_fills: u64,
    /// Acceptances skipped for a later update already received.
    pub superseded: u64,
    /// Placements made.
    pub placements: u64,
    /// Gaps seen.
    pub gaps: u64,
    /// `protect` failures.
    pub failures: u64,
    /// Accounts flagged for reconciliation.
    pub flags: u64,
    /// Writes those flags took.
    pub flag_writes: u64,
    /// Flag writes that failed.
    pub flag_failures: u64,
    /// Accounts owed a flag not written yet.
    pub flags_owed: u64,
}

impl GatewayStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            streams_up: r(&self.streams_up),
            events: r(&self.events),
            entry_fills: r(&self.entry_fills),
            superseded: r(&self.superseded),
            placements: r(&self.placements),
            gaps: r(&self.gaps),
            failures: r(&self.failures),
            flags: r(&self.flags),
            flag_writes: r(&self.flag_writes),
            flag_failures: r(&self.flag_failures),
            flags_owed: r(&self.flags_owed),
        }
    }
}

impl GatewayStats {
    fn accounts(&self) -> std::sync::MutexGuard<'_, BTreeMap<AccountId, (u64, bool)>> {
        // Plain flags inside: a poisoned lock holds consistent data.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every account leased here and whether its stream is up, by account id.
    pub fn stream_states(&self) -> Vec<(AccountId, bool)> {
        self.accounts()
            .iter()
            .map(|(a, (_, up))| (*a, *up))
            .collect()
    }

    /// Records `account` as leased here (stream down so far); the lease's
    /// number, which its task reports under.
    fn leased(&self, account: AccountId) -> u64 {
        let lease = self.leases.fetch_add(1, Ordering::Relaxed) + 1;
        self.accounts().insert(account, (lease, false));
        lease
    }

    fn stream(&self, account: AccountId, lease: u64, up: bool) {
        // Only for the account's current lease: a stream ended after its lease
        // was lost, or replaced, must not report the account again.
        if let Some((current, state)) = self.accounts().get_mut(&account)
            && *current == lease
        {
            *state = up;
        }
    }

    fn stream_down(&self) {
        // Saturating: the count is zeroed at shutdown while tasks still end.
        let _ = self
            .streams_up
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    fn unleased(&self, account: AccountId) {
        self.accounts().remove(&account);
    }

    fn unleased_all(&self) {
        self.accounts().clear();
    }
}

/// The gateway: leases accounts and streams each in its own task.
pub struct Gateway {
    store: Arc<dyn Store>,
    leases: Arc<dyn Leases>,
    streams: Arc<dyn UserStream>,
    protector: Arc<Protector>,
    config: GatewayConfig,
    stats: Arc<GatewayStats>,
    rules: RulesPrefetch,
    /// The latest task started per account, numbered: a task let go tells
    /// the store it no longer follows the account only if no later task
    /// follows it meanwhile (its end can come after the next task's start).
    following: Arc<std::sync::Mutex<HashMap<AccountId, u64>>>,
    /// Account tasks started by this gateway: each task's number.
    tasks_started: AtomicU64,
}

impl Gateway {
    /// Wires a gateway.
    pub fn new(
        store: Arc<dyn Store>,
        leases: Arc<dyn Leases>,
        streams: Arc<dyn UserStream>,
        protector: Arc<Protector>,
        config: GatewayConfig,
    ) -> Self {
        Self {
            store,
            leases,
            streams,
            protector,
            config,
            stats: Arc::new(GatewayStats::default()),
            rules: RulesPrefetch::default(),
            following: Arc::default(),
            tasks_started: AtomicU64::new(0),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<GatewayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` completes, then stops every stream and releases
    /// the leases so that another gateway takes the accounts at once.
    ///
    /// # Errors
    /// [`GatewayError::Release`] when the leases could not be released (they
    /// then expire after the lease period).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), GatewayError> {
        let flagger = Flagger::start(
            self.store.clone(),
            self.protector.clock().clone(),
            self.stats.clone(),
        );
        let mut tasks: HashMap<AccountId, Running> = HashMap::new();
        let mut tick = tokio::time::interval(self.config.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let hold = self.config.lease_hold();
        // When the last renewal that went through began. The store set each
        // expiry from its own clock at its statement, after this instant, so
        // every lease held then is ours until `lease_ttl` after it; the
        // accounts are let go `hold` after it, before another gateway can
        // take them.
        let mut renewed_at = Instant::now();
        tokio::pin!(shutdown);
        loop {
            let lapse = renewed_at + hold;
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {}
                () = tokio::time::sleep_until(lapse), if !tasks.is_empty() => {
                    self.lapsed(&mut tasks, renewed_at);
                    continue;
                }
            }
            let began = Instant::now();
            // Bounded by the lapse: a call on a connection gone half-open
            // waits for TCP to give up (about 15 min), while the tasks would
            // go on streaming accounts another gateway takes and the loop
            // would not hear the shutdown. Not shorter: a renewal slowed by a
            // loaded database is slow, not lost, and cut short it would let
            // every account go for nothing. (`store-pg` renews on connections
            // of its own, so fills do not slow it.)
            let bound = if tasks.is_empty() {
                began + hold
            } else {
                lapse
            };
            let renewal = tokio::select! {
                () = &mut shutdown => break,
                renewal = tokio::time::timeout_at(
                    bound,
                    self.leases.renew_leases(&self.config.holder, self.config.lease_ttl),
                ) => renewal,
            };
            match renewal {
                Ok(Ok(held)) => {
                    renewed_at = began;
                    let lost: Vec<AccountId> = tasks
                        .keys()
                        .filter(|id| !held.contains(id))
                        .copied()
                        .collect();
                    for id in lost {
                        if let Some(running) = tasks.remove(&id) {
                            self.stats.unleased(id);
                            self.unfollow(id, running);
                        }
                    }
                    // A task that ended on its own (keys refused, store down) starts again below.
                    tasks.retain(|_, running| !running.task.is_finished());
                    // An account still leased whose task ended (keys refused,
                    // store down, let go at a lapse) starts again.
                    for id in held {
                        tasks.entry(id).or_insert_with(|| {
                            self.spawn_account(id, "stream restarted", &flagger)
                        });
                    }
                }
                failed => {
                    let error = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => format!(
                            "no answer within {:?}",
                            bound.saturating_duration_since(began)
                        ),
                    };
                    warn!(holder = %self.config.holder, %error, "lease renewal failed");
                    if !tasks.is_empty() && Instant::now() >= lapse {
                        self.lapsed(&mut tasks, renewed_at);
                    }
                    continue;
                }
            }
            let room = self.config.max_accounts.saturating_sub(tasks.len());
            if room == 0 {
                continue;
            }
            // Bounded as the renewal. Cut short, it may still have taken
            // leases: the next renewal returns them and starts their tasks.
            let bound = renewed_at + hold;
            let acquired = tokio::select! {
                () = &mut shutdown => break,
                acquired = tokio::time::timeout_at(
                    bound,
                    self.leases.acquire_leases(&self.config.holder, room, self.config.lease_ttl),
                ) => acquired,
            };
            match acquired {
                Ok(Ok(taken)) => {
                    for (id, taken_over) in taken {
                        let why = if taken_over {
                            "lease takeover"
                        } else {
                            "stream started"
                        };
                        info!(account = %id, holder = %self.config.holder, taken_over, "account leased");
                        if let Some(old) = tasks.insert(id, self.spawn_account(id, why, &flagger)) {
                            // Two tasks must not follow one account.
                            old.task.abort();
                        }
                    }
                }
                Ok(Err(err)) => {
                    warn!(holder = %self.config.holder, error = %err, "lease acquisition failed")
                }
                Err(_) => {
                    warn!(holder = %self.config.holder, "lease acquisition failed: no answer in time")
                }
            }
        }
        // Every task first finishes what it holds (within the grace), so a
        // protection claimed but not yet sent goes out now, not after the
        // claim timeout, and the leg trades it queued are written; the flags
        // they owe are written before the leases go.
        let ended: Vec<_> = tasks
            .drain()
            .map(|(id, running)| {
                let _ = running.stop.send(true);
                (id, running.task)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + self.config.drain_grace;
        for (id, mut task) in ended {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                warn!(account = %id, grace = ?self.config.drain_grace, "account task still busy at shutdown, aborted");
                task.abort();
                // Once it has ended: a write in flight could learn the account again.
                let _ = task.await;
            }
            self.store.unfollowed(id);
        }
        if !flagger.flushed(self.config.drain_grace).await {
            warn!(holder = %self.config.holder, "reconcile flags still unwritten at shutdown: the accounts' next holder flags them");
        }
        self.stats.streams_up.store(0, Ordering::Relaxed);
        self.stats.unleased_all();
        // Past the lease period the leases are gone anyway: a release that
        // hangs must not keep the process from ending.
        let ttl = self.config.lease_ttl;
        match tokio::time::timeout(ttl, self.leases.release_leases(&self.config.holder)).await {
            Ok(released) => released.map_err(GatewayError::Release),
            Err(_) => Err(GatewayError::Release(StoreError::Unavailable(format!(
                "releasing the leases of {}: no answer within {ttl:?}",
                self.config.holder
            )))),
        }
    }

    /// Lets every account go: the last renewal that went through began
    /// `hold` ago, and its leases end soon, when another gateway may take
    /// them.
    fn lapsed(&self, tasks: &mut HashMap<AccountId, Running>, renewed_at: Instant) {
        warn!(
            holder = %self.config.holder,
            accounts = tasks.len(),
            since = ?renewed_at.elapsed(),
            ttl = ?self.config.lease_ttl,
            "leases not renewed in time, letting the accounts go"
        );
        for (id, running) in tasks.drain() {
            self.unfollow(id, running);
        }
        self.stats.unleased_all();
    }

    /// Stops following `id`: its task finishes the events it already
    /// received (within the drain grace, then it is aborted) and, once it has
    /// ended (a write it had in flight could otherwise learn the account
    /// again), the store drops what it kept for the stream, decrypted keys
    /// included.
    fn unfollow(&self, id: AccountId, running: Running) {
        let Running {
            mut task,
            stop,
            started,
        } = running;
        let _ = stop.send(true);
        let store = self.store.clone();
        let following = self.following.clone();
        let grace = self.config.drain_grace;
        tokio::spawn(async move {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                warn!(account = %id, ?grace, "account task still busy after its lease moved, aborted");
                task.abort();
                let _ = task.await;
            }
            // Under the lock, so that a task started now follows after this.
            let mut latest = following
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if latest.get(&id) == Some(&started) {
                latest.remove(&id);
                store.unfollowed(id);
            }
        });
    }

    fn spawn_account(&self, account: AccountId, why: &'static str, flagger: &Flagger) -> Running {
        let lease = self.stats.leased(account);
        let started = {
            let mut latest = self
                .following
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Never reused, even once an account's entry is gone: an unfollow
            // still waiting must not take a later task for its own.
            let next = self.tasks_started.fetch_add(1, Ordering::Relaxed);
            latest.insert(account, next);
            // Its new entries may be read ahead of their fills from now on.
            self.store.following(account);
            next
        };
        let (stop, stopped) = watch::channel(false);
        let (books, jobs) = mpsc::channel(BOOKKEEPING_QUEUE);
        let bookkeeper = Bookkeeper {
            account,
            protector: self.protector.clone(),
            stats: self.stats.clone(),
            flagger: flagger.clone(),
            jobs,
            in_hand: false,
        };
        let worker = AccountWorker {
            account,
            store: self.store.clone(),
            flagger: flagger.clone(),
            streams: self.streams.clone(),
            protector: self.protector.clone(),
            stats: self.stats.clone(),
            rules: self.rules.clone(),
            min_backoff: self.config.min_backoff,
            max_backoff: self.config.max_backoff,
            reflag_while_down: self.config.reflag_while_down,
            stopped,
            lease,
            down_flagged_at: None,
            books,
        };
        // One task for both, not a task each: the bookkeeper outlives the
        // stream's sessions (a reopen keeps its queue), ends when the worker
        // is let go and its queue is done, and is dropped with it when the
        // drain grace runs out, so it never writes for an account whose
        // lease this gateway gave up (its next holder recounts the same
        // entries). The worker's end drops its sender, which ends the queue.
        Running {
            task: tokio::spawn(async move {
                tokio::join!(worker.run(why), bookkeeper.run());
            }),
            stop,
            started,
        }
    }
}

/// An account's task, and the way to ask it to stop once the events it
/// holds are handled.
struct Running {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    /// Its number among the tasks this gateway started.
    started: u64,
}

struct AccountWorker {
    account: AccountId,
    store: Arc<dyn Store>,
    flagger: Flagger,
    streams: Arc<dyn UserStream>,
    protector: Arc<Protector>,
    stats: Arc<GatewayStats>,
    rules: RulesPrefetch,
    min_backoff: Duration,
    max_backoff: Duration,
    reflag_while_down: Duration,
    /// Turns true when the account is to be let go.
    stopped: watch::Receiver<bool>,
    /// The number of the lease it follows the account under.
    lease: u64,
    /// When the account was last flagged since its stream was last up (or
    /// since the task began): a stream that fails to open flags it then,
    /// and again each `reflag_while_down` while it stays down.
    down_flagged_at: Option<tokio::time::Instant>,
    /// The account's [`Bookkeeper`]: its queue.
    books: mpsc::Sender<BookJob>,
}

/// Most bookkeeping jobs an account queues before its task waits to queue
/// another. A burst of take-profit trades (entries of one account closing
/// at one price) queues without waiting; a bookkeeper further behind than
/// that slows its stream rather than grow without bound (a thousand
/// accounts hold at most 64,000 small jobs).
const BOOKKEEPING_QUEUE: usize = 64;

/// A leg update's bookkeeping ([`Protector::bookkeep`]), and what names it
/// in the logs.
struct BookJob {
    later: Bookkeeping,
    entry: Option<EntryId>,
    client_id: String,
}

/// Runs an account's bookkeeping (a leg trade's commission, a durable
/// write, then a settled entry's recount) beside its stream, not on it: the
/// account's next event (another entry's fill) must not wait for a
/// commission's transaction. One per account task, one job at a time, in
/// the order the events came: two recounts of one entry at once could
/// write the older result last.
///
/// When the account is let go (shutdown, lease lost or lapsed) the queue is
/// finished, within the drain grace the task has for its events: a leg
/// trade dropped is read again by nobody (sync reads entries' trades, not
/// legs'), so its commission would stay missing from the result. Past the
/// grace the task is aborted and what is left is dropped, with a warning:
/// the leases must go in time, and a trade lost only leaves its entry's
/// `fees_complete` false.
struct Bookkeeper {
    account: AccountId,
    protector: Arc<Protector>,
    stats: Arc<GatewayStats>,
    flagger: Flagger,
    jobs: mpsc::Receiver<BookJob>,
    /// A job taken off the queue and not done.
    in_hand: bool,
}

impl Bookkeeper {
    /// Runs the jobs until the account's worker has ended and none is left.
    async fn run(mut self) {
        while let Some(job) = self.jobs.recv().await {
            self.in_hand = true;
            let span = order_span(self.account, job.entry, &job.client_id);
            if let Err(err) = self.protector.bookkeep(job.later).instrument(span).await {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %self.account, entry = job.entry.map(tracing::field::display), client_id = %job.client_id, error = %err, "result recount failed, flagging for reconciliation");
                self.flagger.flag(self.account, "recount failed");
            }
            self.in_hand = false;
        }
    }
}

impl Drop for Bookkeeper {
    /// Dropped before its queue was done: the account's task was aborted.
    fn drop(&mut self) {
        let left = self.jobs.len() + usize::from(self.in_hand);
        if left > 0 {
            warn!(account = %self.account, left, "bookkeeping dropped with the account's task: leg trades unwritten (their entries' fees_complete stays false), results not recounted");
        }
    }
}

/// How long after a fetch of a symbol's rules began another may begin.
const RULES_RETRY: Duration = Duration::from_secs(30);

/// Fetches a symbol's rules in the background when an entry of it is
/// accepted and the adapter does not hold them: a fill's first write plans
/// only from rules already held, and would otherwise take the long way. In
/// the background, because the account's next events (another entry's fill)
/// must not wait for the exchange; at most one fetch per symbol per
/// [`RULES_RETRY`], because many accounts accepting one new symbol at once
/// would otherwise spend the node's request weight on copies of one answer,
/// and an exchange that does not answer would be asked at every acceptance.
#[derive(Clone, Default)]
struct RulesPrefetch {
    began: Arc<std::sync::Mutex<HashMap<String, tokio::time::Instant>>>,
}

impl RulesPrefetch {
    fn accepted(&self, exchange: &Arc<dyn Exchange>, symbol: &str) {
        if exchange.cached_symbol_rules(symbol).is_some() {
            return;
        }
        {
            let mut began = self
                .began
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = tokio::time::Instant::now();
            if began
                .get(symbol)
                .is_some_and(|at| now.duration_since(*at) < RULES_RETRY)
            {
                return;
            }
            began.insert(symbol.to_owned(), now);
        }
        let exchange = exchange.clone();
        let symbol = symbol.to_owned();
        tokio::spawn(async move {
            // The fill's own round fetches them again and reports a failure.
            if let Err(err) = exchange.symbol_rules(&symbol).await {
                debug!(symbol = %symbol, error = %err, "symbol rules not fetched at acceptance");
            }
        });
    }
}

/// Decrements the up-gauge however the stream ends (error, abort).
struct UpGuard(Arc<GatewayStats>, AccountId, u64);

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.0.stream_down();
        self.0.stream(self.1, self.2, false);
    }
}

impl AccountWorker {
    async fn run(mut self, first_reason: &'static str) {
        let mut backoff = self.min_backoff;
        let mut reason = first_reason;
        loop {
            let began = tokio::time::Instant::now();
            match self.stream_once(reason).await {
                Ok(()) => return,
                Err(ExchangeError::Auth(msg)) => {
                    // Revoked keys: sync's breaker reports the account; do not hammer the exchange.
                    warn!(account = %self.account, error = %msg, "stream refused: keys rejected");
                    backoff = self.max_backoff;
                }
                // The exchange (or the adapter's connection limiter) said when:
                // asking sooner is only refused again, and a ban grows with it.
                Err(ExchangeError::RateLimited { retry_after }) => {
                    warn!(account = %self.account, ?retry_after, "stream rate limited, waiting as told");
                    backoff = retry_after.max(self.min_backoff);
                }
                // A stream that stayed up a while was healthy: this failure
                // starts the backoff over instead of adding to earlier ones.
                Err(err) if began.elapsed() >= self.max_backoff => {
                    warn!(account = %self.account, error = %err, "stream failed");
                    backoff = self.min_backoff;
                }
                Err(err) => {
                    warn!(account = %self.account, error = %err, "stream failed");
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
            reason = "stream reopened";
            tokio::select! {
                _ = self.stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(spread(backoff)) => {}
            }
        }
    }

    /// Opens a stream and handles its events until it fails (`Err`) or the
    /// account is let go (`Ok`, once the events already received are
    /// handled).
    async fn stream_once(&mut self, reason: &'static str) -> Result<(), ExchangeError> {
        let opened = async {
            let creds = self
                .store
                .credentials(self.account)
                .await
                .map_err(|e| ExchangeError::Transient(e.to_string()))?;
            self.streams.open(&creds).await
        }
        .await;
        let mut session = match opened {
            Ok(session) => session,
            Err(err) => {
                // Events are missed until a stream opens, which may take long
                // (rate limits, the exchange down): a lease taken over from a
                // dead gateway must not wait for it to be reconciled. Flagged
                // at the first failure, then again each `reflag_while_down`
                // while it stays down, so that fills missed meanwhile wait for
                // that, not sync's interval; the stream that opens in the end
                // flags it once more.
                let now = tokio::time::Instant::now();
                match self.down_flagged_at {
                    None => {
                        self.down_flagged_at = Some(now);
                        self.flag(reason);
                    }
                    Some(at) if now.duration_since(at) >= self.reflag_while_down => {
                        self.down_flagged_at = Some(now);
                        self.flag("stream still down");
                    }
                    Some(_) => {}
                }
                return Err(err);
            }
        };
        self.down_flagged_at = None;
        self.stats.streams_up.fetch_add(1, Ordering::Relaxed);
        self.stats.stream(self.account, self.lease, true);
        let _up = UpGuard(self.stats.clone(), self.account, self.lease);
        // Nothing is replayed on a stream: whatever happened before this subscription is sync's.
        self.flag(reason);
        // Events already received behind the one in hand, in order.
        let mut pending = VecDeque::new();
        loop {
            let event = match pending.pop_front() {
                Some(event) => event,
                None => {
                    let next = tokio::select! {
                        biased;
                        _ = self.stopped.wait_for(|stop| *stop) => None,
                        event = session.next_event() => Some(event),
                    };
                    match next {
                        None => {
                            // Let go: what already arrived is handled first
                            // (within the drain grace); then nothing more is read.
                            drain_ready(session.as_mut(), &mut pending);
                            match pending.pop_front() {
                                Some(event) => event,
                                None => return Ok(()),
                            }
                        }
                        Some(Ok(event)) => event,
                        // From here until a stream is up again, events are
                        // missed: sync's, at once rather than when (if ever
                        // soon) the stream reopens.
                        Some(Err(err)) => {
                            self.down_flagged_at = Some(tokio::time::Instant::now());
                            self.flag("stream ended");
                            return Err(err);
                        }
                    }
                }
            };
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            match event {
                StreamEvent::Connected => debug!(account = %self.account, "stream subscribed"),
                StreamEvent::Gap { from, to } => {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    warn!(account = %self.account, from = from.0, to = to.0, "stream gap, flagging for reconciliation");
                    self.flag("stream gap");
                }
                StreamEvent::Execution(update) => {
                    let entry = self.entry_of(&update.client_id);
                    if self
                        .superseded(&update, &mut pending, session.as_mut())
                        .await
                    {
                        self.stats.superseded.fetch_add(1, Ordering::Relaxed);
                        debug!(account = %self.account, entry = entry.map(tracing::field::display), client_id = %update.client_id, "order accepted, its next update already here: skipped");
                        continue;
                    }
                    self.execution(&update, entry)
                        .instrument(self.order_span(entry, &update.client_id))
                        .await;
                }
                StreamEvent::List(list) => self.list_update(&list).await,
                StreamEvent::Balances(_) => {}
            }
        }
    }

    /// Whether `update` is an entry's order accepted with nothing filled and a
    /// later update of the same order has already arrived. That update says
    /// at least as much (order id, status, fills), and the store merges it
    /// all the same; writing the acceptance first would only make the fill
    /// behind it wait for one more write. A MARKET entry's acceptance and
    /// fill arrive together, so the stream task gets one turn to hand the
    /// fill over before this decides.
    async fn superseded(
        &self,
        update: &ExecutionUpdate,
        pending: &mut VecDeque<StreamEvent>,
        session: &mut dyn UserStreamSession,
    ) -> bool {
        let acceptance = update.executed_qty.is_zero()
            && matches!(
                self.protector.ids().parse(&update.client_id),
                Some(OrderRole::Entry(_))
            );
        if !acceptance {
            return false;
        }
        let later = |pending: &VecDeque<StreamEvent>| {
            pending
                .iter()
                .any(|e| matches!(e, StreamEvent::Execution(u) if u.client_id == update.client_id))
        };
        drain_ready(session, pending);
        if later(pending) {
            return true;
        }
        tokio::task::yield_now().await;
        drain_ready(session, pending);
        later(pending)
    }

    /// The entry an order of ours belongs to, read from its client id alone
    /// (every one of our ids names its entry); `None` for orders placed by hand.
    fn entry_of(&self, client_id: &str) -> Option<EntryId> {
        self.protector
            .ids()
            .parse(client_id)
            .map(|role| match role {
                OrderRole::Entry(entry) => entry,
                OrderRole::List(key)
                | OrderRole::TakeProfit(key)
                | OrderRole::StopLoss(key)
                | OrderRole::Exit(key) => key.entry,
            })
    }

    /// [`order_span`] on this account.
    fn order_span(&self, entry: Option<EntryId>, client_id: &str) -> tracing::Span {
        order_span(self.account, entry, client_id)
    }

    /// Protects what an order update of `entry` reveals.
    async fn execution(&self, update: &ExecutionUpdate, entry: Option<EntryId>) {
        let result = self
            .protector
            .follow_protecting(self.account, update, Source::Websocket)
            .await;
        let (result, later) = match result {
            Ok((followed, later)) => (Ok(followed), later),
            Err(err) => (Err(err), None),
        };
        match result {
            Ok(Followed::Entry(report)) => {
                self.stats.entry_fills.fetch_add(1, Ordering::Relaxed);
                self.count(&report, &update.client_id, After::Fill).await;
            }
            Ok(Followed::Leg {
                protect: Some(report),
                ..
            }) => {
                self.count(&report, &update.client_id, After::LegEnd).await;
            }
            Ok(Followed::EntryAccepted) if update.status == EntryStatus::New => {
                self.rules
                    .accepted(self.protector.exchange(), &update.symbol);
            }
            Ok(_) => {}
            Err(err) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %self.account, entry = entry.map(tracing::field::display), client_id = %update.client_id, error = %err, "protect failed, flagging for reconciliation");
                self.flag("protect failed");
            }
        }
        // The leg trade's commission and a settled result's recount go to
        // the account's bookkeeper, once protection and its flags are done:
        // neither they nor the account's next event wait for them (a failed
        // trade write is logged and counted by the protector). Waits only
        // while the queue is full.
        if let Some(later) = later {
            let job = BookJob {
                later,
                entry,
                client_id: update.client_id.clone(),
            };
            if self.books.send(job).await.is_err() {
                // The bookkeeper ends only after this worker: not while it runs.
                warn!(account = %self.account, client_id = %update.client_id, "bookkeeper gone, leg trade unrecorded");
            }
        }
    }

    /// A list that ended is looked up (its orders' own events may have been
    /// missed, and an order canceled with nothing executed and no expiry
    /// reason is left to this: `follow` cannot tell it from the take-profit
    /// a triggered stop removed) and whatever it leaves unprotected is
    /// protected again; a lookup that does not show the end flags the
    /// account instead.
    async fn list_update(&self, list: &ListUpdate) {
        if list.executing {
            return;
        }
        let Some(OrderRole::List(key)) = self.protector.ids().parse(&list.list_client_id) else {
            return;
        };
        self.list_ended(list, key)
            .instrument(self.order_span(Some(key.entry), &list.list_client_id))
            .await;
    }

    async fn list_ended(&self, list: &ListUpdate, key: LegKey) {
        let result = async {
            // The client id names an entry, not whose it is: a list of this
            // account whose id reads as another account's entry (an id
            // reused by hand, another deployment sharing the namespace) must
            // not have this account's list, or its absence, applied to that
            // entry's leg.
            match self.store.entry(key.entry).await {
                Ok(entry) if entry.account == self.account => {}
                Ok(_) | Err(StoreError::NotFound { .. }) => {
                    warn!(account = %self.account, entry = %key.entry, client_id = %list.list_client_id, "list end names an entry of another account, ignored");
                    return Ok(None);
                }
                Err(err) => return Err(err.into()),
            }
            let legs = self.store.legs(key.entry).await?;
            let Some(leg) = legs.iter().find(|l| l.key == key && l.state.is_active()) else {
                return Ok(None);
            };
            let creds = self.store.credentials(self.account).await?;
            self.protector.refresh_leg(&creds, leg).await?;
            // `ALL_DONE` says the list ended, but only the lookup tells what it
            // sold, so only the lookup ends the leg. One that failed, or read
            // a database lagging the end (a miss within the claim timeout, or
            // the list still executing), leaves the leg working in the store:
            // `protect` would count its coins covered and label the entry
            // protected while they have no stop. Sync looks it up again.
            let still_working = self
                .store
                .legs(key.entry)
                .await?
                .into_iter()
                .find(|l| l.key == key && l.state.is_active());
            if let Some(leg) = still_working {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %self.account, entry = %key.entry, client_id = %list.list_client_id, "list ended, its lookup did not show the end; flagging for reconciliation");
                // Its stop is gone whatever it sold: the label must not say
                // protected while sync looks it up again. A store that fails
                // here still gets the account flagged, by the error's path.
                self.protector
                    .list_end_unread(key.entry, &leg, Source::Websocket)
                    .await?;
                self.flag("list end unread");
                return Ok(None);
            }
            Ok::<_, oco_core::protect::ProtectError>(Some(
                self.protector
                    .protect(key.entry, None, Source::Websocket)
                    .await?,
            ))
        }
        .await;
        match result {
            Ok(Some(report)) => {
                self.count(&report, &list.list_client_id, After::LegEnd)
                    .await;
            }
            Ok(None) => {}
            Err(err) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %self.account, entry = %key.entry, client_id = %list.list_client_id, error = %err, "list follow-up failed, flagging");
                self.flag("list follow-up failed");
            }
        }
    }

    /// Counts a `protect` call made `after` an event, and flags the account
    /// when the call left protection incomplete.
    async fn count(&self, report: &ProtectReport, client_id: &str, after: After) {
        let outcome = &report.outcome;
        match outcome {
            ProtectOutcome::Placed { legs, .. } => {
                self.stats
                    .placements
                    .fetch_add(legs.len() as u64, Ordering::Relaxed);
                info!(account = %self.account, entry = %report.entry, client_id, legs = legs.len(), "protected from the stream");
            }
            // A refused or unanswered placement, or re-planning rounds that ran
            // out, must not wait for the next full pass.
            ProtectOutcome::Failed { .. }
            | ProtectOutcome::Pending { .. }
            | ProtectOutcome::Nothing(Idle::Busy) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %self.account, entry = %report.entry, client_id, ?outcome, "protection incomplete, flagging for reconciliation");
                self.flag("protection incomplete");
            }
            // Another caller holds a fresh claim and places, unless it died:
            // then only a lookup once the claim is stale finds out. Check again
            // then rather than leave it to sync's next full pass.
            ProtectOutcome::Nothing(Idle::InFlight) => {
                self.recheck_later(report.entry, client_id, after);
            }
            _ => {}
        }
    }

    /// After the claim timeout, flags the account for sync if `entry` is
    /// still unprotected (sync looks the stale claim up and protects).
    ///
    /// After a leg's end, always: the position changed under a generation
    /// planned before, and whether its placer saw the change does not show
    /// in the label or the claims once it is done (a placer that did not
    /// see it leaves the entry `Protected`, every claim recorded, and the
    /// ended list's coins without a stop). Sync looks at the legs
    /// themselves; a leg ending under a placement in flight is rare, and a
    /// flag costs one account pass.
    fn recheck_later(&self, entry: EntryId, client_id: &str, after: After) {
        let (store, flagger, account) = (self.store.clone(), self.flagger.clone(), self.account);
        let client_id = client_id.to_owned();
        let wait = self.protector.claim_timeout() + Duration::from_secs(1);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if after == After::LegEnd {
                warn!(account = %account, entry = %entry, client_id, "a leg ended while another caller's placement was in flight, flagging for reconciliation");
                flagger.flag(account, "leg ended while a placement was in flight");
            } else if !oco_core::protect::claims_settled(store.as_ref(), entry).await {
                warn!(account = %account, entry = %entry, client_id, "claim of another caller never completed, flagging for reconciliation");
                flagger.flag(account, "claim never completed");
            }
        });
    }

    fn flag(&self, reason: &str) {
        self.flagger.flag(self.account, reason);
    }
}

/// What a `protect` call the gateway counts followed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// An entry's fill.
    Fill,
    /// A leg that ended (its order's update, or its list's end): the
    /// position changed under whatever generation was planned before.
    LegEnd,
}

/// Lines logged while an order is followed (by `protect`, the leg lookups,
/// the exchange adapter, its bookkeeping) do not all know the account or
/// the entry: this span names them on every line.
fn order_span(account: AccountId, entry: Option<EntryId>, client_id: &str) -> tracing::Span {
    info_span!(
        "order",
        account = %account,
        entry = entry.map(tracing::field::display),
        client_id,
    )
}

/// A reopen wait of `d` made somewhere between `d` and a half more, at
/// random: accounts whose streams failed together (a connection of a hundred
/// of them, an exchange incident) must not all subscribe again in the same
/// instant, each wave spending the node's request weight at once. Never
/// shorter than `d`, which may be a wait the exchange asked for.
fn spread(d: Duration) -> Duration {
    use rand::Rng;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms.saturating_add(rand::rng().random_range(0..=ms / 2)))
}

/// Most flags in one write.
const MAX_FLAGS_PER_WRITE: usize = 500;

/// Longest a flag write may take before it counts as failed and is retried:
/// a connection that hangs must not hold every owed flag back.
const FLAG_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// First wait before flags whose write failed are written again; doubles up
/// to [`FLAG_RETRY_MAX`], and starts over after a write goes through.
const FLAG_RETRY_MIN: Duration = Duration::from_millis(250);

/// Longest wait between two attempts to write owed flags.
const FLAG_RETRY_MAX: Duration = Duration::from_secs(5);

/// The account workers' reconcile flags, written by one task. A worker hands
/// its flag over and goes back to its stream at once: a flag waits for the
/// database, a fill must not. The task owes each account its flag until a
/// write of it commits, retrying with a backoff while the database is down
/// or slow, so a gap that came while the database was unreachable is still
/// flagged once it is back. Whatever queued while a write was in flight goes
/// into the next one: a gateway that opens a thousand streams at start (each
/// flagged once open: nothing is replayed on a stream) writes a few
/// statements, not a thousand durable commits and notifications at once.
#[derive(Clone)]
struct Flagger {
    tx: mpsc::UnboundedSender<FlagMessage>,
}

enum FlagMessage {
    /// Flag this account, for this reason (the latest reason owed wins).
    Flag(AccountId, String),
    /// Answer once nothing is owed.
    Flushed(oneshot::Sender<()>),
}

/// How a write of owed flags ended.
enum Written {
    /// Every flag committed, or was refused for good.
    Done,
    /// The database could not take them: owed still.
    Retry,
}

impl Flagger {
    /// Starts the writer; it stops when every handle is dropped, after one
    /// last attempt at what it still owes.
    fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>, stats: Arc<GatewayStats>) -> Self {
        Self::start_on(Arc::new(StoreFlags(store)), clock, stats)
    }

    /// [`Flagger::start`] writing to any sink.
    fn start_on(sink: Arc<dyn FlagSink>, clock: Arc<dyn Clock>, stats: Arc<GatewayStats>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_flags(rx, sink, clock, stats));
        Self { tx }
    }

    /// Owes `account` a flag; the writer task writes it.
    fn flag(&self, account: AccountId, reason: &str) {
        // The writer outlives every handle, so this cannot fail while the
        // gateway runs; a flag sent after it stopped has no stream to cover.
        let _ = self.tx.send(FlagMessage::Flag(account, reason.to_owned()));
    }

    /// Waits until every flag handed over before this call is written (or
    /// refused for good). `false` when `within` ran out first.
    async fn flushed(&self, within: Duration) -> bool {
        let (done, answer) = oneshot::channel();
        if self.tx.send(FlagMessage::Flushed(done)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, answer).await, Ok(Ok(())))
    }
}

/// Where [`Flagger`] writes: the store's two flag writes, so that the
/// writer's retries can be tested against a sink that fails on demand.
trait FlagSink: Send + Sync {
    /// [`Store::flag_reconcile_many`].
    fn flag_many<'a>(
        &'a self,
        flags: &'a [(AccountId, String)],
        at: oco_core::Millis,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// [`Store::flag_reconcile`].
    fn flag_one<'a>(
        &'a self,
        account: AccountId,
        reason: &'a str,
        at: oco_core::Millis,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The gateway's store as a [`FlagSink`].
struct StoreFlags(Arc<dyn Store>);

impl FlagSink for StoreFlags {
    fn flag_many<'a>(
        &'a self,
        flags: &'a [(AccountId, String)],
        at: oco_core::Millis,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.flag_reconcile_many(flags, at)
    }

    fn flag_one<'a>(
        &'a self,
        account: AccountId,
        reason: &'a str,
        at: oco_core::Millis,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.flag_reconcile(account, reason, at)
    }
}

/// The writer task of [`Flagger`].
async fn write_flags(
    mut rx: mpsc::UnboundedReceiver<FlagMessage>,
    store: Arc<dyn FlagSink>,
    clock: Arc<dyn Clock>,
    stats: Arc<GatewayStats>,
) {
    let mut owed: BTreeMap<AccountId, String> = BTreeMap::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut retry = FLAG_RETRY_MIN;
    let mut open = true;
    let take = |message: FlagMessage,
                owed: &mut BTreeMap<AccountId, String>,
                waiting: &mut Vec<oneshot::Sender<()>>| match message {
        FlagMessage::Flag(account, reason) => {
            owed.insert(account, reason);
        }
        FlagMessage::Flushed(done) => waiting.push(done),
    };
    loop {
        if owed.is_empty() {
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            if !open {
                return;
            }
            match rx.recv().await {
                Some(message) => take(message, &mut owed, &mut waiting),
                None => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(message) => take(message, &mut owed, &mut waiting),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        stats.flags_owed.store(owed.len() as u64, Ordering::Relaxed);
        if owed.is_empty() {
            continue;
        }
        let batch: Vec<(AccountId, String)> = owed
            .iter()
            .take(MAX_FLAGS_PER_WRITE)
            .map(|(account, reason)| (*account, reason.clone()))
            .collect();
        let (written, retried) = write_batch(store.as_ref(), &batch, clock.now(), &stats).await;
        for account in written {
            owed.remove(&account);
        }
        stats.flags_owed.store(owed.len() as u64, Ordering::Relaxed);
        match retried {
            Written::Done => retry = FLAG_RETRY_MIN,
            Written::Retry if !open => {
                warn!(
                    owed = owed.len(),
                    "gateway stopped with reconcile flags unwritten: the accounts' next holder flags them when it subscribes"
                );
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
                return;
            }
            Written::Retry => {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(FLAG_RETRY_MAX);
            }
        }
    }
}

/// Writes `batch` in one statement; when the store refuses it for one
/// account (unknown, deactivated), each alone, so that the others still get
/// theirs. Returns the accounts whose flag is settled (written, or refused
/// for good) and whether any must be written again.
async fn write_batch(
    store: &dyn FlagSink,
    batch: &[(AccountId, String)],
    now: oco_core::Millis,
    stats: &GatewayStats,
) -> (Vec<AccountId>, Written) {
    let all = || batch.iter().map(|(account, _)| *account).collect();
    stats.flag_writes.fetch_add(1, Ordering::Relaxed);
    let refused = match tokio::time::timeout(FLAG_WRITE_TIMEOUT, store.flag_many(batch, now)).await
    {
        Ok(Ok(())) => {
            stats.flags.fetch_add(batch.len() as u64, Ordering::Relaxed);
            return (all(), Written::Done);
        }
        Ok(Err(StoreError::Unavailable(err))) => err,
        Ok(Err(err)) => {
            return write_each(store, batch, now, stats, &err).await;
        }
        Err(_) => format!("no answer within {FLAG_WRITE_TIMEOUT:?}"),
    };
    stats.flag_failures.fetch_add(1, Ordering::Relaxed);
    warn!(accounts = batch.len(), error = %refused, "reconcile flags not written, retrying");
    (Vec::new(), Written::Retry)
}

/// [`write_batch`]'s fallback: one write per flag.
async fn write_each(
    store: &dyn FlagSink,
    batch: &[(AccountId, String)],
    now: oco_core::Millis,
    stats: &GatewayStats,
    why: &StoreError,
) -> (Vec<AccountId>, Written) {
    debug!(accounts = batch.len(), error = %why, "flag batch refused, writing each alone");
    let mut settled = Vec::with_capacity(batch.len());
    let mut again = Written::Done;
    for (account, reason) in batch {
        stats.flag_writes.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(FLAG_WRITE_TIMEOUT, store.flag_one(*account, reason, now)).await
        {
            Ok(Ok(())) => {
                stats.flags.fetch_add(1, Ordering::Relaxed);
                settled.push(*account);
            }
            Ok(Err(StoreError::Unavailable(err))) => {
                stats.flag_failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %account, error = %err, "reconcile flag not written, retrying");
                again = Written::Retry;
            }
            Ok(Err(err)) => {
                // Refused for good (the account is gone): writing it again
                // would be refused again.
                stats.flag_failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %account, error = %err, reason = %reason, "reconcile flag refused");
                settled.push(*account);
            }
            Err(_) => {
                stats.flag_failures.fetch_add(1, Ordering::Relaxed);
                warn!(account = %account, timeout = ?FLAG_WRITE_TIMEOUT, "reconcile flag not written in time, retrying");
                again = Written::Retry;
            }
        }
    }
    (settled, again)
}

/// Moves every event that has already arrived into `pending`. An error stops
/// the draining; the session returns it again from `next_event`, after the
/// events before it.
fn drain_ready(session: &mut dyn UserStreamSession, pending: &mut VecDeque<StreamEvent>) {
    while let Some(Ok(event)) = session.ready_event() {
        pending.push_back(event);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use oco_core::mem::MemStore;
    use oco_core::ports::{ApiCredentials, NewAccount};
    use oco_core::{ProtectionConfig, SystemClock};
    use secrecy::SecretString;

    #[tokio::test(flavor = "current_thread")]
    async fn flags_queued_together_share_a_write_and_each_lands() {
        let store = Arc::new(MemStore::new());
        let mut accounts = Vec::new();
        for i in 0..200 {
            let account = store
                .create_account(NewAccount {
                    owner: "o".into(),
                    exchange: "binance".into(),
                    credentials: ApiCredentials {
                        api_key: format!("key-{i}"),
                        secret: SecretString::from("s"),
                    },
                    protection: ProtectionConfig::DEFAULT,
                })
                .await
                .unwrap();
            accounts.push(account.id);
        }
        let stats = Arc::new(GatewayStats::default());
        let flagger = Flagger::start(store.clone(), Arc::new(SystemClock), stats.clone());

        for account in &accounts {
            flagger.flag(*account, "stream opened");
        }
        assert!(flagger.flushed(Duration::from_secs(10)).await);

        let s = stats.snapshot();
        assert_eq!(s.flags, 200);
        assert!(
            s.flag_writes < 20,
            "200 flags queued together took {} writes",
            s.flag_writes
        );
        assert_eq!(s.flags_owed, 0);
        let mut taken = store.take_flagged(1000).await.unwrap();
        taken.sort();
        assert_eq!(taken, accounts, "every account flagged once");
        // An account the store refuses is given up alone; the others still land.
        let unknown = AccountId(accounts[199].0 + 1_000);
        flagger.flag(unknown, "x");
        flagger.flag(accounts[0], "y");
        assert!(flagger.flushed(Duration::from_secs(10)).await);
        assert_eq!(store.take_flagged(10).await.unwrap(), vec![accounts[0]]);
        let s = stats.snapshot();
        assert_eq!((s.flag_failures, s.flags_owed), (1, 0), "{s:?}");
    }

    /// A sink whose writes fail while `down`, and hang while `hang` (each
    /// call counted); it keeps what it wrote.
    #[derive(Default)]
    struct Flaky {
        down: std::sync::atomic::AtomicBool,
        hang: std::sync::atomic::AtomicBool,
        calls: AtomicU64,
        written: std::sync::Mutex<Vec<(AccountId, String)>>,
    }

    impl Flaky {
        fn write(&self, flags: &[(AccountId, String)]) -> BoxFuture<'_, Result<(), StoreError>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.hang.load(Ordering::Relaxed) {
                return Box::pin(std::future::pending());
            }
            if self.down.load(Ordering::Relaxed) {
                return Box::pin(async {
                    Err(StoreError::Unavailable("connection refused".into()))
                });
            }
            self.written.lock().unwrap().extend_from_slice(flags);
            Box::pin(async { Ok(()) })
        }

        fn written(&self) -> Vec<(AccountId, String)> {
            let mut written = self.written.lock().unwrap().clone();
            written.sort();
            written
        }
    }

    impl FlagSink for Flaky {
        fn flag_many<'a>(
            &'a self,
            flags: &'a [(AccountId, String)],
            _at: oco_core::Millis,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            self.write(flags)
        }

        fn flag_one<'a>(
            &'a self,
            account: AccountId,
            reason: &'a str,
            _at: oco_core::Millis,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            self.write(&[(account, reason.to_owned())])
        }
    }

    #[test]
    fn accounts_are_held_past_the_next_renewal_and_let_go_before_the_lease_ends() {
        let hold = |renew: u64, ttl: u64| {
            let mut c = GatewayConfig::standard("gw");
            c.renew_every = Duration::from_secs(renew);
            c.lease_ttl = Duration::from_secs(ttl);
            c.lease_hold()
        };
        // One interval's margin when the period leaves room for it.
        assert_eq!(hold(10, 30), Duration::from_secs(20));
        assert_eq!(hold(1, 3), Duration::from_secs(2));
        // Otherwise half of what is left past one interval.
        assert_eq!(hold(20, 30), Duration::from_secs(25));
        for ttl in 2..60 {
            for renew in 1..ttl {
                let h = hold(renew, ttl);
                assert!(
                    h > Duration::from_secs(renew) && h < Duration::from_secs(ttl),
                    "renew {renew} s, ttl {ttl} s: hold {h:?}"
                );
            }
        }
    }

    #[test]
    fn reopen_waits_are_spread_and_never_shortened() {
        let d = Duration::from_millis(1000);
        let waits: Vec<Duration> = (0..200).map(|_| spread(d)).collect();
        assert!(
            waits.iter().all(|w| *w >= d && *w <= d * 3 / 2),
            "{waits:?}"
        );
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(
            distinct.len() > 50,
            "spread: {} distinct of 200",
            distinct.len()
        );
        assert_eq!(spread(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_task_of_an_earlier_lease_does_not_report_the_account_of_a_later_one() {
        let stats = Arc::new(GatewayStats::default());
        let account = AccountId(7);
        let first = stats.leased(account);
        stats.streams_up.fetch_add(1, Ordering::Relaxed);
        stats.stream(account, first, true);
        let old = UpGuard(stats.clone(), account, first);
        // Leased again (the task replaced); the new stream is up before the
        // old task's guard drops.
        let second = stats.leased(account);
        stats.streams_up.fetch_add(1, Ordering::Relaxed);
        stats.stream(account, second, true);
        drop(old);
        assert_eq!(stats.stream_states(), vec![(account, true)]);
        assert_eq!(stats.snapshot().streams_up, 1);
        // At shutdown the count is zeroed while guards still drop.
        stats.streams_up.store(0, Ordering::Relaxed);
        drop(UpGuard(stats.clone(), account, second));
        assert_eq!(stats.snapshot().streams_up, 0);
        assert_eq!(stats.stream_states(), vec![(account, false)]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn flags_owed_while_the_store_is_down_are_written_once_it_is_back() {
        let sink = Arc::new(Flaky::default());
        sink.down.store(true, Ordering::Relaxed);
        let stats = Arc::new(GatewayStats::default());
        let flagger = Flagger::start_on(sink.clone(), Arc::new(SystemClock), stats.clone());

        flagger.flag(AccountId(1), "stream gap");
        flagger.flag(AccountId(2), "protect failed");
        flagger.flag(AccountId(1), "stream reopened");
        // Retried with a backoff while the store refuses: owed, not dropped.
        assert!(!flagger.flushed(Duration::from_secs(20)).await);
        let s = stats.snapshot();
        assert!(s.flag_failures >= 3, "{s:?}");
        assert!(
            sink.calls.load(Ordering::Relaxed) < 20,
            "retries back off: {} calls in 20 s",
            sink.calls.load(Ordering::Relaxed)
        );
        assert_eq!(s.flags_owed, 2);
        assert!(sink.written().is_empty());

        sink.down.store(false, Ordering::Relaxed);
        assert!(flagger.flushed(Duration::from_secs(10)).await);
        assert_eq!(
            sink.written(),
            vec![
                (AccountId(1), "stream reopened".to_owned()),
                (AccountId(2), "protect failed".to_owned()),
            ]
        );
        assert_eq!(stats.snapshot().flags_owed, 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_flag_write_that_never_answers_is_given_up_and_written_again() {
        let sink = Arc::new(Flaky::default());
        sink.hang.store(true, Ordering::Relaxed);
        let stats = Arc::new(GatewayStats::default());
        let flagger = Flagger::start_on(sink.clone(), Arc::new(SystemClock), stats.clone());

        flagger.flag(AccountId(7), "stream gap");
        assert!(!flagger.flushed(FLAG_WRITE_TIMEOUT / 2).await);
        sink.hang.store(false, Ordering::Relaxed);
        assert!(flagger.flushed(FLAG_WRITE_TIMEOUT * 2).await);
        assert_eq!(
            sink.written(),
            vec![(AccountId(7), "stream gap".to_owned())]
        );
        assert_eq!(sink.calls.load(Ordering::Relaxed), 2);
        assert_eq!(stats.snapshot().flag_failures, 1);
    }
}
