//! Turning a position into OCO legs that the exchange will accept.

use std::fmt;

use rust_decimal::Decimal;

use crate::ids::LegIndex;
use crate::levels::{ResolvedLevels, StopSubstitute};
use crate::money::{Price, Qty};
use crate::symbol::{FilterViolation, SymbolRules};

/// Everything [`plan_protection`] needs; all of it facts, none of it I/O.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// The symbol's filters.
    pub rules: &'a SymbolRules,
    /// Tick-aligned levels.
    pub levels: ResolvedLevels,
    /// Reference for `PERCENT_PRICE_BY_SIDE` (the average fill price).
    pub reference: Price,
    /// Base quantity to protect: filled − base commission − already sold,
    /// capped by what the account holds.
    pub position: Qty,
    /// Share of the position on leg 1, in `(0, 1]`; the rest goes on leg 2.
    pub split: Decimal,
    /// How many more stop orders the symbol takes for this account
    /// (`None`: unknown, assume the filter allows two).
    pub stop_budget: Option<u32>,
}

/// One OCO to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedLeg {
    /// Which pair.
    pub index: LegIndex,
    /// Quantity of both orders of the list.
    pub qty: Qty,
    /// `LIMIT_MAKER` price above.
    pub take_profit: Price,
    /// Stop trigger below.
    pub stop: Price,
    /// Stop limit (`None`: market stop).
    pub stop_limit: Option<Price>,
}

/// Why fewer legs were planned than configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degraded {
    /// A leg was under the minimum and merged into the other.
    Merged,
    /// The symbol's stop-order budget took only one more stop.
    StopBudget,
}

/// The legs for one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One or two legs; their quantities sum to at most the position.
    pub legs: Vec<PlannedLeg>,
    /// What the legs leave out: what flooring to the step left, and any
    /// [`Plan::short`].
    pub uncovered: Qty,
    /// Set when the plan has fewer legs than configured.
    pub degraded: Option<Degraded>,
    /// Set when the legs cannot hold the whole floored position (each list
    /// is capped at `LOT_SIZE.maxQty` and by `NOTIONAL.maxNotional`): the
    /// coins left without a stop.
    pub short: Option<Shortfall>,
    /// Set when the legs carry another stop kind than the one asked, the
    /// symbol not allowing it (from [`ResolvedLevels::substitute`]).
    pub stop_substitute: Option<StopSubstitute>,
}

/// Coins of a position the planned lists cannot hold, each list being capped
/// at `LOT_SIZE.maxQty` or by `NOTIONAL.maxNotional`. A generation has at most two lists (leg numbers 1
/// and 2 in the client ids and in the store) and replaces the lists before
/// it rather than adding to them, so more lists are not an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// The position planned for.
    pub position: Qty,
    /// The most one list may hold, floored to the step: `LOT_SIZE.maxQty`,
    /// or less where `NOTIONAL.maxNotional` binds first ([`Shortfall::bound`]).
    pub max_qty: Qty,
    /// How many lists were planned.
    pub lists: usize,
    /// What they hold.
    pub covered: Qty,
    /// Floored coins they leave without a stop.
    pub left: Qty,
    /// Fewer lists than two because of the symbol's stop-order budget.
    pub stop_budget: bool,
    /// Which filter caps a list: `max_qty` is its quantity under it.
    pub bound: ListBound,
}

/// The filter that caps one list's quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListBound {
    /// `LOT_SIZE.maxQty`.
    MaxQty,
    /// `NOTIONAL.maxNotional`, at the highest price a list sells at.
    MaxNotional,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lists, cover) = if self.lists == 1 {
            ("list", "covers")
        } else {
            ("lists", "cover")
        };
        let why = if self.stop_budget {
            "the symbol's stop-order budget takes one more"
        } else {
            "at most two lists per entry"
        };
        let bound = match self.bound {
            ListBound::MaxQty => "over LOT_SIZE maxQty",
            ListBound::MaxNotional => "over what NOTIONAL maxNotional lets one list hold,",
        };
        write!(
            f,
            "position {} is {bound} {}: {} {lists} {cover} {}, {} left without a stop ({why})",
            self.position, self.max_qty, self.lists, self.covered, self.left
        )
    }
}

