//! WebSocket API user data stream: envelope, events, subscriptions, pings, age limit, faults.

mod common;

use std::time::Duration;

use common::*;
use exchange_sim::hmac_sha256_hex;
use futures_util::StreamExt;
use serde_json::{Value, json};

fn event_of<'a>(v: &'a Value, e: &str) -> Option<&'a Value> {
    v.get("event").filter(|ev| ev["e"] == e)
}

#[tokio::test]
async fn subscription_delivers_execution_reports_and_positions_with_binance_shapes() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let mut ws = ws_connect(&sim.ws_api_url()).await;
    let r = ws_call(&mut ws, json!({"id": "s1", "method": "userDataStream.subscribe.signature", "params": ws_signature_params(KEY, SECRET)})).await;
    assert_shape(
        &r,
        &fixture("ws_api_user_data_stream_subscribe_signature_response.json"),
        &[],
        &["rateLimits"],
    );
    assert_eq!(r["rateLimits"][0]["rateLimitType"], "REQUEST_WEIGHT");
    let sub = r["result"]["subscriptionId"].as_u64().unwrap();

    let placed = signed(
        sim.addr(),
        "POST",
        "/api/v3/order",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.01"),
            ("price", "59000"),
            ("newClientOrderId", "ws-1"),
        ],
    )
    .await;
    assert_eq!(placed.status, 200);
    let evs = events_until(&mut ws, |e| e["e"] == "outboundAccountPosition").await;
    let new = evs
        .iter()
        .find(|v| event_of(v, "executionReport").is_some())
        .unwrap();
    assert_eq!(new["subscriptionId"], sub);
    assert_shape(new, &fixture("ws_execution_report_new.json"), &["v"], &[]);
    assert_key_order(
        &new["event"],
        &fixture("ws_execution_report_new.json")["event"],
    );
    assert_eq!(new["event"]["x"], "NEW");
    assert_eq!(new["event"]["c"], "ws-1");
    let pos = evs.last().unwrap();
    assert_shape(pos, &fixture("ws_outbound_account_position.json"), &[], &[]);
    assert_eq!(pos["event"]["B"][0]["a"], "USDT");
    assert_eq!(pos["event"]["B"][0]["l"], "590.00000000");

    ctl.set_price("BTCUSDT", d("58000")).unwrap();
    let evs = events_until(&mut ws, |e| e["e"] == "outboundAccountPosition").await;
    let trade = evs
        .iter()
        .find_map(|v| event_of(v, "executionReport"))
        .unwrap();
    assert_shape(
        trade,
        &fixture("ws_execution_report_trade_partial_1_raw.json"),
        &[],
        &[],
    );
    assert_eq!(
        (trade["x"].as_str(), trade["X"].as_str()),
        (Some("TRADE"), Some("FILLED"))
    );
    assert_eq!(trade["N"], "BTC");
    assert_eq!(trade["n"], "0.00001000");
    assert_eq!(trade["z"], "0.01000000");
    assert_eq!(trade["Z"], "590.00000000");
    assert!(trade["t"].as_i64().unwrap() > 0);

    ctl.deposit(KEY, "USDT", d("12.5")).unwrap();
    let evs = events_until(&mut ws, |e| e["e"] == "balanceUpdate").await;
    assert_shape(
        evs.last().unwrap(),
        &fixture("ws_balance_update.json"),
        &[],
        &[],
    );
    assert_eq!(evs.last().unwrap()["event"]["d"], "12.50000000");
}

