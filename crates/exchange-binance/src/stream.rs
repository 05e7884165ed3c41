//! [`BinanceUserStream`]: the user-data stream over the WebSocket API
//! (`userDataStream.subscribe.signature`; the listenKey endpoints are
//! retired).
//!
//! A session is one subscription on a shared connection. A connection
//! carries up to [`StreamConfig::subscriptions_per_connection`] of them; a
//! new session joins the first connection with room, or opens another. One
//! task per connection owns the socket: it sends the subscribe and
//! unsubscribe requests (matched to their answers by request id), hands each
//! event to its session's bounded channel by `subscriptionId` without ever
//! waiting for a consumer (a session that falls a full buffer behind is
//! ended alone), answers pings, pings the server itself, detects a silent
//! stall, reconnects before the age limit and on `serverShutdown`, resubscribes
//! a single subscription after its `eventStreamTerminated`, backs off with
//! jitter, and reports every interruption to each session as a gap.
//!
//! Nothing the task waits for is unbounded, since a session that silently
//! stops receiving leaves fills unprotected: a request unanswered within
//! [`StreamConfig::connect_timeout`], a send not taken within
//! [`StreamConfig::stall_timeout`] or a frame that is not JSON breaks the
//! connection (every session then gets a gap), and a session whose
//! resubscription keeps failing, or that is not resubscribed within three
//! connect timeouts of losing its subscription for any reason (connections
//! that open and drop again before answering, a rate limit's hold), is
//! ended with the last error.
//!
//! Every connection attempt of the process, first or reconnect, goes through
//! one limiter ([`StreamConfig::connect_attempts`] per
//! [`StreamConfig::connect_window`], spread out), and a handshake refused
//! with 429/418 holds back all of them for its `Retry-After`, as does any
//! answer on a connection refused with 429/418 (subscribes wait too):
//! Binance counts connection attempts and requests per IP and answers
//! persistent excess with an IP ban that would stop REST order placement
//! too.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use oco_core::ports::{StreamEvent, UserStream, UserStreamSession};
use oco_core::{ApiCredentials, ExchangeError, Millis};
use rand::Rng;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::config::{BinanceConfig, StreamConfig};
use crate::error::BinanceError;
use crate::pacing::Pacer;
use crate::rest::{BinanceExchange, install_crypto_provider, map_ws_error, retry_after};
use crate::sign::ws_signature;
use crate::wire::{Decoded, WsError, WsFrame, decode_event, is_known_event};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;

/// A connection takes no new subscriptions once the server has handed out
/// this many ids on it (Binance: 65,535 per connection, then `-2042`); the
/// rest is headroom for resubscribing the ones it carries.
const RETIRE_AFTER_IDS: i64 = 60_000;
/// Wait after a handshake refused with 429 and no `Retry-After`.
const HANDSHAKE_429_WAIT: Duration = Duration::from_secs(60);
/// Wait after a handshake refused with 418 and no `Retry-After` (Binance's
/// shortest ban).
const HANDSHAKE_418_WAIT: Duration = Duration::from_secs(120);
/// A confirmed session whose resubscription fails this many times in a
/// row, or that is not resubscribed within this many connect timeouts of
/// losing its subscription, is ended with the last error: the gateway then
/// reopens it and sends the account to reconciliation, rather than the
/// session waiting unseen for a server that keeps refusing, a connection
/// that keeps dropping before it answers, or a rate limit's hold.
const RESUBSCRIBE_TRIES: u32 = 3;
/// Request weight of a connection and of each subscribe or unsubscribe.
const WS_WEIGHT: u32 = 2;

/// Opens user-data streams on Binance's WebSocket API. Cheap to clone;
/// clones share the connections and the connection-attempt limiter, so a
/// process should build one and share it.
#[derive(Debug, Clone)]
pub struct BinanceUserStream {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    url: String,
    recv_window: Duration,
    cfg: StreamConfig,
    /// Server time minus local time, learnt after a `-1021`.
    offset_ms: AtomicI64,
    limiter: ConnectLimiter,
    pool: Mutex<Pool>,
    /// The REST adapter's request-weight pacer, when shared: the WebSocket
    /// API's weight counts against the same per-IP budget.
    weight: Option<Arc<Pacer>>,
}

impl BinanceUserStream {
    /// Checks the WebSocket API URL and the stream settings.
    ///
    /// # Errors
    /// [`BinanceError::BadUrl`] when it is not a `ws://` or `wss://` URL;
    /// [`BinanceError::BadConfig`] for a stream setting out of its range.
    pub fn new(config: BinanceConfig) -> Result<Self, BinanceError> {
        Self::build(config, None)
    }

    /// As [`BinanceUserStream::new`], charging the stream's request weight
    /// (2 per connection, subscribe and unsubscribe) to `exchange`'s pacer,
    /// so that REST requests leave room for it. The stream never waits for
    /// that pacer: its own limiter bounds what it spends.
    ///
    /// # Errors
    /// As [`BinanceUserStream::new`].
    pub fn sharing_weight_with(
        config: BinanceConfig,
        exchange: &BinanceExchange,
    ) -> Result<Self, BinanceError> {
        Self::build(config, Some(exchange.pacer()))
    }

    fn build(config: BinanceConfig, weight: Option<Arc<Pacer>>) -> Result<Self, BinanceError> {
        let url = url::Url::parse(&config.ws_api_url).map_err(|e| BinanceError::BadUrl {
            what: "websocket api",
            url: config.ws_api_url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "ws" | "wss") {
            return Err(BinanceError::BadUrl {
                what: "websocket api",
                url: config.ws_api_url.clone(),
                reason: "scheme must be ws or wss".into(),
            });
        }
        config.stream.validate()?;
        install_crypto_provider();
        Ok(Self {
            shared: Arc::new(Shared {
                url: config.ws_api_url,
                recv_window: config.recv_window,
                limiter: ConnectLimiter::new(&config.stream),
                cfg: config.stream,
                offset_ms: AtomicI64::new(0),
                pool: Mutex::new(Pool::default()),
                weight,
            }),
        })
    }
}

impl BinanceUserStream {
    /// Connections open or being opened, for metrics and tests.
    pub fn connections(&self) -> usize {
        self.shared.pool().conns.len()
    }
}

#[async_trait]
impl UserStream for BinanceUserStream {
    /// Subscribes on a shared connection and returns once the subscription
    /// is confirmed, so refused keys come back here as
    /// [`ExchangeError::Auth`]; later failures resubscribe inside. A
    /// connection attempt held back longer than `connect_timeout` (the
    /// limiter, or a 429's `Retry-After`) comes back as
    /// [`ExchangeError::RateLimited`].
    async fn open(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Box<dyn UserStreamSession>, ExchangeError> {
        let (tx, rx) = mpsc::channel(self.shared.cfg.buffer.max(1));
        let end = Arc::new(OnceLock::new());
        let (reply, confirmed) = oneshot::channel();
        let slot = Slot {
            creds: creds.clone(),
            tx,
            end: end.clone(),
            reply: Some(reply),
            state: SlotState::Wanted,
            gap_from: None,
            resynced: false,
            retry_backoff: self.shared.cfg.backoff_initial,
            not_before: None,
            failures: 0,
            last_error: None,
        };
        let member = Shared::join(&self.shared, slot);
        // The limiter may hold the connection up to `connect_timeout`, then
        // the handshake and the subscription have as long again.
        let patience = self.shared.cfg.connect_timeout * 2;
        match timeout(patience, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(Box::new(BinanceStreamSession {
                rx,
                end,
                ended: None,
                _member: member,
            })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ExchangeError::Transient(
                "user-data connection ended before the subscription was confirmed".into(),
            )),
            Err(_) => Err(ExchangeError::Transient(format!(
                "user-data subscription not confirmed within {patience:?}"
            ))),
        }
    }
}

/// One account's stream: a subscription on a shared connection. Dropping
/// it unsubscribes; the connection closes when its last session goes.
#[derive(Debug)]
pub struct BinanceStreamSession {
    rx: mpsc::Receiver<StreamEvent>,
    /// Why the connection task ended this subscription; read once the
    /// events it delivered before are drained.
    end: Arc<OnceLock<ExchangeError>>,
    ended: Option<ExchangeError>,
    _member: Membership,
}

impl BinanceStreamSession {
    fn finish(&mut self) -> ExchangeError {
        let e = self.end.get().cloned().unwrap_or_else(|| {
            ExchangeError::Transient("user-data stream connection task ended".into())
        });
        self.ended = Some(e.clone());
        e
    }
}

#[async_trait]
impl UserStreamSession for BinanceStreamSession {
    async fn next_event(&mut self) -> Result<StreamEvent, ExchangeError> {
        if let Some(e) = &self.ended {
            return Err(e.clone());
        }
        match self.rx.recv().await {
            Some(ev) => Ok(ev),
            None => Err(self.finish()),
        }
    }

