//! Shared test world: the router on `MemStore` (behind [`Hooks`]) and an
//! exchange double that adds resting-entry cancels, partial fills and
//! scripted placement faults to oco-core's `FakeExchange`.
#![allow(dead_code, clippy::unwrap_used)]

mod hooks;

pub use hooks::Hooks;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{AppState, hash_token};
use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use oco_core::mem::MemStore;
use oco_core::model::{Fill, Millis};
use oco_core::ports::{
    ApiCredentials, Balance, CancelOutcome, Clock, Exchange, ExchangeError, ListCancelOutcome,
    OcoAck, OcoRequest, OrderListSnapshot, OrderRequest, OrderSnapshot, Users,
};
use oco_core::testing::{FakeExchange, Hooked, btcusdt_rules};
use oco_core::{
    AccountId, Asset, EntryStatus, IdScheme, Price, Protector, ProtectorConfig, Qty, SymbolRules,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{Value, json};
use tower::ServiceExt;

pub const ALICE_TOKEN: &str = "ogt_alice_token_0123456789abcdef";
pub const BOB_TOKEN: &str = "ogt_bob_token_fedcba9876543210";
pub const ALICE_KEY: &str = "alice-api-key";
pub const ALICE_SECRET: &str = "alice-very-secret-signing-key";
pub const BOB_KEY: &str = "bob-api-key";
pub const BOB_SECRET: &str = "bob-very-secret-signing-key";

/// A fixed clock.
pub struct TestClock;

impl Clock for TestClock {
    fn now(&self) -> Millis {
        Millis(1_700_000_000_000)
    }
}

/// What the next `place_order` does instead of its normal work.
#[derive(Debug, Clone)]
pub enum PlaceFault {
    /// Answers as if the connection dropped, placing nothing.
    UnknownBeforeApply,
    /// Places the order, then answers as if the connection dropped.
    UnknownAfterApply,
    /// Refuses with this error.
    Fail(ExchangeError),
    /// Places the order, then waits this long before answering.
    SlowAnswer(Duration),
    /// Panics before anything reaches the exchange, as a bug in the
    /// placement task would.
    Panic,
}

#[derive(Default)]
struct Resting {
    orders: HashMap<(String, String), OrderSnapshot>,
}

/// `FakeExchange` plus resting entry orders that can be part filled and
/// canceled, and scripted placement faults.
pub struct TestExchange {
    pub fake: FakeExchange,
    resting: Mutex<Resting>,
    faults: Mutex<VecDeque<PlaceFault>>,
    place_calls: AtomicUsize,
    next_trade: AtomicUsize,
    /// The next order lookup answers only after this long.
    slow_next_query: Mutex<Option<Duration>>,
}

impl TestExchange {
    pub fn new() -> Self {
        let fake = FakeExchange::new();
        fake.add_symbol(btcusdt_rules(), Price::new(dec!(100)).unwrap());
        let mut halted: SymbolRules = btcusdt_rules();
        halted.symbol.name = "HALTUSDT".into();
        halted.symbol.base = Asset("HALT".into());
        halted.trading = false;
        fake.add_symbol(halted, Price::new(dec!(100)).unwrap());
        Self {
            fake,
            resting: Mutex::default(),
            faults: Mutex::default(),
            slow_next_query: Mutex::default(),
            place_calls: AtomicUsize::new(0),
            next_trade: AtomicUsize::new(1_000_000),
        }
    }

    /// The next order lookup answers only after `wait`.
    pub fn slow_next_query(&self, wait: Duration) {
        *self.slow_next_query.lock().unwrap() = Some(wait);
    }

    pub fn push_fault(&self, fault: PlaceFault) {
        self.faults.lock().unwrap().push_back(fault);
    }

    /// How many entry orders were sent.
    pub fn place_calls(&self) -> usize {
        self.place_calls.load(Ordering::SeqCst)
    }

    /// Fills `qty` of a resting entry at its limit price and credits the base.
    pub fn fill_resting(&self, api_key: &str, client_id: &str, qty: Decimal, price: Decimal) {
        self.fill_resting_paying(api_key, client_id, qty, price, Decimal::ZERO);
    }

    /// [`TestExchange::fill_resting`] with a commission of `base_fee` paid in
    /// the base asset: `qty - base_fee` is credited.
    pub fn fill_resting_paying(
        &self,
        api_key: &str,
        client_id: &str,
        qty: Decimal,
        price: Decimal,
        base_fee: Decimal,
    ) {
        let mut r = self.resting.lock().unwrap();
        let snap = r
            .orders
            .get_mut(&(api_key.to_owned(), client_id.to_owned()))
            .unwrap();
        let trade_id = self.next_trade.fetch_add(1, Ordering::SeqCst) as i64;
        let fill = Fill {
            trade_id,
            price: Price::new(price).unwrap(),
            qty: Qty::new(qty).unwrap(),
            commission: base_fee,
            // Resting entries are all on BTCUSDT.
            commission_asset: Asset(if base_fee.is_zero() { "BNB" } else { "BTC" }.into()),
            time: Millis(1_700_000_000_000),
        };
        snap.executed_qty = snap.executed_qty.plus(fill.qty);
        snap.cumulative_quote += qty * price;
        snap.status = EntryStatus::PartiallyFilled;
        snap.fills.push(fill);
        let (free, _) = self.fake.balance(api_key, "BTC");
        self.fake.set_free(api_key, "BTC", free + qty - base_fee);
    }

    fn resting(&self, api_key: &str, client_id: &str) -> Option<OrderSnapshot> {
        self.resting
            .lock()
            .unwrap()
            .orders
            .get(&(api_key.to_owned(), client_id.to_owned()))
            .cloned()
    }
}

#[async_trait]
impl Exchange for TestExchange {
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError> {
        self.fake.symbol_rules(symbol).await
    }
    fn invalidate_rules(&self, symbol: &str) {
        self.fake.invalidate_rules(symbol)
    }
    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError> {
        self.fake.last_price(symbol).await
    }
    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError> {
        self.fake.balances(creds).await
    }
    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.place_calls.fetch_add(1, Ordering::SeqCst);
        let fault = self.faults.lock().unwrap().pop_front();
        let result = match fault {
            Some(PlaceFault::UnknownBeforeApply) => {
                return Err(ExchangeError::UnknownOutcome("timeout".into()));
            }
            Some(PlaceFault::Fail(e)) => return Err(e),
            Some(PlaceFault::Panic) => panic!("placement task panics (scripted)"),
            Some(PlaceFault::UnknownAfterApply | PlaceFault::SlowAnswer(_)) | None => {
                self.fake.place_order(creds, order).await?
            }
        };
        if let Some(PlaceFault::SlowAnswer(delay)) = fault {
            tokio::time::sleep(delay).await;
        }
        if result.status == EntryStatus::New {
            self.resting.lock().unwrap().orders.insert(
                (creds.api_key.clone(), order.client_id.as_str().to_owned()),
                result.clone(),
            );
        }
        if matches!(fault, Some(PlaceFault::UnknownAfterApply)) {
            return Err(ExchangeError::UnknownOutcome("connection reset".into()));
        }
        Ok(result)
    }
    async fn query_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError> {
        let slow = self.slow_next_query.lock().unwrap().take();
        if let Some(wait) = slow {
            tokio::time::sleep(wait).await;
        }
        match self.resting(&creds.api_key, client_id) {
            // As on Binance, an order lookup carries no trades.
            Some(snap) => Ok(OrderSnapshot {
                fills: Vec::new(),
                ..snap
            }),
            None => self.fake.query_order(creds, symbol, client_id).await,
        }
    }
    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        let resting = self
            .resting
            .lock()
            .unwrap()
            .orders
            .iter()
            .find(|((key, _), snap)| key == &creds.api_key && snap.order_id == order_id)
            .map(|(_, snap)| snap.fills.clone());
        match resting {
            Some(fills) => Ok(fills),
            None => self.fake.order_trades(creds, symbol, order_id).await,
        }
    }
    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError> {
        let key = (creds.api_key.clone(), client_id.to_owned());
        {
            let mut r = self.resting.lock().unwrap();
            if let Some(snap) = r.orders.get_mut(&key) {
                return Ok(if snap.status.is_final() {
                    CancelOutcome::NotOpen
                } else {
                    snap.status = EntryStatus::Canceled;
                    CancelOutcome::Canceled
                });
            }
        }
        self.fake.cancel_order(creds, symbol, client_id).await
    }
    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError> {
        self.fake.place_oco(creds, oco).await
    }
    async fn order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError> {
        self.fake.order_list(creds, symbol, list_client_id).await
    }
    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError> {
        self.fake.open_order_lists(creds).await
    }
    async fn cancel_order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError> {
        self.fake
            .cancel_order_list(creds, symbol, list_client_id)
            .await
    }
}

