//! The entry and leg state machines: one enum each, one transition table each.

use std::fmt;

use rust_decimal::Decimal;

use crate::money::Qty;

/// A refused transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event} in state {state}")]
pub struct TransitionError {
    /// The state's name.
    pub state: &'static str,
    /// The event's name.
    pub event: &'static str,
}

/// Lifecycle of the entry order on the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryStatus {
    /// Stored, not yet acknowledged by the exchange.
    PendingNew,
    /// Resting on the book, nothing filled.
    New,
    /// Part filled, rest working.
    PartiallyFilled,
    /// Fully filled.
    Filled,
    /// Canceled (possibly after part fills).
    Canceled,
    /// Expired (a MARKET order out of liquidity may expire part filled).
    Expired,
    /// Refused by the exchange; nothing filled.
    Rejected,
}

/// What the exchange said happened to the entry order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryEvent {
    /// Acknowledged, resting.
    Accepted,
    /// Part filled.
    PartFilled,
    /// Fully filled.
    Filled,
    /// Canceled.
    Canceled,
    /// Expired.
    Expired,
    /// Refused.
    Rejected,
}

impl EntryStatus {
    /// The status after `event`.
    ///
    /// # Errors
    /// [`TransitionError`] for a move the exchange cannot make.
    #[rustfmt::skip]
    pub fn on(self, event: EntryEvent) -> Result<EntryStatus, TransitionError> {
        use EntryEvent as E;
        use EntryStatus as S;
        Ok(match (self, event) {
            (S::PendingNew, E::Accepted) => S::New,
            // A MARKET or crossing LIMIT entry can fill in its own response.
            (S::PendingNew | S::New | S::PartiallyFilled, E::PartFilled) => S::PartiallyFilled,
            (S::PendingNew | S::New | S::PartiallyFilled, E::Filled) => S::Filled,
            (S::PendingNew | S::New | S::PartiallyFilled, E::Canceled) => S::Canceled,
            (S::PendingNew | S::New | S::PartiallyFilled, E::Expired) => S::Expired,
            (S::PendingNew, E::Rejected) => S::Rejected,
            (state, event) => return Err(TransitionError { state: state.name(), event: event.name() }),
        })
    }

    /// No further fill can come.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Filled | Self::Canceled | Self::Expired | Self::Rejected
        )
    }

    /// Lower-case name, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            Self::PendingNew => "pending_new",
            Self::New => "new",
            Self::PartiallyFilled => "partially_filled",
            Self::Filled => "filled",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
        }
    }

    /// The inverse of [`EntryStatus::name`].
    pub fn from_name(name: &str) -> Option<EntryStatus> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Every status.
    pub const ALL: [EntryStatus; 7] = [
        Self::PendingNew,
        Self::New,
        Self::PartiallyFilled,
        Self::Filled,
        Self::Canceled,
        Self::Expired,
        Self::Rejected,
    ];

    // Used to keep evidence monotonic: a later snapshot never moves the status back.
    fn rank(self) -> u8 {
        match self {
            Self::PendingNew => 0,
            Self::New => 1,
            Self::PartiallyFilled => 2,
            Self::Filled | Self::Canceled | Self::Expired | Self::Rejected => 3,
        }
    }

    /// Merges an observed status into the known one without ever going back:
    /// the observed status wins only when the table allows the move.
    pub fn merge(self, observed: EntryStatus) -> EntryStatus {
        if observed.rank() <= self.rank() {
            return self;
        }
        let event = match observed {
            Self::PendingNew | Self::New => EntryEvent::Accepted,
            Self::PartiallyFilled => EntryEvent::PartFilled,
            Self::Filled => EntryEvent::Filled,
            Self::Canceled => EntryEvent::Canceled,
            Self::Expired => EntryEvent::Expired,
            Self::Rejected => EntryEvent::Rejected,
        };
        self.on(event).unwrap_or(self)
    }
}

impl EntryEvent {
    fn name(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::PartFilled => "part_filled",
            Self::Filled => "filled",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
        }
    }
}

impl fmt::Display for EntryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a placed list ended without selling everything it covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExternalEnd {
    /// Canceled by someone other than ocoguard.
    Canceled,
    /// The triggered stop expired unfilled (e.g. `EXECUTION_RULE_PRICE_RANGE_EXCEEDED`).
    StopExpired,
    /// The take-profit filled partly, which cancels the list's stop on Binance;
    /// the rest of the take-profit may still rest on the book, unprotected.
    TakeProfitPartial,
}

