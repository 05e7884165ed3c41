//! Market exits (the late policy) and what an entry keeps after one: coins
//! that came after the exit was decided are not the exit's.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::time::Duration;

use common::*;
use oco_core::ids::{EntryId, IdScheme};
use oco_core::levels::EntryLevels;
use oco_core::model::{Entry, Protection, ProtectionConfig, Source};
use oco_core::ports::Store;
use oco_core::protect::{ProtectOutcome, Protector, ProtectorConfig};
use oco_core::testing::OcoFault;
use rust_decimal_macros::dec;

/// A protector on `w`'s ports whose calls end after one round: as a call
/// whose rounds ran out, or whose process stopped, right after an exit.
fn one_round(w: &World) -> Protector {
    Protector::new(
        w.exchange.clone(),
        w.store.clone(),
        w.clock.clone(),
        ProtectorConfig {
            max_rounds: 1,
            ..ProtectorConfig::new(IdScheme::new("og").unwrap())
        },
    )
}

/// Whether sync still looks at the entry.
async fn followed(w: &World, id: EntryId) -> bool {
    w.store
        .open_entries(w.account)
        .await
        .unwrap()
        .iter()
        .any(|e| e.id == id)
}

/// The next call (sync's) protects the 0.6 that came after the exit of
/// the first 0.4, with the market back above the stop.
async fn the_next_call_protects_the_later_coins(w: &World, id: EntryId) {
    w.exchange.set_price("BTCUSDT", p(dec!(100)));
    let next = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(next.outcome, ProtectOutcome::Placed { .. }),
        "{next:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.6), "the later coins have their stop");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

fn assert_open_for_the_later_coins(entry: &Entry, followed: bool) {
    assert_eq!(
        entry.protection,
        Protection::Unprotected,
        "the 0.6 filled after the exit was decided has no stop: the entry must not be written exited over it"
    );
    assert_eq!(entry.realized_quote, None, "no result while coins are held");
    assert!(followed, "sync still looks at the entry");
}

/// The rest of the order fills, recorded by another layer, just as the
/// exit of the first part is sent: the exit sells the 0.4 it was decided
/// over, and the 0.6 is not written off with it.
#[tokio::test]
async fn a_fill_recorded_as_the_exit_is_sent_is_not_written_exited() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    // Under the stop: the first 0.4 takes the late policy.
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    let (store, exchange) = (w.store.clone(), w.exchange.clone());
    w.exchange.before_next_order(move || {
        Box::pin(async move {
            store
                .record_evidence(id, &whole_after_part())
                .await
                .unwrap();
            let (free, _) = exchange.balance(KEY, "BTC");
            exchange.set_free(KEY, "BTC", free + dec!(0.6));
        })
    });
    one_round(&w)
        .protect(id, Some(&first_part()), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.exchange.market_sells().len(), 1, "the 0.4 was exited");
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0.6));
    let exits = w.exits(id).await;
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(exits[0].sold.total(), q(dec!(0.4)));

    let entry = w.store.entry(id).await.unwrap();
    assert_open_for_the_later_coins(&entry, followed(&w, id).await);
    the_next_call_protects_the_later_coins(&w, id).await;
}

/// The same, for an exit whose answer was lost and that a later call finds
/// by its client id: the entry it was decided from is not known then, so
/// it stands for the entry only while nothing sellable is owed beyond it.
#[tokio::test]
async fn a_fill_recorded_while_the_exit_was_in_doubt_is_not_written_exited() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    // The exit of the first 0.4 sells, its answer is lost and its first
    // lookup lags.
    w.exchange.push_order_fault(OcoFault::UnknownAfterApply);
    w.exchange.lag_next_lookups(1);
    let first = w
        .protector
        .protect(id, Some(&first_part()), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, ProtectOutcome::Pending { .. }),
        "{first:?}"
    );
    // The rest of the order fills meanwhile; the market comes back.
    w.store
        .record_evidence(id, &whole_after_part())
        .await
        .unwrap();
    w.credit(dec!(0.6));
    w.exchange.set_price("BTCUSDT", p(dec!(100)));
    // The next call finds the exit; its lists for the 0.6 are refused.
    for _ in 0..2 {
        w.exchange
            .push_oco_fault(OcoFault::Fail(oco_core::ports::ExchangeError::Transient(
                "service unavailable".into(),
            )));
    }
    w.clock.advance(Duration::from_secs(1));
    let second = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(second.outcome, ProtectOutcome::Failed { .. }),
        "{second:?}"
    );
    assert_eq!(w.exchange.market_sells().len(), 1, "sold once");
    assert_eq!(w.exits(id).await[0].sold.total(), q(dec!(0.4)));

    let entry = w.store.entry(id).await.unwrap();
    assert_open_for_the_later_coins(&entry, followed(&w, id).await);
    the_next_call_protects_the_later_coins(&w, id).await;
}

