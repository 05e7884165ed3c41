//! Following order updates: entry fills, leg fills, leg ends.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use oco_core::follow::Followed;
use oco_core::ids::{EntryId, IdScheme, LegKey};
use oco_core::levels::EntryLevels;
use oco_core::mem::MemStore;
use oco_core::model::{Fill, Leg, Millis, Protection, ProtectionConfig, Source};
use oco_core::ports::{ExecutionUpdate, FillContext, Side, Store, StoreError};
use oco_core::protect::{ProtectOutcome, Protector, ProtectorConfig};
use oco_core::state::{EntryStatus, LegState};
use oco_core::symbol::Asset;
use oco_core::testing::{Hooked, StoreHooks};
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

/// Hooks on the in-memory store: the next read of one leg shows it
/// `Claimed`, as read by a caller that got there just before the placer
/// recorded the leg `Placed`. Every read of it, when `always`.
struct ReadBeforePlaced {
    stale: Mutex<Option<LegKey>>,
    always: bool,
    /// Every leg-trade write fails (`Unavailable`), as a database that
    /// went away between the sale and its commission.
    fail_trades: bool,
}

impl ReadBeforePlaced {
    fn over(
        inner: Arc<MemStore>,
        stale: Option<LegKey>,
        always: bool,
        fail_trades: bool,
    ) -> Arc<Hooked<MemStore, Self>> {
        Arc::new(Hooked::new(
            inner,
            Arc::new(Self {
                stale: Mutex::new(stale),
                always,
                fail_trades,
            }),
        ))
    }

    fn read(&self, legs: &mut [Leg]) {
        let stale = if self.always {
            *self.stale.lock().unwrap()
        } else {
            self.stale.lock().unwrap().take()
        };
        for leg in legs {
            if Some(leg.key) == stale {
                leg.state = LegState::Claimed;
            }
        }
    }
}

#[async_trait]
impl StoreHooks<MemStore> for ReadBeforePlaced {
    async fn legs(&self, inner: &MemStore, e: EntryId) -> Result<Vec<Leg>, StoreError> {
        let mut legs = inner.legs(e).await?;
        self.read(&mut legs);
        Ok(legs)
    }
    // `protect` reads the legs with the keys and settings: the in-memory
    // store's own `legs` underneath is not the hooked one.
    async fn fill_context(
        &self,
        inner: &MemStore,
        account: AccountId,
        id: EntryId,
    ) -> Result<FillContext, StoreError> {
        let mut context = inner.fill_context(account, id).await?;
        self.read(&mut context.legs);
        Ok(context)
    }
    async fn record_leg_trades(
        &self,
        inner: &MemStore,
        k: LegKey,
        side: oco_core::model::SaleSide,
        t: &[oco_core::model::Fill],
    ) -> Result<(), StoreError> {
        if self.fail_trades {
            return Err(StoreError::Unavailable(
                "leg trades: connection lost".into(),
            ));
        }
        inner.record_leg_trades(k, side, t).await
    }
}

/// An entry protected by two legs, a protector over a store that reads its
/// first leg `Claimed` (every time when `always`) while it is `Placed`, and
/// that leg's take-profit partly filled (0.1) with its update.
async fn partial_take_profit_read_before_placed(
    always: bool,
) -> (World, Protector, ExecutionUpdate) {
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
    assert!(matches!(leg.state, LegState::Placed { .. }), "{leg:?}");
    let store = ReadBeforePlaced::over(w.store.clone(), Some(leg.key), always, false);
    let protector = Protector::new(
        w.exchange.clone(),
        store,
        w.clock.clone(),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    );
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), q(dec!(0.1)));
    let tp = update(
        leg.ids.take_profit.as_str(),
        EntryStatus::PartiallyFilled,
        dec!(0.1),
        leg.take_profit.get(),
    );
    (w, protector, tp)
}

