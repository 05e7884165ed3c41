//! `protect(entry, evidence, source)`: the one idempotent routine.
//!
//! Every layer calls it, in any order, in any process. It records evidence
//! monotonically, plans from facts, claims each leg in the store before any
//! request goes out, places the claimed legs concurrently, records outcomes,
//! and resolves an unknown outcome by looking the deterministic client id up,
//! never by placing again. See DESIGN.md, rules 1–8.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rust_decimal::Decimal;
use tracing::{Instrument, error, info, warn};

use crate::ids::{
    AccountId, EntryId, IdError, IdScheme, LegIndex, LegKey, OcoClientIds, OrderRole,
};
use crate::levels::{LevelsError, StopSubstitute, resolve_levels};
use crate::model::{
    Entry, EntryEventRecord, Evidence, Fees, LatePolicy, Leg, LegClaim, LegUpdate, Millis,
    OrderSize, Protection, Realized, SaleSide, Source,
};
use crate::money::Qty;
use crate::plan::{Degraded, Plan, PlanInput, Shortfall, plan_protection};
use crate::ports::{
    ApiCredentials, Clock, Exchange, ExchangeError, ListCancelOutcome, MARKET_STOP_UNSUPPORTED,
    OcoRequest, OrderListSnapshot, OrderRequest, STOP_LIMIT_UNSUPPORTED, Side, Store, StoreError,
    event,
};
use crate::ports::{FillContext, RecordedFill};
use crate::state::{EntryStatus, ExternalEnd, LegSold, LegState};
use crate::symbol::SymbolRules;

/// Settings of the routine.
#[derive(Debug, Clone)]
pub struct ProtectorConfig {
    /// Client-id namespace.
    pub ids: IdScheme,
    /// A claim older than this with no outcome is presumed abandoned (its
    /// claimant crashed) and is resolved by lookup.
    pub claim_timeout: Duration,
    /// How long a stop-budget refusal is remembered when planning.
    pub budget_hint_ttl: Duration,
    /// Re-planning rounds within one call (new evidence, a list that ended
    /// while being replaced, a balance that turned out smaller).
    pub max_rounds: u32,
}

impl ProtectorConfig {
    /// Sensible settings under the namespace `ids`.
    pub fn new(ids: IdScheme) -> Self {
        Self {
            ids,
            claim_timeout: Duration::from_secs(30),
            budget_hint_ttl: Duration::from_secs(60),
            max_rounds: 4,
        }
    }
}

/// Why `protect` did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Nothing has filled.
    NoFill,
    /// The placed legs already cover what can be covered.
    Covered,
    /// Another caller holds a fresh claim and is placing right now.
    InFlight,
    /// The position is sold, exited, or closed.
    Settled,
    /// The re-planning rounds ran out; the next call goes on.
    Busy,
}

/// What one call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectOutcome {
    /// Nothing to do.
    Nothing(Idle),
    /// Placed a generation of legs.
    Placed {
        /// The legs acknowledged by the exchange.
        legs: Vec<LegKey>,
        /// Older lists canceled to make room.
        replaced: usize,
        /// Set when fewer legs were placed than configured.
        degraded: Option<Degraded>,
    },
    /// A placement's answer was lost and the lookup did not find it yet; the
    /// next call (or sync) resolves it by lookup.
    Pending {
        /// The legs in doubt.
        legs: Vec<LegKey>,
    },
    /// Some legs were refused or could not be sent, or a take-profit rest
    /// could not be canceled (lists placed over the other coins or not);
    /// the next call retries.
    Failed {
        /// What went wrong, per leg.
        errors: Vec<String>,
    },
    /// Recorded as unprotectable with the reason.
    Unprotectable {
        /// Why.
        reason: String,
    },
    /// Protection came too late and the position was sold at market.
    Exited {
        /// Why.
        reason: String,
    },
}

/// A call's result, tagged for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectReport {
    /// The entry.
    pub entry: crate::ids::EntryId,
    /// The calling layer.
    pub source: Source,
    /// What happened.
    pub outcome: ProtectOutcome,
    /// First fill time, for the fill→protected latency.
    pub filled_at: Option<Millis>,
    /// When the call finished.
    pub finished_at: Millis,
}

/// What stopped `protect` before it could decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtectError {
    /// The store failed; nothing unsafe happened, call again.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A read from the exchange failed before anything was sent.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The id layout overflowed.
    #[error(transparent)]
    Id(#[from] IdError),
}

enum Round {
    Done(ProtectOutcome),
    /// Plan again; `holding`, when read, caps the position. `None` keeps a
    /// holding read earlier in the call: nothing this round did moved coins.
    Again {
        holding: Option<Qty>,
    },
    /// Plan again from no holding: this round freed or moved coins (a rest
    /// or an older list canceled, a list withdrawn, a leg re-read), so a
    /// balance read before it is stale. Planned from a stale read, coins it
    /// freed would be left out, and the entry closed over them.
    Replan,
}

/// What a call tries at most once, taken by the round that tries it, not
/// by a round that ends before: a failure is not hammered round after round.
#[derive(Debug, Default)]
struct Once {
    /// The cancel of the entry's take-profit rests.
    rests: bool,
    /// The balance read after a market exit refused for balance, and the
    /// re-plan from it.
    exit_balance: bool,
    /// A replacement the account's placements could hold as one list but
    /// not as two: the call plans again with a stop budget of one (DESIGN
    /// rule 7: fewer legs, said, never no stop).
    one_list: bool,
}

/// A first protection planned from facts alone.
struct FirstPlan {
    plan: Plan,
    claims: Vec<LegClaim>,
    /// What the legs cover: the net filled quantity, capped by holdings.
    position: Qty,
}

/// A fill seen on the stream, as recorded, with the plan of the legs it
/// claimed (and the symbol's rules) when it claimed any.
struct Seen {
    fill: RecordedFill,
    first: Option<(FirstPlan, SymbolRules)>,
}

/// A claimed generation on its way out, with what placing it needs.
struct Claimed<'a> {
    entry: &'a Entry,
    creds: &'a ApiCredentials,
    rules: &'a SymbolRules,
    /// The legs still working, to cancel before the new ones go out.
    active: Vec<&'a Leg>,
    position: Qty,
    /// What take-profit rests still lock: not in the free balance, yet the
    /// entry's, so a balance refusal's re-plan counts them back in (the
    /// round takes them out again before planning).
    rest_open: Qty,
    /// What lists left working because their stop has triggered still hold
    /// (their quantity less what the stop sold; `position` is without it):
    /// locked, counted back in the same way, and their stops keep the entry
    /// partly protected.
    kept: Qty,
    late: LatePolicy,
    degraded: Option<Degraded>,
    /// The stop kind the symbol took in place of the one asked: said with
    /// the placement.
    stop_substitute: Option<StopSubstitute>,
    /// Coins the plan's lists cannot hold: the entry is recorded
    /// unprotectable with it rather than protected.
    short: Option<Shortfall>,
    /// The claims won; nothing else is sent.
    claims: Vec<LegClaim>,
    source: Source,
}

/// The claims of `wanted` that were won (`won[i]` for `wanted[i]`).
fn won_claims(wanted: Vec<LegClaim>, won: Vec<bool>) -> Vec<LegClaim> {
    wanted
        .into_iter()
        .zip(won)
        .filter_map(|(claim, won)| won.then_some(claim))
        .collect()
}

/// Every line logged while protecting carries the entry, its account and its
/// client id (the last two are recorded once the entry is read).
fn protect_span(entry: crate::ids::EntryId, source: Source) -> tracing::Span {
    tracing::info_span!(
        "protect",
        entry = %entry,
        account = tracing::field::Empty,
        client_id = tracing::field::Empty,
        %source,
    )
}

/// Holds the ports and runs `protect`.
pub struct Protector {
    exchange: Arc<dyn Exchange>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: ProtectorConfig,
    observer: std::sync::OnceLock<Arc<dyn ProtectObserver>>,
    /// Leg trades whose best-effort write failed ([`Protector::leg_trade_failures`]).
    trade_failures: std::sync::atomic::AtomicU64,
}