pub struct World {
    pub router: Router,
    pub store: Arc<MemStore>,
    /// The hooks on the store the router sees (`store` behind them), to arm.
    pub hooks: Arc<Hooks>,
    pub exchange: Arc<TestExchange>,
    pub alice_account: i64,
    pub bob_account: i64,
    /// Every response body seen, for the secrets check.
    pub bodies: Mutex<Vec<String>>,
}

pub async fn world() -> World {
    world_with(|config| config).await
}

/// [`world`] with the protector's settings changed by `config`.
pub async fn world_with(config: impl FnOnce(ProtectorConfig) -> ProtectorConfig) -> World {
    let store = Arc::new(MemStore::new());
    let hooks = Arc::new(Hooks::default());
    let hooked = Arc::new(Hooked::new(store.clone(), hooks.clone()));
    let exchange = Arc::new(TestExchange::new());
    let clock = Arc::new(TestClock);
    let ids = IdScheme::new("og").unwrap();
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        hooked.clone(),
        clock.clone(),
        config(ProtectorConfig::new(ids.clone())),
    ));
    store
        .create_user("alice", &hash_token(ALICE_TOKEN))
        .await
        .unwrap();
    store
        .create_user("bob", &hash_token(BOB_TOKEN))
        .await
        .unwrap();
    let router = api::router(AppState {
        store: hooked,
        users: store.clone(),
        exchange: exchange.clone(),
        protector,
        clock,
        ids,
        coverage: store.clone(),
    });
    for key in [ALICE_KEY, BOB_KEY] {
        exchange.fake.set_free(key, "USDT", dec!(1000000));
    }
    let mut w = World {
        router,
        store,
        hooks,
        exchange,
        alice_account: 0,
        bob_account: 0,
        bodies: Mutex::default(),
    };
    w.alice_account = w.register(ALICE_TOKEN, ALICE_KEY, ALICE_SECRET).await;
    w.bob_account = w.register(BOB_TOKEN, BOB_KEY, BOB_SECRET).await;
    w
}

