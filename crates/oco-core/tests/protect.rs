//! `protect` against the in-memory store and the scripted exchange double.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::time::Duration;

use common::*;
use oco_core::ids::EntryId;
use oco_core::levels::EntryLevels;
use oco_core::model::Millis;
use oco_core::model::{Protection, ProtectionConfig, Source};
use oco_core::ports::{Exchange, ExchangeError, Store};
use oco_core::protect::{Idle, ProtectOutcome};
use oco_core::state::{EntryStatus, ExternalEnd, LegState};
use oco_core::symbol::MarketLotSize;
use oco_core::testing::OcoFault;
use oco_core::{Clock, Price};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

#[tokio::test]
async fn a_fill_gets_two_legs_sized_net_of_base_fees() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    let ProtectOutcome::Placed {
        legs,
        replaced,
        degraded,
    } = &report.outcome
    else {
        panic!("expected placement, got {:?}", report.outcome);
    };
    assert_eq!((legs.len(), *replaced, *degraded), (2, 0, None));
    let lists = w.exchange.open_lists();
    assert_eq!(lists.len(), 2);
    assert_eq!(
        w.open_qty(),
        dec!(0.999),
        "legs cover filled minus the base-asset fee"
    );
    // Defaults: +1 % / +2 % targets, -1 % stop, stop limit 0.5 % under it.
    let tps: Vec<Decimal> = lists.iter().map(|l| l.request.take_profit.get()).collect();
    assert_eq!(tps, vec![dec!(101), dec!(102)]);
    assert!(lists.iter().all(|l| l.request.stop.get() == dec!(99)));
    assert!(
        lists
            .iter()
            .all(|l| l.request.stop_limit.map(Price::get) == Some(dec!(98.5)))
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(matches!(
        entry.protection,
        Protection::Protected {
            by: Source::Websocket,
            ..
        }
    ));
}

#[tokio::test]
async fn concurrent_calls_for_one_fill_place_each_leg_once() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let ev = full_fill();
    let (a, b, c) = tokio::join!(
        w.protector.protect(id, Some(&ev), Source::Websocket),
        w.protector.protect(id, Some(&ev), Source::Direct),
        w.protector.protect(id, Some(&ev), Source::Sync),
    );
    let outcomes = [a.unwrap().outcome, b.unwrap().outcome, c.unwrap().outcome];
    let placed = outcomes
        .iter()
        .filter(|o| matches!(o, ProtectOutcome::Placed { .. }))
        .count();
    assert_eq!(placed, 1, "one caller places: {outcomes:?}");
    assert_eq!(w.exchange.oco_calls(), 2, "two legs sent once each");
    assert_eq!(w.exchange.lists().len(), 2);
    // Calls after the fact find it covered.
    let again = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Covered));
    assert_eq!(w.exchange.oco_calls(), 2);
}

#[tokio::test]
async fn coverage_found_by_another_layer_is_credited_to_the_placer() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let ev = full_fill();
    w.protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    // As if the placer had not yet recorded the coverage when sync looked.
    w.store
        .set_protection(id, &Protection::Unprotected)
        .await
        .unwrap();
    let again = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Covered));
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(
            entry.protection,
            Protection::Protected {
                by: Source::Websocket,
                ..
            }
        ),
        "{:?}",
        entry.protection
    );
}

#[tokio::test]
async fn an_unknown_outcome_is_resolved_by_lookup_not_by_placing_again() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.exchange.push_oco_fault(OcoFault::UnknownAfterApply);
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { ref legs, .. } if legs.len() == 2),
        "{report:?}"
    );
    assert_eq!(
        w.exchange.lists().len(),
        2,
        "no second list for the lost answer"
    );
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        legs.iter()
            .all(|l| matches!(l.state, LegState::Placed { .. })),
        "{legs:?}"
    );
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Covered));
    assert_eq!(w.exchange.oco_calls(), 2);
}

#[tokio::test]
async fn a_send_that_never_arrived_is_replanned_after_the_claim_timeout() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.exchange.push_oco_fault(OcoFault::UnknownBeforeApply);
    let first = w
        .protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Pending { ref legs } if legs.len() == 1),
        "{first:?}"
    );
    // Within the timeout a lookup miss may be database lag: nothing is placed again.
    let early = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(early.outcome, ProtectOutcome::Pending { .. }),
        "{early:?}"
    );
    w.clock.advance(Duration::from_secs(31));
    let late = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(late.outcome, ProtectOutcome::Placed { replaced: 1, .. }),
        "{late:?}"
    );
    assert_eq!(
        w.open_qty(),
        dec!(0.999),
        "the whole position is covered once"
    );
    assert_eq!(w.exchange.open_lists().len(), 2);
}

#[tokio::test]
async fn a_manual_partial_sell_shrinks_the_legs() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.6));
    let mut ev = full_fill();
    ev.holding = Some(q(dec!(0.6)));
    w.protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0.6));
}

#[tokio::test]
async fn a_holding_smaller_than_known_is_learnt_from_the_refusal() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // The user sold 0.4 by hand before protection; the layer did not know.
    w.credit(dec!(0.599));
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.599));
}

#[tokio::test]
async fn dust_is_recorded_with_its_reason() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(0.00004), dec!(100), dec!(0), "BNB")],
    );
    w.credit(dec!(0.00004));
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Direct)
        .await
        .unwrap();
    let ProtectOutcome::Unprotectable { reason } = report.outcome else {
        panic!("expected unprotectable, got {:?}", report.outcome)
    };
    assert!(reason.starts_with("dust"), "{reason}");
    assert!(
        reason.contains("min_notional") || reason.contains("notional"),
        "{reason}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(matches!(entry.protection, Protection::Unprotectable { .. }));
    assert!(w.exchange.lists().is_empty());
    let events = w.store.events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "unprotectable" && e.detail.contains("dust"))
    );
}

#[tokio::test]
async fn a_partial_fill_then_the_rest_ends_fully_covered() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    let part = first_part();
    w.protector
        .protect(id, Some(&part), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0.4));
    w.credit(dec!(0.6));
    let rest = whole_after_part();
    let report = w
        .protector
        .protect(id, Some(&rest), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { replaced: 2, .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(1));
    assert_eq!(w.exchange.open_lists().len(), 2);
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(
        legs.iter()
            .filter(|l| l.state == LegState::Replaced)
            .count(),
        2
    );
}

#[tokio::test]
async fn a_partly_filled_take_profit_leaves_the_rest_reprotected() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    let first = w.exchange.open_lists()[0].request.ids.list.clone();
    // Binance drops the stop when the take-profit fills partly.
    w.exchange.fill_take_profit(first.as_str(), q(dec!(0.2)));
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        w.protector.refresh_leg(&creds, &leg).await.unwrap();
    }
    let legs = w.store.legs(id).await.unwrap();
    assert!(legs.iter().any(|l| l.state
        == LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial
        }));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(
        w.open_qty(),
        dec!(0.8),
        "everything still held has a stop again"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0), dec!(0.8)));
}

/// A resting entry of which 1 filled and is protected by two lists of 0.5;
/// the first list's take-profit (at 101) then sells 0.1, Binance drops that
/// list's stop and the list keeps executing, and nobody follows the event.
/// The account holds 0.5 coins of its own besides, and the entry fills 0.2
/// more: the evidence of that fill is returned.
async fn a_sale_unseen_before_the_next_fill() -> (World, EntryId, oco_core::model::Evidence) {
    use oco_core::ids::IdScheme;
    use oco_core::model::{EntryKind, EntryTags, NewEntry, OrderSize};
    use oco_core::testing::btcusdt_rules;

    let w = world(ProtectionConfig::DEFAULT).await;
    let ids = IdScheme::new("og").unwrap();
    let id = w
        .store
        .create_entry(
            NewEntry {
                account: w.account,
                symbol: btcusdt_rules().symbol,
                kind: EntryKind::Limit {
                    price: p(dec!(100)),
                },
                size: OrderSize::Base(q(dec!(2))),
                levels: EntryLevels::default(),
                tags: EntryTags::default(),
                idempotency_key: None,
            },
            &move |id| ids.entry(id).unwrap(),
            w.clock.now(),
        )
        .await
        .unwrap()
        .id;
    let fills = |n: usize| {
        let all = [
            (1, dec!(1), dec!(100), dec!(0), "BNB"),
            (2, dec!(0.2), dec!(100), dec!(0), "BNB"),
        ];
        evidence(EntryStatus::PartiallyFilled, &all[..n])
    };
    w.credit(dec!(1));
    w.protector
        .protect(id, Some(&fills(1)), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(1));
    let first = w
        .exchange
        .open_lists()
        .into_iter()
        .find(|l| l.request.take_profit == p(dec!(101)))
        .unwrap();
    w.exchange
        .fill_take_profit(first.request.ids.list.as_str(), q(dec!(0.1)));
    w.credit(dec!(0.5));
    w.credit(dec!(0.2));
    (w, id, fills(2))
}

/// After [`a_sale_unseen_before_the_next_fill`] was protected: the sale is
/// recorded (its quote too, for the realised result), the lists cover 1.2
/// bought less 0.1 sold, and the account's own coins stay free.
async fn assert_the_sale_is_planned_around(w: &World, id: EntryId) {
    let legs = w.store.legs(id).await.unwrap();
    let sold: Decimal = legs.iter().map(|l| l.sold.total().get()).sum();
    let quote: Decimal = legs.iter().map(|l| l.sold.total_quote()).sum();
    assert_eq!(
        (sold, quote),
        (dec!(0.1), dec!(10.1)),
        "what the canceled list sold is recorded"
    );
    assert_eq!(
        w.open_qty(),
        dec!(1.1),
        "the new generation covers 1.2 bought less 0.1 sold"
    );
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0.5), dec!(1.1)),
        "the account's own coins stay free"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

/// The round that protects the new fill plans from what it knows (nothing
/// sold) and cancels the old lists to replace them: the cancel's answer
/// reveals the sale, and the generation is planned again from it rather
/// than sent at the sizes first planned.
#[tokio::test]
async fn a_sale_a_replaced_list_made_before_its_cancel_is_recorded_and_not_protected_again() {
    let (w, id, more) = a_sale_unseen_before_the_next_fill().await;
    let report = w
        .protector
        .protect_seen(w.account, id, "BTCUSDT", &more, Source::Websocket)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_the_sale_is_planned_around(&w, id).await;
    let legs = w.store.legs(id).await.unwrap();
    let first: Vec<_> = legs.iter().filter(|l| l.key.generation == 0).collect();
    assert!(
        first.len() == 2 && first.iter().all(|l| l.state == LegState::Replaced),
        "{first:?}"
    );
}