impl ExternalEnd {
    /// Lower-case name, as stored.
    pub fn name(self) -> &'static str {
        match self {
            Self::Canceled => "canceled",
            Self::StopExpired => "stop_expired",
            Self::TakeProfitPartial => "take_profit_partial",
        }
    }

    /// The inverse of [`ExternalEnd::name`].
    pub fn from_name(name: &str) -> Option<ExternalEnd> {
        [Self::Canceled, Self::StopExpired, Self::TakeProfitPartial]
            .into_iter()
            .find(|e| e.name() == name)
    }
}

/// Lifecycle of one protective OCO (a "leg").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LegState {
    /// Claimed in the store; only the claimant may send it.
    Claimed,
    /// Acknowledged by the exchange.
    Placed {
        /// The exchange's `orderListId`.
        list_id: i64,
    },
    /// Sent, answer lost (timeout, 5xx): resolved by looking the client id up.
    Unknown,
    /// The take-profit sold the whole leg.
    TakeProfitFilled,
    /// The stop sold the whole leg.
    StopLossFilled,
    /// Ended outside ocoguard while coins may remain.
    CanceledExternally {
        /// How it ended.
        why: ExternalEnd,
    },
    /// Canceled by ocoguard to make room for a newer generation (a working
    /// list, or the rest of a partly filled take-profit).
    Replaced,
    /// The exchange refused it, or a lookup proved it was never placed.
    NotPlaced {
        /// Exchange code, when the exchange answered.
        code: Option<i32>,
        /// Why.
        reason: String,
    },
    /// Can never be placed as planned (the reason names the rule).
    Unprotectable {
        /// Why.
        reason: String,
    },
}

/// What happened to a leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegEvent {
    /// The exchange acknowledged the list.
    Accepted {
        /// `orderListId`.
        list_id: i64,
    },
    /// The request's answer was lost.
    OutcomeUnknown,
    /// The exchange refused it, or a lookup found nothing.
    NotPlaced {
        /// Exchange code.
        code: Option<i32>,
        /// Why.
        reason: String,
    },
    /// Refused for good.
    Unprotectable {
        /// Why.
        reason: String,
    },
    /// Take-profit filled completely.
    TakeProfitFilled,
    /// Stop filled completely.
    StopLossFilled,
    /// Ended outside ocoguard.
    EndedExternally(ExternalEnd),
    /// Canceled by ocoguard for a newer generation.
    Replaced,
}

impl LegState {
    /// The state after `event`.
    ///
    /// # Errors
    /// [`TransitionError`] for an illegal move.
    #[rustfmt::skip]
    pub fn on(&self, event: &LegEvent) -> Result<LegState, TransitionError> {
        use LegEvent as E;
        use LegState as S;
        Ok(match (self, event) {
            (S::Claimed | S::Unknown, E::Accepted { list_id }) => S::Placed { list_id: *list_id },
            (S::Claimed, E::OutcomeUnknown) => S::Unknown,
            (S::Claimed | S::Unknown, E::NotPlaced { code, reason }) => S::NotPlaced { code: *code, reason: reason.clone() },
            (S::Claimed | S::Unknown, E::Unprotectable { reason }) => S::Unprotectable { reason: reason.clone() },
            // An event from the stream may overtake the placement's own answer.
            (S::Claimed | S::Unknown | S::Placed { .. }, E::TakeProfitFilled) => S::TakeProfitFilled,
            (S::Claimed | S::Unknown | S::Placed { .. }, E::StopLossFilled) => S::StopLossFilled,
            (S::Claimed | S::Unknown | S::Placed { .. }, E::EndedExternally(why)) => S::CanceledExternally { why: *why },
            (S::Placed { .. } | S::Unknown, E::Replaced) => S::Replaced,
            // The one way out of an end: the rest of a partly filled take-profit
            // rests alone, without a stop, until ocoguard cancels it.
            (S::CanceledExternally { why: ExternalEnd::TakeProfitPartial }, E::Replaced) => S::Replaced,
            (state, event) => return Err(TransitionError { state: state.name(), event: event.name() }),
        })
    }

