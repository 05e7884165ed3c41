//! Lookups against a scripted REST server, for answers `exchange-sim` never
//! gives: a missing order list (or order) refused under another code than the
//! one assumed, since Binance does not document it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use exchange_binance::{BinanceConfig, BinanceExchange};
use oco_core::ports::Exchange;
use oco_core::{ApiCredentials, ExchangeError};
use secrecy::SecretString;

/// A server answering every order-list lookup with `list` and every order
/// lookup with `order`, both as HTTP 400 bodies.
async fn scripted(list: &'static str, order: &'static str) -> BinanceExchange {
    let app = Router::new()
        .route(
            "/api/v3/orderList",
            get(move || async move { (StatusCode::BAD_REQUEST, list) }),
        )
        .route(
            "/api/v3/order",
            get(move || async move { (StatusCode::BAD_REQUEST, order) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = BinanceConfig::custom(&base, "ws://127.0.0.1:1");
    config.request_timeout = Duration::from_secs(2);
    BinanceExchange::new(config).unwrap()
}

fn creds() -> ApiCredentials {
    ApiCredentials {
        api_key: "k".into(),
        secret: SecretString::from("s"),
    }
}

#[tokio::test]
async fn a_missing_list_or_order_under_an_unexpected_code_is_not_found() {
    let ex = scripted(
        r#"{"code":-2011,"msg":"Order list does not exist."}"#,
        r#"{"code":-1102,"msg":"Order does not exist."}"#,
    )
    .await;
    assert_eq!(
        ex.order_list(&creds(), "BTCUSDT", "og-L-1").await.unwrap(),
        None,
        "the list's absence is read from Binance's words"
    );
    assert_eq!(
        ex.query_order(&creds(), "BTCUSDT", "og-E-1")
            .await
            .unwrap_err(),
        ExchangeError::NotFound
    );
}

#[tokio::test]
async fn other_refusals_of_a_lookup_are_not_absence() {
    let ex = scripted(
        r#"{"code":-2011,"msg":"Unknown order sent."}"#,
        r#"{"code":-1102,"msg":"Mandatory parameter 'orderId' was not sent, was empty/null, or malformed."}"#,
    )
    .await;
    assert!(matches!(
        ex.order_list(&creds(), "BTCUSDT", "og-L-1").await,
        Err(ExchangeError::Rejected { code: -2011, .. })
    ));
    assert!(matches!(
        ex.query_order(&creds(), "BTCUSDT", "og-E-1").await,
        Err(ExchangeError::Rejected { code: -1102, .. })
    ));
}