/// A cancel answered without quantities sends the replacement to look the
/// list up; a lookup that does not find it ended leaves the leg placed and
/// the call failed, and the next call's cancel finds the list not open and
/// reads the sale then. Never is the sale taken as nothing.
#[tokio::test]
async fn a_cancel_answered_without_quantities_has_the_sale_looked_up() {
    let (w, id, more) = a_sale_unseen_before_the_next_fill().await;
    w.exchange.unreport_next_cancels(1);
    w.protector
        .protect(id, Some(&more), Source::Websocket)
        .await
        .unwrap();
    assert_the_sale_is_planned_around(&w, id).await;

    let (w, id, more) = a_sale_unseen_before_the_next_fill().await;
    w.exchange.unreport_next_cancels(1);
    w.exchange.lag_next_lookups(1);
    let report = w
        .protector
        .protect(id, Some(&more), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { .. }),
        "{report:?}"
    );
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        legs.iter()
            .filter(|l| l.key.generation == 0)
            .all(|l| matches!(l.state, LegState::Placed { .. })),
        "{legs:?}"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected,
        "a list was canceled: its coins have no stop"
    );
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_the_sale_is_planned_around(&w, id).await;
}

/// While a replacement cancels an older list, its take-profit fills in
/// part and the stream moves the leg to `take_profit_partial` first (a list
/// end read by lookup does the same with any take-profit that executed):
/// the replacement's move to `replaced` finds the leg moved. The cancel
/// ended the rest too, so the leg is moved to `replaced` from there, not
/// left a rest whose order is already gone: later rounds would spend a
/// cancel on it (refused here, as by a rate limit) and keep its coins out
/// of the plan and the entry labelled unprotected meanwhile.
#[tokio::test]
async fn a_leg_moved_while_its_list_is_canceled_for_a_replacement_is_still_replaced() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.protector
        .protect(id, Some(&first_part()), Source::Websocket)
        .await
        .unwrap();
    let old = w.store.legs(id).await.unwrap().remove(0);
    assert!(matches!(old.state, LegState::Placed { .. }), "{old:?}");
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    let (exchange, protector, moved) = (w.exchange.clone(), w.protector.clone(), old.clone());
    w.exchange.before_next_cancel(move || {
        Box::pin(async move {
            exchange.fill_take_profit(moved.ids.list.as_str(), q(dec!(0.1)));
            let rest = LegState::CanceledExternally {
                why: ExternalEnd::TakeProfitPartial,
            };
            assert!(protector.transition_leg(&moved, rest).await.unwrap());
        })
    });

    let report = w
        .protector
        .protect(id, Some(&whole_after_part()), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    let legs = w.store.legs(id).await.unwrap();
    let replaced = legs.iter().find(|l| l.key == old.key).unwrap();
    assert_eq!(replaced.state, LegState::Replaced, "{legs:?}");
    assert_eq!(replaced.sold.take_profit, q(dec!(0.1)), "its sale recorded");
    assert_eq!(w.open_qty(), dec!(0.9), "1 bought less 0.1 sold has a stop");
    assert!(
        matches!(
            w.store.entry(id).await.unwrap().protection,
            Protection::Protected { .. }
        ),
        "{legs:?}"
    );
    assert!(
        !w.store
            .events(id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "take_profit_cancel_failed"),
        "no cancel spent on an order already canceled"
    );
}

#[tokio::test]
async fn a_market_past_the_stop_exits_at_market_and_records_it() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0), "position sold");
    let entry = w.store.entry(id).await.unwrap();
    assert!(matches!(entry.protection, Protection::Exited { .. }));
    // Bought 1 at 100, sold 1 at market at 98.
    assert_eq!(entry.realized_quote, Some(dec!(-2)), "the exit's result");
    let again = w
        .protector
        .protect(id, None, Source::Websocket)
        .await
        .unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Settled));
    assert_eq!(
        w.store.entry(id).await.unwrap().realized_quote,
        Some(dec!(-2)),
        "kept by later calls"
    );
}

/// Coins filled after a full exit are protected again: the exit's result
/// does not stand for the entry meanwhile, and the later close counts the
/// exit's sale with the lists' sales.
#[tokio::test]
async fn coins_filled_after_an_exit_make_the_later_close_count_both_sales() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let report = w
        .protector
        .protect(id, Some(&first_part()), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    // Bought 0.4 at 100, sold 0.4 at 98.
    assert_eq!(
        w.store.entry(id).await.unwrap().realized_quote,
        Some(dec!(-0.8))
    );

    w.exchange.set_price("BTCUSDT", p(dec!(100)));
    w.credit(dec!(0.6));
    let report = w
        .protector
        .protect(id, Some(&whole_after_part()), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
    assert_eq!(entry.realized_quote, None, "open again: no result yet");

    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        if matches!(leg.state, LegState::Placed { .. }) {
            w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
            w.protector.refresh_leg(&creds, &leg).await.unwrap();
        }
    }
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    // 39.2 from the exit, 0.3 at 101 and 0.3 at 102 from the lists, for 100.
    assert_eq!(entry.realized_quote, Some(dec!(0.1)));
}

#[tokio::test]
async fn late_protection_with_record_only_leaves_the_position_and_says_so() {
    let mut config = ProtectionConfig::DEFAULT;
    config.late = oco_core::model::LatePolicy::RecordOnly;
    let w = world(config).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Unprotectable { ref reason } if reason.contains("late")),
        "{report:?}"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(1), "nothing sold");
}

#[tokio::test]
async fn a_stop_budget_refusal_degrades_to_one_leg_never_to_none() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.exchange
        .push_oco_fault(OcoFault::Fail(ExchangeError::Rejected {
            code: -2010,
            msg: "Filter failure: MAX_NUM_ALGO_ORDERS".into(),
        }));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    // One call: the refusal shows the budget, and the same call re-plans to
    // one list over the whole position (the accepted half-list is replaced),
    // so no part of the position waits for another caller to get a stop.
    let first = w
        .protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Placed { ref legs, replaced: 1, degraded: Some(_) } if legs.len() == 1),
        "{first:?}"
    );
    assert_eq!(w.exchange.open_lists().len(), 1);
    assert_eq!(w.open_qty(), dec!(1));
    let second = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(second.outcome, ProtectOutcome::Nothing(_)),
        "{second:?}"
    );
    assert_eq!(
        w.exchange.oco_calls(),
        3,
        "two lists, then the one that replaced them"
    );
}

#[tokio::test]
async fn the_entrys_own_levels_win() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let levels = EntryLevels {
        tp1: Some(p(dec!(105))),
        tp2: Some(p(dec!(110))),
        sl: Some(p(dec!(95))),
    };
    let id = w.entry(levels).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Direct)
        .await
        .unwrap();
    let lists = w.exchange.open_lists();
    let mut tps: Vec<Decimal> = lists.iter().map(|l| l.request.take_profit.get()).collect();
    tps.sort();
    assert_eq!(tps, vec![dec!(105), dec!(110)]);
    assert!(lists.iter().all(|l| l.request.stop.get() == dec!(95)));
}

#[tokio::test]
async fn a_filled_stop_closes_the_entry_with_its_result() {
    let mut config = ProtectionConfig::DEFAULT;
    config.split = Decimal::ONE;
    let w = world(config).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Direct)
        .await
        .unwrap();
    let list = w.exchange.open_lists()[0].request.ids.list.clone();
    w.exchange.fill_stop(list.as_str());
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        w.protector.refresh_leg(&creds, &leg).await.unwrap();
    }
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(report.outcome, ProtectOutcome::Nothing(Idle::Settled));
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    assert_eq!(
        entry.realized_quote,
        Some(dec!(-1.5)),
        "sold 1 at 98.5 after buying at 100"
    );
}

/// The stop filled while nobody listened: the lookup that finds the list's
/// end carries no trades, and the close reads none (no trade reads on
/// protection's path), so the result leaves the commission out and says so
/// (`fees_complete` false). The stream's report of the trade, later,
/// recounts it once, however often it comes.
#[tokio::test]
async fn a_stop_learnt_by_lookup_closes_incomplete_until_its_trade_comes() {
    let mut config = ProtectionConfig::DEFAULT;
    config.split = Decimal::ONE;
    let w = world(config).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Direct)
        .await
        .unwrap();
    w.exchange.set_leg_commission(Some((dec!(0.0985), "USDT")));
    let list = w.exchange.open_lists()[0].request.ids.list.clone();
    w.exchange.fill_stop(list.as_str());
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        w.protector.refresh_leg(&creds, &leg).await.unwrap();
    }
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(report.outcome, ProtectOutcome::Nothing(Idle::Settled));
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    // Sold 1 at 98.5 after buying at 100; the commission is not known yet.
    assert_eq!(entry.realized_quote, Some(dec!(-1.5)));
    assert!(!entry.fees_complete, "a sale learnt without its trades");
    let leg = w.store.legs(id).await.unwrap().remove(0);
    assert!(leg.trades.stop_loss_qty.is_zero(), "{:?}", leg.trades);

    // The stream's update of the trade comes after, twice.
    let order = w
        .exchange
        .query_order(&creds, "BTCUSDT", leg.ids.stop_loss.as_str())
        .await
        .unwrap();
    let trade = order.fills[0].clone();
    let update = oco_core::ports::ExecutionUpdate {
        symbol: "BTCUSDT".into(),
        client_id: leg.ids.stop_loss.as_str().into(),
        order_id: order.order_id,
        list_id: 1,
        side: oco_core::ports::Side::Sell,
        order_type: "STOP_LOSS_LIMIT".into(),
        execution: "TRADE".into(),
        status: EntryStatus::Filled,
        executed_qty: order.executed_qty,
        cumulative_quote: order.cumulative_quote,
        fill: Some(trade),
        expiry_reason: None,
        event_time: Millis(999_900),
    };
    for _ in 0..2 {
        w.protector
            .follow(w.account, &update, Source::Websocket)
            .await
            .unwrap();
    }
    let entry = w.store.entry(id).await.unwrap();
    // Charged 0.0985 USDT, once.
    assert_eq!(entry.realized_quote, Some(dec!(-1.5985)), "counted once");
    assert!(entry.fees_complete, "the stream delivered the trade");
    let recounts = w
        .store
        .events(id)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "realized")
        .count();
    assert_eq!(recounts, 1, "recounted once");
}

