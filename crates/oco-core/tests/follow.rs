//! Following order updates: entry fills, leg fills, leg ends.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use common::*;
use oco_core::follow::Followed;
use oco_core::levels::EntryLevels;
use oco_core::model::{Fill, Millis, Protection, ProtectionConfig, Source};
use oco_core::ports::{ExecutionUpdate, Side, Store};
use oco_core::protect::ProtectOutcome;
use oco_core::state::{EntryStatus, LegState};
use oco_core::symbol::Asset;
use oco_core::{AccountId, Qty};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn update(
    client_id: &str,
    status: EntryStatus,
    executed: Decimal,
    price: Decimal,
) -> ExecutionUpdate {
    ExecutionUpdate {
        symbol: "BTCUSDT".into(),
        client_id: client_id.into(),
        order_id: 5,
        list_id: -1,
        side: Side::Buy,
        order_type: "MARKET".into(),
        execution: "TRADE".into(),
        status,
        executed_qty: q(executed),
        cumulative_quote: executed * price,
        fill: (executed > Decimal::ZERO).then(|| Fill {
            trade_id: 11,
            price: p(price),
            qty: q(executed),
            commission: Decimal::ZERO,
            commission_asset: Asset("BNB".into()),
            time: Millis(999_000),
        }),
        expiry_reason: None,
        event_time: Millis(999_001),
    }
}

#[tokio::test]
async fn an_entry_fill_event_protects_it() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let entry = w.store.entry(id).await.unwrap();
    let up = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    let followed = w
        .protector
        .follow(w.account, &up, Source::Websocket)
        .await
        .unwrap();
    let Followed::Entry(report) = followed else {
        panic!("{followed:?}")
    };
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(1));
}

#[tokio::test]
async fn updates_of_foreign_orders_and_other_accounts_are_ignored() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    let entry = w.store.entry(id).await.unwrap();
    let manual = update("web_12345", EntryStatus::Filled, dec!(1), dec!(100));
    assert_eq!(
        w.protector
            .follow(w.account, &manual, Source::Websocket)
            .await
            .unwrap(),
        Followed::Foreign
    );
    let ours = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    let other = AccountId(w.account.0 + 1);
    assert_eq!(
        w.protector
            .follow(other, &ours, Source::Websocket)
            .await
            .unwrap(),
        Followed::Foreign
    );
    assert!(w.exchange.lists().is_empty());
    assert_eq!(
        w.store.entry(id).await.unwrap().executed_qty,
        Qty::ZERO,
        "nothing recorded"
    );
}

#[tokio::test]
async fn both_take_profits_filling_close_the_entry() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let entry = w.store.entry(id).await.unwrap();
    let up = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    w.protector
        .follow(w.account, &up, Source::Websocket)
        .await
        .unwrap();
    for leg in w.store.legs(id).await.unwrap() {
        w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
        let tp = update(
            leg.ids.take_profit.as_str(),
            EntryStatus::Filled,
            leg.qty.get(),
            leg.take_profit.get(),
        );
        w.protector
            .follow(w.account, &tp, Source::Websocket)
            .await
            .unwrap();
    }
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        legs.iter().all(|l| l.state == LegState::TakeProfitFilled),
        "{legs:?}"
    );
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    // Bought 1 at 100; sold 0.5 at 101 and 0.5 at 102.
    assert_eq!(entry.realized_quote, Some(dec!(1.5)));
}

#[tokio::test]
async fn a_partial_take_profit_event_reprotects_the_rest() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let entry = w.store.entry(id).await.unwrap();
    let up = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    w.protector
        .follow(w.account, &up, Source::Websocket)
        .await
        .unwrap();
    let leg = w.store.legs(id).await.unwrap().remove(0);
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), q(dec!(0.1)));
    let tp = update(
        leg.ids.take_profit.as_str(),
        EntryStatus::PartiallyFilled,
        dec!(0.1),
        leg.take_profit.get(),
    );
    let followed = w
        .protector
        .follow(w.account, &tp, Source::Websocket)
        .await
        .unwrap();
    let Followed::Leg {
        state,
        protect: Some(report),
        ..
    } = followed
    else {
        panic!("{followed:?}")
    };
    assert_eq!(state, "canceled_externally");
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.9), "what is still held has a stop");
}

