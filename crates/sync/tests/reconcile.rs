//! The reconciler on `MemStore` and the exchange double.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::time::Duration;

use common::*;
use oco_core::model::LegUpdate;
use oco_core::model::{EntryKind, Protection, Source};
use oco_core::ports::{Clock, ExchangeError, Store};
use oco_core::protect::Idle;
use oco_core::state::ExternalEnd;
use oco_core::{EntryStatus, LegIndex, LegKey, LegState, ProtectOutcome};
use rust_decimal_macros::dec;
use sync::SyncError;

fn placed(o: Option<&ProtectOutcome>) -> bool {
    matches!(o, Some(ProtectOutcome::Placed { .. }))
}

#[tokio::test]
async fn fills_nobody_reported_are_protected_on_the_next_pass() {
    let w = world();
    let a = w.account("k1").await;
    let market = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    // A LIMIT above the market crosses and fills at once.
    let limit = w
        .sent_entry(
            &a,
            EntryKind::Limit {
                price: p(dec!(100.5)),
            },
            dec!(0.5),
        )
        .await;
    assert_eq!(w.fake.oco_calls(), 0, "nobody protected them yet");

    let sync = w.reconciler(config());
    let report = sync.pass().await.unwrap();
    assert_eq!(report.reconciled.len(), 1, "{report:?}");
    let r = &report.reconciled[0];
    assert!(
        placed(r.outcome(market)) && placed(r.outcome(limit)),
        "{r:?}"
    );
    assert_eq!(r.orders_queried, 2);
    assert_eq!(w.open_qty("k1"), dec!(1.5), "both fills covered in full");
    for id in [market, limit] {
        let e = w.store.entry(id).await.unwrap();
        assert_eq!(e.status, EntryStatus::Filled);
        assert!(
            matches!(
                e.protection,
                Protection::Protected {
                    by: Source::Sync,
                    ..
                }
            ),
            "{:?}",
            e.protection
        );
    }

    // The next pass finds everything covered: one list read, nothing placed.
    let calls = w.fake.oco_calls();
    let lists_reads = w.exchange.calls("k1", "open_order_lists");
    let again = sync.pass().await.unwrap();
    assert!(again.reconciled[0].protections.is_empty(), "{again:?}");
    assert_eq!(w.fake.oco_calls(), calls);
    assert_eq!(w.exchange.calls("k1", "open_order_lists"), lists_reads + 1);
    assert_eq!(
        w.exchange.calls("k1", "query_order"),
        2,
        "final entries are not looked up again"
    );
    let m = sync.metrics();
    assert_eq!((m.passes, m.accounts_reconciled), (2, 2));
    assert_eq!(m.protections.get("placed"), Some(&2));
    // The stops of the open lists are checked among the open orders, on
    // the one symbol with lists of ours; the first pass found none open.
    assert_eq!(w.exchange.calls("k1", "open_order_ids"), 1);
    // Sync's own reads: 2 x open lists (6) + 2 x order (4) + open orders (6).
    assert_eq!(m.weight_used, 2 * 6 + 2 * 4 + 6);
}

#[tokio::test]
async fn an_account_with_nothing_open_costs_no_request() {
    let w = world();
    w.account("k1").await;
    let sync = w.reconciler(config());
    let report = sync.pass().await.unwrap();
    assert_eq!(report.reconciled[0].entries, 0);
    assert_eq!(w.exchange.all_calls("k1"), 0);
    assert_eq!(report.weight_used, 0);
}

#[tokio::test]
async fn trades_are_fetched_when_the_order_lookup_lacks_them() {
    let w = world();
    w.exchange.query_without_fills();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(r.trades_fetched, 1, "{r:?}");
    assert!(placed(r.outcome(id)), "{r:?}");
    let e = w.store.entry(id).await.unwrap();
    assert_eq!(
        e.fills_qty, e.executed_qty,
        "every fill recorded with its commission"
    );
}

