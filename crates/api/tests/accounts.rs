//! `/v1/accounts`, auth, secrets and the OpenAPI document.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use axum::http::{Method, StatusCode};
use common::*;
use oco_core::model::Protection;
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

/// `PATCH /v1/accounts/{alice}` with `body`.
async fn patch_alice(w: &World, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    let path = format!("/v1/accounts/{}", w.alice_account);
    w.call(Method::PATCH, &path, Some(ALICE_TOKEN), Some(body))
        .await
}

#[tokio::test]
async fn an_account_with_open_entries_cannot_be_disabled() {
    let w = world().await;
    let mut resting = w.market();
    resting["type"] = json!("LIMIT");
    resting["price"] = json!("95");
    resting["tp"] = json!(["98"]);
    resting["sl"] = json!("93");
    let (_, rest) = w.post_entry(ALICE_TOKEN, resting).await;
    let (_, filled) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(filled["protection"]["state"], "protected", "{filled}");
    let (rest_id, filled_id) = (rest["id"].as_i64().unwrap(), filled["id"].as_i64().unwrap());

    let (status, problem) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "account_has_open_entries");
    assert_eq!(problem["openEntries"], 2);
    assert_eq!(problem["entryIds"], json!([rest_id, filled_id]));
    let message = problem["message"].as_str().unwrap();
    for part in ["2 open entries", "DELETE /v1/entries/{id}", "wait until"] {
        assert!(message.contains(part), "'{message}' lacks '{part}'");
    }
    let account = AccountId(w.alice_account);
    assert!(
        w.store.account(account).await.unwrap().active,
        "still enabled"
    );

    // Settings still change, and re-enabling an enabled account is no change.
    let (status, body) =
        patch_alice(&w, json!({"protection": {"slPct": "2"}, "active": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Canceled, the resting entry no longer counts; the filled one still does.
    let path = format!("/v1/entries/{rest_id}");
    let (status, body) = w.call(Method::DELETE, &path, Some(ALICE_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, problem) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["entryIds"], json!([filled_id]));
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("1 open entry"),
        "{problem}"
    );

    // Once its protection has closed it (a take-profit or stop filled), the
    // account can be disabled, and enabled again.
    w.store
        .set_protection(oco_core::EntryId(filled_id), &Protection::Closed)
        .await
        .unwrap();
    let (status, body) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], false);
    let (status, body) = patch_alice(&w, json!({"active": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], true);
}

#[tokio::test]
async fn an_entry_stored_while_the_account_is_being_disabled_keeps_it_enabled() {
    let w = world().await;
    // An entry lands between the disable's check and its write.
    w.hooks.entry_on_disable.store(true, Ordering::SeqCst);
    let (status, problem) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "account_has_open_entries");
    assert_eq!(problem["openEntries"], 1);
    let account = w.store.account(AccountId(w.alice_account)).await.unwrap();
    assert!(account.active, "enabled again: its entry is followed");
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
    let patch = &paths["/v1/accounts/{id}"]["patch"];
    let rule = patch["description"].as_str().unwrap_or_default();
    assert!(
        rule.contains("account_has_open_entries") && rule.contains("DELETE /v1/entries/{id}"),
        "the disable rule is documented: {patch}"
    );
    assert!(patch["responses"]["409"].is_object(), "{patch}");
    let post = &paths["/v1/entries"]["post"];
    let key = post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .unwrap_or_else(|| panic!("no Idempotency-Key parameter: {post}"));
    assert_eq!(key["in"], "header", "{key}");
    assert_eq!(key["required"], false, "{key}");
    for status in ["200", "409"] {
        assert!(post["responses"][status].is_object(), "{status}: {post}");
    }
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

