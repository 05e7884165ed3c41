//! [`BinanceExchange`]: the `Exchange` port over Binance's signed REST API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use oco_core::ports::{
    Balance, CancelOutcome, Exchange, ListCancelOutcome, OcoAck, OcoRequest, OrderListSnapshot,
    OrderRequest, OrderSnapshot, Side,
};
use oco_core::{ApiCredentials, ExchangeError, Fill, Price, SymbolRules};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;
use tracing::{debug, instrument, warn};

use crate::config::BinanceConfig;
use crate::error::{
    BinanceError, Op, is_filter_failure, map_code, map_http_error, map_malformed, map_transport,
};
use crate::pacing::{Admit, Pacer, PacingSnapshot};
use crate::sign::{Query, rest_signature};
use crate::wire::{
    AccountWire, ApiErrorBody, ExchangeInfo, ListCancelWire, OrderListWire, OrderWire, ServerTime,
    TickerPrice, TradeWire, from_json,
};

/// Installs the ring crypto provider for rustls once per process (reqwest is
/// built without one). Another provider installed first is kept.
pub(crate) fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

/// The Binance Spot adapter of the [`Exchange`] port. Cheap to clone; clones
/// share the connection pool, the time offset, the pacer and the rules cache.
#[derive(Clone)]
pub struct BinanceExchange {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BinanceExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinanceExchange")
            .field("rest_base", &self.inner.config.rest_base)
            .finish_non_exhaustive()
    }
}

struct Inner {
    http: reqwest::Client,
    config: BinanceConfig,
    /// Server time minus local time, ms.
    offset_ms: AtomicI64,
    pacer: Arc<Pacer>,
    rules: Mutex<HashMap<String, (Instant, SymbolRules)>>,
}

/// One REST call.
struct Call<'a> {
    method: Method,
    path: &'static str,
    params: Vec<(&'static str, String)>,
    creds: Option<&'a ApiCredentials>,
    weight: u32,
    orders: u32,
    op: Op,
}

impl<'a> Call<'a> {
    fn new(method: Method, path: &'static str, op: Op, weight: u32) -> Self {
        Self {
            method,
            path,
            params: Vec::with_capacity(16),
            creds: None,
            weight,
            orders: 0,
            op,
        }
    }

    fn signed(mut self, creds: &'a ApiCredentials) -> Self {
        self.creds = Some(creds);
        self
    }

    fn orders(mut self, n: u32) -> Self {
        self.orders = n;
        self
    }

    fn param(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.params.push((name, value.into()));
        self
    }
}

/// A request that failed: the error, and Binance's code when its answer
/// carried one.
struct Refusal {
    err: ExchangeError,
    code: Option<i64>,
}

impl From<ExchangeError> for Refusal {
    fn from(err: ExchangeError) -> Self {
        Self { err, code: None }
    }
}

/// What an order of a list looked up by its id gave.
// Short-lived, two per lookup: boxing would cost an allocation per order read.
#[allow(clippy::large_enum_variant)]
enum MemberRead {
    Found(OrderWire),
    /// `-2026`: canceled or expired without a fill more than 90 days ago,
    /// archived by Binance for good. It sold nothing.
    Archived,
    /// Not found (yet): the order table may lag the list's.
    Missing,
}

/// What came back from an HTTP exchange, before interpretation.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
    /// Local time the request left, after pacing, ms.
    sent_ms: i64,
    /// Local time its answer's head came back, ms.
    received_ms: i64,
}

