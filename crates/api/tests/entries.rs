//! `POST/GET/DELETE /v1/entries` on `MemStore` and the exchange double.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::*;
use oco_core::ports::{Clock, ExchangeError, Store, Users};
use oco_core::{EntryId, EntryStatus};
use rust_decimal_macros::dec;
use serde_json::{Value, json};

fn tps(lists: &[oco_core::testing::FakeList]) -> Vec<String> {
    let mut v: Vec<String> = lists
        .iter()
        .map(|l| l.request.take_profit.to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_market_entry_is_protected_by_both_legs_when_the_request_returns() {
    let w = world().await;
    let (status, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "filled");
    assert_eq!(body["executedQty"], "1");
    assert_eq!(body["clientId"], format!("og-E-{}", body["id"]));
    assert_eq!(body["protection"]["state"], "protected");
    assert_eq!(body["protection"]["by"], "direct");
    let legs = body["legs"].as_array().unwrap();
    assert_eq!(legs.len(), 2, "{body}");
    assert!(
        legs.iter()
            .all(|l| l["state"] == "placed" && l["source"] == "direct")
    );
    // On the exchange, at the moment of the answer: two open lists covering the fill.
    let lists = w.exchange.fake.open_lists();
    assert_eq!(tps(&lists), ["101", "102"]);
    assert!(lists.iter().all(|l| l.request.stop.to_string() == "99"));
    let qty: rust_decimal::Decimal = lists.iter().map(|l| l.request.qty.get()).sum();
    assert_eq!(qty, dec!(1));
    // The levels and tags were stored with the entry.
    let stored = w
        .store
        .entry(EntryId(body["id"].as_i64().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        stored.levels.sl.map(|p| p.to_string()).as_deref(),
        Some("99")
    );
    assert_eq!(stored.tags.signal_id.as_deref(), Some("sig-7"));
    assert_eq!(body["tp"], json!(["101", "102"]));
}

#[tokio::test]
async fn a_crossing_limit_entry_is_protected_at_once() {
    let w = world().await;
    let mut req = w.market();
    req["type"] = json!("LIMIT");
    req["price"] = json!("100.5");
    req["tp"] = json!(["101"]);
    let (status, body) = w.post_entry(ALICE_TOKEN, req).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["type"], "LIMIT");
    assert_eq!(body["price"], "100.5");
    assert_eq!(body["protection"]["state"], "protected");
    let lists = w.exchange.fake.open_lists();
    assert!(!lists.is_empty());
    assert!(
        lists
            .iter()
            .all(|l| l.request.take_profit.to_string() == "101")
    );
}

#[tokio::test]
async fn a_resting_limit_entry_is_stored_with_its_levels_and_no_legs() {
    let w = world().await;
    let mut req = w.market();
    req["type"] = json!("LIMIT");
    req["price"] = json!("95");
    req["tp"] = json!(["98", "99.5"]);
    req["sl"] = json!("93");
    let (status, body) = w.post_entry(ALICE_TOKEN, req).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "new");
    assert_eq!(body["protection"]["state"], "not_needed");
    assert_eq!(body["legs"], json!([]));
    assert!(w.exchange.fake.lists().is_empty());
    let stored = w
        .store
        .entry(EntryId(body["id"].as_i64().unwrap()))
        .await
        .unwrap();
    assert_eq!(stored.status, EntryStatus::New);
    let levels = [stored.levels.tp1, stored.levels.tp2, stored.levels.sl]
        .map(|p| p.map(|p| p.to_string()).unwrap_or_default());
    assert_eq!(levels, ["98", "99.5", "93"]);
}

/// Sends a request; expects a 4xx problem naming `code` (and `field`) with
/// `message` in it, and nothing stored or sent.
async fn refused(
    w: &World,
    token: &str,
    body: Result<Value, &str>,
    status: StatusCode,
    code: &str,
    field: Option<&str>,
    message: &str,
) {
    let (got, problem) = match body {
        Ok(json) => w.post_entry(token, json).await,
        Err(raw) => {
            w.raw(
                Method::POST,
                "/v1/entries",
                Some(token),
                Some(raw),
                Some("application/json"),
            )
            .await
        }
    };
    assert_eq!(got, status, "{problem}");
    assert_eq!(problem["code"], code, "{problem}");
    if let Some(field) = field {
        assert_eq!(problem["field"], field, "{problem}");
    }
    let text = problem["message"].as_str().unwrap();
    assert!(text.contains(message), "'{text}' lacks '{message}'");
    assert_eq!(w.stored(w.alice_account).await, 0, "nothing stored");
    assert_eq!(w.exchange.place_calls(), 0, "nothing sent");
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_message_and_stores_nothing() {
    let w = world().await;
    let m = w.market();
    let bad = StatusCode::BAD_REQUEST;
    type Case<'a> = (
        Result<Value, &'a str>,
        StatusCode,
        &'a str,
        Option<&'a str>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            Ok(with(m.clone(), "symbol", json!("NOPEUSDT"))),
            bad,
            "unknown_symbol",
            None,
            "unknown symbol NOPEUSDT",
        ),
        (
            Ok(with(m.clone(), "sl", json!("101"))),
            bad,
            "invalid_field",
            Some("sl"),
            "sl: 101 is not below the current price 100",
        ),
        (
            Ok(with(m.clone(), "tp", json!(["99"]))),
            bad,
            "invalid_field",
            Some("tp[0]"),
            "tp[0]: 99 is not above the current price 100",
        ),
        (
            Ok(with(m.clone(), "tp", json!(["102", "101"]))),
            bad,
            "invalid_field",
            Some("tp[1]"),
            "101 is below tp[0] 102",
        ),
        (
            Ok(with(m.clone(), "tp", json!([]))),
            bad,
            "invalid_field",
            Some("tp"),
            "1 or 2 targets",
        ),
        (
            Ok(with(m.clone(), "quantity", json!("-1"))),
            bad,
            "invalid_field",
            Some("quantity"),
            "'-1' is not a plain decimal",
        ),
        (
            Ok(with(m.clone(), "quantity", json!("0"))),
            bad,
            "invalid_field",
            Some("quantity"),
            "greater than 0",
        ),
        (
            Ok(with(m.clone(), "quantity", json!("0.000001"))),
            bad,
            "invalid_field",
            Some("quantity"),
            "below the minimum quantity 0.00001",
        ),
        (
            Ok(with(m.clone(), "quantity", json!("0.01"))),
            bad,
            "invalid_field",
            Some("quantity"),
            "notional 1 (0.01 × 100) is below the minimum notional 5",
        ),
        (
            Ok(with(m.clone(), "quantity", json!("0.123456"))),
            bad,
            "invalid_field",
            Some("quantity"),
            "not a multiple of the step size 0.00001",
        ),
        (
            Ok(with(m.clone(), "quantity", json!(1.5))),
            bad,
            "invalid_body",
            Some("quantity"),
            "expected a string",
        ),
        (
            Ok(with(m.clone(), "price", json!("100"))),
            bad,
            "invalid_field",
            Some("price"),
            "only allowed on LIMIT",
        ),
        (
            Ok(with(m.clone(), "type", json!("LIMIT"))),
            bad,
            "invalid_field",
            Some("price"),
            "required on LIMIT",
        ),
        (
            Ok(with(m.clone(), "type", json!("STOP"))),
            bad,
            "invalid_body",
            Some("type"),
            "unknown variant `STOP`",
        ),
        (
            Ok(with(m.clone(), "quoteOrderQty", json!("100"))),
            bad,
            "invalid_field",
            Some("quantity"),
            "not both",
        ),
        (
            Ok(with(
                without(m.clone(), "quantity"),
                "quoteOrderQty",
                json!("3"),
            )),
            bad,
            "invalid_field",
            Some("quoteOrderQty"),
            "below the minimum notional 5",
        ),
        (
            Ok(without(m.clone(), "quantity")),
            bad,
            "invalid_field",
            Some("quantity"),
            "is required",
        ),
        (
            Ok(without(m.clone(), "symbol")),
            bad,
            "invalid_body",
            Some("symbol"),
            "missing field `symbol`",
        ),
        (
            Ok(without(m.clone(), "tp")),
            bad,
            "invalid_body",
            Some("tp"),
            "missing field `tp`",
        ),
        (
            Ok(with(m.clone(), "stopLoss", json!("99"))),
            bad,
            "invalid_body",
            Some("stopLoss"),
            "unknown field `stopLoss`",
        ),
        (
            Ok(with(m.clone(), "signalId", json!("sig\u{0}7"))),
            bad,
            "invalid_field",
            Some("signalId"),
            "control character",
        ),
        (
            Ok(with(m.clone(), "portfolioId", json!("p\u{1b}[31m"))),
            bad,
            "invalid_field",
            Some("portfolioId"),
            "control character",
        ),
        (
            Ok(with(m.clone(), "symbol", json!("BTC/USDT"))),
            bad,
            "invalid_field",
            Some("symbol"),
            "not a symbol name",
        ),
        (
            Err("{\"account\": 1, \"symbol\": "),
            bad,
            "malformed_json",
            None,
            "EOF while parsing",
        ),
        (
            Err("not json"),
            bad,
            "malformed_json",
            None,
            "expected ident",
        ),
        (
            Ok(with(m.clone(), "symbol", json!("HALTUSDT"))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "symbol_not_trading",
            None,
            "HALTUSDT does not accept new orders",
        ),
        (
            Ok(with(m.clone(), "account", json!(w.bob_account))),
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            "account",
        ),
        (
            Ok(with(m.clone(), "account", json!(999))),
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            "account 999 not found",
        ),
    ];
    for (body, status, code, field, message) in cases {
        refused(&w, ALICE_TOKEN, body, status, code, field, message).await;
    }
    refused(
        &w,
        "ogt_wrong",
        Ok(m.clone()),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        None,
        "not recognised",
    )
    .await;
    // No token at all, and a body not declared as JSON.
    let (status, problem) = w
        .raw(
            Method::POST,
            "/v1/entries",
            None,
            Some(&m.to_string()),
            Some("application/json"),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (status, problem) = w
        .raw(
            Method::POST,
            "/v1/entries",
            Some(ALICE_TOKEN),
            Some(&m.to_string()),
            Some("text/plain"),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{problem}");
    assert_eq!(w.stored(w.alice_account).await, 0);
    assert_eq!(w.exchange.place_calls(), 0);
}

#[tokio::test]
async fn an_entry_whose_fill_could_not_be_protected_is_refused_before_sending() {
    let w = world().await;
    // 0.0505 BTC at 100 = 5.05 USDT passes the minimum notional of 5, but
    // net of a 0.1 % fee, 0.05044 at the stop limit 98.5 is 4.97: dust.
    let req = with(w.market(), "quantity", json!("0.0505"));
    let (status, problem) = w.post_entry(ALICE_TOKEN, req).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["code"], "unprotectable");
    assert!(
        problem["message"].as_str().unwrap().contains("dust"),
        "{problem}"
    );
    assert_eq!(w.stored(w.alice_account).await, 0);
    assert_eq!(w.exchange.place_calls(), 0);
}

#[tokio::test]
async fn an_exchange_refusal_carries_binances_code_and_leaves_the_entry_rejected() {
    let w = world().await;
    w.exchange.fake.set_free(ALICE_KEY, "USDT", dec!(10));
    let (status, problem) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["code"], "exchange_rejected");
    assert_eq!(problem["binanceCode"], -2010);
    assert_eq!(
        problem["message"],
        "Account has insufficient balance for requested action."
    );
    let id = problem["entryId"].as_i64().unwrap();
    let entry = w.store.entry(EntryId(id)).await.unwrap();
    assert_eq!(entry.status, EntryStatus::Rejected, "not left pending");
    assert!(w.exchange.fake.lists().is_empty());
}

#[tokio::test]
async fn an_unknown_outcome_is_looked_up_never_resent() {
    let w = world().await;
    // Lost answer after the order went through: the lookup finds the fill and protects it.
    w.exchange.push_fault(PlaceFault::UnknownAfterApply);
    let (status, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["protection"]["state"], "protected");
    assert_eq!(w.exchange.place_calls(), 1);
    assert_eq!(w.exchange.fake.open_lists().len(), 2);

    // Lost answer and nothing found: 202, pending_new, flagged for reconciliation.
    w.exchange.push_fault(PlaceFault::UnknownBeforeApply);
    let (status, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "pending_new");
    assert!(
        body["note"].as_str().unwrap().contains("do not resend"),
        "{body}"
    );
    assert_eq!(w.exchange.place_calls(), 2, "placed once per request");
    let flagged = w.store.take_flagged(10).await.unwrap();
    assert_eq!(flagged, vec![oco_core::AccountId(w.alice_account)]);
}

#[tokio::test]
async fn a_rate_limit_is_429_with_retry_after_and_the_entry_is_not_left_pending() {
    let w = world().await;
    w.exchange
        .push_fault(PlaceFault::Fail(ExchangeError::RateLimited {
            retry_after: Duration::from_millis(1500),
        }));
    let (status, problem) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    assert_eq!(problem["code"], "rate_limited");
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("retry after 2 s")
    );
    let id = problem["entryId"].as_i64().unwrap();
    let entry = w.store.entry(EntryId(id)).await.unwrap();
    assert_eq!(entry.status, EntryStatus::Rejected);
}