/// A take-profit's partial fill read against a leg still `Claimed`, whose
/// placer records it `Placed` before the move is written: the move loses its
/// compare-and-set. The fill still ended the list's stop, so the move is
/// made on the leg as read again, and the rest is protected.
#[tokio::test]
async fn a_partial_take_profit_racing_the_placers_record_still_reprotects_the_rest() {
    let (w, protector, tp) = partial_take_profit_read_before_placed(false).await;
    let followed = protector
        .follow(w.account, &tp, Source::Websocket)
        .await
        .unwrap();
    let Followed::Leg {
        state,
        protect: Some(report),
        ..
    } = followed
    else {
        panic!("the rest is protected again: {followed:?}")
    };
    assert_eq!(state, "canceled_externally");
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.9), "what is still held has a stop");
}

/// A take-profit's partial fill whose trade (with its commission) cannot
/// be written: the commission is bookkeeping, so the rest still gets its
/// stop (generation 1), the follow succeeds, and the failure is counted.
#[tokio::test]
async fn a_leg_trade_that_cannot_be_written_still_reprotects_the_rest() {
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
    let store = ReadBeforePlaced::over(w.store.clone(), None, false, true);
    let protector = Protector::new(
        w.exchange.clone(),
        store,
        w.clock.clone(),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    );
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), q(dec!(0.1)));
    let tp = ExecutionUpdate {
        status: EntryStatus::PartiallyFilled,
        ..sold(
            leg.ids.take_profit.as_str(),
            dec!(0.1),
            leg.take_profit.get(),
            900,
            dec!(0.0101),
            "USDT",
        )
    };
    let followed = protector
        .follow(w.account, &tp, Source::Websocket)
        .await
        .unwrap();
    let Followed::Leg {
        protect: Some(report),
        ..
    } = followed
    else {
        panic!("the rest is protected again: {followed:?}")
    };
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        legs.iter()
            .any(|l| l.key.generation == 1 && matches!(l.state, LegState::Placed { .. })),
        "generation 1 placed: {legs:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.9), "what is still held has a stop");
    assert_eq!(protector.leg_trade_failures(), 1);
}

/// The gateway's two steps: `follow_protecting` protects the rest of a
/// take-profit's partial fill and writes nothing of its commission; the
/// bookkeeping it hands back records it afterwards.
#[tokio::test]
async fn a_leg_trade_is_recorded_only_by_the_bookkeeping_after_protection() {
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
    let tp = ExecutionUpdate {
        status: EntryStatus::PartiallyFilled,
        ..sold(
            leg.ids.take_profit.as_str(),
            dec!(0.1),
            leg.take_profit.get(),
            901,
            dec!(0.0101),
            "USDT",
        )
    };
    let (followed, later) = w
        .protector
        .follow_protecting(w.account, &tp, Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(followed, Followed::Leg { protect: Some(ref r), .. }
            if matches!(r.outcome, ProtectOutcome::Placed { .. })),
        "{followed:?}"
    );
    assert_eq!(w.open_qty(), dec!(0.9), "the rest has its stop");
    let trades = |legs: Vec<oco_core::model::Leg>| {
        legs.into_iter().find(|l| l.key == leg.key).unwrap().trades
    };
    assert!(
        trades(w.store.legs(id).await.unwrap()).fees.is_empty(),
        "nothing of the commission written before the bookkeeping"
    );
    w.protector.bookkeep(later.unwrap()).await.unwrap();
    let recorded = trades(w.store.legs(id).await.unwrap());
    assert_eq!(recorded.fees.of(&Asset("USDT".into())), dec!(0.0101));
    assert_eq!(recorded.take_profit_qty, q(dec!(0.1)));
}

/// A leg whose move keeps losing its compare-and-set is reported as an
/// error (the gateway flags the account), not dropped.
#[tokio::test]
async fn a_leg_move_that_keeps_losing_is_an_error() {
    let (w, protector, tp) = partial_take_profit_read_before_placed(true).await;
    let err = protector
        .follow(w.account, &tp, Source::Websocket)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("kept changing"), "{err}");
}