impl Protector {
    /// Wires the routine to its ports.
    pub fn new(
        exchange: Arc<dyn Exchange>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: ProtectorConfig,
    ) -> Self {
        Self {
            exchange,
            store,
            clock,
            config,
            observer: std::sync::OnceLock::new(),
            trade_failures: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many leg-trade writes failed since start (each logged): their
    /// commissions are missing from a result until the trade is reported
    /// again, and the entry says so (`Entry::fees_complete`).
    pub fn leg_trade_failures(&self) -> u64 {
        self.trade_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records trades of leg `key`'s `side` order for the result's
    /// commissions, best-effort: never on protection's path. Called after
    /// the sale is recorded and the leg moved (and protected); a failure is
    /// logged and counted, not returned. `true` when written.
    pub(crate) async fn record_trades_quietly(
        &self,
        key: LegKey,
        side: SaleSide,
        trades: &[crate::model::Fill],
    ) -> bool {
        if trades.is_empty() {
            return false;
        }
        match self.store.record_leg_trades(key, side, trades).await {
            Ok(()) => true,
            Err(err) => {
                self.trade_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(leg = %key, side = side.name(), trades = trades.len(), error = %err, "leg trades unrecorded; their commissions are left out of the result");
                false
            }
        }
    }

    /// How old a claim without an outcome must be before it is looked up as
    /// abandoned (its claimant died).
    pub fn claim_timeout(&self) -> Duration {
        self.config.claim_timeout
    }

    /// The id scheme, for layers that recognise our orders.
    pub fn ids(&self) -> &IdScheme {
        &self.config.ids
    }

    /// The store this routine writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The exchange this routine places on.
    pub fn exchange(&self) -> &Arc<dyn Exchange> {
        &self.exchange
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Moves a leg to `to` if it is still in the state it was read in.
    ///
    /// # Errors
    /// [`ProtectError::Store`].
    pub async fn transition_leg(&self, leg: &Leg, to: LegState) -> Result<bool, ProtectError> {
        self.transition(leg, to, None).await
    }

    /// Records `evidence` (if any) and makes sure the entry's filled quantity
    /// is protected, placing or replacing legs as needed. Idempotent: any
    /// number of concurrent calls for one fill place each leg once.
    ///
    /// # Errors
    /// [`ProtectError`] when the store or a read from the exchange fails;
    /// nothing is left half-done that a later call cannot finish.
    pub async fn protect(
        &self,
        entry: crate::ids::EntryId,
        evidence: Option<&Evidence>,
        source: Source,
    ) -> Result<ProtectReport, ProtectError> {
        let report = self
            .protect_in_span(entry, evidence, None, source)
            .instrument(protect_span(entry, source))
            .await?;
        // Without an owner to check, every entry is protected or an error.
        report.ok_or_else(|| {
            ProtectError::Store(StoreError::NotFound {
                what: "entry",
                id: entry.to_string(),
            })
        })
    }

    /// [`Protector::protect`] for a fill of `symbol` seen on `account`'s own
    /// order stream: the evidence is recorded only if the entry is that
    /// account's (`None`, with nothing written, otherwise), and the account's
    /// credentials and settings and the entry's legs are read while it is
    /// recorded rather than after. On a first fill the legs are planned from
    /// the merged entry and claimed in the same write
    /// ([`Store::record_fill_and_claim`]): the fill waits for one durable
    /// write before its legs go out, not a write, then reads, then a claim.
    ///
    /// # Errors
    /// As [`Protector::protect`].
    pub async fn protect_seen(
        &self,
        account: AccountId,
        entry: crate::ids::EntryId,
        symbol: &str,
        evidence: &Evidence,
        source: Source,
    ) -> Result<Option<ProtectReport>, ProtectError> {
        self.protect_in_span(entry, Some(evidence), Some((account, symbol)), source)
            .instrument(protect_span(entry, source))
            .await
    }

    async fn protect_in_span(
        &self,
        entry: crate::ids::EntryId,
        evidence: Option<&Evidence>,
        seen_on: Option<(AccountId, &str)>,
        source: Source,
    ) -> Result<Option<ProtectReport>, ProtectError> {
        let mut holding = evidence.and_then(|e| e.holding);
        let name_span = |entry: &Entry| {
            let span = tracing::Span::current();
            span.record("account", tracing::field::display(entry.account));
            span.record("client_id", tracing::field::display(&entry.client_id));
        };
        let mut first = None;
        let mut once = Once::default();
        let (mut current, mut known) = match (evidence, seen_on) {
            (Some(ev), Some((account, symbol))) => {
                let Some(recorded) = self
                    .record_and_claim(account, entry, symbol, ev, source)
                    .await?
                else {
                    return Ok(None);
                };
                let won_any = recorded.fill.won.iter().any(|won| *won);
                match recorded.first {
                    Some((plan, rules)) if won_any => {
                        let current = recorded.fill.entry.clone();
                        name_span(&current);
                        first = Some(
                            self.send_first(recorded.fill, plan, rules, source, &mut once)
                                .await?,
                        );
                        (current, None)
                    }
                    // Nothing claimed (or, were a claim ever not re-planned the
                    // same, the round finds it in flight and leaves it to time out
                    // and be looked up: never placed twice). A store may read the
                    // legs before it writes the evidence: a claimant that finished
                    // in between re-read the entry without this fill, so whether a
                    // claim is still in flight is decided from legs read after.
                    _ => {
                        let RecordedFill {
                            entry: written,
                            mut context,
                            ..
                        } = recorded.fill;
                        context.legs = self.store.legs(entry).await?;
                        (written, Some(context))
                    }
                }
            }
            (Some(ev), None) => (self.store.record_evidence(entry, ev).await?, None),
            (None, _) => (self.store.entry(entry).await?, None),
        };
        name_span(&current);
        let mut outcome = ProtectOutcome::Nothing(Idle::Busy);
        for _ in 0..self.config.max_rounds {
            let round = match first.take() {
                Some(round) => round,
                None => {
                    self.round(&current, holding, source, known.take(), &mut once)
                        .await?
                }
            };
            match round {
                Round::Done(o @ ProtectOutcome::Exited { .. }) => {
                    // The exit sold what this round saw. A fill recorded meanwhile
                    // found the exit's claim in flight and left its coins to us.
                    outcome = o;
                    let fresh = self.store.entry(entry).await?;
                    if fresh.net_qty() <= current.net_qty() {
                        break;
                    }
                    current = fresh;
                }
                Round::Done(o) => {
                    outcome = o;
                    break;
                }
                Round::Again { holding: h } => {
                    let fresh = self.store.entry(entry).await?;
                    // A holding read from the balance before fills recorded
                    // since would cap the position below them, and the lists
                    // over the old holding would be called covering it. Too
                    // much is refused for balance and read again; too little
                    // would leave the new coins without a stop.
                    let added = fresh.net_qty().saturating_sub(current.net_qty());
                    holding = h.or(holding).map(|held| held.plus(added));
                    current = fresh;
                }
                Round::Replan => {
                    holding = None;
                    current = self.store.entry(entry).await?;
                }
            }
        }
        let report = ProtectReport {
            entry,
            source,
            outcome,
            filled_at: current.filled_at,
            finished_at: self.clock.now(),
        };
        if let Some(observer) = self.observer.get() {
            observer.protected(&report);
        }
        Ok(Some(report))
    }

    async fn round(
        &self,
        entry: &Entry,
        holding: Option<Qty>,
        source: Source,
        known: Option<FillContext>,
        once: &mut Once,
    ) -> Result<Round, ProtectError> {
        let Some(fill_price) = entry.average_price() else {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::NoFill)));
        };
        if entry.protection == Protection::Closed {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::Settled)));
        }
        let FillContext {
            credentials: creds,
            account,
            mut legs,
        } = match known {
            Some(known) => known,
            None => self.store.fill_context(entry.account, entry.id).await?,
        };

        // Settle legs in doubt: an unknown outcome, or a claim whose claimant went quiet.
        let now = self.clock.now();
        let mut settled_any = false;
        for leg in &legs {
            let stale_claim = leg.state == LegState::Claimed
                && now.since(leg.claimed_at) > self.config.claim_timeout;
            if leg.state == LegState::Unknown || stale_claim {
                self.refresh_leg(&creds, leg).await?;
                settled_any = true;
            }
        }
        if settled_any {
            legs = self.store.legs(entry.id).await?;
            // A claimant that died may have canceled an older list before it could
            // record so: check the lists the store still believes placed.
            for leg in legs
                .iter()
                .filter(|l| matches!(l.state, LegState::Placed { .. }))
            {
                self.refresh_leg(&creds, leg).await?;
            }
            legs = self.store.legs(entry.id).await?;
        }
        if legs.iter().any(|l| l.state == LegState::Claimed) {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::InFlight)));
        }
        if legs.iter().any(|l| l.state == LegState::Unknown) {
            let pending = legs
                .iter()
                .filter(|l| l.state == LegState::Unknown)
                .map(|l| l.key)
                .collect();
            return Ok(Round::Done(ProtectOutcome::Pending { legs: pending }));
        }

        let sold: Qty = legs.iter().map(|l| l.sold.total()).sum();
        // What the fills and the recorded sales say is still held.
        let owed = entry.net_qty().saturating_sub(sold);
        let mut position = owed;
        if let Some(h) = holding {
            position = position.min(h);
        }
        let active: Vec<&Leg> = legs.iter().filter(|l| l.state.is_active()).collect();
        // What the working lists hold: a triggered stop that sold part of its
        // list holds only the rest, and the position counts its sale already.
        let active_qty: Qty = active.iter().map(|l| l.unsold()).sum();
        // The rests of partly filled take-profits: on the book without a stop,
        // locking what they have not sold until they are canceled.
        let rests: Vec<&Leg> = legs.iter().filter(|l| is_take_profit_rest(l)).collect();
        let rest_open: Qty = rests
            .iter()
            .map(|l| l.qty.saturating_sub(l.sold.take_profit))
            .sum();
        let exited = matches!(entry.protection, Protection::Exited { .. });
        if position.is_zero() && active.is_empty() && !rests.is_empty() {
            // A balance read does not count coins the entry's own take-profit
            // rest locks: closing would leave them on the book without a stop
            // and without an entry. The rest is canceled (its sale read) first.
            if !std::mem::replace(&mut once.rests, true)
                && let Some(freed) = self
                    .cancel_take_profit_rests(&creds, entry, &rests, source)
                    .await?
            {
                self.label_rest_canceled(entry, freed, source).await?;
                return Ok(Round::Replan);
            }
            self.label_unprotected(entry).await?;
            return Ok(Round::Done(ProtectOutcome::Failed {
                errors: vec![format!(
                    "take-profit rest of {rest_open} still open; no other coins free"
                )],
            }));
        }
        if position.is_zero() && active.is_empty() && !owed.is_zero() {
            match self.adopt_stray_list(&creds, entry, &legs, source).await? {
                // Only a balance read said the coins were gone, and a list of
                // this entry no leg followed held them: it follows it now.
                StrayCheck::Adopted => {
                    return Ok(Round::Done(ProtectOutcome::Nothing(Idle::Covered)));
                }
                // A lookup of a list of this entry moved its leg (it ended
                // meanwhile, its sale recorded): plan again from the legs.
                StrayCheck::Changed => return Ok(Round::Replan),
                StrayCheck::HeldBy { list, own } => {
                    // A list of ours that no live leg follows may lock these
                    // coins (placed over them by another entry's generation):
                    // closing the entry as sold would leave them without a
                    // stop and without an entry once that list is gone.
                    let why = if own {
                        // Most likely still working over these very coins (its
                        // lookup lagging): canceled by hand, it would take
                        // the entry's only stop along.
                        format!(
                            "coins not free, and list {list} of this entry that no live leg follows is open on {}: not closed; do not cancel it by hand, it may hold the entry's stop; it is read again on the next call",
                            entry.symbol.name
                        )
                    } else {
                        format!(
                            "coins not free, and list {list} of another entry that no live leg follows is open on {}: not closed; check the account and cancel it by hand",
                            entry.symbol.name
                        )
                    };
                    warn!(entry = %entry.id, client_id = %list, %source, "coins not free while a list of ours no leg follows is open: entry not closed");
                    self.label_unprotected(entry).await?;
                    // Once per list: the entry's history says why it stays open,
                    // however often it is retried.
                    let history = self.store.events(entry.id).await?;
                    if !history
                        .iter()
                        .any(|e| e.kind == HELD_BY_STRAY && e.detail == why)
                    {
                        self.store
                            .append_event(&event(
                                entry.id,
                                HELD_BY_STRAY,
                                &why,
                                Some(source),
                                self.clock.now(),
                            ))
                            .await?;
                    }
                    return Ok(Round::Done(ProtectOutcome::Failed { errors: vec![why] }));
                }
                StrayCheck::Nothing => {}
            }
        }
        if position.is_zero() && active.is_empty() {
            // An exit keeps its record and the result it recorded; there is
            // nothing more to close.
            if entry.status.is_final() && entry.protection != Protection::Closed && !exited {
                // Owed coins, capped to none by a balance read earlier in the
                // call. A closed entry is never followed again: coins free now
                // (a list that locked them at the read ended since, outside
                // or by another entry's replacement) are planned instead of
                // being left without a stop. One read, on a rare path.
                if !owed.is_zero() {
                    let rules = self.exchange.symbol_rules(&entry.symbol.name).await?;
                    let free = self.held_base(&creds, &rules).await?;
                    let plannable = owed.min(free).floor_to(rules.step);
                    // Too small for a list is a reason to close; too large for
                    // one (over `maxQty`) is not: the plan splits or says so.
                    if !plannable.is_zero() && plannable >= rules.min_qty {
                        return Ok(Round::Again {
                            holding: Some(free),
                        });
                    }
                }
                let realized = realized(entry, &legs);
                self.store.close_entry(entry.id, realized, now).await?;
                self.store
                    .append_event(&event(
                        entry.id,
                        "closed",
                        format!("realized {}", realized.quote),
                        Some(source),
                        now,
                    ))
                    .await?;
            }
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::Settled)));
        }

        let mut rules = self.exchange.symbol_rules(&entry.symbol.name).await?;
        believe_stop_refusals(&mut rules, &legs);
        // An exit sold the coins it saw. Coins that came after it (the rest of a
        // resting order), or that it could not sell, are a position like any other;
        // only what no order could sell is left behind. Too small only: coins
        // over `maxQty` or the maximum notional are a position too large for
        // one list, and settled they would never be followed again.
        if exited && active.is_empty() && is_dust(position, fill_price, &rules) {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::Settled)));
        }
        let levels = match resolve_levels(
            entry.levels,
            account.protection.percents,
            fill_price,
            &rules,
            account.protection.stop,
        ) {
            Ok(l) => l,
            // Legs that cover the position keep it; nothing new is needed from levels.
            Err(_) if legs_cover(active_qty, position, &rules) => {
                return self.covered(entry, &active, source, now).await;
            }
            Err(err @ LevelsError::Order { .. }) => {
                // A late exit sells at market, so a rest's take-profit is worth
                // less than the coins it locks: it is canceled first.
                if !rests.is_empty()
                    && !std::mem::replace(&mut once.rests, true)
                    && let Some(freed) = self
                        .cancel_take_profit_rests(&creds, entry, &rests, source)
                        .await?
                {
                    self.label_rest_canceled(entry, freed, source).await?;
                    return Ok(Round::Replan);
                }
                // The entry filled beyond its own stop or target: the market passed a level.
                // Lists already working keep their stops; the rest takes the late policy.
                let reason = format!("levels passed at fill: {err}");
                return self
                    .late(
                        entry,
                        &creds,
                        &rules,
                        &legs,
                        LateCase {
                            // What a rest locks cannot be sold until it is canceled.
                            position: position
                                .saturating_sub(active_qty)
                                .saturating_sub(rest_open),
                            partly_protected: !active.is_empty(),
                        },
                        account.protection.late,
                        source,
                        reason,
                        once,
                    )
                    .await;
            }
            Err(err) => return self.unprotectable(entry, source, err.to_string()).await,
        };

        let generation = legs.iter().map(|l| l.key.generation + 1).max().unwrap_or(0);
        let hint = self.stop_budget_hint(&legs, generation, now);
        let stop_budget = if once.one_list {
            Some(hint.map_or(1, |b| b.min(1)))
        } else {
            hint
        };
        let plan = match plan_protection(&PlanInput {
            rules: &rules,
            levels,
            reference: fill_price,
            position,
            split: account.protection.split,
            stop_budget,
        }) {
            Ok(plan) => plan,
            Err(_) if legs_cover(active_qty, position, &rules) => {
                return self.covered(entry, &active, source, now).await;
            }
            // What flooring to the step left after the legs sold out is dust, not a position.
            // Only when too small: the plan also calls dust a position whose lists
            // would be over the maximum notional, and a close would leave it
            // without a stop for good.
            Err(crate::plan::Unprotectable::Dust {
                position,
                floored,
                min_qty,
                notional,
                min_notional,
            }) if active.is_empty()
                && !sold.is_zero()
                && entry.status.is_final()
                && (floored.is_zero() || floored < min_qty || notional < min_notional) =>
            {
                if entry.protection != Protection::Closed {
                    let realized = realized(entry, &legs);
                    self.store.close_entry(entry.id, realized, now).await?;
                    self.store
                        .append_event(&event(
                            entry.id,
                            "closed",
                            format!("realized {}, dust {position} left unsold", realized.quote),
                            Some(source),
                            now,
                        ))
                        .await?;
                }
                return Ok(Round::Done(ProtectOutcome::Nothing(Idle::Settled)));
            }
            Err(reason) => return self.unprotectable(entry, source, reason.to_string()).await,
        };
        // Coins the lists cannot hold may have been sold by hand since (sync
        // passes no holding): the position is capped at what the lists, the
        // rests and the free balance hold, read once, so the shortfall label
        // does not outlive the coins.
        if plan.short.is_some() && holding.is_none() {
            match self.held_base(&creds, &rules).await {
                Ok(free) => {
                    let held = active_qty.plus(rest_open).plus(free);
                    if held < position {
                        return Ok(Round::Again {
                            holding: Some(held),
                        });
                    }
                }
                Err(err) => {
                    warn!(entry = %entry.id, error = %err, "balance unread; the shortfall is planned from the fills");
                }
            }
        }
        if !active.is_empty() && active_qty >= plan.total() {
            // Lists that hold all they can still leave the rest without a stop:
            // said every call, never called covered.
            if let Some(short) = plan.short {
                return self.unprotectable(entry, source, short.to_string()).await;
            }
            return self.covered(entry, &active, source, now).await;
        }
        // A list whose stop has triggered is selling its coins: canceled, the
        // sale would stop, and a new list for them would likely be refused
        // (the price is under its stop). It stays, and the new generation
        // covers only the coins it does not hold.
        let triggered = self.triggered_lists(entry, &creds, &active).await;
        let (active, active_qty, position, plan, kept) = if triggered.is_empty() {
            (active, active_qty, position, plan, Qty::ZERO)
        } else {
            // What they still hold: a stop that sold part holds only the rest.
            let kept: Qty = triggered.iter().map(|l| l.unsold()).sum();
            let others: Vec<&Leg> = active
                .iter()
                .copied()
                .filter(|l| !triggered.iter().any(|t| t.key == l.key))
                .collect();
            let others_qty: Qty = others.iter().map(|l| l.unsold()).sum();
            let uncovered = position.saturating_sub(kept);
            info!(entry = %entry.id, lists = triggered.len(), qty = %kept, "lists whose stop has triggered are left selling; the rest is replaced");
            let plan = match plan_protection(&PlanInput {
                rules: &rules,
                levels,
                reference: fill_price,
                position: uncovered,
                split: account.protection.split,
                stop_budget,
            }) {
                Ok(plan) => plan,
                Err(_) if legs_cover(others_qty, uncovered, &rules) => {
                    return self.covered(entry, &active, source, now).await;
                }
                Err(reason) => {
                    return self.unprotectable(entry, source, reason.to_string()).await;
                }
            };
            if !others.is_empty() && others_qty >= plan.total() {
                if let Some(short) = plan.short {
                    return self.unprotectable(entry, source, short.to_string()).await;
                }
                return self.covered(entry, &active, source, now).await;
            }
            (others, others_qty, uncovered, plan, kept)
        };

        // A rest is canceled only in a round that places lists: canceling it in
        // one that places nothing would drop a take-profit for no stop.
        let (plan, position) = if rests.is_empty() {
            (plan, position)
        } else {
            if !std::mem::replace(&mut once.rests, true)
                && let Some(freed) = self
                    .cancel_take_profit_rests(&creds, entry, &rests, source)
                    .await?
            {
                // Coins freed (and what the rests sold recorded): plan again.
                self.label_rest_canceled(entry, freed, source).await?;
                return Ok(Round::Replan);
            }
            // A rest whose sale is not recorded still counts its open part as
            // held and locked, even when its cancel went through: it may have
            // sold them (filled whole, or more since the last read), and lists
            // planned over coins it sold would lock another entry's. Only the
            // coins no rest counts are planned.
            let free = position.saturating_sub(rest_open);
            let open = format!("take-profit rest of {rest_open} still open");
            match plan_protection(&PlanInput {
                rules: &rules,
                levels,
                reference: fill_price,
                position: free,
                split: account.protection.split,
                stop_budget,
            }) {
                Ok(plan) if active_qty < plan.total() => (plan, free),
                // The rest has no stop, whatever the lists hold: labelled
                // protected, the entry would not raise the unprotected alert
                // for as long as its cancel keeps failing.
                Ok(_) => {
                    self.label_unprotected(entry).await?;
                    return Ok(Round::Done(ProtectOutcome::Failed { errors: vec![open] }));
                }
                Err(err) => {
                    self.label_unprotected(entry).await?;
                    return Ok(Round::Done(ProtectOutcome::Failed {
                        errors: vec![format!("{open}; {err}")],
                    }));
                }
            }
        };
        // Claim the new generation before anything is sent; only the claimant goes on.
        // Stamped now, not at the round's start: the lookups above can wait, and
        // a claim born old could be taken over as abandoned while it is sent.
        let wanted = self.claims_of(entry, &plan, generation, source, self.clock.now())?;
        // Every leg of the generation in one durable write; only legs won are sent.
        let won = self.store.claim_legs(&wanted).await?;
        self.send_claimed(
            Claimed {
                entry,
                creds: &creds,
                rules: &rules,
                active,
                position,
                rest_open,
                kept,
                late: account.protection.late,
                degraded: plan.degraded,
                stop_substitute: plan.stop_substitute,
                short: plan.short,
                claims: won_claims(wanted, won),
                source,
            },
            once,
        )
        .await
    }

    /// The legs of `plan` as generation `generation` of `entry`, to claim.
    fn claims_of(
        &self,
        entry: &Entry,
        plan: &Plan,
        generation: u32,
        source: Source,
        now: Millis,
    ) -> Result<Vec<LegClaim>, IdError> {
        plan.legs
            .iter()
            .map(|planned| {
                let key = LegKey {
                    entry: entry.id,
                    leg: planned.index,
                    generation,
                };
                Ok(LegClaim {
                    key,
                    ids: self.config.ids.oco(key)?,
                    symbol: entry.symbol.name.clone(),
                    qty: planned.qty,
                    take_profit: planned.take_profit,
                    stop: planned.stop,
                    stop_limit: planned.stop_limit,
                    source,
                    at: now,
                })
            })
            .collect()
    }

    /// A first protection decided from facts alone: no legs yet, the levels
    /// resolve and the plan holds. `None` for anything else (legs to settle
    /// or replace, a level already passed, dust, a symbol that does not
    /// trade), which [`Protector::round`] decides with the reads and writes
    /// it needs. The same inputs always give the same plan.
    fn first_plan(
        &self,
        entry: &Entry,
        context: &FillContext,
        rules: &SymbolRules,
        holding: Option<Qty>,
        source: Source,
        now: Millis,
    ) -> Option<FirstPlan> {
        if !context.legs.is_empty()
            || rules.symbol.name != entry.symbol.name
            || matches!(
                entry.protection,
                Protection::Exited { .. } | Protection::Closed
            )
        {
            return None;
        }
        let fill_price = entry.average_price()?;
        let position = holding.map_or(entry.net_qty(), |h| entry.net_qty().min(h));
        if position.is_zero() {
            return None;
        }
        let settings = &context.account.protection;
        let levels = resolve_levels(
            entry.levels,
            settings.percents,
            fill_price,
            rules,
            settings.stop,
        )
        .ok()?;
        let plan = plan_protection(&PlanInput {
            rules,
            levels,
            reference: fill_price,
            position,
            split: settings.split,
            stop_budget: None,
        })
        .ok()?;
        let claims = self.claims_of(entry, &plan, 0, source, now).ok()?;
        Some(FirstPlan {
            plan,
            claims,
            position,
        })
    }

    /// Records a fill seen on `account`'s stream and, when it is the entry's
    /// first, claims its legs in the same write. `None` when the entry is not
    /// that account's.
    async fn record_and_claim(
        &self,
        account: AccountId,
        entry: crate::ids::EntryId,
        symbol: &str,
        evidence: &Evidence,
        source: Source,
    ) -> Result<Option<Seen>, ProtectError> {
        let holding = evidence.holding;
        // Only rules the adapter already holds: the evidence must not wait for
        // the exchange. Without them nothing is claimed here, and the round
        // reads them (and reports what fails).
        let rules = self.exchange.cached_symbol_rules(symbol);
        let now = self.clock.now();
        // The planner's last plan is the one its claims came from.
        let last = std::sync::Mutex::new(None);
        let plan = |merged: &Entry, context: &FillContext| {
            let planned = rules
                .as_ref()
                .and_then(|rules| self.first_plan(merged, context, rules, holding, source, now));
            let claims = planned
                .as_ref()
                .map(|p| p.claims.clone())
                .unwrap_or_default();
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = planned;
            claims
        };
        let Some(fill) = self
            .store
            .record_fill_and_claim(account, entry, evidence, &plan)
            .await?
        else {
            return Ok(None);
        };
        let planned = last
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = match (rules, planned) {
            _ if fill.claims.is_empty() => None,
            (Some(rules), Some(planned)) if planned.claims == fill.claims => Some((planned, rules)),
            _ => {
                // A store that answered other claims than the planner's last: the
                // round finds them in flight; the claim timeout and a lookup settle them.
                tracing::error!(entry = %entry, "the claims recorded with a fill are not the ones planned for it");
                None
            }
        };
        Ok(Some(Seen { fill, first }))
    }

    /// Sends the legs a first fill claimed with its evidence.
    async fn send_first(
        &self,
        fill: RecordedFill,
        first: FirstPlan,
        rules: SymbolRules,
        source: Source,
        once: &mut Once,
    ) -> Result<Round, ProtectError> {
        let RecordedFill {
            entry,
            context,
            claims,
            won,
        } = fill;
        self.send_claimed(
            Claimed {
                entry: &entry,
                creds: &context.credentials,
                rules: &rules,
                active: Vec::new(),
                position: first.position,
                rest_open: Qty::ZERO,
                kept: Qty::ZERO,
                late: context.account.protection.late,
                degraded: first.plan.degraded,
                stop_substitute: first.plan.stop_substitute,
                short: first.plan.short,
                claims: won_claims(claims, won),
                source,
            },
            once,
        )
        .await
    }

    /// Everything after a generation is claimed: older lists canceled, the
    /// claimed legs placed concurrently, their outcomes recorded.
    async fn send_claimed(
        &self,
        claimed: Claimed<'_>,
        once: &mut Once,
    ) -> Result<Round, ProtectError> {
        let Claimed {
            entry,
            creds,
            rules,
            active,
            position,
            rest_open,
            kept,
            late,
            degraded,
            stop_substitute,
            short,
            claims,
            source,
        } = claimed;
        if claims.is_empty() {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::InFlight)));
        }
        // Cancels are not held when the account's placements are (Binance
        // counts new orders per account, up to the next UTC midnight for the
        // daily count): older lists canceled now would leave the position
        // without any stop until the hold ends. They keep working, and the
        // call fails for its caller to try again (sync after its backoff,
        // the gateway and the API by a flag). A first protection, with
        // nothing to cancel, still tries: it loses nothing.
        if !active.is_empty()
            && let Some(retry_after) = self
                .exchange
                .placements_held(creds, u32::try_from(claims.len()).unwrap_or(u32::MAX))
        {
            // Room for one list, not two: one list for the whole position
            // (the plan says it is degraded) rather than none until the
            // hold ends.
            if claims.len() > 1
                && !std::mem::replace(&mut once.one_list, true)
                && self.exchange.placements_held(creds, 1).is_none()
            {
                warn!(entry = %entry.id, ?retry_after, generation = claims[0].key.generation, "the account's placements are held for two lists, not one: planned again as one list");
                self.release(
                    &claims,
                    None,
                    "placements held for two lists, not one: planned again as one",
                )
                .await?;
                return Ok(Round::Replan);
            }
            let err = ExchangeError::RateLimited { retry_after };
            warn!(entry = %entry.id, ?retry_after, generation = claims[0].key.generation, "the account's placements are held: older lists kept working, nothing canceled");
            self.release(
                &claims,
                None,
                &format!("placements held, older lists kept: {err}"),
            )
            .await?;
            // Some coins have no stop (that is why lists were to be
            // replaced): a `protected` label would keep the alert silent.
            if matches!(entry.protection, Protection::Protected { .. }) {
                self.label_unprotected(entry).await?;
            }
            return Ok(Round::Done(ProtectOutcome::Failed {
                errors: vec![err.to_string()],
            }));
        }

        // Coins under an older list are locked: cancel it first (DESIGN rule 8 and
        // partial fills). A list that already ended, or that sold part of its coins
        // before the cancel, means the position changed: re-plan.
        let mut replaced = 0;
        for old in &active {
            match self
                .exchange
                .cancel_order_list(creds, &old.symbol, old.ids.list.as_str())
                .await
            {
                Ok(ListCancelOutcome::Canceled(answered)) => {
                    // What it sold is recorded before the leg leaves the live
                    // states: nothing reads a replaced leg's list again.
                    let sold = match answered {
                        Some(sold) => Some(sold),
                        None => {
                            self.final_sale(creds, &old.symbol, old.ids.list.as_str())
                                .await
                        }
                    };
                    let Some(sold) = sold else {
                        // The leg stays placed: the next call's cancel finds its
                        // list not open and looks the sale up.
                        let why = format!("{}: older list canceled, what it sold unread", old.key);
                        warn!(entry = %entry.id, leg = %old.key, client_id = %old.ids.list, "older list canceled, what it sold unread; the next call looks it up");
                        self.release(&claims, None, &why).await?;
                        self.label_unprotected(entry).await?;
                        return Ok(Round::Done(ProtectOutcome::Failed { errors: vec![why] }));
                    };
                    if !sold.total().is_zero() {
                        self.store
                            .record_leg_sold(old.key, sold, self.clock.now())
                            .await?;
                    }
                    self.replace_canceled(old).await?;
                    replaced += 1;
                    if old.sold.merge(sold).total() > old.sold.total() {
                        // The claims were sized counting those coins as held: sent,
                        // they would lock other coins of the account (or be refused).
                        info!(entry = %entry.id, leg = %old.key, client_id = %old.ids.list, sold = %sold.total(), "older list had sold part of the position; planning again");
                        self.release(
                            &claims,
                            None,
                            "superseded: an older list had sold coins before its cancel",
                        )
                        .await?;
                        // The canceled lists took their stops along until the next round places.
                        self.label_unprotected(entry).await?;
                        return Ok(Round::Replan);
                    }
                }
                // Ended by itself, or unknown to the exchange: what it sold comes
                // from a lookup, never assumed nothing.
                Ok(ListCancelOutcome::NotOpen) | Err(ExchangeError::NotFound) => {
                    self.refresh_leg(creds, old).await?;
                    self.release(
                        &claims,
                        None,
                        "superseded: an older list ended while being replaced",
                    )
                    .await?;
                    return Ok(Round::Replan);
                }
                Err(err) => {
                    self.release(
                        &claims,
                        None,
                        &format!("could not cancel older list: {err}"),
                    )
                    .await?;
                    if replaced > 0 {
                        // Older lists already canceled took their stops along.
                        self.label_unprotected(entry).await?;
                    }
                    return Ok(Round::Done(ProtectOutcome::Failed {
                        errors: vec![err.to_string()],
                    }));
                }
            }
        }
        // The exchange calls above can wait (a node-wide rate-limit pause) past
        // the claim timeout, and a stale claim may be taken over meanwhile:
        // fence the claims now, so that a taken one is not sent, and a fenced
        // one is not taken before the timeout runs again from here. Without
        // such calls the claim's own write, just made, is the fence.
        if !active.is_empty() {
            let keys: Vec<LegKey> = claims.iter().map(|c| c.key).collect();
            let fenced = self
                .store
                .fence_legs(entry.id, &keys, self.clock.now())
                .await?;
            if fenced.iter().any(|f| !f) {
                warn!(entry = %entry.id, generation = claims[0].key.generation, "claim taken over before it was sent; sending nothing");
                let ours: Vec<LegClaim> = claims
                    .iter()
                    .zip(&fenced)
                    .filter(|(_, f)| **f)
                    .map(|(c, _)| c.clone())
                    .collect();
                // A generation goes out whole or not at all.
                self.release(
                    &ours,
                    None,
                    "superseded: the claim was taken over before it was sent",
                )
                .await?;
                return Ok(Round::Again { holding: None });
            }
        }

        let requests: Vec<OcoRequest> = claims
            .iter()
            .map(|c| OcoRequest {
                symbol: c.symbol.clone(),
                qty: c.qty,
                take_profit: c.take_profit,
                stop: c.stop,
                stop_limit: c.stop_limit,
                ids: c.ids.clone(),
            })
            .collect();
        let results = join_all(requests.iter().map(|r| self.exchange.place_oco(creds, r))).await;

        if results.iter().all(Result::is_ok) {
            // Every list acknowledged: the outcomes, their history and the protection
            // go into one durable write instead of one per fact.
            let now = self.clock.now();
            let mut updates = Vec::with_capacity(claims.len());
            let mut events = Vec::with_capacity(claims.len() + 1);
            let mut placed = Vec::with_capacity(claims.len());
            for ((claim, request), ack) in
                claims.iter().zip(&requests).zip(results.iter().flatten())
            {
                info!(entry = %entry.id, leg = %claim.key, list_id = ack.list_id, client_id = %request.ids.list, %source, "protection leg placed");
                updates.push(LegUpdate {
                    key: claim.key,
                    from: "claimed",
                    to: LegState::Placed {
                        list_id: ack.list_id,
                    },
                    error: None,
                    at: now,
                });
                events.push(event(
                    entry.id,
                    "leg_placed",
                    format!("{}", claim.key),
                    Some(source),
                    now,
                ));
                placed.push(claim.key);
            }
            if let Some(substitute) = stop_substitute {
                events.push(self.stop_substituted(entry, substitute, source, now));
            }
            let protection = match short {
                // Coins no list can hold: said with the placement, in the same write.
                Some(short) => {
                    let unprotectable = Protection::Unprotectable {
                        reason: short.to_string(),
                    };
                    (entry.protection != unprotectable).then(|| {
                        warn!(entry = %entry.id, reason = %short, %source, "entry unprotectable");
                        events.push(event(
                            entry.id,
                            "unprotectable",
                            short.to_string(),
                            Some(source),
                            now,
                        ));
                        unprotectable
                    })
                }
                // A take-profit rest left open has no stop: the lists cover
                // the rest of the position, the entry is not protected yet.
                None if !rest_open.is_zero() => {
                    (entry.protection != Protection::Unprotected).then_some(Protection::Unprotected)
                }
                None => (!matches!(entry.protection, Protection::Protected { .. })).then(|| {
                    events.push(event(
                        entry.id,
                        "protected",
                        format!("by {source}"),
                        Some(source),
                        now,
                    ));
                    Protection::Protected {
                        at: now,
                        by: source,
                    }
                }),
            };
            // The entry comes back read after the write: fills recorded while
            // we placed show without another round trip.
            let recorded = self
                .store
                .record_outcomes(entry.id, &updates, &events, protection.as_ref())
                .await?;
            let mut lost = false;
            let mut ended = false;
            for (claim, applied) in claims.iter().zip(&recorded.applied) {
                if *applied {
                    continue;
                }
                match self.keep_or_withdraw(entry, creds, claim, source).await? {
                    Sent::Placed => {}
                    Sent::Ended => ended = true,
                    Sent::Withdrawn => lost = true,
                }
            }
            if ended {
                // A list ended (its take-profit filled in part, its stop
                // expired) while its answer was unrecorded: the stream's
                // follow-up found this generation in flight and left the
                // position to us, and the write's label counted that list.
                self.ended_while_placing(&recorded.entry).await?;
                return Ok(Round::Replan);
            }
            // A list withdrawn because its claim was taken over: whoever took it
            // decides the coverage, and the next round sees what they did.
            if lost || recorded.entry.net_qty() > entry.net_qty() {
                if lost && matches!(protection, Some(Protection::Protected { .. })) {
                    // The write labelled the entry protected counting a list since
                    // withdrawn: were the next rounds to fail, the label would say
                    // covered with nothing on the book. They label what they find.
                    self.store
                        .set_protection(entry.id, &Protection::Unprotected)
                        .await?;
                }
                // A withdrawn list freed its coins.
                return Ok(if lost {
                    Round::Replan
                } else {
                    Round::Again { holding: None }
                });
            }
            if !rest_open.is_zero() {
                return Ok(Round::Done(rest_still_open(rest_open, placed.len())));
            }
            return Ok(Round::Done(ProtectOutcome::Placed {
                legs: placed,
                replaced,
                degraded,
            }));
        }

        let mut placed = Vec::new();
        let mut pending = Vec::new();
        let mut errors = Vec::new();
        let mut again = None;
        let mut balance_read = false;
        let mut late_reason = None;
        let mut cap_refused = false;
        let mut stop_type_refused = false;
        let mut lost = false;
        let mut ended = false;
        for ((claim, request), result) in claims.iter().zip(&requests).zip(results) {
            let key = claim.key;
            match result {
                Ok(ack) => {
                    let ours = self
                        .update(
                            key,
                            "claimed",
                            LegState::Placed {
                                list_id: ack.list_id,
                            },
                            None,
                        )
                        .await?;
                    if !ours {
                        match self.keep_or_withdraw(entry, creds, claim, source).await? {
                            Sent::Placed => {}
                            Sent::Ended => ended = true,
                            Sent::Withdrawn => {
                                lost = true;
                                continue;
                            }
                        }
                    }
                    info!(entry = %entry.id, leg = %key, list_id = ack.list_id, client_id = %request.ids.list, %source, "protection leg placed");
                    placed.push(key);
                }
                // A duplicate id means an earlier attempt may have placed it: look it up too.
                Err(err)
                    if matches!(err, ExchangeError::UnknownOutcome(_)) || err.is_duplicate() =>
                {
                    warn!(entry = %entry.id, leg = %key, client_id = %request.ids.list, error = %err, "outcome unknown, looking it up");
                    let ours = self
                        .update(key, "claimed", LegState::Unknown, Some(err.to_string()))
                        .await?;
                    // Taken over while we sent: whatever we may have placed is not ours to keep.
                    if !ours {
                        match self.keep_or_withdraw(entry, creds, claim, source).await? {
                            Sent::Placed => {}
                            Sent::Ended => ended = true,
                            Sent::Withdrawn => lost = true,
                        }
                        continue;
                    }
                    match self
                        .exchange
                        .order_list(creds, &request.symbol, request.ids.list.as_str())
                        .await
                    {
                        Ok(Some(snap)) => {
                            self.apply_list(key, "unknown", &snap).await?;
                            placed.push(key);
                        }
                        _ => pending.push(key),
                    }
                }
                Err(err) => {
                    let code = match &err {
                        ExchangeError::Rejected { code, .. } => Some(*code),
                        _ => None,
                    };
                    warn!(entry = %entry.id, leg = %key, client_id = %request.ids.list, error = %err, "protection leg not placed");
                    self.update(
                        key,
                        "claimed",
                        LegState::NotPlaced {
                            code,
                            reason: err.to_string(),
                        },
                        Some(err.to_string()),
                    )
                    .await?;
                    if err.is_bad_prices() {
                        late_reason = Some(format!("market passed a level: {err}"));
                    } else if err.is_insufficient_balance() {
                        // Read once however many legs were refused: the
                        // placements are all answered, so one read sees it all.
                        // Unread, the call fails as for any refusal (labelled
                        // below) rather than leaving the label behind.
                        if !std::mem::replace(&mut balance_read, true) {
                            match self.held_base(creds, rules).await {
                                Ok(free) => again = Some(free),
                                Err(read) => {
                                    warn!(entry = %entry.id, error = %read, "balance unread after a refusal for balance; not re-planned");
                                }
                            }
                        }
                    } else if code == Some(-1013) {
                        self.exchange.invalidate_rules(&entry.symbol.name);
                    } else if err.is_stop_type_unsupported() {
                        // Rules read before the symbol dropped that stop type.
                        // The refusal stays on the leg: the next round places
                        // the other kind whatever the rules still say.
                        self.exchange.invalidate_rules(&entry.symbol.name);
                        stop_type_refused = true;
                    } else if is_order_cap(&err.to_string()) {
                        cap_refused = true;
                    }
                    errors.push(format!("{key}: {err}"));
                }
            }
        }
        for key in &placed {
            self.store
                .append_event(&event(
                    entry.id,
                    "leg_placed",
                    format!("{key}"),
                    Some(source),
                    self.clock.now(),
                ))
                .await?;
        }
        if let Some(substitute) = stop_substitute.filter(|_| !placed.is_empty()) {
            let said = self.stop_substituted(entry, substitute, source, self.clock.now());
            self.store.append_event(&said).await?;
        }
        if lost {
            // A withdrawn list freed its coins.
            return Ok(Round::Replan);
        }
        // Written leg by leg, the legs were not all recorded at once: one
        // recorded placed (or found by its lookup) may have ended on the
        // stream while another was still claimed or in doubt, whose
        // follow-up then left the position to us. Read once, on this path
        // only, before any label counts them.
        if !ended && !placed.is_empty() {
            let now = self.store.legs(entry.id).await?;
            ended = now.iter().any(|l| {
                placed.contains(&l.key) && crate::mem::was_placed(&l.state) && !l.state.is_active()
            });
        }
        if ended {
            let current = self.store.entry(entry.id).await?;
            self.ended_while_placing(&current).await?;
            return Ok(Round::Replan);
        }
        // The market passed a level of some legs. Those that went out keep their
        // stops; the rest of the position takes the late policy, or it would sit
        // without a stop while every new generation is refused the same way.
        if let Some(reason) = late_reason
            && pending.is_empty()
        {
            let covered: Qty = claims
                .iter()
                .filter(|c| placed.contains(&c.key))
                .map(|c| c.qty)
                .sum();
            let legs = self.store.legs(entry.id).await?;
            return self
                .late(
                    entry,
                    creds,
                    rules,
                    &legs,
                    LateCase {
                        position: position.saturating_sub(covered),
                        partly_protected: !placed.is_empty() || !kept.is_zero(),
                    },
                    late,
                    source,
                    reason,
                    once,
                )
                .await;
        }
        if !errors.is_empty() || !pending.is_empty() {
            if let Some(free) = again {
                // What this entry holds: the free coins, those its own new
                // lists lock (a list in doubt may lock them too), and those
                // its rests lock. The next round plans only the coins no rest
                // counts, so the rests are counted here or they would be
                // taken out twice.
                let own: Qty = claims
                    .iter()
                    .filter(|c| placed.contains(&c.key) || pending.contains(&c.key))
                    .map(|c| c.qty)
                    .sum();
                return Ok(Round::Again {
                    holding: Some(free.plus(own).plus(rest_open).plus(kept)),
                });
            }
            // The symbol's order cap refused part of the generation: re-plan now
            // within the budget the refusal revealed (fewer, larger lists), rather
            // than leave the refused part without a stop until the next call.
            if cap_refused && pending.is_empty() {
                return Ok(Round::Again { holding: None });
            }
            // A stop type the symbol refused: re-plan now with the other kind
            // rather than leave the position without a stop until the next call.
            if stop_type_refused && pending.is_empty() {
                return Ok(Round::Again { holding: None });
            }
            // Lists that did go out keep their coins locked; the next call
            // replaces them. The older lists were canceled: some coins are
            // without a stop, or may be, until then.
            self.label_unprotected(entry).await?;
            return Ok(Round::Done(if pending.is_empty() {
                ProtectOutcome::Failed { errors }
            } else {
                ProtectOutcome::Pending { legs: pending }
            }));
        }
        if let Some(short) = short {
            self.unprotectable(entry, source, short.to_string()).await?;
        } else if rest_open.is_zero() {
            self.mark_protected(entry, source, self.clock.now()).await?;
        } else {
            self.label_unprotected(entry).await?;
        }
        // New fills may have arrived while we placed; the caller that saw them found our
        // claim in flight and left the rest to us.
        let fresh = self.store.entry(entry.id).await?;
        if fresh.net_qty() > entry.net_qty() {
            return Ok(Round::Again { holding: None });
        }
        if !rest_open.is_zero() {
            return Ok(Round::Done(rest_still_open(rest_open, placed.len())));
        }
        Ok(Round::Done(ProtectOutcome::Placed {
            legs: placed,
            replaced,
            degraded,
        }))
    }

    /// Looks a leg's list up on the exchange and records what it finds: placed,
    /// filled, ended outside, or (for a stale claim or unknown outcome that the
    /// exchange does not know) never placed. A market exit's leg is looked up
    /// as the order it is, by its exit client id.
    ///
    /// A miss counts as absence only once the leg has gone unwritten for the
    /// claim timeout (the lookup reads a database that may lag a fresh
    /// placement), counted from its last write: the claim, the claimant's
    /// fence right before it sent, or the lost answer. Within it, and when the
    /// lookup fails, the leg is left in doubt.
    ///
    /// # Errors
    /// [`ProtectError::Store`] when the result cannot be recorded; exchange read
    /// failures leave the leg as it was.
    pub async fn refresh_leg(&self, creds: &ApiCredentials, leg: &Leg) -> Result<(), ProtectError> {
        if self.is_exit(leg) {
            return self.refresh_exit(creds, leg).await;
        }
        match self
            .exchange
            .order_list(creds, &leg.symbol, leg.ids.list.as_str())
            .await
        {
            Ok(Some(snap)) => self.apply_list(leg.key, leg.state.name(), &snap).await,
            Ok(None) | Err(ExchangeError::NotFound) => {
                if matches!(leg.state, LegState::Claimed | LegState::Unknown) {
                    self.take_over(leg, "lookup found no such list").await?;
                } else if matches!(leg.state, LegState::Placed { .. })
                    && self.clock.now().since(leg.updated_at) > self.config.claim_timeout
                {
                    // Acknowledged once, unknown now (and not just placed): it ended outside us.
                    self.transition(
                        leg,
                        LegState::CanceledExternally {
                            why: ExternalEnd::Canceled,
                        },
                        None,
                    )
                    .await?;
                }
                Ok(())
            }
            Err(err) => {
                warn!(leg = %leg.key, client_id = %leg.ids.list, error = %err, "leg lookup failed");
                Ok(())
            }
        }
    }

    /// Records a leg in doubt that a lookup did not find as never placed, if
    /// it has gone unwritten for the claim timeout. The store checks that in
    /// the same step as the state, so a claimant that fenced its claim since
    /// the leg was read keeps it (and sends), and one that had not yet
    /// fenced finds its fence refused (and sends nothing).
    async fn take_over(&self, leg: &Leg, reason: &str) -> Result<bool, ProtectError> {
        let now = self.clock.now();
        if now.since(leg.updated_at) <= self.config.claim_timeout {
            return Ok(false);
        }
        Ok(self
            .store
            .take_over_leg(
                &LegUpdate {
                    key: leg.key,
                    from: leg.state.name(),
                    to: LegState::NotPlaced {
                        code: None,
                        reason: reason.into(),
                    },
                    error: None,
                    at: now,
                },
                self.config.claim_timeout,
            )
            .await?)
    }

    /// Whether a leg is a market exit rather than a list. Exits are claimed
    /// with their exit client id as the list id; older ones are known by
    /// their shape (a list always has its target above its stop, an exit's
    /// claim row holds the fill price in both).
    fn is_exit(&self, leg: &Leg) -> bool {
        matches!(
            self.config.ids.parse(leg.ids.list.as_str()),
            Some(OrderRole::Exit(_))
        ) || (leg.take_profit == leg.stop && leg.stop_limit.is_none())
    }

    /// [`Protector::refresh_leg`] for a market exit: looked up by its exit
    /// client id. Found, what it sold is recorded; not found, it is never
    /// placed only past the claim timeout, as a list is, so that a lagging
    /// lookup never leads to a second sale.
    async fn refresh_exit(&self, creds: &ApiCredentials, leg: &Leg) -> Result<(), ProtectError> {
        if !matches!(leg.state, LegState::Claimed | LegState::Unknown) {
            return Ok(());
        }
        let exit_id = self.config.ids.exit(leg.key)?;
        match self
            .exchange
            .query_order(creds, &leg.symbol, exit_id.as_str())
            .await
        {
            Ok(snap) => {
                // As `late` takes a short exit: the coins it left are still held,
                // so the entry is not exited; the round goes on with them.
                let short = snap.executed_qty < leg.qty;
                let (why, kind) = if short {
                    warn!(leg = %leg.key, client_id = %exit_id, sold = %snap.executed_qty, asked = %leg.qty, "market exit found by lookup sold less than asked");
                    (
                        format!(
                            "late protection, exit found by its client id sold {} of {} ({})",
                            snap.executed_qty, leg.qty, snap.status
                        ),
                        "exit_short",
                    )
                } else {
                    (
                        "late protection, exited at market (found by its client id)".to_owned(),
                        "exited",
                    )
                };
                if self
                    .record_exit(leg.key, leg.state.name(), &snap, &why, kind, None)
                    .await?
                {
                    info!(leg = %leg.key, client_id = %exit_id, qty = %snap.executed_qty, "market exit found by lookup, recorded");
                    if short {
                        return Ok(());
                    }
                    // As `late` records it: the entry is exited unless lists of
                    // it still hold stops.
                    // A take-profit rest still open locks coins without a stop:
                    // the entry stays followed (as `late` leaves it).
                    let legs = self.store.legs(leg.key.entry).await?;
                    if legs.iter().any(is_take_profit_rest) {
                        self.store
                            .set_protection(leg.key.entry, &Protection::Unprotected)
                            .await?;
                    } else if !legs
                        .iter()
                        .any(|l| matches!(l.state, LegState::Placed { .. }))
                    {
                        // Sent by an earlier call: what it was decided from
                        // is not known here, only what the entry still owes.
                        let rules = self.exchange.symbol_rules(&leg.symbol).await?;
                        self.record_exited(leg.key.entry, ExitBasis::FoundLater(&rules), &why)
                            .await?;
                    }
                }
                Ok(())
            }
            Err(ExchangeError::NotFound) => {
                self.take_over(leg, "lookup found no such exit").await?;
                Ok(())
            }
            Err(err) => {
                warn!(leg = %leg.key, client_id = %exit_id, error = %err, "exit lookup failed");
                Ok(())
            }
        }
    }

    /// Records what a market exit sold and ends its leg (`from` →
    /// `NotPlaced`, the way exits are kept: what they sold is in the leg's
    /// `sold`), with an event of `kind` ("exited", "exit_short"). `false`
    /// when the leg had already left `from` (another caller recorded the
    /// same exit).
    async fn record_exit(
        &self,
        key: LegKey,
        from: &'static str,
        snap: &crate::ports::OrderSnapshot,
        why: &str,
        kind: &str,
        source: Option<Source>,
    ) -> Result<bool, ProtectError> {
        let now = self.clock.now();
        let sold = LegSold {
            stop_loss: snap.executed_qty,
            stop_loss_quote: snap.cumulative_quote,
            ..LegSold::default()
        };
        // What it sold is a fact whoever records the end: kept by maximum.
        self.store.record_leg_sold(key, sold, now).await?;
        let moved = self
            .update(
                key,
                from,
                LegState::NotPlaced {
                    code: None,
                    reason: why.to_owned(),
                },
                None,
            )
            .await?;
        // Its trades (a placement's FULL answer has them, a lookup does not)
        // after the leg is released, best-effort: the result's commissions
        // never hold the leg claimed. Before the caller's result, which then
        // counts them when written.
        self.record_trades_quietly(key, SaleSide::StopLoss, &snap.fills)
            .await;
        if moved {
            self.store
                .append_event(&event(key.entry, kind, why, source, now))
                .await?;
        }
        Ok(moved)
    }

    async fn apply_list(
        &self,
        key: LegKey,
        from: &'static str,
        snap: &OrderListSnapshot,
    ) -> Result<(), ProtectError> {
        let now = self.clock.now();
        let part = |o: &Option<crate::ports::ListOrderSnapshot>| {
            o.as_ref().map_or((Qty::ZERO, Decimal::ZERO), |o| {
                (o.executed_qty, o.cumulative_quote)
            })
        };
        let (tp, tp_quote) = part(&snap.take_profit);
        let (sl, sl_quote) = part(&snap.stop_loss);
        let sold = LegSold {
            take_profit: tp,
            take_profit_quote: tp_quote,
            stop_loss: sl,
            stop_loss_quote: sl_quote,
        };
        if !sold.total().is_zero() {
            self.store.record_leg_sold(key, sold, now).await?;
        }
        // A list can keep executing after it lost its stop (the rest of a partly
        // filled take-profit rests alone): what counts is whether the stop still works.
        let stop_gone = snap.stop_loss.as_ref().is_some_and(|o| {
            matches!(
                o.status,
                EntryStatus::Canceled | EntryStatus::Expired | EntryStatus::Rejected
            )
        });
        let working = snap.executing && !stop_gone;
        let to = if working {
            LegState::Placed {
                list_id: snap.list_id,
            }
        } else {
            list_end_state(snap)
        };
        if from != "placed" && !working {
            // Record that it was placed, then how it ended.
            self.update(
                key,
                from,
                LegState::Placed {
                    list_id: snap.list_id,
                },
                None,
            )
            .await?;
            self.update(key, "placed", to, None).await?;
        } else {
            self.update(key, from, to, None).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // one call site; a context struct would only rename them
    async fn late(
        &self,
        entry: &Entry,
        creds: &ApiCredentials,
        rules: &SymbolRules,
        legs: &[Leg],
        case: LateCase,
        policy: LatePolicy,
        source: Source,
        reason: String,
        once: &mut Once,
    ) -> Result<Round, ProtectError> {
        let LateCase {
            position,
            partly_protected,
        } = case;
        if policy == LatePolicy::RecordOnly {
            return self
                .unprotectable(
                    entry,
                    source,
                    format!("late protection (record only): {reason}"),
                )
                .await;
        }
        let Some(fill_price) = entry.average_price() else {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::NoFill)));
        };
        // The exit is a MARKET order: MARKET_LOT_SIZE binds it besides
        // LOT_SIZE, and Binance refuses it (-1013) every time it is sent over
        // either, while the coins keep no stop.
        let qty = rules.floor_market_qty(position);
        if rules.check_qty(qty).is_err() || rules.check_market_qty(qty).is_err() {
            let market_max = rules.market_lot_size.and_then(|m| m.max_qty);
            let why = match (rules.max_qty, market_max) {
                (Some(max), _) if qty > max => format!("over LOT_SIZE maxQty {max}"),
                (_, Some(max)) if qty > max => format!("over MARKET_LOT_SIZE maxQty {max}"),
                _ => "too small to exit".to_owned(),
            };
            return self
                .unprotectable(
                    entry,
                    source,
                    format!("late protection: {reason}; position {qty} {why}"),
                )
                .await;
        }
        // The exit is claimed like a leg, so that two layers never both sell.
        let generation = legs.iter().map(|l| l.key.generation + 1).max().unwrap_or(0);
        let key = LegKey {
            entry: entry.id,
            leg: LegIndex::First,
            generation,
        };
        let now = self.clock.now();
        let exit_id = self.config.ids.exit(key)?;
        // The exit's own client id stands as the claim's list id: a lookup of
        // the leg (after a crash, or a lost answer) asks for the order it is.
        let ids = OcoClientIds {
            list: exit_id.clone(),
            ..self.config.ids.oco(key)?
        };
        let claim = LegClaim {
            key,
            ids,
            symbol: entry.symbol.name.clone(),
            qty,
            // An exit has no levels; the claim row keeps the fill price for the record.
            take_profit: fill_price,
            stop: fill_price,
            stop_limit: None,
            source,
            at: now,
        };
        // The claim is also the fence: the order goes out right after it.
        if !self.store.claim_leg(&claim).await? {
            return Ok(Round::Done(ProtectOutcome::Nothing(Idle::InFlight)));
        }
        let order = OrderRequest {
            symbol: entry.symbol.name.clone(),
            side: Side::Sell,
            limit: None,
            size: OrderSize::Base(qty),
            client_id: exit_id.clone(),
        };
        let why = format!("late protection, exited at market: {reason}");
        let (from, snap) = match self.exchange.place_order(creds, &order).await {
            Ok(snap) => ("claimed", snap),
            // The sale may have happened: it is looked up, now and by later
            // calls, and never sent again unless the exchange, past the claim
            // timeout, still does not know it.
            Err(err) if matches!(err, ExchangeError::UnknownOutcome(_)) || err.is_duplicate() => {
                warn!(entry = %entry.id, client_id = %exit_id, error = %err, "exit outcome unknown, looking it up");
                self.update(key, "claimed", LegState::Unknown, Some(err.to_string()))
                    .await?;
                match self
                    .exchange
                    .query_order(creds, &order.symbol, exit_id.as_str())
                    .await
                {
                    Ok(snap) => ("unknown", snap),
                    Err(lookup) => {
                        warn!(entry = %entry.id, client_id = %exit_id, error = %lookup, "exit not found yet; left in doubt");
                        return Ok(Round::Done(ProtectOutcome::Pending { legs: vec![key] }));
                    }
                }
            }
            Err(err) if err.is_notional_filter() => {
                // The exchange measures a MARKET order at its reference price,
                // which only it knows: the refusal is the one answer. The claim
                // is released, and the reason holds only the quantity and the
                // minimum, so that later calls (which send the exit again, as
                // the price may have risen) do not rewrite it or its event.
                let why = format!(
                    "late protection: {reason}; exit of {qty} refused under min notional {}",
                    rules.min_notional
                );
                self.update(
                    key,
                    "claimed",
                    LegState::NotPlaced {
                        code: None,
                        reason: format!("late protection, exit refused: {err}"),
                    },
                    None,
                )
                .await?;
                return self.unprotectable(entry, source, why).await;
            }
            Err(err) => {
                let why = format!("late protection, exit failed: {err}");
                self.update(
                    key,
                    "claimed",
                    LegState::NotPlaced {
                        code: None,
                        reason: why.clone(),
                    },
                    None,
                )
                .await?;
                // The coins were sold by hand, or are locked elsewhere: refused
                // on every call, the exit would fail for good. The round plans
                // again from what the account holds, as a list refused for
                // balance does (closed when nothing is left, the rest exited
                // or protected). Once a call: a refusal the balance does not
                // explain fails the call, and the next call tries again.
                if err.is_insufficient_balance() && !std::mem::replace(&mut once.exit_balance, true)
                {
                    match self.held_base(creds, rules).await {
                        Ok(free) => {
                            warn!(entry = %entry.id, client_id = %exit_id, %qty, %free, %source, "exit refused for balance; planning again from the balance");
                            // The entry's lists and rests lock their coins: not
                            // free, yet held. The next round takes them out again.
                            return Ok(Round::Again {
                                holding: Some(free.plus(locked_by(legs))),
                            });
                        }
                        Err(read) => {
                            warn!(entry = %entry.id, error = %read, "balance unread after an exit refused for balance; not re-planned");
                        }
                    }
                }
                self.store
                    .append_event(&event(
                        entry.id,
                        "exit_failed",
                        &why,
                        Some(source),
                        self.clock.now(),
                    ))
                    .await?;
                return Ok(Round::Done(ProtectOutcome::Failed { errors: vec![why] }));
            }
        };
        if snap.executed_qty < qty {
            return self
                .short_exit(entry, key, from, qty, &snap, source, &reason)
                .await;
        }
        if !self
            .record_exit(key, from, &snap, &why, "exited", Some(source))
            .await?
        {
            // Recorded by another caller that looked it up meanwhile.
            return Ok(Round::Done(ProtectOutcome::Exited { reason: why }));
        }
        if legs.iter().any(is_take_profit_rest) {
            // A take-profit rest still locks coins of the entry, without a
            // stop: settled or called protected, the entry would drop out of
            // reconciliation with them. The next call cancels the rest first.
            let why = format!("{why}; a take-profit rest is still open");
            warn!(entry = %entry.id, client_id = %exit_id, qty = %snap.executed_qty, %source, "exited at market; a take-profit rest still open");
            self.label_unprotected(entry).await?;
            return Ok(Round::Done(ProtectOutcome::Failed { errors: vec![why] }));
        }
        warn!(entry = %entry.id, client_id = %exit_id, qty = %snap.executed_qty, %source, "protection late, exited at market");
        if partly_protected {
            // Lists still hold the rest: the entry stays protected, and
            // followed, rather than settled. Only while it holds nothing the
            // exit was not decided over, as `record_exited` checks: a fill
            // recorded while the exit was out (its caller found the exit's
            // claim in flight and left its coins to us) has no stop yet, and
            // a `protected` label would hide it should the call end here.
            // Read after the exit's claim was released: a fill recorded later
            // is its own caller's to protect.
            let current = self.store.entry(entry.id).await?;
            if current.executed_qty != entry.executed_qty {
                warn!(entry = %entry.id, executed = %current.executed_qty, "entry filled more while its exit was out; planning again");
                self.label_unprotected(&current).await?;
                return Ok(Round::Replan);
            }
            self.mark_protected(&current, source, self.clock.now())
                .await?;
        } else if self
            .record_exited(entry.id, ExitBasis::Decided(entry), &why)
            .await?
            == ExitWrite::Reopened
        {
            // A fill recorded while the exit went out (its caller found the
            // exit's claim in flight and left its coins to us): they are
            // planned from the entry as it is now.
            return Ok(Round::Replan);
        }
        Ok(Round::Done(ProtectOutcome::Exited { reason: why }))
    }

    /// Records the entry `id` exited with `why`, with its realised result
    /// computed as a close computes it ([`realized_quote`]) from the entry
    /// and legs as stored now, the exit's sale included: an exit settles
    /// the coins as a close does, and the trader is owed its result.
    ///
    /// Only while the entry holds nothing the exit was not decided over
    /// (`basis`): a fill recorded after the decision is counted in the
    /// entry's quantity, and written `Exited` those coins would never be
    /// followed again, without a stop. The entry is then labelled
    /// `unprotected` instead, and the caller plans again. The write itself
    /// is a compare-and-set on the entry read (its executed quantity and
    /// protection), so a fill recorded between that read and the write
    /// reopens the entry too.
    async fn record_exited(
        &self,
        id: crate::ids::EntryId,
        basis: ExitBasis<'_>,
        why: &str,
    ) -> Result<ExitWrite, ProtectError> {
        for _ in 0..EXIT_WRITE_ATTEMPTS {
            let (entry, legs) =
                futures_util::future::join(self.store.entry(id), self.store.legs(id)).await;
            let (entry, legs) = (entry?, legs?);
            let moved = match basis {
                ExitBasis::Decided(decided) => entry.executed_qty != decided.executed_qty,
                ExitBasis::FoundLater(rules) => {
                    let sold: Qty = legs.iter().map(|l| l.sold.total()).sum();
                    let owed = entry.net_qty().saturating_sub(sold);
                    entry
                        .average_price()
                        .is_some_and(|price| !is_dust(owed, price, rules))
                }
            };
            if moved {
                // Coins filled since the exit was decided: its result is the
                // entry's next close's, and they need a stop first.
                warn!(entry = %id, executed = %entry.executed_qty, "entry holds coins its exit was not decided over; not recorded as exited");
                self.label_unprotected(&entry).await?;
                return Ok(ExitWrite::Reopened);
            }
            if self
                .store
                .exit_entry(id, why, realized(&entry, &legs), &entry)
                .await?
            {
                return Ok(ExitWrite::Written);
            }
        }
        warn!(entry = %id, "entry kept changing; its exit is left to the next call");
        Ok(ExitWrite::Busy)
    }

    /// A market exit that ended with less sold than asked (Binance expires
    /// what its price range cannot fill): the coins left are still held, so
    /// the entry is not settled; the next call protects or exits them.
    #[allow(clippy::too_many_arguments)] // the exit's facts, each needed once
    async fn short_exit(
        &self,
        entry: &Entry,
        key: LegKey,
        from: &'static str,
        asked: Qty,
        snap: &crate::ports::OrderSnapshot,
        source: Source,
        reason: &str,
    ) -> Result<Round, ProtectError> {
        let why = format!(
            "late protection, exit sold {} of {asked} ({}): {reason}",
            snap.executed_qty, snap.status
        );
        self.record_exit(key, from, snap, &why, "exit_short", Some(source))
            .await?;
        warn!(entry = %entry.id, leg = %key, sold = %snap.executed_qty, %asked, %source, "market exit sold less than asked");
        Ok(Round::Done(ProtectOutcome::Failed { errors: vec![why] }))
    }

    /// Says that the list of `leg` ended (it left the book, or `ALL_DONE`
    /// came) while no lookup has shown its end yet: its stop is gone
    /// whatever it sold, yet its leg still reads working, and `protect`
    /// counts working legs as covering their coins. The entry is labelled
    /// unprotected (a closed one stays closed) and, once per list, its
    /// history says why; the caller has the list looked up again.
    ///
    /// # Errors
    /// The store's.
    pub async fn list_end_unread(
        &self,
        entry: EntryId,
        leg: &Leg,
        source: Source,
    ) -> Result<(), ProtectError> {
        let current = self.store.entry(entry).await?;
        self.label_unprotected(&current).await?;
        let why = format!(
            "list {} left the book; its lookup has not shown its end yet, so its stop counts as gone",
            leg.ids.list
        );
        let history = self.store.events(entry).await?;
        if !history
            .iter()
            .any(|e| e.kind == LIST_END_UNREAD && e.detail == why)
        {
            self.store
                .append_event(&event(
                    entry,
                    LIST_END_UNREAD,
                    &why,
                    Some(source),
                    self.clock.now(),
                ))
                .await?;
        }
        Ok(())
    }

    /// Labels `entry` unprotected unless it already is: coins of it are
    /// without a stop and the call that found them fails.
    async fn label_unprotected(&self, entry: &Entry) -> Result<(), ProtectError> {
        if entry.protection != Protection::Unprotected {
            self.store
                .set_protection(entry.id, &Protection::Unprotected)
                .await?;
        }
        Ok(())
    }

    /// Labels `entry` after a round canceled take-profit rests of it (their
    /// sales recorded), before it plans again: the coins they `freed` have
    /// no stop until a round places one, so the entry is labelled
    /// `unprotected`, should the rounds run out first. An entry already
    /// exited at market whose rests freed nothing (they had sold all) has
    /// no coin without a stop: it keeps its exit and reason, which the
    /// label would drop (and the next round close it instead), and its
    /// result is counted again with the rests' sales.
    async fn label_rest_canceled(
        &self,
        entry: &Entry,
        freed: Qty,
        source: Source,
    ) -> Result<(), ProtectError> {
        if freed.is_zero() && matches!(entry.protection, Protection::Exited { .. }) {
            return self.recount_closed(entry.id, source).await;
        }
        self.label_unprotected(entry).await
    }

    async fn unprotectable(
        &self,
        entry: &Entry,
        source: Source,
        reason: String,
    ) -> Result<Round, ProtectError> {
        if entry.protection
            != (Protection::Unprotectable {
                reason: reason.clone(),
            })
        {
            warn!(entry = %entry.id, %reason, %source, "entry unprotectable");
            self.store
                .set_protection(
                    entry.id,
                    &Protection::Unprotectable {
                        reason: reason.clone(),
                    },
                )
                .await?;
            self.store
                .append_event(&event(
                    entry.id,
                    "unprotectable",
                    &reason,
                    Some(source),
                    self.clock.now(),
                ))
                .await?;
        }
        Ok(Round::Done(ProtectOutcome::Unprotectable { reason }))
    }

    /// When a balance read says an entry's coins are gone while its fills
    /// and recorded sales say they are held, they were sold or moved outside
    /// ocoguard, or they are locked by a list of this entry that no live leg
    /// follows, or by a list of ours on the symbol that no live leg follows
    /// (another entry's, which a generation placed over these coins). The
    /// account's open lists tell which:
    ///
    /// - a list of this entry whose leg reads `not_placed` (placed under a
    ///   claim that was taken over while its lookup lagged) is adopted: its
    ///   leg moves to `placed` and the entry is protected;
    /// - a list of this entry whose leg reads ended outside (`canceled`,
    ///   `stop_expired`: an end read from one order's update, the list still
    ///   working, e.g. a triggered stop whose take-profit the exchange removed
    ///   first) is looked up and its real state applied: working, it is
    ///   adopted the same way; ended meanwhile, its end and sale are recorded
    ///   and the round plans again;
    /// - any other list of this entry that no live leg follows, or one whose
    ///   lookup finds nothing yet, or another entry's without a live leg, is
    ///   named (the entry's own first, said to be its own: it may be the
    ///   entry's only stop, not one to cancel by hand), and the caller does
    ///   not close the entry: the list may still sell these coins, and the
    ///   entry must be there to record it.
    ///
    /// With none of these, the caller closes the entry, as for coins sold
    /// outside. A failed read is an error: nothing is closed on a guess.
    async fn adopt_stray_list(
        &self,
        creds: &ApiCredentials,
        entry: &Entry,
        legs: &[Leg],
        source: Source,
    ) -> Result<StrayCheck, ProtectError> {
        let lists = self.exchange.open_order_lists(creds).await?;
        let mut adopted = false;
        let mut changed = false;
        let mut held_by = None;
        // The entry's own list is named before another's: it most likely
        // holds these coins, and is not to be canceled by hand.
        let mut own_held = None;
        for list in lists.iter().filter(|l| l.executing) {
            let Some(OrderRole::List(key)) = self.config.ids.parse(&list.list_client_id) else {
                continue;
            };
            if key.entry != entry.id {
                // Another entry's list on this symbol: normal while a live leg
                // follows it; without one it may hold these coins.
                if held_by.is_none() && list.symbol == entry.symbol.name {
                    let other = self.store.legs(key.entry).await?;
                    // A take-profit rest keeps its list executing by design:
                    // its own entry follows and cancels it.
                    if !other
                        .iter()
                        .any(|l| l.key == key && (l.state.is_active() || is_take_profit_rest(l)))
                    {
                        held_by = Some(list.list_client_id.clone());
                    }
                }
                continue;
            }
            let leg = legs.iter().find(|l| l.key == key);
            let adoption = match leg.map(|l| &l.state) {
                Some(LegState::NotPlaced { .. })
                    if leg.is_some_and(|l| l.sold.total().is_zero()) =>
                {
                    let placed = LegState::Placed {
                        list_id: list.list_id,
                    };
                    if self.update(key, "not_placed", placed, None).await? {
                        Adoption::Placed
                    } else {
                        // Another caller moved the leg first: read it again.
                        Adoption::Changed
                    }
                }
                Some(
                    from @ LegState::CanceledExternally {
                        why: ExternalEnd::Canceled | ExternalEnd::StopExpired,
                    },
                ) => self.readopt(creds, key, from, list).await?,
                // Live legs (none while the caller is here), or a list no
                // leg of the entry follows any more: it may hold the coins.
                _ => Adoption::Held,
            };
            match adoption {
                Adoption::Placed => {
                    warn!(entry = %entry.id, leg = %key, list_id = list.list_id, client_id = %list.list_client_id, "open list of a leg recorded as not live: adopted");
                    self.store
                        .append_event(&event(
                            entry.id,
                            "leg_adopted",
                            format!(
                                "list {} ({}) found open on the exchange",
                                list.list_client_id, list.list_id
                            ),
                            Some(source),
                            self.clock.now(),
                        ))
                        .await?;
                    adopted = true;
                }
                Adoption::Changed => changed = true,
                Adoption::Held => {
                    own_held.get_or_insert_with(|| list.list_client_id.clone());
                }
            }
        }
        if changed {
            return Ok(StrayCheck::Changed);
        }
        if adopted {
            self.mark_protected(entry, source, self.clock.now()).await?;
            return Ok(StrayCheck::Adopted);
        }
        Ok(match (own_held, held_by) {
            (Some(list), _) => StrayCheck::HeldBy { list, own: true },
            (None, Some(list)) => StrayCheck::HeldBy { list, own: false },
            (None, None) => StrayCheck::Nothing,
        })
    }

    /// Applies the real state of `list`, open on the exchange, to leg `key`
    /// of its entry, recorded as ended outside in state `from`: the list is
    /// looked up (both of its orders) and applied as a lookup of a leg in
    /// doubt is. Not found (the lookup reads a database that may lag), or
    /// the leg changed by another writer meanwhile, it is left as it is and
    /// counted as holding the coins.
    async fn readopt(
        &self,
        creds: &ApiCredentials,
        key: LegKey,
        from: &LegState,
        list: &OrderListSnapshot,
    ) -> Result<Adoption, ProtectError> {
        let snap = match self
            .exchange
            .order_list(creds, &list.symbol, &list.list_client_id)
            .await
        {
            Ok(Some(snap)) => snap,
            Ok(None) | Err(ExchangeError::NotFound) => return Ok(Adoption::Held),
            Err(err) => return Err(err.into()),
        };
        self.apply_list(key, from.name(), &snap).await?;
        let now = self
            .store
            .legs(key.entry)
            .await?
            .into_iter()
            .find(|l| l.key == key)
            .map(|l| l.state);
        Ok(match now {
            Some(LegState::Placed { .. }) => Adoption::Placed,
            Some(state) if state != *from => Adoption::Changed,
            _ => Adoption::Held,
        })
    }

    /// The entry's `active` lists cover its position: it is labelled
    /// protected (a label left behind by an earlier call, `unprotected` while
    /// a rest was open say, would otherwise raise an alert for a covered
    /// entry), and the round is done.
    async fn covered(
        &self,
        entry: &Entry,
        active: &[&Leg],
        source: Source,
        now: Millis,
    ) -> Result<Round, ProtectError> {
        // Coverage is credited to the layer that placed it, not to whoever
        // notices it: a caller that raced the placer placed nothing.
        let by = active
            .iter()
            .max_by_key(|l| l.key.generation)
            .map_or(source, |l| l.source);
        self.mark_protected(entry, by, now).await?;
        Ok(Round::Done(ProtectOutcome::Nothing(Idle::Covered)))
    }

    async fn mark_protected(
        &self,
        entry: &Entry,
        source: Source,
        at: Millis,
    ) -> Result<(), ProtectError> {
        if !matches!(entry.protection, Protection::Protected { .. }) {
            self.store
                .set_protection(entry.id, &Protection::Protected { at, by: source })
                .await?;
            self.store
                .append_event(&event(
                    entry.id,
                    "protected",
                    format!("by {source}"),
                    Some(source),
                    at,
                ))
                .await?;
        }
        Ok(())
    }

    /// Says that the lists of `entry` carry another stop kind than asked.
    fn stop_substituted(
        &self,
        entry: &Entry,
        substitute: StopSubstitute,
        source: Source,
        at: Millis,
    ) -> EntryEventRecord {
        warn!(entry = %entry.id, symbol = %entry.symbol, asked = substitute.asked.order_type(), placed = substitute.placed.order_type(), %source, "stop kind not allowed on the symbol, the other kind placed");
        event(
            entry.id,
            STOP_SUBSTITUTED,
            format!("{}: {substitute}", entry.symbol),
            Some(source),
            at,
        )
    }

    /// The stop budget learnt from a recent refusal of the latest generation.
    fn stop_budget_hint(&self, legs: &[Leg], next_generation: u32, now: Millis) -> Option<u32> {
        let last = next_generation.checked_sub(1)?;
        let refused = legs.iter().any(|l| {
            l.key.generation == last
                && matches!(&l.state, LegState::NotPlaced { reason, .. } if is_order_cap(reason))
                && now.since(l.updated_at) < self.config.budget_hint_ttl
        });
        if !refused {
            return None;
        }
        let accepted = legs
            .iter()
            .filter(|l| l.key.generation == last && !matches!(l.state, LegState::NotPlaced { .. }))
            .count();
        Some(u32::try_from(accepted).unwrap_or(0))
    }

    async fn held_base(
        &self,
        creds: &ApiCredentials,
        rules: &SymbolRules,
    ) -> Result<Qty, ProtectError> {
        let balances = self.exchange.balances(creds).await?;
        Ok(balances
            .iter()
            .find(|b| b.asset == rules.symbol.base.0)
            .map_or(Qty::ZERO, |b| b.free))
    }

    /// Cancels the rest of each partly filled take-profit: it rests on the
    /// book without a stop and locks coins that a new generation must cover.
    /// Called only by a round that will place lists. A canceled rest (or one
    /// no longer open) has what its list sold recorded and its leg moves to
    /// `Replaced`; the leg stays `take_profit_partial` until then, so that a
    /// cancel that failed, or a list not found after it (the cancel answers
    /// no quantities, and sales are never dropped), is tried again by the
    /// next call, and the failure is an event (`take_profit_cancel_failed`).
    /// A failure does not stop the round: the coins the rest does not lock
    /// are protected meanwhile. When a leg was written, what the canceled
    /// rests still held (freed, and without a stop), else `None`.
    async fn cancel_take_profit_rests(
        &self,
        creds: &ApiCredentials,
        entry: &Entry,
        rests: &[&Leg],
        source: Source,
    ) -> Result<Option<Qty>, ProtectError> {
        let mut recorded = None;
        for leg in rests {
            let client_id = leg.ids.take_profit.as_str();
            let failed = match self
                .exchange
                .cancel_order(creds, &leg.symbol, client_id)
                .await
            {
                // Canceled, or already filled or canceled: what it sold is read
                // before the leg is closed, as the rest may have sold more.
                Ok(_) => match self
                    .exchange
                    .order_list(creds, &leg.symbol, leg.ids.list.as_str())
                    .await
                {
                    // Only a take-profit the exchange calls finished tells all it
                    // sold: a lookup lagging the cancel would leave a later sale
                    // out of the record for good.
                    Ok(Some(snap))
                        if snap
                            .take_profit
                            .as_ref()
                            .is_some_and(|tp| tp.status.is_final()) =>
                    {
                        let mut freed = leg.qty;
                        if let Some(tp) = snap.take_profit.as_ref() {
                            let sold = LegSold {
                                take_profit: tp.executed_qty,
                                take_profit_quote: tp.cumulative_quote,
                                ..LegSold::default()
                            };
                            self.store
                                .record_leg_sold(leg.key, sold, self.clock.now())
                                .await?;
                            freed = leg.qty.saturating_sub(tp.executed_qty);
                        }
                        if self.transition(leg, LegState::Replaced, None).await? {
                            info!(entry = %entry.id, leg = %leg.key, %client_id, "take-profit rest canceled");
                        }
                        recorded = Some(recorded.unwrap_or(Qty::ZERO).plus(freed));
                        None
                    }
                    // The cancel answers no quantities: without the list's final
                    // sale the leg stays as it is, and the next call reads it again.
                    Ok(_) => Some("canceled, list not found or not final: sale unread".to_owned()),
                    Err(err) => Some(format!("canceled, sale unread: {err}")),
                },
                Err(err) => Some(err.to_string()),
            };
            if let Some(err) = failed {
                warn!(entry = %entry.id, leg = %leg.key, %client_id, error = %err, "could not cancel take-profit rest; the next call tries again");
                self.store
                    .append_event(&event(
                        entry.id,
                        "take_profit_cancel_failed",
                        format!("{}: {client_id}: {err}", leg.key),
                        Some(source),
                        self.clock.now(),
                    ))
                    .await?;
            }
        }
        Ok(recorded)
    }

    /// The lists of `active` whose stop has triggered: the take-profit
    /// removed, the stop resting as a limit order or executing. Such a list
    /// has its stop among the symbol's open orders and its take-profit not
    /// (one request, made only by a round about to replace lists); an
    /// exchange that cannot list open orders has each list looked up. A
    /// list taken for one while it is not keeps working all the same, so a
    /// view that errs that way costs a replacement, never a stop.
    ///
    /// A read that fails counts every list it would have shown as
    /// triggered: the round must not end before its claim over a read that
    /// only refines it (the grown position would wait for sync without a
    /// stop), nor cancel a list that may be selling on its stop (the sale
    /// would stop, and under `record_only` its coins would keep no stop).
    /// The lists stay, and the round covers only the coins they do not hold.
    async fn triggered_lists<'l>(
        &self,
        entry: &Entry,
        creds: &ApiCredentials,
        active: &[&'l Leg],
    ) -> Vec<&'l Leg> {
        if active.is_empty() {
            return Vec::new();
        }
        let symbol = entry.symbol.name.as_str();
        match self.exchange.open_order_ids(creds, symbol).await {
            Ok(Some(open)) => {
                let is_open =
                    |id: &crate::ids::ClientOrderId| open.iter().any(|o| o == id.as_str());
                return active
                    .iter()
                    .copied()
                    .filter(|l| is_open(&l.ids.stop_loss) && !is_open(&l.ids.take_profit))
                    .collect();
            }
            Ok(None) => {}
            Err(err) => {
                // Unread, any of them may be selling on a triggered stop: a
                // cancel would stop that sale, and under `record_only` leave
                // its coins without a stop. Every list stays; the round covers
                // only the coins they do not hold.
                warn!(entry = %entry.id, error = %err, "open orders unread; every working list is kept as if its stop had triggered");
                return active.to_vec();
            }
        }
        let mut triggered = Vec::new();
        for leg in active {
            match self
                .exchange
                .order_list(creds, symbol, leg.ids.list.as_str())
                .await
            {
                Ok(snap) if snap.as_ref().is_some_and(stop_triggered) => triggered.push(*leg),
                Ok(_) => {}
                Err(err) => {
                    warn!(entry = %entry.id, leg = %leg.key, client_id = %leg.ids.list, error = %err, "list lookup failed; kept as if its stop had triggered");
                    triggered.push(*leg);
                }
            }
        }
        triggered
    }

    /// What a list that is no longer open sold, looked up: `None` unless the
    /// exchange reports both its orders, each in a final state (a lookup
    /// lagging a cancel would leave a later sale out of the record for good),
    /// or when the lookup fails.
    async fn final_sale(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Option<LegSold> {
        match self
            .exchange
            .order_list(creds, symbol, list_client_id)
            .await
        {
            Ok(Some(OrderListSnapshot {
                take_profit: Some(tp),
                stop_loss: Some(sl),
                ..
            })) if tp.status.is_final() && sl.status.is_final() => Some(LegSold {
                take_profit: tp.executed_qty,
                take_profit_quote: tp.cumulative_quote,
                stop_loss: sl.executed_qty,
                stop_loss_quote: sl.cumulative_quote,
            }),
            Ok(_) => None,
            Err(err) => {
                warn!(client_id = %list_client_id, error = %err, "list lookup failed");
                None
            }
        }
    }

    /// A list of ours went out, but the write of its outcome found the claim
    /// no longer `claimed`. If the leg was recorded placed meanwhile (someone
    /// found the list by its client id and adopted it), the list is ours and
    /// stays: [`Sent::Placed`]. If the leg ended meanwhile (the stream
    /// reported its take-profit filled, in part or whole, or its stop
    /// expired, before the placement's answer was recorded), the list is
    /// ours too and nothing is canceled, but it covers nothing any more:
    /// [`Sent::Ended`]. Otherwise the claim was taken over as abandoned and
    /// another generation may cover the same coins: the list is canceled, so
    /// that the exchange never holds two sets of legs for one position
    /// ([`Sent::Withdrawn`]).
    async fn keep_or_withdraw(
        &self,
        entry: &Entry,
        creds: &ApiCredentials,
        claim: &LegClaim,
        source: Source,
    ) -> Result<Sent, ProtectError> {
        let legs = self.store.legs(entry.id).await?;
        let now = legs.iter().find(|l| l.key == claim.key).map(|l| &l.state);
        match now {
            Some(LegState::Placed { .. }) => return Ok(Sent::Placed),
            Some(state) if crate::mem::was_placed(state) => {
                warn!(entry = %entry.id, leg = %claim.key, client_id = %claim.ids.list, state = state.name(), %source, "list ended before its placement was recorded; planning again");
                return Ok(Sent::Ended);
            }
            _ => {}
        }
        error!(entry = %entry.id, leg = %claim.key, client_id = %claim.ids.list, state = now.map_or("missing", LegState::name), %source, "claim taken over while its list was sent; canceling the list");
        // A refusal here is final (the list is not open); an unanswered cancel
        // is tried again, as each try is idempotent by the client id.
        let mut result = Err(ExchangeError::UnknownOutcome("not tried".into()));
        for _ in 0..3 {
            result = self
                .exchange
                .cancel_order_list(creds, &claim.symbol, claim.ids.list.as_str())
                .await;
            if !matches!(
                result,
                Err(ExchangeError::UnknownOutcome(_) | ExchangeError::Transient(_))
            ) {
                break;
            }
        }
        // Whatever the list sold before it ended is the entry's sale all the same.
        let sold = match &result {
            Ok(ListCancelOutcome::Canceled(Some(sold))) => Some(*sold),
            Ok(_) => {
                self.final_sale(creds, &claim.symbol, claim.ids.list.as_str())
                    .await
            }
            Err(_) => None,
        };
        if let Some(sold) = sold.filter(|s| !s.total().is_zero()) {
            self.store
                .record_leg_sold(claim.key, sold, self.clock.now())
                .await?;
        }
        let detail = match &result {
            Ok(_) => format!("{}: claim taken over while sent; list canceled", claim.key),
            Err(err) => {
                error!(entry = %entry.id, leg = %claim.key, client_id = %claim.ids.list, error = %err, "could not cancel a list whose claim was taken over");
                format!(
                    "{}: claim taken over while sent; cancel failed: {err}",
                    claim.key
                )
            }
        };
        self.store
            .append_event(&event(
                entry.id,
                "leg_withdrawn",
                detail,
                Some(source),
                self.clock.now(),
            ))
            .await?;
        Ok(Sent::Withdrawn)
    }

    /// Labels `entry` (as read after the outcomes were written) after a list
    /// of the generation being placed ended before its answer was recorded:
    /// its coins, or some of them, are without a stop until the next round
    /// places one, and a `protected` label (set by the outcomes' write, or
    /// left by an earlier generation) would hide them should the call end
    /// first. The next rounds label what they find.
    async fn ended_while_placing(&self, entry: &Entry) -> Result<(), ProtectError> {
        if matches!(entry.protection, Protection::Protected { .. }) {
            self.store
                .set_protection(entry.id, &Protection::Unprotected)
                .await?;
        }
        Ok(())
    }

    async fn release(
        &self,
        claims: &[LegClaim],
        code: Option<i32>,
        reason: &str,
    ) -> Result<(), ProtectError> {
        for claim in claims {
            self.update(
                claim.key,
                "claimed",
                LegState::NotPlaced {
                    code,
                    reason: reason.to_owned(),
                },
                None,
            )
            .await?;
        }
        Ok(())
    }

    async fn transition(
        &self,
        leg: &Leg,
        to: LegState,
        error: Option<String>,
    ) -> Result<bool, ProtectError> {
        self.update(leg.key, leg.state.name(), to, error).await
    }

    async fn update(
        &self,
        key: LegKey,
        from: &'static str,
        to: LegState,
        error: Option<String>,
    ) -> Result<bool, ProtectError> {
        Ok(self
            .store
            .update_leg(&LegUpdate {
                key,
                from,
                to,
                error,
                at: self.clock.now(),
            })
            .await?)
    }

    /// Moves `old`, whose list this call has just canceled (its sale already
    /// recorded), to `Replaced`. The round read it placed, but another writer
    /// may have moved it since: the stream's partly filled take-profit, or a
    /// list end whose lookup reads any take-profit that executed as one. The
    /// cancel ended a take-profit rest (or a leg still working) too, so it is
    /// moved from where it is now: left a rest, its order already gone, it
    /// would cost a cancel and keep the entry unprotected until then. Any
    /// other end stands.
    async fn replace_canceled(&self, old: &Leg) -> Result<(), ProtectError> {
        let mut leg = old.clone();
        for _ in 0..REPLACE_ATTEMPTS {
            if self.transition(&leg, LegState::Replaced, None).await? {
                return Ok(());
            }
            let now = self.store.legs(old.key.entry).await?;
            let Some(now) = now.into_iter().find(|l| l.key == old.key) else {
                return Ok(());
            };
            let ended_by_the_cancel =
                matches!(now.state, LegState::Placed { .. } | LegState::Unknown)
                    || is_take_profit_rest(&now);
            if !ended_by_the_cancel {
                return Ok(());
            }
            leg = now;
        }
        warn!(leg = %old.key, client_id = %old.ids.list, "leg of a canceled list kept changing; left as it is");
        Ok(())
    }
}