#[tokio::test]
async fn get_shows_legs_and_events_and_list_filters_by_status() {
    let w = world().await;
    let (_, filled) = w.post_entry(ALICE_TOKEN, w.market()).await;
    let mut resting = w.market();
    resting["type"] = json!("LIMIT");
    resting["price"] = json!("95");
    resting["tp"] = json!(["98"]);
    resting["sl"] = json!("93");
    let (_, rest) = w.post_entry(ALICE_TOKEN, resting).await;

    let path = format!("/v1/entries/{}", filled["id"]);
    let (status, body) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["legs"].as_array().unwrap().len(), 2);
    let kinds: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"leg_placed"), "{kinds:?}");

    let (status, list) = w
        .call(Method::GET, "/v1/entries", Some(ALICE_TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&Value> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(ids, [&rest["id"], &filled["id"]], "newest first");

    let path = format!("/v1/entries?account={}&status=new", w.alice_account);
    let (_, list) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    let ids: Vec<&Value> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(ids, [&rest["id"]]);

    let (status, problem) = w
        .call(
            Method::GET,
            "/v1/entries?status=open",
            Some(ALICE_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["field"], "status");
    let (status, problem) = w
        .call(Method::GET, "/v1/entries/abc", Some(ALICE_TOKEN), None)
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("id"))
    );
}