#[tokio::test]
async fn an_expired_stop_is_protection_lost_and_is_replaced() {
    let mut config = ProtectionConfig::DEFAULT;
    config.split = Decimal::ONE;
    let w = world(config).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let entry = w.store.entry(id).await.unwrap();
    let up = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    w.protector
        .follow(w.account, &up, Source::Websocket)
        .await
        .unwrap();
    let leg = w.store.legs(id).await.unwrap().remove(0);
    // The exchange expired the triggered stop (price-range rule); the coins are free again.
    w.exchange.cancel_externally(leg.ids.list.as_str());
    let mut sl = update(
        leg.ids.stop_loss.as_str(),
        EntryStatus::Expired,
        dec!(0),
        dec!(0),
    );
    sl.expiry_reason = Some("EXECUTION_RULE_PRICE_RANGE_EXCEEDED".into());
    let followed = w
        .protector
        .follow(w.account, &sl, Source::Websocket)
        .await
        .unwrap();
    let Followed::Leg {
        state,
        protect: Some(report),
        ..
    } = followed
    else {
        panic!("{followed:?}")
    };
    assert_eq!(state, "canceled_externally");
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.exchange.open_lists().len(), 1);
    assert_eq!(w.open_qty(), dec!(1));
}

#[tokio::test]
async fn a_leg_order_accepted_with_nothing_filled_changes_nothing() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let entry = w.store.entry(id).await.unwrap();
    let up = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    w.protector
        .follow(w.account, &up, Source::Websocket)
        .await
        .unwrap();
    let legs = w.store.legs(id).await.unwrap();
    let events_before = w.store.events(id).await.unwrap().len();
    for leg in &legs {
        for client_id in [leg.ids.take_profit.as_str(), leg.ids.stop_loss.as_str()] {
            let accepted = update(client_id, EntryStatus::New, Decimal::ZERO, dec!(100));
            assert_eq!(
                w.protector
                    .follow(w.account, &accepted, Source::Websocket)
                    .await
                    .unwrap(),
                Followed::LegAccepted { key: leg.key }
            );
        }
    }
    assert_eq!(w.store.legs(id).await.unwrap(), legs, "legs unchanged");
    assert_eq!(w.store.events(id).await.unwrap().len(), events_before);
    assert_eq!(w.open_qty(), dec!(1), "nothing placed or canceled");
}

#[tokio::test]
async fn a_second_fill_on_the_stream_replaces_the_first_fills_legs() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let entry = w.store.entry(id).await.unwrap();
    let first = update(
        entry.client_id.as_str(),
        EntryStatus::PartiallyFilled,
        dec!(0.4),
        dec!(100),
    );
    let Followed::Entry(report) = w
        .protector
        .follow(w.account, &first, Source::Websocket)
        .await
        .unwrap()
    else {
        panic!("the first fill is an entry update")
    };
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { replaced: 0, .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.4));

    let mut second = update(
        entry.client_id.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(100),
    );
    if let Some(fill) = second.fill.as_mut() {
        fill.trade_id = 12;
        fill.qty = q(dec!(0.6));
    }
    let Followed::Entry(report) = w
        .protector
        .follow(w.account, &second, Source::Websocket)
        .await
        .unwrap()
    else {
        panic!("the second fill is an entry update")
    };
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { replaced, .. } if replaced > 0),
        "the first fill's lists are replaced: {report:?}"
    );
    assert_eq!(w.open_qty(), dec!(1), "the whole position is covered once");
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        legs.iter()
            .any(|l| l.key.generation == 1 && l.state.is_active()),
        "a new generation covers it: {legs:?}"
    );
}