impl World {
    async fn register(&self, token: &str, key: &str, secret: &str) -> i64 {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/accounts",
                Some(token),
                Some(json!({"exchange": "binance", "apiKey": key, "apiSecret": secret})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_i64().unwrap()
    }

    /// Sends a request; a JSON body is sent with `Content-Type: application/json`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let raw = body.map(|b| b.to_string());
        self.raw(
            method,
            path,
            token,
            raw.as_deref(),
            Some("application/json"),
        )
        .await
    }

    /// Sends a raw body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        content_type: Option<&str>,
    ) -> (StatusCode, Value) {
        let (status, _, value) = self
            .send(method, path, token, &[], body, content_type)
            .await;
        (status, value)
    }

    /// `POST /v1/entries` with `Idempotency-Key` headers (raw bytes, each
    /// sent as given); the answer's headers too.
    pub async fn post_entry_keyed(
        &self,
        token: &str,
        body: Value,
        keys: &[&[u8]],
    ) -> (StatusCode, HeaderMap, Value) {
        let headers: Vec<(&str, &[u8])> = keys.iter().map(|k| ("Idempotency-Key", *k)).collect();
        self.send(
            Method::POST,
            "/v1/entries",
            Some(token),
            &headers,
            Some(&body.to_string()),
            Some("application/json"),
        )
        .await
    }

    /// Sends a request with extra headers; the answer's status, headers and body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &[u8])],
        body: Option<&str>,
        content_type: Option<&str>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            req = req.header(*name, axum::http::HeaderValue::from_bytes(value).unwrap());
        }
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let (Some(ct), Some(_)) = (content_type, body) {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        self.bodies.lock().unwrap().push(text.clone());
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, headers, value)
    }

    pub async fn post_entry(&self, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, "/v1/entries", Some(token), Some(body))
            .await
    }

    /// A MARKET entry of 1 BTC on alice's account, TP 101/102, SL 99.
    pub fn market(&self) -> Value {
        json!({
            "account": self.alice_account,
            "symbol": "BTCUSDT",
            "type": "MARKET",
            "quantity": "1",
            "tp": ["101", "102"],
            "sl": "99",
            "signalId": "sig-7",
        })
    }

    /// Entries stored for an account.
    pub async fn stored(&self, account: i64) -> usize {
        self.store
            .entries_of(AccountId(account), None, 1000)
            .await
            .unwrap()
            .len()
    }
}

/// Polls `check` until it holds (true) or `within` has passed (false).
pub async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