/// The view keeps commissions paid outside the quote apart from the
/// result, by asset, and shows each leg's.
#[tokio::test]
async fn the_entry_view_shows_commissions_outside_the_quote_apart() {
    use oco_core::model::{Fill, Millis, SaleSide};
    use oco_core::{Asset, Price, Qty};

    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    let id = EntryId(body["id"].as_i64().unwrap());
    let trade = |trade_id: i64, fee: rust_decimal::Decimal, asset: &str| Fill {
        trade_id,
        price: Price::new(dec!(101)).unwrap(),
        qty: Qty::new(dec!(0.5)).unwrap(),
        commission: fee,
        commission_asset: Asset(asset.into()),
        time: Millis(1),
    };
    let legs = w.store.legs(id).await.unwrap();
    w.store
        .record_leg_trades(
            legs[0].key,
            SaleSide::TakeProfit,
            &[trade(901, dec!(0.0001), "BNB")],
        )
        .await
        .unwrap();
    w.store
        .record_leg_trades(
            legs[1].key,
            SaleSide::StopLoss,
            &[trade(902, dec!(0.0495), "USDT")],
        )
        .await
        .unwrap();

    let path = format!("/v1/entries/{}", id.0);
    let (status, body) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["otherFees"], json!({"BNB": "0.0001"}), "{body}");
    let fees: Vec<&Value> = body["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["fees"])
        .collect();
    assert_eq!(
        fees,
        [&json!({"BNB": "0.0001"}), &json!({"USDT": "0.0495"})]
    );
}