    fn ready_event(&mut self) -> Option<Result<StreamEvent, ExchangeError>> {
        if self.ended.is_some() {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev) => Some(Ok(ev)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(self.finish())),
        }
    }
}

// ------------------------------------------------------------------ pool

/// The connections that take new sessions.
#[derive(Debug, Default)]
struct Pool {
    conns: Vec<Entry>,
    next_conn: u64,
    next_slot: u64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// API keys of the sessions on it: Binance allows one subscription per
    /// account per connection.
    keys: HashSet<String>,
    /// Set by the connection task once its subscription ids run low.
    retired: Arc<AtomicBool>,
}

/// A session's place on a connection; dropping it leaves.
#[derive(Debug)]
struct Membership {
    shared: Arc<Shared>,
    conn: u64,
    slot: u64,
    api_key: String,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.shared.leave(self.conn, self.slot, &self.api_key);
    }
}

impl Shared {
    fn pool(&self) -> MutexGuard<'_, Pool> {
        // A poisoned lock only means a panic elsewhere mid-update of plain
        // bookkeeping; the pool stays usable.
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `slot` on a connection with room, opening one if none has.
    /// Joining under the pool's lock means a connection is never closed
    /// while a session is on its way to it.
    fn join(this: &Arc<Self>, slot: Slot) -> Membership {
        let api_key = slot.creds.api_key.clone();
        let mut pool = this.pool();
        let key = pool.next_slot;
        pool.next_slot += 1;
        let per = this.cfg.subscriptions_per_connection;
        let mut cmd = Cmd::Join {
            key,
            slot: Box::new(slot),
        };
        let mut idx = 0;
        // A second try only when the connection picked died meanwhile; if
        // even a new one is gone at once (the runtime is shutting down),
        // the slot and its reply are dropped and `open` fails.
        for _ in 0..2 {
            // A connection task that is gone (its runtime shut down, or it
            // panicked) would take every later session and answer none.
            pool.conns.retain(|e| {
                let alive = !e.cmds.is_closed();
                if !alive {
                    warn!(
                        conn = e.id,
                        "user-data connection task gone, leaving the pool"
                    );
                }
                alive
            });
            let found = pool.conns.iter().position(|e| {
                e.keys.len() < per
                    && !e.retired.load(Ordering::Relaxed)
                    && !e.keys.contains(&api_key)
            });
            idx = match found {
                Some(i) => i,
                None => {
                    let id = pool.next_conn;
                    pool.next_conn += 1;
                    let (cmds, rx) = mpsc::unbounded_channel();
                    let retired = Arc::new(AtomicBool::new(false));
                    tokio::spawn(Conn::new(id, this.clone(), rx, retired.clone()).run());
                    debug!(conn = id, "user-data connection added");
                    pool.conns.push(Entry {
                        id,
                        cmds,
                        keys: HashSet::new(),
                        retired,
                    });
                    pool.conns.len() - 1
                }
            };
            match pool.conns[idx].cmds.send(cmd) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => cmd = back,
            }
        }
        let entry = &mut pool.conns[idx];
        entry.keys.insert(api_key.clone());
        Membership {
            shared: this.clone(),
            conn: entry.id,
            slot: key,
            api_key,
        }
    }

    fn leave(&self, conn: u64, slot: u64, api_key: &str) {
        let mut pool = self.pool();
        let Some(idx) = pool.conns.iter().position(|e| e.id == conn) else {
            return;
        };
        let entry = &mut pool.conns[idx];
        entry.keys.remove(api_key);
        let _sent = entry.cmds.send(Cmd::Leave(slot));
        if entry.keys.is_empty() {
            let entry = pool.conns.remove(idx);
            let _sent = entry.cmds.send(Cmd::Close);
            debug!(conn, "user-data connection closing: its last session left");
        }
    }

    fn server_now_ms(&self) -> i64 {
        now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// The IP is banned (418) for `wait`, until `until_ms` by the server's
    /// clock when the server said so: REST requests sharing the weight
    /// pacer and every connection attempt wait it out, since each refused
    /// request lengthens the ban.
    fn banned(&self, wait: Duration, until_ms: Option<i64>) {
        warn!(
            ?wait,
            "binance banned this IP, holding back requests and connections"
        );
        self.limiter.hold(Instant::now(), wait);
        if let Some(p) = &self.weight {
            let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
            p.block_until(until_ms.unwrap_or_else(|| self.server_now_ms().saturating_add(ms)));
        }
    }

    /// An answer refused with 429/418 holds back every connection attempt
    /// and every subscribe of the process (a 418 its REST requests too), as
    /// a refused handshake does: Binance counts them all against the IP,
    /// and each request sent into a ban lengthens it. Returns the wait, or
    /// `None` for an answer that is no rate limit.
    fn rate_limited(&self, status: Option<u16>, err: &WsError) -> Option<Duration> {
        let data = err.data.as_ref();
        let until = data.and_then(|d| d.retry_after);
        let banned = status == Some(418);
        if !banned && status != Some(429) && until.is_none() {
            return None;
        }
        let wait = match until {
            Some(until) => self.server_wait(until, data.and_then(|d| d.server_time)),
            None if banned => HANDSHAKE_418_WAIT,
            None => HANDSHAKE_429_WAIT,
        };
        if banned {
            self.banned(wait, until);
        } else {
            warn!(
                ?wait,
                code = err.code,
                "binance rate-limited a user-data request, holding back connections"
            );
            self.limiter.hold(Instant::now(), wait);
        }
        Some(wait)
    }

    /// The wait a 429/418 answer asks for. Its `retryAfter` is the
    /// server's time, so it is measured against the server's clock: the
    /// answer's own `serverTime`, else ours corrected by the known offset.
    /// A local clock ahead of the server's would otherwise read it as
    /// already past.
    fn server_wait(&self, retry_after_ms: i64, server_time_ms: Option<i64>) -> Duration {
        if let Some(server) = server_time_ms {
            self.offset_ms.store(server - now_ms(), Ordering::Relaxed);
        }
        let now = server_time_ms.unwrap_or_else(|| self.server_now_ms());
        Duration::from_millis(u64::try_from(retry_after_ms.saturating_sub(now)).unwrap_or(0))
    }

    fn charge_weight(&self, weight: u32) {
        if let Some(p) = &self.weight {
            p.charge(self.server_now_ms(), weight);
        }
    }
}

// ------------------------------------------------------------------ limiter

/// Paces connection attempts: at most `attempts` in any `window`, and
/// beyond a burst one every `window / attempts` (a generic cell rate
/// algorithm), and none while a `Retry-After` holds.
#[derive(Debug)]
struct ConnectLimiter {
    attempts: usize,
    window: Duration,
    interval: Duration,
    tolerance: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    /// When the next attempt would be due at the steady rate.
    due: Option<Instant>,
    /// Attempts within the last window, oldest first.
    recent: VecDeque<Instant>,
    held_until: Option<Instant>,
}

