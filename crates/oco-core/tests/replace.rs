//! Replacing older lists with a new generation: what a replacement cancels
//! and what it leaves working.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use common::*;
use oco_core::levels::EntryLevels;
use oco_core::model::{Protection, ProtectionConfig, Source};
use oco_core::ports::Store;
use oco_core::protect::ProtectOutcome;
use oco_core::state::{EntryStatus, ExternalEnd, LegState};
use rust_decimal_macros::dec;

/// Two lists hold a fill; the user cancels one by hand while the other's
/// stop has triggered and rests as a limit sell under the market. The
/// replacement covers the coins of the canceled list only: canceling the
/// triggered stop would stop the sale of its coins, and a new list for
/// them is refused (the price is under its stop).
#[tokio::test]
async fn a_list_whose_stop_has_triggered_is_not_canceled_by_a_replacement() {
    triggered_stop_left_selling(true).await;
}

/// The same on an exchange that cannot list open orders: each list is
/// looked up.
#[tokio::test]
async fn a_triggered_stop_is_found_by_lookup_where_open_orders_are_not_listed() {
    triggered_stop_left_selling(false).await;
}

async fn triggered_stop_left_selling(open_orders_listed: bool) {
    let (w, id, legs) = two_lists(ProtectionConfig::DEFAULT, open_orders_listed).await;
    let (selling, by_hand) = (&legs[0], &legs[1]);
    let creds = w.store.credentials(w.account).await.unwrap();

    // The market falls through the stop (99) and under its limit (98.5):
    // the first list's take-profit is removed, its stop rests unfilled.
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange
        .trigger_stop(selling.ids.list.as_str(), EntryStatus::Expired);
    // The second list is canceled by hand, and its end looked up.
    w.exchange.cancel_externally(by_hand.ids.list.as_str());
    w.protector.refresh_leg(&creds, by_hand).await.unwrap();
    let ended = w.store.legs(id).await.unwrap();
    assert_eq!(
        ended[1].state,
        LegState::CanceledExternally {
            why: ExternalEnd::Canceled
        }
    );

    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    let still_selling = w
        .exchange
        .open_lists()
        .iter()
        .any(|l| l.request.ids.list == selling.ids.list);
    assert!(
        still_selling,
        "the list whose stop triggered keeps selling its coins: {report:?}"
    );
    let now = w.store.legs(id).await.unwrap();
    assert!(
        matches!(now[0].state, LegState::Placed { .. }),
        "followed as it is: {:?}",
        now[0].state
    );
    // Only the hand-canceled list's coins took the late policy.
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.market_sells().len(), 1);
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0), selling.qty.get()),
        "the exit sold the uncovered coins; the triggered stop still holds its own"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "a stop still works over the rest: {:?}",
        entry.protection
    );

    // Covered now: a later call places, cancels and sells nothing.
    let (lists, sells) = (w.exchange.oco_calls(), w.exchange.market_sells().len());
    let again = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(again.outcome, ProtectOutcome::Nothing(_)),
        "{again:?}"
    );
    assert_eq!(w.exchange.oco_calls(), lists);
    assert_eq!(w.exchange.market_sells().len(), sells);
    assert_eq!(w.exchange.open_lists().len(), 1);

    // The stop fills at its limit: every coin is sold, the entry closes.
    w.exchange.fill_stop(selling.ids.list.as_str());
    let now = w.store.legs(id).await.unwrap();
    w.protector.refresh_leg(&creds, &now[0]).await.unwrap();
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed, "{entry:?}");
}

/// As above, but the triggered stop has sold part of its list (0.2 of
/// 0.4995) before the replacement: it still holds only the rest, so the
/// replacement covers (here: exits) every other coin the entry owes, not
/// the position less the list's full size.
#[tokio::test]
async fn a_triggered_stop_that_sold_part_is_counted_at_what_it_still_holds() {
    triggered_stop_sold_part(true).await;
}

/// The same where each list is looked up.
#[tokio::test]
async fn a_triggered_stop_that_sold_part_is_counted_at_what_it_holds_by_lookup() {
    triggered_stop_sold_part(false).await;
}

