//! Request pacing: keeps the used request weight (per IP, i.e. per adapter
//! instance) and the order counts (per API key) under configured budgets, in
//! Binance's fixed, aligned windows (1 minute, 10 seconds, 1 day UTC), and
//! honours `Retry-After`: for every request of the instance after an IP-wide
//! refusal (request weight, ban), for one key's order placements after that
//! account's order-count refusal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::config::Pacing;

const MINUTE_MS: i64 = 60_000;
const TEN_S_MS: i64 = 10_000;
const DAY_MS: i64 = 86_400_000;

/// Current figures, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacingSnapshot {
    /// Request weight used in the current minute (as last reported or reserved).
    pub used_weight_1m: u32,
    /// Orders counted in the current 10 s window for the key asked about.
    pub order_count_10s: u32,
    /// Orders counted today for the key asked about.
    pub order_count_1d: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    window: i64,
    used: u32,
}

impl Counter {
    fn current(&self, window: i64) -> u32 {
        if self.window == window { self.used } else { 0 }
    }

    fn add(&mut self, window: i64, n: u32) {
        if self.window != window {
            *self = Counter { window, used: 0 };
        }
        self.used = self.used.saturating_add(n);
    }

    /// The exchange's figure is authoritative, but requests still in flight
    /// are not in it yet: keep the larger one.
    fn observe(&mut self, window: i64, reported: u32) {
        if self.window == window {
            self.used = self.used.max(reported);
        } else if window > self.window {
            *self = Counter {
                window,
                used: reported,
            };
        }
    }
}

#[derive(Debug, Default)]
struct State {
    weight: Counter,
    orders_10s: HashMap<String, Counter>,
    orders_1d: HashMap<String, Counter>,
    blocked_until_ms: i64,
    /// Per API key: no new order before this server time (after a `-1015`).
    orders_held_until_ms: HashMap<String, i64>,
}

/// What the pacer decides for a request about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send now; the weight and orders are reserved.
    Go,
    /// Wait this long, then ask again.
    Wait(Duration),
}

/// The pacer of one adapter instance.
#[derive(Debug)]
pub struct Pacer {
    budget: Pacing,
    state: Mutex<State>,
}

impl Pacer {
    /// A pacer with these budgets.
    pub fn new(budget: Pacing) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain counters; the figures stay usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks to send a request of `weight` placing `orders` new orders for
    /// `api_key`, at server time `now_ms`. On [`Admit::Go`] the budget is
    /// reserved.
    pub fn admit(&self, now_ms: i64, weight: u32, api_key: Option<&str>, orders: u32) -> Admit {
        let mut s = self.lock();
        if s.blocked_until_ms > now_ms {
            return Admit::Wait(ms(s.blocked_until_ms - now_ms));
        }
        let minute = now_ms.div_euclid(MINUTE_MS);
        let used = s.weight.current(minute);
        if used > 0 && used.saturating_add(weight) > self.budget.weight_per_minute {
            return Admit::Wait(ms((minute + 1) * MINUTE_MS - now_ms + 5));
        }
        let (ten, day) = (now_ms.div_euclid(TEN_S_MS), now_ms.div_euclid(DAY_MS));
        if let (Some(key), true) = (api_key, orders > 0) {
            match s.orders_held_until_ms.get(key).copied() {
                Some(until) if until > now_ms => return Admit::Wait(ms(until - now_ms)),
                Some(_) => {
                    s.orders_held_until_ms.remove(key);
                }
                None => {}
            }
            let in_10s = s.orders_10s.get(key).map_or(0, |c| c.current(ten));
            if in_10s > 0 && in_10s.saturating_add(orders) > self.budget.orders_per_10s {
                return Admit::Wait(ms((ten + 1) * TEN_S_MS - now_ms + 5));
            }
            let in_day = s.orders_1d.get(key).map_or(0, |c| c.current(day));
            if in_day.saturating_add(orders) > self.budget.orders_per_day {
                return Admit::Wait(ms((day + 1) * DAY_MS - now_ms + 5));
            }
            s.orders_10s
                .entry(key.to_owned())
                .or_default()
                .add(ten, orders);
            s.orders_1d
                .entry(key.to_owned())
                .or_default()
                .add(day, orders);
        }
        s.weight.add(minute, weight);
        Admit::Go
    }

