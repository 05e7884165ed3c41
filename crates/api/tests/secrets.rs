//! Secrets and tokens never shown: in response bodies, logs or `Debug`.
//!
//! A binary of its own: its logs are captured by a subscriber set for this
//! test's thread, and `tracing` caches per call site whether anyone listens.
//! Tests on other threads of the same process racing that cache could leave
//! a line of this test's unlogged, now and then.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use api::dto::CreateAccountRequest;
use axum::http::Method;
use common::*;
use rust_decimal_macros::dec;
use serde_json::json;

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

#[tokio::test]
async fn neither_secret_nor_token_appears_in_bodies_logs_or_debug() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    // The test runtime is single-threaded: the default holds across awaits.
    let _guard = tracing::subscriber::set_default(subscriber);

    let w = world().await;
    let (_, placed) = w.post_entry(ALICE_TOKEN, w.market()).await;
    let path = format!("/v1/entries/{}", placed["id"]);
    w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    w.call(Method::GET, "/v1/accounts", Some(ALICE_TOKEN), None)
        .await;
    let path = format!("/v1/accounts/{}", w.alice_account);
    w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    w.call(Method::GET, &path, Some("ogt_typo"), None).await;
    w.exchange.fake.set_free(ALICE_KEY, "USDT", dec!(0));
    w.post_entry(ALICE_TOKEN, w.market()).await;

    let request: CreateAccountRequest = serde_json::from_value(json!({
        "exchange": "binance", "apiKey": "k", "apiSecret": ALICE_SECRET
    }))
    .unwrap();
    let debug = format!("{request:?}");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("entry stored"), "logs were captured: {logs}");
    let bodies = w.bodies.lock().unwrap().join("\n");
    assert!(bodies.contains(ALICE_KEY), "bodies were captured");
    for secret in [ALICE_SECRET, BOB_SECRET, ALICE_TOKEN, BOB_TOKEN, "ogt_typo"] {
        assert!(!bodies.contains(secret), "a body shows {secret}");
        assert!(!logs.contains(secret), "the logs show {secret}");
        assert!(!debug.contains(secret), "Debug shows {secret}");
    }
}
