//! `/v1/accounts`, auth, secrets and the OpenAPI document.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use api::dto::CreateAccountRequest;
use axum::http::{Method, StatusCode};
use common::*;
use oco_core::ports::{Store, Users};
use oco_core::{AccountId, StopKind};
use rust_decimal_macros::dec;
use serde_json::json;

#[tokio::test]
async fn an_account_is_registered_read_and_changed_without_its_secret() {
    let w = world().await;
    let (status, body) = w
        .call(
            Method::POST,
            "/v1/accounts",
            Some(ALICE_TOKEN),
            Some(json!({
                "exchange": "binance",
                "apiKey": "alice-second-key",
                "apiSecret": "second-secret-value",
                "protection": {"tp1Pct": "1.5", "tp2Pct": "3", "slPct": "2", "split": "0.6",
                               "stop": {"type": "market"}, "latePolicy": "record_only"}
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["owner"], "alice");
    assert_eq!(body["protection"]["slPct"], "2");
    assert_eq!(body["protection"]["stop"], json!({"type": "market"}));
    assert!(body.get("apiSecret").is_none());
    let id = body["id"].as_i64().unwrap();
    let stored = w.store.account(AccountId(id)).await.unwrap();
    assert_eq!(stored.protection.split, dec!(0.6));
    assert_eq!(stored.protection.stop, StopKind::Market);

    let path = format!("/v1/accounts/{id}");
    let (status, body) = w
        .call(
            Method::PATCH,
            &path,
            Some(ALICE_TOKEN),
            Some(json!({"protection": {"stop": {"type": "limit", "offsetPct": "0.25"}}, "active": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], false);
    assert_eq!(
        body["protection"]["stop"],
        json!({"type": "limit", "offsetPct": "0.25"})
    );
    assert_eq!(
        body["protection"]["slPct"], "2",
        "untouched fields keep their value"
    );

    let (_, list) = w
        .call(Method::GET, "/v1/accounts", Some(ALICE_TOKEN), None)
        .await;
    let ids: Vec<i64> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [w.alice_account, id]);
    let (status, _) = w.call(Method::GET, &path, Some(BOB_TOKEN), None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "bob cannot read alice's account"
    );
    let (status, _) = w
        .call(
            Method::PATCH,
            &path,
            Some(BOB_TOKEN),
            Some(json!({"active": true})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nor change it");
    assert!(!w.store.account(AccountId(id)).await.unwrap().active);
}

#[tokio::test]
async fn bad_account_input_is_refused() {
    let w = world().await;
    let cases = [
        (
            json!({"exchange": "kraken", "apiKey": "k", "apiSecret": "s"}),
            StatusCode::BAD_REQUEST,
            "exchange",
        ),
        (
            json!({"exchange": "binance", "apiKey": "", "apiSecret": "s"}),
            StatusCode::BAD_REQUEST,
            "apiKey",
        ),
        (
            json!({"exchange": "binance", "apiKey": "k"}),
            StatusCode::BAD_REQUEST,
            "apiSecret",
        ),
        (
            json!({"exchange": "binance", "apiKey": "k", "apiSecret": "s", "protection": {"split": "0"}}),
            StatusCode::BAD_REQUEST,
            "protection.split",
        ),
        (
            json!({"exchange": "binance", "apiKey": "k", "apiSecret": "s", "protection": {"tp1Pct": "3", "tp2Pct": "2"}}),
            StatusCode::BAD_REQUEST,
            "protection",
        ),
    ];
    for (body, status, field) in cases {
        let (got, problem) = w
            .call(Method::POST, "/v1/accounts", Some(ALICE_TOKEN), Some(body))
            .await;
        assert_eq!(got, status, "{problem}");
        assert_eq!(problem["field"], field, "{problem}");
    }
    let (status, problem) = w
        .call(
            Method::POST,
            "/v1/accounts",
            Some(ALICE_TOKEN),
            Some(json!({"exchange": "binance", "apiKey": ALICE_KEY, "apiSecret": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(
        w.store.active_accounts().await.unwrap().len(),
        2,
        "nothing added"
    );
}

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

#[tokio::test]
async fn tokens_are_checked() {
    let w = world().await;
    for (header, message) in [
        (None, "missing Authorization"),
        (Some("ogt_nobody"), "not recognised"),
    ] {
        let (status, problem) = w.call(Method::GET, "/v1/accounts", header, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            problem["message"].as_str().unwrap().contains(message),
            "{problem}"
        );
    }
    let token = api::new_token();
    w.store
        .create_user("carol", &api::hash_token(&token))
        .await
        .unwrap();
    let (status, list) = w
        .call(Method::GET, "/v1/accounts", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["accounts"], json!([]));
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let w = world().await;
    let (status, doc) = w.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = &doc["paths"];
    for (path, method) in [
        ("/v1/accounts", "post"),
        ("/v1/accounts", "get"),
        ("/v1/accounts/{id}", "get"),
        ("/v1/accounts/{id}", "patch"),
        ("/v1/entries", "post"),
        ("/v1/entries", "get"),
        ("/v1/entries/{id}", "get"),
        ("/v1/entries/{id}", "delete"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    assert!(doc["components"]["schemas"]["CreateEntryRequest"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_problems() {
    let w = world().await;
    let (status, problem) = w
        .call(Method::GET, "/v1/nope", Some(ALICE_TOKEN), None)
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_route"))
    );
    let (status, problem) = w
        .call(Method::PUT, "/v1/entries", Some(ALICE_TOKEN), None)
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
}
