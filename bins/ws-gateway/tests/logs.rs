//! Secrets never reach the gateway's logs: the wired process over PostgreSQL
//! and `exchange-sim`, logging JSON at `debug` into a buffer, through the
//! stream's logon (a signed WebSocket request) and a fill protected from the
//! stream. Every line about the order names account, entry and client id.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::time::{Duration, Instant};

use common::Wired;
use oco_core::model::Source;
use telemetry::log_audit::{Captured, assert_no_secrets, order_lines};

const SECRET: &str = "gw-log-secret-8e2d41";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_logs_name_the_order_and_hold_no_secret() {
    let captured = Captured::json_debug_logs();

    let w = Wired::new(SECRET).await;
    let (stop, process) = w.start().await;
    let entry = w.market_entry().await;
    assert_eq!(w.protected(&entry).await, Source::Websocket);
    // The lines after the store shows protection ("protected from the stream").
    let deadline = Instant::now() + Duration::from_secs(10);
    while !captured.text().contains("protected from the stream") {
        assert!(Instant::now() < deadline, "no gateway line about the fill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    process.await.unwrap().unwrap();

    let text = captured.text();
    let lines = captured.lines();
    // Not vacuous: the stream's logon and the gateway's own order lines are there.
    assert!(
        text.contains("\"level\":\"DEBUG\""),
        "no debug line: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "user-data stream subscribed"),
        "the signed logon and subscription ran while logging: {text}"
    );
    let about_order = order_lines(&lines, &w.account.id.to_string(), &entry.id.to_string());
    assert!(
        about_order
            .iter()
            .any(|l| l["fields"]["message"] == "protected from the stream"),
        "{text}"
    );
    assert_no_secrets(
        &text,
        &[
            ("the API secret", SECRET),
            ("the key of secrets at rest", w.key_hex.as_str()),
        ],
    );
}