    /// Counts `weight` spent at server time `now_ms` by requests that do not
    /// wait for the pacer (the user-data stream's connections and
    /// subscriptions, bounded by their own limiter), so that the requests
    /// which do wait leave room for it.
    pub fn charge(&self, now_ms: i64, weight: u32) {
        self.lock().weight.add(now_ms.div_euclid(MINUTE_MS), weight);
    }

    /// Records the `X-MBX-USED-WEIGHT-1M` and `X-MBX-ORDER-COUNT-10S/1D`
    /// figures of an answer received at server time `now_ms`.
    pub fn observe(
        &self,
        now_ms: i64,
        api_key: Option<&str>,
        weight_1m: Option<u32>,
        orders_10s: Option<u32>,
        orders_1d: Option<u32>,
    ) {
        let mut s = self.lock();
        if let Some(w) = weight_1m {
            s.weight.observe(now_ms.div_euclid(MINUTE_MS), w);
        }
        if let Some(key) = api_key {
            if let Some(n) = orders_10s {
                s.orders_10s
                    .entry(key.to_owned())
                    .or_default()
                    .observe(now_ms.div_euclid(TEN_S_MS), n);
            }
            if let Some(n) = orders_1d {
                s.orders_1d
                    .entry(key.to_owned())
                    .or_default()
                    .observe(now_ms.div_euclid(DAY_MS), n);
            }
        }
    }

    /// Holds every request until `until_ms` (after an IP-wide 429/418:
    /// request weight or a ban, which Binance counts per IP).
    pub fn block_until(&self, until_ms: i64) {
        let mut s = self.lock();
        s.blocked_until_ms = s.blocked_until_ms.max(until_ms);
    }

    /// Holds the order placements of `api_key` until `until_ms` (after a
    /// `-1015`). Binance counts unfilled orders per account, so the other
    /// keys, and this key's reads and cancels, go on.
    pub fn hold_orders(&self, api_key: &str, until_ms: i64) {
        let mut s = self.lock();
        let until = s
            .orders_held_until_ms
            .entry(api_key.to_owned())
            .or_insert(until_ms);
        *until = (*until).max(until_ms);
    }

    /// How long `api_key`'s new orders are held at `now_ms`, for `orders`
    /// more: a hold after a `-1015` still in force, or the day's count too
    /// far spent for them (until the next UTC midnight). `None` otherwise.
    /// Nothing is reserved. The 10 s count is left out: its wait is short,
    /// and a placement waits it out.
    pub fn orders_held(&self, now_ms: i64, api_key: &str, orders: u32) -> Option<Duration> {
        let s = self.lock();
        let hold = s
            .orders_held_until_ms
            .get(api_key)
            .copied()
            .filter(|until| *until > now_ms)
            .map(|until| until - now_ms);
        let day = now_ms.div_euclid(DAY_MS);
        let in_day = s.orders_1d.get(api_key).map_or(0, |c| c.current(day));
        let spent = (in_day.saturating_add(orders) > self.budget.orders_per_day)
            .then(|| (day + 1) * DAY_MS - now_ms + 5);
        hold.max(spent).map(ms)
    }