    /// May still hold coins on the book or be about to: counts as coverage.
    pub fn is_active(&self) -> bool {
        matches!(self, Self::Claimed | Self::Placed { .. } | Self::Unknown)
    }

    /// Not active: no longer coverage. No event moves it any more, with one
    /// exception: the rest of a partly filled take-profit
    /// (`CanceledExternally { TakeProfitPartial }`) still rests on the book
    /// and moves to `Replaced` once ocoguard cancels it.
    pub fn is_terminal(&self) -> bool {
        !self.is_active()
    }

    /// Lower-case name, as stored.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Placed { .. } => "placed",
            Self::Unknown => "unknown",
            Self::TakeProfitFilled => "take_profit_filled",
            Self::StopLossFilled => "stop_loss_filled",
            Self::CanceledExternally { .. } => "canceled_externally",
            Self::Replaced => "replaced",
            Self::NotPlaced { .. } => "not_placed",
            Self::Unprotectable { .. } => "unprotectable",
        }
    }
}

impl LegEvent {
    /// Lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::NotPlaced { .. } => "not_placed",
            Self::Unprotectable { .. } => "unprotectable",
            Self::TakeProfitFilled => "take_profit_filled",
            Self::StopLossFilled => "stop_loss_filled",
            Self::EndedExternally(_) => "ended_externally",
            Self::Replaced => "replaced",
        }
    }
}

impl fmt::Display for LegState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a leg has sold so far, by side; every field only ever grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LegSold {
    /// Base sold by the take-profit.
    pub take_profit: Qty,
    /// Quote received by the take-profit.
    pub take_profit_quote: Decimal,
    /// Base sold by the stop (or by a market exit).
    pub stop_loss: Qty,
    /// Quote received by the stop (or by a market exit).
    pub stop_loss_quote: Decimal,
}

impl LegSold {
    /// Base sold by both sides together.
    pub fn total(self) -> Qty {
        self.take_profit.plus(self.stop_loss)
    }

    /// Quote received by both sides together.
    pub fn total_quote(self) -> Decimal {
        self.take_profit_quote + self.stop_loss_quote
    }

