//! Lookups against a scripted REST server, for answers `exchange-sim` never
//! gives: a missing order list (or order) refused under another code than the
//! one assumed, since Binance does not document it; and the server-time read
//! refused with 429/418.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
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

/// A server whose `GET /api/v3/time` answers `status` with `Retry-After:
/// retry_after` (when given) and a `-1003` body, and whose ticker answers a
/// price, counting how often it is asked.
async fn time_refused(
    status: StatusCode,
    retry_after: Option<&'static str>,
) -> (BinanceExchange, Arc<AtomicUsize>) {
    let tickers = Arc::new(AtomicUsize::new(0));
    let counted = tickers.clone();
    let app = Router::new()
        .route(
            "/api/v3/time",
            get(move || async move {
                let body = r#"{"code":-1003,"msg":"Too much request weight used; current limit is 6000 request weight per 1 MINUTE."}"#;
                let mut resp = (status, body).into_response();
                if let Some(secs) = retry_after {
                    resp.headers_mut()
                        .insert("retry-after", secs.parse().unwrap());
                }
                resp
            }),
        )
        .route(
            "/api/v3/ticker/price",
            get(move || async move {
                counted.fetch_add(1, Ordering::SeqCst);
                r#"{"symbol":"BTCUSDT","price":"60000.00"}"#
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = BinanceConfig::custom(&base, "ws://127.0.0.1:1");
    config.request_timeout = Duration::from_secs(2);
    config.pacing.max_wait = Duration::from_secs(2);
    (BinanceExchange::new(config).unwrap(), tickers)
}

/// A clock re-sync (after `-1021`s) refused for request weight or with a
/// ban must hold the instance back like any refused request: sending on
/// would push the IP toward a (longer) ban.
#[tokio::test]
async fn a_refused_time_read_is_a_rate_limit_that_holds_every_request() {
    for (status, retry_after, wait) in [
        (StatusCode::TOO_MANY_REQUESTS, Some("30"), 30),
        (StatusCode::IM_A_TEAPOT, None, 120),
    ] {
        let (ex, tickers) = time_refused(status, retry_after).await;
        assert_eq!(
            ex.sync_time().await.unwrap_err(),
            ExchangeError::RateLimited {
                retry_after: Duration::from_secs(wait)
            },
            "{status}"
        );
        assert!(
            matches!(
                ex.last_price("BTCUSDT").await,
                Err(ExchangeError::RateLimited { retry_after }) if retry_after > Duration::from_secs(wait - 5)
            ),
            "{status}: the next request waits for the refusal's end"
        );
        assert_eq!(
            tickers.load(Ordering::SeqCst),
            0,
            "{status}: nothing sent meanwhile"
        );
    }
}