#[tokio::test]
async fn an_exit_at_market_counts_its_commission() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange.set_leg_commission(Some((dec!(0.098), "USDT")));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(matches!(entry.protection, Protection::Exited { .. }));
    // Sold 1 at 98 for 100, charged 0.098 USDT (the FULL answer's trade).
    assert_eq!(entry.realized_quote, Some(dec!(-2.098)));
    assert!(entry.fees_complete, "the FULL answer carried the trades");
}

#[tokio::test]
async fn a_claimant_that_died_mid_replacement_leaves_nothing_uncovered() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    // A second caller claimed generation 1, canceled both lists, and died before
    // recording the cancels or placing anything.
    let legs = w.store.legs(id).await.unwrap();
    for leg in &legs {
        w.exchange.cancel_externally(leg.ids.list.as_str());
    }
    let key = oco_core::LegKey {
        generation: 1,
        ..legs[0].key
    };
    let claim = oco_core::model::LegClaim {
        key,
        ids: oco_core::IdScheme::new("og").unwrap().oco(key).unwrap(),
        symbol: "BTCUSDT".into(),
        qty: legs[0].qty,
        take_profit: legs[0].take_profit,
        stop: legs[0].stop,
        stop_limit: legs[0].stop_limit,
        source: Source::Sync,
        at: w.clock.now(),
    };
    assert!(w.store.claim_leg(&claim).await.unwrap());
    w.clock.advance(Duration::from_secs(31));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(1), "the whole position has a stop again");
}

#[tokio::test]
async fn dust_left_after_the_legs_sold_out_closes_the_entry() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // 0.2 bought less a 0.000205 base fee: 0.199795 held, which floors to 0.19979
    // on the 0.00001 step, so 0.000005 stays behind once the legs sell.
    w.credit(dec!(0.199795));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(0.2), dec!(100), dec!(0.000205), "BTC")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
        w.protector.refresh_leg(&creds, &leg).await.unwrap();
    }
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(report.outcome, ProtectOutcome::Nothing(Idle::Settled));
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(
        entry.protection,
        Protection::Closed,
        "closed, not unprotectable"
    );
    assert!(entry.realized_quote.is_some());
}

#[tokio::test]
async fn a_market_past_one_target_exits_that_part_and_keeps_the_other_stop() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    // Between the targets (+1 % and +2 % of 100): the first leg's list is refused.
    w.exchange.set_price("BTCUSDT", p(dec!(101.5)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.open_lists().len(), 1, "the accepted list stays");
    assert_eq!(w.open_qty(), dec!(0.5), "half still has its stop");
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0), dec!(0.5)),
        "the refused half was sold at market"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
    // The next call sees the rest covered: no churn of new generations.
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Covered));
    assert_eq!(w.exchange.oco_calls(), 2);
}

#[tokio::test]
async fn a_fill_recorded_while_the_legs_are_placed_is_covered_in_the_same_call() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    let part = first_part();
    let rest = whole_after_part();
    // Another layer records the rest of the fill while the first list goes out.
    w.record_before_next_oco(id, rest, dec!(0.6));

    let report = w
        .protector
        .protect(id, Some(&part), Source::Websocket)
        .await
        .unwrap();

    // The outcomes' write answered the entry with the second fill in it: the
    // 0.4 lists were replaced by lists of the whole 1.0 before returning.
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { replaced: 2, .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(1));
}

#[tokio::test]
async fn a_level_rounded_onto_the_fill_moves_a_tick_out_and_is_not_sold_at_market() {
    let w = world(ProtectionConfig::DEFAULT).await;
    // A tick of 2 at a price of 100: +1 % rounds down onto the fill, −1 % up onto it.
    let coarse = oco_core::symbol::SymbolRules {
        tick: oco_core::TickSize::new(dec!(2)).unwrap(),
        min_price: None,
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(coarse, p(dec!(100)));
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Direct)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0), dec!(1)),
        "nothing sold"
    );
    assert_eq!(w.open_qty(), dec!(1));
    let lists = w.exchange.open_lists();
    assert!(
        lists
            .iter()
            .all(|l| l.request.take_profit.get() == dec!(102))
    );
    assert!(lists.iter().all(|l| l.request.stop.get() == dec!(98)));
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

#[tokio::test]
async fn a_fill_under_two_ticks_is_unprotectable_not_sold_at_market() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let coarse = oco_core::symbol::SymbolRules {
        tick: oco_core::TickSize::new(dec!(2)).unwrap(),
        min_price: None,
        min_notional: dec!(0),
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(coarse, p(dec!(1.5)));
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(1.5), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Direct)
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, ProtectOutcome::Unprotectable { reason } if reason.contains("no multiple of tick 2")),
        "{report:?}"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(1), "nothing sold");
}

#[tokio::test]
async fn coins_filled_after_an_exit_are_protected() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // A resting bid part-fills while the market is under its stop: the part is exited.
    w.credit(dec!(0.4));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let part = first_part();
    let first = w
        .protector
        .protect(id, Some(&part), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Exited { .. }),
        "{first:?}"
    );
    assert!(
        w.store
            .open_entries(w.account)
            .await
            .unwrap()
            .iter()
            .any(|e| e.id == id),
        "an exited entry that can still fill stays open for sync"
    );
    // The market comes back and the rest of the order fills.
    w.exchange.set_price("BTCUSDT", p(dec!(100)));
    w.credit(dec!(0.6));
    let rest = whole_after_part();
    let second = w
        .protector
        .protect(id, Some(&rest), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(second.outcome, ProtectOutcome::Placed { .. }),
        "{second:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.6), "the later coins have their stop");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

#[tokio::test]
async fn a_fill_recorded_while_an_exit_goes_out_is_not_left_bare() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let part = first_part();
    let rest = whole_after_part();
    // Another layer records the rest while this call's lists are refused and
    // its exit of the first part goes out.
    w.record_before_next_oco(id, rest, dec!(0.6));
    let report = w
        .protector
        .protect(id, Some(&part), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0), dec!(0)),
        "the later 0.6 is exited too, not held without a stop"
    );
}

#[tokio::test]
async fn an_exit_that_expires_short_does_not_settle_the_entry() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let exited = |e: &oco_core::model::Entry| matches!(e.protection, Protection::Exited { .. });
    // No liquidity in the exit's price range: it expires with nothing sold.
    w.exchange.set_market_depth("BTCUSDT", Some(q(dec!(0))));
    let none = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(none.outcome, ProtectOutcome::Failed { .. }),
        "{none:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(!exited(&entry), "{:?}", entry.protection);
    assert!(
        w.store
            .open_entries(w.account)
            .await
            .unwrap()
            .iter()
            .any(|e| e.id == id),
        "sync still sees it"
    );
    // Some liquidity: part of it sells, the rest expires.
    w.exchange.set_market_depth("BTCUSDT", Some(q(dec!(0.4))));
    let part = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(part.outcome, ProtectOutcome::Failed { .. }),
        "{part:?}"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0.6));
    assert!(!exited(&w.store.entry(id).await.unwrap()));
    // The next call exits what is left, and only that.
    w.exchange.set_market_depth("BTCUSDT", None);
    let rest = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(rest.outcome, ProtectOutcome::Exited { .. }),
        "{rest:?}"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0), dec!(0)));
    assert!(exited(&w.store.entry(id).await.unwrap()));
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Settled));
}

/// Sync replaces the first fill's legs for a second fill while the gateway
/// records a third. The gateway's store read the legs before writing the fill
/// (as `PgStore` does) and saw sync's claim; sync's re-read after placing came
/// before the gateway's write. The third fill must still get its stop.
#[tokio::test]
async fn a_fill_written_behind_a_replacement_is_covered() {
    use std::sync::Arc;

    use oco_core::ids::IdScheme;
    use oco_core::model::{EntryKind, EntryTags, NewEntry, OrderSize};
    use oco_core::ports::{ApiCredentials, NewAccount};
    use oco_core::protect::{Protector, ProtectorConfig};
    use oco_core::testing::btcusdt_rules;
    use secrecy::SecretString;

    let w = world(ProtectionConfig::DEFAULT).await;
    let store = gated::gated();
    let account = store
        .create_account(NewAccount {
            owner: "alice".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: KEY.into(),
                secret: SecretString::from("s"),
            },
            protection: ProtectionConfig::DEFAULT,
        })
        .await
        .unwrap()
        .id;
    let ids = IdScheme::new("og").unwrap();
    let id = store
        .create_entry(
            NewEntry {
                account,
                symbol: btcusdt_rules().symbol,
                kind: EntryKind::Market,
                size: OrderSize::Base(q(dec!(1))),
                levels: EntryLevels::default(),
                tags: EntryTags::default(),
                idempotency_key: None,
            },
            &move |id| ids.entry(id).unwrap(),
            w.clock.now(),
        )
        .await
        .unwrap()
        .id;
    let protector = Arc::new(Protector::new(
        w.exchange.clone(),
        store.clone(),
        w.clock.clone(),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    ));
    let fills = |n: usize, status| {
        let all = [
            (1, dec!(0.4), dec!(100), dec!(0), "BNB"),
            (2, dec!(0.3), dec!(100), dec!(0), "BNB"),
            (3, dec!(0.3), dec!(100), dec!(0), "BNB"),
        ];
        evidence(status, &all[..n])
    };
    w.credit(dec!(0.4));
    protector
        .protect(
            id,
            Some(&fills(1, EntryStatus::PartiallyFilled)),
            Source::Websocket,
        )
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0.4));

    // Sync's new generation goes out; the gateway reads the legs (sync's
    // claim in flight) and is held before its write until sync is done.
    w.credit(dec!(0.6));
    let (open, gate) = tokio::sync::oneshot::channel();
    *store.hooks().gate.lock().unwrap() = Some(gate);
    let gateway = Arc::new(std::sync::Mutex::new(None));
    let (gw_store, gw_protector, gw_task) = (store.clone(), protector.clone(), gateway.clone());
    let third = fills(3, EntryStatus::Filled);
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            let task = tokio::spawn(async move {
                gw_protector
                    .protect_seen(account, id, "BTCUSDT", &third, Source::Websocket)
                    .await
            });
            *gw_task.lock().unwrap() = Some(task);
            gw_store.hooks().read.notified().await;
        })
    });
    let sync = protector
        .protect(
            id,
            Some(&fills(2, EntryStatus::PartiallyFilled)),
            Source::Sync,
        )
        .await
        .unwrap();
    assert!(
        matches!(sync.outcome, ProtectOutcome::Placed { .. }),
        "{sync:?}"
    );
    open.send(()).unwrap();
    let task = gateway.lock().unwrap().take().unwrap();
    let gateway = task.await.unwrap().unwrap().unwrap();

    assert_ne!(
        gateway.outcome,
        ProtectOutcome::Nothing(Idle::InFlight),
        "the claim the gateway saw was done before its write"
    );
    assert_eq!(w.open_qty(), dec!(1), "every filled coin has its stop");
}