/// A fill nobody reported, whose trades cannot be read (they are needed only
/// for the commissions): the order's own figures are protected at once, the
/// unread trades are an error of the entry, and a later pass reads them and
/// counts the fill once.
#[tokio::test]
async fn a_fill_whose_trades_are_unread_is_protected_from_the_order_alone() {
    let w = world();
    w.exchange.query_without_fills();
    w.exchange
        .fail_trades(Some(ExchangeError::Transient("502 bad gateway".into())));
    // Its commission, 0.001, was paid in BTC: the account holds 0.999.
    w.exchange.trades_fee_in_base(dec!(0.001));
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    w.fake.set_free("k1", "BTC", dec!(0.999));
    let sync = w.wired_reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(placed(r.outcome(id)), "{r:?}");
    assert_eq!(
        w.open_qty("k1"),
        dec!(0.999),
        "the coins held have a stop, planned again after the refusal for balance"
    );
    assert!(
        matches!(r.entry_errors.as_slice(), [(e, _)] if *e == id),
        "the unread trades stay visible: {r:?}"
    );
    assert_eq!(sync.metrics().entry_errors, 1);
    let e = w.store.entry(id).await.unwrap();
    assert_eq!(
        (e.status, e.executed_qty, e.fills_qty),
        (EntryStatus::Filled, q(dec!(1)), q(dec!(0)))
    );

    // The trades can be read again: the next pass reads them, and the fill is
    // counted once, net of its commission, covered by the lists in place.
    w.exchange.fail_trades(None);
    let calls = w.fake.oco_calls();
    let again = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(again.trades_fetched, 1, "{again:?}");
    assert!(again.entry_errors.is_empty(), "{again:?}");
    let e = w.store.entry(id).await.unwrap();
    assert_eq!(
        (e.executed_qty, e.fills_qty, e.net_qty()),
        (q(dec!(1)), q(dec!(1)), q(dec!(0.999)))
    );
    assert_eq!(w.fake.oco_calls(), calls, "nothing placed again");
    assert_eq!(w.open_qty("k1"), dec!(0.999));
    // Complete now: no trade is read again.
    let third = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(third.trades_fetched, 0, "{third:?}");
    assert!(third.protections.is_empty(), "{third:?}");
}

#[tokio::test]
async fn a_resting_entry_moves_forward_without_protection() {
    let w = world();
    let a = w.account("k1").await;
    let id = w
        .sent_entry(&a, EntryKind::Limit { price: p(dec!(90)) }, dec!(1))
        .await;
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(r.protections.is_empty(), "{r:?}");
    let e = w.store.entry(id).await.unwrap();
    assert_eq!(
        e.status,
        EntryStatus::New,
        "pending_new moved forward by the evidence"
    );
    assert!(e.order_id.is_some());
    assert_eq!(w.fake.oco_calls(), 0);
}

#[tokio::test]
async fn a_leg_sent_but_never_recorded_is_found_by_client_id_not_placed_again() {
    for stale in [false, true] {
        let w = world();
        let a = w.account("k1").await;
        let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
        let entry = w.store.entry(id).await.unwrap();
        // Layer 1 placed both legs...
        let ev = oco_core::Evidence {
            order_id: entry.order_id,
            status: EntryStatus::Filled,
            executed_qty: q(dec!(1)),
            cumulative_quote: dec!(100),
            fills: Vec::new(),
            holding: None,
            observed_at: w.clock.now(),
        };
        w.protector
            .protect(id, Some(&ev), Source::Websocket)
            .await
            .unwrap();
        assert_eq!(w.fake.oco_calls(), 2);
        // ...and crashed before the store heard the answers.
        for leg in w.store.legs(id).await.unwrap() {
            assert!(
                w.store
                    .update_leg(&LegUpdate {
                        key: leg.key,
                        from: "placed",
                        to: LegState::Claimed,
                        error: None,
                        at: leg.updated_at,
                    })
                    .await
                    .unwrap()
            );
        }
        if stale {
            w.clock.advance(Duration::from_secs(60));
        }
        let sync = w.reconciler(config());
        let r = sync.reconcile_account(a.id).await.unwrap();
        assert_eq!(r.legs_adopted.len(), 2, "stale={stale} {r:?}");
        assert_eq!(
            r.outcome(id),
            Some(&ProtectOutcome::Nothing(Idle::Covered)),
            "stale={stale}"
        );
        assert_eq!(w.fake.oco_calls(), 2, "no second placement, stale={stale}");
        assert_eq!(w.fake.lists().len(), 2);
        assert!(
            w.store
                .legs(id)
                .await
                .unwrap()
                .iter()
                .all(|l| matches!(l.state, LegState::Placed { .. }))
        );
        assert_eq!(sync.metrics().legs_adopted, 2);
    }
}

