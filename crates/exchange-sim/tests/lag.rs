//! The lookup lag: orders and lists placed moments ago are missing from the
//! lookups Binance serves from its database, and only from those.

mod common;

use std::time::{Duration, Instant};

use common::*;
use exchange_sim::AccountSpec;

const LAG: Duration = Duration::from_millis(400);

fn oco(list: &str) -> Vec<(&str, &str)> {
    vec![
        ("symbol", "BTCUSDT"),
        ("side", "SELL"),
        ("quantity", "0.1"),
        ("listClientOrderId", list),
        ("aboveType", "LIMIT_MAKER"),
        ("abovePrice", "62000"),
        ("belowType", "STOP_LOSS_LIMIT"),
        ("belowStopPrice", "58000"),
        ("belowPrice", "57900"),
        ("belowTimeInForce", "GTC"),
    ]
}

fn resting_buy(cid: &str) -> Vec<(&str, &str)> {
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

fn by_cid(cid: &str) -> [(&str, &str); 2] {
    [("symbol", "BTCUSDT"), ("origClientOrderId", cid)]
}

/// Asks `GET path` with `params` until it answers 200, within 5 s.
async fn until_found(sim: &exchange_sim::Sim, path: &str, params: &[(&str, &str)]) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = signed(sim.addr(), "GET", path, params).await;
        if r.status == 200 || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn json_len(r: &Resp) -> usize {
    r.json().as_array().map_or(usize::MAX, Vec::len)
}

#[tokio::test]
async fn a_fresh_list_and_order_are_missing_from_database_lookups_until_the_lag_passes() {
    let sim = start().await;
    let ctl = sim.control();
    let a = sim.addr();
    ctl.set_lookup_lag(LAG, None);
    let placed_at = Instant::now();
    let list = signed(a, "POST", "/api/v3/orderList/oco", &oco("lag-L")).await;
    assert_eq!(list.status, 200, "placement is unaffected: {}", list.body);
    let list_id = list.json()["orderListId"].to_string();
    let order = signed(a, "POST", "/api/v3/order", &resting_buy("lag-o")).await;
    assert_eq!(order.status, 200, "{}", order.body);
    let order_id = order.json()["orderId"].to_string();

    let missing_list = |r: Resp| r.assert_error(400, -2018, "Order list does not exist.");
    let missing_order = |r: Resp| r.assert_error(400, -2013, "Order does not exist.");
    missing_list(
        signed(
            a,
            "GET",
            "/api/v3/orderList",
            &[("origClientOrderId", "lag-L")],
        )
        .await,
    );
    missing_list(signed(a, "GET", "/api/v3/orderList", &[("orderListId", &list_id)]).await);
    missing_order(signed(a, "GET", "/api/v3/order", &by_cid("lag-o")).await);
    missing_order(
        signed(
            a,
            "GET",
            "/api/v3/order",
            &[("symbol", "BTCUSDT"), ("orderId", &order_id)],
        )
        .await,
    );
    // Not in the database at all: not "the client id does not match" (-2039).
    missing_order(
        signed(
            a,
            "GET",
            "/api/v3/order",
            &[
                ("symbol", "BTCUSDT"),
                ("orderId", &order_id),
                ("origClientOrderId", "other"),
            ],
        )
        .await,
    );
    let history = signed(a, "GET", "/api/v3/allOrderList", &[]).await;
    assert_eq!(json_len(&history), 0, "{}", history.body);
    let history = signed(a, "GET", "/api/v3/allOrders", &[("symbol", "BTCUSDT")]).await;
    assert_eq!(json_len(&history), 0, "{}", history.body);

    // Read from memory first: the open orders and lists show at once.
    let open = signed(a, "GET", "/api/v3/openOrderList", &[]).await;
    assert_eq!(json_len(&open), 1, "{}", open.body);
    let open = signed(a, "GET", "/api/v3/openOrders", &[("symbol", "BTCUSDT")]).await;
    assert_eq!(json_len(&open), 3, "{}", open.body);
    assert_eq!(ctl.order_lists(Some(KEY)).len(), 1, "the control sees it");
    // A cancel finds the order it cannot look up yet.
    let canceled = signed(a, "DELETE", "/api/v3/order", &by_cid("lag-o")).await;
    assert_eq!(canceled.status, 200, "{}", canceled.body);

    let found = until_found(&sim, "/api/v3/orderList", &[("origClientOrderId", "lag-L")]).await;
    assert_eq!(found.status, 200, "{}", found.body);
    assert!(
        placed_at.elapsed() >= LAG,
        "found after {:?}, before the lag",
        placed_at.elapsed()
    );
    assert_eq!(found.json()["listClientOrderId"], "lag-L");
    let order = until_found(&sim, "/api/v3/order", &by_cid("lag-o")).await;
    assert_eq!(order.json()["status"], "CANCELED", "{}", order.body);
    let history = signed(a, "GET", "/api/v3/allOrderList", &[]).await;
    assert_eq!(json_len(&history), 1, "{}", history.body);
    let history = signed(a, "GET", "/api/v3/allOrders", &[("symbol", "BTCUSDT")]).await;
    assert_eq!(json_len(&history), 3, "{}", history.body);
}

#[tokio::test]
async fn a_reused_client_id_finds_the_older_stored_order_while_the_new_one_lags() {
    let sim = start().await;
    let ctl = sim.control();
    let a = sim.addr();
    ctl.set_lookup_lag(LAG, None);
    let first = signed(a, "POST", "/api/v3/order", &resting_buy("re-1")).await;
    let first_id = first.json()["orderId"].clone();
    assert_eq!(
        signed(a, "DELETE", "/api/v3/order", &by_cid("re-1"))
            .await
            .status,
        200
    );
    let old = until_found(&sim, "/api/v3/order", &by_cid("re-1")).await;
    assert_eq!(old.json()["orderId"], first_id, "{}", old.body);

    let second = signed(a, "POST", "/api/v3/order", &resting_buy("re-1")).await;
    assert_eq!(
        second.status, 200,
        "a final order's id is free: {}",
        second.body
    );
    let second_id = second.json()["orderId"].clone();
    let r = signed(a, "GET", "/api/v3/order", &by_cid("re-1")).await;
    assert_eq!(r.json()["orderId"], first_id, "the stored one: {}", r.body);
    assert_eq!(r.json()["status"], "CANCELED");
    signed(
        a,
        "GET",
        "/api/v3/order",
        &[("symbol", "BTCUSDT"), ("orderId", &second_id.to_string())],
    )
    .await
    .assert_error(400, -2013, "Order does not exist.");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = signed(a, "GET", "/api/v3/order", &by_cid("re-1")).await;
    while now.json()["orderId"] != second_id && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = signed(a, "GET", "/api/v3/order", &by_cid("re-1")).await;
    }
    assert_eq!(now.json()["orderId"], second_id, "{}", now.body);
    assert_eq!(now.json()["status"], "NEW");
}

