//! OCO placement, rules, cancel-other, partial take-profit, stop trigger and expiry, counts.

mod common;

use common::*;
use rust_decimal::Decimal;
use serde_json::Value;

fn oco<'a>(
    list: &'a str,
    qty: &'a str,
    tp: &'a str,
    stop: &'a str,
    limit: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("symbol", "BTCUSDT"),
        ("side", "SELL"),
        ("quantity", qty),
        ("listClientOrderId", list),
        ("aboveType", "LIMIT_MAKER"),
        ("abovePrice", tp),
        ("belowType", "STOP_LOSS_LIMIT"),
        ("belowStopPrice", stop),
        ("belowPrice", limit),
        ("belowTimeInForce", "GTC"),
    ]
}

#[tokio::test]
async fn sell_oco_has_binance_shape_and_locks_once() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let mut p = oco("list-1", "0.5", "63000", "58000", "57900");
    p.push(("aboveClientOrderId", "tp-1"));
    p.push(("belowClientOrderId", "sl-1"));
    let r = signed(a, "POST", "/api/v3/orderList/oco", &p).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_shape(
        &v,
        &fixture("oco_orderlist_oco_response.json"),
        &["icebergQty"],
        &[],
    );
    assert_key_order(&v, &fixture("oco_orderlist_oco_response.json"));
    let reports = v["orderReports"].as_array().unwrap();
    assert_eq!(reports[0]["type"], "STOP_LOSS_LIMIT");
    assert_eq!(reports[0]["workingTime"], -1);
    assert_eq!(reports[0]["clientOrderId"], "sl-1");
    assert_eq!(reports[1]["type"], "LIMIT_MAKER");
    assert!(reports[0]["orderId"].as_u64() < reports[1]["orderId"].as_u64());
    assert!(reports[1]["workingTime"].as_i64().unwrap() > 0);
    assert_eq!(r.header("x-mbx-order-count-10s"), Some("2"));
    let btc = ctl.balance(KEY, "BTC").unwrap();
    assert_eq!((btc.free, btc.locked), (d("0.5"), d("0.5")));

    let id = v["orderListId"].as_i64().unwrap().to_string();
    let q = signed(a, "GET", "/api/v3/orderList", &[("orderListId", &id)])
        .await
        .json();
    assert_shape(&q, &fixture("orderlist_query_response.json"), &[], &[]);
    let q2 = signed(
        a,
        "GET",
        "/api/v3/orderList",
        &[("origClientOrderId", "list-1")],
    )
    .await
    .json();
    assert_eq!(q, q2);
    let open = signed(a, "GET", "/api/v3/openOrderList", &[]).await.json();
    assert_shape(&open, &fixture("open_orderlist_response.json"), &[], &[]);
    assert_eq!(open.as_array().unwrap().len(), 1);
    let open_orders = signed(a, "GET", "/api/v3/openOrders", &[("symbol", "BTCUSDT")])
        .await
        .json();
    assert_eq!(open_orders.as_array().unwrap().len(), 2);

    // Duplicate list id while open, duplicate leg id.
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("list-1", "0.1", "63000", "58000", "57900"),
    )
    .await
    .assert_error(400, -2010, "Duplicate order sent.");
    let mut p = oco("list-2", "0.1", "63000", "58000", "57900");
    p.push(("aboveClientOrderId", "tp-1"));
    signed(a, "POST", "/api/v3/orderList/oco", &p)
        .await
        .assert_error(400, -2010, "Duplicate order sent.");
    // Only 0.5 BTC is free.
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("list-3", "0.6", "63000", "58000", "57900"),
    )
    .await
    .assert_error(
        400,
        -2010,
        "Account has insufficient balance for requested action.",
    );

    // Cancel the list: both legs CANCELED, lock released, list client id reusable.
    let c = signed(
        a,
        "DELETE",
        "/api/v3/orderList",
        &[("symbol", "BTCUSDT"), ("listClientOrderId", "list-1")],
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_shape(
        &c.json(),
        &fixture("orderlist_cancel_response.json"),
        &[],
        &[],
    );
    assert_eq!(c.json()["listOrderStatus"], "ALL_DONE");
    assert_eq!(ctl.balance(KEY, "BTC").unwrap().locked, d("0"));
    signed(
        a,
        "DELETE",
        "/api/v3/orderList",
        &[("symbol", "BTCUSDT"), ("orderListId", &id)],
    )
    .await
    .assert_error(400, -2011, "Unknown order list sent.");
    signed(a, "GET", "/api/v3/orderList", &[("orderListId", "9999")])
        .await
        .assert_error(400, -2018, "Order list does not exist.");
    let r = signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("list-1", "0.1", "63000", "58000", "57900"),
    )
    .await;
    assert_eq!(r.status, 200, "reusable after ALL_DONE: {}", r.body);
    let all = signed(a, "GET", "/api/v3/allOrderList", &[]).await.json();
    assert_shape(&all, &fixture("all_orderlist_response.json"), &[], &[]);
    assert_eq!(all.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn oco_price_rules_and_structure_errors() {
    let sim = start().await;
    let a = sim.addr();
    sim.control().set_price("BTCUSDT", d("60000")).unwrap();
    let msg = fixture("CONSTRUCTED_error_-2010_oco_bad_prices.json")["msg"]
        .as_str()
        .unwrap()
        .to_string();
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("x", "0.1", "59000", "58000", "57900"),
    )
    .await
    .assert_error(400, -2010, &msg);
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("x", "0.1", "63000", "60000", "59900"),
    )
    .await
    .assert_error(400, -2010, &msg);
    let mut p = oco("x", "0.1", "63000", "58000", "57900");
    p[4] = ("aboveType", "STOP_LOSS_LIMIT");
    p.push(("aboveStopPrice", "63000"));
    p.push(("aboveTimeInForce", "GTC"));
    signed(a, "POST", "/api/v3/orderList/oco", &p)
        .await
        .assert_error(400, -1197, "A stop loss order in a sell OCO must be below.");
    let mut p = oco("x", "0.1", "63000", "58000", "57900");
    p[4] = ("aboveType", "LIMIT");
    signed(a, "POST", "/api/v3/orderList/oco", &p)
        .await
        .assert_error(400, -1158, "Order type not supported in OCO.");
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("x", "0.1", "63000.001", "58000", "57900"),
    )
    .await
    .assert_error(400, -1013, "Filter failure: PRICE_FILTER");
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("x", "0.00001", "63000", "58000", "57900"),
    )
    .await
    .assert_error(400, -1013, "Filter failure: NOTIONAL");
}