#[tokio::test]
async fn revoked_keys_open_the_breaker_and_other_accounts_are_protected() {
    let w = world();
    let bad = w.account("revoked").await;
    let good = w.account("k1").await;
    w.sent_entry(&bad, EntryKind::Market, dec!(1)).await;
    let protected = w.sent_entry(&good, EntryKind::Market, dec!(1)).await;
    w.exchange.revoke("revoked");

    let sync = w.reconciler(config());
    let report = sync.pass().await.unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, bad.id);
    assert!(report.failed[0].1.is_auth());
    assert!(placed(report.reconciled[0].outcome(protected)));
    assert_eq!(w.open_qty("k1"), dec!(1));
    let open = sync.open_breakers();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].0, bad.id);

    let calls = w.exchange.all_calls("revoked");
    let second = sync.pass().await.unwrap();
    assert_eq!(second.skipped.len(), 1, "{second:?}");
    assert_eq!(second.skipped[0].0, bad.id);
    assert_eq!(
        w.exchange.all_calls("revoked"),
        calls,
        "an open breaker sends nothing"
    );
    assert!(matches!(
        sync.reconcile_account(bad.id).await,
        Err(SyncError::BreakerOpen { .. })
    ));
    let m = sync.metrics();
    assert_eq!(m.breaker_opens, 1);
    assert_eq!(m.accounts_skipped, 2);
}

#[tokio::test(start_paused = true)]
async fn persistent_errors_open_the_breaker_but_rate_limits_never_do() {
    let w = world();
    let a = w.account("k1").await;
    w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let mut c = config();
    c.breaker.failures_to_open = 2;
    let sync = w.reconciler(c);

    // Rate limits are the node's, not the account's.
    w.exchange.fail_open_lists(
        100,
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(1),
        },
    );
    for _ in 0..3 {
        let err = sync.reconcile_account(a.id).await.unwrap_err();
        assert!(
            matches!(
                err.exchange_error(),
                Some(ExchangeError::RateLimited { .. })
            ),
            "{err}"
        );
    }
    assert!(
        sync.open_breakers().is_empty(),
        "rate limits do not open a breaker"
    );

    w.exchange
        .fail_open_lists(100, ExchangeError::Transient("connection refused".into()));
    assert!(sync.reconcile_account(a.id).await.is_err());
    assert!(
        sync.open_breakers().is_empty(),
        "one failure is not persistent"
    );
    assert!(sync.reconcile_account(a.id).await.is_err());
    assert_eq!(
        sync.open_breakers().len(),
        1,
        "the second failure in a row opens it"
    );
    assert_eq!(sync.metrics().breaker_opens, 1);

    // After open_for, one trial pass; it succeeds and closes the breaker.
    w.exchange.fail_open_lists(0, ExchangeError::NotFound);
    tokio::time::advance(config().breaker.open_for + Duration::from_secs(1)).await;
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(r.protections.len(), 1);
    assert!(sync.open_breakers().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_pauses_then_the_pass_succeeds() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    w.exchange.fail_open_lists(
        1,
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(5),
        },
    );
    let sync = w.reconciler(config());
    let start = tokio::time::Instant::now();
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "waited out retry_after, elapsed {:?}",
        start.elapsed()
    );
    assert!(placed(r.outcome(id)), "{r:?}");
    assert_eq!(w.exchange.calls("k1", "open_order_lists"), 2);
    assert_eq!(sync.metrics().rate_limited, 1);
    assert!(sync.open_breakers().is_empty());
}