/// `feesComplete` stands next to the result: absent with it, `false` when
/// the result leaves out commissions of sales learnt by lookup, `true` when
/// a recount counted them.
#[tokio::test]
async fn the_entry_view_says_whether_the_result_counts_every_commission() {
    use oco_core::model::{Millis, Realized};

    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    let id = EntryId(body["id"].as_i64().unwrap());
    let path = format!("/v1/entries/{}", id.0);
    let (_, body) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    assert!(body.get("feesComplete").is_none(), "no result yet: {body}");

    let partial = Realized {
        quote: dec!(1.5),
        fees_complete: false,
    };
    w.store.close_entry(id, partial, Millis(5)).await.unwrap();
    let (status, body) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["realizedQuote"], json!("1.5"), "{body}");
    assert_eq!(body["feesComplete"], json!(false), "{body}");

    w.store
        .close_entry(id, Realized::complete(dec!(1.399)), Millis(6))
        .await
        .unwrap();
    let (_, body) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(body["realizedQuote"], json!("1.399"), "{body}");
    assert_eq!(body["feesComplete"], json!(true), "{body}");
}

fn resting_limit(w: &World) -> Value {
    let mut req = w.market();
    req["type"] = json!("LIMIT");
    req["price"] = json!("95");
    req["tp"] = json!(["98", "99"]);
    req["sl"] = json!("93");
    req
}

#[tokio::test]
async fn delete_cancels_an_unfilled_entry() {
    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, resting_limit(&w)).await;
    let path = format!("/v1/entries/{}", body["id"]);
    let (status, body) = w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "canceled");
    assert_eq!(body["legs"], json!([]));
    // Canceling again: nothing left.
    let (status, problem) = w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["code"], "not_cancelable");
}

/// The cancel is out once it is sent: a store read failing after it
/// answers from what the exchange said, never with a 503 a client would
/// take for a cancel not made.
#[tokio::test]
async fn a_store_read_failing_after_a_cancel_answers_from_memory_never_503() {
    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, resting_limit(&w)).await;
    let path = format!("/v1/entries/{}", body["id"]);
    w.hooks
        .fail_entry_reads_after_evidence
        .store(true, Ordering::SeqCst);
    let (status, body) = w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "canceled");
    let note = body["note"].as_str().unwrap_or_default();
    assert!(note.contains("stored view could not be read"), "{body}");
}