/// An entry exited at market while the rest of a partly filled take-profit
/// of it still rested, and that rest sold its coins since: canceling the
/// rest frees nothing, so nothing needs a stop. The entry keeps its exit
/// (and reason), with its result counted again with the rest's sale, not
/// reopened and closed in its place.
#[tokio::test]
async fn an_exited_entry_whose_rest_sold_out_keeps_its_exit() {
    let (w, id, rest) = exited_with_a_take_profit_rest().await;
    let reason = w.store.entry(id).await.unwrap().protection;
    // The rest sells its last 0.3 at 101.
    w.exchange.fill_take_profit(rest.as_str(), q(dec!(0.5)));

    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(
        entry.protection, reason,
        "the exit's state stays: nothing is left to protect"
    );
    // 0.5 at 101 from the take-profit, 0.5 at 98.5 from the stop, for 100.
    assert_eq!(
        entry.realized_quote,
        Some(dec!(-0.25)),
        "counted with the rest's sale"
    );
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert_eq!(
        again.outcome,
        ProtectOutcome::Nothing(oco_core::protect::Idle::Settled)
    );
    assert_eq!(w.store.entry(id).await.unwrap().protection, reason);
}

/// The same entry whose rest still held coins when canceled: those are
/// without a stop, so the entry is no longer exited, and they get one.
#[tokio::test]
async fn an_exited_entry_whose_rest_frees_coins_protects_them() {
    let (w, id, _) = exited_with_a_take_profit_rest().await;
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.3), "the rest's coins have a stop");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
    assert_eq!(entry.realized_quote, None);
}