/// Binance counts new orders per account: one account out of its orders
/// (`-1015`, or the daily count) has its placements held back, and the
/// other accounts' reads and stops go on as before.
#[tokio::test(start_paused = true)]
async fn one_accounts_order_limit_does_not_hold_back_the_others() {
    let w = world();
    let limited = w.account("k1").await;
    let other = w.account("k2").await;
    w.sent_entry(&limited, EntryKind::Market, dec!(1)).await;
    let sync = w.wired_reconciler(config());
    w.fake.push_oco_fault(oco_core::testing::OcoFault::Fail(
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(6 * 3600),
        },
    ));
    let start = tokio::time::Instant::now();
    let first = sync.reconcile_account(limited.id).await;
    assert!(
        format!("{first:?}").contains("rate limited"),
        "the limited account's placement is refused: {first:?}"
    );

    let id = w.sent_entry(&other, EntryKind::Market, dec!(1)).await;
    let r = sync.reconcile_account(other.id).await.unwrap();
    assert!(placed(r.outcome(id)), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the other account waited {:?} for the limited one's limit",
        start.elapsed()
    );
    assert_eq!(
        sync.metrics().rate_limited,
        1,
        "the answer is still counted"
    );
}

/// An account whose placements are held (its order count spent: the
/// adapter refuses them at once until the hold ends) while its cancels go
/// on: an entry whose list was canceled by hand needs a replacement, and
/// canceling its other list first would leave all its coins without a stop
/// until then. Wired as the binaries are, `protect` asks the adapter
/// through the metered exchange and cancels nothing.
#[tokio::test(start_paused = true)]
async fn a_replacement_keeps_the_working_lists_while_the_accounts_placements_are_held() {
    let w = world();
    let a = w.account("k1").await;
    let covered = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.wired_reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(placed(r.outcome(covered)), "{r:?}");
    let legs = w.store.legs(covered).await.unwrap();
    assert_eq!(legs.len(), 2, "{legs:?}");
    w.fake.cancel_externally(legs[1].ids.list.as_str());

    // A new fill's placement is refused: the account's orders are held.
    let fresh = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    w.fake
        .hold_placements("k1", Some(Duration::from_secs(6 * 3600)));
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        format!("{:?}", r.outcome(fresh)).contains("rate limited"),
        "{r:?}"
    );
    assert!(
        format!("{:?}", r.outcome(covered)).contains("rate limited"),
        "{r:?}"
    );
    let open = w.fake.open_lists();
    assert!(
        open.len() == 1 && open[0].request.ids.list == legs[0].ids.list,
        "the working list keeps its stop: {open:?}"
    );
    assert!(matches!(
        w.store.legs(covered).await.unwrap()[0].state,
        LegState::Placed { .. }
    ));

    // The hold ends: both entries are protected in full.
    w.fake.hold_placements("k1", None);
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        placed(r.outcome(covered)) && placed(r.outcome(fresh)),
        "{r:?}"
    );
    assert_eq!(w.open_qty("k1"), dec!(2));
}

