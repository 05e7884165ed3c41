//! Request budget: a per-node weight meter that paces calls under a budget
//! per minute and pauses the whole node after a 429/418, a per-account order
//! meter, and an [`Exchange`] wrapper that charges every call to the meter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use oco_core::AccountId;
use oco_core::ports::{
    ApiCredentials, Balance, CancelOutcome, Exchange, ExchangeError, ListCancelOutcome, OcoAck,
    OcoRequest, OrderListSnapshot, OrderRequest, OrderSnapshot,
};
use oco_core::{Fill, Price, SymbolRules};
use tokio::time::Instant;
use tracing::warn;

/// Documented request weights of the Binance Spot endpoints behind each
/// [`Exchange`] method (API_FACTS §7). Successful order placements and
/// cancels weigh 0 since 2026-04-02; they are charged 1, as a refusal is.
pub mod weight {
    /// `GET /api/v3/openOrderList`.
    pub const OPEN_ORDER_LISTS: u32 = 6;
    /// `GET /api/v3/openOrders` with a symbol.
    pub const OPEN_ORDERS: u32 = 6;
    /// `GET /api/v3/order`.
    pub const QUERY_ORDER: u32 = 4;
    /// `GET /api/v3/myTrades` with `orderId`.
    pub const ORDER_TRADES: u32 = 5;
    /// A list lookup as the adapter makes it: `GET /api/v3/orderList` (4)
    /// and `GET /api/v3/order` for each of its two orders (4 each). A list
    /// the database does not show yet costs `openOrderList` (6) more, which
    /// the adapter's own pacer counts.
    pub const ORDER_LIST: u32 = 12;
    /// `GET /api/v3/exchangeInfo` (the adapter caches it: charged once per
    /// symbol and again after an invalidation).
    pub const EXCHANGE_INFO: u32 = 20;
    /// `GET /api/v3/ticker/price` for one symbol.
    pub const LAST_PRICE: u32 = 2;
    /// `GET /api/v3/account`.
    pub const ACCOUNT: u32 = 20;
    /// `POST /api/v3/order`, `DELETE /api/v3/order`, `POST /api/v3/orderList/oco`,
    /// `DELETE /api/v3/orderList`.
    pub const ORDER_WRITE: u32 = 1;
}

const MINUTE: Duration = Duration::from_secs(60);

tokio::task_local! {
    static URGENT: bool;
}

/// Runs `work` as urgent: its calls may use the whole weight budget, while
/// other work leaves a fifth of it free, so that a flagged account is not
/// queued behind a full pass that has spent its share.
pub async fn urgent<F: std::future::Future>(work: F) -> F::Output {
    URGENT.scope(true, work).await
}

fn is_urgent() -> bool {
    URGENT.try_with(|u| *u).unwrap_or(false)
}
const TEN_SECONDS: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below is a few arithmetic steps that cannot panic
    // half-way, so a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sliding window of charges: `(when, amount)`, oldest first.
#[derive(Debug, Default)]
struct Window {
    charges: VecDeque<(Instant, u32)>,
    sum: u64,
}

impl Window {
    fn expire(&mut self, now: Instant, span: Duration) {
        while let Some(&(at, w)) = self.charges.front() {
            if now.duration_since(at) < span {
                break;
            }
            self.charges.pop_front();
            self.sum -= u64::from(w);
        }
    }

    /// How long until `amount` fits under `budget`; `None`: it fits now. A
    /// charge larger than the whole budget fits in an empty window.
    fn wait_for(&self, now: Instant, span: Duration, amount: u32, budget: u32) -> Option<Duration> {
        if self.sum + u64::from(amount) <= u64::from(budget) || self.charges.is_empty() {
            return None;
        }
        // Charges leave in order: find the first moment enough has left.
        let mut left = self.sum;
        for &(at, w) in &self.charges {
            left -= u64::from(w);
            if left + u64::from(amount) <= u64::from(budget) {
                return Some((at + span).saturating_duration_since(now));
            }
        }
        self.charges
            .back()
            .map(|&(at, _)| (at + span).saturating_duration_since(now))
    }

    fn push(&mut self, now: Instant, amount: u32) {
        self.charges.push_back((now, amount));
        self.sum += u64::from(amount);
    }
}

#[derive(Debug, Default)]
struct MeterState {
    window: Window,
    total: u64,
    paused_until: Option<Instant>,
    rate_limited: u64,
}

/// Request weight used by this node, paced under a budget per minute. The
/// window slides, so any aligned minute Binance counts stays under budget too.
#[derive(Debug)]
pub struct WeightMeter {
    budget_per_minute: u32,
    state: Mutex<MeterState>,
}