/// The history line of an entry kept open because a list of ours that no
/// live leg follows may hold its coins.
const HELD_BY_STRAY: &str = "coins_held_by_stray";

/// History kind: a list left the book before a lookup showed its end.
pub const LIST_END_UNREAD: &str = "list_end_unread";
/// Event kind: the lists carry another stop kind than the settings ask, the
/// symbol not allowing it.
pub const STOP_SUBSTITUTED: &str = "stop_substituted";
/// Tries at moving a leg whose list was canceled to `Replaced` while other
/// writers move it (`Protector::replace_canceled`).
const REPLACE_ATTEMPTS: usize = 4;

/// What became of a list sent under a claim that its outcome's write found
/// moved ([`Protector::keep_or_withdraw`]).
enum Sent {
    /// Recorded placed by another writer (adopted): it covers its coins.
    Placed,
    /// Ended before its answer was recorded: ours, kept, but no coverage;
    /// the position changed and the round plans again.
    Ended,
    /// Its claim was taken over: canceled.
    Withdrawn,
}

/// What the account's open lists tell of an entry whose coins a balance read
/// calls gone ([`Protector::adopt_stray_list`]).
enum StrayCheck {
    /// A list of the entry that no leg followed holds them: adopted.
    Adopted,
    /// A leg of the entry moved while its list was looked at: plan again.
    Changed,
    /// A list of ours on the symbol that no live leg follows may hold them:
    /// the entry is not closed.
    HeldBy {
        /// Its client id.
        list: String,
        /// The entry's own list (one whose lookup missed, say), which may be
        /// the entry's only stop, rather than another entry's.
        own: bool,
    },
    /// No list of ours explains it: the coins were sold or moved outside.
    Nothing,
}