#[tokio::test]
async fn oco_events_cover_new_legs_list_status_and_cancel_other() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", d("60000")).unwrap();
    let mut ws = subscribe(&sim.ws_api_url(), KEY, SECRET).await;
    let r = signed(
        sim.addr(),
        "POST",
        "/api/v3/orderList/oco",
        &[
            ("symbol", "BTCUSDT"),
            ("side", "SELL"),
            ("quantity", "0.1"),
            ("aboveType", "LIMIT_MAKER"),
            ("abovePrice", "62000"),
            ("belowType", "STOP_LOSS_LIMIT"),
            ("belowStopPrice", "58000"),
            ("belowPrice", "57900"),
            ("belowTimeInForce", "GTC"),
        ],
    )
    .await;
    let list_id = r.json()["orderListId"].as_i64().unwrap();
    let evs = events_until(&mut ws, |e| e["e"] == "listStatus").await;
    let reports: Vec<&Value> = evs
        .iter()
        .filter_map(|v| event_of(v, "executionReport"))
        .collect();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|e| e["g"] == list_id && e["x"] == "NEW"));
    let status = evs.last().unwrap();
    assert_shape(status, &fixture("ws_list_status.json"), &[], &[]);
    assert_eq!(status["event"]["l"], "EXEC_STARTED");

    ctl.set_price("BTCUSDT", d("62000")).unwrap();
    let evs = events_until(&mut ws, |e| e["e"] == "listStatus").await;
    let reports: Vec<&Value> = evs
        .iter()
        .filter_map(|v| event_of(v, "executionReport"))
        .collect();
    assert_eq!(reports[0]["o"], "LIMIT_MAKER");
    assert_eq!(reports[0]["x"], "TRADE");
    assert_eq!(reports[0]["m"], true);
    assert_eq!(reports[1]["o"], "STOP_LOSS_LIMIT");
    assert_eq!(
        (reports[1]["x"].as_str(), reports[1]["eR"].as_str()),
        (Some("EXPIRED"), Some("OCO_TRIGGER"))
    );
    assert_shape(
        reports[1],
        &fixture("ws_execution_report_expired_raw.json"),
        &["W"],
        &["eR"],
    );
    let done = &evs.last().unwrap()["event"];
    assert_shape(
        done,
        &fixture("THIRDPARTY_list_status_oco_all_done.json"),
        &[],
        &[],
    );
    assert_eq!(
        (done["l"].as_str(), done["L"].as_str()),
        (Some("ALL_DONE"), Some("ALL_DONE"))
    );
}

#[tokio::test]
async fn logon_subscribe_unsubscribe_and_subscription_errors() {
    let sim = start().await;
    let mut ws = ws_connect(&sim.ws_api_url()).await;
    let r = ws_call(
        &mut ws,
        json!({"id": 7, "method": "session.logon", "params": ws_signature_params(KEY, SECRET)}),
    )
    .await;
    assert_eq!(r["id"], 7);
    assert_shape(
        &r["result"],
        &fixture("ws_api_session_logon_response.json")["result"],
        &[],
        &[],
    );
    assert_eq!(r["result"]["apiKey"], KEY);
    let r = ws_call(
        &mut ws,
        json!({"id": "a", "method": "userDataStream.subscribe"}),
    )
    .await;
    assert_shape(
        &r,
        &fixture("ws_api_user_data_stream_subscribe_response.json"),
        &[],
        &["rateLimits"],
    );
    let r = ws_call(&mut ws, json!({"id": "b", "method": "userDataStream.subscribe.signature", "params": ws_signature_params(KEY, SECRET)})).await;
    assert_eq!(
        (r["status"].as_u64(), r["error"]["code"].as_i64()),
        (Some(400), Some(-2035))
    );
    let r = ws_call(
        &mut ws,
        json!({"id": "c", "method": "session.subscriptions"}),
    )
    .await;
    assert_shape(
        &r,
        &fixture("ws_api_session_subscriptions_response.json"),
        &[],
        &["rateLimits"],
    );
    let r = ws_call(
        &mut ws,
        json!({"id": "d", "method": "userDataStream.unsubscribe", "params": {"subscriptionId": 5}}),
    )
    .await;
    assert_eq!(
        r["error"],
        json!({"code": -2036, "msg": "User Data Stream subscription not active."})
    );
    let r = ws_call(
        &mut ws,
        json!({"id": "e", "method": "userDataStream.unsubscribe"}),
    )
    .await;
    assert_shape(
        &r,
        &fixture("ws_api_user_data_stream_unsubscribe_response.json"),
        &[],
        &["rateLimits"],
    );
    let term = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_shape(&term, &fixture("ws_event_stream_terminated.json"), &[], &[]);
    assert_eq!(sim.control().subscription_count(), 0);

    let mut bad = ws_signature_params(KEY, SECRET);
    bad["signature"] = json!(hmac_sha256_hex("wrong", "x"));
    let r = ws_call(
        &mut ws,
        json!({"id": "f", "method": "userDataStream.subscribe.signature", "params": bad}),
    )
    .await;
    assert_eq!(r["error"]["code"], -1022);
    let r = ws_call(&mut ws, json!({"id": "g", "method": "userDataStream.subscribe.signature", "params": ws_signature_params("nobody", SECRET)})).await;
    assert_eq!(
        (r["status"].as_u64(), r["error"]["code"].as_i64()),
        (Some(401), Some(-2015))
    );
    let r = ws_call(&mut ws, json!({"id": "h", "method": "no.such.method"})).await;
    assert_eq!(r["status"], 400);
}