impl ConnectLimiter {
    fn new(cfg: &StreamConfig) -> Self {
        let attempts = cfg.connect_attempts.max(1);
        let interval = cfg.connect_window / attempts;
        Self {
            attempts: usize::try_from(attempts).unwrap_or(usize::MAX),
            window: cfg.connect_window,
            interval,
            tolerance: interval * cfg.connect_burst.clamp(1, attempts).saturating_sub(1),
            state: Mutex::new(LimiterState::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, LimiterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an attempt at `now` if one may go, else says how long to wait.
    fn reserve(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state();
        if let Some(until) = s.held_until
            && until > now
        {
            return Err(until - now);
        }
        while s.recent.front().is_some_and(|t| *t + self.window <= now) {
            s.recent.pop_front();
        }
        if s.recent.len() >= self.attempts
            && let Some(oldest) = s.recent.front()
        {
            return Err(*oldest + self.window - now);
        }
        let due = s.due.map_or(now, |d| d.max(now));
        if due > now + self.tolerance {
            return Err(due - self.tolerance - now);
        }
        s.due = Some(due + self.interval);
        s.recent.push_back(now);
        Ok(())
    }

    /// The end of a hold still running at `now`.
    fn held_until(&self, now: Instant) -> Option<Instant> {
        self.state().held_until.filter(|until| *until > now)
    }

    /// Holds every attempt until `now + wait`.
    fn hold(&self, now: Instant, wait: Duration) {
        let mut s = self.state();
        let until = now + wait;
        s.held_until = Some(s.held_until.map_or(until, |h| h.max(until)));
    }
}

// ------------------------------------------------------------------ connection task

/// A subscription as its connection task sees it.
struct Slot {
    creds: ApiCredentials,
    tx: mpsc::Sender<StreamEvent>,
    end: Arc<OnceLock<ExchangeError>>,
    /// `open`'s answer, until the first subscription is confirmed.
    reply: Option<oneshot::Sender<Result<(), ExchangeError>>>,
    state: SlotState,
    /// Start of the interruption to report once resubscribed.
    gap_from: Option<i64>,
    /// A `-1021` was answered by re-reading the server's clock once.
    resynced: bool,
    retry_backoff: Duration,
    /// No subscribe before this (a refused one's retry, or a rate limit's):
    /// kept across reconnects, so that a new connection does not resend at
    /// once what the server asked us to hold.
    not_before: Option<Instant>,
    /// Resubscriptions failed in a row.
    failures: u32,
    /// Why the session is still without its subscription, for its end.
    last_error: Option<ExchangeError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Needs a subscribe: no connection yet, or waiting for a retry.
    Wanted,
    Subscribing,
    Active(i64),
}

enum Cmd {
    Join { key: u64, slot: Box<Slot> },
    Leave(u64),
    Close,
}

/// A request sent on the connection and the moment its answer is due.
struct Request {
    what: Pending,
    deadline: Instant,
}

/// What a request sent on the connection was.
enum Pending {
    Subscribe(u64),
    Unsubscribe,
    /// Clock re-read after a `-1021`, then the slot subscribes again.
    Time(u64),
}

/// Why a physical connection ended.
#[derive(Debug)]
enum End {
    /// Every session left.
    Exit,
    /// Reconnect at once (server asked, the age limit, ids used up).
    Planned(&'static str),
    /// Reconnect after a backoff (drop, error, stall).
    Broken(String),
}

enum Connect {
    Up(Box<Ws>),
    Failed,
    Exit,
}

struct Conn {
    id: u64,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    retired: Arc<AtomicBool>,
    slots: HashMap<u64, Slot>,
    by_sub: HashMap<i64, u64>,
    /// Requests awaiting their answer. One left unanswered past its deadline
    /// breaks the connection: its slot would otherwise wait forever while
    /// pings keep the socket looking healthy.
    pending: HashMap<u64, Request>,
    next_request: u64,
    backoff: Duration,
    /// Highest subscription id handed out on this physical connection + 1.
    ids_used: i64,
    /// Last moment the connection was known healthy (a frame arrived).
    healthy_at: i64,
    /// Slots to subscribe again at a given time (after a refused resubscribe).
    retries: Vec<(Instant, u64)>,
    /// Confirmed sessions that lost their subscription, and since when,
    /// until resubscribed. Kept per session, not per connection: a
    /// connection that opens fine and drops again before answering a
    /// subscribe restores nobody, and on one connection a session may come
    /// back while another does not.
    lost: HashMap<u64, Instant>,
}

impl Conn {
    fn new(
        id: u64,
        shared: Arc<Shared>,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        retired: Arc<AtomicBool>,
    ) -> Self {
        let backoff = shared.cfg.backoff_initial;
        Self {
            id,
            shared,
            cmds,
            retired,
            slots: HashMap::new(),
            by_sub: HashMap::new(),
            pending: HashMap::new(),
            next_request: 1,
            backoff,
            ids_used: 0,
            healthy_at: now_ms(),
            retries: Vec::new(),
            lost: HashMap::new(),
        }
    }

    fn cfg(&self) -> &StreamConfig {
        &self.shared.cfg
    }

    async fn run(mut self) {
        let mut planned = true;
        loop {
            while !self.wants_connection() {
                match self.cmds.recv().await {
                    Some(cmd) => {
                        if !self.apply_offline(cmd) {
                            return;
                        }
                    }
                    None => return,
                }
            }
            if !planned {
                let d = jitter(self.backoff);
                debug!(conn = self.id, delay = ?d, "user-data reconnect backoff");
                if !self.offline_for(d).await {
                    return;
                }
                self.backoff = (self.backoff * 2).min(self.cfg().backoff_max);
                if !self.wants_connection() {
                    // Every session waiting was ended meanwhile.
                    continue;
                }
            }
            let ws = match self.connect().await {
                Connect::Up(ws) => ws,
                Connect::Failed => {
                    planned = false;
                    continue;
                }
                Connect::Exit => return,
            };
            let started = Instant::now();
            let end = self.run_connection(*ws).await;
            if started.elapsed() >= self.cfg().backoff_max {
                // Lived long enough to count as healthy: start the backoff over.
                self.backoff = self.cfg().backoff_initial;
            }
            self.interrupted(&end);
            self.end_overdue();
            match end {
                End::Exit => return,
                End::Planned(why) => {
                    info!(
                        conn = self.id,
                        reason = why,
                        subscriptions = self.slots.len(),
                        "user-data connection reconnecting"
                    );
                    planned = true;
                }
                End::Broken(why) => {
                    warn!(conn = self.id, reason = %why, subscriptions = self.slots.len(), "user-data connection interrupted, reconnecting");
                    planned = false;
                }
            }
        }
    }

    fn wants_connection(&self) -> bool {
        self.slots.values().any(|s| s.state == SlotState::Wanted)
    }

    /// Applies a command while no socket is open; false on `Close`.
    fn apply_offline(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Join { key, slot } => {
                self.slots.insert(key, *slot);
                true
            }
            Cmd::Leave(key) => {
                self.remove_slot(key);
                true
            }
            Cmd::Close => false,
        }
    }

    /// Waits `d` while taking commands; false on `Close`. Sessions whose
    /// time to be resubscribed runs out meanwhile are ended on time.
    async fn offline_for(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            let overdue = self.restore_by().filter(|at| *at < until);
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => if !self.apply_offline(cmd) { return false; },
                    None => return false,
                },
                () = sleep_until(overdue.unwrap_or(until)), if overdue.is_some() => self.end_overdue(),
                () = sleep_until(until) => return true,
            }
        }
    }

    /// How long a confirmed session may be without its subscription.
    fn restore_bound(&self) -> Duration {
        self.cfg().connect_timeout * RESUBSCRIBE_TRIES
    }

    /// When the first session still without its subscription runs out of
    /// time.
    fn restore_by(&self) -> Option<Instant> {
        let bound = self.restore_bound();
        self.lost.values().min().map(|since| *since + bound)
    }