impl WeightMeter {
    /// A meter allowing `budget_per_minute` weight per sliding minute.
    pub fn new(budget_per_minute: u32) -> Self {
        Self {
            budget_per_minute,
            state: Mutex::new(MeterState::default()),
        }
    }

    /// Waits until `weight` fits in the budget (four fifths of it outside
    /// [`urgent`] work) and no pause is in force, then charges it.
    pub async fn acquire(&self, weight: u32) {
        // Without a deadline the only way out of the loop is a charge.
        let _charged = self.charge(weight, None).await;
    }

    /// [`WeightMeter::acquire`], waiting at most `max`: `Err` with the wait
    /// still ahead when the budget or a pause would hold the call longer,
    /// and nothing is charged then.
    ///
    /// # Errors
    /// The wait that remained, when it would pass `max`.
    pub async fn acquire_within(&self, weight: u32, max: Duration) -> Result<(), Duration> {
        self.charge(weight, Some(Instant::now() + max)).await
    }

    async fn charge(&self, weight: u32, deadline: Option<Instant>) -> Result<(), Duration> {
        let budget = if is_urgent() {
            self.budget_per_minute
        } else {
            self.budget_per_minute - self.budget_per_minute / 5
        };
        loop {
            let wait = {
                let mut s = lock(&self.state);
                let now = Instant::now();
                s.window.expire(now, MINUTE);
                match s.paused_until {
                    Some(until) if until > now => Some(until - now),
                    _ => {
                        let wait = s.window.wait_for(now, MINUTE, weight, budget);
                        if wait.is_none() {
                            s.window.push(now, weight);
                            s.total += u64::from(weight);
                        }
                        wait
                    }
                }
            };
            match wait {
                None => return Ok(()),
                Some(d) if deadline.is_some_and(|end| Instant::now() + d > end) => return Err(d),
                Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
            }
        }
    }

    /// Stops every call of the node for `retry_after` (a 429 or 418 answer).
    pub fn pause(&self, retry_after: Duration) {
        let mut s = lock(&self.state);
        let until = Instant::now() + retry_after;
        s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
        s.rate_limited += 1;
    }

    /// Counts a rate-limit answer that holds back one account only (its
    /// order count), without pausing the node.
    pub fn count_rate_limited(&self) {
        lock(&self.state).rate_limited += 1;
    }

    /// Weight charged since the meter was made.
    pub fn total(&self) -> u64 {
        lock(&self.state).total
    }

    /// Weight charged over the last minute.
    pub fn last_minute(&self) -> u64 {
        let mut s = lock(&self.state);
        s.window.expire(Instant::now(), MINUTE);
        s.window.sum
    }

    /// Rate-limit answers seen.
    pub fn rate_limited(&self) -> u64 {
        lock(&self.state).rate_limited
    }

    /// The configured budget.
    pub fn budget_per_minute(&self) -> u32 {
        self.budget_per_minute
    }
}

/// Orders sent per account over a sliding 10 s, kept under a budget (Binance
/// counts unfilled orders per account; an OCO counts 2).
#[derive(Debug)]
pub struct OrderMeter {
    budget_per_10s: u32,
    accounts: Mutex<HashMap<AccountId, Window>>,
}

impl OrderMeter {
    /// A meter allowing `budget_per_10s` orders per account.
    pub fn new(budget_per_10s: u32) -> Self {
        Self {
            budget_per_10s,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `orders` more fit in the account's window (nothing is charged).
    pub async fn wait_for_room(&self, account: AccountId, orders: u32) {
        loop {
            let wait = {
                let mut map = lock(&self.accounts);
                let w = map.entry(account).or_default();
                let now = Instant::now();
                w.expire(now, TEN_SECONDS);
                w.wait_for(now, TEN_SECONDS, orders, self.budget_per_10s)
            };
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
            }
        }
    }

    /// Charges orders actually sent.
    pub fn record(&self, account: AccountId, orders: u32) {
        if orders == 0 {
            return;
        }
        let mut map = lock(&self.accounts);
        map.entry(account).or_default().push(Instant::now(), orders);
    }
}

/// Longest an order write (a list, an exit) waits for the node's budget or a
/// rate-limit pause before it is refused as rate-limited, unsent. Its legs are
/// claimed before it waits, and a claim without an outcome is taken over as
/// stale after the claim timeout (30 s): an order held past that could go out
/// beside the one that replaced it.
pub const ORDER_WAIT_MAX: Duration = Duration::from_secs(10);

/// An [`Exchange`] that charges each call's documented weight to a
/// [`WeightMeter`] before sending it (waiting when the budget is spent), and
/// pauses the meter when the exchange answers "rate limited". Give the same
/// wrapped exchange to the [`oco_core::Protector`] so that the calls made
/// inside `protect` are counted and paced too. Order writes wait at most [`ORDER_WAIT_MAX`].
pub struct MeteredExchange {
    inner: Arc<dyn Exchange>,
    meter: Arc<WeightMeter>,
    rules_cached: Mutex<HashSet<String>>,
}

impl MeteredExchange {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Exchange>, meter: Arc<WeightMeter>) -> Self {
        Self {
            inner,
            meter,
            rules_cached: Mutex::new(HashSet::new()),
        }
    }

