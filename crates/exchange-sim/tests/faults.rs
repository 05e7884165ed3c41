//! Request faults (5xx before/after, hang, -1021, 429, delay) and rate limits.

mod common;

use std::time::{Duration, Instant};

use common::*;
use exchange_sim::{FaultOutcome, FaultWhen, RateLimits, RequestFault};

fn order(cid: &str) -> Vec<(&str, &str)> {
    vec![
        ("symbol", "BTCUSDT"),
        ("side", "BUY"),
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
        ("quantity", "0.01"),
        ("price", "50000"),
        ("newClientOrderId", cid),
    ]
}

#[tokio::test]
async fn failure_before_applies_nothing_and_after_applies_the_order() {
    let sim = start().await;
    let ctl = sim.control();
    let fault = |when| RequestFault {
        method: Some("POST".into()),
        path_prefix: "/api/v3/order".into(),
        count: 1,
        when,
        outcome: FaultOutcome::Status(503),
    };
    ctl.fail_requests(fault(FaultWhen::Before));
    let r = signed(sim.addr(), "POST", "/api/v3/order", &order("before-1")).await;
    r.assert_error(
        503,
        -1007,
        fixture("CONSTRUCTED_error_-1007_timeout_unknown.json")["msg"]
            .as_str()
            .unwrap(),
    );
    assert!(ctl.orders(Some(KEY)).is_empty());

    ctl.fail_requests(fault(FaultWhen::After));
    let r = signed(sim.addr(), "POST", "/api/v3/order", &order("after-1")).await;
    assert_eq!(r.status, 503);
    let orders = ctl.orders(Some(KEY));
    assert_eq!(orders.len(), 1, "the unknown-outcome order exists");
    assert_eq!(orders[0].client_order_id, "after-1");
    let q = signed(
        sim.addr(),
        "GET",
        "/api/v3/order",
        &[("symbol", "BTCUSDT"), ("origClientOrderId", "after-1")],
    )
    .await;
    assert_eq!(q.status, 200, "rule used up: {}", q.body);
}

#[tokio::test]
async fn hang_after_keeps_the_client_waiting_but_places_the_order() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.fail_requests(RequestFault {
        method: None,
        path_prefix: "/api/v3/orderList".into(),
        count: 1,
        when: FaultWhen::After,
        outcome: FaultOutcome::Hang(Duration::from_secs(30)),
    });
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let params = [
        ("symbol", "BTCUSDT"),
        ("side", "SELL"),
        ("quantity", "0.1"),
        ("listClientOrderId", "hang-1"),
        ("aboveType", "LIMIT_MAKER"),
        ("abovePrice", "62000"),
        ("belowType", "STOP_LOSS_LIMIT"),
        ("belowStopPrice", "58000"),
        ("belowPrice", "57900"),
        ("belowTimeInForce", "GTC"),
    ];
    let res = tokio::time::timeout(
        Duration::from_millis(300),
        signed(sim.addr(), "POST", "/api/v3/orderList/oco", &params),
    )
    .await;
    assert!(res.is_err(), "client timed out");
    assert!(
        wait_until(Duration::from_secs(5), || ctl.order_lists(Some(KEY)).len()
            == 1)
        .await
    );
}

#[tokio::test]
async fn forced_timestamp_errors_throttle_and_delay() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.force_timestamp_errors(2);
    for _ in 0..2 {
        signed(sim.addr(), "GET", "/api/v3/account", &[])
            .await
            .assert_error(
                400,
                -1021,
                "Timestamp for this request is outside of the recvWindow.",
            );
    }
    assert_eq!(
        signed(sim.addr(), "GET", "/api/v3/account", &[])
            .await
            .status,
        200
    );

    ctl.throttle_requests(1, 7);
    let r = http(sim.addr(), "GET", "/api/v3/ping", &[], "").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.json()["code"], -1003);
    assert_eq!(
        http(sim.addr(), "GET", "/api/v3/ping", &[], "")
            .await
            .status,
        200
    );

    ctl.set_response_delay(Duration::from_millis(150), Some("/api/v3/time".into()));
    let t = Instant::now();
    assert_eq!(
        http(sim.addr(), "GET", "/api/v3/time", &[], "")
            .await
            .status,
        200
    );
    assert!(t.elapsed() >= Duration::from_millis(150));
    let t = Instant::now();
    http(sim.addr(), "GET", "/api/v3/ping", &[], "").await;
    assert!(t.elapsed() < Duration::from_millis(150));
    ctl.clear_faults();
}

#[tokio::test]
async fn request_weight_limit_answers_429_then_418() {
    let limits = RateLimits {
        request_weight_per_minute: 45,
        ban_after_ignored: 2,
        ..RateLimits::binance()
    };
    let sim = start_with(config().with_rate_limits(limits)).await;
    let a = sim.addr();
    assert_eq!(
        signed(a, "GET", "/api/v3/account", &[])
            .await
            .header("x-mbx-used-weight-1m"),
        Some("20")
    );
    assert_eq!(signed(a, "GET", "/api/v3/account", &[]).await.status, 200);
    // The 45-weight budget may roll over at a minute boundary; retry once if it did.
    let mut r = signed(a, "GET", "/api/v3/account", &[]).await;
    if r.status == 200 {
        signed(a, "GET", "/api/v3/account", &[]).await;
        r = signed(a, "GET", "/api/v3/account", &[]).await;
    }
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["code"], -1003);
    assert!(r.header("retry-after").is_some());
    let mut last = 0;
    for _ in 0..3 {
        last = http(a, "GET", "/api/v3/ping", &[], "").await.status;
    }
    assert_eq!(last, 418, "ignoring 429s gets the IP banned");
}

#[tokio::test]
async fn order_count_limit_answers_minus_1015() {
    let limits = RateLimits {
        orders_per_10s: 2,
        ..RateLimits::binance()
    };
    let sim = start_with(config().with_rate_limits(limits)).await;
    let a = sim.addr();
    let first = signed(a, "POST", "/api/v3/order", &order("o1")).await;
    assert_eq!(first.status, 200);
    let second = signed(a, "POST", "/api/v3/order", &order("o2")).await;
    if second.header("x-mbx-order-count-10s") == Some("1") {
        // Crossed a 10 s window boundary: one more to fill the new window.
        signed(a, "POST", "/api/v3/order", &order("o2b")).await;
    }
    let r = signed(a, "POST", "/api/v3/order", &order("o3")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["code"], -1015);
    let want = fixture("CONSTRUCTED_error_-1015_too_many_new_orders.json")["msg"]
        .as_str()
        .unwrap()
        .replace("50", "2");
    assert_eq!(r.json()["msg"], want.as_str());
}