    /// Ends every confirmed session that has been without its subscription
    /// for [`RESUBSCRIBE_TRIES`] connect timeouts, whatever kept it so:
    /// connections that open and drop again before the subscribe is
    /// answered, reconnects refused, timing out or held by the limiter, or a
    /// resubscription held by a rate limit. Such a session otherwise hears
    /// nothing, neither events nor a gap, until it is back, and its account
    /// would count as streamed while its fills go unseen. Ended, the
    /// consumer sees it (the gateway flags the account for reconciliation
    /// over REST and shows its stream down). A rate limit still holding is
    /// passed on as such, so the consumer waits as told.
    fn end_overdue(&mut self) {
        let now = Instant::now();
        let bound = self.restore_bound();
        let overdue: Vec<(u64, Instant)> = self
            .lost
            .iter()
            .filter(|(_, since)| **since + bound <= now)
            .map(|(key, since)| (*key, *since))
            .collect();
        if overdue.is_empty() {
            return;
        }
        let held = self.shared.limiter.held_until(now);
        for (key, since) in overdue {
            let down = now - since;
            let last = self.slots.get(&key).and_then(|s| s.last_error.clone());
            let why = match (held, last) {
                (Some(until), _) => ExchangeError::RateLimited {
                    retry_after: until - now,
                },
                (None, Some(e @ ExchangeError::RateLimited { .. })) => e,
                (None, last) => {
                    let cause = match last {
                        Some(ExchangeError::Transient(msg)) => msg,
                        Some(other) => other.to_string(),
                        None => "not resubscribed".into(),
                    };
                    ExchangeError::Transient(format!(
                        "user-data stream down for {} s: {cause}",
                        down.as_secs()
                    ))
                }
            };
            warn!(conn = self.id, ?down, error = %why, "user-data subscription not restored in time, ending the session");
            // Not active, so there is no subscription to unsubscribe.
            let _none = self.end_slot(key, why);
        }
    }

    /// Records `e` as the reason the sessions without their subscription
    /// are still so.
    fn note(&mut self, e: &ExchangeError) {
        for key in self.lost.keys() {
            if let Some(slot) = self.slots.get_mut(key) {
                slot.last_error = Some(e.clone());
            }
        }
    }

    /// Fails the sessions still waiting in `open` with `e`.
    fn fail_openers(&mut self, e: &ExchangeError) {
        let waiting: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.reply.is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in waiting {
            self.end_slot(key, e.clone());
        }
    }

    async fn connect(&mut self) -> Connect {
        loop {
            match self.shared.limiter.reserve(Instant::now()) {
                Ok(()) => break,
                Err(wait) => {
                    let held = ExchangeError::RateLimited { retry_after: wait };
                    if wait > self.cfg().connect_timeout {
                        self.fail_openers(&held);
                        // A wait this long is the news, as it is for
                        // `open`; a shorter pacing keeps the cause of the
                        // reconnects as the sessions' last error.
                        self.note(&held);
                    }
                    self.end_overdue();
                    if !self.wants_connection() {
                        return Connect::Failed;
                    }
                    debug!(conn = self.id, ?wait, "user-data connection attempt paced");
                    // Look again within half a connect timeout, so that a
                    // session joining meanwhile is answered `RateLimited`
                    // rather than left to time out in `open`.
                    let nap = wait
                        .min(self.cfg().connect_timeout / 2)
                        .max(Duration::from_millis(1));
                    if !self.offline_for(nap).await {
                        return Connect::Exit;
                    }
                }
            }
        }
        let shared = self.shared.clone();
        let attempting = timeout(self.cfg().connect_timeout, handshake(&shared));
        tokio::pin!(attempting);
        // A session's deadline does not wait for the handshake to end.
        let done = loop {
            let restore_by = self.restore_by();
            tokio::select! {
                done = &mut attempting => break done,
                () = sleep_until(restore_by.unwrap_or_else(Instant::now)), if restore_by.is_some() => self.end_overdue(),
            }
        };
        let attempt = match done {
            Ok(r) => r,
            Err(_) => Err(ExchangeError::Transient(
                "user-data stream connect timed out".into(),
            )),
        };
        match attempt {
            Ok(ws) => Connect::Up(Box::new(ws)),
            Err(e) => {
                if let ExchangeError::RateLimited { retry_after } = e {
                    // Binance counts attempts per IP: nobody in this process tries again before it passes.
                    self.shared.limiter.hold(Instant::now(), retry_after);
                }
                warn!(conn = self.id, error = %e, "user-data connection attempt failed");
                self.fail_openers(&e);
                self.note(&e);
                self.end_overdue();
                Connect::Failed
            }
        }
    }

    /// After a physical connection ended: every subscription is wanted
    /// again, and the confirmed ones owe their session a gap and must be
    /// resubscribed in time. The ones not yet back from an earlier loss keep
    /// their deadline: a connection lost before it answered their subscribe
    /// gives them no more time.
    fn interrupted(&mut self, end: &End) {
        let now = Instant::now();
        let from = self.healthy_at;
        self.by_sub.clear();
        self.pending.clear();
        self.retries.clear();
        self.ids_used = 0;
        self.retired.store(false, Ordering::Relaxed);
        let why = match end {
            End::Broken(why) => Some(ExchangeError::Transient(format!(
                "user-data connection interrupted: {why}"
            ))),
            End::Exit | End::Planned(_) => None,
        };
        for (key, slot) in &mut self.slots {
            if slot.reply.is_none() {
                slot.gap_from.get_or_insert(from);
                self.lost.entry(*key).or_insert(now);
                if let Some(why) = &why {
                    slot.last_error = Some(why.clone());
                }
            }
            slot.state = SlotState::Wanted;
            slot.resynced = false;
        }
    }

