//! REST API: market data, signing, orders, matching, balances, shapes against the fixtures.

mod common;

use common::*;
use exchange_sim::{AccountSpec, Commission, CommissionAsset, hmac_sha256_hex};
use serde_json::Value;

#[tokio::test]
async fn market_data_endpoints_answer_like_binance() {
    let sim = start().await;
    let a = sim.addr();
    let r = http(a, "GET", "/api/v3/ping", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "{}"));
    let t = http(a, "GET", "/api/v3/time", &[], "").await.json();
    assert!(t["serverTime"].as_u64().unwrap().abs_diff(now_ms()) < 5_000);

    let info = http(a, "GET", "/api/v3/exchangeInfo", &[], "").await.json();
    let skeleton = fixture("exchange_info_skeleton.json");
    let derived = fixture("DERIVED_exchange_info_btcusdt.json");
    assert_shape(&info["symbols"][0], &skeleton["symbols"][0], &[], &[]);
    assert_key_order(&info, &skeleton);
    assert_shape(&info["rateLimits"], &derived["rateLimits"], &[], &[]);
    let names: Vec<&str> = info["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["symbol"].as_str().unwrap())
        .collect();
    for s in ["BTCUSDT", "ETHUSDT", "BNBUSDT", "ETHBTC"] {
        assert!(names.contains(&s), "{names:?}");
    }
    let symbol = |name: &str| {
        info["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["symbol"] == name)
            .unwrap()
            .clone()
    };
    let btc = symbol("BTCUSDT");
    // Order types as on Binance: no market stop on the majors, every type
    // on the documentation's ETHBTC.
    assert_eq!(btc["orderTypes"], derived["symbols"][0]["orderTypes"]);
    assert_eq!(symbol("ETHUSDT")["orderTypes"], btc["orderTypes"]);
    assert_eq!(
        symbol("ETHBTC")["orderTypes"],
        skeleton["symbols"][0]["orderTypes"]
    );
    let real_filters = derived["symbols"][0]["filters"].as_array().unwrap();
    for f in btc["filters"].as_array().unwrap() {
        let real = real_filters
            .iter()
            .find(|r| r["filterType"] == f["filterType"])
            .unwrap();
        assert_shape(f, real, &[], &[]);
    }
    for want in [
        "PRICE_FILTER",
        "LOT_SIZE",
        "MARKET_LOT_SIZE",
        "NOTIONAL",
        "PERCENT_PRICE_BY_SIDE",
        "MAX_NUM_ORDERS",
        "MAX_NUM_ALGO_ORDERS",
    ] {
        assert!(
            btc["filters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["filterType"] == want),
            "{want}"
        );
    }
    let algo = btc["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["filterType"] == "MAX_NUM_ALGO_ORDERS")
        .unwrap();
    assert_eq!(algo["maxNumAlgoOrders"], 5);

    let one = http(a, "GET", "/api/v3/exchangeInfo?symbol=ETHUSDT", &[], "")
        .await
        .json();
    assert_eq!(one["symbols"].as_array().unwrap().len(), 1);
    http(a, "GET", "/api/v3/exchangeInfo?symbol=NOPE", &[], "")
        .await
        .assert_error(400, -1121, "Invalid symbol.");

    sim.control().set_price("BTCUSDT", d("61234.5")).unwrap();
    let p = http(a, "GET", "/api/v3/ticker/price?symbol=BTCUSDT", &[], "")
        .await
        .json();
    assert_eq!(
        p,
        serde_json::json!({"symbol": "BTCUSDT", "price": "61234.50000000"})
    );
    let all = http(a, "GET", "/api/v3/ticker/price", &[], "").await.json();
    assert_eq!(all.as_array().unwrap().len(), 4);
    let some = http(
        a,
        "GET",
        "/api/v3/ticker/price?symbols=%5B%22BTCUSDT%22,%22BNBUSDT%22%5D",
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(some.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn signing_accepts_query_body_and_mixed_and_rejects_bad_ones() {
    let sim = start().await;
    let a = sim.addr();
    let r = signed(a, "GET", "/api/v3/account", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_shape(&r.json(), &fixture("account_response.json"), &[], &[]);
    assert_key_order(&r.json(), &fixture("account_response.json"));
    assert_eq!(r.header("x-mbx-used-weight-1m"), Some("20"));

    // POST with everything in the body.
    let r = signed_body(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.001"),
            ("price", "50000"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Mixed: query then body, signature over query immediately followed by body.
    let ts = now_ms().to_string();
    let q = encode(&[("symbol", "BTCUSDT"), ("side", "BUY")]);
    let b = encode(&[
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
        ("quantity", "0.001"),
        ("price", "50000"),
        ("timestamp", &ts),
    ]);
    let sig = hmac_sha256_hex(SECRET, &format!("{q}{b}"));
    let r = http(
        a,
        "POST",
        &format!("/api/v3/order?{q}"),
        &[("X-MBX-APIKEY", KEY)],
        &format!("{b}&signature={sig}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Query wins on a clash: body says SELL, query says BUY.
    let b2 = encode(&[
        ("side", "SELL"),
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
        ("quantity", "0.001"),
        ("price", "50000"),
        ("timestamp", &ts),
    ]);
    let sig = hmac_sha256_hex(SECRET, &format!("{q}{b2}"));
    let r = http(
        a,
        "POST",
        &format!("/api/v3/order?{q}"),
        &[("X-MBX-APIKEY", KEY)],
        &format!("{b2}&signature={sig}"),
    )
    .await;
    assert_eq!(r.json()["side"], "BUY", "{}", r.body);

    // Bad signature, unknown key, missing key, stale timestamp.
    let r = http(
        a,
        "GET",
        &format!("/api/v3/account?timestamp={}&signature=00", now_ms()),
        &[("X-MBX-APIKEY", KEY)],
        "",
    )
    .await;
    r.assert_error(400, -1022, "Signature for this request is not valid.");
    let r = signed_as(a, "nobody", SECRET, "GET", "/api/v3/account", &[]).await;
    r.assert_error(
        401,
        -2015,
        "Invalid API-key, IP, or permissions for action.",
    );
    let r = http(a, "GET", "/api/v3/account?timestamp=1", &[], "").await;
    r.assert_error(401, -2014, "API-key format invalid.");
    let old = (now_ms() - 10_000).to_string();
    let q = encode(&[("timestamp", old.as_str())]);
    let sig = hmac_sha256_hex(SECRET, &q);
    http(
        a,
        "GET",
        &format!("/api/v3/account?{q}&signature={sig}"),
        &[("X-MBX-APIKEY", KEY)],
        "",
    )
    .await
    .assert_error(
        400,
        -1021,
        "Timestamp for this request is outside of the recvWindow.",
    );
    let q = encode(&[("timestamp", old.as_str()), ("recvWindow", "20000")]);
    let sig = hmac_sha256_hex(SECRET, &q);
    assert_eq!(
        http(
            a,
            "GET",
            &format!("/api/v3/account?{q}&signature={sig}"),
            &[("X-MBX-APIKEY", KEY)],
            ""
        )
        .await
        .status,
        200
    );
    let future = (now_ms() + 5_000).to_string();
    let q = encode(&[("timestamp", future.as_str())]);
    let sig = hmac_sha256_hex(SECRET, &q);
    http(
        a,
        "GET",
        &format!("/api/v3/account?{q}&signature={sig}"),
        &[("X-MBX-APIKEY", KEY)],
        "",
    )
    .await
    .assert_error(
        400,
        -1021,
        "Timestamp for this request was 1000ms ahead of the server's time.",
    );
}

#[tokio::test]
async fn malformed_parameters_get_binance_codes() {
    let sim = start().await;
    let a = sim.addr();
    let base = [
        ("symbol", "BTCUSDT"),
        ("side", "BUY"),
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
        ("price", "50000"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    signed(a, "POST", "/api/v3/order", &with(&[("quantity", "1e-05")])).await.assert_error(
        400,
        -1100,
        "Illegal characters found in parameter 'quantity'; legal range is '^([0-9]{1,20})(\\.[0-9]{1,20})?$'.",
    );
    signed(
        a,
        "POST",
        "/api/v3/order",
        &with(&[("quantity", "0.000000001")]),
    )
    .await
    .assert_error(400, -1111, "Parameter 'quantity' has too much precision.");
    signed(a, "POST", "/api/v3/order", &base)
        .await
        .assert_error(
            400,
            -1102,
            "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed.",
        );
    signed(
        a,
        "POST",
        "/api/v3/order",
        &with(&[("quantity", "0.001"), ("bogus", "1")]),
    )
    .await
    .assert_error(
        400,
        -1104,
        "Not all sent parameters were read; read '8' parameter(s) but was sent '9'.",
    );
    signed(
        a,
        "POST",
        "/api/v3/order",
        &with(&[("quantity", "0.001"), ("newClientOrderId", "")]),
    )
    .await
    .assert_error(400, -1105, "Parameter 'newClientOrderId' was empty.");
    let r = http(
        a,
        "GET",
        "/api/v3/ticker/price?symbol=BTCUSDT&symbol=ETHUSDT",
        &[],
        "",
    )
    .await;
    r.assert_error(400, -1101, "Duplicate values for a parameter detected.");
    let mut v = with(&[("quantity", "0.001")]);
    v[1] = ("side", "UP");
    signed(a, "POST", "/api/v3/order", &v)
        .await
        .assert_error(400, -1117, "Invalid side.");
    v[1] = ("side", "BUY");
    v[2] = ("type", "FANCY");
    signed(a, "POST", "/api/v3/order", &v)
        .await
        .assert_error(400, -1116, "Invalid orderType.");
    v[2] = ("type", "LIMIT");
    v[3] = ("timeInForce", "NEVER");
    signed(a, "POST", "/api/v3/order", &v)
        .await
        .assert_error(400, -1115, "Invalid timeInForce.");
    signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "MARKET"),
            ("quantity", "0.001"),
            ("price", "1"),
        ],
    )
    .await
    .assert_error(400, -1106, "Parameter 'price' sent when not required.");
    signed(
        a,
        "POST",
        "/api/v3/order",
        &with(&[("quantity", "0.001"), ("newClientOrderId", "bad id!")]),
    )
    .await
    .assert_error(
        400,
        -1100,
        fixture("error_-1100_illegal_new_client_order_id.json")["msg"]
            .as_str()
            .unwrap(),
    );
    signed(a, "GET", "/api/v3/order", &[("symbol", "BTCUSDT")])
        .await
        .assert_error(
            400,
            -1102,
            "Param 'orderId' or 'origClientOrderId' must be sent, but both were empty/null!",
        );
    // Garbage never crashes the server.
    let r = http(
        a,
        "POST",
        "/api/v3/order?%ZZ=%%&&&=",
        &[("X-MBX-APIKEY", KEY)],
        "\u{0}\u{1}",
    )
    .await;
    assert!(r.status >= 400);
    assert_eq!(http(a, "GET", "/api/v3/ping", &[], "").await.status, 200);
}

#[tokio::test]
async fn static_filters_answer_minus_1013() {
    let sim = start().await;
    let a = sim.addr();
    let order = |price: &'static str, qty: &'static str| {
        vec![
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("price", price),
            ("quantity", qty),
        ]
    };
    let err = |name: &str| fixture(name)["msg"].as_str().unwrap().to_string();
    signed(a, "POST", "/api/v3/order", &order("50000.001", "0.001"))
        .await
        .assert_error(400, -1013, "Filter failure: PRICE_FILTER");
    assert_eq!(
        err("CONSTRUCTED_error_-1013_filter_price_filter.json"),
        "Filter failure: PRICE_FILTER"
    );
    signed(a, "POST", "/api/v3/order", &order("50000", "0.000015"))
        .await
        .assert_error(
            400,
            -1013,
            &err("CONSTRUCTED_error_-1013_filter_lot_size.json"),
        );
    signed(a, "POST", "/api/v3/order", &order("50000", "0.00001"))
        .await
        .assert_error(
            400,
            -1013,
            &err("CONSTRUCTED_error_-1013_filter_notional.json"),
        );
    signed(a, "POST", "/api/v3/order", &order("1000", "0.01"))
        .await
        .assert_error(
            400,
            -1013,
            &err("CONSTRUCTED_error_-1013_filter_percent_price_by_side.json"),
        );
}

#[tokio::test]
async fn market_buy_fills_at_price_with_base_commission_and_full_shape() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("50000")).unwrap();
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "MARKET"),
            ("quantity", "0.01"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_shape(
        &v,
        &fixture("order_full_response_market_buy_expired_partial.json"),
        &[],
        &["origQuoteOrderQty"],
    );
    assert_eq!(v["status"], "FILLED");
    assert_eq!(v["executedQty"], "0.01000000");
    assert_eq!(v["cummulativeQuoteQty"], "500.00000000");
    assert_eq!(v["fills"][0]["commission"], "0.00001000");
    assert_eq!(v["fills"][0]["commissionAsset"], "BTC");
    assert_eq!(r.header("x-mbx-order-count-10s"), Some("1"));
    assert_eq!(
        r.header("x-mbx-used-weight-1m"),
        Some("0"),
        "successful placement costs 0 weight"
    );
    let btc = ctl.balance(KEY, "BTC").unwrap();
    assert_eq!(btc.free, d("1.00999"));
    assert_eq!(ctl.balance(KEY, "USDT").unwrap().free, d("99500"));

    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("type", "MARKET"),
            ("quantity", "0.01"),
            ("newOrderRespType", "RESULT"),
        ],
    )
    .await;
    assert_shape(&r.json(), &fixture("order_result_response.json"), &[], &[]);
    assert_key_order(&r.json(), &fixture("order_result_response.json"));
    // SELL commission comes from the received quote: 500 * 0.001.
    assert_eq!(ctl.balance(KEY, "USDT").unwrap().free, d("99999.5"));

    let trades = signed(a, "GET", "/api/v3/myTrades", &[("symbol", "BTCUSDT")])
        .await
        .json();
    assert_shape(&trades, &fixture("my_trades_response.json"), &[], &[]);
    let ids: Vec<u64> = trades
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
}

#[tokio::test]
async fn limit_buy_rests_locks_quote_then_fills_when_price_drops() {
    let sim = start().await;
    let a = sim.addr();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.1"),
            ("price", "59000"),
            ("newClientOrderId", "entry-1"),
        ],
    )
    .await;
    let v = r.json();
    assert_eq!(v["status"], "NEW");
    assert_eq!(v["fills"], Value::Array(vec![]));
    let usdt = ctl.balance(KEY, "USDT").unwrap();
    assert_eq!((usdt.free, usdt.locked), (d("94100"), d("5900")));

    let q = signed(
        a,
        "GET",
        "/api/v3/order",
        &[("symbol", "BTCUSDT"), ("origClientOrderId", "entry-1")],
    )
    .await
    .json();
    assert_shape(&q, &fixture("order_query_response.json"), &[], &[]);
    assert_key_order(&q, &fixture("order_query_response.json"));
    let open = signed(a, "GET", "/api/v3/openOrders", &[("symbol", "BTCUSDT")])
        .await
        .json();
    assert_shape(&open, &fixture("open_orders_response.json"), &[], &[]);
    assert_key_order(&open[0], &fixture("open_orders_response.json")[0]);

    // Duplicate client id among open orders.
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.1"),
            ("price", "59000"),
            ("newClientOrderId", "entry-1"),
        ],
    )
    .await;
    r.assert_error(400, -2010, "Duplicate order sent.");

    ctl.set_price("BTCUSDT", d("59500")).unwrap();
    assert_eq!(ctl.open_orders(KEY).len(), 1);
    ctl.set_price("BTCUSDT", d("58900")).unwrap();
    let q = signed(
        a,
        "GET",
        "/api/v3/order",
        &[("symbol", "BTCUSDT"), ("origClientOrderId", "entry-1")],
    )
    .await
    .json();
    assert_eq!(q["status"], "FILLED");
    assert_eq!(
        q["cummulativeQuoteQty"], "5900.00000000",
        "a resting limit fills at its limit price"
    );
    let usdt = ctl.balance(KEY, "USDT").unwrap();
    assert_eq!((usdt.free, usdt.locked), (d("94100"), d("0")));
    assert_eq!(ctl.balance(KEY, "BTC").unwrap().free, d("1.0999"));
    // Filled: the client id can be used again.
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.1"),
            ("price", "58000"),
            ("newClientOrderId", "entry-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn limit_buy_fills_in_parts_when_configured() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    ctl.set_fill_parts("BTCUSDT", 3).unwrap();
    let r = signed(
        sim.addr(),
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.3"),
            ("price", "59000"),
        ],
    )
    .await;
    assert_eq!(r.json()["status"], "NEW");
    ctl.set_price("BTCUSDT", d("58000")).unwrap();
    let trades = ctl.trades(Some(KEY));
    assert_eq!(trades.len(), 3);
    assert!(trades.iter().all(|t| t.qty == d("0.1") && t.is_maker));
    assert_eq!(ctl.orders(Some(KEY))[0].status, "FILLED");
}

#[tokio::test]
async fn cancel_and_not_found_errors() {
    let sim = start().await;
    let a = sim.addr();
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.1"),
            ("price", "55000"),
            ("newClientOrderId", "myOrder1"),
        ],
    )
    .await;
    let id = r.json()["orderId"].as_u64().unwrap().to_string();
    let c = signed(
        a,
        "DELETE",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("orderId", &id),
            ("newClientOrderId", "cancelMyOrder1"),
        ],
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.body);
    let v = c.json();
    assert_shape(&v, &fixture("order_cancel_response.json"), &[], &[]);
    assert_key_order(&v, &fixture("order_cancel_response.json"));
    assert_eq!(
        (
            v["status"].as_str(),
            v["clientOrderId"].as_str(),
            v["origClientOrderId"].as_str()
        ),
        (Some("CANCELED"), Some("cancelMyOrder1"), Some("myOrder1"))
    );
    assert_eq!(sim.control().balance(KEY, "USDT").unwrap().locked, d("0"));
    signed(
        a,
        "DELETE",
        "/api/v3/order",
        &[("symbol", "BTCUSDT"), ("orderId", &id)],
    )
    .await
    .assert_error(400, -2011, "Unknown order sent.");
    signed(
        a,
        "GET",
        "/api/v3/order",
        &[("symbol", "BTCUSDT"), ("orderId", "999999")],
    )
    .await
    .assert_error(400, -2013, "Order does not exist.");
    signed(
        a,
        "GET",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("orderId", &id),
            ("origClientOrderId", "other"),
        ],
    )
    .await
    .assert_error(
        400,
        -2039,
        "Client order ID is not correct for this order ID.",
    );
    let all = signed(a, "GET", "/api/v3/allOrders", &[("symbol", "BTCUSDT")])
        .await
        .json();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["status"], "CANCELED");
}