impl BinanceExchange {
    /// Builds the adapter (HTTP client with rustls and connection reuse).
    ///
    /// # Errors
    /// [`BinanceError::BadUrl`] for a REST base that is not `http(s)://`;
    /// [`BinanceError::Client`] when the HTTP client cannot be built.
    pub fn new(config: BinanceConfig) -> Result<Self, BinanceError> {
        let parsed = url::Url::parse(&config.rest_base).map_err(|e| BinanceError::BadUrl {
            what: "rest",
            url: config.rest_base.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(BinanceError::BadUrl {
                what: "rest",
                url: config.rest_base.clone(),
                reason: "scheme must be http or https".into(),
            });
        }
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(50))
            .build()
            .map_err(|e| BinanceError::Client(e.without_url().to_string()))?;
        let mut config = config;
        config.rest_base = config.rest_base.trim_end_matches('/').to_owned();
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                pacer: Arc::new(Pacer::new(config.pacing.clone())),
                config,
                offset_ms: AtomicI64::new(0),
                rules: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The request-weight pacer, for the user-data stream to charge its own
    /// requests to the same per-IP budget.
    pub(crate) fn pacer(&self) -> Arc<Pacer> {
        self.inner.pacer.clone()
    }

    /// Request weight used in the current minute by this instance (its IP).
    pub fn used_weight(&self) -> u32 {
        self.inner
            .pacer
            .snapshot(self.server_now_ms(), None)
            .used_weight_1m
    }

    /// Weight and order figures, order counts for `api_key`.
    pub fn pacing(&self, api_key: &str) -> PacingSnapshot {
        self.inner
            .pacer
            .snapshot(self.server_now_ms(), Some(api_key))
    }

    /// Server time minus local time as last measured, ms.
    pub fn time_offset_ms(&self) -> i64 {
        self.inner.offset_ms.load(Ordering::Relaxed)
    }

    /// Measures the server-time offset now (`GET /api/v3/time`). Done by
    /// itself after a `-1021`; call it at start-up to begin in sync.
    ///
    /// Refused with 429/418, it holds back the instance's requests as any
    /// refused request does: it is sent after `-1021`s, which a clock gone
    /// wrong repeats, and must not push the IP into a ban.
    ///
    /// # Errors
    /// [`ExchangeError::Transient`] when the server cannot be read;
    /// [`ExchangeError::RateLimited`] when it refuses the read (429/418).
    pub async fn sync_time(&self) -> Result<(), ExchangeError> {
        let answer = self
            .request(&Call::new(Method::GET, "/api/v3/time", Op::Read, 1))
            .await?;
        let t: ServerTime = parse_ok(Op::Read, &answer)?;
        // Measured around the exchange that answered, not the pacing or the
        // refusals waited out before it.
        let offset = t.server_time - (answer.sent_ms + answer.received_ms) / 2;
        self.inner.offset_ms.store(offset, Ordering::Relaxed);
        debug!(offset_ms = offset, "server time offset measured");
        Ok(())
    }

    fn server_now_ms(&self) -> i64 {
        local_now_ms() + self.inner.offset_ms.load(Ordering::Relaxed)
    }

    /// Sends `call`: paces, signs, retries once after a `-1021` re-sync and
    /// after a short `Retry-After`, and maps failures.
    async fn request(&self, call: &Call<'_>) -> Result<Answer, ExchangeError> {
        self.request_coded(call).await.map_err(|r| r.err)
    }

    /// [`Self::request`], keeping Binance's code of a refusal for the
    /// callers that must tell codes mapped alike apart.
    async fn request_coded(&self, call: &Call<'_>) -> Result<Answer, Refusal> {
        let mut resynced = false;
        let mut rate_retries = 0;
        // An order write leaves within `pacing.max_wait` of the call or not at
        // all, whatever the waits and retries add up to: its legs are claimed
        // before it, and a claim without an outcome is taken over as stale
        // after the claim timeout, so an order held longer could go out
        // beside the one that replaced it (a market sell cannot be withdrawn).
        let deadline = (call.orders > 0)
            .then(|| tokio::time::Instant::now() + self.inner.config.pacing.max_wait);
        loop {
            let answer = self.send(call, deadline).await?;
            if (200..300).contains(&answer.status) {
                return Ok(answer);
            }
            let body: Option<ApiErrorBody> = serde_json::from_str(&answer.body).ok();
            let code = body.as_ref().map(|b| b.code);
            let retry_after = retry_after(&answer.headers);
            if matches!(answer.status, 418 | 429) {
                let wait = retry_after.unwrap_or(Duration::from_secs(if answer.status == 418 {
                    120
                } else {
                    10
                }));
                let until = self
                    .server_now_ms()
                    .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
                match (answer.status, code, call.creds) {
                    // Too many new orders: Binance counts unfilled orders per
                    // account, so only this key's placements wait; blocking
                    // the instance would leave every other account's stops
                    // unplaced until then (up to the next UTC midnight for
                    // the daily count).
                    (429, Some(-1015), Some(creds)) => {
                        self.inner.pacer.hold_orders(&creds.api_key, until);
                    }
                    // Request weight and bans are per IP: every request of
                    // the instance waits.
                    _ => self.inner.pacer.block_until(until),
                }
                // A 429 is a refusal before execution: waiting and sending
                // again is safe, even for a placement. A 418 ban is not waited out.
                if answer.status == 429
                    && rate_retries < 2
                    && wait <= self.inner.config.pacing.max_wait
                {
                    rate_retries += 1;
                    warn!(path = call.path, ?wait, "rate limited, waiting as told");
                    continue;
                }
            }
            if code == Some(-1021) && call.creds.is_some() && !resynced {
                resynced = true;
                warn!(
                    path = call.path,
                    "timestamp outside recvWindow, re-syncing server time"
                );
                // Boxed: the re-sync is itself a request (unsigned, so it
                // never comes back here).
                Box::pin(self.sync_time()).await?;
                continue;
            }
            let err = map_http_error(
                call.op,
                answer.status,
                code,
                body.as_ref().map(|b| b.msg.as_str()),
                retry_after,
            );
            debug!(path = call.path, status = answer.status, error = %err, "request failed");
            return Err(Refusal { err, code });
        }
    }

    /// One HTTP exchange, after pacing (refused as rate-limited when pacing
    /// would pass `deadline`). Never logs or returns the signed URL.
    async fn send(
        &self,
        call: &Call<'_>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Answer, ExchangeError> {
        self.pace(call, deadline).await?;
        let url = self.signed_url(call);
        let mut req = self.inner.http.request(call.method.clone(), url);
        if let Some(creds) = call.creds {
            req = req.header("X-MBX-APIKEY", &creds.api_key);
        }
        let describe =
            |e: reqwest::Error| format!("{} {}: {}", call.method, call.path, e.without_url());
        let sent_ms = local_now_ms();
        let resp = req
            .send()
            .await
            .map_err(|e| map_transport(call.op, e.is_connect(), e.is_timeout(), describe(e)))?;
        let received_ms = local_now_ms();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        self.observe(&headers, call.creds.map(|c| c.api_key.as_str()));
        let body = resp
            .text()
            .await
            .map_err(|e| map_transport(call.op, false, e.is_timeout(), describe(e)))?;
        Ok(Answer {
            status,
            headers,
            body,
            sent_ms,
            received_ms,
        })
    }

    fn signed_url(&self, call: &Call<'_>) -> String {
        let mut q = Query::new();
        for (k, v) in &call.params {
            q.push(k, v);
        }
        if let Some(creds) = call.creds {
            q.push(
                "recvWindow",
                &self.inner.config.recv_window.as_millis().to_string(),
            );
            q.push("timestamp", &self.server_now_ms().to_string());
            let signature = rest_signature(&creds.secret, q.as_str());
            q.push("signature", &signature);
        }
        let base = &self.inner.config.rest_base;
        if q.is_empty() {
            format!("{base}{}", call.path)
        } else {
            format!("{base}{}?{}", call.path, q.as_str())
        }
    }

    async fn pace(
        &self,
        call: &Call<'_>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), ExchangeError> {
        let key = call.creds.map(|c| c.api_key.as_str());
        loop {
            // Past the deadline even a free slot is refused: a -1021 re-sync
            // or a short Retry-After may have spent the time already.
            if let Some(end) = deadline {
                let now = tokio::time::Instant::now();
                if now >= end {
                    return Err(ExchangeError::RateLimited {
                        retry_after: Duration::from_millis(1),
                    });
                }
            }
            match self
                .inner
                .pacer
                .admit(self.server_now_ms(), call.weight, key, call.orders)
            {
                Admit::Go => return Ok(()),
                Admit::Wait(d)
                    if d <= self.inner.config.pacing.max_wait
                        && deadline.is_none_or(|end| tokio::time::Instant::now() + d <= end) =>
                {
                    debug!(path = call.path, wait = ?d, "pacing");
                    tokio::time::sleep(d).await;
                }
                Admit::Wait(d) => return Err(ExchangeError::RateLimited { retry_after: d }),
            }
        }
    }

    fn observe(&self, headers: &HeaderMap, api_key: Option<&str>) {
        let num = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        self.inner.pacer.observe(
            self.server_now_ms(),
            api_key,
            num("x-mbx-used-weight-1m"),
            num("x-mbx-order-count-10s"),
            num("x-mbx-order-count-1d"),
        );
    }

    async fn get_json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, ExchangeError> {
        let answer = self.request(&call).await?;
        parse_ok(call.op, &answer)
    }

    async fn list_order_by_id(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<MemberRead, ExchangeError> {
        let call = Call::new(Method::GET, "/api/v3/order", Op::Read, 4)
            .signed(creds)
            .param("symbol", symbol)
            .param("orderId", order_id.to_string());
        match self.request_coded(&call).await {
            Ok(answer) => parse_ok(Op::Read, &answer).map(MemberRead::Found),
            Err(Refusal {
                code: Some(-2026), ..
            }) => Ok(MemberRead::Archived),
            Err(Refusal {
                err: ExchangeError::NotFound,
                ..
            }) => Ok(MemberRead::Missing),
            Err(r) => Err(r.err),
        }
    }

    /// The open list `list_client_id` of the account, if any
    /// (`GET /api/v3/openOrderList`, weight 6, memory first).
    async fn open_list(
        &self,
        creds: &ApiCredentials,
        list_client_id: &str,
    ) -> Result<Option<OrderListWire>, ExchangeError> {
        let lists: Vec<OrderListWire> = self
            .get_json(Call::new(Method::GET, "/api/v3/openOrderList", Op::Read, 6).signed(creds))
            .await?;
        Ok(lists
            .into_iter()
            .find(|l| l.list_client_order_id == list_client_id))
    }

    fn after_rejection(&self, symbol: &str, err: &ExchangeError) {
        if is_filter_failure(err) {
            debug!(symbol, "filter failure, dropping cached rules");
            self.invalidate_rules(symbol);
        }
    }
}

fn parse_ok<T: DeserializeOwned>(op: Op, answer: &Answer) -> Result<T, ExchangeError> {
    from_json(&answer.body).map_err(|e| map_malformed(op, e.0))
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn local_now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Buy => "BUY",
        Side::Sell => "SELL",
    }
}

fn not_open_on_2011<T>(r: Result<T, ExchangeError>) -> Result<CancelOutcome, ExchangeError> {
    match r {
        Ok(_) => Ok(CancelOutcome::Canceled),
        Err(ExchangeError::Rejected { code: -2011, .. }) => Ok(CancelOutcome::NotOpen),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Exchange for BinanceExchange {
    #[instrument(skip(self), level = "debug")]
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError> {
        if let Some(rules) = self.cached_symbol_rules(symbol) {
            return Ok(rules);
        }
        let info: ExchangeInfo = self
            .get_json(
                Call::new(Method::GET, "/api/v3/exchangeInfo", Op::Read, 20)
                    .param("symbol", symbol),
            )
            .await?;
        let sym = info
            .symbols
            .iter()
            .find(|s| s.symbol == symbol)
            .ok_or_else(|| {
                ExchangeError::Transient(format!("exchangeInfo has no symbol {symbol}"))
            })?;
        let rules = sym
            .to_rules()
            .map_err(|e| ExchangeError::Transient(format!("exchangeInfo of {symbol}: {e}")))?;
        self.inner
            .rules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(symbol.to_owned(), (Instant::now(), rules.clone()));
        Ok(rules)
    }

    fn cached_symbol_rules(&self, symbol: &str) -> Option<SymbolRules> {
        let cache = self
            .inner
            .rules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache
            .get(symbol)
            .filter(|(at, _)| at.elapsed() < self.inner.config.rules_ttl)
            .map(|(_, rules)| rules.clone())
    }

    fn invalidate_rules(&self, symbol: &str) {
        self.inner
            .rules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(symbol);
    }

    // From the pacer's state for the key: a `-1015` hold in force, or the
    // day's order count spent (an OCO counts 2). Only waits a placement
    // would not wait out (`pacing.max_wait`) hold it; shorter ones, the
    // 10 s count's among them, it sends after.
    fn placements_held(&self, creds: &ApiCredentials, lists: u32) -> Option<Duration> {
        self.inner
            .pacer
            .orders_held(
                self.server_now_ms(),
                &creds.api_key,
                lists.saturating_mul(2),
            )
            .filter(|wait| *wait > self.inner.config.pacing.max_wait)
    }

    #[instrument(skip(self), level = "debug")]
    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError> {
        let t: TickerPrice = self
            .get_json(
                Call::new(Method::GET, "/api/v3/ticker/price", Op::Read, 2).param("symbol", symbol),
            )
            .await?;
        t.price
            .parse::<Price>()
            .map_err(|e| map_malformed(Op::Read, e.to_string()))
    }

    #[instrument(skip_all, level = "debug")]
    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError> {
        let a: AccountWire = self
            .get_json(Call::new(Method::GET, "/api/v3/account", Op::Read, 20).signed(creds))
            .await?;
        a.to_balances().map_err(|e| map_malformed(Op::Read, e.0))
    }

    #[instrument(skip(self, creds), fields(symbol = %order.symbol, client_id = %order.client_id), level = "debug")]
    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        let mut call = Call::new(Method::POST, "/api/v3/order", Op::Write, 1)
            .signed(creds)
            .orders(1)
            .param("symbol", order.symbol.as_str())
            .param("side", side_name(order.side));
        call = match order.limit {
            None => call.param("type", "MARKET"),
            Some(p) => call
                .param("type", "LIMIT")
                .param("timeInForce", "GTC")
                .param("price", p.to_string()),
        };
        call = match order.size {
            oco_core::model::OrderSize::Base(q) => call.param("quantity", q.to_string()),
            oco_core::model::OrderSize::Quote(d) => {
                call.param("quoteOrderQty", d.normalize().to_string())
            }
        };
        let call = call
            .param("newClientOrderId", order.client_id.as_str())
            .param("newOrderRespType", "FULL");
        let result = self.get_json::<OrderWire>(call).await;
        match result {
            Ok(o) => o.to_snapshot().map_err(|e| map_malformed(Op::Write, e.0)),
            Err(e) => {
                self.after_rejection(&order.symbol, &e);
                Err(e)
            }
        }
    }

    #[instrument(skip(self, creds), level = "debug")]
    async fn query_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError> {
        let o: OrderWire = self
            .get_json(
                Call::new(Method::GET, "/api/v3/order", Op::Read, 4)
                    .signed(creds)
                    .param("symbol", symbol)
                    .param("origClientOrderId", client_id),
            )
            .await?;
        o.to_snapshot().map_err(|e| map_malformed(Op::Read, e.0))
    }

    #[instrument(skip(self, creds), level = "debug")]
    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        let trades: Vec<TradeWire> = self
            .get_json(
                Call::new(Method::GET, "/api/v3/myTrades", Op::Read, 5)
                    .signed(creds)
                    .param("symbol", symbol)
                    .param("orderId", order_id.to_string()),
            )
            .await?;
        trades
            .iter()
            .map(TradeWire::to_fill)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| map_malformed(Op::Read, e.0))
    }

