//! End to end: the binary's wiring over real HTTP, `exchange-sim` on
//! 127.0.0.1:0 behind the real Binance adapter, and a store: `MemStore`, and
//! PostgreSQL (`TestDb`, `DATABASE_URL`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::AccountId;
use oco_core::mem::MemStore;
use oco_core::ports::{Store, SystemClock, Users};
use reqwest::StatusCode;
use rust_decimal_macros::dec;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const ALICE_KEY: &str = "alice-e2e-key";
const ALICE_SECRET: &str = "alice-e2e-secret";
const BOB_KEY: &str = "bob-e2e-key";
const BOB_SECRET: &str = "bob-e2e-secret";

struct Stack<S> {
    sim: Sim,
    store: Arc<S>,
    base: String,
    http: reqwest::Client,
    alice: String,
    bob: String,
    alice_account: i64,
    _stop: oneshot::Sender<()>,
}

async fn stack<S: Store + Users + oco_core::ports::Coverage + 'static>(store: Arc<S>) -> Stack<S> {
    let sim = Sim::start(
        SimConfig::new("127.0.0.1:0".parse().unwrap())
            .with_account(AccountSpec::new(
                ALICE_KEY,
                ALICE_SECRET,
                vec![("USDT".into(), dec!(100000))],
            ))
            .with_account(AccountSpec::new(
                BOB_KEY,
                BOB_SECRET,
                vec![("USDT".into(), dec!(100000))],
            )),
    )
    .await
    .unwrap();
    let exchange =
        BinanceExchange::new(BinanceConfig::custom(sim.base_url(), sim.ws_api_url())).unwrap();
    let state = api_bin::app_state(
        store.clone(),
        Arc::new(exchange),
        Arc::new(SystemClock),
        "og",
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(api_bin::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let alice = api_bin::add_user(&*store, "alice").await.unwrap();
    let bob = api_bin::add_user(&*store, "bob").await.unwrap();
    let mut s = Stack {
        sim,
        store,
        base,
        http: reqwest::Client::new(),
        alice,
        bob,
        alice_account: 0,
        _stop: stop,
    };
    let (status, body) = s
        .send(
            reqwest::Method::POST,
            "/v1/accounts",
            &s.alice.clone(),
            Some(json!({"exchange": "binance", "apiKey": ALICE_KEY, "apiSecret": ALICE_SECRET})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    s.alice_account = body["id"].as_i64().unwrap();
    let (status, _) = s
        .send(
            reqwest::Method::POST,
            "/v1/accounts",
            &s.bob.clone(),
            Some(json!({"exchange": "binance", "apiKey": BOB_KEY, "apiSecret": BOB_SECRET})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    s
}

impl<S: Store + Users> Stack<S> {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post_raw(&self, token: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/entries", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    fn market(&self) -> Value {
        json!({
            "account": self.alice_account,
            "symbol": "BTCUSDT",
            "type": "MARKET",
            "quantity": "0.01",
            "tp": ["60600", "61200"],
            "sl": "59400",
        })
    }

    fn executing_lists(&self) -> usize {
        self.sim
            .control()
            .order_lists(Some(ALICE_KEY))
            .iter()
            .filter(|l| l.list_order_status == "EXECUTING")
            .count()
    }

    async fn stored(&self) -> usize {
        self.store
            .entries_of(AccountId(self.alice_account), None, 1000)
            .await
            .unwrap()
            .len()
    }
}

async fn market_and_crossing_limit_entries_are_protected_on_return<
    S: Store + Users + oco_core::ports::Coverage + 'static,
>(
    store: Arc<S>,
) {
    let s = stack(store).await;
    let (status, body) = s
        .send(
            reqwest::Method::POST,
            "/v1/entries",
            &s.alice,
            Some(s.market()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "filled");
    assert_eq!(body["protection"]["state"], "protected", "{body}");
    assert_eq!(body["legs"].as_array().unwrap().len(), 2);
    assert_eq!(s.executing_lists(), 2, "both OCO legs live on the exchange");

    let mut limit = s.market();
    limit["type"] = json!("LIMIT");
    limit["price"] = json!("60100");
    limit["tp"] = json!(["60700"]);
    let (status, body) = s
        .send(reqwest::Method::POST, "/v1/entries", &s.alice, Some(limit))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["protection"]["state"], "protected", "{body}");
    assert!(s.executing_lists() > 2);
}

async fn a_resting_limit_entry_is_stored_then_canceled<
    S: Store + Users + oco_core::ports::Coverage + 'static,
>(
    store: Arc<S>,
) {
    let s = stack(store).await;
    let mut limit = s.market();
    limit["type"] = json!("LIMIT");
    limit["price"] = json!("59000");
    limit["tp"] = json!(["59500", "60000"]);
    limit["sl"] = json!("58500");
    let (status, body) = s
        .send(reqwest::Method::POST, "/v1/entries", &s.alice, Some(limit))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "new");
    assert_eq!(body["legs"], json!([]));
    assert_eq!(body["tp"], json!(["59500", "60000"]));
    assert_eq!(body["sl"], "58500");
    assert_eq!(s.executing_lists(), 0);
    let open = s.sim.control().open_orders(ALICE_KEY);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].client_order_id, body["clientId"].as_str().unwrap());

    // Bob can neither read nor cancel it.
    let path = format!("/v1/entries/{}", body["id"]);
    let (status, _) = s.send(reqwest::Method::GET, &path, &s.bob, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.send(reqwest::Method::DELETE, &path, &s.bob, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(s.sim.control().open_orders(ALICE_KEY).len(), 1);

    let (status, body) = s.send(reqwest::Method::DELETE, &path, &s.alice, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "canceled");
    assert!(s.sim.control().open_orders(ALICE_KEY).is_empty());
}

async fn bad_input_stores_and_sends_nothing<
    S: Store + Users + oco_core::ports::Coverage + 'static,
>(
    store: Arc<S>,
) {
    let s = stack(store).await;
    let m = s.market();
    let with = |k: &str, v: Value| {
        let mut x = m.clone();
        x[k] = v;
        x
    };
    let mut missing = m.clone();
    missing.as_object_mut().unwrap().remove("symbol");
    let cases = [
        (
            with("symbol", json!("NOPEUSDT")),
            StatusCode::BAD_REQUEST,
            "unknown_symbol",
        ),
        (
            with("sl", json!("60500")),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            with("tp", json!(["59000"])),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            with("quantity", json!("-0.01")),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            with("quantity", json!("0.00001")),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (missing, StatusCode::BAD_REQUEST, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let (got, problem) = s
            .send(reqwest::Method::POST, "/v1/entries", &s.alice, Some(body))
            .await;
        assert_eq!(
            (got, problem["code"].as_str()),
            (status, Some(code)),
            "{problem}"
        );
        assert!(!problem["message"].as_str().unwrap().is_empty());
    }
    let (status, problem) = s.post_raw(&s.alice, "{\"account\":").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (status, _) = s
        .send(
            reqwest::Method::POST,
            "/v1/entries",
            "ogt_wrong",
            Some(m.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.stored().await, 0, "nothing stored");
    assert!(
        s.sim.control().orders(Some(ALICE_KEY)).is_empty(),
        "nothing sent"
    );
}

/// `POST /v1/entries` with an `Idempotency-Key`; the status, the
/// `Idempotent-Replayed` header and the body.
async fn post_keyed<S>(s: &Stack<S>, key: &str, body: &Value) -> (StatusCode, bool, Value) {
    let resp = s
        .http
        .post(format!("{}/v1/entries", s.base))
        .bearer_auth(&s.alice)
        .header("content-type", "application/json")
        .header("Idempotency-Key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    (status, replayed, resp.json().await.unwrap())
}

async fn a_resend_with_its_idempotency_key_places_one_order<
    S: Store + Users + oco_core::ports::Coverage + 'static,
>(
    store: Arc<S>,
) {
    let s = stack(store).await;
    let sent = |s: &Stack<S>| {
        s.sim
            .control()
            .orders(Some(ALICE_KEY))
            .iter()
            .filter(|o| o.client_order_id.starts_with("og-E-"))
            .count()
    };
    let (status, replayed, first) = post_keyed(&s, "e2e-1", &s.market()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{first}");
    let (status, replayed, again) = post_keyed(&s, "e2e-1", &s.market()).await;
    assert_eq!((status, replayed), (StatusCode::OK, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["protection"]["state"], "protected", "{again}");
    assert_eq!(sent(&s), 1, "one order");
    let mut other = s.market();
    other["quantity"] = json!("0.02");
    let (status, _, problem) = post_keyed(&s, "e2e-1", &other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "idempotency_key_reused");
    assert_eq!(problem["entryId"], first["id"]);

    // Two requests with one new key at once: one entry, one order.
    let body = s.market();
    let (a, b) = tokio::join!(
        post_keyed(&s, "e2e-2", &body),
        post_keyed(&s, "e2e-2", &body),
    );
    assert_eq!(a.2["id"], b.2["id"], "{} {}", a.2, b.2);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert!(
        statuses[1] == StatusCode::CREATED
            && [StatusCode::OK, StatusCode::CREATED].contains(&statuses[0]),
        "{statuses:?}"
    );
    assert_eq!(s.stored().await, 2, "one entry per key");
    assert_eq!(sent(&s), 2, "one order per key");
}

mod mem {
    use super::*;

    #[tokio::test]
    async fn market_and_crossing_limit_entries_are_protected_on_return() {
        super::market_and_crossing_limit_entries_are_protected_on_return(Arc::new(MemStore::new()))
            .await;
    }

    #[tokio::test]
    async fn a_resting_limit_entry_is_stored_then_canceled() {
        super::a_resting_limit_entry_is_stored_then_canceled(Arc::new(MemStore::new())).await;
    }

    #[tokio::test]
    async fn bad_input_stores_and_sends_nothing() {
        super::bad_input_stores_and_sends_nothing(Arc::new(MemStore::new())).await;
    }

    #[tokio::test]
    async fn a_resend_with_its_idempotency_key_places_one_order() {
        super::a_resend_with_its_idempotency_key_places_one_order(Arc::new(MemStore::new())).await;
    }
}

/// The same scenarios on PostgreSQL. Compiles once `PgStore: Users`.
mod pg {
    use store_pg::PgStore;
    use store_pg::testing::TestDb;

    use super::*;

    async fn store(db: &TestDb) -> Arc<PgStore> {
        Arc::new(PgStore::connect(db.config(4)).await.unwrap())
    }

    #[tokio::test]
    async fn market_and_crossing_limit_entries_are_protected_on_return() {
        let db = TestDb::new().await;
        super::market_and_crossing_limit_entries_are_protected_on_return(store(&db).await).await;
    }

    #[tokio::test]
    async fn a_resting_limit_entry_is_stored_then_canceled() {
        let db = TestDb::new().await;
        super::a_resting_limit_entry_is_stored_then_canceled(store(&db).await).await;
    }

    #[tokio::test]
    async fn bad_input_stores_and_sends_nothing() {
        let db = TestDb::new().await;
        super::bad_input_stores_and_sends_nothing(store(&db).await).await;
    }

    #[tokio::test]
    async fn a_resend_with_its_idempotency_key_places_one_order() {
        let db = TestDb::new().await;
        super::a_resend_with_its_idempotency_key_places_one_order(store(&db).await).await;
    }
}