#[tokio::test]
async fn insufficient_balance_and_limit_maker_and_stop_rules() {
    let sim = start().await;
    let a = sim.addr();
    sim.control().set_price("BTCUSDT", d("60000")).unwrap();
    signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "2"),
            ("price", "61000"),
        ],
    )
    .await
    .assert_error(
        400,
        -2010,
        "Account has insufficient balance for requested action.",
    );
    signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("type", "LIMIT_MAKER"),
            ("quantity", "0.1"),
            ("price", "59000"),
        ],
    )
    .await
    .assert_error(400, -2010, "Order would immediately match and take.");
    signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("type", "STOP_LOSS_LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.1"),
            ("price", "60500"),
            ("stopPrice", "60500"),
        ],
    )
    .await
    .assert_error(400, -2010, "Order would trigger immediately.");
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("type", "LIMIT_MAKER"),
            ("quantity", "0.1"),
            ("price", "61000"),
        ],
    )
    .await;
    assert_shape(&r.json(), &fixture("order_ack_response.json"), &[], &[]);
    // BTCUSDT takes no stop-loss (market) order, as on Binance.
    let stop_loss = |symbol, qty, stop| {
        [
            ("symbol", symbol),
            ("side", "SELL"),
            ("type", "STOP_LOSS"),
            ("quantity", qty),
            ("stopPrice", stop),
        ]
    };
    signed(
        a,
        "POST",
        "/api/v3/order",
        &stop_loss("BTCUSDT", "0.1", "59000"),
    )
    .await
    .assert_error(
        400,
        -2010,
        "Stop loss orders are not supported for this symbol.",
    );
    let ctl = sim.control();
    assert_eq!(ctl.balance(KEY, "BTC").unwrap().locked, d("0.1"));
    // ETHBTC does: it triggers when the price falls to its stop.
    ctl.deposit(KEY, "ETH", d("1")).unwrap();
    ctl.set_price("ETHBTC", d("0.05")).unwrap();
    let r = signed(
        a,
        "POST",
        "/api/v3/order",
        &stop_loss("ETHBTC", "0.5", "0.049"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ctl.balance(KEY, "ETH").unwrap().locked, d("0.5"));
    ctl.set_price("ETHBTC", d("0.0489")).unwrap();
    let stop = ctl
        .orders(Some(KEY))
        .into_iter()
        .find(|o| o.order_type == "STOP_LOSS")
        .unwrap();
    assert_eq!(stop.status, "FILLED");
    assert_eq!(stop.cummulative_quote_qty, d("0.02445"));
}