    #[instrument(skip(self, creds), level = "debug")]
    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError> {
        let call = Call::new(Method::DELETE, "/api/v3/order", Op::Write, 1)
            .signed(creds)
            .param("symbol", symbol)
            .param("origClientOrderId", client_id);
        not_open_on_2011(self.request(&call).await)
    }

    #[instrument(skip(self, creds), fields(symbol = %oco.symbol, list = %oco.ids.list), level = "debug")]
    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError> {
        let mut call = Call::new(Method::POST, "/api/v3/orderList/oco", Op::Write, 1)
            .signed(creds)
            .orders(2)
            .param("symbol", oco.symbol.as_str())
            .param("side", "SELL")
            .param("quantity", oco.qty.to_string())
            .param("listClientOrderId", oco.ids.list.as_str())
            .param("aboveType", "LIMIT_MAKER")
            .param("abovePrice", oco.take_profit.to_string())
            .param("aboveClientOrderId", oco.ids.take_profit.as_str())
            .param("belowClientOrderId", oco.ids.stop_loss.as_str())
            .param("belowStopPrice", oco.stop.to_string());
        call = match oco.stop_limit {
            Some(limit) => call
                .param("belowType", "STOP_LOSS_LIMIT")
                .param("belowPrice", limit.to_string())
                .param("belowTimeInForce", "GTC"),
            None => call.param("belowType", "STOP_LOSS"),
        };
        let call = call.param("newOrderRespType", "RESULT");
        match self.get_json::<OrderListWire>(call).await {
            Ok(list) => list
                .to_ack(oco.ids.take_profit.as_str(), oco.ids.stop_loss.as_str())
                .map_err(|e| map_malformed(Op::Write, e.0)),
            Err(e) => {
                self.after_rejection(&oco.symbol, &e);
                Err(e)
            }
        }
    }