#[tokio::test]
async fn delete_of_a_partly_filled_entry_protects_the_filled_part() {
    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, resting_limit(&w)).await;
    let client_id = body["clientId"].as_str().unwrap();
    // The market came down to the limit and filled part of it.
    w.exchange
        .fake
        .set_price("BTCUSDT", oco_core::Price::new(dec!(95)).unwrap());
    w.exchange
        .fill_resting(ALICE_KEY, client_id, dec!(0.4), dec!(95));
    let path = format!("/v1/entries/{}", body["id"]);
    let (status, body) = w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "canceled");
    assert_eq!(body["executedQty"], "0.4");
    assert_eq!(body["protection"]["state"], "protected");
    let qty: rust_decimal::Decimal = w
        .exchange
        .fake
        .open_lists()
        .iter()
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(qty, dec!(0.4), "the filled part is covered");
}

/// The client hangs up while the cancel's follow-up read is out: the
/// order's final state is recorded and what filled before the cancel is
/// protected all the same.
#[tokio::test]
async fn a_client_that_hangs_up_does_not_drop_a_cancel_halfway() {
    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, resting_limit(&w)).await;
    let client_id = body["clientId"].as_str().unwrap();
    let id = oco_core::EntryId(body["id"].as_i64().unwrap());
    w.exchange
        .fake
        .set_price("BTCUSDT", oco_core::Price::new(dec!(95)).unwrap());
    w.exchange
        .fill_resting(ALICE_KEY, client_id, dec!(0.4), dec!(95));
    w.exchange.slow_next_query(Duration::from_millis(300));
    let path = format!("/v1/entries/{id}");
    let gone = tokio::time::timeout(
        Duration::from_millis(50),
        w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None),
    )
    .await;
    assert!(gone.is_err(), "the client hung up before the answer");
    let settled = wait_until(Duration::from_secs(3), || async {
        matches!(
            w.store.entry(id).await.map(|e| e.protection),
            Ok(oco_core::model::Protection::Protected { .. })
        )
    })
    .await;
    let entry = w.store.entry(id).await.unwrap();
    assert!(settled, "the filled part was never protected: {entry:?}");
    assert_eq!(entry.status, EntryStatus::Canceled);
    let qty: rust_decimal::Decimal = w
        .exchange
        .fake
        .open_lists()
        .iter()
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(qty, dec!(0.4), "the filled part is covered");
}

#[tokio::test]
async fn delete_of_a_partly_filled_entry_nets_a_base_asset_fee_out_of_the_legs() {
    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, resting_limit(&w)).await;
    let client_id = body["clientId"].as_str().unwrap();
    // Coins held from before: the balance does not cap the legs at the net fill.
    w.exchange.fake.set_free(ALICE_KEY, "BTC", dec!(1));
    w.exchange
        .fake
        .set_price("BTCUSDT", oco_core::Price::new(dec!(95)).unwrap());
    // The lookup of the order carries no trades; only its trades show the fee.
    w.exchange
        .fill_resting_paying(ALICE_KEY, client_id, dec!(0.4), dec!(95), dec!(0.0004));
    let path = format!("/v1/entries/{}", body["id"]);
    let (status, body) = w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["executedQty"], "0.4");
    assert_eq!(body["baseCommission"], "0.0004", "{body}");
    assert_eq!(body["protection"]["state"], "protected");
    let qty: rust_decimal::Decimal = w
        .exchange
        .fake
        .open_lists()
        .iter()
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(
        qty,
        dec!(0.3996),
        "the fill net of its fee is covered, no more"
    );
}

#[tokio::test]
async fn a_client_that_hangs_up_does_not_cancel_the_placement() {
    let w = world().await;
    // The order is on the exchange (filled) well before its answer arrives.
    w.exchange
        .push_fault(PlaceFault::SlowAnswer(Duration::from_millis(300)));
    let gone = tokio::time::timeout(
        Duration::from_millis(50),
        w.post_entry(ALICE_TOKEN, w.market()),
    )
    .await;
    assert!(gone.is_err(), "the client hung up before the answer");
    let entries = w
        .store
        .entries_of(oco_core::AccountId(w.alice_account), None, 10)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let id = entries[0].id;
    let settled = wait_until(Duration::from_secs(3), || async {
        matches!(
            w.store.entry(id).await.map(|e| e.protection),
            Ok(oco_core::model::Protection::Protected { .. })
        )
    })
    .await;
    let entry = w.store.entry(id).await.unwrap();
    assert!(settled, "never protected: {entry:?}");
    // Exactly as if the client had waited.
    assert_eq!(entry.status, EntryStatus::Filled);
    assert_eq!(
        entry.protection,
        oco_core::model::Protection::Protected {
            at: TestClock.now(),
            by: oco_core::Source::Direct,
        }
    );
    assert_eq!(w.exchange.place_calls(), 1);
    let lists = w.exchange.fake.open_lists();
    assert_eq!(tps(&lists), ["101", "102"]);
    let qty: rust_decimal::Decimal = lists.iter().map(|l| l.request.qty.get()).sum();
    assert_eq!(qty, dec!(1));
}