/// An update of one of `leg`'s orders (`take_profit` or its stop) with
/// nothing executed, as the exchange sends it when the order leaves the book.
fn leg_order_gone(
    leg: &Leg,
    take_profit: bool,
    status: EntryStatus,
    reason: Option<&str>,
) -> ExecutionUpdate {
    let client_id = if take_profit {
        leg.ids.take_profit.as_str()
    } else {
        leg.ids.stop_loss.as_str()
    };
    ExecutionUpdate {
        side: Side::Sell,
        order_type: if take_profit {
            "LIMIT_MAKER"
        } else {
            "STOP_LOSS_LIMIT"
        }
        .into(),
        execution: if status == EntryStatus::Expired {
            "EXPIRED"
        } else {
            "CANCELED"
        }
        .into(),
        expiry_reason: reason.map(str::to_owned),
        ..update(client_id, status, Decimal::ZERO, dec!(0))
    }
}

/// An entry of 1 filled and protected by two lists: the world, the entry, its legs.
async fn protected_by_two_lists() -> (World, EntryId, Vec<Leg>) {
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
    assert_eq!(legs.len(), 2);
    assert!(
        legs.iter()
            .all(|l| matches!(l.state, LegState::Placed { .. })),
        "{legs:?}"
    );
    (w, id, legs)
}

/// When a stop triggers, Binance removes the take-profit before the stop
/// executes, with expiry reason `OCO_TRIGGER`; whether the removal reads
/// `EXPIRED` or `CANCELED` is not documented. Either way the list still works
/// (the triggered stop holds the coins): the leg stays placed, and nothing
/// is placed over coins that are not free.
#[tokio::test]
async fn a_take_profit_removed_as_canceled_by_its_triggered_stop_is_no_end() {
    for removed_as in [EntryStatus::Canceled, EntryStatus::Expired] {
        let (w, id, legs) = protected_by_two_lists().await;
        let leg = &legs[0];
        w.exchange.trigger_stop(leg.ids.list.as_str(), removed_as);
        let sent = w.exchange.oco_calls();
        let removed = leg_order_gone(leg, true, removed_as, Some("OCO_TRIGGER"));
        let followed = w
            .protector
            .follow(w.account, &removed, Source::Websocket)
            .await
            .unwrap();
        assert_eq!(
            followed,
            Followed::Leg {
                key: leg.key,
                state: "placed",
                protect: None,
            },
            "{removed_as}"
        );
        assert_eq!(w.store.legs(id).await.unwrap(), legs, "{removed_as}");
        assert_eq!(
            w.exchange.oco_calls(),
            sent,
            "nothing placed ({removed_as})"
        );
        assert_eq!(w.exchange.open_lists().len(), 2, "{removed_as}");
    }
}

/// Without an expiry reason (`eR` is a conditional field), an order canceled
/// with nothing executed may be the sibling a triggered stop removed, or a
/// list canceled by hand: one order's update does not end the leg. The
/// list's end (`listStatus` `ALL_DONE`, which the gateway follows with a
/// lookup of both orders) does: a list canceled by hand is then protected
/// again at once.
#[tokio::test]
async fn an_order_canceled_without_a_reason_leaves_the_leg_to_its_lists_end() {
    let (w, id, legs) = protected_by_two_lists().await;
    let creds = w.store.credentials(w.account).await.unwrap();
    let (triggered, by_hand) = (&legs[0], &legs[1]);
    w.exchange
        .trigger_stop(triggered.ids.list.as_str(), EntryStatus::Canceled);
    w.exchange.cancel_externally(by_hand.ids.list.as_str());
    let sent = w.exchange.oco_calls();
    for (leg, take_profit) in [(triggered, true), (by_hand, true), (by_hand, false)] {
        let gone = leg_order_gone(leg, take_profit, EntryStatus::Canceled, None);
        let followed = w
            .protector
            .follow(w.account, &gone, Source::Websocket)
            .await
            .unwrap();
        assert!(
            matches!(
                followed,
                Followed::Leg {
                    state: "placed",
                    protect: None,
                    ..
                }
            ),
            "{followed:?}"
        );
    }
    assert_eq!(w.store.legs(id).await.unwrap(), legs, "no leg moved");
    assert_eq!(w.exchange.oco_calls(), sent, "nothing placed");

    // The canceled list's end, as the gateway follows it.
    w.protector.refresh_leg(&creds, by_hand).await.unwrap();
    let report = w
        .protector
        .protect(id, None, Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    let after = w.store.legs(id).await.unwrap();
    assert_eq!(
        after.iter().find(|l| l.key == by_hand.key).unwrap().state,
        LegState::CanceledExternally {
            why: oco_core::state::ExternalEnd::Canceled
        }
    );
    assert!(
        after
            .iter()
            .any(|l| l.key.generation == 1 && matches!(l.state, LegState::Placed { .. })),
        "a new generation covers it: {after:?}"
    );
    assert_eq!(w.open_qty(), dec!(1));
}

/// One leg; its take-profit fills, and the fill's update is followed before
/// the placer records the list placed: the update ends the leg and closes the
/// entry. The placer's write, from its copy of the entry read before, must
/// not make it protected again.
#[tokio::test]
async fn a_take_profit_filled_before_its_placement_is_recorded_leaves_the_entry_closed() {
    let one_leg = ProtectionConfig {
        split: Decimal::ONE,
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let key = LegKey {
        entry: id,
        leg: oco_core::ids::LegIndex::First,
        generation: 0,
    };
    let ids = IdScheme::new("og").unwrap().oco(key).unwrap();
    // Bought 1 at 100; the take-profit (+1 %) sells it all at 101.
    let filled = update(
        ids.take_profit.as_str(),
        EntryStatus::Filled,
        dec!(1),
        dec!(101),
    );
    let (protector, account) = (w.protector.clone(), w.account);
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            protector
                .follow(account, &filled, Source::Websocket)
                .await
                .unwrap();
        })
    });
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
    assert_eq!(legs[0].state, LegState::TakeProfitFilled, "{legs:?}");
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    assert_eq!(entry.realized_quote, Some(dec!(1)));
}