/// A filled 1.0 under two lists of 0.5; the first list's take-profit sells
/// 0.2 (its stop goes, 0.3 rests), the second list's stop sells 0.5, and
/// the entry is recorded exited at market with the rest still on the book
/// (a state the routine does not write itself, but finds). Returns the
/// rest's list client id.
async fn exited_with_a_take_profit_rest() -> (World, EntryId, String) {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let fill = evidence(
        oco_core::state::EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    w.protector
        .protect(id, Some(&fill), Source::Websocket)
        .await
        .unwrap();
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(legs.len(), 2, "{legs:?}");
    let creds = w.store.credentials(w.account).await.unwrap();
    let rest = legs[0].ids.list.as_str().to_owned();
    w.exchange.fill_take_profit(&rest, q(dec!(0.2)));
    w.protector.refresh_leg(&creds, &legs[0]).await.unwrap();
    w.exchange.fill_stop(legs[1].ids.list.as_str());
    w.protector.refresh_leg(&creds, &legs[1]).await.unwrap();
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(
        legs[0].state,
        oco_core::state::LegState::CanceledExternally {
            why: oco_core::state::ExternalEnd::TakeProfitPartial
        }
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        w.store
            .exit_entry(
                id,
                "late protection, exited at market: levels passed at fill",
                oco_core::protect::realized(&entry, &legs),
                &entry,
            )
            .await
            .unwrap()
    );
    (w, id, rest)
}

/// An entry exited at market over what it held then (0.3 of its 1: the
/// other 0.7 were locked by an order of the user's own), whose 0.7 are free
/// again later with the market back: 0.7 is over `LOT_SIZE.maxQty` (0.5),
/// which makes it too large for one list, not dust. A later call (the
/// fill's event delivered again) protects it rather than call the exit
/// settled, which would leave the coins without a stop for good.
#[tokio::test]
async fn an_exited_entry_holding_more_than_max_qty_is_not_settled() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let capped = oco_core::symbol::SymbolRules {
        max_qty: Some(q(dec!(0.5))),
        ..oco_core::testing::btcusdt_rules()
    };
    // Under the stop: the lists are refused and the late policy exits.
    w.exchange.add_symbol(capped, p(dec!(80)));
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.3));
    let mut fill = evidence(
        oco_core::state::EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    fill.holding = Some(q(dec!(0.3)));
    let exit = w
        .protector
        .protect(id, Some(&fill), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(exit.outcome, ProtectOutcome::Exited { .. }),
        "{exit:?}"
    );
    assert_eq!(w.exits(id).await[0].sold.total(), q(dec!(0.3)));

    w.credit(dec!(0.7));
    w.exchange.set_price("BTCUSDT", p(dec!(100)));
    fill.holding = None;
    let again = w
        .protector
        .protect(id, Some(&fill), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(again.outcome, ProtectOutcome::Placed { .. }),
        "0.7 left after the exit is over maxQty 0.5, not dust: it must be protected, not settled: {again:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.7), "the 0.7 have their stops");
}

/// 1 bought at 100 with the market at 80, under the stop: the lists are
/// refused and the late policy exits. The account holds `free` of the
/// coins (the others were sold by hand, or are locked elsewhere).
async fn late_with_free(
    free: rust_decimal::Decimal,
) -> (World, EntryId, oco_core::model::Evidence) {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(free);
    w.exchange.set_price("BTCUSDT", p(dec!(80)));
    let fill = evidence(
        oco_core::state::EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    (w, id, fill)
}

/// The coins were all sold by hand before the late exit: its refusal for
/// balance is read as what it says, the balance read again, and the entry
/// closed, not failed on every call.
#[tokio::test]
async fn a_late_exit_refused_for_balance_with_nothing_held_closes_the_entry() {
    let (w, id, fill) = late_with_free(dec!(0)).await;
    let report = w
        .protector
        .protect(id, Some(&fill), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        ProtectOutcome::Nothing(oco_core::protect::Idle::Settled),
        "an exit refused for balance with nothing held settles the entry: {report:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    assert!(!followed(&w, id).await, "sync no longer looks at it");
    assert_eq!(w.exchange.order_calls(), 1, "one exit sent");
}

/// Part of the coins (0.6 of 1) was sold by hand: the exit of 1 is refused
/// for balance, and the 0.4 still held are exited in the same call.
#[tokio::test]
async fn a_late_exit_refused_for_balance_exits_what_is_held() {
    let (w, id, fill) = late_with_free(dec!(0.4)).await;
    let report = w
        .protector
        .protect(id, Some(&fill), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "an exit refused for balance is planned again from the 0.4 held: {report:?}"
    );
    let sold: Vec<_> = w.exits(id).await.iter().map(|l| l.sold.total()).collect();
    assert_eq!(
        sold,
        vec![q(dec!(0)), q(dec!(0.4))],
        "the refused exit, then 0.4"
    );
    assert_eq!(w.exchange.balance(KEY, "BTC").0, dec!(0));
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Exited { .. }),
        "{:?}",
        entry.protection
    );
}

/// A refusal for balance that the balance does not explain (the coins
/// read free) is planned again once per call, not round after round: the
/// second refusal fails the call, as any refused exit does.
#[tokio::test]
async fn a_late_exit_refused_for_balance_is_planned_again_once_per_call() {
    let (w, id, fill) = late_with_free(dec!(1)).await;
    for _ in 0..3 {
        w.exchange
            .push_order_fault(OcoFault::Fail(oco_core::ports::ExchangeError::Rejected {
                code: -2010,
                msg: "Account has insufficient balance for requested action.".into(),
            }));
    }
    let report = w
        .protector
        .protect(id, Some(&fill), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.order_calls(), 2, "sent again once, not looped");
    let failed = w
        .store
        .events(id)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "exit_failed")
        .count();
    assert_eq!(failed, 1);
}

/// The market between the targets: of the first 0.4's two lists, the one
/// whose target it passed is refused and its 0.2 exited at market, the
/// other keeps its stop. The rest of the order (0.6) fills, recorded by
/// another layer, as the exit is sent. The entry is not labelled protected
/// over those 0.6: a call that ends there (its rounds run out, its process
/// stops) leaves it `unprotected`, and the next call gives them a stop.
#[tokio::test]
async fn a_fill_recorded_as_a_partly_protected_exit_is_sent_leaves_the_entry_unprotected() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.4));
    // Between the targets (+1 % and +2 % of 100).
    w.exchange.set_price("BTCUSDT", p(dec!(101.5)));
    let (store, exchange) = (w.store.clone(), w.exchange.clone());
    w.exchange.before_next_order(move || {
        Box::pin(async move {
            store
                .record_evidence(id, &whole_after_part())
                .await
                .unwrap();
            let (free, _) = exchange.balance(KEY, "BTC");
            exchange.set_free(KEY, "BTC", free + dec!(0.6));
        })
    });
    one_round(&w)
        .protect(id, Some(&first_part()), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(w.exchange.market_sells().len(), 1, "the refused 0.2 exited");
    assert_eq!(w.open_qty(), dec!(0.2), "the other 0.2 keep their stop");
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(
        entry.protection,
        Protection::Unprotected,
        "the 0.6 filled while the exit was out have no stop: the entry must not be labelled protected"
    );
    assert!(followed(&w, id).await);

    // The next call covers the 0.2 still held under a list and the 0.6.
    w.exchange.set_price("BTCUSDT", p(dec!(100)));
    let next = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(next.outcome, ProtectOutcome::Placed { .. }),
        "{next:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.8));
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}