#[tokio::test]
async fn a_store_read_failing_after_the_send_answers_from_memory_never_503() {
    let w = world().await;
    w.hooks
        .fail_entry_reads_after_create
        .store(true, Ordering::SeqCst);
    // Filled and protected: 201 from what is in memory.
    let (status, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "filled");
    assert_eq!(body["executedQty"], "1");
    assert_eq!(body["protection"]["state"], "protected");
    let note = body["note"].as_str().unwrap();
    assert!(note.contains("stored view could not be read"), "{note}");
    assert!(note.contains("do not resend"), "{note}");
    assert_eq!(w.exchange.fake.open_lists().len(), 2, "protection placed");

    // Outcome unknown: 202 pending_new from memory, never a retryable 503.
    w.exchange.push_fault(PlaceFault::UnknownBeforeApply);
    let (status, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "pending_new");
    let note = body["note"].as_str().unwrap();
    assert!(note.contains("outcome unknown"), "{note}");
    assert!(note.contains("stored view could not be read"), "{note}");
    assert_eq!(w.exchange.place_calls(), 2, "placed once per request");
}

/// The fill's claim is held by another layer (the gateway, on the stream)
/// that dies before sending: the entry's reply says nothing is wrong yet,
/// and once the claim timeout has passed unsettled the account is flagged,
/// so sync protects the fill now rather than at its next periodic pass.
#[tokio::test]
async fn a_claim_another_layer_never_completes_flags_the_account() {
    let w = world_with(|config| oco_core::ProtectorConfig {
        claim_timeout: Duration::from_millis(200),
        ..config
    })
    .await;
    w.hooks.steal_next_claims.store(true, Ordering::SeqCst);
    let (status, body) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        w.exchange.fake.open_lists().is_empty(),
        "the other layer sent nothing"
    );
    assert!(
        w.store.take_flagged(10).await.unwrap().is_empty(),
        "not flagged before the other layer's claim had its time"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let flagged = loop {
        let flagged = w.store.take_flagged(10).await.unwrap();
        if !flagged.is_empty() || std::time::Instant::now() > deadline {
            break flagged;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        flagged,
        vec![oco_core::AccountId(w.alice_account)],
        "a claim left unsettled past its timeout flags the account"
    );
}

#[tokio::test]
async fn an_entry_racing_a_disable_is_refused_before_it_is_sent() {
    let w = world().await;
    // The account is disabled between the handler's check and the store:
    // the store refuses the entry, and the API answers as for any entry on a
    // disabled account.
    w.hooks.disable_on_create.store(true, Ordering::SeqCst);
    let (status, problem) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["code"], "account_inactive");
    let message = problem["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("account {}", w.alice_account)) && message.contains("disabled"),
        "{message}"
    );
    assert_eq!(w.exchange.place_calls(), 0, "nothing sent");
    assert_eq!(w.stored(w.alice_account).await, 0, "nothing stored");
}

#[tokio::test]
async fn one_user_can_neither_read_nor_cancel_anothers_entries() {
    let w = world().await;
    let (_, body) = w.post_entry(ALICE_TOKEN, resting_limit(&w)).await;
    let path = format!("/v1/entries/{}", body["id"]);
    let (status, problem) = w.call(Method::GET, &path, Some(BOB_TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    assert_eq!(problem["code"], "not_found");
    let (status, _) = w.call(Method::DELETE, &path, Some(BOB_TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, still) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(still["status"], "new", "bob's cancel did nothing");

    let (_, list) = w
        .call(Method::GET, "/v1/entries", Some(BOB_TOKEN), None)
        .await;
    assert_eq!(list["entries"], json!([]));
    let path = format!("/v1/entries?account={}", w.alice_account);
    let (status, _) = w.call(Method::GET, &path, Some(BOB_TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut on_alice = w.market();
    on_alice["account"] = json!(w.alice_account);
    let (status, _) = w.post_entry(BOB_TOKEN, on_alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(w.stored(w.alice_account).await, 1, "only alice's own entry");
}

#[tokio::test]
async fn an_entry_on_a_disabled_account_is_refused() {
    let w = world().await;
    let path = format!("/v1/accounts/{}", w.alice_account);
    let (status, _) = w
        .call(
            Method::PATCH,
            &path,
            Some(ALICE_TOKEN),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, problem) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["code"], "account_inactive");
    assert_eq!(w.stored(w.alice_account).await, 0);
}

/// A retry with the same `Idempotency-Key` and body: nothing is sent again;
/// the answer is the first request's entry as it stands now, even once the
/// market has moved past its levels, and whatever its tags say.
#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_places_one_order() {
    let w = world().await;
    let (status, _, first) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"order 17/a"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["protection"]["state"], "protected");

    let (status, headers, again) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"order 17/a"])
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first["id"], "the same entry");
    assert_eq!(again["clientId"], first["clientId"]);
    assert_eq!(again["status"], "filled");
    assert_eq!(
        again["legs"], first["legs"],
        "its current view, legs and all"
    );
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(
        headers["location"],
        format!("/v1/entries/{}", first["id"]).as_str()
    );
    let note = again["note"].as_str().unwrap();
    assert!(
        note.contains("earlier request") && note.contains("sent nothing"),
        "{note}"
    );

    // The price went through the first target since: the retry is still its
    // entry, not a refusal of levels no longer valid.
    w.exchange
        .fake
        .set_price("BTCUSDT", oco_core::Price::new(dec!(101.5)).unwrap());
    let retag = with(w.market(), "signalId", json!("sig-8"));
    let (status, _, late) = w
        .post_entry_keyed(ALICE_TOKEN, retag, &[b"order 17/a"])
        .await;
    assert_eq!(status, StatusCode::OK, "{late}");
    assert_eq!(late["id"], first["id"]);

    assert_eq!(w.exchange.place_calls(), 1, "one order");
    assert_eq!(w.stored(w.alice_account).await, 1, "one entry");
    assert_eq!(w.exchange.fake.open_lists().len(), 2, "one protection");
}