#[tokio::test]
async fn server_pings_and_drops_silent_clients() {
    let cfg = config()
        .with_ping_interval(Duration::from_millis(50))
        .with_pong_timeout(Duration::from_millis(200));
    let sim = start_with(cfg).await;
    let ctl = sim.control();
    let mut ws = ws_connect(&sim.ws_api_url()).await;
    // Reading lets the client library answer pings: the connection stays.
    let got_ping = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) = ws.next().await {
                return true;
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(got_ping);
    let _ = tokio::time::timeout(Duration::from_millis(400), async {
        while ws.next().await.is_some() {}
    })
    .await;
    assert_eq!(
        ctl.connection_count(),
        1,
        "a ponging client stays connected"
    );
    // Stop reading (no pongs): the server gives up after the pong timeout.
    assert!(wait_until(Duration::from_secs(5), || ctl.connection_count() == 0).await);
    drop(ws);
}

#[tokio::test]
async fn connections_end_at_the_age_limit() {
    let sim = start_with(config().with_max_connection_age(Duration::from_millis(200))).await;
    let mut ws = subscribe(&sim.ws_api_url(), KEY, SECRET).await;
    assert_eq!(
        ws_next_json(&mut ws, Duration::from_secs(5)).await,
        None,
        "closed by the server"
    );
    let ctl = sim.control();
    assert!(wait_until(Duration::from_secs(5), || ctl.connection_count() == 0).await);
}