#[tokio::test]
async fn a_later_fill_whose_levels_are_passed_is_not_called_covered() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let own = EntryLevels {
        tp1: Some(p(dec!(101))),
        tp2: None,
        sl: Some(p(dec!(99))),
    };
    let id = w.entry(own).await;
    w.credit(dec!(0.4));
    let part = first_part();
    w.protector
        .protect(id, Some(&part), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0.4));
    // The rest fills higher: the average (101.2) is past the entry's own target.
    w.exchange.set_price("BTCUSDT", p(dec!(102)));
    w.credit(dec!(0.6));
    let rest = evidence(
        EntryStatus::Filled,
        &[
            (1, dec!(0.4), dec!(100), dec!(0), "BNB"),
            (2, dec!(0.6), dec!(102), dec!(0), "BNB"),
        ],
    );
    let report = w
        .protector
        .protect(id, Some(&rest), Source::Websocket)
        .await
        .unwrap();
    assert_ne!(report.outcome, ProtectOutcome::Nothing(Idle::Covered));
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0), dec!(0.4)),
        "the uncovered 0.6 is sold, the covered 0.4 keeps its list"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

#[tokio::test]
async fn a_later_fill_that_cannot_be_planned_is_not_called_covered() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    let part = first_part();
    w.protector
        .protect(id, Some(&part), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0.4));
    // The symbol stops taking OCO lists before the rest fills.
    let closed = oco_core::symbol::SymbolRules {
        oco_allowed: false,
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(closed, p(dec!(100)));
    w.credit(dec!(0.6));
    let rest = whole_after_part();
    let report = w
        .protector
        .protect(id, Some(&rest), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, ProtectOutcome::Unprotectable { reason } if reason.contains("OCO")),
        "{report:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Unprotectable { .. }),
        "{:?}",
        entry.protection
    );
}

/// The lists open on the exchange, by generation (the last part of the id).
fn open_generations(w: &World) -> Vec<String> {
    let mut gens: Vec<String> = w
        .exchange
        .open_lists()
        .iter()
        .filter_map(|l| {
            l.request
                .ids
                .list
                .as_str()
                .rsplit('-')
                .next()
                .map(str::to_owned)
        })
        .collect();
    gens.sort();
    gens.dedup();
    gens
}

/// A claimant held up inside its send for longer than the claim timeout (a
/// node-wide rate-limit pause) while another caller takes the stale claim
/// over and places the next generation: the late list is withdrawn, never
/// kept beside the other.
#[tokio::test]
async fn a_slow_claimant_and_a_takeover_never_both_place() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    // Other coins of the same asset on the account (another entry's, the user's).
    w.credit(dec!(5));
    w.store.record_evidence(id, &full_fill()).await.unwrap();
    let (clock, other) = (w.clock.clone(), w.protector.clone());
    let taker = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = taker.clone();
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            clock.advance(Duration::from_secs(31));
            let r = other.protect(id, None, Source::Websocket).await.unwrap();
            *seen.lock().unwrap() = Some(r.outcome);
        })
    });
    let slow = w.protector.protect(id, None, Source::Sync).await.unwrap();
    let taker = taker.lock().unwrap().clone();
    assert!(
        matches!(taker, Some(ProtectOutcome::Placed { .. })),
        "{taker:?}"
    );
    assert!(
        !matches!(slow.outcome, ProtectOutcome::Placed { .. }),
        "the slow claimant must not report its taken claim placed: {slow:?}"
    );
    assert_eq!(
        w.open_qty(),
        dec!(0.999),
        "lists: {:?}",
        w.exchange.open_lists()
    );
    assert_eq!(open_generations(&w), ["1"], "one set of lists, the taker's");
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        matches!(legs[0].state, LegState::NotPlaced { .. })
            && matches!(legs[1].state, LegState::Placed { .. }),
        "{legs:?}"
    );
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Covered));
}

/// A replacement held up canceling the list it replaces for longer than the
/// claim timeout fences its claim before it sends: a caller arriving while it
/// sends finds the claim fresh and leaves it alone, though it was claimed
/// long ago.
#[tokio::test]
async fn a_fenced_claim_is_not_taken_over() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    // Coins held for other reasons, which a second set of legs would lock and sell.
    w.credit(dec!(5));
    let part = first_part();
    w.protector
        .protect(id, Some(&part), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(open_generations(&w), ["0"]);
    w.credit(dec!(0.6));
    let rest = whole_after_part();
    w.store.record_evidence(id, &rest).await.unwrap();
    // Generation 1 is claimed; the cancel of generation 0 waits 31 s.
    let clock = w.clock.clone();
    w.exchange.before_next_cancel(move || {
        Box::pin(async move { clock.advance(Duration::from_secs(31)) })
    });
    // Then, while generation 1 is on its way out, another caller comes.
    let (clock, other) = (w.clock.clone(), w.protector.clone());
    let taker = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = taker.clone();
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            clock.advance(Duration::from_secs(5));
            let r = other.protect(id, None, Source::Websocket).await.unwrap();
            *seen.lock().unwrap() = Some(r.outcome);
        })
    });
    let replacing = w.protector.protect(id, None, Source::Sync).await.unwrap();
    let taker = taker.lock().unwrap().clone();
    assert_eq!(
        taker,
        Some(ProtectOutcome::Nothing(Idle::InFlight)),
        "the fenced claim is in flight, not abandoned"
    );
    assert!(
        matches!(replacing.outcome, ProtectOutcome::Placed { .. }),
        "{replacing:?}"
    );
    assert_eq!(open_generations(&w), ["1"], "{:?}", w.exchange.open_lists());
    assert_eq!(w.open_qty(), dec!(1));
}

/// Sells `qty` BTC at market with the exit client id of `key`, as `late`
/// does, and claims the exit leg as `late` claims it.
async fn exit_sent_then_crashed(w: &World, key: oco_core::LegKey, qty: Decimal) {
    use oco_core::ports::{ApiCredentials, Exchange, OrderRequest, Side};
    let ids = oco_core::IdScheme::new("og").unwrap();
    let exit = ids.exit(key).unwrap();
    let claim = oco_core::model::LegClaim {
        key,
        ids: oco_core::ids::OcoClientIds {
            list: exit.clone(),
            ..ids.oco(key).unwrap()
        },
        symbol: "BTCUSDT".into(),
        qty: q(qty),
        take_profit: p(dec!(100)),
        stop: p(dec!(100)),
        stop_limit: None,
        source: Source::Sync,
        at: w.clock.now(),
    };
    assert!(w.store.claim_leg(&claim).await.unwrap());
    let creds = ApiCredentials {
        api_key: KEY.into(),
        secret: secrecy::SecretString::from("s"),
    };
    w.exchange
        .place_order(
            &creds,
            &OrderRequest {
                symbol: "BTCUSDT".into(),
                side: Side::Sell,
                limit: None,
                size: oco_core::model::OrderSize::Base(q(qty)),
                client_id: exit,
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_exit_whose_answer_and_first_lookup_are_lost_sells_once() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.credit(dec!(5)); // held for other reasons: a second exit would sell them
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.exchange.push_order_fault(OcoFault::UnknownAfterApply);
    w.exchange.lag_next_lookups(1);
    let first = w
        .protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Pending { ref legs } if legs.len() == 1),
        "{first:?}"
    );
    let exits = w.exits(id).await;
    assert!(
        exits.len() == 1 && exits[0].state == LegState::Unknown,
        "{exits:?}"
    );
    w.clock.advance(Duration::from_secs(1));
    let second = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(second.outcome, ProtectOutcome::Nothing(Idle::Settled));
    assert_eq!(w.exchange.market_sells().len(), 1, "sold once");
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(5));
    let exits = w.exits(id).await;
    assert_eq!(exits.len(), 1, "no second exit claimed: {exits:?}");
    assert_eq!(exits[0].sold.total(), q(dec!(1)));
    w.clock.advance(Duration::from_secs(60));
    let later = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(later.outcome, ProtectOutcome::Nothing(Idle::Settled));
    assert_eq!(w.exchange.market_sells().len(), 1, "still sold once");
}

#[tokio::test]
async fn an_exit_sent_before_a_crash_is_adopted_not_sold_again() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.credit(dec!(5)); // held for other reasons: a second exit would sell them
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.store.record_evidence(id, &ev).await.unwrap();
    let key = oco_core::LegKey {
        entry: id,
        leg: oco_core::ids::LegIndex::First,
        generation: 0,
    };
    // The exit went out; its claimant died before recording it.
    exit_sent_then_crashed(&w, key, dec!(1)).await;
    w.clock.advance(Duration::from_secs(31));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(report.outcome, ProtectOutcome::Nothing(Idle::Settled));
    assert_eq!(w.exchange.market_sells().len(), 1, "sold once");
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(5));
    let exits = w.exits(id).await;
    assert_eq!(exits.len(), 1, "no second exit claimed: {exits:?}");
    assert_eq!(exits[0].sold.total(), q(dec!(1)));
    assert!(
        matches!(
            w.store.entry(id).await.unwrap().protection,
            Protection::Closed
        ),
        "the exit's coins are sold: the entry is closed"
    );
}

/// A market exit whose answer was lost and which, looked up by a later call,
/// had sold only part (Binance expires what its price range cannot fill): the
/// entry is not called exited while coins remain, and later calls sell them.
#[tokio::test]
async fn an_exit_found_short_by_its_lookup_leaves_the_rest_to_the_next_calls() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    // Under the stop: the late policy exits at market; the book takes 0.4 at a time.
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange.set_market_depth("BTCUSDT", Some(q(dec!(0.4))));
    w.exchange.push_order_fault(OcoFault::UnknownAfterApply);
    w.exchange.lag_next_lookups(1);
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let first = w
        .protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Pending { .. }),
        "{first:?}"
    );

    w.clock.advance(Duration::from_secs(1));
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        !matches!(entry.protection, Protection::Exited { .. }),
        "0.6 still held: {:?}",
        entry.protection
    );
    assert!(
        w.store
            .open_entries(w.account)
            .await
            .unwrap()
            .iter()
            .any(|e| e.id == id),
        "sync still sees the entry"
    );
    for _ in 0..3 {
        if w.exchange.balance(KEY, "BTC").0.is_zero() {
            break;
        }
        w.clock.advance(Duration::from_secs(1));
        w.protector.protect(id, None, Source::Sync).await.unwrap();
    }
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0), "every coin sold");
    assert_eq!(w.exchange.market_sells().len(), 3, "0.4, 0.4, 0.2");
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Exited { .. }
    ));
}