    #[instrument(skip(self, creds), level = "debug")]
    async fn order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError> {
        let call = Call::new(Method::GET, "/api/v3/orderList", Op::Read, 4)
            .signed(creds)
            .param("origClientOrderId", list_client_id);
        // GET orderList reads the database only, which a list placed a
        // moment ago (its answer lost, say) may not have reached; the open
        // lists are read from memory first. "No such list" is answered only
        // when neither has it: the caller takes it, past its claim timeout,
        // as never placed and places another set beside it.
        let (list, open) = match self.get_json::<OrderListWire>(call).await {
            Ok(l) => (l, false),
            Err(ExchangeError::NotFound) => match self.open_list(creds, list_client_id).await? {
                Some(l) => (l, true),
                None => return Ok(None),
            },
            Err(e) => return Err(e),
        };
        // GET orderList names the orders only; each leg's state is one more
        // read (weight 4 each), both at once.
        let legs = futures_util::future::join_all(
            list.orders
                .iter()
                .map(|m| self.list_order_by_id(creds, &m.symbol, m.order_id)),
        )
        .await;
        let mut full = list.clone();
        let mut missing = Vec::new();
        for (m, leg) in list.orders.iter().zip(legs) {
            match leg? {
                MemberRead::Found(order) => full.order_reports.push(order),
                // Nothing sold and nothing to wait for: left out, the other
                // order tells how the list ended.
                MemberRead::Archived => {
                    debug!(
                        list = list_client_id,
                        order_id = m.order_id,
                        "list order archived"
                    );
                }
                MemberRead::Missing => missing.push(m.order_id),
            }
        }
        // A list read without one of its orders would tell a different end
        // (a take-profit fill read as its stop expired alone, the sale never
        // recorded): the list is read from the database, which may run ahead
        // of the order table for a moment, so the read is made again later.
        // A list found open has not ended: it is answered with no order
        // states at all, as `open_order_lists` answers it (one found order
        // alone, a stop canceled by a take-profit's partial fill say, would
        // again tell another end).
        if !missing.is_empty() {
            if !open {
                return Err(ExchangeError::Transient(format!(
                    "list read incomplete: orders {missing:?} of list {list_client_id} not found"
                )));
            }
            debug!(
                list = list_client_id,
                ?missing,
                "open list's orders not found yet, answered without their states"
            );
            full.order_reports.clear();
        }
        full.to_snapshot(None, None)
            .map(Some)
            .map_err(|e| map_malformed(Op::Read, e.0))
    }