async fn triggered_stop_sold_part(open_orders_listed: bool) {
    let (w, id, legs) = two_lists(ProtectionConfig::DEFAULT, open_orders_listed).await;
    let (selling, by_hand) = (&legs[0], &legs[1]);
    assert_eq!(selling.qty, q(dec!(0.4995)));
    let creds = w.store.credentials(w.account).await.unwrap();

    // The stop triggers and sells 0.2 of its list; the rest rests under the
    // market. The sale is recorded (the list looked up), the leg working.
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange
        .sell_stop_partly(selling.ids.list.as_str(), q(dec!(0.2)));
    w.protector.refresh_leg(&creds, selling).await.unwrap();
    let now = w.store.legs(id).await.unwrap();
    assert_eq!(now[0].sold.stop_loss, q(dec!(0.2)));
    assert!(matches!(now[0].state, LegState::Placed { .. }), "{now:?}");
    // The other list is canceled by hand, and its end looked up.
    w.exchange.cancel_externally(by_hand.ids.list.as_str());
    w.protector.refresh_leg(&creds, by_hand).await.unwrap();
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0.4995), dec!(0.2995)));

    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Exited { .. }),
        "{report:?}"
    );
    let exited: rust_decimal::Decimal =
        w.exits(id).await.iter().map(|l| l.sold.total().get()).sum();
    assert_eq!(
        exited,
        dec!(0.4995),
        "the owed 0.799 less the 0.2995 the triggered stop still holds"
    );
    assert_eq!(
        w.exchange.balance(KEY, "BTC"),
        (dec!(0), dec!(0.2995)),
        "no coin is left free without a stop; the stop holds its rest"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );

    // The stop sells its rest: every coin is sold, the entry closes.
    w.exchange.fill_stop(selling.ids.list.as_str());
    let now = w.store.legs(id).await.unwrap();
    w.protector.refresh_leg(&creds, &now[0]).await.unwrap();
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed, "{entry:?}");
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0), dec!(0)));
}

/// The read that finds triggered stops fails (a 5xx, a rate limit) in a
/// round about to replace lists: the round goes on, keeping the working
/// list (it may be selling on its stop), and the coins of the list canceled
/// by hand get their stop now rather than at sync's next pass.
#[tokio::test]
async fn a_replacement_goes_on_when_the_open_orders_cannot_be_read() {
    replacement_whose_trigger_check_fails(true).await;
}

/// The same where each list is looked up, and the lookups fail.
#[tokio::test]
async fn a_replacement_goes_on_when_its_lists_cannot_be_looked_up() {
    replacement_whose_trigger_check_fails(false).await;
}

async fn replacement_whose_trigger_check_fails(open_orders_listed: bool) {
    let (w, id, legs) = two_lists(ProtectionConfig::DEFAULT, open_orders_listed).await;
    let creds = w.store.credentials(w.account).await.unwrap();
    w.exchange.cancel_externally(legs[1].ids.list.as_str());
    w.protector.refresh_leg(&creds, &legs[1]).await.unwrap();
    assert_eq!(w.open_qty(), dec!(0.4995));

    let failure = oco_core::ports::ExchangeError::Transient("502 bad gateway".into());
    if open_orders_listed {
        w.exchange.fail_open_order_ids(Some(failure));
    } else {
        w.exchange.fail_list_lookups(Some(failure));
    }
    let report = w.protector.protect(id, None, Source::Sync).await;
    assert!(
        matches!(
            report,
            Ok(oco_core::protect::ProtectReport {
                outcome: ProtectOutcome::Placed { replaced: 0, .. },
                ..
            })
        ),
        "the working list is kept, not replaced: {report:?}"
    );
    assert!(
        w.exchange
            .open_lists()
            .iter()
            .any(|l| l.request.ids.list == legs[0].ids.list),
        "the list still working stays"
    );
    assert_eq!(w.open_qty(), dec!(0.999), "the whole position has its stop");
    assert_eq!(w.exchange.balance(KEY, "BTC"), (dec!(0), dec!(0.999)));
}

/// A stop that triggered and sells, on an account whose late policy only
/// records: the read that would show the trigger fails while the other
/// list is replaced. The selling list is not canceled (its coins would keep
/// no stop: the new list's stop is above the market and refused, and the
/// policy sells nothing).
#[tokio::test]
async fn a_failed_trigger_read_never_cancels_a_stop_that_is_selling() {
    let record_only = ProtectionConfig {
        late: oco_core::model::LatePolicy::RecordOnly,
        ..ProtectionConfig::DEFAULT
    };
    let (w, id, legs) = two_lists(record_only, true).await;
    let (selling, by_hand) = (&legs[0], &legs[1]);
    let creds = w.store.credentials(w.account).await.unwrap();
    w.exchange.set_price("BTCUSDT", p(dec!(98)));
    w.exchange
        .sell_stop_partly(selling.ids.list.as_str(), q(dec!(0.1)));
    w.protector.refresh_leg(&creds, selling).await.unwrap();
    w.exchange.cancel_externally(by_hand.ids.list.as_str());
    w.protector.refresh_leg(&creds, by_hand).await.unwrap();

    w.exchange
        .fail_open_order_ids(Some(oco_core::ports::ExchangeError::Transient(
            "502 bad gateway".into(),
        )));
    let _ = w.protector.protect(id, None, Source::Sync).await;
    assert!(
        w.exchange
            .open_lists()
            .iter()
            .any(|l| l.request.ids.list == selling.ids.list),
        "the list selling on its stop is never canceled on a failed read: {:?}",
        w.exchange.open_lists()
    );
}