/// A placement refused before it reached the exchange (a 503 or 429 saying
/// nothing was sent) leaves the key free: the resend its answer asks for
/// places the order, and is not answered with the refused entry.
#[tokio::test]
async fn a_resend_after_a_refusal_that_sent_nothing_places_the_order() {
    let w = world().await;
    let faults = [
        (
            ExchangeError::Transient("connection refused".into()),
            StatusCode::SERVICE_UNAVAILABLE,
            "after 503",
        ),
        (
            ExchangeError::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            StatusCode::TOO_MANY_REQUESTS,
            "after 429",
        ),
    ];
    for (n, (fault, refused_with, key)) in faults.into_iter().enumerate() {
        w.exchange.push_fault(PlaceFault::Fail(fault));
        let (status, _, problem) = w
            .post_entry_keyed(ALICE_TOKEN, w.market(), &[key.as_bytes()])
            .await;
        assert_eq!(status, refused_with, "{problem}");
        let refused = problem["entryId"].as_i64().unwrap();
        let entry = w.store.entry(EntryId(refused)).await.unwrap();
        assert_eq!(entry.status, EntryStatus::Rejected, "not left pending");

        let (status, headers, placed) = w
            .post_entry_keyed(ALICE_TOKEN, w.market(), &[key.as_bytes()])
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}: {placed}");
        assert!(headers.get("idempotent-replayed").is_none(), "{headers:?}");
        assert_ne!(placed["id"], refused, "a new entry");
        assert_eq!(placed["protection"]["state"], "protected", "{placed}");
        assert_eq!(w.exchange.fake.order_calls(), n + 1, "one order placed");

        // The key is now the placed entry's: one more resend is answered
        // with it and sends nothing.
        let (status, _, again) = w
            .post_entry_keyed(ALICE_TOKEN, w.market(), &[key.as_bytes()])
            .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["id"], placed["id"]);
        assert_eq!(w.exchange.fake.order_calls(), n + 1, "nothing sent again");
    }
}

/// The exchange's own refusal keeps the key: the same request would be
/// refused the same way, and its resend is answered with the refused entry.
#[tokio::test]
async fn a_resend_after_the_exchange_refused_is_answered_with_the_refusal() {
    let w = world().await;
    w.exchange.fake.set_free(ALICE_KEY, "USDT", dec!(10));
    let (status, _, problem) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"refused"])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["binanceCode"], -2010);
    let (status, headers, again) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"refused"])
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again["id"], problem["entryId"]);
    assert_eq!(again["status"], "rejected");
    assert_eq!(w.exchange.place_calls(), 1, "nothing sent again");
}