async fn lag_for(sim: &exchange_sim::Sim, body: &str) {
    let r = http(sim.addr(), "POST", "/admin/faults/lookup-lag", &[], body).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Places a resting order as `key` (secret `{key}-secret`, or the default
/// account's) and answers the status of its lookup by client id at once.
async fn place_and_look_up(sim: &exchange_sim::Sim, key: &str, cid: &str) -> u16 {
    let secret = if key == KEY {
        SECRET.to_owned()
    } else {
        format!("{key}-secret")
    };
    let a = sim.addr();
    let placed = signed_as(a, key, &secret, "POST", "/api/v3/order", &resting_buy(cid)).await;
    assert_eq!(placed.status, 200, "{}", placed.body);
    signed_as(a, key, &secret, "GET", "/api/v3/order", &by_cid(cid))
        .await
        .status
}

#[tokio::test]
async fn the_lag_is_per_account_when_asked_fixed_at_placement_and_set_over_the_admin_api() {
    let sim = start().await;
    let ctl = sim.control();
    ctl.add_account(AccountSpec::new(
        "other",
        "other-secret",
        vec![("USDT".into(), d("100000"))],
    ));
    lag_for(&sim, &format!(r#"{{"ms":60000,"apiKey":"{KEY}"}}"#)).await;
    assert_eq!(place_and_look_up(&sim, KEY, "mine-1").await, 400);
    assert_eq!(
        place_and_look_up(&sim, "other", "theirs-1").await,
        200,
        "another account's lookups are current"
    );

    // The shared lag holds for accounts without their own, even a zero one.
    ctl.set_lookup_lag(Duration::from_secs(60), None);
    lag_for(&sim, &format!(r#"{{"ms":0,"apiKey":"{KEY}"}}"#)).await;
    assert_eq!(place_and_look_up(&sim, KEY, "mine-2").await, 200);
    assert_eq!(place_and_look_up(&sim, "other", "theirs-2").await, 400);

    let clear = http(sim.addr(), "POST", "/admin/faults/clear", &[], "").await;
    assert_eq!(clear.status, 200);
    assert_eq!(place_and_look_up(&sim, KEY, "mine-3").await, 200);
    assert_eq!(place_and_look_up(&sim, "other", "theirs-3").await, 200);
    // A placement keeps the lag it was made under.
    signed(sim.addr(), "GET", "/api/v3/order", &by_cid("mine-1"))
        .await
        .assert_error(400, -2013, "Order does not exist.");
}
