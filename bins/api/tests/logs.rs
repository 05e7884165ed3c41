//! Secrets never reach the logs: the binary's wiring over PostgreSQL and
//! `exchange-sim`, logging JSON at `debug` (as `OCO_LOG_FORMAT=json` does)
//! into a buffer, through account creation and a protected entry. The lines
//! about the order carry account, entry and client id; none holds the API
//! secret, the bearer token or a request signature.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::io::Write;
use std::sync::{Arc, Mutex};

use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ports::SystemClock;
use rust_decimal_macros::dec;
use serde_json::{Value, json};
use store_pg::PgStore;
use store_pg::testing::TestDb;
use tokio::net::TcpListener;

const KEY: &str = "log-key";
const SECRET: &str = "log-secret-3f9a7c1e5b";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_name_the_order_and_hold_no_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(telemetry::log_subscriber(
        telemetry::LogFormat::Json,
        "debug",
        move || writer.clone(),
    ))
    .unwrap();

    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new(KEY, SECRET, vec![("USDT".into(), dec!(100000))]),
    ))
    .await
    .unwrap();
    sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(db.config(4)).await.unwrap());
    let exchange =
        BinanceExchange::new(BinanceConfig::custom(sim.base_url(), sim.ws_api_url())).unwrap();
    let metrics = telemetry::Metrics::new();
    let state = api_bin::app_state(
        store.clone(),
        api_bin::observed_exchange(exchange, &metrics),
        Arc::new(SystemClock),
        "og",
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api_bin::serve_observed(
        listener,
        state,
        metrics,
        async move {
            let _ = stopped.await;
        },
    ));
    let token = api_bin::add_user(&*store, "erin").await.unwrap();
    let http = reqwest::Client::new();
    let account: Value = http
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(&token)
        .json(&json!({"exchange": "binance", "apiKey": KEY, "apiSecret": SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let account = account["id"].as_i64().unwrap();
    let entry: Value = http
        .post(format!("{base}/v1/entries"))
        .bearer_auth(&token)
        .json(
            &json!({"account": account, "symbol": "BTCUSDT", "type": "MARKET",
                      "quantity": "0.01", "tp": ["61000"], "sl": "59000"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry_id = entry["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no entry id: {entry}"));
    let client_id = entry["clientId"]
        .as_str()
        .unwrap_or_else(|| panic!("no client id: {entry}"))
        .to_owned();
    // A refused request too: errors are logged as well.
    let refused = http
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(format!("{token}x"))
        .json(&json!({"exchange": "binance", "apiKey": KEY, "apiSecret": SECRET}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let placed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "protection leg placed")
        .collect();
    assert_eq!(placed.len(), 2, "two legs placed: {text}");
    for line in placed {
        let span = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "protect")
            .unwrap_or_else(|| panic!("no protect span: {line}"));
        assert_eq!(span["entry"], entry_id.to_string(), "{line}");
        assert_eq!(span["account"], account.to_string(), "{line}");
        assert_eq!(span["client_id"], client_id, "{line}");
    }
    // Debug lines (HTTP clients, exchange calls) are captured too, so the
    // checks below look where a secret could leak.
    assert!(
        text.contains("\"level\":\"DEBUG\""),
        "no debug line: {text}"
    );
    assert!(!text.contains(SECRET), "the API secret is logged: {text}");
    assert!(!text.contains(&token), "the bearer token is logged: {text}");
    assert!(
        !text.to_ascii_lowercase().contains("signature="),
        "a request signature is logged: {text}"
    );
}
