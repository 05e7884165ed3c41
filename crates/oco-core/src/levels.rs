//! Where the take-profits and the stop-loss sit.
//!
//! The entry's own levels win; else the account's percentages; else
//! [`LevelPercents::DEFAULT`]. Prices are snapped to the tick in the direction
//! that never widens the stop or pushes a target further than asked: the stop
//! rounds up (towards the fill), the targets round down (towards the fill).
//! The stop's limit price rounds down, further under the trigger, so that a
//! triggered stop is more likely to fill. A level that rounding would put on
//! the fill or past it goes to the nearest tick on its own side instead.
//!
//! A stop the symbol does not take is replaced by the kind it does take
//! (DESIGN rule 7: degrade, never to no stop-loss): Binance's majors refuse
//! the market stop `STOP_LOSS`, so there it becomes a stop-limit.

use std::fmt;

use rust_decimal::Decimal;

use crate::money::Price;
use crate::symbol::{OrderTypes, SymbolRules};

/// Levels stored with an entry (its JSONB metadata in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryLevels {
    /// First target.
    pub tp1: Option<Price>,
    /// Second target.
    pub tp2: Option<Price>,
    /// Stop-loss trigger.
    pub sl: Option<Price>,
}

/// Distances from the average fill price, in percent (all positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelPercents {
    /// TP1 at `fill × (1 + tp1/100)`.
    pub tp1: Decimal,
    /// TP2 at `fill × (1 + tp2/100)`.
    pub tp2: Decimal,
    /// SL at `fill × (1 − sl/100)`.
    pub sl: Decimal,
}

impl LevelPercents {
    /// +1 % / +2 % / −1 %.
    pub const DEFAULT: LevelPercents = LevelPercents {
        tp1: Decimal::ONE,
        tp2: Decimal::TWO,
        sl: Decimal::ONE,
    };

    /// Checks that every distance is positive, the stop under 100 % and TP1 ≤ TP2.
    ///
    /// # Errors
    /// [`LevelsError::Percents`] naming the values.
    pub fn validate(self) -> Result<Self, LevelsError> {
        let ok = self.tp1 > Decimal::ZERO
            && self.tp2 >= self.tp1
            && self.sl > Decimal::ZERO
            && self.sl < Decimal::ONE_HUNDRED;
        if ok {
            Ok(self)
        } else {
            Err(LevelsError::Percents {
                tp1: self.tp1,
                tp2: self.tp2,
                sl: self.sl,
            })
        }
    }
}

/// How the stop leg executes once triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// `STOP_LOSS_LIMIT` with its limit `offset_pct` percent under the trigger.
    Limit {
        /// Distance of the limit under the trigger, in percent (> 0).
        offset_pct: Decimal,
    },
    /// `STOP_LOSS`, a market order once triggered (where the symbol allows it).
    Market,
}

impl StopKind {
    /// The default stop, also placed instead of a market stop on a symbol
    /// that does not take one: `STOP_LOSS_LIMIT` 0.5 % under the trigger.
    pub const DEFAULT_LIMIT: StopKind = StopKind::Limit {
        offset_pct: Decimal::from_parts(5, 0, 0, false, 1),
    };

    /// Binance's name of the order type.
    pub fn order_type(self) -> &'static str {
        match self {
            StopKind::Limit { .. } => "STOP_LOSS_LIMIT",
            StopKind::Market => "STOP_LOSS",
        }
    }

    /// The stop a symbol taking `types` gets: this one when it is allowed,
    /// else the other kind when that is (a market stop becomes
    /// [`StopKind::DEFAULT_LIMIT`]). When neither is, this one: planning
    /// refuses it with the reason.
    pub fn allowed_by(self, types: OrderTypes) -> StopKind {
        match self {
            StopKind::Market if !types.stop_loss && types.stop_loss_limit => {
                StopKind::DEFAULT_LIMIT
            }
            StopKind::Limit { .. } if !types.stop_loss_limit && types.stop_loss => StopKind::Market,
            kind => kind,
        }
    }
}

/// A stop kind the symbol does not take, and the kind placed instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSubstitute {
    /// What the settings asked for.
    pub asked: StopKind,
    /// What the lists carry.
    pub placed: StopKind,
}

impl fmt::Display for StopSubstitute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |kind: StopKind| match kind {
            StopKind::Limit { offset_pct } => {
                format!(
                    "STOP_LOSS_LIMIT {}% under the trigger",
                    offset_pct.normalize()
                )
            }
            StopKind::Market => "STOP_LOSS (market stop)".to_owned(),
        };
        let asked = match self.asked {
            StopKind::Limit { .. } => "STOP_LOSS_LIMIT",
            StopKind::Market => "STOP_LOSS (market stop)",
        };
        write!(
            f,
            "{asked} not allowed, {} placed instead",
            name(self.placed)
        )
    }
}

/// Resolved, tick-aligned protection prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedLevels {
    /// Target of leg 1.
    pub tp1: Price,
    /// Target of leg 2.
    pub tp2: Price,
    /// Stop trigger.
    pub stop: Price,
    /// Stop limit price (`None` for a market stop).
    pub stop_limit: Option<Price>,
    /// Set when the stop kind asked is not allowed on the symbol and the
    /// other kind stands in.
    pub substitute: Option<StopSubstitute>,
}

impl ResolvedLevels {
    /// The lowest price any leg could sell at; it bounds the notional.
    pub fn lowest(&self) -> Price {
        self.stop_limit.unwrap_or(self.stop)
    }
}