/// What became of one open list of the entry that no live leg followed.
enum Adoption {
    /// Its leg follows it again (`placed`).
    Placed,
    /// Its leg moved otherwise (or another writer moved it): read it again.
    Changed,
    /// Left as it is; it may hold the entry's coins.
    Held,
}

/// How many times an exit's result is written, each from a fresh read,
/// before it is left to the next call.
const EXIT_WRITE_ATTEMPTS: usize = 4;

/// What a market exit was decided from: its `Exited` write
/// ([`Protector::record_exited`]) holds only while the entry has not moved
/// past it.
#[derive(Clone, Copy)]
enum ExitBasis<'a> {
    /// The entry as the round that sent the exit read it: any fill recorded
    /// since (its executed quantity grew) is not the exit's.
    Decided(&'a Entry),
    /// An exit sent by an earlier call and found by its lookup: the entry
    /// it was decided from is not kept, so the exit stands for the entry
    /// only while what the fills owe, less every recorded sale (the exit's
    /// included), is too small for any order of the symbol.
    FoundLater(&'a SymbolRules),
}

/// What became of an exit's `Exited` write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitWrite {
    /// Written, with its result.
    Written,
    /// The entry holds coins the exit was not decided over: not written,
    /// the entry labelled `unprotected` for them.
    Reopened,
    /// The entry kept changing under the write: left to the next call.
    Busy,
}