/// BTCUSDT's `orderTypes` (real capture) lack `STOP_LOSS` and `TAKE_PROFIT`:
/// an OCO leg of either is refused as Binance's matching engine refuses it,
/// with nothing placed or locked. ETHBTC lists them and takes the same list.
#[tokio::test]
async fn an_oco_leg_of_a_type_the_symbol_lacks_is_refused() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let market_stop = |symbol: &'static str, tp: &'static str, stop: &'static str| {
        vec![
            ("symbol", symbol),
            ("side", "SELL"),
            ("quantity", "0.1"),
            ("listClientOrderId", "market-stop"),
            ("aboveType", "LIMIT_MAKER"),
            ("abovePrice", tp),
            ("belowType", "STOP_LOSS"),
            ("belowStopPrice", stop),
        ]
    };
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &market_stop("BTCUSDT", "63000", "58000"),
    )
    .await
    .assert_error(
        400,
        -2010,
        "Stop loss orders are not supported for this symbol.",
    );
    let mut p = oco("x", "0.1", "63000", "58000", "57900");
    p[4] = ("aboveType", "TAKE_PROFIT");
    p[5] = ("aboveStopPrice", "63000");
    signed(a, "POST", "/api/v3/orderList/oco", &p)
        .await
        .assert_error(
            400,
            -2010,
            "Take profit orders are not supported for this symbol.",
        );
    // The legacy endpoint without stopLimitPrice sends a STOP_LOSS too.
    signed(
        a,
        "POST",
        "/api/v3/order/oco",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("quantity", "0.1"),
            ("price", "62000"),
            ("stopPrice", "58000"),
        ],
    )
    .await
    .assert_error(
        400,
        -2010,
        "Stop loss orders are not supported for this symbol.",
    );
    assert!(ctl.order_lists(Some(KEY)).is_empty());
    assert_eq!(ctl.balance(KEY, "BTC").unwrap().locked, Decimal::ZERO);

    ctl.deposit(KEY, "ETH", d("1")).unwrap();
    ctl.set_price("ETHBTC", d("0.05")).unwrap();
    let r = signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &market_stop("ETHBTC", "0.052", "0.048"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["orderReports"][0]["type"], "STOP_LOSS");
}

