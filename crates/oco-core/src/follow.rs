//! Following orders after placement: turning an order update of one of our
//! orders (from the user-data stream, or from a REST lookup by sync) into
//! evidence for `protect` or a leg transition.
//!
//! Orders are recognised by their deterministic client id alone; updates of
//! orders placed by hand are ignored.

use crate::ids::{AccountId, EntryId, LegKey, OrderRole};
use crate::model::{Evidence, Leg, Protection, SaleSide, Source};
use crate::ports::{ExecutionUpdate, StoreError, event};
use crate::protect::{ProtectError, ProtectReport, Protector, is_take_profit_rest, realized};
use crate::state::{EntryStatus, ExternalEnd, LegEvent, LegSold, LegState};

/// What an update was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// Not one of our orders, or of another account.
    Foreign,
    /// An entry update: evidence recorded, `protect` ran.
    Entry(ProtectReport),
    /// An entry update with nothing filled: status recorded.
    EntryAccepted,
    /// A leg's order accepted with nothing filled: nothing to record, and
    /// nothing read (whose account it is was not checked either).
    LegAccepted {
        /// Which leg the client id names.
        key: LegKey,
    },
    /// A leg moved (or only its sold quantity grew).
    Leg {
        /// Which leg.
        key: LegKey,
        /// Its state after the update.
        state: &'static str,
        /// The `protect` run that followed, when the position changed.
        protect: Option<ProtectReport>,
    },
}

/// The bookkeeping a leg order's update leaves once protection is done
/// ([`Protector::follow_protecting`]): its trade's commission to record and
/// the result of a settled entry to recount. Run by
/// [`Protector::bookkeep`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookkeeping {
    key: LegKey,
    side: SaleSide,
    trade: Option<crate::model::Fill>,
    sold_any: bool,
    source: Source,
}

impl Protector {
    /// Applies an order update of `account` and protects what it reveals:
    /// a fill of an entry, or a leg that ended while coins remain; then
    /// records a leg trade's commission and recounts a settled result
    /// ([`Protector::bookkeep`]).
    ///
    /// # Errors
    /// [`ProtectError`] when the store or a read from the exchange fails.
    /// A leg trade that cannot be recorded is no error (logged, counted).
    pub async fn follow(
        &self,
        account: AccountId,
        update: &ExecutionUpdate,
        source: Source,
    ) -> Result<Followed, ProtectError> {
        let (followed, later) = self.follow_protecting(account, update, source).await?;
        if let Some(later) = later {
            self.bookkeep(later).await?;
        }
        Ok(followed)
    }