impl Plan {
    /// Sum of the legs' quantities.
    pub fn total(&self) -> Qty {
        self.legs.iter().map(|l| l.qty).sum()
    }
}

/// A position that cannot be protected, with the numbers that say why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unprotectable {
    /// Too small for any leg.
    #[error(
        "dust: position {position} floors to {floored}, under min qty {min_qty} or notional {notional} under min {min_notional}"
    )]
    Dust {
        /// The position.
        position: Qty,
        /// Floored to the step.
        floored: Qty,
        /// `LOT_SIZE.minQty`.
        min_qty: Qty,
        /// `floored × lowest leg price`.
        notional: Decimal,
        /// The minimum notional.
        min_notional: Decimal,
    },
    /// No stop order can be added on this symbol.
    #[error("stop-order budget exhausted on {symbol}: MAX_NUM_ALGO_ORDERS leaves no room")]
    NoStopBudget {
        /// The symbol.
        symbol: String,
    },
    /// The symbol accepts no new orders, no OCO, or not the order types
    /// of one.
    #[error("{symbol} does not accept {what}")]
    SymbolClosed {
        /// The symbol.
        symbol: String,
        /// `new orders`, `OCO lists`, or the order types it lacks.
        what: &'static str,
    },
    /// A level breaks a filter the exchange would enforce.
    #[error("{0}")]
    Filter(FilterViolation),
}

