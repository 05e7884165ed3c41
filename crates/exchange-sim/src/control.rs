//! The in-process control handle ([`SimControl`]) and the inspection and fault types it uses.
//! Every operation here is also reachable over the admin HTTP API (see the README).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Serialize, Serializer};

use crate::config::{AccountSpec, RateLimits};
use crate::engine::{ConnMsg, Engine, Order};
use crate::error::SimError;
use crate::state::{Shared, lock};
use crate::util::now_us;

fn ser_dec<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&d.to_string())
}

/// One balance of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceInfo {
    /// Asset name, e.g. `BTC`.
    pub asset: String,
    /// Free amount.
    #[serde(serialize_with = "ser_dec")]
    pub free: Decimal,
    /// Amount locked by open orders.
    #[serde(serialize_with = "ser_dec")]
    pub locked: Decimal,
}

/// An order as the exchange sees it (times in µs since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderInfo {
    /// Owner's API key.
    pub api_key: String,
    /// Symbol.
    pub symbol: String,
    /// Exchange order id.
    pub order_id: u64,
    /// Order list id, -1 when not in a list.
    pub order_list_id: i64,
    /// Client order id.
    pub client_order_id: String,
    /// `BUY` or `SELL`.
    pub side: String,
    /// Binance order type, e.g. `LIMIT_MAKER`.
    pub order_type: String,
    /// `GTC`, `IOC` or `FOK`.
    pub time_in_force: String,
    /// Binance order status, e.g. `PARTIALLY_FILLED`.
    pub status: String,
    /// Limit price (0 when none).
    #[serde(serialize_with = "ser_dec")]
    pub price: Decimal,
    /// Stop price (0 when none).
    #[serde(serialize_with = "ser_dec")]
    pub stop_price: Decimal,
    /// Ordered quantity.
    #[serde(serialize_with = "ser_dec")]
    pub orig_qty: Decimal,
    /// Filled quantity.
    #[serde(serialize_with = "ser_dec")]
    pub executed_qty: Decimal,
    /// Filled quote amount.
    #[serde(serialize_with = "ser_dec")]
    pub cummulative_quote_qty: Decimal,
    /// Expiry reason when expired (`OCO_TRIGGER`, `EXECUTION_RULE_PRICE_RANGE_EXCEEDED`, …).
    pub expiry_reason: Option<String>,
    /// Whether a stop/take-profit order has triggered.
    pub triggered: bool,
    /// Creation time (µs).
    pub created_us: u64,
    /// Last change (µs).
    pub updated_us: u64,
}

/// An order list (OCO) as the exchange sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderListInfo {
    /// Owner's API key.
    pub api_key: String,
    /// Symbol.
    pub symbol: String,
    /// Exchange order list id.
    pub order_list_id: i64,
    /// `listClientOrderId`.
    pub list_client_order_id: String,
    /// `EXECUTING` or `ALL_DONE`.
    pub list_order_status: String,
    /// Leg order ids, stop-type leg first.
    pub order_ids: Vec<u64>,
    /// Creation time (µs).
    pub created_us: u64,
    /// Last change (µs).
    pub updated_us: u64,
}

/// One fill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TradeInfo {
    /// Owner's API key.
    pub api_key: String,
    /// Symbol.
    pub symbol: String,
    /// Trade id (unique per symbol).
    pub id: u64,
    /// Order filled.
    pub order_id: u64,
    /// Its order list, -1 when none.
    pub order_list_id: i64,
    /// Fill price.
    #[serde(serialize_with = "ser_dec")]
    pub price: Decimal,
    /// Fill quantity.
    #[serde(serialize_with = "ser_dec")]
    pub qty: Decimal,
    /// `price × qty`.
    #[serde(serialize_with = "ser_dec")]
    pub quote_qty: Decimal,
    /// Commission charged.
    #[serde(serialize_with = "ser_dec")]
    pub commission: Decimal,
    /// Asset of the commission.
    pub commission_asset: String,
    /// Buyer side.
    pub is_buyer: bool,
    /// Maker side.
    pub is_maker: bool,
    /// Fill time (µs).
    pub time_us: u64,
}