/// What `legs` lock on the exchange: the coins of their working lists (less
/// what a triggered stop sold of them) and what their take-profit rests have
/// not sold. Not in the free balance, yet the entry's.
fn locked_by(legs: &[Leg]) -> Qty {
    legs.iter()
        .map(|l| {
            if l.state.is_active() {
                l.unsold()
            } else if is_take_profit_rest(l) {
                l.qty.saturating_sub(l.sold.take_profit)
            } else {
                Qty::ZERO
            }
        })
        .sum()
}

/// Whether `qty` is too small for any order of the symbol: floored to the
/// step, under its minimum quantity or its minimum notional at `price`.
fn is_dust(qty: Qty, price: crate::money::Price, rules: &SymbolRules) -> bool {
    let floored = qty.floor_to(rules.step);
    floored.is_zero() || floored < rules.min_qty || floored.notional(price) < rules.min_notional
}

/// The realised result of a closed entry ([`realized_quote`]) and whether it
/// counts every commission of its legs' sales ([`fees_complete`]).
pub fn realized(entry: &Entry, legs: &[Leg]) -> Realized {
    Realized {
        quote: realized_quote(entry, legs),
        fees_complete: fees_complete(legs),
    }
}

/// Whether the recorded trades of every leg cover what it sold, so that
/// [`realized_quote`] counts all of their commissions. `false` when a sale
/// was learnt without its trades (a list's end found by lookup, a cancel's
/// answer, a trade whose write failed): those commissions are left out
/// until the trades are reported.
pub fn fees_complete(legs: &[Leg]) -> bool {
    legs.iter().all(|l| l.trades.missing(l.sold).is_empty())
}

