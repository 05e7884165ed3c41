//! Invariants of planning over random rules, fills, fees and holdings.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use oco_core::levels::{
    EntryLevels, LevelPercents, LevelsError, StopKind, StopSubstitute, resolve_levels,
};
use oco_core::plan::{PlanInput, Unprotectable, plan_protection};
use oco_core::symbol::{OrderTypes, SymbolRules};
use oco_core::testing::btcusdt_rules;
use oco_core::{Price, Qty, StepSize, TickSize};
use proptest::prelude::*;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn rules(tick: Decimal, step: Decimal, min_qty_steps: u32, min_notional: Decimal) -> SymbolRules {
    let mut r = btcusdt_rules();
    r.tick = TickSize::new(tick).unwrap();
    r.min_price = Some(Price::new(tick).unwrap());
    r.step = StepSize::new(step).unwrap();
    r.min_qty = Qty::new(step * Decimal::from(min_qty_steps)).unwrap();
    r.max_qty = None;
    r.min_notional = min_notional;
    r.max_notional = None;
    r
}

fn decimal(mantissa: i64, scale: u32) -> Decimal {
    Decimal::new(mantissa, scale)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn plans_never_exceed_the_position_nor_break_a_filter(
        tick_exp in 0u32..5,
        step_exp in 0u32..7,
        min_qty_steps in 1u32..20,
        min_notional in 0i64..50,
        fill_m in 100i64..10_000_000,
        filled_m in 1i64..10_000_000,
        fee_permille in 0i64..3,
        held_pct in 0i64..=100,
        split_pct in 1i64..=100,
        budget in proptest::option::of(0u32..4),
        max_steps in proptest::option::of(1i64..2_000_000),
        tp1 in 1i64..500,
        tp_gap in 0i64..500,
        sl in 1i64..500,
    ) {
        let mut r = rules(decimal(1, tick_exp), decimal(1, step_exp), min_qty_steps, Decimal::from(min_notional));
        r.max_qty = max_steps.map(|n| Qty::new(r.step.get() * Decimal::from(n)).unwrap());
        let fill = Price::new(decimal(fill_m, 2)).unwrap();
        let filled = decimal(filled_m, 5);
        let net = filled - filled * Decimal::from(fee_permille) / dec!(1000);
        let held = net * Decimal::from(held_pct) / dec!(100);
        let position = Qty::new(held.min(net)).unwrap();
        let pct = LevelPercents { tp1: decimal(tp1, 2), tp2: decimal(tp1 + tp_gap, 2), sl: decimal(sl, 2) };
        let levels = match resolve_levels(EntryLevels::default(), Some(pct), fill, &r, StopKind::Limit { offset_pct: dec!(0.5) }) {
            Ok(levels) => levels,
            // Percentages always put the levels on their sides of the fill: rounding
            // alone never makes them look passed.
            Err(err @ LevelsError::Order { .. }) => return Err(TestCaseError::fail(format!("{err}"))),
            Err(_) => return Ok(()),
        };
        prop_assert!(levels.stop < fill && fill < levels.tp1 && levels.tp1 <= levels.tp2);
        prop_assert!(levels.stop_limit.unwrap() < levels.stop);
        // Rounding never widens the stop nor pushes a target further than asked,
        // unless it would snap the level onto the fill: then no tick lies between.
        let tick = r.tick.get();
        prop_assert!(levels.stop.get() >= fill.get() * (dec!(1) - pct.sl / dec!(100)) || levels.stop.get() + tick >= fill.get());
        prop_assert!(levels.tp1.get() <= fill.get() * (dec!(1) + pct.tp1 / dec!(100)) || levels.tp1.get() - tick <= fill.get());
        let input = PlanInput { rules: &r, levels, reference: fill, position, split: decimal(split_pct, 2), stop_budget: budget };
        match plan_protection(&input) {
            Ok(plan) => {
                prop_assert!(!plan.legs.is_empty() && plan.legs.len() <= 2);
                prop_assert!(plan.total() <= position, "legs {} exceed position {}", plan.total(), position);
                if budget == Some(1) { prop_assert_eq!(plan.legs.len(), 1); }
                // Whatever the lists leave above the step's floor is said, with its numbers.
                let floored = position.floor_to(r.step);
                match plan.short {
                    None => prop_assert!(plan.total() >= floored, "{} of {} silently uncovered", plan.total(), floored),
                    Some(short) => {
                        prop_assert_eq!(short.left.plus(plan.total()), floored);
                        prop_assert!(plan.legs.iter().all(|l| l.qty == short.max_qty), "{plan:?}");
                        prop_assert!(r.max_qty.is_none_or(|m| short.max_qty <= m), "{short:?}");
                        if budget.is_none_or(|b| b >= 2) { prop_assert_eq!(plan.legs.len(), 2, "{:?}", plan); }
                    }
                }
                for leg in &plan.legs {
                    prop_assert!(r.check_qty(leg.qty).is_ok(), "{:?}", r.check_qty(leg.qty));
                    prop_assert!(r.check_notional(leg.qty, leg.stop_limit.unwrap()).is_ok());
                    prop_assert!(r.check_price(leg.take_profit).is_ok() && r.check_price(leg.stop).is_ok());
                    prop_assert!(leg.stop < fill && fill < leg.take_profit);
                }
            }
            Err(Unprotectable::Dust { floored, .. }) => {
                // Dust only when too small for one list: never for being too large.
                let too_small = floored < r.min_qty || floored.notional(levels.stop_limit.unwrap()) < r.min_notional;
                // Rules under which no list passes at all: `maxQty` worth less than
                // the minimum notional (no real symbol has them).
                let no_list_fits = r.max_qty.is_some_and(|m| m.floor_to(r.step).notional(levels.stop_limit.unwrap()) < r.min_notional);
                prop_assert!(too_small || no_list_fits, "{floored} called dust");
            }
            Err(Unprotectable::NoStopBudget { .. }) => prop_assert_eq!(budget, Some(0)),
            Err(Unprotectable::Filter(_)) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}

#[test]
fn a_leg_under_the_minimum_merges_into_the_other() {
    let r = btcusdt_rules();
    let fill = Price::new(dec!(100)).unwrap();
    let levels = resolve_levels(
        EntryLevels::default(),
        None,
        fill,
        &r,
        StopKind::Limit {
            offset_pct: dec!(0.5),
        },
    )
    .unwrap();
    // 0.08 BTC at a 98.5 stop limit is 7.88 USDT; halves of 3.94 are under the 5 USDT minimum.
    let input = PlanInput {
        rules: &r,
        levels,
        reference: fill,
        position: Qty::new(dec!(0.08)).unwrap(),
        split: dec!(0.5),
        stop_budget: None,
    };
    let plan = plan_protection(&input).unwrap();
    assert_eq!(plan.legs.len(), 1);
    assert_eq!(plan.legs[0].qty.get(), dec!(0.08));
    assert_eq!(plan.degraded, Some(oco_core::plan::Degraded::Merged));
}

#[test]
fn levels_in_the_wrong_order_are_refused_with_the_values() {
    let r = btcusdt_rules();
    let fill = Price::new(dec!(100)).unwrap();
    let bad = EntryLevels {
        tp1: Some(Price::new(dec!(99)).unwrap()),
        tp2: None,
        sl: Some(Price::new(dec!(98)).unwrap()),
    };
    let err = resolve_levels(bad, None, fill, &r, StopKind::Market).unwrap_err();
    assert_eq!(
        err.to_string(),
        "levels must satisfy sl < fill < tp1 <= tp2, got sl 98, fill 100, tp1 99, tp2 99"
    );
}

#[test]
fn levels_rounded_onto_the_fill_move_one_tick_out() {
    let mut r = btcusdt_rules();
    r.tick = TickSize::new(dec!(2)).unwrap();
    let fill = Price::new(dec!(100)).unwrap();
    let levels = resolve_levels(
        EntryLevels::default(),
        None,
        fill,
        &r,
        StopKind::Limit {
            offset_pct: dec!(0.5),
        },
    )
    .unwrap();
    let got = (
        levels.tp1.get(),
        levels.tp2.get(),
        levels.stop.get(),
        levels.stop_limit.map(Price::get),
    );
    assert_eq!(got, (dec!(102), dec!(102), dec!(98), Some(dec!(96))));
    // Off the grid: the nearest ticks on either side, not fill ± tick.
    let levels = resolve_levels(
        EntryLevels::default(),
        None,
        Price::new(dec!(100.5)).unwrap(),
        &r,
        StopKind::Market,
    )
    .unwrap();
    assert_eq!(
        (levels.tp1.get(), levels.stop.get()),
        (dec!(102), dec!(100))
    );
}

#[test]
fn a_fill_with_no_tick_under_it_has_no_stop() {
    let mut r = btcusdt_rules();
    r.tick = TickSize::new(dec!(2)).unwrap();
    let fill = Price::new(dec!(1.5)).unwrap();
    let err = resolve_levels(EntryLevels::default(), None, fill, &r, StopKind::Market).unwrap_err();
    assert_eq!(
        err,
        LevelsError::NoTickBelow {
            fill,
            tick: dec!(2)
        }
    );
}

/// `btcusdt_rules` with `LOT_SIZE.maxQty` at `max`, planned at the default
/// levels around a fill of 100.
fn plan_under_max_qty(
    max: Decimal,
    position: Decimal,
    split: Decimal,
    stop_budget: Option<u32>,
) -> oco_core::plan::Plan {
    let mut r = btcusdt_rules();
    r.max_qty = Some(Qty::new(max).unwrap());
    let fill = Price::new(dec!(100)).unwrap();
    let levels = resolve_levels(
        EntryLevels::default(),
        None,
        fill,
        &r,
        StopKind::Limit {
            offset_pct: dec!(0.5),
        },
    )
    .unwrap();
    plan_protection(&PlanInput {
        rules: &r,
        levels,
        reference: fill,
        position: Qty::new(position).unwrap(),
        split,
        stop_budget,
    })
    .unwrap()
}

fn leg_qtys(plan: &oco_core::plan::Plan) -> Vec<Decimal> {
    plan.legs.iter().map(|l| l.qty.get()).collect()
}

#[test]
fn a_leg_over_max_qty_hands_its_excess_to_the_other() {
    // 0.8 of 0.5 is 0.4, over a maxQty of 0.3: the second leg takes the rest.
    let plan = plan_under_max_qty(dec!(0.3), dec!(0.5), dec!(0.8), None);
    assert_eq!(leg_qtys(&plan), vec![dec!(0.3), dec!(0.2)]);
    // One target configured, more than one list can hold: a second list too.
    let plan = plan_under_max_qty(dec!(0.3), dec!(0.5), dec!(1), None);
    assert_eq!(leg_qtys(&plan), vec![dec!(0.3), dec!(0.2)]);
    // The configured split would leave a second leg under the minimum: even halves.
    let plan = plan_under_max_qty(dec!(0.3), dec!(0.30001), dec!(1), None);
    assert_eq!(leg_qtys(&plan), vec![dec!(0.15), dec!(0.15001)]);
    assert_eq!(plan.uncovered, Qty::ZERO);
}

#[test]
fn a_position_no_lists_can_hold_says_what_is_left_without_a_stop() {
    let plan = plan_under_max_qty(dec!(0.3), dec!(1), dec!(0.5), None);
    assert_eq!(leg_qtys(&plan), vec![dec!(0.3), dec!(0.3)]);
    assert_eq!(plan.uncovered.get(), dec!(0.4));
    let short = plan.short.expect("a shortfall");
    assert_eq!(
        short.to_string(),
        "position 1 is over LOT_SIZE maxQty 0.3: 2 lists cover 0.6, 0.4 left without a stop (at most two lists per entry)"
    );
    // One stop left on the symbol: one list, and the reason says so.
    let plan = plan_under_max_qty(dec!(0.3), dec!(0.5), dec!(0.5), Some(1));
    assert_eq!(leg_qtys(&plan), vec![dec!(0.3)]);
    let short = plan.short.expect("a shortfall");
    assert_eq!(
        short.to_string(),
        "position 0.5 is over LOT_SIZE maxQty 0.3: 1 list covers 0.3, 0.2 left without a stop (the symbol's stop-order budget takes one more)"
    );
    // What fits has no shortfall.
    assert_eq!(
        plan_under_max_qty(dec!(0.3), dec!(0.6), dec!(0.5), None).short,
        None
    );
}

/// Binance caps a list's notional too (`NOTIONAL.maxNotional`, 9,000,000
/// USDT on BTCUSDT): a position over what one list may hold is split and
/// its shortfall said as for `maxQty`, never called dust.
#[test]
fn a_position_over_max_notional_is_split_not_dust() {
    let plan_under = |position: Decimal| {
        let mut r = btcusdt_rules();
        r.max_qty = None;
        r.max_notional = Some(dec!(50));
        let fill = Price::new(dec!(100)).unwrap();
        let levels = resolve_levels(
            EntryLevels::default(),
            None,
            fill,
            &r,
            StopKind::Limit {
                offset_pct: dec!(0.5),
            },
        )
        .unwrap();
        let plan = plan_protection(&PlanInput {
            rules: &r,
            levels,
            reference: fill,
            position: Qty::new(position).unwrap(),
            split: dec!(0.5),
            stop_budget: None,
        });
        (plan, levels, r)
    };
    // Whole, 1.2 × 102 is over 50 at the second target: two lists of what
    // 50 buys there, the rest said.
    let (plan, levels, r) = plan_under(dec!(1.2));
    let plan = plan.unwrap_or_else(|e| panic!("a position over maxNotional is not dust: {e}"));
    let most = (dec!(50) / levels.tp2.get())
        .round_dp_with_strategy(5, rust_decimal::RoundingStrategy::ToZero);
    assert_eq!(leg_qtys(&plan), vec![most, most]);
    for leg in &plan.legs {
        assert!(r.check_notional(leg.qty, leg.take_profit).is_ok());
    }
    let short = plan.short.expect("a shortfall");
    assert_eq!(short.left.get(), dec!(1.2) - most * dec!(2));
    assert!(
        short.to_string().contains("NOTIONAL maxNotional"),
        "{short}"
    );
    // Two lists can hold 0.6: no shortfall.
    let (plan, _, _) = plan_under(dec!(0.6));
    assert_eq!(plan.unwrap().short, None);
}

/// The stop and its limit planned for a fill of 100 at the default levels,
/// on rules allowing `types`, with `kind` asked.
fn stop_planned(
    types: OrderTypes,
    kind: StopKind,
) -> Result<(Price, Option<Price>, Option<StopSubstitute>), Unprotectable> {
    let r = SymbolRules {
        order_types: types,
        ..btcusdt_rules()
    };
    let fill = Price::new(dec!(100)).unwrap();
    let levels = resolve_levels(EntryLevels::default(), None, fill, &r, kind).unwrap();
    let plan = plan_protection(&PlanInput {
        rules: &r,
        levels,
        reference: fill,
        position: Qty::new(dec!(1)).unwrap(),
        split: dec!(0.5),
        stop_budget: None,
    })?;
    assert!(plan.legs.iter().all(|l| l.stop_limit == levels.stop_limit));
    assert_eq!(plan.stop_substitute, levels.substitute);
    Ok((levels.stop, levels.stop_limit, plan.stop_substitute))
}

#[test]
fn a_stop_kind_the_symbol_lacks_gives_way_to_the_one_it_has() {
    let price = |d| Price::new(d).unwrap();
    let limit = StopKind::Limit {
        offset_pct: dec!(0.25),
    };
    // BTCUSDT's types: a market stop becomes the default stop-limit (0.5 % under).
    assert_eq!(
        stop_planned(OrderTypes::MAJOR, StopKind::Market).unwrap(),
        (
            price(dec!(99)),
            Some(price(dec!(98.50))),
            Some(StopSubstitute {
                asked: StopKind::Market,
                placed: StopKind::DEFAULT_LIMIT
            })
        )
    );
    // Asked kinds the symbol has are kept.
    assert_eq!(
        stop_planned(OrderTypes::ALL, StopKind::Market).unwrap(),
        (price(dec!(99)), None, None)
    );
    assert_eq!(
        stop_planned(OrderTypes::MAJOR, limit).unwrap(),
        (price(dec!(99)), Some(price(dec!(98.75))), None)
    );
    // A symbol with only the market stop: a stop-limit becomes one.
    let market_only = OrderTypes {
        stop_loss_limit: false,
        ..OrderTypes::ALL
    };
    assert_eq!(
        stop_planned(market_only, limit).unwrap(),
        (
            price(dec!(99)),
            None,
            Some(StopSubstitute {
                asked: limit,
                placed: StopKind::Market
            })
        )
    );
    // Neither, or no LIMIT_MAKER for the take-profit: unprotectable, said.
    let none = OrderTypes {
        stop_loss: false,
        stop_loss_limit: false,
        limit_maker: true,
    };
    let err = stop_planned(none, StopKind::Market).unwrap_err();
    assert_eq!(
        err.to_string(),
        "BTCUSDT does not accept stop orders (neither STOP_LOSS nor STOP_LOSS_LIMIT)"
    );
    let no_maker = OrderTypes {
        limit_maker: false,
        ..OrderTypes::ALL
    };
    assert!(matches!(
        stop_planned(no_maker, limit),
        Err(Unprotectable::SymbolClosed { .. })
    ));
}