    /// The larger of each field: merging two observations never lowers one.
    pub fn merge(self, other: LegSold) -> LegSold {
        LegSold {
            take_profit: self.take_profit.max(other.take_profit),
            take_profit_quote: self.take_profit_quote.max(other.take_profit_quote),
            stop_loss: self.stop_loss.max(other.stop_loss),
            stop_loss_quote: self.stop_loss_quote.max(other.stop_loss_quote),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn leg_states() -> Vec<LegState> {
        vec![
            LegState::Claimed,
            LegState::Placed { list_id: 7 },
            LegState::Unknown,
            LegState::TakeProfitFilled,
            LegState::StopLossFilled,
            LegState::CanceledExternally {
                why: ExternalEnd::StopExpired,
            },
            LegState::CanceledExternally {
                why: ExternalEnd::TakeProfitPartial,
            },
            LegState::Replaced,
            LegState::NotPlaced {
                code: Some(-2010),
                reason: "x".into(),
            },
            LegState::Unprotectable { reason: "y".into() },
        ]
    }

    fn leg_events() -> Vec<LegEvent> {
        vec![
            LegEvent::Accepted { list_id: 7 },
            LegEvent::OutcomeUnknown,
            LegEvent::NotPlaced {
                code: None,
                reason: "x".into(),
            },
            LegEvent::Unprotectable { reason: "y".into() },
            LegEvent::TakeProfitFilled,
            LegEvent::StopLossFilled,
            LegEvent::EndedExternally(ExternalEnd::Canceled),
            LegEvent::Replaced,
        ]
    }

    #[test]
    fn leg_table_is_exactly_the_legal_set() {
        let legal: &[(&str, &str)] = &[
            ("claimed", "accepted"),
            ("unknown", "accepted"),
            ("claimed", "outcome_unknown"),
            ("claimed", "not_placed"),
            ("unknown", "not_placed"),
            ("claimed", "unprotectable"),
            ("unknown", "unprotectable"),
            ("claimed", "take_profit_filled"),
            ("unknown", "take_profit_filled"),
            ("placed", "take_profit_filled"),
            ("claimed", "stop_loss_filled"),
            ("unknown", "stop_loss_filled"),
            ("placed", "stop_loss_filled"),
            ("claimed", "ended_externally"),
            ("unknown", "ended_externally"),
            ("placed", "ended_externally"),
            ("placed", "replaced"),
            ("unknown", "replaced"),
            ("take_profit_partial", "replaced"),
        ];
        // The stored name, but the rest of a partly filled take-profit apart.
        let label = |s: &LegState| match s {
            LegState::CanceledExternally {
                why: ExternalEnd::TakeProfitPartial,
            } => "take_profit_partial",
            s => s.name(),
        };
        let mut seen = 0;
        for s in leg_states() {
            for e in leg_events() {
                let allowed = legal.contains(&(label(&s), e.name()));
                let got = s.on(&e);
                assert_eq!(got.is_ok(), allowed, "{} on {}", e.name(), s.name());
                if allowed {
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, legal.len());
    }

    #[test]
    fn only_a_take_profit_rest_leaves_an_external_end() {
        let ends = [
            ExternalEnd::Canceled,
            ExternalEnd::StopExpired,
            ExternalEnd::TakeProfitPartial,
        ];
        for why in ends {
            let state = LegState::CanceledExternally { why };
            for e in leg_events() {
                let expected = (why == ExternalEnd::TakeProfitPartial && e == LegEvent::Replaced)
                    .then_some(LegState::Replaced);
                assert_eq!(state.on(&e).ok(), expected, "{} on {:?}", e.name(), why);
            }
        }
    }

    #[test]
    fn entry_table_is_exactly_the_legal_set() {
        use EntryEvent as E;
        use EntryStatus as S;
        let events = [
            E::Accepted,
            E::PartFilled,
            E::Filled,
            E::Canceled,
            E::Expired,
            E::Rejected,
        ];
        let mut n_ok = 0;
        for s in S::ALL {
            for e in events {
                let ok = s.on(e).is_ok();
                let expected = match s {
                    S::PendingNew => true,
                    S::New | S::PartiallyFilled => e != E::Accepted && e != E::Rejected,
                    _ => false,
                };
                assert_eq!(ok, expected, "{e:?} in {s:?}");
                n_ok += usize::from(ok);
            }
        }
        assert_eq!(n_ok, 6 + 4 + 4);
        assert_eq!(S::New.on(E::Accepted).unwrap_err().state, "new");
    }

    #[test]
    fn status_merge_never_goes_back() {
        assert_eq!(
            EntryStatus::Filled.merge(EntryStatus::PartiallyFilled),
            EntryStatus::Filled
        );
        assert_eq!(
            EntryStatus::New.merge(EntryStatus::Filled),
            EntryStatus::Filled
        );
        assert_eq!(
            EntryStatus::Canceled.merge(EntryStatus::Filled),
            EntryStatus::Canceled
        );
        for s in EntryStatus::ALL {
            assert_eq!(EntryStatus::from_name(s.name()), Some(s));
        }
    }

    proptest! {
        #[test]
        fn terminal_leg_states_stay_terminal(si in 0usize..10, events in proptest::collection::vec(0usize..8, 1..6)) {
            let mut state = leg_states()[si].clone();
            // The one exception: a take-profit rest moves to `Replaced`, and
            // only there (then terminal like any other).
            if state == (LegState::CanceledExternally { why: ExternalEnd::TakeProfitPartial }) {
                prop_assert_eq!(state.on(&LegEvent::Replaced).ok(), Some(LegState::Replaced));
                state = LegState::Replaced;
            }
            let was_terminal = state.is_terminal();
            let start = state.clone();
            for ei in events {
                if let Ok(next) = state.on(&leg_events()[ei]) {
                    prop_assert!(!was_terminal, "{} left terminal state", state.name());
                    state = next;
                }
                if was_terminal { prop_assert_eq!(&state, &start); }
            }
        }

        #[test]
        fn final_entry_statuses_stay_final(si in 0usize..7, ei in 0usize..6) {
            let s = EntryStatus::ALL[si];
            let events = [EntryEvent::Accepted, EntryEvent::PartFilled, EntryEvent::Filled, EntryEvent::Canceled, EntryEvent::Expired, EntryEvent::Rejected];
            if s.is_final() {
                prop_assert!(s.on(events[ei]).is_err());
            }
        }
    }
}