/// The realised quote result of a closed entry: what its legs sold (exits
/// included) less what it cost and less the commissions paid in the quote
/// asset, the entry order's and the legs' (their recorded trades). A
/// commission paid in the base asset on the entry is in it already: the legs
/// sold that many coins fewer. Commissions in other assets are not: see
/// [`other_fees`].
pub fn realized_quote(entry: &Entry, legs: &[Leg]) -> Decimal {
    let quote = &entry.symbol.quote;
    let sales: Decimal = legs.iter().map(|l| l.sold.total_quote()).sum();
    let fees: Decimal = legs.iter().map(|l| l.trades.fees.of(quote)).sum();
    sales - entry.cumulative_quote - entry.fees.of(quote) - fees
}

/// The commissions [`realized_quote`] leaves out, by asset: those paid in
/// any asset but the quote (BNB, say), by the entry order (but its base
/// asset, which the result counts in coins) and by the legs' orders.
pub fn other_fees(entry: &Entry, legs: &[Leg]) -> Fees {
    let quote = &entry.symbol.quote;
    let sales = legs
        .iter()
        .fold(Fees::default(), |all, l| all.plus(&l.trades.fees));
    entry
        .fees
        .without(&[&entry.symbol.base, quote])
        .plus(&sales.without(&[quote]))
}