/// A list placed under a claim that a later caller took over (its lookup
/// lagged past the claim timeout) locks the coins: the taker's own list is
/// refused for balance and finds nothing free. That is not a sale: the list
/// is found open on the exchange and adopted, and the entry stays protected
/// by it; later calls place nothing more.
#[tokio::test]
async fn a_list_no_leg_follows_is_adopted_not_taken_for_a_sale() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.store.record_evidence(id, &full_fill()).await.unwrap();
    w.exchange.push_oco_fault(OcoFault::UnknownAfterApply);
    w.exchange.lag_next_lookups(1);
    let first = w
        .protector
        .protect(id, None, Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Pending { .. }),
        "{first:?}"
    );
    w.clock.advance(Duration::from_secs(31));
    w.exchange.lag_next_lookups(1);
    let second = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(
        second.outcome,
        ProtectOutcome::Nothing(Idle::Covered),
        "{second:?}"
    );
    let stray = w.exchange.open_lists();
    assert_eq!(stray.len(), 1, "the first list, still open");
    let legs = w.store.legs(id).await.unwrap();
    let adopted = legs
        .iter()
        .find(|l| l.ids.list == stray[0].request.ids.list)
        .unwrap();
    assert_eq!(
        adopted.state,
        LegState::Placed {
            list_id: stray[0].list_id
        }
    );
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    let sent = w.exchange.oco_calls();
    let third = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(third.outcome, ProtectOutcome::Nothing(Idle::Covered));
    assert_eq!(w.exchange.oco_calls(), sent, "nothing sent again");
}

/// Coins sold outside ocoguard before it protected them: the placement is
/// refused for balance, no list of the entry is open, and the entry is
/// closed once; later calls send nothing.
#[tokio::test]
async fn coins_sold_outside_before_protection_close_the_entry_once() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // Filled, and the coins already gone (sold by hand): nothing credited.
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Sync)
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        ProtectOutcome::Nothing(Idle::Settled),
        "{report:?}"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Closed
    );
    let sent = w.exchange.oco_calls();
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(w.exchange.oco_calls(), sent, "a closed entry sends nothing");
    assert!(w.exchange.open_lists().is_empty());
}

#[tokio::test]
async fn a_late_exit_refused_under_the_min_notional_is_recorded_once() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // 0.06 bought at 100 (notional 6); the market fell to 80, past the stop:
    // the exchange refuses a market exit worth 4.8, under BTCUSDT's minimum of 5.
    w.credit(dec!(0.06));
    w.exchange.set_price("BTCUSDT", p(dec!(80)));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(0.06), dec!(100), dec!(0), "BNB")],
    );
    // The reason holds the quantity and the minimum, never a live price.
    let said = |reason: &str| {
        reason.contains("exit of 0.06 refused under min notional 5") && !reason.contains("80")
    };
    let first = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Unprotectable { ref reason } if said(reason)),
        "{first:?}"
    );
    assert_eq!(w.exchange.order_calls(), 1, "the exchange decides");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Unprotectable { ref reason } if said(reason)),
        "{:?}",
        entry.protection
    );
    // Sync comes back every interval: the exit is sent again (the price may
    // have risen), and the same refusal writes nothing new.
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(again.outcome, ProtectOutcome::Unprotectable { ref reason } if said(reason)),
        "{again:?}"
    );
    assert_eq!(w.exchange.order_calls(), 2);
    let events = w.store.events(id).await.unwrap();
    assert_eq!(
        events.iter().filter(|e| e.kind == "unprotectable").count(),
        1,
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| e.kind == "exit_failed"),
        "{events:?}"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0.06), "nothing sold");
    // Once the price lets it pass, the same call exits.
    w.exchange.set_price("BTCUSDT", p(dec!(90)));
    let exited = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(exited.outcome, ProtectOutcome::Exited { .. }),
        "{exited:?}"
    );
}

#[tokio::test]
async fn coins_over_what_max_qty_lists_hold_are_recorded_not_called_covered() {
    let (w, id, ev) = one_bought_under_max_qty(dec!(0.3), dec!(100)).await;
    let first = w
        .protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Placed { ref legs, .. } if legs.len() == 2),
        "{first:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.6), "two lists of maxQty each");
    let said =
        |reason: &str| reason.contains("maxQty 0.3") && reason.contains("0.4 left without a stop");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Unprotectable { ref reason } if said(reason)),
        "{:?}",
        entry.protection
    );
    // Later calls neither churn the lists nor call the entry covered.
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(again.outcome, ProtectOutcome::Unprotectable { ref reason } if said(reason)),
        "{again:?}"
    );
    assert_eq!(w.exchange.oco_calls(), 2);
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Unprotectable { .. }),
        "{:?}",
        entry.protection
    );
    let events = w.store.events(id).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "unprotectable" && said(&e.detail))
            .count(),
        1,
        "{events:?}"
    );
    // The coins no list could hold are sold by hand: the label goes with them.
    w.exchange.set_free(KEY, "BTC", dec!(0));
    let sold = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(
        sold.outcome,
        ProtectOutcome::Nothing(Idle::Covered),
        "{sold:?}"
    );
    assert_eq!(w.exchange.oco_calls(), 2, "the lists stay");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

#[tokio::test]
async fn a_take_profit_rest_whose_cancel_failed_is_canceled_by_a_later_call() {
    let (w, id, first, _) = with_a_take_profit_rest(true).await;
    let orphan = |legs: &[oco_core::model::Leg]| {
        legs.iter()
            .find(|l| l.ids.list.as_str() == first)
            .map(|l| l.state.clone())
    };
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    // The free coins are held by the second list already: nothing to replace.
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { ref errors } if errors[0].contains("rest of 0.3 still open")),
        "{report:?}"
    );
    // The rest of the take-profit keeps its list executing.
    let stopped = || -> Decimal {
        w.exchange
            .open_lists()
            .iter()
            .filter(|l| l.request.ids.list.as_str() != first)
            .map(|l| l.request.qty.get())
            .sum()
    };
    assert_eq!(stopped(), dec!(0.5), "the free coins still get their stop");
    let events = w.store.events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "take_profit_cancel_failed" && e.detail.contains("rate limited")),
        "{events:?}"
    );
    assert_eq!(
        orphan(&w.store.legs(id).await.unwrap()),
        Some(LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial
        }),
        "left for the next call"
    );
    // The exchange answers again: the next call cancels the rest and covers it.
    w.exchange.fail_cancels(None);
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(
        orphan(&w.store.legs(id).await.unwrap()),
        Some(LegState::Replaced)
    );
    assert_eq!(stopped(), dec!(0.8));
    assert_eq!(w.open_qty(), dec!(0.8), "no rest of a take-profit rests");
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0), dec!(0.8)));
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(again.outcome, ProtectOutcome::Nothing(Idle::Covered));
}

/// An entry of 1 with its two lists, the first of which sold 0.2 at its
/// target and rests with 0.3 (recorded `take_profit_partial`, its sale
/// read or not).
async fn with_a_take_profit_rest(read_sale: bool) -> (World, EntryId, String, String) {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    let lists = w.exchange.open_lists();
    let first = lists[0].request.ids.list.to_string();
    let second = lists[1].request.ids.list.to_string();
    w.exchange.fill_take_profit(&first, q(dec!(0.2)));
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        if read_sale {
            w.protector.refresh_leg(&creds, &leg).await.unwrap();
        } else if leg.ids.list.as_str() == first {
            let rest = LegState::CanceledExternally {
                why: ExternalEnd::TakeProfitPartial,
            };
            assert!(w.protector.transition_leg(&leg, rest).await.unwrap());
        }
    }
    (w, id, first, second)
}

/// List `list` of entry `id` canceled by hand on the exchange, and the legs
/// refreshed from it (as the stream or sync would record it).
async fn cancel_by_hand(w: &World, id: EntryId, list: &str) {
    w.exchange.cancel_externally(list);
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        w.protector.refresh_leg(&creds, &leg).await.unwrap();
    }
}

#[tokio::test]
async fn a_take_profit_rest_whose_list_is_not_found_after_its_cancel_keeps_its_leg() {
    let (w, id, first, _) = with_a_take_profit_rest(false).await;
    let leg_of = |legs: Vec<oco_core::model::Leg>| {
        legs.into_iter()
            .find(|l| l.ids.list.as_str() == first)
            .unwrap()
    };
    // The cancel goes through; the list's lookup lags and answers not found.
    w.exchange.lag_next_lookups(1);
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let leg = leg_of(w.store.legs(id).await.unwrap());
    assert_eq!(
        leg.state,
        LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial
        },
        "left for the next call to read"
    );
    let events = w.store.events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "take_profit_cancel_failed" && e.detail.contains("not found")),
        "{events:?}"
    );
    // Its sale unread, the rest may have sold its coins: they are not
    // planned until it is read (lists over them could lock another entry's).
    assert_eq!(w.open_qty(), dec!(0.5), "only the second list's coins");
    // The next call finds the list, records its sale and covers the rest.
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let leg = leg_of(w.store.legs(id).await.unwrap());
    assert_eq!(leg.state, LegState::Replaced);
    assert_eq!(leg.sold.take_profit, q(dec!(0.2)), "the sale is kept");
    assert_eq!(w.open_qty(), dec!(0.8));
}

#[tokio::test]
async fn coins_of_another_entry_are_not_covered_while_a_rest_stays_open() {
    let (w, id, first, second) = with_a_take_profit_rest(true).await;
    // The second list is canceled by hand: 0.5 free, 0.3 locked by the rest.
    cancel_by_hand(&w, id, &second).await;
    // Another entry's 0.4 of the same coin, free and not yet protected.
    w.credit(dec!(0.4));
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    // Lists went out over the free coins, but the rest has no stop: a
    // failure, which every layer retries, not a placement.
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { ref errors }
            if errors[0].contains("rest of 0.3 still open")),
        "{report:?}"
    );
    let new: Decimal = w
        .exchange
        .open_lists()
        .iter()
        .filter(|l| l.request.ids.list.as_str() != first)
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(new, dec!(0.5), "only the coins the rest does not lock");
    assert_eq!(
        w.exchange.balance(KEY, "BTC").0,
        dec!(0.4),
        "the other entry's coins stay free"
    );
}