/// One request received over REST or the WebSocket API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// Position in the log (increasing).
    pub seq: u64,
    /// `rest` or `ws`.
    pub transport: String,
    /// HTTP method, or the WebSocket API method name.
    pub method: String,
    /// Path (REST) or `/ws-api/v3`.
    pub path: String,
    /// API key sent, if any.
    pub api_key: Option<String>,
    /// Client ids sent (`newClientOrderId`, `listClientOrderId`, leg ids, `origClientOrderId`).
    pub client_ids: Vec<String>,
    /// Arrival time (µs since the epoch).
    pub received_us: u64,
    /// Answer time (µs since the epoch).
    pub responded_us: u64,
    /// HTTP status answered (WebSocket: the `status` field).
    pub status: u16,
    /// Binance error code when the answer was an error.
    pub code: Option<i64>,
}

/// When an injected request failure happens relative to applying the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultWhen {
    /// Fail without applying anything.
    Before,
    /// Apply the request (e.g. really place the order), then fail: the unknown-outcome case.
    After,
}

/// How an injected request failure looks to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Answer this HTTP status with a `-1007` "execution status unknown" body.
    Status(u16),
    /// Hold the request this long (past the client's timeout), then answer 503.
    Hang(Duration),
}

/// Fails the next `count` requests whose method and path match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFault {
    /// HTTP method to match (`None`: any).
    pub method: Option<String>,
    /// Path prefix to match, e.g. `/api/v3/orderList`.
    pub path_prefix: String,
    /// How many requests to fail.
    pub count: u32,
    /// Before or after applying.
    pub when: FaultWhen,
    /// Status or hang.
    pub outcome: FaultOutcome,
}

/// Cloneable handle to a running simulator: prices, accounts, inspection and faults.
#[derive(Debug, Clone)]
pub struct SimControl {
    pub(crate) shared: Arc<Shared>,
}

fn order_info(o: &Order) -> OrderInfo {
    OrderInfo {
        api_key: o.account.clone(),
        symbol: o.symbol.clone(),
        order_id: o.id,
        order_list_id: o.list_id,
        client_order_id: o.cid.clone(),
        side: o.side.as_str().into(),
        order_type: o.otype.as_str().into(),
        time_in_force: o.tif.as_str().into(),
        status: o.status.as_str().into(),
        price: o.price,
        stop_price: o.stop,
        orig_qty: o.qty,
        executed_qty: o.executed,
        cummulative_quote_qty: o.cum_quote,
        expiry_reason: o.expiry.map(str::to_string),
        triggered: o.triggered,
        created_us: o.time_us,
        updated_us: o.update_us,
    }
}

fn orders_of(eng: &Engine, api_key: Option<&str>, open_only: bool) -> Vec<OrderInfo> {
    let mut v: Vec<OrderInfo> = eng
        .orders
        .values()
        .filter(|o| api_key.is_none_or(|k| o.account == k))
        .filter(|o| !open_only || o.is_open())
        .map(order_info)
        .collect();
    v.sort_by_key(|o| o.order_id);
    v
}

impl SimControl {
    /// Adds an account, or replaces the secret, commission and listed balances of an existing one.
    pub fn add_account(&self, spec: AccountSpec) {
        let mut eng = self.shared.engine();
        eng.upsert_account(&spec, now_us());
        eng.flush(now_us());
    }

    /// Sets the last price of `symbol` and runs matching (fills, triggers, OCO cancels).
    ///
    /// # Errors
    /// [`SimError::UnknownSymbol`] or [`SimError::Invalid`] for a price ≤ 0.
    pub fn set_price(&self, symbol: &str, price: Decimal) -> Result<(), SimError> {
        if price <= Decimal::ZERO {
            return Err(SimError::Invalid(format!("price {price} is not above 0")));
        }
        let now = now_us();
        let mut eng = self.shared.engine();
        if !eng.set_price(symbol, price, now) {
            return Err(SimError::UnknownSymbol(symbol.into()));
        }
        eng.flush(now);
        Ok(())
    }

    /// Moves the price by `delta`; returns the new price.
    ///
    /// # Errors
    /// As [`Self::set_price`].
    pub fn step_price(&self, symbol: &str, delta: Decimal) -> Result<Decimal, SimError> {
        let p = self
            .price(symbol)
            .ok_or_else(|| SimError::UnknownSymbol(symbol.into()))?;
        self.set_price(symbol, p + delta)?;
        Ok(p + delta)
    }