/// What a round that placed `placed` lists beside a take-profit rest it
/// could not cancel (refused, or its sale unread) ends in: a failure, not
/// `Placed`. The lists cover the other coins; the rest has no stop, and the
/// entry is labelled `unprotected` for it. Every layer retries a failure
/// (sync after its backoff, the gateway and the API by a flag), as when
/// nothing was left to place beside the rest; called placed, the rest would
/// wait for sync's next full pass.
fn rest_still_open(rest_open: Qty, placed: usize) -> ProtectOutcome {
    ProtectOutcome::Failed {
        errors: vec![format!(
            "take-profit rest of {rest_open} still open without a stop; {placed} lists placed over the other coins"
        )],
    }
}

/// Whether `leg` is the rest of a partly filled take-profit: on the book
/// without a stop until it is canceled.
pub(crate) fn is_take_profit_rest(leg: &Leg) -> bool {
    leg.state
        == LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial,
        }
}

/// Whether a list still executes on its stop alone: the stop triggered
/// (its take-profit removed) or selling, and not ended.
fn stop_triggered(snap: &OrderListSnapshot) -> bool {
    let (Some(tp), Some(sl)) = (&snap.take_profit, &snap.stop_loss) else {
        return false;
    };
    snap.executing && !sl.status.is_final() && (tp.status.is_final() || !sl.executed_qty.is_zero())
}