#[tokio::test]
async fn lists_filled_while_nobody_listened_close_the_entry() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    sync.reconcile_account(a.id).await.unwrap();
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(legs.len(), 2);
    let first = legs.iter().find(|l| l.key.leg == LegIndex::First).unwrap();
    let second = legs.iter().find(|l| l.key.leg == LegIndex::Second).unwrap();
    w.fake.fill_take_profit(first.ids.list.as_str(), first.qty);
    w.fake.fill_stop(second.ids.list.as_str());

    let r = sync.reconcile_account(a.id).await.unwrap();
    let ended: Vec<&LegState> = r.lists_ended.iter().map(|(_, s)| s).collect();
    assert!(ended.contains(&&LegState::TakeProfitFilled), "{r:?}");
    assert!(ended.contains(&&LegState::StopLossFilled), "{r:?}");
    let e = w.store.entry(id).await.unwrap();
    assert_eq!(e.protection, Protection::Closed);
    let realized = e.realized_quote.unwrap();
    // TP1 0.5 @ 101, SL 0.5 @ 98.5 (stop limit), bought 1 @ 100.
    assert_eq!(realized, dec!(50.5) + dec!(49.25) - dec!(100));
    assert!(w.store.open_entries(a.id).await.unwrap().is_empty());
    let m = sync.metrics();
    assert_eq!(m.lists_ended.get("take_profit_filled"), Some(&1));
    assert_eq!(m.lists_ended.get("stop_loss_filled"), Some(&1));
}

/// Lists that sold while nobody listened: the pass learns their sales from
/// lookups, which carry no trades, and reads none at the close (no trade
/// reads in the pass's weight budget, ahead of re-protections): the result
/// leaves those commissions out and the entry says so.
#[tokio::test]
async fn lists_that_sold_while_nobody_listened_close_without_reading_trades() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    sync.reconcile_account(a.id).await.unwrap();
    let legs = w.store.legs(id).await.unwrap();
    let first = legs.iter().find(|l| l.key.leg == LegIndex::First).unwrap();
    let second = legs.iter().find(|l| l.key.leg == LegIndex::Second).unwrap();
    w.fake.set_leg_commission(Some((dec!(0.0505), "USDT")));
    w.fake.fill_take_profit(first.ids.list.as_str(), first.qty);
    w.fake.set_leg_commission(Some((dec!(0.0001), "BNB")));
    w.fake.fill_stop(second.ids.list.as_str());
    let trades = w.exchange.calls("k1", "order_trades");

    sync.reconcile_account(a.id).await.unwrap();
    let e = w.store.entry(id).await.unwrap();
    assert_eq!(e.protection, Protection::Closed);
    // TP1 0.5 @ 101, SL 0.5 @ 98.5, bought 1 @ 100; commissions unknown.
    assert_eq!(e.realized_quote, Some(dec!(50.5) + dec!(49.25) - dec!(100)));
    assert!(!e.fees_complete, "sales learnt by lookup, without trades");
    assert_eq!(
        w.exchange.calls("k1", "order_trades") - trades,
        0,
        "no trade read at the close"
    );
}

#[tokio::test]
async fn a_list_canceled_outside_is_recorded_and_the_remainder_protected() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    sync.reconcile_account(a.id).await.unwrap();
    let legs = w.store.legs(id).await.unwrap();
    w.fake.cancel_externally(legs[0].ids.list.as_str());
    assert_eq!(w.open_qty("k1"), dec!(0.5));

    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(
        r.lists_ended,
        vec![(
            legs[0].key,
            LegState::CanceledExternally {
                why: ExternalEnd::Canceled
            }
        )]
    );
    assert!(placed(r.outcome(id)), "{r:?}");
    assert_eq!(w.open_qty("k1"), dec!(1), "covered again in full");
    let events = w.store.events(id).await.unwrap();
    assert!(events.iter().filter(|e| e.kind == "leg_placed").count() >= 4);
}

/// A list canceled outside while nobody listened, after which `protect`
/// stops before it decides (the symbol's rules unread): its coins have no
/// stop, and the entry does not stay labelled protected meanwhile.
#[tokio::test]
async fn a_list_ended_outside_whose_protection_stops_leaves_the_entry_unprotected() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    sync.reconcile_account(a.id).await.unwrap();
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    let gone = w.store.legs(id).await.unwrap().remove(0);
    w.fake.cancel_externally(gone.ids.list.as_str());
    w.exchange.fail_rules(Some(ExchangeError::Transient(
        "503 service unavailable".into(),
    )));
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        r.lists_ended
            .iter()
            .any(|(k, s)| *k == gone.key && matches!(s, LegState::CanceledExternally { .. })),
        "{r:?}"
    );
    assert!(
        matches!(r.entry_errors.as_slice(), [(e, _)] if *e == id),
        "{r:?}"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected
    );
    // The rules can be read again: the next pass covers the coins.
    w.exchange.fail_rules(None);
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(placed(r.outcome(id)), "{r:?}");
    assert_eq!(w.open_qty("k1"), dec!(1));
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}