    /// [`Protector::follow`] without its bookkeeping, which it returns for
    /// the caller to run when protection's own follow-up (a flag for an
    /// incomplete placement) is done: nothing on protection's path waits on
    /// a commission's write.
    ///
    /// # Errors
    /// As [`Protector::follow`].
    pub async fn follow_protecting(
        &self,
        account: AccountId,
        update: &ExecutionUpdate,
        source: Source,
    ) -> Result<(Followed, Option<Bookkeeping>), ProtectError> {
        let Some(role) = self.ids().parse(&update.client_id) else {
            return Ok((Followed::Foreign, None));
        };
        match role {
            OrderRole::Entry(id) => {
                let evidence = Evidence {
                    order_id: Some(update.order_id),
                    status: update.status,
                    executed_qty: update.executed_qty,
                    cumulative_quote: update.cumulative_quote,
                    fills: update.fill.iter().cloned().collect(),
                    holding: None,
                    observed_at: update.event_time,
                };
                // The entry's ownership is checked by the write itself: an
                // id of ours seen on another account's stream writes nothing.
                if update.executed_qty.is_zero() {
                    return Ok((
                        match self
                            .store()
                            .record_evidence_of(account, id, &evidence)
                            .await?
                        {
                            Some(_) => Followed::EntryAccepted,
                            None => Followed::Foreign,
                        },
                        None,
                    ));
                }
                Ok((
                    match self
                        .protect_seen(account, id, &update.symbol, &evidence, source)
                        .await?
                    {
                        Some(report) => Followed::Entry(report),
                        None => Followed::Foreign,
                    },
                    None,
                ))
            }
            // A leg order accepted with nothing filled changes nothing: no
            // transition, nothing sold. Four of these follow every protection.
            OrderRole::TakeProfit(key) | OrderRole::StopLoss(key) | OrderRole::Exit(key)
                if update.status == EntryStatus::New && update.executed_qty.is_zero() =>
            {
                Ok((Followed::LegAccepted { key }, None))
            }
            OrderRole::TakeProfit(key)
            | OrderRole::StopLoss(key)
            | OrderRole::List(key)
            | OrderRole::Exit(key) => {
                let entry = match self.store().entry(key.entry).await {
                    Ok(e) if e.account == account => e,
                    Ok(_) | Err(StoreError::NotFound { .. }) => {
                        return Ok((Followed::Foreign, None));
                    }
                    // Not a stranger's order: a store that failed must be
                    // reported (the caller flags the account), not ignored.
                    Err(err) => return Err(err.into()),
                };
                let legs = self.store().legs(key.entry).await?;
                let Some(leg) = legs.into_iter().find(|l| l.key == key) else {
                    return Ok((Followed::Foreign, None));
                };
                let take_profit = matches!(role, OrderRole::TakeProfit(_));
                let sold = if take_profit {
                    LegSold {
                        take_profit: update.executed_qty,
                        take_profit_quote: update.cumulative_quote,
                        ..LegSold::default()
                    }
                } else {
                    LegSold {
                        stop_loss: update.executed_qty,
                        stop_loss_quote: update.cumulative_quote,
                        ..LegSold::default()
                    }
                };
                let sold_any = !update.executed_qty.is_zero();
                // The trade's commission and any recount come after the sale,
                // the leg's move and protection, best-effort: protection
                // never waits on them nor fails for them. A close below
                // counts without it; the recount counts it.
                let later = Bookkeeping {
                    key,
                    side: if take_profit {
                        SaleSide::TakeProfit
                    } else {
                        SaleSide::StopLoss
                    },
                    trade: update
                        .fill
                        .clone()
                        .filter(|t| !t.qty.is_zero() && !matches!(role, OrderRole::List(_))),
                    sold_any,
                    source,
                };
                let later = (later.trade.is_some() || sold_any).then_some(later);
                if sold_any {
                    self.store()
                        .record_leg_sold(key, sold, update.event_time)
                        .await?;
                }
                if matches!(role, OrderRole::Exit(_)) {
                    return Ok((
                        Followed::Leg {
                            key,
                            state: leg.state.name(),
                            protect: None,
                        },
                        later,
                    ));
                }
                let state = match leg_event(take_profit, update) {
                    Some(event) => self.move_leg(leg.clone(), &event).await?,
                    None => leg.state.clone(),
                };
                // Judged from the state first read: a leg another writer ended
                // meanwhile still left the position changed (`protect` is
                // idempotent, so the other writer's own call costs nothing).
                // So does the end of a take-profit rest (canceled, expired or
                // filled): no event moves its leg, yet its coins are free or
                // sold, and a round that tried to cancel it and could not read
                // its sale (or saw its cancel refused) left them to this.
                let rest_ended =
                    take_profit && is_take_profit_rest(&leg) && update.status.is_final();
                let position_changed = (state.is_terminal() && leg.state.is_active()) || rest_ended;
                let settled = matches!(
                    entry.protection,
                    Protection::Closed | Protection::Exited { .. }
                );
                let protect = if position_changed && !settled {
                    Some(self.protect(key.entry, None, source).await?)
                } else {
                    None
                };
                Ok((
                    Followed::Leg {
                        key,
                        state: state.name(),
                        protect,
                    },
                    later,
                ))
            }
        }
    }
}

/// How many times [`Protector::move_leg`] writes a leg's move, each from a
/// fresh read, before it gives up.
const LEG_MOVE_ATTEMPTS: usize = 4;

impl Protector {
    /// Records the trade a leg order's update carried (`t`, `n`, `N`), once
    /// by trade id, best-effort (a failure is logged and counted in
    /// [`Protector::leg_trade_failures`], not returned), then recounts the
    /// result of an entry already settled when the update sold or its trade
    /// was recorded.
    ///
    /// # Errors
    /// [`ProtectError::Store`] when the recount cannot read or write.
    pub async fn bookkeep(&self, later: Bookkeeping) -> Result<(), ProtectError> {
        let traded = match &later.trade {
            Some(trade) => {
                self.record_trades_quietly(later.key, later.side, std::slice::from_ref(trade))
                    .await
            }
            None => false,
        };
        if later.sold_any || traded {
            self.recount_closed(later.key.entry, later.source).await?;
        }
        Ok(())
    }

    /// A sale recorded on an entry already closed or exited (its update
    /// came after the close: a lookup or a balance read settled the entry
    /// first, or the take-profit's fill overtook its own placement) leaves
    /// the result recorded then stale. It is computed again as the close
    /// computes it ([`realized`]) and the entry closed (or exited,
    /// with the same reason) again with it when it changed (event
    /// `realized`).
    pub(crate) async fn recount_closed(
        &self,
        id: EntryId,
        source: Source,
    ) -> Result<(), ProtectError> {
        let entry = self.store().entry(id).await?;
        if !matches!(
            entry.protection,
            Protection::Closed | Protection::Exited { .. }
        ) {
            return Ok(());
        }
        let legs = self.store().legs(id).await?;
        let realized = realized(&entry, &legs);
        if entry.realized_quote == Some(realized.quote)
            && entry.fees_complete == realized.fees_complete
        {
            return Ok(());
        }
        let now = self.clock().now();
        match &entry.protection {
            Protection::Exited { reason } => {
                // `false`: a fill reopened it meanwhile; its close recounts.
                if !self
                    .store()
                    .exit_entry(id, reason, realized, &entry)
                    .await?
                {
                    return Ok(());
                }
            }
            _ => self.store().close_entry(id, realized, now).await?,
        }
        self.store()
            .append_event(&event(
                id,
                "realized",
                format!(
                    "realized {}: recounted with sales or commissions recorded once the entry had closed (a close's own last trade is written just after it)",
                    realized.quote
                ),
                Some(source),
                now,
            ))
            .await?;
        Ok(())
    }