#[tokio::test]
async fn legacy_order_oco_endpoint_places_the_same_list() {
    let sim = start().await;
    sim.control().set_price("BTCUSDT", d("60000")).unwrap();
    let r = signed(
        sim.addr(),
        "POST",
        "/api/v3/order/oco",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("quantity", "0.1"),
            ("price", "62000"),
            ("stopPrice", "58000"),
            ("stopLimitPrice", "57900"),
            ("stopLimitTimeInForce", "GTC"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_shape(&v, &fixture("oco_legacy_order_oco_response.json"), &[], &[]);
    assert_eq!(v["orderReports"][0]["type"], "STOP_LOSS_LIMIT");
    assert_eq!(v["orderReports"][1]["type"], "LIMIT_MAKER");
}

#[tokio::test]
async fn take_profit_fill_cancels_the_stop() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("tp-case", "0.5", "63000", "58000", "57900"),
    )
    .await;
    assert_eq!(ctl.executing_list_count(), 1);
    ctl.set_price("BTCUSDT", d("63000")).unwrap();
    let orders = ctl.orders(Some(KEY));
    let stop = orders
        .iter()
        .find(|o| o.order_type == "STOP_LOSS_LIMIT")
        .unwrap();
    let tp = orders
        .iter()
        .find(|o| o.order_type == "LIMIT_MAKER")
        .unwrap();
    assert_eq!(tp.status, "FILLED");
    assert_eq!(stop.status, "EXPIRED");
    assert_eq!(stop.expiry_reason.as_deref(), Some("OCO_TRIGGER"));
    assert_eq!(ctl.order_lists(Some(KEY))[0].list_order_status, "ALL_DONE");
    assert_eq!(ctl.executing_list_count(), 0);
    let btc = ctl.balance(KEY, "BTC").unwrap();
    assert_eq!((btc.free, btc.locked), (d("0.5"), d("0")));
    // 0.5 * 63000 = 31500 minus 0.1 % fee in USDT.
    assert_eq!(ctl.balance(KEY, "USDT").unwrap().free, d("131468.5"));
    let q = signed(
        a,
        "GET",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("orderId", &stop.order_id.to_string()),
        ],
    )
    .await
    .json();
    assert_eq!(q["expiryReason"], "OCO_TRIGGER");
}