#[tokio::test]
async fn a_take_profit_rest_whose_cancel_failed_is_canceled_on_a_later_pass() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    sync.reconcile_account(a.id).await.unwrap();
    let legs = w.store.legs(id).await.unwrap();
    let first = legs.iter().find(|l| l.key.leg == LegIndex::First).unwrap();
    let (key, list) = (first.key, first.ids.list.clone());
    let state = || async {
        let legs = w.store.legs(id).await.unwrap();
        legs.into_iter().find(|l| l.key == key).unwrap().state
    };
    // 0.2 of 0.5 sells at the target; 0.3 rests there without a stop. The
    // gateway follows it and protects, but the cancel of the rest is refused.
    w.fake.fill_take_profit(list.as_str(), q(dec!(0.2)));
    for leg in w.store.legs(id).await.unwrap() {
        w.protector.refresh_leg(&a.creds, &leg).await.unwrap();
    }
    w.fake.fail_cancels(Some(ExchangeError::Transient(
        "503 service unavailable".into(),
    )));
    w.protector
        .protect(id, None, Source::Websocket)
        .await
        .unwrap();
    assert_eq!(
        state().await,
        LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial
        }
    );
    // Every free coin has its stop; only the rest of the take-profit has none.
    assert_eq!(w.fake.balance("k1", "BTC"), (dec!(0), dec!(0.8)));
    w.fake.fail_cancels(None);
    let r = sync.reconcile_account(a.id).await.unwrap();
    // On the book by design until canceled: not a stray.
    assert!(r.stray_lists.is_empty(), "{r:?}");
    assert_eq!(state().await, LegState::Replaced, "the rest is canceled");
    assert_eq!(w.open_qty("k1"), dec!(0.8), "and covered with the rest");
    assert_eq!(w.fake.balance("k1", "BTC"), (dec!(0), dec!(0.8)));
}

#[tokio::test]
async fn a_price_already_past_the_stop_applies_the_late_policy() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    // The market fell through the -1 % stop while nobody protected the fill.
    w.fake.set_price("BTCUSDT", p(dec!(98.8)));
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        matches!(r.outcome(id), Some(ProtectOutcome::Exited { .. })),
        "{r:?}"
    );
    let e = w.store.entry(id).await.unwrap();
    assert!(
        matches!(e.protection, Protection::Exited { .. }),
        "{:?}",
        e.protection
    );
    let events = w.store.events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|ev| ev.kind == "exited" && ev.source == Some(Source::Sync)),
        "{events:?}"
    );
    assert!(w.fake.open_lists().is_empty());
    assert_eq!(w.fake.balance("k1", "BTC").0, dec!(0), "sold at market");
    assert_eq!(sync.metrics().protections.get("exited"), Some(&1));
    assert!(w.store.open_entries(a.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_entry_the_exchange_never_received_is_rejected_after_the_grace() {
    let w = world();
    let a = w.account("k1").await;
    let id = w.stored_entry(&a, EntryKind::Market, dec!(1)).await;
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(
        r.awaiting_send,
        vec![id],
        "within the grace it may be in flight"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().status,
        EntryStatus::PendingNew
    );

    w.clock
        .advance(config().not_found_grace + Duration::from_secs(1));
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(r.never_sent, vec![id]);
    assert_eq!(
        w.store.entry(id).await.unwrap().status,
        EntryStatus::Rejected
    );
    assert!(w.store.open_entries(a.id).await.unwrap().is_empty());
    let events = w.store.events(id).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "never_sent"));
}