    async fn run_connection(&mut self, ws: Ws) -> End {
        let (mut sink, mut stream) = ws.split();
        let cfg = self.shared.cfg.clone();
        let opened = Instant::now();
        self.healthy_at = now_ms();
        let age_deadline = opened + age_with_jitter(cfg.max_connection_age);
        // Liveness. A server that pings (Binance: every 20 s) must keep doing so:
        // our own pings may still be answered by a transport whose event side is
        // stuck. A server that never pings is judged by the pongs to our pings.
        let mut last_server = opened;
        let mut last_pong = opened;
        let mut server_pings = false;
        let mut ping = tokio::time::interval_at(opened + cfg.ping_interval, cfg.ping_interval);
        // The handshake may have taken a session past its deadline.
        self.end_overdue();
        let wanted: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.state == SlotState::Wanted)
            .map(|(k, _)| *k)
            .collect();
        let mut end = None;
        for key in wanted {
            if let Err(e) = self.subscribe(&mut sink, key).await {
                end = Some(End::Broken(e));
                break;
            }
        }
        let end = match end {
            Some(end) => end,
            None => loop {
                let alive_at = if server_pings {
                    last_server
                } else {
                    last_server.max(last_pong)
                };
                let retry_at = self.retries.iter().map(|(t, _)| *t).min();
                let answer_by = self.pending.values().map(|r| r.deadline).min();
                let restore_by = self.restore_by();
                tokio::select! {
                    biased;
                    cmd = self.cmds.recv() => {
                        let outcome = match cmd {
                            None | Some(Cmd::Close) => Err(End::Exit),
                            Some(Cmd::Join { key, slot }) => {
                                self.slots.insert(key, *slot);
                                self.subscribe(&mut sink, key).await.map_err(End::Broken)
                            }
                            Some(Cmd::Leave(key)) => self.leave(&mut sink, key).await.map_err(End::Broken),
                        };
                        if let Err(end) = outcome {
                            break end;
                        }
                    }
                    msg = stream.next() => {
                        let msg = match msg {
                            None => break End::Broken("connection closed".into()),
                            Some(Err(e)) => break End::Broken(format!("read failed: {e}")),
                            Some(Ok(m)) => m,
                        };
                        if let Message::Pong(_) = msg {
                            last_pong = Instant::now();
                            if !server_pings {
                                self.healthy_at = now_ms();
                            }
                            continue;
                        }
                        last_server = Instant::now();
                        self.healthy_at = now_ms();
                        match msg {
                            Message::Text(text) => {
                                if let Some(end) = self.on_text(&mut sink, text.as_str()).await {
                                    break end;
                                }
                            }
                            Message::Ping(payload) => {
                                server_pings = true;
                                if let Err(e) = send_within(&mut sink, Message::Pong(payload), cfg.stall_timeout, "pong").await {
                                    break End::Broken(e);
                                }
                            }
                            Message::Close(frame) => break End::Broken(format!("closed by server: {frame:?}")),
                            Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
                        }
                    }
                    () = sleep_until(alive_at + cfg.stall_timeout) => {
                        break End::Broken(format!("stalled: nothing from the server for {:?}", cfg.stall_timeout));
                    }
                    () = sleep_until(age_deadline) => break End::Planned("connection age limit"),
                    _ = ping.tick() => {
                        if let Err(e) = send_within(&mut sink, Message::Ping(Vec::new().into()), cfg.stall_timeout, "ping").await {
                            break End::Broken(e);
                        }
                    }
                    () = sleep_until(retry_at.unwrap_or(age_deadline)), if retry_at.is_some() => {
                        if let Err(e) = self.retry_due(&mut sink).await {
                            break End::Broken(e);
                        }
                    }
                    () = sleep_until(answer_by.unwrap_or(age_deadline)), if answer_by.is_some() => {
                        let why = format!("a request was not answered within {:?}", cfg.connect_timeout);
                        self.unanswered(&why);
                        break End::Broken(why);
                    }
                    () = sleep_until(restore_by.unwrap_or(age_deadline)), if restore_by.is_some() => {
                        // A resubscription held (a rate limit) or refused
                        // while the connection itself stays up.
                        self.end_overdue();
                    }
                }
            },
        };
        // Best effort: tell the server we are leaving.
        let _closing = timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
        end
    }

    /// Counts an unanswered subscribe (or its clock re-read) as a failure of
    /// its session, so that a server that never answers ends the session
    /// too rather than reconnecting for ever.
    fn unanswered(&mut self, why: &str) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .pending
            .values()
            .filter(|r| r.deadline <= now)
            .filter_map(|r| match r.what {
                Pending::Subscribe(key) | Pending::Time(key) => Some(key),
                Pending::Unsubscribe => None,
            })
            .collect();
        for key in late {
            let err = ExchangeError::Transient(format!("user-data subscription failed: {why}"));
            self.failed(key, err, Duration::ZERO);
        }
    }

    /// Records a failed resubscription of `key`; ends its session when it
    /// has failed [`RESUBSCRIBE_TRIES`] times or `delay` would take it past
    /// its deadline (see [`Conn::end_overdue`]). True when it was ended.
    fn failed(&mut self, key: u64, err: ExchangeError, delay: Duration) -> bool {
        let now = Instant::now();
        let deadline = self
            .lost
            .get(&key)
            .map(|since| *since + self.restore_bound());
        let Some(slot) = self.slots.get_mut(&key) else {
            return false;
        };
        if slot.reply.is_some() {
            // Not yet confirmed: `open` has its own deadline.
            return false;
        }
        slot.failures += 1;
        if slot.failures < RESUBSCRIBE_TRIES && deadline.is_none_or(|by| now + delay <= by) {
            slot.last_error = Some(err);
            return false;
        }
        warn!(conn = self.id, error = %err, failures = slot.failures, "user-data resubscription keeps failing, ending the session");
        // Being resubscribed, it holds no subscription to unsubscribe.
        let _none = self.end_slot(key, err);
        true
    }

    /// A fresh request id, recorded as awaiting its answer for at most
    /// `connect_timeout`.
    fn request(&mut self, what: Pending) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let deadline = Instant::now() + self.cfg().connect_timeout;
        self.pending.insert(id, Request { what, deadline });
        id
    }

    async fn subscribe(&mut self, sink: &mut Sink, key: u64) -> Result<(), String> {
        let now = Instant::now();
        let held = self.shared.limiter.held_until(now);
        let patience = self.cfg().connect_timeout;
        let deadline = self
            .lost
            .get(&key)
            .map(|since| *since + self.restore_bound());
        let Some(slot) = self.slots.get_mut(&key) else {
            return Ok(());
        };
        let not_before = slot.not_before.filter(|at| *at > now);
        if let Some(at) = not_before.max(held) {
            // `open` is told now rather than left to time out, and a
            // confirmed session now rather than at its deadline, when the
            // wait (another connection's 429, a ban) outlasts it.
            let too_long = match slot.reply {
                Some(_) => at - now > patience,
                None => deadline.is_some_and(|by| at > by),
            };
            if too_long {
                let why = ExchangeError::RateLimited {
                    retry_after: at - now,
                };
                if slot.reply.is_none() {
                    warn!(conn = self.id, error = %why, "user-data resubscription held past its deadline, ending the session");
                }
                let _none = self.end_slot(key, why);
                return Ok(());
            }
            slot.state = SlotState::Wanted;
            self.retries.push((at, key));
            return Ok(());
        }
        let id = self.request(Pending::Subscribe(key));
        let timestamp = self.shared.server_now_ms();
        let recv_window = self.shared.recv_window;
        let Some(slot) = self.slots.get_mut(&key) else {
            return Ok(());
        };
        let text = subscribe_request(id, &slot.creds, timestamp, recv_window);
        slot.state = SlotState::Subscribing;
        self.shared.charge_weight(WS_WEIGHT);
        send_within(
            sink,
            Message::Text(text.into()),
            self.cfg().stall_timeout,
            "subscribe",
        )
        .await
    }

    async fn unsubscribe(&mut self, sink: &mut Sink, sub: i64) -> Result<(), String> {
        let id = self.request(Pending::Unsubscribe);
        self.shared.charge_weight(WS_WEIGHT);
        let text = json!({
            "id": id,
            "method": "userDataStream.unsubscribe",
            "params": { "subscriptionId": sub },
        })
        .to_string();
        send_within(
            sink,
            Message::Text(text.into()),
            self.cfg().stall_timeout,
            "unsubscribe",
        )
        .await
    }

    /// A session left: its subscription goes, the connection stays. One
    /// still being subscribed is unsubscribed when its answer comes.
    async fn leave(&mut self, sink: &mut Sink, key: u64) -> Result<(), String> {
        let Some(slot) = self.remove_slot(key) else {
            return Ok(());
        };
        if let SlotState::Active(sub) = slot.state {
            self.by_sub.remove(&sub);
            return self.unsubscribe(sink, sub).await;
        }
        Ok(())
    }

    /// Forgets a session, and with it its deadline.
    fn remove_slot(&mut self, key: u64) -> Option<Slot> {
        self.lost.remove(&key);
        self.slots.remove(&key)
    }

    /// Ends one subscription for good; its session reads `why` after the
    /// events already delivered. The caller unsubscribes it if active.
    fn end_slot(&mut self, key: u64, why: ExchangeError) -> Option<i64> {
        let slot = self.remove_slot(key)?;
        let _first = slot.end.set(why.clone());
        if let Some(reply) = slot.reply {
            let _gone = reply.send(Err(why));
        }
        match slot.state {
            SlotState::Active(sub) => {
                self.by_sub.remove(&sub);
                Some(sub)
            }
            SlotState::Wanted | SlotState::Subscribing => None,
        }
    }

    /// Hands `ev` to its session without waiting: a session whose buffer
    /// is full is ended alone, so that no consumer holds up the others.
    async fn deliver(&mut self, sink: &mut Sink, key: u64, ev: StreamEvent) -> Result<(), String> {
        let Some(slot) = self.slots.get(&key) else {
            return Ok(());
        };
        match slot.tx.try_send(ev) {
            // Closed: the session was dropped; its `Leave` is on its way.
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let buffer = self.cfg().buffer;
                warn!(
                    conn = self.id,
                    buffer, "user-data consumer fell behind, ending its subscription"
                );
                let why = ExchangeError::Transient(format!(
                    "user-data consumer fell {buffer} events behind; subscription ended"
                ));
                match self.end_slot(key, why) {
                    Some(sub) => self.unsubscribe(sink, sub).await,
                    None => Ok(()),
                }
            }
        }
    }

    async fn on_text(&mut self, sink: &mut Sink, text: &str) -> Option<End> {
        let result = match classify(text) {
            Incoming::Response { id, frame } => self.on_response(sink, id, frame).await,
            Incoming::Unsolicited(what) => {
                // Not an answer to a request, so it cannot say which key it
                // is about (a revoked key: 401 -2015). Every subscription
                // reconnects; a revoked key is refused at its resubscription
                // and ends that session alone.
                warn!(conn = self.id, error = %what, "user-data connection error frame");
                return Some(End::Broken(format!("error frame {what}")));
            }
            Incoming::Unowned(kind) => {
                // Binance names the subscription of every event; one without
                // it (a changed shape) may be a fill of any account here.
                // Dropping it would lose the fill without a gap: every
                // subscription reconnects, and each session's gap sends its
                // account to reconciliation.
                warn!(conn = self.id, kind = %kind, "user-data event without a subscriptionId, reconnecting");
                return Some(End::Broken(format!(
                    "{kind} event without a subscriptionId"
                )));
            }
            Incoming::Shutdown => return Some(End::Planned("serverShutdown")),
            Incoming::Terminated(sub) => {
                self.resubscribe(sink, sub, now_ms(), "eventStreamTerminated")
                    .await
            }
            Incoming::Event(sub, ev) => match self.by_sub.get(&sub) {
                Some(&key) => self.deliver(sink, key, *ev).await,
                None => {
                    debug!(
                        conn = self.id,
                        subscription = sub,
                        "event of an ended subscription ignored"
                    );
                    Ok(())
                }
            },
            Incoming::Malformed(sub, e) => {
                // A known event we cannot read may be a fill: resubscribe so
                // that the gap sends the account to reconciliation, rather than
                // silently skipping it.
                warn!(conn = self.id, subscription = sub, error = %e, "malformed user-data event, resubscribing to force reconciliation");
                let from = self.healthy_at;
                match self.by_sub.get(&sub) {
                    Some(_) => match self.unsubscribe(sink, sub).await {
                        Ok(()) => self.resubscribe(sink, sub, from, "malformed event").await,
                        Err(e) => Err(e),
                    },
                    None => Ok(()),
                }
            }
            Incoming::Unreadable(e) => {
                // It may have been the answer to one of our requests, which
                // would then never come.
                warn!(conn = self.id, error = %e, "unreadable user-data frame, reconnecting");
                return Some(End::Broken(format!("unreadable frame: {e}")));
            }
            Incoming::Ignored(kind) => {
                debug!(conn = self.id, kind = %kind, "user-data frame ignored");
                Ok(())
            }
        };
        result.err().map(End::Broken)
    }

    /// Subscribes one subscription again; its session gets a gap from `from`.
    async fn resubscribe(
        &mut self,
        sink: &mut Sink,
        sub: i64,
        from: i64,
        why: &str,
    ) -> Result<(), String> {
        let Some(key) = self.by_sub.remove(&sub) else {
            return Ok(());
        };
        info!(
            conn = self.id,
            subscription = sub,
            reason = why,
            "user-data subscription ended, resubscribing"
        );
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.gap_from.get_or_insert(from);
            slot.state = SlotState::Wanted;
            if slot.reply.is_none() {
                self.lost.entry(key).or_insert_with(Instant::now);
            }
        }
        self.subscribe(sink, key).await
    }

    async fn retry_due(&mut self, sink: &mut Sink) -> Result<(), String> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.retries.drain(..).partition(|(t, _)| *t <= now);
        self.retries = later;
        for (_, key) in due {
            if self
                .slots
                .get(&key)
                .is_some_and(|s| s.state == SlotState::Wanted)
            {
                self.subscribe(sink, key).await?;
            }
        }
        Ok(())
    }

    async fn on_response(
        &mut self,
        sink: &mut Sink,
        id: u64,
        frame: WsFrame,
    ) -> Result<(), String> {
        let held = frame
            .error
            .as_ref()
            .and_then(|err| self.shared.rate_limited(frame.status, err));
        match self.pending.remove(&id).map(|r| r.what) {
            None => Ok(()),
            Some(Pending::Unsubscribe) => {
                if let Some(err) = frame.error {
                    debug!(conn = self.id, code = err.code, msg = %err.msg, "unsubscribe refused");
                }
                Ok(())
            }
            Some(Pending::Time(key)) => {
                if let Some(server) = frame
                    .result
                    .as_ref()
                    .and_then(|r| r.get("serverTime"))
                    .and_then(serde_json::Value::as_i64)
                {
                    self.shared
                        .offset_ms
                        .store(server - now_ms(), Ordering::Relaxed);
                }
                self.subscribe(sink, key).await
            }
            Some(Pending::Subscribe(key)) => self.on_subscribed(sink, key, frame, held).await,
        }
    }

    async fn on_subscribed(
        &mut self,
        sink: &mut Sink,
        key: u64,
        frame: WsFrame,
        held: Option<Duration>,
    ) -> Result<(), String> {
        let sub = frame
            .result
            .as_ref()
            .and_then(|r| r.get("subscriptionId"))
            .and_then(serde_json::Value::as_i64);
        let backoff_max = self.cfg().backoff_max;
        let backoff_initial = self.cfg().backoff_initial;
        let Some(slot) = self.slots.get_mut(&key) else {
            // The session left while its subscription was on its way.
            return match sub {
                Some(sub) => self.unsubscribe(sink, sub).await,
                None => Ok(()),
            };
        };
        if let Some(err) = frame.error {
            if err.code == -1021 && !slot.resynced {
                slot.resynced = true;
                let id = self.request(Pending::Time(key));
                let text = json!({"id": id, "method": "time"}).to_string();
                let limit = self.cfg().stall_timeout;
                return send_within(sink, Message::Text(text.into()), limit, "time").await;
            }
            if err.code == -2042 {
                // Ids used up before we retired the connection (another
                // client's requests, or a lower server limit): start afresh.
                self.retired.store(true, Ordering::Relaxed);
                slot.state = SlotState::Wanted;
                return Err("subscription ids of the connection used up (-2042)".into());
            }
            let mapped = match held {
                Some(retry_after) => ExchangeError::RateLimited { retry_after },
                None if frame.status == Some(401) => {
                    ExchangeError::Auth(format!("{} {}", err.code, err.msg))
                }
                None => map_ws_error(err.code, &err.msg),
            };
            if matches!(mapped, ExchangeError::Auth(_)) || slot.reply.is_some() {
                // Refused keys end the session; a first subscription's
                // failure is `open`'s answer, as it always was.
                if matches!(mapped, ExchangeError::Auth(_)) {
                    warn!(conn = self.id, error = %mapped, "user-data subscription refused, ending the session");
                }
                self.end_slot(key, mapped);
                return Ok(());
            }
            let delay = match mapped {
                // Never sooner than a first backoff, whatever the clocks
                // say, and spread so that sessions held together do not
                // all come back in the same instant.
                ExchangeError::RateLimited { retry_after } => {
                    spread(retry_after.max(backoff_initial))
                }
                _ => jitter(slot.retry_backoff),
            };
            slot.retry_backoff = (slot.retry_backoff * 2).min(backoff_max);
            slot.state = SlotState::Wanted;
            let at = Instant::now() + delay;
            slot.not_before = Some(at);
            if self.failed(key, mapped.clone(), delay) {
                return Ok(());
            }
            warn!(conn = self.id, error = %mapped, ?delay, "user-data resubscription failed, retrying");
            self.retries.push((at, key));
            return Ok(());
        }
        let Some(sub) = sub else {
            return Err("subscribe answer without a subscriptionId".into());
        };
        slot.state = SlotState::Active(sub);
        slot.resynced = false;
        slot.failures = 0;
        slot.last_error = None;
        self.lost.remove(&key);
        slot.retry_backoff = self.shared.cfg.backoff_initial;
        self.by_sub.insert(sub, key);
        self.ids_used = self.ids_used.max(sub.saturating_add(1));
        if self.ids_used >= RETIRE_AFTER_IDS {
            self.retired.store(true, Ordering::Relaxed);
        }
        let gap = slot.gap_from.take().map(|from| {
            let to = now_ms();
            info!(
                conn = self.id,
                subscription = sub,
                from,
                to,
                "user-data stream resubscribed after a gap"
            );
            StreamEvent::Gap {
                from: Millis(from),
                to: Millis(to.max(from)),
            }
        });
        let reply = slot.reply.take();
        debug!(
            conn = self.id,
            subscription = sub,
            "user-data stream subscribed"
        );
        self.deliver(sink, key, StreamEvent::Connected).await?;
        if let Some(gap) = gap {
            self.deliver(sink, key, gap).await?;
        }
        if let Some(reply) = reply
            && reply.send(Ok(())).is_err()
        {
            debug!(
                conn = self.id,
                "open gave up before its subscription was confirmed"
            );
        }
        Ok(())
    }
}