/// A list's lookup lagged past the claim timeout, so its leg was called
/// ended outside, and the entry was closed as if its coins were sold outside
/// (realised −cost). The take-profit's fill update arrives after: the sale is
/// recorded and the entry's result follows it.
#[tokio::test]
async fn a_sale_recorded_after_the_entry_closed_updates_its_result() {
    let one_leg = ProtectionConfig {
        split: Decimal::ONE,
        ..ProtectionConfig::DEFAULT
    };
    let w = world(one_leg).await;
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
    w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
    w.clock.advance(Duration::from_secs(31));
    w.exchange.lag_next_lookups(1);
    let creds = w.store.credentials(w.account).await.unwrap();
    w.protector.refresh_leg(&creds, &leg).await.unwrap();
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let closed = w.store.entry(id).await.unwrap();
    assert_eq!(closed.protection, Protection::Closed);
    assert_eq!(closed.realized_quote, Some(dec!(-100)), "no sale known yet");

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
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    assert_eq!(entry.realized_quote, Some(dec!(1)), "sold 1 at 101");
    assert!(
        w.store
            .events(id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "realized"),
    );
}

/// What a take-profit or stop of ours sold in one trade, as the stream
/// reports it: its own trade id, commission and commission asset.
fn sold(
    client_id: &str,
    qty: Decimal,
    price: Decimal,
    trade_id: i64,
    fee: Decimal,
    fee_asset: &str,
) -> ExecutionUpdate {
    ExecutionUpdate {
        side: Side::Sell,
        order_type: "LIMIT_MAKER".into(),
        fill: Some(Fill {
            trade_id,
            price: p(price),
            qty: q(qty),
            commission: fee,
            commission_asset: Asset(fee_asset.into()),
            time: Millis(999_100),
        }),
        ..update(client_id, EntryStatus::Filled, qty, price)
    }
}

/// Bought 1 at 100 on the stream, protected by two lists of 0.5 (TP 101 and
/// 102); then each take-profit fills in one trade charged `fee` in
/// `fee_asset`, each update followed `times` times.
async fn both_take_profits_sold(fee: Decimal, fee_asset: &str, times: usize) -> (World, EntryId) {
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
    for (n, leg) in w.store.legs(id).await.unwrap().into_iter().enumerate() {
        w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
        let tp = sold(
            leg.ids.take_profit.as_str(),
            leg.qty.get(),
            leg.take_profit.get(),
            700 + i64::try_from(n).unwrap(),
            fee,
            fee_asset,
        );
        for _ in 0..times {
            w.protector
                .follow(w.account, &tp, Source::Websocket)
                .await
                .unwrap();
        }
    }
    (w, id)
}