#[tokio::test]
async fn stream_faults_drop_stall_refuse_shutdown_revoke_terminate() {
    let sim = start().await;
    let ctl = sim.control();
    let url = sim.ws_api_url();
    let order = [
        ("symbol", "BTCUSDT"),
        ("side", "BUY"),
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
        ("quantity", "0.01"),
        ("price", "50000"),
    ];

    // Drop.
    let mut ws = subscribe(&url, KEY, SECRET).await;
    assert_eq!(ctl.drop_streams(Some(KEY)), 1);
    assert_eq!(ws_next_json(&mut ws, Duration::from_secs(5)).await, None);
    assert!(wait_until(Duration::from_secs(5), || ctl.subscription_count() == 0).await);

    // Stall: socket open, events lost.
    let mut ws = subscribe(&url, KEY, SECRET).await;
    ctl.set_streams_stalled(true);
    signed(sim.addr(), "POST", "/api/v3/order", &order).await;
    assert_eq!(
        ws_next_json(&mut ws, Duration::from_millis(300)).await,
        None
    );
    assert_eq!(ctl.connection_count(), 1);
    ctl.set_streams_stalled(false);
    signed(sim.addr(), "POST", "/api/v3/order", &order).await;
    assert!(
        ws_next_json(&mut ws, Duration::from_secs(5))
            .await
            .is_some()
    );

    // Shutdown.
    assert_eq!(ctl.server_shutdown(None), 1);
    let ev = events_until(&mut ws, |e| e["e"] == "serverShutdown").await;
    assert_shape(
        ev.last().unwrap(),
        &fixture("ws_server_shutdown.json"),
        &[],
        &[],
    );
    assert_eq!(ws_next_json(&mut ws, Duration::from_secs(5)).await, None);

    // Refuse.
    ctl.set_refuse_streams(true);
    assert!(
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .is_err()
    );
    ctl.set_refuse_streams(false);

    // Terminate subscriptions: connection stays, eventStreamTerminated sent.
    let mut ws = subscribe(&url, KEY, SECRET).await;
    assert_eq!(ctl.terminate_subscriptions(KEY), 1);
    let ev = events_until(&mut ws, |e| e["e"] == "eventStreamTerminated").await;
    assert_eq!(ev.last().unwrap()["subscriptionId"], 0);
    assert_eq!(ctl.subscription_count(), 0);

    // Revoke: the session gets the -2015 error and is closed; REST answers -2015.
    let mut ws = subscribe(&url, KEY, SECRET).await;
    ctl.revoke_key(KEY);
    let msg = ws_next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(msg, fixture("ws_api_error_-2015_session_revoked.json"));
    assert_eq!(ws_next_json(&mut ws, Duration::from_secs(5)).await, None);
    signed(sim.addr(), "GET", "/api/v3/account", &[])
        .await
        .assert_error(
            401,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        );
    ctl.restore_key(KEY);
    assert_eq!(
        signed(sim.addr(), "GET", "/api/v3/account", &[])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn several_accounts_on_one_connection() {
    let cfg = config().with_account(exchange_sim::AccountSpec::new(
        "k2",
        "s2",
        vec![("USDT".into(), d("1000"))],
    ));
    let sim = start_with(cfg).await;
    let mut ws = subscribe(&sim.ws_api_url(), KEY, SECRET).await;
    let r = ws_call(&mut ws, json!({"id": "2", "method": "userDataStream.subscribe.signature", "params": ws_signature_params("k2", "s2")})).await;
    assert_eq!(r["result"]["subscriptionId"], 1);
    signed_as(
        sim.addr(),
        "k2",
        "s2",
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
    let evs = events_until(&mut ws, |e| e["e"] == "executionReport").await;
    assert_eq!(evs.last().unwrap()["subscriptionId"], 1);
}

#[tokio::test]
async fn handshakes_are_counted_throttled_with_retry_after_and_ids_can_start_high() {
    let sim = start().await;
    let ctl = sim.control();
    let url = sim.ws_api_url();
    ctl.throttle_streams(1, 7);
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert_eq!(resp.headers()["retry-after"], "7");
        }
        other => panic!("expected a 429, got {:?}", other.map(|_| ())),
    }
    assert_eq!(ctl.connection_count(), 0);
    // One refusal only; the next subscribes, its id where the test put it.
    ctl.set_first_subscription_id(65_535);
    let mut ws = ws_connect(&url).await;
    let r = ws_call(&mut ws, json!({"id": 1, "method": "userDataStream.subscribe.signature", "params": ws_signature_params(KEY, SECRET)})).await;
    assert_eq!(r["result"]["subscriptionId"], 65_535);
    let r = ws_call(
        &mut ws,
        json!({"id": 2, "method": "userDataStream.unsubscribe"}),
    )
    .await;
    assert_eq!(r["status"], 200);
    let r = ws_call(&mut ws, json!({"id": 3, "method": "userDataStream.subscribe.signature", "params": ws_signature_params(KEY, SECRET)})).await;
    assert_eq!(r["error"]["code"], -2042);
    let attempts = ctl.stream_attempts();
    assert_eq!(attempts.len(), 2, "the refused handshake counts");
    assert!(attempts[0] <= attempts[1]);
    let listed = http(sim.addr(), "GET", "/admin/streams/attempts", &[], "").await;
    assert_eq!(listed.status, 200);
    let listed: Vec<u64> = serde_json::from_str(&listed.body).unwrap();
    assert_eq!(listed, attempts);
    let r = http(
        sim.addr(),
        "POST",
        "/admin/faults/streams/throttle",
        &[],
        r#"{"count":1,"retryAfter":3}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .is_err()
    );
    assert_eq!(ctl.stream_attempts().len(), 3);
}