/// A frame from the server, sorted by who it concerns.
// Short-lived, moved once per frame: boxing would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    /// The answer to one of our requests.
    Response {
        id: u64,
        frame: WsFrame,
    },
    /// An error that answers no request: about the whole connection.
    Unsolicited(String),
    /// A known event (of this type) without a subscription id: it cannot
    /// be given to its session, so every session of the connection may
    /// have missed it.
    Unowned(String),
    /// `serverShutdown`: every subscription of the connection moves.
    Shutdown,
    /// `eventStreamTerminated`: that subscription alone ended.
    Terminated(i64),
    Event(i64, Box<StreamEvent>),
    Malformed(i64, String),
    /// Not JSON: whoever it concerned cannot be told.
    Unreadable(String),
    Ignored(String),
}

fn classify(text: &str) -> Incoming {
    let frame: WsFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Incoming::Unreadable(e.to_string()),
    };
    if let Some(id) = frame.id.as_ref().and_then(serde_json::Value::as_u64) {
        return Incoming::Response { id, frame };
    }
    if let Some(err) = &frame.error {
        return Incoming::Unsolicited(format!(
            "{} {} (status {:?})",
            err.code, err.msg, frame.status
        ));
    }
    let Some(event) = frame.event else {
        return match frame.bare_event {
            Some(kind) if is_known_event(&kind) => Incoming::Unowned(kind),
            _ => Incoming::Ignored("response to no request of ours".into()),
        };
    };
    let Some(sub) = frame.subscription_id else {
        let kind = event
            .get("e")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        return if kind == "serverShutdown" {
            Incoming::Shutdown
        } else if is_known_event(kind) {
            Incoming::Unowned(kind.to_owned())
        } else {
            Incoming::Ignored(format!("event without a subscription: {kind}"))
        };
    };
    match decode_event(event) {
        Ok(Decoded::Event(ev)) => Incoming::Event(sub, Box::new(ev)),
        Ok(Decoded::Reconnect("serverShutdown")) => Incoming::Shutdown,
        Ok(Decoded::Reconnect(_)) => Incoming::Terminated(sub),
        Ok(Decoded::Ignored(kind)) => Incoming::Ignored(kind),
        Err(e) => Incoming::Malformed(sub, e.to_string()),
    }
}