#[tokio::test]
async fn quote_commissions_of_the_take_profits_lower_the_result() {
    let (w, id) = both_take_profits_sold(dec!(0.0505), "USDT", 1).await;
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    // Sold 0.5 at 101 and 0.5 at 102 for 100, less 0.0505 USDT twice.
    assert_eq!(entry.realized_quote, Some(dec!(1.399)));
    let legs = w.store.legs(id).await.unwrap();
    for leg in &legs {
        assert_eq!(leg.trades.fees.of(&Asset("USDT".into())), dec!(0.0505));
        assert_eq!(
            leg.trades.take_profit_qty, leg.qty,
            "the trade covers the sale"
        );
    }
    assert!(
        oco_core::protect::other_fees(&entry, &legs).is_empty(),
        "nothing charged outside the quote"
    );
}

#[tokio::test]
async fn a_commission_in_bnb_is_kept_apart_from_the_result() {
    let (w, id) = both_take_profits_sold(dec!(0.0001), "BNB", 1).await;
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    assert_eq!(entry.realized_quote, Some(dec!(1.5)), "no BNB in the quote");
    let legs = w.store.legs(id).await.unwrap();
    let other = oco_core::protect::other_fees(&entry, &legs);
    assert_eq!(other.of(&Asset("BNB".into())), dec!(0.0002));
    assert_eq!(other.iter().count(), 1, "{other:?}");
}

#[tokio::test]
async fn a_trade_reported_twice_counts_once() {
    let (w, id) = both_take_profits_sold(dec!(0.0505), "USDT", 2).await;
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(
        entry.realized_quote,
        Some(dec!(1.399)),
        "each commission once"
    );
    for leg in w.store.legs(id).await.unwrap() {
        assert_eq!(leg.trades.take_profit_qty, leg.qty);
    }
}

/// The take-profits' fills reach the gateway only after the entry closed
/// (a lookup settled it first, their commissions unread): each trade
/// recounts the result with its commission.
#[tokio::test]
async fn a_commission_learnt_after_the_close_recounts_the_result() {
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
    let creds = w.store.credentials(w.account).await.unwrap();
    for leg in &legs {
        w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
        w.protector.refresh_leg(&creds, leg).await.unwrap();
    }
    // The close reads no trades: learnt by lookup, the sales' commissions
    // are left out, and the entry says so.
    w.protector.protect(id, None, Source::Sync).await.unwrap();
    let closed = w.store.entry(id).await.unwrap();
    assert_eq!(closed.protection, Protection::Closed);
    assert_eq!(closed.realized_quote, Some(dec!(1.5)));
    assert!(!closed.fees_complete, "sales learnt without their trades");
    for (n, leg) in legs.iter().enumerate() {
        let tp = sold(
            leg.ids.take_profit.as_str(),
            leg.qty.get(),
            leg.take_profit.get(),
            800 + i64::try_from(n).unwrap(),
            dec!(0.0505),
            "USDT",
        );
        w.protector
            .follow(w.account, &tp, Source::Websocket)
            .await
            .unwrap();
    }
    let entry = w.store.entry(id).await.unwrap();
    assert_eq!(entry.protection, Protection::Closed);
    assert_eq!(entry.realized_quote, Some(dec!(1.399)));
    assert!(entry.fees_complete, "every sale's trades recorded");
}

/// What the open lists hold under a stop still working: a list whose
/// take-profit filled in part lost its stop, and its rest holds none.
fn stopped_qty(w: &World) -> Decimal {
    w.exchange
        .open_lists()
        .iter()
        .filter(|l| !l.stop_loss.status.is_final())
        .map(|l| l.request.qty.get())
        .sum()
}

/// Hooks on the in-memory store: once, while the placer records its
/// outcomes, the take-profit of the entry's first list fills in part (0.1)
/// and the stream's update of it is followed by another protector, as the
/// gateway would while the placer's other leg is still claimed. Before the
/// outcomes' one write when every list was acknowledged; before the second
/// leg's own write when they are written leg by leg (`leg_by_leg`).
struct EndsWhilePlacing {
    exchange: Arc<oco_core::testing::FakeExchange>,
    stream: Arc<Protector>,
    account: AccountId,
    leg_by_leg: bool,
    armed: std::sync::atomic::AtomicBool,
    followed: Mutex<Option<Followed>>,
}