#[tokio::test]
async fn a_balance_refusal_beside_an_open_rest_takes_the_rest_out_once() {
    let (w, id, first, second) = with_a_take_profit_rest(true).await;
    // The second list is canceled by hand: 0.5 free, 0.3 locked by the rest.
    cancel_by_hand(&w, id, &second).await;
    // 0.1 of it sold by hand meanwhile: the lists planned over 0.5 are
    // refused for balance, and the round re-plans from what is held.
    w.exchange.set_free(KEY, "BTC", dec!(0.4));
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let new: Decimal = w
        .exchange
        .open_lists()
        .iter()
        .filter(|l| l.request.ids.list.as_str() != first)
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(new, dec!(0.4), "every free coin gets its stop");
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0));
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected,
        "the rest's 0.3 has no stop"
    );
    // The exchange answers again: the rest goes, and all 0.7 get stops.
    w.exchange.fail_cancels(None);
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(w.open_qty(), dec!(0.7));
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}

#[tokio::test]
async fn a_replacement_refused_after_the_old_stops_went_does_not_stay_labelled_protected() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    let second = w.exchange.open_lists()[1].request.ids.list.to_string();
    // One list canceled by hand: the next call replaces the other with a
    // whole new generation, and every new list is refused.
    cancel_by_hand(&w, id, &second).await;
    for _ in 0..2 {
        w.exchange
            .push_oco_fault(OcoFault::Fail(ExchangeError::RateLimited {
                retry_after: Duration::from_secs(1),
            }));
    }
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0), "the old stops are gone");
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected
    );
}

#[tokio::test]
async fn a_replacement_stopped_by_a_failed_cancel_does_not_stay_labelled_protected() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    w.protector
        .protect(id, Some(&first_part()), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.exchange.open_lists().len(), 2);
    // The rest of the order fills: the next call replaces both lists. The
    // first cancel goes through, the second is refused.
    w.credit(dec!(0.6));
    w.exchange.push_list_cancel_fault(None);
    w.exchange
        .push_list_cancel_fault(Some(ExchangeError::RateLimited {
            retry_after: Duration::from_secs(1),
        }));
    let report = w
        .protector
        .protect(id, Some(&whole_after_part()), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.open_lists().len(), 1, "one old list is gone");
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected
    );
}

#[tokio::test]
async fn legs_refused_for_balance_together_read_the_balance_once() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // 1 bought, all of it sold by hand: both lists are refused for balance.
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0));
    // A close over owed coins reads the balance once more: it is for good.
    assert_eq!(
        w.exchange.balance_reads(),
        2,
        "one read for both refusals, one before the close"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Closed
    );
}

#[tokio::test]
async fn a_fill_recorded_after_a_balance_refusal_is_planned_in_the_same_call() {
    let single = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(single).await;
    let id = w.entry(EntryLevels::default()).await;
    // 0.4 bought, 0.3 of it still held: the first list (0.4) is refused
    // for balance and the round re-plans over 0.3. While that list goes
    // out, the rest of the order (0.6) fills and is recorded.
    w.credit(dec!(0.3));
    let (store, exchange) = (w.store.clone(), w.exchange.clone());
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            let inner = exchange.clone();
            exchange.before_next_oco(move || {
                Box::pin(async move {
                    store
                        .record_evidence(id, &whole_after_part())
                        .await
                        .unwrap();
                    let (free, _) = inner.balance(KEY, "BTC");
                    inner.set_free(KEY, "BTC", free + dec!(0.6));
                })
            });
        })
    });
    w.protector
        .protect(id, Some(&first_part()), Source::Sync)
        .await
        .unwrap();
    assert_eq!(w.open_qty(), dec!(0.9), "the new 0.6 gets its stop too");
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0));
}

#[tokio::test]
async fn a_leg_in_doubt_counts_as_held_when_a_balance_refusal_re_plans() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    // 1 bought, 0.2 of it sold by hand: the first list (0.5) goes out but
    // its answer is lost, and the second is refused for balance.
    w.credit(dec!(0.8));
    w.exchange.push_oco_fault(OcoFault::UnknownAfterApply);
    w.exchange.lag_next_lookups(1);
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(
        w.open_qty(),
        dec!(0.8),
        "every coin held gets its stop in the same call"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0));
}

#[tokio::test]
async fn lists_placed_beside_an_open_rest_after_a_lost_answer_leave_the_entry_unprotected() {
    let (w, id, _, second) = with_a_take_profit_rest(true).await;
    cancel_by_hand(&w, id, &second).await;
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    // The new list goes out but its answer is lost; the lookup finds it.
    w.exchange.push_oco_fault(OcoFault::UnknownAfterApply);
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { ref errors }
            if errors[0].contains("rest of 0.3 still open")),
        "placed beside a rest without a stop, the call is not complete: {report:?}"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected,
        "the rest's 0.3 has no stop"
    );
}

#[tokio::test]
async fn a_late_exit_over_max_qty_says_so() {
    let (w, id, ev) = one_bought_under_max_qty(dec!(0.3), dec!(80)).await;
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Unprotectable { ref reason }
            if reason.contains("over LOT_SIZE maxQty 0.3") && !reason.contains("too small")),
        "{report:?}"
    );
    assert_eq!(w.exchange.order_calls(), 0);
}

/// A caller that read no coins free (`holding` 0) leaves the close to one
/// more balance read, and coins free by then are planned. Over
/// `LOT_SIZE.maxQty` they are too large for one list, still a position:
/// closed, the entry would never be followed again.
#[tokio::test]
async fn coins_free_at_a_close_over_max_qty_are_protected_not_closed() {
    let (w, id, mut ev) = one_bought_under_max_qty(dec!(0.5), dec!(100)).await;
    ev.holding = Some(oco_core::Qty::ZERO);
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "1 free at the close, over maxQty 0.5, is a position to protect, not a reason to close: {report:?}"
    );
    assert_eq!(w.open_qty(), dec!(1));
    assert!(
        matches!(
            w.store.entry(id).await.unwrap().protection,
            Protection::Protected { .. }
        ),
        "protected, not closed"
    );
}

/// Bought 1 at 100 and protected by two lists of 0.5; the first list's
/// take-profit sells its 0.5 and the second is canceled by hand; then the
/// symbol's `NOTIONAL.maxNotional` is lowered to `max_notional`. The 0.5
/// left is what the next call protects.
async fn remainder_under_max_notional(max_notional: Decimal) -> (World, EntryId) {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(legs.len(), 2, "{legs:?}");
    let creds = w.store.credentials(w.account).await.unwrap();
    w.exchange
        .fill_take_profit(legs[0].ids.list.as_str(), legs[0].qty);
    w.protector.refresh_leg(&creds, &legs[0]).await.unwrap();
    w.exchange.cancel_externally(legs[1].ids.list.as_str());
    w.protector.refresh_leg(&creds, &legs[1]).await.unwrap();
    w.exchange.add_symbol(
        oco_core::symbol::SymbolRules {
            max_notional: Some(max_notional),
            ..oco_core::testing::btcusdt_rules()
        },
        p(dec!(100)),
    );
    (w, id)
}

/// What a list left unsold is closed as dust only when too small for any
/// list. A remainder whose lists would be over the symbol's
/// `NOTIONAL.maxNotional` (lowered since the first lists went out) is too
/// large, not dust: the plan caps each list at what `maxNotional` lets it
/// hold, and the entry is protected by such lists, never closed over coins
/// without a stop.
#[tokio::test]
async fn a_remainder_over_max_notional_is_not_closed_as_dust() {
    // 0.5 at about 100 is over a maxNotional of 40.
    let (w, id) = remainder_under_max_notional(dec!(40)).await;
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "0.5 over maxNotional is not dust: the entry must stay open and its coins get lists no larger than maxNotional allows, not be closed: {:?}",
        entry.protection
    );
    let open = w.exchange.open_lists();
    let covered: Decimal = open.iter().map(|l| l.request.qty.get()).sum();
    assert_eq!(covered, dec!(0.5), "{open:?}");
    for list in &open {
        assert!(
            list.request.qty.get() * list.request.take_profit.get() <= dec!(40),
            "{list:?}"
        );
    }
}

/// As above with a `maxNotional` so low (5, the minimum notional too) that
/// no list fits between the two: the plan answers dust although the
/// remainder is far over the minimum quantity and notional. It is a
/// position no list can hold, not dust: recorded unprotectable, on this
/// call and the next, and never closed over coins without a stop.
#[tokio::test]
async fn a_remainder_no_list_fits_under_max_notional_is_not_closed_as_dust() {
    // A list at maxNotional 5 holds 0.049 at the target (about 102),
    // worth under the minimum notional 5 at the stop's limit.
    let (w, id) = remainder_under_max_notional(dec!(5)).await;
    for _ in 0..2 {
        let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
        assert!(
            matches!(report.outcome, ProtectOutcome::Unprotectable { .. }),
            "{report:?}"
        );
        let entry = w.store.entry(id).await.unwrap();
        assert!(
            matches!(entry.protection, Protection::Unprotectable { .. }),
            "0.5 held, too large for any list: not closed as dust: {:?}",
            entry.protection
        );
    }
    assert!(w.exchange.open_lists().is_empty());
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0.5), dec!(0)));
}

/// The late exit is a MARKET order, bound by `MARKET_LOT_SIZE` as well
/// (BTCUSDT: 128.5 BTC against `LOT_SIZE`'s 9000): one over it is refused by
/// the exchange every time, so it is recorded unprotectable, never sent.
#[tokio::test]
async fn a_late_exit_over_market_max_qty_says_so() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let capped = oco_core::symbol::SymbolRules {
        market_lot_size: Some(MarketLotSize {
            min_qty: None,
            max_qty: Some(q(dec!(0.3))),
            step: None,
        }),
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(capped, p(dec!(80)));
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    for source in [Source::Websocket, Source::Sync] {
        let report = w.protector.protect(id, Some(&ev), source).await.unwrap();
        assert!(
            matches!(report.outcome, ProtectOutcome::Unprotectable { ref reason }
                if reason.contains("over MARKET_LOT_SIZE maxQty 0.3") && !reason.contains("too small")),
            "{report:?}"
        );
    }
    assert_eq!(w.exchange.order_calls(), 0);
}

