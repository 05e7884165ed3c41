//! State shared by the HTTP, WebSocket and admin layers: the engine, fault switches,
//! rate limiter, request log and the registry of WebSocket connections.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::config::RateLimits;
use crate::control::{FaultOutcome, FaultWhen, RequestFault, RequestRecord};
use crate::engine::{ConnMsg, Engine};
use crate::error::ApiError;

/// Locks a mutex, recovering the data if a previous holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
pub(crate) struct FaultRules {
    pub requests: Vec<RequestFault>,
    pub force_1021: u32,
    pub throttle: u32,
    pub throttle_retry_after: u64,
    pub stream_throttle: u32,
    pub stream_throttle_retry_after: u64,
    pub delay: Duration,
    pub delay_prefix: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub stalled: AtomicBool,
    pub refuse_streams: AtomicBool,
    /// Fast path: false while no request-level rule is set.
    pub armed: AtomicBool,
    pub rules: Mutex<FaultRules>,
}

impl Faults {
    pub fn rearm(&self, r: &FaultRules) {
        let on = !r.requests.is_empty()
            || r.force_1021 > 0
            || r.throttle > 0
            || r.stream_throttle > 0
            || !r.delay.is_zero();
        self.armed.store(on, Ordering::Relaxed);
    }

    /// Takes one use of the first request rule matching `method` and `path`.
    pub fn take_request_rule(&self, method: &str, path: &str) -> Option<(FaultWhen, FaultOutcome)> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut r = lock(&self.rules);
        let idx = r.requests.iter().position(|f| {
            f.count > 0
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && path.starts_with(&f.path_prefix)
        })?;
        let f = &mut r.requests[idx];
        f.count -= 1;
        let out = (f.when, f.outcome);
        if f.count == 0 {
            r.requests.remove(idx);
        }
        self.rearm(&r);
        Some(out)
    }

    pub fn take_throttle(&self) -> Option<u64> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut r = lock(&self.rules);
        if r.throttle == 0 {
            return None;
        }
        r.throttle -= 1;
        let secs = r.throttle_retry_after;
        self.rearm(&r);
        Some(secs)
    }

    /// Takes one use of the handshake throttle; returns its `Retry-After` seconds.
    pub fn take_stream_throttle(&self) -> Option<u64> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut r = lock(&self.rules);
        if r.stream_throttle == 0 {
            return None;
        }
        r.stream_throttle -= 1;
        let secs = r.stream_throttle_retry_after;
        self.rearm(&r);
        Some(secs)
    }

    pub fn take_1021(&self) -> bool {
        if !self.armed.load(Ordering::Relaxed) {
            return false;
        }
        let mut r = lock(&self.rules);
        if r.force_1021 == 0 {
            return false;
        }
        r.force_1021 -= 1;
        self.rearm(&r);
        true
    }

    pub fn delay_for(&self, path: &str) -> Option<Duration> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let r = lock(&self.rules);
        if r.delay.is_zero() {
            return None;
        }
        match &r.delay_prefix {
            Some(p) if !path.starts_with(p.as_str()) => None,
            _ => Some(r.delay),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct IpState {
    minute: u64,
    weight: u32,
    limited_until_ms: u64,
    ignored: u32,
    banned_until_ms: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct OrderCount {
    window10: u64,
    count10: u32,
    day: u64,
    count_day: u32,
}

#[derive(Debug)]
pub(crate) struct Limiter {
    pub cfg: Mutex<RateLimits>,
    ips: Mutex<HashMap<IpAddr, IpState>>,
    orders: Mutex<HashMap<String, OrderCount>>,
}

fn secs_until(now_ms: u64, until_ms: u64) -> u64 {
    until_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
}

impl Limiter {
    pub fn new(cfg: RateLimits) -> Self {
        Self {
            cfg: Mutex::new(cfg),
            ips: Mutex::new(HashMap::new()),
            orders: Mutex::new(HashMap::new()),
        }
    }

    /// Adds `weight` for `ip`; returns the weight used this minute or the 429/418 error.
    pub fn request(&self, ip: IpAddr, weight: u32, now_ms: u64) -> Result<u32, ApiError> {
        let cfg = lock(&self.cfg).clone();
        let mut ips = lock(&self.ips);
        let st = ips.entry(ip).or_default();
        if cfg.enabled && st.banned_until_ms > now_ms {
            return Err(ApiError::new(
                418,
                -1003,
                format!(
                    "Way too much request weight used; IP banned until {}. Please use WebSocket Streams for live updates to avoid bans.",
                    st.banned_until_ms
                ),
            )
            .with_retry_after(secs_until(now_ms, st.banned_until_ms)));
        }
        let minute = now_ms / 60_000;
        if st.minute != minute {
            st.minute = minute;
            st.weight = 0;
        }
        st.weight = st.weight.saturating_add(weight);
        if cfg.enabled && st.weight > cfg.request_weight_per_minute {
            if now_ms < st.limited_until_ms {
                st.ignored += 1;
                if st.ignored >= cfg.ban_after_ignored {
                    let ban_ms = u64::try_from(cfg.ban_duration.as_millis()).unwrap_or(u64::MAX);
                    st.banned_until_ms = now_ms.saturating_add(ban_ms);
                    return Err(ApiError::new(
                        418,
                        -1003,
                        format!(
                            "Way too much request weight used; IP banned until {}. Please use WebSocket Streams for live updates to avoid bans.",
                            st.banned_until_ms
                        ),
                    )
                    .with_retry_after(secs_until(now_ms, st.banned_until_ms)));
                }
            } else {
                st.limited_until_ms = (minute + 1) * 60_000;
                st.ignored = 0;
            }
            return Err(ApiError::new(
                429,
                -1003,
                format!(
                    "Too much request weight used; current limit is {} request weight per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
                    cfg.request_weight_per_minute
                ),
            )
            .with_retry_after(secs_until(now_ms, (minute + 1) * 60_000)));
        }
        Ok(st.weight)
    }

    /// Gives back weight (successful placements and cancels cost 0).
    pub fn refund(&self, ip: IpAddr, weight: u32) -> u32 {
        let mut ips = lock(&self.ips);
        let st = ips.entry(ip).or_default();
        st.weight = st.weight.saturating_sub(weight);
        st.weight
    }

    pub fn used(&self, ip: IpAddr, now_ms: u64) -> u32 {
        let ips = lock(&self.ips);
        ips.get(&ip)
            .filter(|s| s.minute == now_ms / 60_000)
            .map(|s| s.weight)
            .unwrap_or(0)
    }

    /// Counts `n` new orders for `acct`; returns (10 s count, day count) or the 429.
    pub fn orders(&self, acct: &str, n: u32, now_ms: u64) -> Result<(u32, u32), ApiError> {
        let cfg = lock(&self.cfg).clone();
        let mut all = lock(&self.orders);
        let c = all.entry(acct.to_string()).or_default();
        let w10 = now_ms / 10_000;
        let day = now_ms / 86_400_000;
        if c.window10 != w10 {
            c.window10 = w10;
            c.count10 = 0;
        }
        if c.day != day {
            c.day = day;
            c.count_day = 0;
        }
        if cfg.enabled {
            if c.count_day + n > cfg.orders_per_day {
                return Err(ApiError::new(
                    429,
                    -1015,
                    format!(
                        "Too many new orders; current limit is {} orders per 1 DAY.",
                        cfg.orders_per_day
                    ),
                )
                .with_retry_after(secs_until(now_ms, (day + 1) * 86_400_000)));
            }
            if c.count10 + n > cfg.orders_per_10s {
                return Err(ApiError::new(
                    429,
                    -1015,
                    format!(
                        "Too many new orders; current limit is {} orders per 10 SECOND.",
                        cfg.orders_per_10s
                    ),
                )
                .with_retry_after(secs_until(now_ms, (w10 + 1) * 10_000)));
            }
        }
        c.count10 += n;
        c.count_day += n;
        Ok((c.count10, c.count_day))
    }

    pub fn order_counts(&self, acct: &str, now_ms: u64) -> (u32, u32) {
        let all = lock(&self.orders);
        all.get(acct)
            .map(|c| {
                (
                    if c.window10 == now_ms / 10_000 {
                        c.count10
                    } else {
                        0
                    },
                    if c.day == now_ms / 86_400_000 {
                        c.count_day
                    } else {
                        0
                    },
                )
            })
            .unwrap_or((0, 0))
    }

    pub fn reset(&self) {
        lock(&self.ips).clear();
        lock(&self.orders).clear();
    }
}

#[derive(Debug)]
pub(crate) struct RequestLog {
    pub cap: usize,
    pub next_seq: u64,
    pub entries: VecDeque<RequestRecord>,
}

impl RequestLog {
    pub fn push(&mut self, mut r: RequestRecord) {
        if self.cap == 0 {
            return;
        }
        r.seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() >= self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back(r);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    pub tx: UnboundedSender<ConnMsg>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct WsSettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_age: Duration,
    /// First subscription id of a new connection (Binance: 0).
    pub first_subscription_id: u64,
}

/// Everything the server tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub engine: Mutex<Engine>,
    pub faults: Faults,
    pub limiter: Limiter,
    pub log: Mutex<RequestLog>,
    pub conns: Mutex<HashMap<u64, ConnHandle>>,
    pub next_conn: AtomicU64,
    /// When each `/ws-api/v3` upgrade request arrived (µs), refused ones included.
    pub stream_attempts: Mutex<VecDeque<u64>>,
    pub ws: Mutex<WsSettings>,
    pub admin: bool,
    pub faults_enabled: bool,
}

/// Upgrade times kept for [`Shared::stream_attempts`]: enough for any test, bounded for
/// a long-running simulator.
pub(crate) const STREAM_ATTEMPTS_KEPT: usize = 10_000;

impl Shared {
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    pub fn record(&self, r: RequestRecord) {
        lock(&self.log).push(r);
    }

    /// Sends `msg` to every connection, or only to those subscribed for `api_key`.
    pub fn broadcast(&self, api_key: Option<&str>, msg: &ConnMsg) -> usize {
        let targets: Vec<u64> = match api_key {
            None => lock(&self.conns).keys().copied().collect(),
            Some(k) => {
                let eng = self.engine();
                let mut ids: Vec<u64> = eng
                    .subs
                    .get(k)
                    .map(|v| v.iter().map(|s| s.conn_id).collect())
                    .unwrap_or_default();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        let conns = lock(&self.conns);
        targets
            .iter()
            .filter_map(|id| conns.get(id))
            .filter(|c| c.tx.send(msg.clone()).is_ok())
            .count()
    }
}