impl EndsWhilePlacing {
    async fn end_the_first(&self, inner: &MemStore, entry: EntryId) -> Result<(), StoreError> {
        if !self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let legs = inner.legs(entry).await?;
        let first = legs
            .iter()
            .find(|l| l.key.leg == oco_core::ids::LegIndex::First)
            .unwrap();
        self.exchange
            .fill_take_profit(first.ids.list.as_str(), q(dec!(0.1)));
        let tp = update(
            first.ids.take_profit.as_str(),
            EntryStatus::PartiallyFilled,
            dec!(0.1),
            first.take_profit.get(),
        );
        let followed = self
            .stream
            .follow(self.account, &tp, Source::Websocket)
            .await
            .unwrap();
        *self.followed.lock().unwrap() = Some(followed);
        Ok(())
    }
}

#[async_trait]
impl StoreHooks<MemStore> for EndsWhilePlacing {
    async fn record_outcomes(
        &self,
        inner: &MemStore,
        entry: EntryId,
        updates: &[oco_core::model::LegUpdate],
        events: &[oco_core::model::EntryEventRecord],
        protection: Option<&Protection>,
    ) -> Result<oco_core::ports::RecordedOutcomes, StoreError> {
        if !self.leg_by_leg {
            self.end_the_first(inner, entry).await?;
        }
        inner
            .record_outcomes(entry, updates, events, protection)
            .await
    }

    async fn update_leg(
        &self,
        inner: &MemStore,
        update: &oco_core::model::LegUpdate,
    ) -> Result<bool, StoreError> {
        if self.leg_by_leg
            && update.key.leg == oco_core::ids::LegIndex::Second
            && update.from == "claimed"
        {
            self.end_the_first(inner, update.key.entry).await?;
        }
        inner.update_leg(update).await
    }
}

/// Places a fill of 1 through a protector over [`EndsWhilePlacing`], the
/// first list's answer lost (found by its lookup) when `lost_answer`, and
/// checks that the placer, not the stream's follow-up (which finds the
/// generation in flight), gets every coin still held a stop.
async fn a_leg_ends_while_its_generation_is_placed(lost_answer: bool) {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let hooks = Arc::new(EndsWhilePlacing {
        exchange: w.exchange.clone(),
        stream: w.protector.clone(),
        account: w.account,
        leg_by_leg: lost_answer,
        armed: std::sync::atomic::AtomicBool::new(true),
        followed: Mutex::new(None),
    });
    let placer = Protector::new(
        w.exchange.clone(),
        Arc::new(Hooked::new(w.store.clone(), hooks.clone())),
        w.clock.clone(),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    );
    if lost_answer {
        w.exchange
            .push_oco_fault(oco_core::testing::OcoFault::UnknownAfterApply);
    }
    let fill = evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0), "BNB")],
    );
    let report = placer
        .protect(id, Some(&fill), Source::Direct)
        .await
        .unwrap();

    let followed = hooks.followed.lock().unwrap().take();
    assert!(
        matches!(
            &followed,
            Some(Followed::Leg { state: "canceled_externally", protect: Some(r), .. })
                if r.outcome == ProtectOutcome::Nothing(oco_core::protect::Idle::InFlight)
        ),
        "the stream's follow-up found the placement in flight: {followed:?}"
    );
    assert!(
        matches!(report.outcome, ProtectOutcome::Placed { .. }),
        "{report:?}"
    );
    let legs = w.store.legs(id).await.unwrap();
    assert!(
        legs.iter()
            .any(|l| l.key.generation == 1 && matches!(l.state, LegState::Placed { .. })),
        "a new generation covers the coins: {legs:?}"
    );
    assert_eq!(
        stopped_qty(&w),
        dec!(0.9),
        "every coin still held has a stop: {legs:?}"
    );
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}