    /// Moves `leg` on `event` and returns its state afterwards: the one the
    /// move wrote, or, when the event no longer applies to what is stored
    /// (another writer ended the leg first), the stored one.
    ///
    /// The write is a compare-and-set on the state read. Another writer can
    /// move the leg in between (the placer recording `Placed` for a leg read
    /// `Claimed`, a lookup settling one read `Unknown`); the event still
    /// happened, so it is applied again to the leg as read anew. Dropping it
    /// would leave the rest of a partly filled take-profit without a stop
    /// and nobody told: its list goes on `EXECUTING`, so no list end follows.
    ///
    /// # Errors
    /// [`ProtectError::Store`] when the store fails, the leg is gone, or it
    /// kept changing for [`LEG_MOVE_ATTEMPTS`] writes (the caller flags the
    /// account for reconciliation).
    async fn move_leg(&self, mut leg: Leg, event: &LegEvent) -> Result<LegState, ProtectError> {
        for _ in 0..LEG_MOVE_ATTEMPTS {
            let Ok(next) = leg.state.on(event) else {
                return Ok(leg.state);
            };
            if self.transition_leg(&leg, next.clone()).await? {
                return Ok(next);
            }
            let key = leg.key;
            leg = self
                .store()
                .legs(key.entry)
                .await?
                .into_iter()
                .find(|l| l.key == key)
                .ok_or_else(|| StoreError::NotFound {
                    what: "leg",
                    id: key.to_string(),
                })?;
        }
        Err(StoreError::Unavailable(format!(
            "moving leg {} on {}: the leg kept changing under {LEG_MOVE_ATTEMPTS} attempts",
            leg.key,
            event.name()
        ))
        .into())
    }
}

/// The leg event an order update of one of its orders means, if any.
///
/// An order that the other order of its list removed (the take-profit when
/// the stop triggers, the stop when the take-profit is touched) is no end:
/// its list goes on with the other order. Binance marks it with the expiry
/// reason `OCO_TRIGGER`, but whether its status is `EXPIRED` or `CANCELED`
/// is not documented, so both are read so. When the stop triggers, the
/// take-profit is removed *before* the stop executes: read as an end, the
/// coins the triggered stop still holds would be protected again (refused
/// for balance) or the entry closed as if they were sold.
///
/// `eR` is a conditional field (only since 2026-03), so an order canceled or
/// expired with nothing executed and no reason may be such a sibling too, or
/// a list canceled by hand: that one order's update cannot tell. The list's
/// end decides: its `listStatus` `ALL_DONE`, which the gateway follows with a
/// lookup of the list (both of its orders), or sync's next pass.
fn leg_event(take_profit: bool, update: &ExecutionUpdate) -> Option<LegEvent> {
    let reason = update.expiry_reason.as_deref().filter(|r| *r != "NONE");
    let nothing_sold = update.executed_qty.is_zero();
    match (take_profit, update.status) {
        (true, EntryStatus::Filled) => Some(LegEvent::TakeProfitFilled),
        (false, EntryStatus::Filled) => Some(LegEvent::StopLossFilled),
        // Binance cancels the list's stop when the take-profit fills partly.
        (true, EntryStatus::PartiallyFilled) => {
            Some(LegEvent::EndedExternally(ExternalEnd::TakeProfitPartial))
        }
        // Removed by its sibling, whatever the status: not an end in itself.
        (_, EntryStatus::Canceled | EntryStatus::Expired) if reason == Some("OCO_TRIGGER") => None,
        // A triggered stop the exchange expired (e.g. the price-range rule).
        (false, EntryStatus::Expired) if reason.is_some() || !nothing_sold => {
            Some(LegEvent::EndedExternally(ExternalEnd::StopExpired))
        }
        // No reason and nothing sold: a sibling or a cancel, left to the list's end.
        (_, EntryStatus::Canceled | EntryStatus::Expired) if reason.is_none() && nothing_sold => {
            None
        }
        (_, EntryStatus::Canceled | EntryStatus::Expired) => {
            Some(LegEvent::EndedExternally(ExternalEnd::Canceled))
        }
        _ => None,
    }
}