/// The day's order count leaves room for one list, not two: the
/// replacement is planned again as one list for the whole position
/// (degraded, and said), not left without a stop until the hold ends.
#[tokio::test]
async fn a_replacement_with_room_for_one_list_places_one() {
    let (w, id, legs) = two_lists(ProtectionConfig::DEFAULT, true).await;
    let creds = w.store.credentials(w.account).await.unwrap();
    w.exchange.cancel_externally(legs[1].ids.list.as_str());
    w.protector.refresh_leg(&creds, &legs[1]).await.unwrap();

    w.exchange
        .hold_placements_beyond(KEY, 1, std::time::Duration::from_secs(6 * 3600));
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(
            &report.outcome,
            ProtectOutcome::Placed {
                degraded: Some(_),
                ..
            }
        ),
        "one list placed, degraded: {report:?}"
    );
    let open = w.exchange.open_lists();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(w.open_qty(), dec!(0.999), "the whole position has its stop");
    let entry = w.store.entry(id).await.unwrap();
    assert!(
        matches!(entry.protection, Protection::Protected { .. }),
        "{:?}",
        entry.protection
    );
}

/// The account's placements are held (Binance's `-1015`, or the day's
/// order count spent, until the next UTC midnight at worst), its cancels
/// are not: a replacement cancels nothing, its claims are released, and
/// the list still working keeps its stop until placements go again.
#[tokio::test]
async fn a_replacement_cancels_nothing_while_placements_are_held() {
    let (w, id, legs) = two_lists(ProtectionConfig::DEFAULT, true).await;
    let (working, by_hand) = (&legs[0], &legs[1]);
    let creds = w.store.credentials(w.account).await.unwrap();
    w.exchange.cancel_externally(by_hand.ids.list.as_str());
    w.protector.refresh_leg(&creds, by_hand).await.unwrap();

    w.exchange
        .hold_placements(KEY, Some(std::time::Duration::from_secs(6 * 3600)));
    let calls = w.exchange.oco_calls();
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(&report.outcome, ProtectOutcome::Failed { errors } if errors.iter().any(|e| e.contains("rate limited"))),
        "{report:?}"
    );
    let open = w.exchange.open_lists();
    assert!(
        open.len() == 1 && open[0].request.ids.list == working.ids.list,
        "the working list keeps its stop: {open:?}"
    );
    assert_eq!(w.exchange.oco_calls(), calls, "nothing sent");
    let now = w.store.legs(id).await.unwrap();
    assert!(
        matches!(now[0].state, LegState::Placed { .. }),
        "{:?}",
        now[0].state
    );
    let claimed: Vec<_> = now.iter().filter(|l| l.key.generation == 1).collect();
    assert!(
        !claimed.is_empty()
            && claimed
                .iter()
                .all(|l| matches!(l.state, LegState::NotPlaced { .. })),
        "the claims are released: {now:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(
        entry.protection,
        Protection::Unprotected,
        "half the coins have no stop"
    );

    // Placements go again: the next call replaces the working list.
    w.exchange.hold_placements(KEY, None);
    let report = w.protector.protect(id, None, Source::Sync).await.unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { replaced: 1, .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.999));
}

/// A first protection has nothing to cancel: it is tried whatever the
/// hold, and refused, loses nothing.
#[tokio::test]
async fn a_first_protection_is_tried_while_placements_are_held() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.exchange
        .hold_placements(KEY, Some(std::time::Duration::from_secs(60)));
    let report = w
        .protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Failed { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.oco_calls(), 2, "both lists tried");
}

/// A fill of 0.999 protected by its two lists (0.4995 each), on an exchange
/// that lists open orders or, when not `open_orders_listed`, has each list
/// looked up: the world, the entry and its two legs.
async fn two_lists(
    protection: ProtectionConfig,
    open_orders_listed: bool,
) -> (World, oco_core::EntryId, Vec<oco_core::Leg>) {
    let w = world(protection).await;
    w.exchange.cannot_list_open_orders(!open_orders_listed);
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(0.999));
    w.protector
        .protect(id, Some(&full_fill()), Source::Websocket)
        .await
        .unwrap();
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(legs.len(), 2, "{legs:?}");
    (w, id, legs)
}