/// Both lists of a fill go out; before their outcomes are written, the
/// first one's take-profit fills in part, which drops its stop. The
/// stream's follow-up finds the other leg still claimed and leaves the
/// entry to the placer. The placer's write cannot record that list
/// placed: it ended before. The placer must not call the entry protected
/// on its strength, but plan again in the same call: the rest is canceled
/// and every coin still held gets a stop from a new generation.
#[tokio::test]
async fn a_leg_that_ends_before_its_placement_is_recorded_is_protected_again_by_the_placer() {
    a_leg_ends_while_its_generation_is_placed(false).await;
}

/// The same with the first list's answer lost: the outcomes are written
/// leg by leg, the first found by its lookup and recorded placed, and its
/// take-profit fills in part while the second is still claimed.
#[tokio::test]
async fn a_leg_that_ends_while_another_is_recorded_is_protected_again_by_the_placer() {
    a_leg_ends_while_its_generation_is_placed(true).await;
}

/// A take-profit fills 0.1 of its list's 0.3 and drops its stop; the
/// rounds that follow cancel its rest, but the lookup after each cancel
/// lags (the rest's sale unread), so they plan only the coins it does not
/// lock: the entry's second fill gets lists of its own, beside a rest
/// without a stop, and the call fails rather than say placed. The rest's
/// own update, `CANCELED`, then reaches the stream: no event moves a rest's
/// leg, yet its coins are free, and its end is protected at once.
#[tokio::test]
async fn a_take_profit_rests_cancel_on_the_stream_protects_its_coins() {
    let w = world(ProtectionConfig::DEFAULT).await;
    let id = w.entry(EntryLevels::default()).await;
    w.credit(dec!(1));
    let client_id = w.store.entry(id).await.unwrap().client_id;
    let first = update(
        client_id.as_str(),
        EntryStatus::PartiallyFilled,
        dec!(0.6),
        dec!(100),
    );
    w.protector
        .follow(w.account, &first, Source::Websocket)
        .await
        .unwrap();
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(legs.len(), 2, "{legs:?}");
    let leg = legs.into_iter().next().unwrap();
    assert_eq!(leg.qty, q(dec!(0.3)));

    w.exchange.lag_next_lookups(1);
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), q(dec!(0.1)));
    let part = update(
        leg.ids.take_profit.as_str(),
        EntryStatus::PartiallyFilled,
        dec!(0.1),
        leg.take_profit.get(),
    );
    let followed = w
        .protector
        .follow(w.account, &part, Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(&followed, Followed::Leg { protect: Some(r), .. }
            if matches!(r.outcome, ProtectOutcome::Failed { .. })),
        "the rest's sale unread: {followed:?}"
    );

    w.exchange.lag_next_lookups(1);
    let mut second = update(client_id.as_str(), EntryStatus::Filled, dec!(1), dec!(100));
    if let Some(fill) = second.fill.as_mut() {
        fill.trade_id = 12;
        fill.qty = q(dec!(0.4));
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
        matches!(report.outcome, ProtectOutcome::Failed { ref errors }
            if errors[0].contains("rest of 0.2 still open")),
        "lists placed beside a rest without a stop: {report:?}"
    );
    assert_eq!(stopped_qty(&w), dec!(0.7), "all but the rest's coins");

    // The rest's own update: canceled (by the round), 0.1 of it executed.
    let canceled = ExecutionUpdate {
        side: Side::Sell,
        order_type: "LIMIT_MAKER".into(),
        execution: "CANCELED".into(),
        fill: None,
        ..update(
            leg.ids.take_profit.as_str(),
            EntryStatus::Canceled,
            dec!(0.1),
            leg.take_profit.get(),
        )
    };
    let followed = w
        .protector
        .follow(w.account, &canceled, Source::Websocket)
        .await
        .unwrap();
    assert!(
        matches!(&followed, Followed::Leg { protect: Some(r), .. }
            if matches!(r.outcome, ProtectOutcome::Placed { .. })),
        "the rest's end is protected: {followed:?}"
    );
    let legs = w.store.legs(id).await.unwrap();
    assert_eq!(
        legs.iter().find(|l| l.key == leg.key).unwrap().state,
        LegState::Replaced,
        "{legs:?}"
    );
    assert_eq!(stopped_qty(&w), dec!(0.9), "every coin held has a stop");
    assert!(matches!(
        w.store.entry(id).await.unwrap().protection,
        Protection::Protected { .. }
    ));
}