/// A late exit is floored to `MARKET_LOT_SIZE.stepSize` when the symbol sets
/// one, so that the exchange takes it.
#[tokio::test]
async fn a_late_exit_is_floored_to_the_market_step() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let coarse = oco_core::symbol::SymbolRules {
        market_lot_size: Some(MarketLotSize {
            min_qty: None,
            max_qty: None,
            step: Some(oco_core::StepSize::new(dec!(0.01)).unwrap()),
        }),
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(coarse, p(dec!(80)));
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    // 1 bought, 0.00123 paid in BTC: 0.99877 held, 0.99 on the market step.
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0.00123), "BTC")],
    );
    let report = w
        .protector
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    let exits = w.exits(id).await;
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(exits[0].sold.total(), q(dec!(0.99)));
}

#[tokio::test]
async fn a_take_profit_rest_is_not_canceled_by_a_round_that_places_nothing() {
    let (w, id, first, _) = with_a_take_profit_rest(true).await;
    // The symbol's minimum notional rises past what the entry is worth: no
    // list can be planned, so canceling the rest would gain no stop.
    let dear = oco_core::symbol::SymbolRules {
        min_notional: dec!(1000),
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(dear, p(dec!(100)));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Unprotectable { .. }),
        "{report:?}"
    );
    let leg = w
        .store
        .legs(id)
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.ids.list.as_str() == first)
        .unwrap();
    assert_eq!(
        leg.state,
        LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial
        }
    );
    assert!(
        w.exchange
            .open_lists()
            .iter()
            .any(|l| l.request.ids.list.as_str() == first),
        "the take-profit rest still rests"
    );
}

#[tokio::test]
async fn an_exit_with_a_take_profit_rest_still_open_does_not_settle_the_entry() {
    let (w, id, first, second) = with_a_take_profit_rest(true).await;
    // The second list is canceled by hand and the market falls past the stop:
    // its 0.5 is free, the rest still locks 0.3, and its cancel fails.
    cancel_by_hand(&w, id, &second).await;
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { ref errors } if errors[0].contains("take-profit rest is still open")),
        "{report:?}"
    );
    assert_eq!(w.exchange.market_sells().len(), 1, "the free 0.5 was sold");
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected,
        "an entry whose rest holds coins without a stop stays followed, and says so"
    );
    // The exchange answers again: the rest is canceled, its coins exit too.
    w.exchange.fail_cancels(None);
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    assert!(
        !w.exchange
            .open_lists()
            .iter()
            .any(|l| l.request.ids.list.as_str() == first),
        "the rest is gone"
    );
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Exited { .. }
    ));
}

/// One entry's list that no live leg follows (its withdrawal failed, the leg
/// reads `not_placed`) still locks coins, so the entry's next generation is
/// placed over another entry's free coins. That entry's own placement is then
/// refused for balance and finds nothing free: not a sale. It is not closed,
/// and the call names the list.
#[tokio::test]
async fn coins_a_list_no_live_leg_follows_may_hold_do_not_close_another_entry() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let a = w.entry(EntryLevels::default()).await;
    let b = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let filled = |trade, qty| {
        evidence(
            EntryStatus::Filled,
            &[(trade, qty, dec!(100), dec!(0), "BNB")],
        )
    };
    w.protector
        .protect(a, Some(&filled(1, dec!(1))), Source::Websocket)
        .await
        .unwrap();
    let legs = w.store.legs(a).await.unwrap();
    assert_eq!(legs.len(), 2);
    let stranded = legs[0].clone();
    assert!(
        w.store
            .update_leg(&oco_core::model::LegUpdate {
                key: stranded.key,
                from: "placed",
                to: LegState::NotPlaced {
                    code: None,
                    reason: "withdrawal failed".into(),
                },
                error: None,
                at: w.clock.now(),
            })
            .await
            .unwrap()
    );
    // B's coins arrive; A's next call covers its whole position again, over them.
    w.credit(dec!(0.5));
    w.store
        .record_evidence(b, &filled(2, dec!(0.5)))
        .await
        .unwrap();
    w.protector.protect(a, None, Source::Sync).await.unwrap();
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0), "nothing free");
    let lists = w.exchange.open_lists().len();

    let report = w
        .protector
        .protect(b, None, Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { ref errors } if errors[0].contains(stranded.ids.list.as_str())),
        "{report:?}"
    );
    assert_eq!(
        w.store.entry(b).await.unwrap().protection,
        Protection::Unprotected,
        "not closed as sold"
    );
    assert_eq!(w.exchange.open_lists().len(), lists, "no list touched");
    // Said once in the entry's history, however often it is retried.
    w.protector.protect(b, None, Source::Sync).await.unwrap();
    let said = w
        .store
        .events(b)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.kind == "coins_held_by_stray" && e.detail.contains(stranded.ids.list.as_str())
        })
        .count();
    assert_eq!(said, 1);
}

#[tokio::test]
async fn an_exit_found_by_lookup_with_a_take_profit_rest_open_does_not_settle_the_entry() {
    let (w, id, _, second) = with_a_take_profit_rest(true).await;
    cancel_by_hand(&w, id, &second).await;
    // Past the stop, the rest's cancel failing; the exit's answer is lost.
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    w.exchange.push_order_fault(OcoFault::UnknownAfterApply);
    w.exchange.lag_next_lookups(1);
    let first = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Pending { .. }),
        "{first:?}"
    );
    // The next call finds the exit sold: the rest still holds coins without a stop.
    w.clock.advance(Duration::from_secs(1));
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(w.exchange.market_sells().len(), 1, "sold once");
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected,
        "followed until the rest is gone"
    );
}

#[tokio::test]
async fn coins_held_only_by_the_entrys_own_take_profit_rest_do_not_close_it() {
    let (w, id, first, second) = with_a_take_profit_rest(true).await;
    // The second list is canceled by hand and its 0.5 sold by hand: only the
    // rest's 0.3 is left, locked, and its cancel fails.
    cancel_by_hand(&w, id, &second).await;
    let (free, _) = w.exchange.balance(KEY, "BTC");
    w.exchange.set_free(KEY, "BTC", free - dec!(0.5));
    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { ref errors } if errors[0].contains("rest of 0.3 still open")),
        "{report:?}"
    );
    assert_eq!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Unprotected,
        "not closed while its rest holds coins"
    );
    // The exchange answers again: the rest goes, its coins get a stop.
    w.exchange.fail_cancels(None);
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        !w.exchange
            .open_lists()
            .iter()
            .any(|l| l.request.ids.list.as_str() == first)
    );
    assert_eq!(w.open_qty(), dec!(0.3));
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}

#[tokio::test]
async fn another_entrys_take_profit_rest_is_no_stray() {
    let (w, _, _, _) = with_a_take_profit_rest(true).await;
    // Another entry filled, its coins sold by hand before it was protected:
    // nothing free, and the only lists are the first entry's (one a rest).
    let other = w.entry(EntryLevels::default()).await;
    let ev = evidence(
        EntryStatus::Filled,
        &[(9, dec!(0.5), dec!(100), dec!(0), "BNB")],
    );
    let report = w
        .protector
        .protect(other, Some(&ev), Source::Sync)
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        ProtectOutcome::Nothing(Idle::Settled),
        "{report:?}"
    );
    assert_eq!(
        w.store.entry(other).await.unwrap().protection,
        Protection::Closed
    );
}

/// 1 BTC bought at 100 and held, on BTCUSDT with `LOT_SIZE.maxQty` `max`
/// and the market at `price`: the world, the entry and its fill (unrecorded).
async fn one_bought_under_max_qty(
    max: Decimal,
    price: Decimal,
) -> (World, EntryId, oco_core::model::Evidence) {
    let w = world(ProtectionConfig::DEFAULT).await;
    let capped = oco_core::symbol::SymbolRules {
        max_qty: Some(q(max)),
        ..oco_core::testing::btcusdt_rules()
    };
    w.exchange.add_symbol(capped, p(price));
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let ev = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    (w, id, ev)
}

/// Lists that cover the position keep the entry protected when no new plan
/// can be made (here the minimum notional rose past what the position is
/// worth): a label an earlier call left `unprotected` is set right, credited
/// to the layer that placed the lists, rather than raise an alert for a
/// covered entry.
#[tokio::test]
async fn covering_lists_set_a_lagging_label_right_when_no_plan_can_be_made() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let first = w
        .protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Placed { .. }),
        "{first:?}"
    );
    w.store
        .set_protection(id, &Protection::Unprotected)
        .await
        .unwrap();
    let mut rules = oco_core::testing::btcusdt_rules();
    rules.min_notional = dec!(1000);
    w.exchange.add_symbol(rules, p(dec!(100)));
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(
        again.outcome,
        ProtectOutcome::Nothing(Idle::Covered),
        "{again:?}"
    );
    assert_eq!(w.exchange.open_lists().len(), 2, "the lists stay");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(
            entry.protection,
            Protection::Protected {
                by: Source::Websocket,
                ..
            }
        ),
        "{:?}",
        entry.protection
    );
}

/// The slow claimant of `a_slow_claimant_and_a_takeover_never_both_place`,
/// but the taker's list is refused and so is the claimant's next generation:
/// the claimant's outcome write labelled the entry protected counting the
/// list it then withdrew, and that label must not stay on an entry with
/// nothing on the book.
#[tokio::test]
async fn a_withdrawn_list_does_not_leave_the_entry_labelled_protected() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.store.record_evidence(id, &full_fill()).await.unwrap();
    let refused = || {
        OcoFault::Fail(ExchangeError::Rejected {
            code: -1013,
            msg: "Filter failure: PRICE_FILTER".into(),
        })
    };
    let (clock, other, exchange) = (w.clock.clone(), w.protector.clone(), w.exchange.clone());
    let taker = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = taker.clone();
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            clock.advance(Duration::from_secs(31));
            exchange.push_oco_fault(refused());
            let r = other.protect(id, None, Source::Websocket).await.unwrap();
            *seen.lock().unwrap() = Some(r.outcome);
            // The claimant's next generation is refused too.
            let next = exchange.clone();
            exchange
                .before_next_oco(move || Box::pin(async move { next.push_oco_fault(refused()) }));
        })
    });
    let slow = w.protector.protect(id, None, Source::Sync).await.unwrap();
    let taker = taker.lock().unwrap().clone();
    assert!(
        matches!(taker, Some(ProtectOutcome::Failed { .. })),
        "{taker:?}"
    );
    assert!(
        matches!(slow.outcome, ProtectOutcome::Failed { .. }),
        "{slow:?}"
    );
    assert!(w.exchange.open_lists().is_empty(), "nothing on the book");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        !matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