#[tokio::test]
async fn partial_take_profit_leaves_the_rest_resting_without_a_stop() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("ptp", "0.5", "63000", "58000", "57900"),
    )
    .await;
    ctl.partial_fill_next("BTCUSDT", d("0.4")).unwrap();
    ctl.set_price("BTCUSDT", d("63000")).unwrap();
    let open = ctl.open_orders(KEY);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].order_type, "LIMIT_MAKER");
    assert_eq!(open[0].status, "PARTIALLY_FILLED");
    assert_eq!(open[0].executed_qty, d("0.2"));
    let stop = ctl
        .orders(Some(KEY))
        .into_iter()
        .find(|o| o.order_type == "STOP_LOSS_LIMIT")
        .unwrap();
    assert_eq!(stop.status, "EXPIRED");
    // The stop is gone: a crash does not sell the rest.
    ctl.set_price("BTCUSDT", d("50000")).unwrap();
    assert_eq!(ctl.trades(Some(KEY)).len(), 1);
    assert_eq!(ctl.balance(KEY, "BTC").unwrap().locked, d("0.3"));
    ctl.set_price("BTCUSDT", d("63500")).unwrap();
    assert!(ctl.open_orders(KEY).is_empty());
    assert_eq!(ctl.balance(KEY, "BTC").unwrap().locked, d("0"));
}

#[tokio::test]
async fn stop_trigger_cancels_take_profit_then_fills_or_rests() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("sl-a", "0.2", "63000", "58000", "57900"),
    )
    .await;
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("sl-b", "0.2", "63000", "58000", "57900"),
    )
    .await;
    ctl.set_price("BTCUSDT", d("57950")).unwrap();
    let orders = ctl.orders(Some(KEY));
    let stops: Vec<_> = orders
        .iter()
        .filter(|o| o.order_type == "STOP_LOSS_LIMIT")
        .collect();
    assert!(stops.iter().all(|o| o.status == "FILLED"));
    assert!(
        orders
            .iter()
            .filter(|o| o.order_type == "LIMIT_MAKER")
            .all(|o| o.status == "EXPIRED" && o.expiry_reason.as_deref() == Some("OCO_TRIGGER"))
    );
    let t = ctl.trades(Some(KEY));
    assert!(t.iter().all(|t| t.price == d("57950")));
    assert_ne!(t[0].id, t[1].id);

    // Gap through the limit: the triggered stop rests as a limit order.
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("sl-c", "0.2", "60000", "57000", "56900"),
    )
    .await;
    ctl.set_price("BTCUSDT", d("56000")).unwrap();
    let stop = ctl.open_orders(KEY);
    assert_eq!(stop.len(), 1);
    assert!(stop[0].triggered);
    assert_eq!(
        ctl.order_lists(Some(KEY))
            .iter()
            .find(|l| l.list_client_order_id == "sl-c")
            .unwrap()
            .list_order_status,
        "EXECUTING"
    );
    ctl.set_price("BTCUSDT", d("56950")).unwrap();
    assert!(ctl.open_orders(KEY).is_empty());
    assert_eq!(ctl.trades(Some(KEY)).last().unwrap().price, d("56900"));
}

#[tokio::test]
async fn triggered_stop_can_be_made_to_expire() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    signed(
        sim.addr(),
        "POST",
        "/api/v3/orderList/oco",
        &oco("exp", "0.2", "63000", "58000", "57900"),
    )
    .await;
    ctl.expire_next_stops(1);
    ctl.set_price("BTCUSDT", d("57000")).unwrap();
    let stop = ctl
        .orders(Some(KEY))
        .into_iter()
        .find(|o| o.order_type == "STOP_LOSS_LIMIT")
        .unwrap();
    assert_eq!(stop.status, "EXPIRED");
    assert_eq!(
        stop.expiry_reason.as_deref(),
        Some("EXECUTION_RULE_PRICE_RANGE_EXCEEDED")
    );
    assert!(ctl.trades(Some(KEY)).is_empty());
    assert_eq!(
        ctl.balance(KEY, "BTC").unwrap(),
        exchange_sim::BalanceInfo {
            asset: "BTC".into(),
            free: d("1"),
            locked: d("0")
        }
    );
}