/// Sends `msg` within `limit`. A peer that stops reading would otherwise
/// hold the connection task, and with it every session on the connection,
/// without a gap: past `limit` the connection is broken.
async fn send_within(
    sink: &mut Sink,
    msg: Message,
    limit: Duration,
    what: &str,
) -> Result<(), String> {
    match timeout(limit, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{what} send failed: {e}")),
        Err(_) => Err(format!("{what} send not taken within {limit:?}")),
    }
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Full jitter in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    let low = ms / 2;
    Duration::from_millis(rand::rng().random_range(low..=ms))
}

/// `d` plus up to a quarter more, at random: a wait that must not be
/// shortened, spread out.
fn spread(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms.saturating_add(rand::rng().random_range(0..=ms / 4)))
}

/// A connection's planned lifetime: `age` less a random share of its last
/// tenth, so that connections opened together are renewed apart.
fn age_with_jitter(age: Duration) -> Duration {
    let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    let off = rand::rng().random_range(0..=ms / 10);
    Duration::from_millis(ms - off)
}

/// Opens the WebSocket. A refusal with 429/418 is `RateLimited` with its
/// `Retry-After`.
async fn handshake(shared: &Shared) -> Result<Ws, ExchangeError> {
    shared.charge_weight(WS_WEIGHT);
    // Nagle off: our requests (subscribe, pong) are small writes that must
    // not wait for the ACK of the previous one.
    match tokio_tungstenite::connect_async_with_config(shared.url.as_str(), None, true).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let refusal = map_refusal(status, retry_after(resp.headers()));
            if let (418, ExchangeError::RateLimited { retry_after }) = (status, &refusal) {
                shared.banned(*retry_after, None);
            }
            Err(refusal)
        }
        Err(e) => Err(ExchangeError::Transient(format!(
            "websocket connect failed: {e}"
        ))),
    }
}

fn map_refusal(status: u16, retry_after: Option<Duration>) -> ExchangeError {
    match status {
        429 => ExchangeError::RateLimited {
            retry_after: retry_after.unwrap_or(HANDSHAKE_429_WAIT),
        },
        418 => ExchangeError::RateLimited {
            retry_after: retry_after.unwrap_or(HANDSHAKE_418_WAIT),
        },
        _ => ExchangeError::Transient(format!("websocket handshake refused: http {status}")),
    }
}