/// A key reused for another order is refused, naming each difference; it
/// never answers with an entry the request did not ask for.
#[tokio::test]
async fn a_key_reused_for_another_entry_is_refused_with_409() {
    let w = world().await;
    let (status, _, first) = w
        .post_entry_keyed(ALICE_TOKEN, resting_limit(&w), &[b"k1"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let id = first["id"].as_i64().unwrap();

    let cases: [(Value, &[&str]); 5] = [
        (
            with(resting_limit(&w), "quantity", json!("2")),
            &["size is quantity 2", "is quantity 1"],
        ),
        (
            with(resting_limit(&w), "price", json!("96")),
            &["price is 96, entry", "is 95"],
        ),
        (
            w.market(),
            &["type is MARKET", "is LIMIT", "tp is [101, 102]"],
        ),
        (
            with(resting_limit(&w), "tp", json!(["98"])),
            &["tp is [98], entry", "is [98, 99]"],
        ),
        (
            without(resting_limit(&w), "sl"),
            &["sl is absent, entry", "is 93"],
        ),
    ];
    for (body, parts) in cases {
        let (status, _, problem) = w.post_entry_keyed(ALICE_TOKEN, body, &[b"k1"]).await;
        assert_eq!(status, StatusCode::CONFLICT, "{problem}");
        assert_eq!(problem["code"], "idempotency_key_reused", "{problem}");
        assert_eq!(problem["entryId"], id, "{problem}");
        let message = problem["message"].as_str().unwrap();
        for part in parts
            .iter()
            .chain(&["Idempotency-Key 'k1'", "nothing was stored or sent"])
        {
            assert!(message.contains(part), "'{message}' lacks '{part}'");
        }
    }
    assert_eq!(w.exchange.place_calls(), 1, "nothing sent again");
    assert_eq!(w.stored(w.alice_account).await, 1, "nothing stored again");

    // Keys are the account's own: another account may use the same one.
    let mut bobs = resting_limit(&w);
    bobs["account"] = json!(w.bob_account);
    let (status, _, other) = w.post_entry_keyed(BOB_TOKEN, bobs, &[b"k1"]).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    assert_ne!(other["id"], first["id"]);
}

#[tokio::test]
async fn without_a_key_every_request_is_a_new_entry() {
    let w = world().await;
    let (s1, first) = w.post_entry(ALICE_TOKEN, w.market()).await;
    let (s2, second) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_ne!(first["id"], second["id"]);
    assert_eq!(w.exchange.place_calls(), 2);
    assert_eq!(w.stored(w.alice_account).await, 2);
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_refused_naming_the_header() {
    let w = world().await;
    let long = "k".repeat(65);
    let cases: [&[&[u8]]; 6] = [
        &[b""],
        &[b" leading"],
        &[b"trailing "],
        &[long.as_bytes()],
        &["caf\u{e9}".as_bytes()],
        &[b"once", b"twice"],
    ];
    for keys in cases {
        let (status, _, problem) = w.post_entry_keyed(ALICE_TOKEN, w.market(), keys).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{keys:?}: {problem}");
        assert_eq!(problem["code"], "invalid_field", "{problem}");
        assert_eq!(problem["field"], "Idempotency-Key", "{problem}");
        let message = problem["message"].as_str().unwrap();
        assert!(message.starts_with("Idempotency-Key: "), "{message}");
    }
    let (_, _, problem) = w.post_entry_keyed(ALICE_TOKEN, w.market(), &[b""]).await;
    assert_eq!(
        problem["message"],
        "Idempotency-Key: must be 1 to 64 printable ASCII characters, not starting or ending with a space"
    );
    assert_eq!(w.stored(w.alice_account).await, 0, "nothing stored");
    assert_eq!(w.exchange.place_calls(), 0, "nothing sent");
    let (status, _, body) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &["k".repeat(64).as_bytes()])
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "64 characters are a key: {body}"
    );
}

/// The first try of a request is stored between its retry's look-up of the
/// key and the retry's own store: the store refuses the retry's entry, and
/// the retry answers with the first one, sending nothing.
#[tokio::test]
async fn a_retry_racing_its_first_try_sends_nothing() {
    let w = world().await;
    w.hooks.twin_on_create.store(true, Ordering::SeqCst);
    let (status, _, body) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"racing"])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["status"], "pending_new",
        "the first try's, not sent here"
    );
    assert_eq!(w.exchange.place_calls(), 0, "the retry sent nothing");
    assert_eq!(w.stored(w.alice_account).await, 1);
}

/// The placement task dies once the entry is stored: its order may be out,
/// so the answer is a 202 with the entry (not a 500 a client would retry),
/// and a retry with the key gets that entry and sends nothing.
#[tokio::test]
async fn a_placement_that_dies_after_the_store_answers_202_with_the_entry() {
    let w = world().await;
    w.exchange.push_fault(PlaceFault::Panic);
    let (status, headers, body) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"dies"])
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let stored = w
        .store
        .entries_of(oco_core::AccountId(w.alice_account), None, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(body["id"], stored[0].id.0);
    assert_eq!(body["clientId"], stored[0].client_id.as_str());
    assert_eq!(body["status"], "pending_new");
    assert_eq!(
        headers["location"],
        format!("/v1/entries/{}", stored[0].id).as_str()
    );
    let note = body["note"].as_str().unwrap();
    assert!(
        note.contains("ended without an answer") && note.contains("Do not resend"),
        "{note}"
    );
    let flagged = w.store.take_flagged(10).await.unwrap();
    assert_eq!(flagged, vec![oco_core::AccountId(w.alice_account)]);

    let (status, _, again) = w
        .post_entry_keyed(ALICE_TOKEN, w.market(), &[b"dies"])
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], body["id"]);
    assert_eq!(w.exchange.place_calls(), 1, "sent at most once");
}