    #[instrument(skip_all, level = "debug")]
    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError> {
        // One call (weight 6) for the whole account; leg states are left
        // `None` rather than spending 8 more weight per list. Callers that
        // need them ask `order_list` for the lists they care about.
        let lists: Vec<OrderListWire> = self
            .get_json(Call::new(Method::GET, "/api/v3/openOrderList", Op::Read, 6).signed(creds))
            .await?;
        lists
            .iter()
            .map(|l| l.to_snapshot(None, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| map_malformed(Op::Read, e.0))
    }

    #[instrument(skip(self, creds), level = "debug")]
    async fn open_order_ids(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
    ) -> Result<Option<Vec<String>>, ExchangeError> {
        // With the symbol: weight 6 (80 without). The orders of lists are
        // included, each under its own client id.
        let orders: Vec<OrderWire> = self
            .get_json(
                Call::new(Method::GET, "/api/v3/openOrders", Op::Read, 6)
                    .signed(creds)
                    .param("symbol", symbol),
            )
            .await?;
        Ok(Some(
            orders.into_iter().map(|o| o.client_order_id).collect(),
        ))
    }

    #[instrument(skip(self, creds), level = "debug")]
    async fn cancel_order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError> {
        let call = Call::new(Method::DELETE, "/api/v3/orderList", Op::Write, 1)
            .signed(creds)
            .param("symbol", symbol)
            .param("listClientOrderId", list_client_id);
        let answer = match self.request(&call).await {
            Ok(answer) => answer,
            Err(ExchangeError::Rejected { code: -2011, .. }) => {
                return Ok(ListCancelOutcome::NotOpen);
            }
            Err(e) => return Err(e),
        };
        // The list is canceled whatever the body says: an answer that cannot
        // be read only sends the caller to look the sale up.
        let sold = from_json::<ListCancelWire>(&answer.body).and_then(|w| w.to_sold());
        Ok(ListCancelOutcome::Canceled(sold.unwrap_or_else(|e| {
            warn!(list = list_client_id, error = %e, "list cancel answer unreadable");
            None
        })))
    }
}

/// Maps a WebSocket API error the way REST errors are mapped (used by the
/// stream for its subscribe answer).
pub(crate) fn map_ws_error(code: i64, msg: &str) -> ExchangeError {
    map_code(Op::Read, code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::BinanceUserStream;

    #[test]
    fn https_and_wss_configs_build_with_the_ring_provider() {
        for config in [BinanceConfig::production(), BinanceConfig::testnet()] {
            assert!(config.rest_base.starts_with("https://"));
            BinanceExchange::new(config.clone()).unwrap();
            BinanceUserStream::new(config).unwrap();
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        let config = BinanceConfig::custom("ftp://x", "http://x");
        assert!(matches!(
            BinanceExchange::new(config.clone()),
            Err(BinanceError::BadUrl { .. })
        ));
        assert!(matches!(
            BinanceUserStream::new(config),
            Err(BinanceError::BadUrl { .. })
        ));
    }

    #[test]
    fn signed_url_carries_recv_window_timestamp_and_signature_last() {
        let ex = BinanceExchange::new(BinanceConfig::custom(
            "http://127.0.0.1:1/",
            "ws://127.0.0.1:1",
        ))
        .unwrap();
        let creds = ApiCredentials {
            api_key: "k".into(),
            secret: secrecy::SecretString::from("s"),
        };
        let call = Call::new(Method::GET, "/api/v3/order", Op::Read, 4)
            .signed(&creds)
            .param("symbol", "BTCUSDT")
            .param("origClientOrderId", "og-E-1");
        let url = ex.signed_url(&call);
        let (base, query) = url.split_once('?').unwrap();
        assert_eq!(base, "http://127.0.0.1:1/api/v3/order");
        let (payload, signature) = query.rsplit_once("&signature=").unwrap();
        assert!(
            payload
                .starts_with("symbol=BTCUSDT&origClientOrderId=og-E-1&recvWindow=5000&timestamp=")
        );
        assert_eq!(signature, crate::sign::hmac_hex(b"s", payload.as_bytes()));
    }
}