    /// The meter charged.
    pub fn meter(&self) -> &Arc<WeightMeter> {
        &self.meter
    }

    /// Charges an order write, waiting at most [`ORDER_WAIT_MAX`]; beyond,
    /// the order is refused as rate-limited (not sent: its claim is released
    /// and it is tried again later).
    async fn acquire_order_write(&self) -> Result<(), ExchangeError> {
        self.meter
            .acquire_within(weight::ORDER_WRITE, ORDER_WAIT_MAX)
            .await
            .map_err(|retry_after| {
                warn!(
                    retry_after_ms = retry_after.as_millis(),
                    "order write not sent: the node's request budget holds it too long"
                );
                ExchangeError::RateLimited { retry_after }
            })
    }

    /// [`MeteredExchange::observe`] for a placement, whose rate-limit answer
    /// is not the node's to act on: Binance counts new orders per account
    /// (`-1015`, and the daily count), so the adapter holds back that key's
    /// placements alone, and pausing the node for it would stop every
    /// account's reads and stops until the account's limit passes (up to
    /// the next UTC midnight). A weight limit or ban met by a placement has
    /// already blocked the adapter's every request, which the next read
    /// meets and pauses the node for.
    fn observe_placement<T>(&self, result: Result<T, ExchangeError>) -> Result<T, ExchangeError> {
        if let Err(ExchangeError::RateLimited { retry_after }) = &result {
            warn!(
                retry_after_ms = retry_after.as_millis(),
                "placement rate limited: held back for this account, other accounts go on"
            );
            self.meter.count_rate_limited();
        }
        result
    }

    fn observe<T>(&self, result: Result<T, ExchangeError>) -> Result<T, ExchangeError> {
        if let Err(ExchangeError::RateLimited { retry_after }) = &result {
            warn!(
                retry_after_ms = retry_after.as_millis(),
                "rate limited: pausing every call of this node"
            );
            self.meter.pause(*retry_after);
        }
        result
    }
}

#[async_trait]
impl Exchange for MeteredExchange {
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError> {
        let first = lock(&self.rules_cached).insert(symbol.to_owned());
        if first {
            self.meter.acquire(weight::EXCHANGE_INFO).await;
        }
        let result = self.inner.symbol_rules(symbol).await;
        if result.is_err() {
            lock(&self.rules_cached).remove(symbol);
        }
        self.observe(result)
    }

    fn invalidate_rules(&self, symbol: &str) {
        lock(&self.rules_cached).remove(symbol);
        self.inner.invalidate_rules(symbol);
    }

    // A read from the adapter's cache costs no request weight.
    fn cached_symbol_rules(&self, symbol: &str) -> Option<SymbolRules> {
        self.inner.cached_symbol_rules(symbol)
    }