/// `userDataStream.subscribe.signature` with an HMAC over the sorted params.
pub(crate) fn subscribe_request(
    id: u64,
    creds: &ApiCredentials,
    timestamp: i64,
    recv_window: Duration,
) -> String {
    let ts = timestamp.to_string();
    let rw = recv_window.as_millis().to_string();
    let signature = ws_signature(
        &creds.secret,
        &[
            ("apiKey", creds.api_key.as_str()),
            ("recvWindow", rw.as_str()),
            ("timestamp", ts.as_str()),
        ],
    );
    json!({
        "id": id,
        "method": "userDataStream.subscribe.signature",
        "params": {
            "apiKey": creds.api_key,
            "recvWindow": u64::try_from(recv_window.as_millis()).unwrap_or(u64::MAX),
            "timestamp": timestamp,
            "signature": signature,
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    #[test]
    fn subscribe_request_is_signed_over_sorted_params() {
        let creds = ApiCredentials {
            api_key: "key".into(),
            secret: SecretString::from(
                "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
            ),
        };
        let text = subscribe_request(1, &creds, 1_747_385_641_636, Duration::from_millis(5000));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["method"], "userDataStream.subscribe.signature");
        assert_eq!(v["id"], 1);
        assert_eq!(v["params"]["timestamp"], 1_747_385_641_636_i64);
        let expected = crate::sign::hmac_hex(
            b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
            b"apiKey=key&recvWindow=5000&timestamp=1747385641636",
        );
        assert_eq!(v["params"]["signature"], expected.as_str());
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn spread_never_shortens_a_wait() {
        for _ in 0..100 {
            let d = spread(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(1000) && d <= Duration::from_millis(1250));
        }
    }

    #[test]
    fn a_retry_after_is_measured_on_the_servers_clock() {
        let stream = BinanceUserStream::new(BinanceConfig::testnet()).unwrap();
        let shared = &stream.shared;
        // The answer's own server time wins, and teaches the offset.
        let server = now_ms() - 5000;
        assert_eq!(
            shared.server_wait(server + 4000, Some(server)),
            Duration::from_secs(4)
        );
        let offset = shared.offset_ms.load(Ordering::Relaxed);
        assert!((-5100..=-4900).contains(&offset), "{offset}");
        // Without it, the learnt offset corrects our clock.
        let wait = shared.server_wait(server + 3000, None);
        assert!(
            wait > Duration::from_millis(2800) && wait <= Duration::from_secs(3),
            "{wait:?}"
        );
        // Past is no wait at all: the caller's floor applies.
        assert_eq!(shared.server_wait(server - 1, None), Duration::ZERO);
    }

    #[test]
    fn a_ban_on_any_answer_holds_connections_and_rest_until_the_servers_time() {
        let exchange = BinanceExchange::new(BinanceConfig::testnet()).unwrap();
        let stream =
            BinanceUserStream::sharing_weight_with(BinanceConfig::testnet(), &exchange).unwrap();
        let shared = &stream.shared;
        let pacer = exchange.pacer();
        // The server's clock is 5 s behind ours.
        let server = now_ms() - 5000;
        let err: WsError = serde_json::from_value(json!({"code": -1003, "msg": "banned",
            "data": {"serverTime": server, "retryAfter": server + 60_000}}))
        .unwrap();
        let wait = shared.rate_limited(Some(418), &err).unwrap();
        assert_eq!(wait, Duration::from_secs(60));
        let held = shared.limiter.held_until(Instant::now()).unwrap();
        assert!(held > Instant::now() + Duration::from_secs(59));
        // REST waits until the server's own `retryAfter`, to the millisecond.
        assert_eq!(
            pacer.admit(server + 59_999, 1, None, 0),
            crate::pacing::Admit::Wait(Duration::from_millis(1))
        );
        assert_eq!(
            pacer.admit(server + 60_000, 1, None, 0),
            crate::pacing::Admit::Go
        );
        // Any other refusal holds nothing.
        let other: WsError =
            serde_json::from_value(json!({"code": -2035, "msg": "already active"})).unwrap();
        assert_eq!(shared.rate_limited(Some(400), &other), None);
    }

    #[test]
    fn connection_ages_spread_over_the_last_tenth() {
        let age = Duration::from_secs(1000);
        let ages: Vec<Duration> = (0..200).map(|_| age_with_jitter(age)).collect();
        assert!(
            ages.iter()
                .all(|a| *a >= Duration::from_secs(900) && *a <= age)
        );
        let distinct: HashSet<Duration> = ages.into_iter().collect();
        assert!(
            distinct.len() > 50,
            "spread: {} distinct ages",
            distinct.len()
        );
    }

    #[test]
    fn revoked_session_frame_concerns_the_whole_connection() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/binance/fixtures/ws_api_error_-2015_session_revoked.json"
        ));
        assert!(matches!(classify(text), Incoming::Unsolicited(m) if m.contains("-2015")));
    }

    #[test]
    fn shutdown_moves_the_connection_and_termination_one_subscription() {
        let shutdown = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/binance/fixtures/ws_server_shutdown.json"
        ));
        assert!(matches!(classify(shutdown), Incoming::Shutdown));
        let terminated = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/binance/fixtures/ws_event_stream_terminated.json"
        ));
        assert!(matches!(classify(terminated), Incoming::Terminated(0)));
    }

    /// Binance puts a `subscriptionId` on every event: a fill or a list
    /// update without one cannot be handed to its session, and dropping it
    /// would lose it without a gap. Here only how such a frame is read
    /// (`Unowned`); that it reconnects the whole connection, a gap for
    /// every session on it, is `tests/scripted.rs`
    /// `an_execution_report_without_a_subscription_gaps_every_session`.
    #[test]
    fn a_known_event_without_a_subscription_is_read_as_unowned() {
        for text in [
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/binance/fixtures/ws_execution_report_new.json"
            )),
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/binance/fixtures/ws_list_status.json"
            )),
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/binance/fixtures/ws_outbound_account_position.json"
            )),
        ] {
            let mut frame: serde_json::Value = serde_json::from_str(text).unwrap();
            frame.as_object_mut().unwrap().remove("subscriptionId");
            let kind = frame["event"]["e"].as_str().unwrap().to_owned();
            assert!(
                matches!(classify(&frame.to_string()), Incoming::Unowned(k) if k == kind),
                "{kind} without a subscriptionId"
            );
            // The bare event, as the legacy streams sent it, is as unowned.
            assert!(
                matches!(classify(&frame["event"].to_string()), Incoming::Unowned(k) if k == kind),
                "bare {kind}"
            );
        }
        // What the domain does not use stays ignored without an id.
        let balance = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/binance/fixtures/ws_balance_update.json"
        ));
        let mut frame: serde_json::Value = serde_json::from_str(balance).unwrap();
        frame.as_object_mut().unwrap().remove("subscriptionId");
        assert!(matches!(classify(&frame.to_string()), Incoming::Ignored(_)));
    }

    #[test]
    fn a_frame_that_is_not_json_is_unreadable_not_ignored() {
        assert!(matches!(classify("{\"id\":7,"), Incoming::Unreadable(_)));
    }

    #[test]
    fn answers_are_matched_by_request_id_and_events_by_subscription() {
        let answer = r#"{"id":7,"status":200,"result":{"subscriptionId":3}}"#;
        assert!(matches!(classify(answer), Incoming::Response { id: 7, .. }));
        let event = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/binance/fixtures/ws_outbound_account_position.json"
        ));
        let v: serde_json::Value = serde_json::from_str(event).unwrap();
        let wrapped = if v.get("event").is_some() {
            let mut v = v;
            v["subscriptionId"] = json!(4);
            v
        } else {
            json!({"subscriptionId": 4, "event": v})
        };
        assert!(matches!(
            classify(&wrapped.to_string()),
            Incoming::Event(4, ev) if matches!(*ev, StreamEvent::Balances(_))
        ));
    }

    #[test]
    fn handshake_refusals_are_rate_limits_with_their_retry_after() {
        assert_eq!(
            map_refusal(429, Some(Duration::from_secs(7))),
            ExchangeError::RateLimited {
                retry_after: Duration::from_secs(7)
            }
        );
        assert_eq!(
            map_refusal(429, None),
            ExchangeError::RateLimited {
                retry_after: HANDSHAKE_429_WAIT
            }
        );
        assert_eq!(
            map_refusal(418, None),
            ExchangeError::RateLimited {
                retry_after: HANDSHAKE_418_WAIT
            }
        );
        assert!(matches!(
            map_refusal(503, None),
            ExchangeError::Transient(_)
        ));
    }

    #[test]
    fn a_stream_with_settings_out_of_range_is_not_built() {
        let mut config = BinanceConfig::testnet();
        config.stream.subscriptions_per_connection = 1001;
        assert!(matches!(
            BinanceUserStream::new(config),
            Err(BinanceError::BadConfig {
                field: "stream.subscriptions_per_connection",
                ..
            })
        ));
    }

    fn limiter(attempts: u32, window_s: u64, burst: u32) -> ConnectLimiter {
        let mut cfg = StreamConfig::binance();
        cfg.connect_attempts = attempts;
        cfg.connect_window = Duration::from_secs(window_s);
        cfg.connect_burst = burst;
        ConnectLimiter::new(&cfg)
    }

    #[test]
    fn limiter_lets_a_burst_go_then_spreads_attempts() {
        let l = limiter(250, 300, 10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.reserve(t0), Ok(()));
        }
        // One every 300 s / 250 = 1.2 s after the burst.
        assert_eq!(l.reserve(t0), Err(Duration::from_millis(1200)));
        assert_eq!(l.reserve(t0 + Duration::from_millis(1200)), Ok(()));
        assert!(l.reserve(t0 + Duration::from_millis(1300)).is_err());
    }

    #[test]
    fn limiter_never_exceeds_its_attempts_in_any_window() {
        let (attempts, window) = (5_usize, Duration::from_secs(10));
        let l = limiter(5, 10, 5);
        let t0 = Instant::now();
        let mut went = Vec::new();
        for step in 0..400_u32 {
            let now = t0 + Duration::from_millis(u64::from(step) * 100);
            if l.reserve(now).is_ok() {
                went.push(now);
            }
        }
        assert!(went.len() >= 15, "{} attempts in 40 s", went.len());
        for w in went.windows(attempts + 1) {
            assert!(w[attempts] - w[0] >= window, "{w:?}");
        }
    }

    #[test]
    fn a_hold_stops_every_attempt_until_it_passes() {
        let l = limiter(250, 300, 10);
        let t0 = Instant::now();
        l.hold(t0, Duration::from_secs(60));
        assert_eq!(
            l.reserve(t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(59))
        );
        assert_eq!(l.reserve(t0 + Duration::from_secs(60)), Ok(()));
    }
}