/// BTCUSDT takes no market stop (Binance's `orderTypes`): an account set to
/// one gets stop-limits there, and its entries say so.
#[tokio::test]
async fn a_market_stop_account_is_protected_by_stop_limits_where_market_stops_are_refused() {
    let w = world().await;
    let (status, body) = patch_alice(&w, json!({"protection": {"stop": {"type": "market"}}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, filled) = w.post_entry(ALICE_TOKEN, w.market()).await;
    assert_eq!(status, StatusCode::CREATED, "{filled}");
    assert_eq!(filled["protection"]["state"], "protected", "{filled}");
    let lists = w.exchange.fake.open_lists();
    assert_eq!(lists.len(), 2);
    // SL 99, its limit 0.5 % under it: 98.505 rounded down to the tick.
    assert!(
        lists
            .iter()
            .all(|l| l.request.stop_limit.map(|p| p.get()) == Some(dec!(98.5))),
        "{lists:?}"
    );
    let path = format!("/v1/entries/{}", filled["id"]);
    let (_, body) = w.call(Method::GET, &path, Some(ALICE_TOKEN), None).await;
    let said: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "stop_substituted")
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert_eq!(
        said,
        [
            "BTCUSDT: STOP_LOSS (market stop) not allowed, STOP_LOSS_LIMIT 0.5% under the trigger placed instead"
        ],
        "{body}"
    );
}

/// A settings-only PATCH that read the account disabled, while an enable
/// and a new entry land before its write: the write leaves the active flag
/// to the store, so the account stays enabled and its entry followed.
#[tokio::test]
async fn a_settings_change_never_disables_an_account_enabled_meanwhile() {
    let w = world().await;
    let (status, _) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::OK);
    w.hooks.enable_on_update.store(true, Ordering::SeqCst);
    let (status, body) = patch_alice(&w, json!({"protection": {"slPct": "2"}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], true, "{body}");
    assert_eq!(body["protection"]["slPct"], "2", "{body}");
    let account = w.store.account(AccountId(w.alice_account)).await.unwrap();
    assert!(account.active, "enabled by the other request, and left so");
    assert_eq!(w.store.open_entries(account.id).await.unwrap().len(), 1);
}

/// A disable that read the account already disabled, while an enable and a
/// new entry land before its write: its re-check finds the entry, and the
/// account is enabled again, whatever the handler read before.
#[tokio::test]
async fn a_disable_racing_an_enable_and_an_entry_leaves_the_account_enabled() {
    let w = world().await;
    let (status, _) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::OK);
    w.hooks.enable_on_update.store(true, Ordering::SeqCst);
    let (status, problem) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "account_has_open_entries");
    let account = w.store.account(AccountId(w.alice_account)).await.unwrap();
    assert!(account.active, "enabled again: its entry is followed");
}

/// The disable raced an entry and enabling the account again fails: the
/// answer says the account is left disabled, with its entries and what to
/// do, rather than a plain retryable store error.
#[tokio::test]
async fn a_failed_re_enable_is_reported_not_hidden() {
    let w = world().await;
    w.hooks.entry_on_disable.store(true, Ordering::SeqCst);
    w.hooks.fail_enable.store(true, Ordering::SeqCst);
    let (status, problem) = patch_alice(&w, json!({"active": false})).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{problem}");
    assert_eq!(problem["code"], "account_left_disabled", "{problem}");
    let account = AccountId(w.alice_account);
    let open: Vec<i64> = w
        .store
        .open_entries(account)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.0)
        .collect();
    assert_eq!(problem["openEntries"], 1, "{problem}");
    assert_eq!(problem["entryIds"], json!(open), "{problem}");
    let message = problem["message"].as_str().unwrap();
    let left = format!("account {} is left disabled", w.alice_account);
    for part in [
        left.as_str(),
        "neither streamed nor reconciled",
        r#"{"active": true}"#,
    ] {
        assert!(message.contains(part), "'{message}' lacks '{part}'");
    }
    assert!(!w.store.account(account).await.unwrap().active);

    // As told: enabling it works once the store does.
    w.hooks.fail_enable.store(false, Ordering::SeqCst);
    let (status, body) = patch_alice(&w, json!({"active": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], true);
}

/// A client that hangs up after the disable's write, before its re-check:
/// the rest still runs, and the entry that raced it keeps the account
/// enabled.
#[tokio::test]
async fn a_client_that_hangs_up_mid_disable_leaves_no_entry_unfollowed() {
    let w = world().await;
    w.hooks.entry_on_disable.store(true, Ordering::SeqCst);
    w.hooks.hold_disable.store(true, Ordering::SeqCst);
    let gone = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        patch_alice(&w, json!({"active": false})),
    )
    .await;
    assert!(gone.is_err(), "the client hung up before the answer");
    let account = AccountId(w.alice_account);
    assert!(
        !w.store.account(account).await.unwrap().active,
        "written, not re-checked yet"
    );
    w.hooks.hold_disable.store(false, Ordering::SeqCst);
    w.hooks.disable_written.notify_one();
    let enabled = wait_until(std::time::Duration::from_secs(3), || async {
        w.store.account(account).await.unwrap().active
    })
    .await;
    assert!(enabled, "the raced entry's account was left disabled");
}