    /// Current figures at `now_ms`, order counts for `api_key`.
    pub fn snapshot(&self, now_ms: i64, api_key: Option<&str>) -> PacingSnapshot {
        let s = self.lock();
        let count = |map: &HashMap<String, Counter>, window: i64| {
            api_key
                .and_then(|k| map.get(k))
                .map_or(0, |c| c.current(window))
        };
        PacingSnapshot {
            used_weight_1m: s.weight.current(now_ms.div_euclid(MINUTE_MS)),
            order_count_10s: count(&s.orders_10s, now_ms.div_euclid(TEN_S_MS)),
            order_count_1d: count(&s.orders_1d, now_ms.div_euclid(DAY_MS)),
        }
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v.max(0)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(weight: u32, orders: u32) -> Pacer {
        Pacer::new(Pacing {
            weight_per_minute: weight,
            orders_per_10s: orders,
            orders_per_day: 1000,
            max_wait: Duration::from_secs(10),
        })
    }

    #[test]
    fn weight_waits_for_the_next_minute() {
        let p = pacer(10, 100);
        let t = 5 * MINUTE_MS + 30_000;
        assert_eq!(p.admit(t, 6, None, 0), Admit::Go);
        assert_eq!(p.admit(t, 4, None, 0), Admit::Go);
        assert_eq!(
            p.admit(t, 1, None, 0),
            Admit::Wait(Duration::from_millis(30_005))
        );
        assert_eq!(
            p.admit(6 * MINUTE_MS, 1, None, 0),
            Admit::Go,
            "a new window starts empty"
        );
    }

    #[test]
    fn reported_weight_counts() {
        let p = pacer(100, 100);
        let t = 7 * MINUTE_MS;
        p.observe(t, None, Some(99), None, None);
        assert_eq!(p.snapshot(t, None).used_weight_1m, 99);
        assert!(matches!(p.admit(t + 1, 2, None, 0), Admit::Wait(_)));
        // A figure from an older window does not overwrite the current one.
        p.observe(t - MINUTE_MS, None, Some(5), None, None);
        assert_eq!(p.snapshot(t, None).used_weight_1m, 99);
    }

    #[test]
    fn orders_are_per_key_and_per_ten_seconds() {
        let p = pacer(1000, 4);
        let t = 100 * TEN_S_MS + 2_000;
        assert_eq!(p.admit(t, 1, Some("a"), 2), Admit::Go);
        assert_eq!(p.admit(t, 1, Some("a"), 2), Admit::Go);
        assert_eq!(
            p.admit(t, 1, Some("a"), 1),
            Admit::Wait(Duration::from_millis(8_005))
        );
        assert_eq!(
            p.admit(t, 1, Some("b"), 2),
            Admit::Go,
            "another account has its own count"
        );
        assert_eq!(p.snapshot(t, Some("a")).order_count_10s, 4);
    }

    #[test]
    fn charged_weight_holds_back_later_requests() {
        let p = pacer(10, 100);
        let t = 9 * MINUTE_MS;
        p.charge(t, 8);
        assert_eq!(p.snapshot(t, None).used_weight_1m, 8);
        assert!(matches!(p.admit(t, 4, None, 0), Admit::Wait(_)));
        assert_eq!(p.admit(t, 2, None, 0), Admit::Go);
    }

    #[test]
    fn an_order_hold_stops_only_that_keys_placements() {
        let p = pacer(1000, 100);
        p.hold_orders("a", 50_000);
        assert_eq!(
            p.admit(40_000, 1, Some("a"), 2),
            Admit::Wait(Duration::from_secs(10))
        );
        assert_eq!(p.admit(40_000, 1, Some("a"), 0), Admit::Go, "reads go on");
        assert_eq!(
            p.admit(40_000, 1, Some("b"), 2),
            Admit::Go,
            "other keys go on"
        );
        assert_eq!(p.admit(40_000, 1, None, 0), Admit::Go);
        // A shorter hold learnt later does not shorten it.
        p.hold_orders("a", 45_000);
        assert!(matches!(p.admit(46_000, 1, Some("a"), 1), Admit::Wait(_)));
        assert_eq!(p.admit(50_000, 1, Some("a"), 1), Admit::Go);
    }

    #[test]
    fn held_orders_are_told_without_reserving() {
        let p = Pacer::new(Pacing {
            weight_per_minute: 1000,
            orders_per_10s: 100,
            orders_per_day: 10,
            max_wait: Duration::from_secs(10),
        });
        let t = 3 * DAY_MS + 1_000;
        assert_eq!(p.orders_held(t, "a", 4), None);
        p.hold_orders("a", t + 60_000);
        assert_eq!(p.orders_held(t, "a", 4), Some(Duration::from_secs(60)));
        assert_eq!(p.orders_held(t, "b", 4), None, "other keys go on");
        assert_eq!(p.orders_held(t + 60_000, "a", 4), None, "the hold ended");
        // The day's count: 8 of 10 spent leaves room for one list, not two.
        p.observe(t, Some("b"), None, None, Some(8));
        assert_eq!(p.orders_held(t, "b", 2), None);
        assert_eq!(
            p.orders_held(t, "b", 4),
            Some(ms(4 * DAY_MS - t + 5)),
            "held until the next UTC midnight"
        );
        assert_eq!(
            p.snapshot(t, Some("b")).order_count_1d,
            8,
            "nothing reserved"
        );
        assert_eq!(p.orders_held(4 * DAY_MS, "b", 4), None, "a new day");
    }

    #[test]
    fn retry_after_blocks_everything() {
        let p = pacer(1000, 100);
        p.block_until(50_000);
        assert_eq!(
            p.admit(40_000, 1, None, 0),
            Admit::Wait(Duration::from_secs(10))
        );
        assert_eq!(p.admit(50_000, 1, None, 0), Admit::Go);
    }
}