/// Plans the OCO legs for a position.
///
/// Quantities are floored to the step; a leg under `minQty` or the minimum
/// notional merges into the other; a budget of one stop yields one leg. No
/// leg exceeds `LOT_SIZE.maxQty`, nor what `NOTIONAL.maxNotional` lets it
/// hold at its highest price: a leg over it hands the excess to the
/// other (so a position one list cannot hold gets two, whatever the split),
/// and what two (or, with a budget of one stop, one) such lists cannot hold
/// is [`Plan::short`].
///
/// # Errors
/// [`Unprotectable`] with the reason and numbers when no leg can be placed.
pub fn plan_protection(input: &PlanInput<'_>) -> Result<Plan, Unprotectable> {
    let rules = input.rules;
    let symbol = rules.symbol.name.clone();
    if !rules.trading {
        return Err(Unprotectable::SymbolClosed {
            symbol,
            what: "new orders",
        });
    }
    if !rules.oco_allowed {
        return Err(Unprotectable::SymbolClosed {
            symbol,
            what: "OCO lists",
        });
    }
    let lv = input.levels;
    if !rules.order_types.limit_maker {
        return Err(Unprotectable::SymbolClosed {
            symbol,
            what: "LIMIT_MAKER orders (the take-profit)",
        });
    }
    // The levels hold the stop kind the symbol allows when it allows one.
    let stop_allowed = match lv.stop_limit {
        Some(_) => rules.order_types.stop_loss_limit,
        None => rules.order_types.stop_loss,
    };
    if !stop_allowed {
        return Err(Unprotectable::SymbolClosed {
            symbol,
            what: "stop orders (neither STOP_LOSS nor STOP_LOSS_LIMIT)",
        });
    }
    for price in [Some(lv.tp1), Some(lv.tp2), Some(lv.stop), lv.stop_limit]
        .into_iter()
        .flatten()
    {
        rules.check_price(price).map_err(Unprotectable::Filter)?;
        rules
            .check_sell_percent(price, input.reference)
            .map_err(Unprotectable::Filter)?;
    }
    let floored = input.position.floor_to(rules.step);
    // The stop's limit is the lowest price either order of the list sells at.
    let fits = |q: Qty| {
        rules.check_qty(q).is_ok()
            && rules.check_notional(q, lv.lowest()).is_ok()
            && rules.check_notional(q, lv.tp2).is_ok()
    };
    // A list over the maximum notional is refused as one over `maxQty` is,
    // so that notional caps a list's quantity too: at the highest price
    // either order sells at (checked below at `tp2`, the lowest otherwise).
    // Too large is a shortfall to say, never dust.
    let by_notional = rules.max_notional.and_then(|m| {
        let highest = lv.tp2.get().max(lv.lowest().get());
        Qty::new(m / highest).ok().map(|q| q.floor_to(rules.step))
    });
    let max = match (rules.max_qty.map(|m| m.floor_to(rules.step)), by_notional) {
        (Some(q), Some(n)) => Some(q.min(n)),
        (q, n) => q.or(n),
    };
    let bound =
        if by_notional.is_some_and(|n| rules.max_qty.is_none_or(|q| n < q.floor_to(rules.step))) {
            ListBound::MaxNotional
        } else {
            ListBound::MaxQty
        };
    let cap = |q: Qty| max.map_or(q, |m| q.min(m));
    let max_one = cap(floored);
    if !fits(max_one) {
        return Err(Unprotectable::Dust {
            position: input.position,
            floored,
            min_qty: rules.min_qty,
            notional: floored.notional(lv.lowest()),
            min_notional: rules.min_notional,
        });
    }
    if input.stop_budget == Some(0) {
        return Err(Unprotectable::NoStopBudget { symbol });
    }
    let leg = |index, qty, take_profit| PlannedLeg {
        index,
        qty,
        take_profit,
        stop: lv.stop,
        stop_limit: lv.stop_limit,
    };
    let split = input.split.clamp(Decimal::ZERO, Decimal::ONE);
    let (q1, q2) = split_within(floored, split, max, rules);
    let two_fit = fits(q1) && fits(q2);
    // When one list cannot hold the position, halves may fit where the
    // configured split left a sliver under the minimum on the second leg.
    let (q1, q2, two_fit) = if !two_fit && max_one < floored {
        let (h1, h2) = split_within(floored, Decimal::new(5, 1), max, rules);
        (h1, h2, fits(h1) && fits(h2))
    } else {
        (q1, q2, two_fit)
    };
    let budget_two = input.stop_budget.is_none_or(|b| b >= 2);
    let (legs, degraded) = if two_fit && budget_two {
        (
            vec![
                leg(LegIndex::First, q1, lv.tp1),
                leg(LegIndex::Second, q2, lv.tp2),
            ],
            None,
        )
    } else {
        let why = if two_fit {
            Degraded::StopBudget
        } else {
            Degraded::Merged
        };
        let degraded = (split < Decimal::ONE).then_some(why);
        (vec![leg(LegIndex::First, max_one, lv.tp1)], degraded)
    };
    let total: Qty = legs.iter().map(|l| l.qty).sum();
    let short = max.filter(|_| total < floored).map(|max_qty| Shortfall {
        position: input.position,
        max_qty,
        lists: legs.len(),
        covered: total,
        left: floored.saturating_sub(total),
        stop_budget: legs.len() == 1 && !budget_two,
        bound,
    });
    Ok(Plan {
        uncovered: input.position.saturating_sub(total),
        legs,
        degraded,
        short,
        stop_substitute: lv.substitute,
    })
}

/// `floored` cut at `split` into two step-aligned legs, neither over `max`
/// when two such legs can hold it: a leg over it hands the excess to the
/// other. Over twice `max`, both legs are `max`.
fn split_within(floored: Qty, split: Decimal, max: Option<Qty>, rules: &SymbolRules) -> (Qty, Qty) {
    let q1 = Qty::new(floored.get() * split)
        .unwrap_or(Qty::ZERO)
        .floor_to(rules.step);
    let Some(max) = max else {
        return (q1, floored.saturating_sub(q1));
    };
    // The first leg must leave the second at most `max`, and be at most `max` itself.
    let least = floored.saturating_sub(max);
    let q1 = if least > max {
        max
    } else {
        q1.max(least).min(max)
    };
    (q1, floored.saturating_sub(q1).min(max))
}