    // The adapter's word, from its own state: no request, no weight.
    fn placements_held(&self, creds: &ApiCredentials, lists: u32) -> Option<Duration> {
        self.inner.placements_held(creds, lists)
    }

    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError> {
        self.meter.acquire(weight::LAST_PRICE).await;
        self.observe(self.inner.last_price(symbol).await)
    }

    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError> {
        self.meter.acquire(weight::ACCOUNT).await;
        self.observe(self.inner.balances(creds).await)
    }

    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.acquire_order_write().await?;
        self.observe_placement(self.inner.place_order(creds, order).await)
    }

    async fn query_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.meter.acquire(weight::QUERY_ORDER).await;
        self.observe(self.inner.query_order(creds, symbol, client_id).await)
    }

    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        self.meter.acquire(weight::ORDER_TRADES).await;
        self.observe(self.inner.order_trades(creds, symbol, order_id).await)
    }

    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError> {
        self.meter.acquire(weight::ORDER_WRITE).await;
        self.observe(self.inner.cancel_order(creds, symbol, client_id).await)
    }

    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError> {
        self.acquire_order_write().await?;
        self.observe_placement(self.inner.place_oco(creds, oco).await)
    }

    async fn order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError> {
        self.meter.acquire(weight::ORDER_LIST).await;
        self.observe(self.inner.order_list(creds, symbol, list_client_id).await)
    }

    async fn open_order_ids(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
    ) -> Result<Option<Vec<String>>, ExchangeError> {
        self.meter.acquire(weight::OPEN_ORDERS).await;
        self.observe(self.inner.open_order_ids(creds, symbol).await)
    }

    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError> {
        self.meter.acquire(weight::OPEN_ORDER_LISTS).await;
        self.observe(self.inner.open_order_lists(creds).await)
    }

    async fn cancel_order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError> {
        self.meter.acquire(weight::ORDER_WRITE).await;
        self.observe(
            self.inner
                .cancel_order_list(creds, symbol, list_client_id)
                .await,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cached_rules_pass_through_without_weight() {
        use oco_core::testing::{FakeExchange, btcusdt_rules};

        let fake = Arc::new(FakeExchange::new());
        fake.add_symbol(btcusdt_rules(), "100".parse().unwrap());
        let meter = Arc::new(WeightMeter::new(1_000));
        let metered = MeteredExchange::new(fake, Arc::clone(&meter));
        assert_eq!(
            metered.cached_symbol_rules("BTCUSDT"),
            Some(btcusdt_rules())
        );
        assert_eq!(meter.total(), 0, "a cache read is not a request");
    }

    #[tokio::test(start_paused = true)]
    async fn the_meter_paces_under_its_budget() {
        let meter = WeightMeter::new(10);
        let start = Instant::now();
        meter.acquire(6).await;
        meter.acquire(2).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "8 fits in four fifths of 10"
        );
        urgent(meter.acquire(2)).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "urgent work may use the reserve"
        );
        meter.acquire(6).await;
        assert!(
            start.elapsed() >= MINUTE,
            "the 11th weight waits for the window to slide, waited {:?}",
            start.elapsed()
        );
        assert_eq!(meter.total(), 16);
        assert_eq!(meter.last_minute(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_stops_every_caller() {
        let meter = WeightMeter::new(1_000);
        meter.pause(Duration::from_secs(7));
        let start = Instant::now();
        meter.acquire(1).await;
        assert!(start.elapsed() >= Duration::from_secs(7));
        assert_eq!(meter.rate_limited(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_order_write_held_past_its_limit_is_refused_unsent() {
        use oco_core::ports::OrderRequest;
        use oco_core::testing::{FakeExchange, btcusdt_rules};

        let fake = Arc::new(FakeExchange::new());
        fake.add_symbol(btcusdt_rules(), "100".parse().unwrap());
        let meter = Arc::new(WeightMeter::new(1_000));
        let metered = MeteredExchange::new(fake.clone(), Arc::clone(&meter));
        let creds = oco_core::ApiCredentials {
            api_key: "k".into(),
            secret: secrecy::SecretString::from("s"),
        };
        // A 418 answered elsewhere holds the node for two minutes.
        meter.pause(Duration::from_secs(120));
        let start = Instant::now();
        let order = OrderRequest {
            symbol: "BTCUSDT".into(),
            side: oco_core::ports::Side::Sell,
            limit: None,
            size: oco_core::model::OrderSize::Base("0.1".parse().unwrap()),
            client_id: oco_core::ClientOrderId::new("og-x-1").unwrap(),
        };
        let refused = metered.place_order(&creds, &order).await;
        assert!(
            matches!(refused, Err(ExchangeError::RateLimited { retry_after }) if retry_after > ORDER_WAIT_MAX),
            "{refused:?}"
        );
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "refused at once: the pause outlasts the limit"
        );
        assert_eq!(fake.market_sells().len(), 0, "nothing sent");
        assert_eq!(meter.total(), 0, "nothing charged");
        // A pause shorter than the limit is waited out, and the order sent.
        fake.set_free("k", "BTC", "1".parse().unwrap());
        let meter = Arc::new(WeightMeter::new(1_000));
        let metered = MeteredExchange::new(fake.clone(), Arc::clone(&meter));
        meter.pause(ORDER_WAIT_MAX / 2);
        let start = Instant::now();
        let sold = metered.place_order(&creds, &order).await;
        assert!(sold.is_ok(), "{sold:?}");
        assert!(start.elapsed() >= ORDER_WAIT_MAX / 2);
        assert_eq!(fake.market_sells().len(), 1);
        assert_eq!(meter.total(), u64::from(weight::ORDER_WRITE));
    }

    #[tokio::test(start_paused = true)]
    async fn the_order_meter_is_per_account() {
        let orders = OrderMeter::new(4);
        let start = Instant::now();
        orders.record(AccountId(1), 4);
        orders.wait_for_room(AccountId(2), 4).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "another account is not held back"
        );
        orders.wait_for_room(AccountId(1), 2).await;
        assert!(start.elapsed() >= TEN_SECONDS);
    }
}
