//! Secrets never reach the logs: the binary's wiring over PostgreSQL and
//! `exchange-sim`, logging JSON at `debug` (as `OCO_LOG_FORMAT=json` does)
//! into a buffer, through account creation and a protected entry. Every line
//! about the order carries account, entry and client id (in its fields or its
//! spans); none holds the API secret, the bearer token, the key of secrets at
//! rest or a request signature.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::Arc;

use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ports::SystemClock;
use rust_decimal_macros::dec;
use serde_json::{Value, json};
use store_pg::testing::TestDb;
use telemetry::log_audit::{Captured, assert_no_secrets, in_span, order_lines};
use tokio::net::TcpListener;

const KEY: &str = "log-key";
const SECRET: &str = "log-secret-3f9a7c1e5b";
/// `OCO_SECRET_KEY`, as hex; `SECRET_KEY_BASE64` is the same key.
const SECRET_KEY_HEX: &str = "7c3e91a5d20b48f6e1573ac9b08d264f5a1e3c7b9d0f2468ace13579bdf02468";
const SECRET_KEY_BASE64: &str = "fD6RpdILSPbhVzrJsI0mT1oePHudDyRorOE1eb3wJGg=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_name_the_order_and_hold_no_secret() {
    let captured = Captured::json_debug_logs();

    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new(KEY, SECRET, vec![("USDT".into(), dec!(100000))]),
    ))
    .await
    .unwrap();
    sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let db = TestDb::new().await;
    // Through the binary's own reading of OCO_SECRET_KEY, so that a log line
    // there would be caught too.
    let store = Arc::new(
        api_bin::connect_store(&api_bin::DbArgs {
            database_url: db.url().to_owned(),
            secret_key: SECRET_KEY_HEX.to_owned(),
            pool_size: 4,
        })
        .await
        .unwrap(),
    );
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

    let text = captured.text();
    let lines = captured.lines();
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

    let about_order = order_lines(&lines, &account.to_string(), &entry_id.to_string());
    // Not vacuous: the API's own lines, and lines of the exchange adapter's
    // HTTP client while it places the entry, which know nothing of the order
    // but through a span.
    for message in [
        "entry stored, sending",
        "entry answered",
        "direct protection",
    ] {
        assert!(
            about_order
                .iter()
                .any(|l| l["fields"]["message"] == message),
            "no line {message:?}: {text}"
        );
    }
    assert!(
        about_order.iter().any(
            |l| l["target"].as_str().is_some_and(|t| t.starts_with("hyper"))
                && in_span(l, "place_order")
        ),
        "no HTTP client line while placing the entry: {text}"
    );

    // Debug lines (HTTP clients, exchange calls) are captured too, so the
    // checks below look where a secret could leak.
    assert!(
        text.contains("\"level\":\"DEBUG\""),
        "no debug line: {text}"
    );
    let token_hex = token.strip_prefix(api::auth::TOKEN_PREFIX).unwrap();
    let key_upper = SECRET_KEY_HEX.to_ascii_uppercase();
    assert_no_secrets(
        &text,
        &[
            ("the API secret", SECRET),
            ("the bearer token", token.as_str()),
            ("the bearer token's digits", token_hex),
            ("OCO_SECRET_KEY", SECRET_KEY_HEX),
            ("OCO_SECRET_KEY", &key_upper),
            ("OCO_SECRET_KEY", SECRET_KEY_BASE64),
            ("OCO_SECRET_KEY", SECRET_KEY_BASE64.trim_end_matches('=')),
        ],
    );
}