    /// Plays `prices` one after another, `interval` apart, in a background task.
    ///
    /// # Errors
    /// [`SimError::UnknownSymbol`].
    pub fn run_price_path(
        &self,
        symbol: &str,
        prices: Vec<Decimal>,
        interval: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, SimError> {
        if self.price(symbol).is_none() {
            return Err(SimError::UnknownSymbol(symbol.into()));
        }
        let me = self.clone();
        let symbol = symbol.to_string();
        Ok(tokio::spawn(async move {
            for (i, p) in prices.into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                if me.set_price(&symbol, p).is_err() {
                    return;
                }
            }
        }))
    }

    /// Last price of `symbol`.
    pub fn price(&self, symbol: &str) -> Option<Decimal> {
        self.shared.engine().price(symbol)
    }

    /// Balances of an account (empty for an unknown key), sorted by asset.
    pub fn balances(&self, api_key: &str) -> Vec<BalanceInfo> {
        let eng = self.shared.engine();
        eng.accounts
            .get(api_key)
            .map(|a| {
                a.balances
                    .iter()
                    .map(|(asset, b)| BalanceInfo {
                        asset: asset.clone(),
                        free: b.free,
                        locked: b.locked,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One balance (zero when the account never held the asset); `None` for an unknown key.
    pub fn balance(&self, api_key: &str, asset: &str) -> Option<BalanceInfo> {
        let eng = self.shared.engine();
        let a = eng.accounts.get(api_key)?;
        let b = a.balances.get(asset).copied().unwrap_or_default();
        Some(BalanceInfo {
            asset: asset.to_string(),
            free: b.free,
            locked: b.locked,
        })
    }

    /// Adds `delta` (may be negative) to a free balance and sends `balanceUpdate`.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`].
    pub fn deposit(&self, api_key: &str, asset: &str, delta: Decimal) -> Result<(), SimError> {
        let now = now_us();
        let mut eng = self.shared.engine();
        if !eng.adjust_balance(api_key, asset, delta, now) {
            return Err(SimError::UnknownAccount(api_key.into()));
        }
        eng.flush(now);
        Ok(())
    }

    /// Open orders of an account, by order id.
    pub fn open_orders(&self, api_key: &str) -> Vec<OrderInfo> {
        orders_of(&self.shared.engine(), Some(api_key), true)
    }

    /// Every order of an account (`None`: all accounts), by order id.
    pub fn orders(&self, api_key: Option<&str>) -> Vec<OrderInfo> {
        orders_of(&self.shared.engine(), api_key, false)
    }

    /// Order lists of an account (`None`: all accounts), by id.
    pub fn order_lists(&self, api_key: Option<&str>) -> Vec<OrderListInfo> {
        let eng = self.shared.engine();
        let mut v: Vec<OrderListInfo> = eng
            .lists
            .values()
            .filter(|l| api_key.is_none_or(|k| l.account == k))
            .map(|l| OrderListInfo {
                api_key: l.account.clone(),
                symbol: l.symbol.clone(),
                order_list_id: l.id,
                list_client_order_id: l.cid.clone(),
                list_order_status: if l.done { "ALL_DONE" } else { "EXECUTING" }.into(),
                order_ids: l.legs.clone(),
                created_us: l.time_us,
                updated_us: l.update_us,
            })
            .collect();
        v.sort_by_key(|l| l.order_list_id);
        v
    }

    /// How many order lists of every account are still executing: a count
    /// taken under the engine's lock without copying the lists, cheap enough
    /// to poll while orders are being placed.
    pub fn executing_list_count(&self) -> usize {
        self.shared
            .engine()
            .lists
            .values()
            .filter(|l| !l.done)
            .count()
    }

    /// Trades of an account (`None`: all accounts), in execution order.
    pub fn trades(&self, api_key: Option<&str>) -> Vec<TradeInfo> {
        let eng = self.shared.engine();
        eng.trades
            .iter()
            .filter(|t| api_key.is_none_or(|k| t.account == k))
            .map(|t| TradeInfo {
                api_key: t.account.clone(),
                symbol: t.symbol.clone(),
                id: t.id,
                order_id: t.order_id,
                order_list_id: t.list_id,
                price: t.price,
                qty: t.qty,
                quote_qty: t.quote_qty,
                commission: t.commission,
                commission_asset: t.commission_asset.clone(),
                is_buyer: t.is_buyer,
                is_maker: t.is_maker,
                time_us: t.time_us,
            })
            .collect()
    }

    /// Received requests (oldest first, bounded by the log capacity).
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).entries.iter().cloned().collect()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).entries.clear();
    }

    /// Open WebSocket API connections.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// When each `/ws-api/v3` upgrade request arrived (µs since the epoch, oldest first),
    /// refused and throttled ones included; the last 10,000 are kept.
    pub fn stream_attempts(&self) -> Vec<u64> {
        lock(&self.shared.stream_attempts).iter().copied().collect()
    }

    /// Active user-data subscriptions (over all connections).
    pub fn subscription_count(&self) -> usize {
        self.shared.engine().subs.values().map(Vec::len).sum()
    }

    /// Replaces the rate limits (counters are kept).
    pub fn set_rate_limits(&self, limits: RateLimits) {
        *lock(&self.shared.limiter.cfg) = limits;
    }

    /// Forgets every weight and order counter and ban.
    pub fn reset_rate_limits(&self) {
        self.shared.limiter.reset();
    }

    /// Changes ping interval, pong timeout and maximum age for connections opened from now on.
    pub fn set_ws_timings(
        &self,
        ping_interval: Duration,
        pong_timeout: Duration,
        max_age: Duration,
    ) {
        let mut ws = lock(&self.shared.ws);
        ws.ping_interval = ping_interval;
        ws.pong_timeout = pong_timeout;
        ws.max_age = max_age;
    }

    /// Subscription ids of connections opened from now on start at `id` (Binance: 0),
    /// so that a test reaches the 65,535 ids a connection may hand out (`-2042` after
    /// them) in a few subscriptions.
    pub fn set_first_subscription_id(&self, id: u64) {
        lock(&self.shared.ws).first_subscription_id = id;
    }

    // ---- faults -------------------------------------------------------------------------

    /// Drops user-stream connections (TCP closed, no close frame): all, or those subscribed
    /// for `api_key`. Returns how many.
    pub fn drop_streams(&self, api_key: Option<&str>) -> usize {
        self.shared.broadcast(api_key, &ConnMsg::Drop)
    }

    /// Stalls every stream: sockets stay open, no events and no pings are sent; events
    /// produced meanwhile are lost.
    pub fn set_streams_stalled(&self, on: bool) {
        self.shared.faults.stalled.store(on, Ordering::Relaxed);
    }

    /// Refuses new `/ws-api/v3` connections with HTTP 503.
    pub fn set_refuse_streams(&self, on: bool) {
        self.shared
            .faults
            .refuse_streams
            .store(on, Ordering::Relaxed);
    }

    /// Sends `serverShutdown` and closes: all connections or those subscribed for `api_key`.
    pub fn server_shutdown(&self, api_key: Option<&str>) -> usize {
        self.shared.broadcast(api_key, &ConnMsg::Shutdown)
    }

    /// Revokes an API key: REST answers `-2015`, WebSocket sessions subscribed for it get
    /// the revocation error and are closed.
    pub fn revoke_key(&self, api_key: &str) -> usize {
        if let Some(a) = self.shared.engine().accounts.get_mut(api_key) {
            a.revoked = true;
        }
        self.shared.broadcast(Some(api_key), &ConnMsg::Revoke)
    }

    /// Undoes [`Self::revoke_key`].
    pub fn restore_key(&self, api_key: &str) {
        if let Some(a) = self.shared.engine().accounts.get_mut(api_key) {
            a.revoked = false;
        }
    }

    /// Ends the subscriptions for `api_key` with `eventStreamTerminated` (connections stay open).
    pub fn terminate_subscriptions(&self, api_key: &str) -> usize {
        let subs: Vec<(u64, u64)> = self
            .shared
            .engine()
            .subs
            .get(api_key)
            .map(|v| v.iter().map(|s| (s.conn_id, s.sub_id)).collect())
            .unwrap_or_default();
        let conns = lock(&self.shared.conns);
        subs.iter()
            .filter_map(|(c, s)| conns.get(c).map(|h| (h, *s)))
            .filter(|(h, s)| h.tx.send(ConnMsg::Terminate(*s)).is_ok())
            .count()
    }

    /// Delays every REST answer (or those whose path starts with `path_prefix`).
    pub fn set_response_delay(&self, delay: Duration, path_prefix: Option<String>) {
        let mut r = lock(&self.shared.faults.rules);
        r.delay = delay;
        r.delay_prefix = path_prefix;
        self.shared.faults.rearm(&r);
    }

    /// Fails the next matching requests (see [`RequestFault`]).
    pub fn fail_requests(&self, fault: RequestFault) {
        let mut r = lock(&self.shared.faults.rules);
        r.requests.push(fault);
        self.shared.faults.rearm(&r);
    }

    /// Keeps each order and order list placed from now on out of the lookups
    /// Binance serves from its database for `lag` after its placement:
    /// `GET /api/v3/orderList` answers `-2018` "Order list does not exist.",
    /// `GET /api/v3/order` `-2013` "Order does not exist." (a reused client id
    /// finds the older order or list that had it), and `allOrderList` /
    /// `allOrders` leave it out. The open-order listings (`openOrderList`,
    /// `openOrders`), placements, cancels, matching and the user-data stream
    /// see it at once. For `api_key`'s account (its own lag then wins over the
    /// shared one), or every account with `None`. Each placement keeps the lag
    /// in force when it was made: a zero `lag` (or [`Self::clear_faults`])
    /// spares later placements, and those already lagging show when theirs ends.
    pub fn set_lookup_lag(&self, lag: Duration, api_key: Option<&str>) {
        let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        let mut eng = self.shared.engine();
        match api_key {
            Some(k) => {
                eng.knobs.lookup_lag_us_of.insert(k.to_string(), us);
            }
            None => eng.knobs.lookup_lag_us = us,
        }
    }

    /// Answers `-1021` to the next `n` signed requests.
    pub fn force_timestamp_errors(&self, n: u32) {
        let mut r = lock(&self.shared.faults.rules);
        r.force_1021 = n;
        self.shared.faults.rearm(&r);
    }

    /// Answers HTTP 429 (`-1003`, `Retry-After: retry_after_secs`) to the next `n` requests.
    pub fn throttle_requests(&self, n: u32, retry_after_secs: u64) {
        let mut r = lock(&self.shared.faults.rules);
        r.throttle = n;
        r.throttle_retry_after = retry_after_secs;
        self.shared.faults.rearm(&r);
    }

    /// Answers HTTP 429 (`-1003`, `Retry-After: retry_after_secs`) to the next `n`
    /// `/ws-api/v3` upgrade requests, before any WebSocket is opened.
    pub fn throttle_streams(&self, n: u32, retry_after_secs: u64) {
        let mut r = lock(&self.shared.faults.rules);
        r.stream_throttle = n;
        r.stream_throttle_retry_after = retry_after_secs;
        self.shared.faults.rearm(&r);
    }

    /// The next `n` stops that trigger expire with `EXECUTION_RULE_PRICE_RANGE_EXCEEDED`.
    pub fn expire_next_stops(&self, n: u32) {
        self.shared.engine().knobs.expire_next_stops = n;
    }

    /// Every fill on `symbol` from now on is split into `parts` trades (1 = normal).
    ///
    /// # Errors
    /// [`SimError::UnknownSymbol`].
    pub fn set_fill_parts(&self, symbol: &str, parts: u32) -> Result<(), SimError> {
        let mut eng = self.shared.engine();
        if !eng.symbols.contains_key(symbol) {
            return Err(SimError::UnknownSymbol(symbol.into()));
        }
        eng.knobs
            .fill_parts
            .insert(symbol.to_string(), parts.max(1));
        Ok(())
    }

    /// The next limit-type fill on `symbol` executes only `ratio` (0 < ratio < 1) of the
    /// remaining quantity (rounded down to the step, at least one step); the rest keeps
    /// resting until the price touches it again.
    ///
    /// # Errors
    /// [`SimError::UnknownSymbol`] or [`SimError::Invalid`] for a ratio outside (0, 1).
    pub fn partial_fill_next(&self, symbol: &str, ratio: Decimal) -> Result<(), SimError> {
        if ratio <= Decimal::ZERO || ratio >= Decimal::ONE {
            return Err(SimError::Invalid(format!("ratio {ratio} is not in (0, 1)")));
        }
        let mut eng = self.shared.engine();
        if !eng.symbols.contains_key(symbol) {
            return Err(SimError::UnknownSymbol(symbol.into()));
        }
        eng.knobs.partial_next.insert(symbol.to_string(), ratio);
        Ok(())
    }

    /// Clears every fault switch (streams, requests, knobs).
    pub fn clear_faults(&self) {
        self.set_streams_stalled(false);
        self.set_refuse_streams(false);
        {
            let mut r = lock(&self.shared.faults.rules);
            *r = crate::state::FaultRules::default();
            self.shared.faults.rearm(&r);
        }
        let mut eng = self.shared.engine();
        eng.knobs = crate::engine::Knobs::default();
    }
}
