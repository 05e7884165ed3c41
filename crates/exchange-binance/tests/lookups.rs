//! Lookups against a scripted REST server, for answers `exchange-sim` never
//! gives: a missing order list (or order) refused under another code than the
//! one assumed, since Binance does not document it; and the server-time read
//! refused with 429/418.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use exchange_binance::{BinanceConfig, BinanceExchange};
use oco_core::ports::Exchange;
use oco_core::{ApiCredentials, EntryStatus, ExchangeError};
use secrecy::SecretString;

/// What the scripted server answers: `GET /api/v3/orderList` with `list`,
/// `GET /api/v3/openOrderList` with `open_lists`, and `GET /api/v3/order`
/// with the answer of `orders` for its `orderId`, else `order`.
struct Script {
    list: (StatusCode, String),
    open_lists: (StatusCode, String),
    orders: Vec<(i64, (StatusCode, String))>,
    order: (StatusCode, String),
}

async fn serve(script: Script) -> BinanceExchange {
    let Script {
        list,
        open_lists,
        orders,
        order,
    } = script;
    let app = Router::new()
        .route(
            "/api/v3/orderList",
            get(move || async move { list.clone() }),
        )
        .route(
            "/api/v3/openOrderList",
            get(move || async move { open_lists.clone() }),
        )
        .route(
            "/api/v3/order",
            get(move |Query(q): Query<HashMap<String, String>>| async move {
                let id = q.get("orderId").and_then(|id| id.parse::<i64>().ok());
                orders
                    .iter()
                    .find(|(order_id, _)| Some(*order_id) == id)
                    .map_or_else(|| order.clone(), |(_, answer)| answer.clone())
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = BinanceConfig::custom(&base, "ws://127.0.0.1:1");
    config.request_timeout = Duration::from_secs(2);
    BinanceExchange::new(config).unwrap()
}

/// A server answering every order-list lookup with `list` and every order
/// lookup with `order`, both as HTTP 400 bodies; no list is open.
async fn scripted(list: &'static str, order: &'static str) -> BinanceExchange {
    serve(Script {
        list: (StatusCode::BAD_REQUEST, list.into()),
        open_lists: ok("[]".into()),
        orders: Vec::new(),
        order: (StatusCode::BAD_REQUEST, order.into()),
    })
    .await
}

/// `GET /api/v3/orderList` of a finished OCO `og-L-1`: stop `10`,
/// take-profit `11`.
const DONE_LIST: &str = r#"{"orderListId":7,"contingencyType":"OCO","listStatusType":"ALL_DONE","listOrderStatus":"ALL_DONE","listClientOrderId":"og-L-1","transactionTime":1700000000000,"symbol":"BTCUSDT","orders":[{"symbol":"BTCUSDT","orderId":10,"clientOrderId":"og-S-1"},{"symbol":"BTCUSDT","orderId":11,"clientOrderId":"og-T-1"}]}"#;

/// `GET /api/v3/order` of a member of [`DONE_LIST`].
fn member(order_id: i64, status: &str, executed: &str, quote: &str, expiry: &str) -> String {
    let (client_id, order_type) = if order_id == 10 {
        ("og-S-1", "STOP_LOSS_LIMIT")
    } else {
        ("og-T-1", "LIMIT_MAKER")
    };
    format!(
        r#"{{"symbol":"BTCUSDT","orderId":{order_id},"orderListId":7,"clientOrderId":"{client_id}","price":"61000.00","origQty":"0.004","executedQty":"{executed}","cummulativeQuoteQty":"{quote}","status":"{status}","timeInForce":"GTC","type":"{order_type}","side":"SELL","stopPrice":"0.00","time":1700000000000,"updateTime":1700000001000,"isWorking":true,"expiryReason":"{expiry}"}}"#
    )
}

fn ok(body: String) -> (StatusCode, String) {
    (StatusCode::OK, body)
}

fn refused(body: &str) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, body.into())
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

/// A finished list read while one of its orders cannot be (the order table
/// lagging the list's): leaving that order out would tell the caller a
/// different end (a take-profit fill read as a stop expired alone, its sale
/// never recorded). The read fails instead, to be made again.
#[tokio::test]
async fn a_list_with_an_order_that_cannot_be_read_is_not_answered_in_part() {
    let missing = r#"{"code":-2013,"msg":"Order does not exist."}"#;
    for orders in [
        vec![
            (10, ok(member(10, "EXPIRED", "0", "0", "OCO_TRIGGER"))),
            (11, refused(missing)),
        ],
        vec![
            (10, refused(missing)),
            (11, ok(member(11, "FILLED", "0.004", "244", "NONE"))),
        ],
    ] {
        let ex = serve(Script {
            list: ok(DONE_LIST.into()),
            open_lists: ok("[]".into()),
            orders,
            order: refused(missing),
        })
        .await;
        let read = ex.order_list(&creds(), "BTCUSDT", "og-L-1").await;
        assert!(
            matches!(&read, Err(ExchangeError::Transient(m)) if m.contains("list read incomplete")),
            "{read:?}"
        );
    }
}

/// Binance archives an order canceled or expired without a fill after 90
/// days (`-2026`): it sold nothing and will never be read again, so its
/// list is answered without it rather than left in doubt for good.
#[tokio::test]
async fn an_archived_order_is_left_out_of_its_list() {
    let ex = serve(Script {
        list: ok(DONE_LIST.into()),
        open_lists: ok("[]".into()),
        orders: vec![
            (
                10,
                refused(
                    r#"{"code":-2026,"msg":"Order was canceled or expired with no executed qty over 90 days ago and has been archived."}"#,
                ),
            ),
            (11, ok(member(11, "FILLED", "0.004", "244", "NONE"))),
        ],
        order: refused(r#"{"code":-2013,"msg":"Order does not exist."}"#),
    })
    .await;
    let list = ex
        .order_list(&creds(), "BTCUSDT", "og-L-1")
        .await
        .unwrap()
        .unwrap();
    assert!(!list.executing);
    assert_eq!(list.take_profit.unwrap().status, EntryStatus::Filled);
    assert_eq!(list.stop_loss, None);
}

/// `GET /api/v3/openOrderList` holding [`DONE_LIST`]'s list still open.
const OPEN_LISTS: &str = r#"[{"orderListId":7,"contingencyType":"OCO","listStatusType":"EXEC_STARTED","listOrderStatus":"EXECUTING","listClientOrderId":"og-L-1","transactionTime":1700000000000,"symbol":"BTCUSDT","orders":[{"symbol":"BTCUSDT","orderId":10,"clientOrderId":"og-S-1"},{"symbol":"BTCUSDT","orderId":11,"clientOrderId":"og-T-1"}]}]"#;

/// A list the database does not have yet is looked for among the open
/// lists (read from memory first): found there, it is answered with its
/// orders' states when both can be read, and with none when one cannot (a
/// stop canceled by a partial take-profit fill, alone, would read as the
/// list ended outside). A failed read of the open lists is no absence.
#[tokio::test]
async fn a_list_missing_from_the_database_is_looked_for_among_the_open_lists() {
    let no_list = r#"{"code":-2018,"msg":"Order list does not exist."}"#;
    let no_order = r#"{"code":-2013,"msg":"Order does not exist."}"#;
    let both = vec![
        (10, ok(member(10, "NEW", "0", "0", "NONE"))),
        (
            11,
            ok(member(11, "PARTIALLY_FILLED", "0.001", "61", "NONE")),
        ),
    ];
    let ex = serve(Script {
        list: refused(no_list),
        open_lists: ok(OPEN_LISTS.into()),
        orders: both,
        order: refused(no_order),
    })
    .await;
    let list = ex
        .order_list(&creds(), "BTCUSDT", "og-L-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((list.list_id, list.executing), (7, true));
    assert_eq!(
        (
            list.take_profit.unwrap().status,
            list.stop_loss.unwrap().status
        ),
        (EntryStatus::PartiallyFilled, EntryStatus::New)
    );

    let one = vec![
        (10, ok(member(10, "CANCELED", "0", "0", "NONE"))),
        (11, refused(no_order)),
    ];
    let ex = serve(Script {
        list: refused(no_list),
        open_lists: ok(OPEN_LISTS.into()),
        orders: one,
        order: refused(no_order),
    })
    .await;
    let list = ex
        .order_list(&creds(), "BTCUSDT", "og-L-1")
        .await
        .unwrap()
        .unwrap();
    assert!(list.executing);
    assert_eq!(
        (list.take_profit, list.stop_loss),
        (None, None),
        "no order states rather than a part"
    );

    let ex = serve(Script {
        list: refused(no_list),
        open_lists: (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"code":-1001,"msg":"Internal error; unable to process your request. Please try again."}"#.into(),
        ),
        orders: Vec::new(),
        order: refused(no_order),
    })
    .await;
    let read = ex.order_list(&creds(), "BTCUSDT", "og-L-1").await;
    assert!(matches!(read, Err(ExchangeError::Transient(_))), "{read:?}");
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