/// Levels that cannot protect a BUY entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelsError {
    /// Not `sl < fill < tp1 ≤ tp2` as asked, before rounding: the fill came
    /// beyond a level (the market passed it).
    #[error(
        "levels must satisfy sl < fill < tp1 <= tp2, got sl {sl}, fill {fill}, tp1 {tp1}, tp2 {tp2}"
    )]
    Order {
        /// Stop.
        sl: Price,
        /// Average fill price.
        fill: Price,
        /// First target.
        tp1: Price,
        /// Second target.
        tp2: Price,
    },
    /// Percentages out of range.
    #[error(
        "percentages must satisfy 0 < tp1 <= tp2 and 0 < sl < 100, got tp1 {tp1}, tp2 {tp2}, sl {sl}"
    )]
    Percents {
        /// TP1 distance.
        tp1: Decimal,
        /// TP2 distance.
        tp2: Decimal,
        /// SL distance.
        sl: Decimal,
    },
    /// A price fell under one tick.
    #[error("{what} {price} is under one tick of {tick}")]
    UnderTick {
        /// Which level.
        what: &'static str,
        /// Its value.
        price: Decimal,
        /// Tick size.
        tick: Decimal,
    },
    /// The grid has no price between zero and the fill for the stop: the fill
    /// is at most one tick.
    #[error("stop: no multiple of tick {tick} is above 0 and below fill {fill}")]
    NoTickBelow {
        /// Average fill price.
        fill: Price,
        /// Tick size.
        tick: Decimal,
    },
    /// The stop-limit offset is not positive.
    #[error("stop limit offset {0}% must be greater than 0 and less than 100")]
    StopOffset(Decimal),
}

/// Resolves the levels for an entry filled at `fill`, with a stop of the
/// kind `stop_kind` where `rules` allow it, else of the kind they allow
/// ([`StopKind::allowed_by`], recorded in [`ResolvedLevels::substitute`]).
///
/// # Errors
/// [`LevelsError`] naming the values when they cannot protect a BUY.
pub fn resolve_levels(
    entry: EntryLevels,
    account: Option<LevelPercents>,
    fill: Price,
    rules: &SymbolRules,
    stop_kind: StopKind,
) -> Result<ResolvedLevels, LevelsError> {
    let pct = account.unwrap_or(LevelPercents::DEFAULT).validate()?;
    let from_pct = |p: Decimal, what| {
        fill.scaled_pct(p).ok_or(LevelsError::UnderTick {
            what,
            price: fill.get() * (Decimal::ONE_HUNDRED + p) / Decimal::ONE_HUNDRED,
            tick: rules.tick.get(),
        })
    };
    let tp1 = match entry.tp1 {
        Some(p) => p,
        None => from_pct(pct.tp1, "tp1")?,
    };
    // A lone TP1 means one target for the whole position.
    let tp2 = match (entry.tp2, entry.tp1) {
        (Some(p), _) => p,
        (None, Some(tp1)) => tp1,
        (None, None) => from_pct(pct.tp2, "tp2")?,
    };
    let sl = match entry.sl {
        Some(p) => p,
        None => from_pct(-pct.sl, "sl")?,
    };
    let order_ok = |sl: Price, tp1: Price, tp2: Price| sl < fill && fill < tp1 && tp1 <= tp2;
    if !order_ok(sl, tp1, tp2) {
        return Err(LevelsError::Order { sl, fill, tp1, tp2 });
    }
    let under_tick = |what, p: Price| LevelsError::UnderTick {
        what,
        price: p.get(),
        tick: rules.tick.get(),
    };
    // A tick that is coarse next to a distance can snap a level onto the fill or
    // past it. The market passed nothing then: the level moves to the nearest tick
    // on its own side of the fill, the closest the grid allows to what was asked.
    let tick = rules.tick.get();
    let tick_above = Price::new((fill.get() / tick).floor() * tick + tick)
        .map_err(|_| under_tick("tp1", tp1))?;
    let above_fill = |p: Option<Price>| match p {
        Some(p) if p > fill => p,
        _ => tick_above,
    };
    let tp1_r = above_fill(tp1.round_down_to(rules.tick));
    let tp2_r = above_fill(tp2.round_down_to(rules.tick)).max(tp1_r);
    let sl_r = match sl.round_up_to(rules.tick) {
        sl_r if sl_r < fill => sl_r,
        _ => Price::new((fill.get() / tick).ceil() * tick - tick).map_err(|_| {
            LevelsError::NoTickBelow {
                fill,
                tick: rules.tick.get(),
            }
        })?,
    };
    let placed = stop_kind.allowed_by(rules.order_types);
    let substitute = (placed != stop_kind).then_some(StopSubstitute {
        asked: stop_kind,
        placed,
    });
    let stop_limit = match placed {
        StopKind::Market => None,
        StopKind::Limit { offset_pct } => {
            if offset_pct <= Decimal::ZERO || offset_pct >= Decimal::ONE_HUNDRED {
                return Err(LevelsError::StopOffset(offset_pct));
            }
            let raw = sl_r
                .scaled_pct(-offset_pct)
                .ok_or_else(|| under_tick("stop limit", sl_r))?;
            // At least one tick under the trigger, so the limit never equals it.
            let limit = raw
                .round_down_to(rules.tick)
                .ok_or_else(|| under_tick("stop limit", raw))?;
            let limit = if limit >= sl_r {
                Price::new(sl_r.get() - rules.tick.get())
                    .map_err(|_| under_tick("stop limit", sl_r))?
            } else {
                limit
            };
            Some(limit)
        }
    };
    Ok(ResolvedLevels {
        tp1: tp1_r,
        tp2: tp2_r,
        stop: sl_r,
        stop_limit,
        substitute,
    })
}