#[tokio::test]
async fn commission_in_quote_or_a_third_asset() {
    let cfg = config()
        .with_account(
            AccountSpec::new("q", "qs", vec![("USDT".into(), d("10000"))]).with_commission(
                Commission {
                    rate: d("0.001"),
                    asset: CommissionAsset::Quote,
                },
            ),
        )
        .with_account(
            AccountSpec::new(
                "b",
                "bs",
                vec![("USDT".into(), d("10000")), ("BNB".into(), d("1"))],
            )
            .with_commission(Commission {
                rate: d("0.001"),
                asset: CommissionAsset::Other("BNB".into()),
            }),
        );
    let sim = start_with(cfg).await;
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("50000")).unwrap();
    ctl.set_price("BNBUSDT", d("500")).unwrap();
    let buy = [
        ("symbol", "BTCUSDT"),
        ("side", "BUY"),
        ("type", "MARKET"),
        ("quantity", "0.1"),
    ];
    let r = signed_as(sim.addr(), "q", "qs", "POST", "/api/v3/order", &buy)
        .await
        .json();
    assert_eq!(r["fills"][0]["commissionAsset"], "USDT");
    assert_eq!(ctl.balance("q", "BTC").unwrap().free, d("0.1"));
    assert_eq!(ctl.balance("q", "USDT").unwrap().free, d("4995"));
    let r = signed_as(sim.addr(), "b", "bs", "POST", "/api/v3/order", &buy)
        .await
        .json();
    assert_eq!(r["fills"][0]["commissionAsset"], "BNB");
    assert_eq!(
        r["fills"][0]["commission"], "0.01000000",
        "5000 USDT * 0.001 / 500"
    );
    assert_eq!(ctl.balance("b", "BNB").unwrap().free, d("0.99"));
    assert_eq!(ctl.balance("b", "BTC").unwrap().free, d("0.1"));
}