/// A leg recorded as canceled outside while its list still works: its stop
/// triggered, the exchange removed the take-profit first, and that removal
/// was read as the list's end. The triggered stop still locks every coin,
/// so a new generation is refused for balance and nothing is free. That is
/// not a sale: the entry is not closed (realised −cost), the list is looked
/// up and followed again, and the stop's fill closes the entry with its
/// real result.
#[tokio::test]
async fn a_leg_read_as_ended_while_its_list_still_works_is_followed_again_not_closed() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    let leg = w.store.legs(id).await.unwrap().remove(0);
    let LegState::Placed { list_id } = leg.state else {
        panic!("{leg:?}")
    };
    w.exchange
        .trigger_stop(leg.ids.list.as_str(), EntryStatus::Canceled);
    assert!(
        w.store
            .update_leg(&oco_core::model::LegUpdate {
                key: leg.key,
                from: "placed",
                to: LegState::CanceledExternally {
                    why: ExternalEnd::Canceled,
                },
                error: None,
                at: w.clock.now(),
            })
            .await
            .unwrap()
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0), "nothing free");

    let report = w
        .protector
        .protect(id, None, Source::Websocket)
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        ProtectOutcome::Nothing(Idle::Covered),
        "{report:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "not closed: {entry:?}"
    );
    assert_eq!(entry.realized_quote, None);
    let followed = w.store.legs(id).await.unwrap();
    assert_eq!(
        followed.iter().find(|l| l.key == leg.key).unwrap().state,
        LegState::Placed { list_id }
    );
    assert!(
        w.store
            .events(id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "leg_adopted")
    );

    // The stop fills at its limit: the list's end records the sale.
    w.exchange.fill_stop(leg.ids.list.as_str());
    let creds = w.store.credentials(w.account).await.unwrap();
    let placed = w
        .store
        .legs(id)
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.key == leg.key)
        .unwrap();
    w.protector.refresh_leg(&creds, &placed).await.unwrap();
    w.protector
        .protect(id, None, Source::Websocket)
        .await
        .unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    let limit = leg.stop_limit.unwrap_or(leg.stop).get();
    assert_eq!(
        entry.realized_quote,
        Some(leg.qty.get() * limit - dec!(100)),
        "the stop's sale less the cost"
    );
}

/// The same list when its lookup lags: it cannot be adopted yet, so the
/// entry is kept open and the call fails naming the list. It is the entry's
/// own list, still working with its stop: what the call and the entry's
/// history say must not send the operator to cancel it by hand, as it says
/// for another entry's list. The next call looks it up again and follows it.
#[tokio::test]
async fn an_entrys_own_list_whose_lookup_lags_is_not_given_to_cancel_by_hand() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    let leg = w.store.legs(id).await.unwrap().remove(0);
    w.exchange
        .trigger_stop(leg.ids.list.as_str(), EntryStatus::Canceled);
    assert!(
        w.store
            .update_leg(&oco_core::model::LegUpdate {
                key: leg.key,
                from: "placed",
                to: LegState::CanceledExternally {
                    why: ExternalEnd::Canceled,
                },
                error: None,
                at: w.clock.now(),
            })
            .await
            .unwrap()
    );
    w.exchange.lag_next_lookups(1);

    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    let ProtectOutcome::Failed { errors } = &report.outcome else {
        panic!("{report:?}")
    };
    let said = &errors[0];
    assert!(said.contains(leg.ids.list.as_str()), "{said}");
    assert!(said.contains("do not cancel it by hand"), "{said}");
    assert!(!said.contains("cancel it by hand;"), "{said}");
    assert!(!said.contains("check the account"), "{said}");
    let history: Vec<String> = w
        .store
        .events(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "coins_held_by_stray")
        .map(|e| e.detail)
        .collect();
    assert_eq!(history, [said.as_str()]);
    assert_eq!(w.open_qty(), dec!(0.999), "the list is left working");

    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(
        report.outcome,
        ProtectOutcome::Nothing(Idle::Covered),
        "{report:?}"
    );
    assert!(matches!(
        w.store.legs(id).await.unwrap()[0].state,
        LegState::Placed { .. }
    ));
}

/// An account set to a market stop.
fn market_stop() -> ProtectionConfig {
    ProtectionConfig {
        stop: oco_core::StopKind::Market,
        ..ProtectionConfig::DEFAULT
    }
}

/// The `stop_substituted` events of `id`.
async fn substitutions(w: &World, id: EntryId) -> Vec<String> {
    w.store
        .events(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == oco_core::protect::STOP_SUBSTITUTED)
        .map(|e| e.detail)
        .collect()
}

/// Binance's BTCUSDT takes no `STOP_LOSS`: an OCO with a market stop is
/// refused there on every pass. The account's market stop becomes a
/// stop-limit at the default offset, and the entry says so.
#[tokio::test]
async fn a_market_stop_on_a_symbol_without_one_is_placed_as_a_stop_limit_and_said() {
    let w = world(market_stop()).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Direct)
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, ProtectOutcome::Placed { legs, .. } if legs.len() == 2),
        "{:?}",
        report.outcome
    );
    let lists = w.exchange.open_lists();
    assert_eq!(lists.len(), 2);
    // Stop 99 (−1 %), its limit 0.5 % under it: 98.505 rounded down to the tick.
    for l in &lists {
        assert_eq!(l.request.stop.get(), dec!(99));
        assert_eq!(l.request.stop_limit.map(Price::get), Some(dec!(98.50)));
    }
    assert_eq!(
        substitutions(&w, id).await,
        [
            "BTCUSDT: STOP_LOSS (market stop) not allowed, STOP_LOSS_LIMIT 0.5% under the trigger placed instead"
        ]
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(matches!(entry.protection, Protection::Protected { .. }));
}

/// The same on a fill seen on the stream, whose legs are planned and
/// claimed with the fill's own write.
#[tokio::test]
async fn a_market_stop_seen_on_the_stream_is_placed_as_a_stop_limit_too() {
    let w = world(market_stop()).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let report = w
        .protector
        .protect_seen(w.account, id, "BTCUSDT", &full_fill(), Source::Websocket)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{:?}",
        report.outcome
    );
    let lists = w.exchange.open_lists();
    assert_eq!(lists.len(), 2);
    assert!(lists.iter().all(|l| l.request.stop_limit.is_some()));
    assert_eq!(substitutions(&w, id).await.len(), 1);
}

/// Where the symbol does take a market stop, it is placed as asked and
/// nothing is said.
#[tokio::test]
async fn a_market_stop_is_placed_where_the_symbol_allows_it() {
    let w = world(market_stop()).await;
    w.exchange.add_symbol(
        oco_core::symbol::SymbolRules {
            order_types: oco_core::symbol::OrderTypes::ALL,
            ..oco_core::testing::btcusdt_rules()
        },
        p(dec!(100)),
    );
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.protector
        .protect(id, Some(&full_fill()), Source::Direct)
        .await
        .unwrap();
    let lists = w.exchange.open_lists();
    assert_eq!(lists.len(), 2);
    assert!(lists.iter().all(|l| l.request.stop_limit.is_none()));
    assert!(substitutions(&w, id).await.is_empty());
}

/// Rules read before the symbol dropped `STOP_LOSS` still allow it: the
/// exchange refuses the market stop, and the same call places stop-limits
/// rather than failing on every pass. The refusal stays on the entry's legs,
/// so a later generation is planned with a stop-limit too.
#[tokio::test]
async fn a_market_stop_refused_under_stale_rules_is_replanned_as_a_stop_limit() {
    let w = world(market_stop()).await;
    w.exchange.add_symbol(
        oco_core::symbol::SymbolRules {
            order_types: oco_core::symbol::OrderTypes::ALL,
            ..oco_core::testing::btcusdt_rules()
        },
        p(dec!(100)),
    );
    let refused = || {
        OcoFault::Fail(ExchangeError::Rejected {
            code: -2010,
            msg: "Stop loss orders are not supported for this symbol.".into(),
        })
    };
    w.exchange.push_oco_fault(refused());
    w.exchange.push_oco_fault(refused());
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Direct)
        .await
        .unwrap();
    assert!(
        matches!(&report.outcome, ProtectOutcome::Placed { legs, .. } if legs.len() == 2),
        "{:?}",
        report.outcome
    );
    let lists = w.exchange.open_lists();
    assert_eq!(lists.len(), 2);
    assert!(lists.iter().all(|l| l.request.stop_limit.is_some()));
    assert_eq!(substitutions(&w, id).await.len(), 1);
    let entry = w.store.entry(id).await.unwrap();
    assert!(matches!(entry.protection, Protection::Protected { .. }));
    // Later generations keep to the stop-limit while the stale rules still
    // allow the market stop: both lists are canceled by hand, and the next
    // call plans a new generation (lists still working would be covered,
    // planning nothing).
    for list in &lists {
        cancel_by_hand(&w, id, list.request.ids.list.as_str()).await;
    }
    assert!(w.exchange.open_lists().is_empty());
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(&report.outcome, ProtectOutcome::Placed { legs, .. }
            if legs.len() == 2 && legs.iter().all(|l| l.generation == 2)),
        "{:?}",
        report.outcome
    );
    let lists = w.exchange.open_lists();
    assert_eq!(lists.len(), 2);
    assert!(
        lists.iter().all(|l| l.request.stop_limit.is_some()),
        "{lists:?}"
    );
}

/// A leg read as ended while its take-profit rests part-filled: a balance
/// refusal caps the position at nothing free, the list is re-adopted as a
/// rest, and the rest's cancel frees its coins. Those coins are planned,
/// not closed over: a balance read before the cancel is not the holding
/// after it, and a closed entry is never followed again.
#[tokio::test]
async fn coins_a_canceled_rest_frees_after_a_balance_refusal_get_a_stop_not_a_close() {
    let one_leg = ProtectionConfig {
        split: dec!(1),
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    let leg = w.store.legs(id).await.unwrap().remove(0);
    assert!(matches!(leg.state, LegState::Placed { .. }), "{leg:?}");
    // The take-profit sells 0.4: the stop goes, the list executes on.
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), q(dec!(0.4)));
    // The leg was read as ended by hand (an order event misread, or a
    // lookup that missed), so the store knows of no rest.
    assert!(
        w.store
            .update_leg(&oco_core::model::LegUpdate {
                key: leg.key,
                from: "placed",
                to: LegState::CanceledExternally {
                    why: ExternalEnd::Canceled,
                },
                error: None,
                at: w.clock.now(),
            })
            .await
            .unwrap()
    );

    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert_ne!(entry.protection, Protection::Closed, "{entry:?}");
    let covered: Decimal = w
        .exchange
        .open_lists()
        .iter()
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(covered, dec!(0.599), "the rest's coins under a stop");
}