#[tokio::test]
async fn an_open_list_of_ours_without_an_entry_is_reported() {
    let w = world();
    let a = w.account("k1").await;
    w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    w.fake.set_free("k1", "BTC", dec!(2));
    let orphan = w
        .ids
        .oco(LegKey {
            entry: oco_core::EntryId(4242),
            leg: LegIndex::First,
            generation: 0,
        })
        .unwrap();
    oco_core::Exchange::place_oco(
        w.fake.as_ref(),
        &a.creds,
        &oco_core::ports::OcoRequest {
            symbol: "BTCUSDT".into(),
            qty: q(dec!(0.1)),
            take_profit: p(dec!(110)),
            stop: p(dec!(90)),
            stop_limit: Some(p(dec!(89))),
            ids: orphan.clone(),
        },
    )
    .await
    .unwrap();
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(r.unknown_lists, vec![orphan.list.as_str().to_owned()]);
}

#[tokio::test]
async fn a_disabled_account_is_left_alone() {
    let w = world();
    let a = w.account("k1").await;
    w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    w.store
        .update_account(a.id, None, Some(false))
        .await
        .unwrap();
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(r.inactive);
    assert_eq!(w.exchange.all_calls("k1"), 0);
    assert_eq!(sync.pass().await.unwrap().accounts, 0);
}

/// The end a race leaves: the entry `Protected` by legs of its first 0.7,
/// its last 0.3 recorded (by a caller that then found a claim in flight)
/// and held with no stop.
async fn protected_short_of_its_last_fill(w: &World, a: &Acct) -> oco_core::EntryId {
    let open_before = w.open_qty(&a.creds.api_key);
    let id = w.sent_entry(a, EntryKind::Market, dec!(1)).await;
    let fill = |n: usize, status| {
        let all = [(1, dec!(0.7)), (2, dec!(0.3))];
        let fills: Vec<oco_core::Fill> = all[..n]
            .iter()
            .map(|(trade, qty)| oco_core::Fill {
                trade_id: *trade,
                price: p(dec!(100)),
                qty: q(*qty),
                commission: dec!(0),
                commission_asset: oco_core::Asset("BNB".into()),
                time: oco_core::Millis(1_000 + trade),
            })
            .collect();
        oco_core::Evidence {
            order_id: Some(1),
            status,
            executed_qty: fills.iter().map(|f| f.qty).sum(),
            cumulative_quote: fills.iter().map(|f| f.qty.notional(f.price)).sum(),
            fills,
            holding: None,
            observed_at: oco_core::Millis(2_000),
        }
    };
    w.protector
        .protect(
            id,
            Some(&fill(1, EntryStatus::PartiallyFilled)),
            Source::Websocket,
        )
        .await
        .unwrap();
    w.store
        .record_evidence(id, &fill(2, EntryStatus::Filled))
        .await
        .unwrap();
    let e = w.store.entry(id).await.unwrap();
    assert!(matches!(e.protection, Protection::Protected { .. }));
    assert_eq!(
        (e.net_qty(), w.open_qty(&a.creds.api_key) - open_before),
        (q(dec!(1)), dec!(0.7))
    );
    id
}

#[tokio::test]
async fn a_protected_entry_whose_legs_fall_short_of_its_position_is_protected_in_full() {
    let w = world();
    let a = w.account("k1").await;
    let id = protected_short_of_its_last_fill(&w, &a).await;
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(placed(r.outcome(id)), "{r:?}");
    assert_eq!(w.open_qty("k1"), dec!(1), "the last fill has its stop");
    // Covered in full now: the next pass asks nothing more.
    let calls = w.fake.oco_calls();
    let again = sync.reconcile_account(a.id).await.unwrap();
    assert!(again.protections.is_empty(), "{again:?}");
    assert_eq!(w.fake.oco_calls(), calls);
}