#[tokio::test]
async fn count_filters_reject_with_minus_2010() {
    let sim = start().await;
    let a = sim.addr();
    sim.control().set_price("BTCUSDT", d("60000")).unwrap();
    let lists = ["c1", "c2", "c3", "c4", "c5"];
    for l in lists {
        let r = signed(
            a,
            "POST",
            "/api/v3/orderList/oco",
            &oco(l, "0.01", "63000", "58000", "57900"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let msg = fixture("CONSTRUCTED_error_-2010_filter_max_num_algo_orders.json")["msg"]
        .as_str()
        .unwrap()
        .to_string();
    signed(
        a,
        "POST",
        "/api/v3/orderList/oco",
        &oco("c6", "0.01", "63000", "58000", "57900"),
    )
    .await
    .assert_error(400, -2010, &msg);
    signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("type", "STOP_LOSS_LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.01"),
            ("price", "57000"),
            ("stopPrice", "57000"),
        ],
    )
    .await
    .assert_error(400, -2010, &msg);
    // Other symbols have their own count.
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BNBUSDT"),
            ("side", "BUY"),
            ("type", "STOP_LOSS_LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "1"),
            ("price", "700"),
            ("stopPrice", "700"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let _: Value = r.json();
}

/// A price move acts on every open order it reaches, and on no other: after
/// each step of a path down and back up, no order left open would fill or
/// trigger at the price it stopped at, and the orders the path crossed are
/// the ones that filled.
#[tokio::test]
async fn price_moves_act_on_every_order_they_reach() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let limit = |side: &'static str, price: String, cid: String| {
        let mut p = vec![
            ("symbol", "BTCUSDT".to_owned()),
            ("side", side.to_owned()),
            ("type", "LIMIT".to_owned()),
            ("timeInForce", "GTC".to_owned()),
            ("quantity", "0.001".to_owned()),
        ];
        p.push(("price", price));
        p.push(("newClientOrderId", cid));
        p
    };
    for k in 1..=20 {
        for (side, price) in [("BUY", 60000 - 50 * k), ("SELL", 60000 + 50 * k)] {
            let p = limit(side, price.to_string(), format!("{side}-{k}"));
            let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = signed(a, "POST", "/api/v3/order", &p).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    for k in 1..=5 {
        let (list, tp, stop, lim) = (
            format!("list-{k}"),
            (60500 + 100 * k).to_string(),
            (59700 - 100 * k).to_string(),
            (59690 - 100 * k).to_string(),
        );
        let r = signed(
            a,
            "POST",
            "/api/v3/orderList/oco",
            &oco(&list, "0.01", &tp, &stop, &lim),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let path: Vec<i64> = (0..=24)
        .map(|k| 60000 - 75 * k)
        .chain((0..=40).map(|k| 58200 + 90 * k))
        .collect();
    for p in &path {
        let price = Decimal::from(*p);
        ctl.set_price("BTCUSDT", price).unwrap();
        for o in ctl.open_orders(KEY) {
            let acts = match (o.order_type.as_str(), o.side.as_str()) {
                ("LIMIT", "BUY") => price <= o.price,
                ("LIMIT" | "LIMIT_MAKER", "SELL") => price >= o.price,
                // Untriggered, it waits above its stop; triggered, its limit is above the price.
                ("STOP_LOSS_LIMIT", "SELL") => price <= o.stop_price && price >= o.price,
                other => panic!("unexpected open order {other:?}"),
            };
            assert!(!acts, "at {price}: {o:?} left open");
        }
    }
    let (low, high) = (58200, 58200 + 90 * 40);
    let filled = |cid: &str| {
        ctl.orders(Some(KEY))
            .iter()
            .any(|o| o.client_order_id == cid && o.status == "FILLED")
    };
    for k in 1..=20 {
        assert_eq!(
            filled(&format!("BUY-{k}")),
            60000 - 50 * k >= low,
            "BUY-{k}"
        );
        assert_eq!(
            filled(&format!("SELL-{k}")),
            60000 + 50 * k <= high,
            "SELL-{k}"
        );
    }
    // Every list's stop was crossed on the way down: each ended.
    assert_eq!(ctl.executing_list_count(), 0);
}