#[tokio::test]
async fn admin_api_sets_prices_accounts_and_lists_state() {
    let sim = start().await;
    let a = sim.addr();
    let json = [("Content-Type", "application/json")];
    let r = http(a, "POST", "/admin/accounts", &json, r#"{"apiKey":"k2","secret":"s2","balances":{"USDT":"1000"},"commission":{"rate":"0.002","asset":"QUOTE"}}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        a,
        "POST",
        "/admin/price",
        &json,
        r#"{"symbol":"ETHUSDT","price":"2500.5"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(sim.control().price("ETHUSDT"), Some(d("2500.5")));
    let r = http(
        a,
        "POST",
        "/admin/price/step",
        &json,
        r#"{"symbol":"ETHUSDT","delta":"-0.5"}"#,
    )
    .await;
    assert_eq!(r.json()["price"], "2500.0");
    let r = signed_as(
        a,
        "k2",
        "s2",
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "ETHUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.1"),
            ("price", "2400"),
            ("newClientOrderId", "adm-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let orders = http(a, "GET", "/admin/orders?apiKey=k2&open=true", &[], "")
        .await
        .json();
    assert_eq!(orders[0]["clientOrderId"], "adm-1");
    assert_eq!(orders[0]["price"], "2400");
    let bal = http(a, "GET", "/admin/accounts/k2/balances", &[], "")
        .await
        .json();
    assert_eq!(
        bal[0],
        serde_json::json!({"asset": "USDT", "free": "760.0", "locked": "240.0"})
    );
    let reqs = http(a, "GET", "/admin/requests", &[], "").await.json();
    let placed = reqs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "/api/v3/order")
        .unwrap();
    assert_eq!(placed["apiKey"], "k2");
    assert_eq!(placed["clientIds"][0], "adm-1");
    assert!(placed["receivedUs"].as_u64().unwrap() <= placed["respondedUs"].as_u64().unwrap());
    let r = http(
        a,
        "POST",
        "/admin/price/path",
        &json,
        r#"{"symbol":"ETHUSDT","prices":["2450","2399"],"intervalMs":1}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let ctl = sim.control();
    assert!(
        wait_until(std::time::Duration::from_secs(5), || ctl
            .open_orders("k2")
            .is_empty())
        .await
    );
    let trades = http(a, "GET", "/admin/trades?apiKey=k2", &[], "")
        .await
        .json();
    assert_eq!(trades[0]["price"], "2400");
    assert_eq!(http(a, "GET", "/admin/nothing", &[], "").await.status, 404);
}

#[tokio::test]
async fn admin_is_off_when_disabled() {
    let sim =
        start_with(exchange_sim::SimConfig::new("127.0.0.1:0".parse().unwrap()).with_admin(false))
            .await;
    assert_eq!(
        http(sim.addr(), "GET", "/admin/prices", &[], "")
            .await
            .status,
        404
    );
    let sim2 = start_with(exchange_sim::SimConfig::new("127.0.0.1:0".parse().unwrap())).await;
    assert_eq!(
        http(sim2.addr(), "GET", "/admin/prices", &[], "")
            .await
            .status,
        200
    );
    assert_eq!(
        http(sim2.addr(), "POST", "/admin/faults/clear", &[], "")
            .await
            .status,
        404,
        "faults need with_faults(true)"
    );
}