/// Whether working legs of `active_qty` cover `position`: all of it that
/// flooring to the step leaves, and something at all.
fn legs_cover(active_qty: Qty, position: Qty, rules: &SymbolRules) -> bool {
    !active_qty.is_zero() && active_qty >= position.floor_to(rules.step)
}

/// Takes the exchange's word over `rules`: a stop type refused on one of the
/// entry's legs as not supported on the symbol is not allowed, whatever the
/// (possibly stale) rules say, so the next legs carry the other kind.
fn believe_stop_refusals(rules: &mut SymbolRules, legs: &[Leg]) {
    for leg in legs {
        if let LegState::NotPlaced { reason, .. } = &leg.state {
            match leg.stop_limit {
                None if reason.contains(MARKET_STOP_UNSUPPORTED) => {
                    rules.order_types.stop_loss = false;
                }
                Some(_) if reason.contains(STOP_LIMIT_UNSUPPORTED) => {
                    rules.order_types.stop_loss_limit = false;
                }
                _ => {}
            }
        }
    }
}

/// Whether an exchange refusal is a per-symbol open-order cap
/// (`MAX_NUM_ORDERS`, `MAX_NUM_ALGO_ORDERS`, …), which fewer lists can meet.
fn is_order_cap(reason: &str) -> bool {
    reason.contains("MAX_NUM_")
}

/// How a finished list ended, from its orders' states.
pub fn list_end_state(snap: &OrderListSnapshot) -> LegState {
    let status = |o: &Option<crate::ports::ListOrderSnapshot>| o.as_ref().map(|o| o.status);
    let tp = snap.take_profit.as_ref();
    let sl = snap.stop_loss.as_ref();
    if status(&snap.take_profit) == Some(EntryStatus::Filled) {
        return LegState::TakeProfitFilled;
    }
    if status(&snap.stop_loss) == Some(EntryStatus::Filled) {
        return LegState::StopLossFilled;
    }
    if tp.is_some_and(|o| !o.executed_qty.is_zero()) {
        return LegState::CanceledExternally {
            why: ExternalEnd::TakeProfitPartial,
        };
    }
    let stop_expired = sl.is_some_and(|o| {
        o.status == EntryStatus::Expired
            && o.expiry_reason
                .as_deref()
                .is_some_and(|r| r != "OCO_TRIGGER" && r != "NONE")
    });
    if stop_expired
        || sl.is_some_and(|o| o.status == EntryStatus::Expired && !o.executed_qty.is_zero())
    {
        return LegState::CanceledExternally {
            why: ExternalEnd::StopExpired,
        };
    }
    LegState::CanceledExternally {
        why: ExternalEnd::Canceled,
    }
}

/// Told of the result of every [`Protector::protect`] call, whichever layer
/// made it: how processes derive metrics without `oco-core` doing I/O. Called
/// inline, so it must be quick and must not block.
pub trait ProtectObserver: Send + Sync {
    /// One call finished with `report`.
    fn protected(&self, report: &ProtectReport);
}

impl Protector {
    /// Sets the observer told of every call; `false` if one was already set
    /// (the first one stays).
    pub fn set_observer(&self, observer: Arc<dyn ProtectObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }
}

/// What the late policy applies to.
#[derive(Debug, Clone, Copy)]
struct LateCase {
    /// The quantity to exit (or to record as left unprotected).
    position: Qty,
    /// Some lists of the same generation were accepted and keep their stops.
    partly_protected: bool,
}

/// Whether nothing of `entry` waits on a claim: the entry reached a state
/// that needs no placement, and none of its legs is still claimed or sent
/// with its answer unknown. Not the protection state alone: it stays
/// `Protected` once first reached, while a later generation claimed by a
/// caller that died leaves the grown position uncovered. A read that fails
/// counts as unsettled (flagging costs one write; missing one costs a pass).
/// A layer whose `protect` found another caller's claim in flight
/// ([`Idle::InFlight`]) asks this once the claim timeout has passed, and
/// flags the account for reconciliation when it is not.
pub async fn claims_settled(store: &dyn Store, entry: EntryId) -> bool {
    let (read, legs) = futures_util::future::join(store.entry(entry), store.legs(entry)).await;
    let (Ok(read), Ok(legs)) = (read, legs) else {
        return false;
    };
    let state = matches!(
        read.protection,
        Protection::Protected { .. }
            | Protection::Closed
            | Protection::Exited { .. }
            | Protection::Unprotectable { .. }
    );
    state
        && !legs
            .iter()
            .any(|l| matches!(l.state, LegState::Claimed | LegState::Unknown))
}