#[tokio::test]
async fn legs_short_of_the_position_after_a_manual_sell_are_not_replaced_every_pass() {
    let w = world();
    let a = w.account("k1").await;
    let id = protected_short_of_its_last_fill(&w, &a).await;
    // The user sold the bare 0.3 by hand: nothing on the account lacks a stop.
    w.fake.set_free("k1", "BTC", dec!(0));
    let calls = w.fake.oco_calls();
    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(r.protections.is_empty(), "{r:?}");
    assert_eq!(w.fake.oco_calls(), calls, "working stops left alone");
    assert_eq!(w.open_qty("k1"), dec!(0.7));
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}

/// One entry whose lookup keeps failing is that entry's business: it does
/// not open the account's breaker, and the account's other entries are still
/// protected.
#[tokio::test]
async fn an_error_of_one_entry_does_not_open_the_accounts_breaker() {
    let w = world();
    let a = w.account("k1").await;
    let stuck = w
        .sent_entry(&a, EntryKind::Limit { price: p(dec!(90)) }, dec!(1))
        .await;
    let client_id = w.store.entry(stuck).await.unwrap().client_id;
    w.exchange.fail_queries_of(
        client_id.as_str(),
        ExchangeError::Transient("connection reset".into()),
    );
    let mut c = config();
    c.breaker.failures_to_open = 2;
    let sync = w.reconciler(c);
    for _ in 0..3 {
        let r = sync.reconcile_account(a.id).await.unwrap();
        assert_eq!(r.entry_errors.len(), 1, "{r:?}");
    }
    assert!(
        sync.open_breakers().is_empty(),
        "{:?}",
        sync.open_breakers()
    );
    let id = w.sent_entry(&a, EntryKind::Market, dec!(1)).await;
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(placed(r.outcome(id)), "{r:?}");
}

/// Protected entries whose legs fall short of their positions after coins
/// were sold by hand: the account's balance is read once for all of them in
/// a pass, not once each.
#[tokio::test]
async fn the_balance_is_read_once_per_pass_for_every_entry_short_of_its_position() {
    let w = world();
    let a = w.account("k1").await;
    protected_short_of_its_last_fill(&w, &a).await;
    protected_short_of_its_last_fill(&w, &a).await;
    w.fake.set_free("k1", "BTC", dec!(0));
    let sync = w.reconciler(config());
    let before = w.exchange.calls("k1", "balances");
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(r.protections.is_empty(), "{r:?}");
    assert_eq!(w.exchange.calls("k1", "balances") - before, 1);
}

/// An entry `Protected` by two lists of its first 0.7 (0.35 each), one of
/// whose stops has triggered and sold 0.3 of its 0.35, and whose last 0.3
/// was recorded with no stop: the lists still hold 0.4 of the 0.7 owed.
/// Counted at their full size they would seem to hold it all, and the pass
/// would skip the entry with 0.3 free and bare.
#[tokio::test]
async fn a_list_whose_stop_sold_part_counts_only_what_it_still_holds() {
    let w = world();
    let a = w.account("k1").await;
    let id = protected_short_of_its_last_fill(&w, &a).await;
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(legs.len(), 2, "{legs:?}");
    assert_eq!(legs[0].qty, q(dec!(0.35)));
    w.fake
        .sell_stop_partly(legs[0].ids.list.as_str(), q(dec!(0.3)));
    w.protector.refresh_leg(&a.creds, &legs[0]).await.unwrap();
    let now = w.store.legs(id).await.unwrap();
    assert_eq!(now[0].sold.stop_loss, q(dec!(0.3)));
    assert!(matches!(now[0].state, LegState::Placed { .. }), "{now:?}");
    assert_eq!(w.fake.balance("k1", "BTC"), (dec!(0.3), dec!(0.4)));

    let sync = w.reconciler(config());
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(placed(r.outcome(id)), "{r:?}");
    assert_eq!(
        w.fake.balance("k1", "BTC"),
        (dec!(0), dec!(0.7)),
        "every coin held is under a stop"
    );
}
