//! The records the layers share through the store: accounts, entries, fills, legs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::ids::{AccountId, ClientOrderId, EntryId, IdempotencyKey, LegKey, OcoClientIds};
use crate::levels::{EntryLevels, LevelPercents, StopKind};
use crate::money::{Price, Qty};
use crate::state::{EntryStatus, LegSold, LegState};
use crate::symbol::{Asset, Symbol};

/// Milliseconds since the Unix epoch, as the exchange counts time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub i64);

impl Millis {
    /// `self + d`.
    pub fn plus(self, d: Duration) -> Millis {
        Millis(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// `self − earlier`, zero when `earlier` is later.
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Which layer asked for protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Layer 1: the user-data stream.
    Websocket,
    /// Layer 2: reconciliation.
    Sync,
    /// Layer 3: the entry's own placement response.
    Direct,
}

impl Source {
    /// The label used in metrics and the store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Websocket => "websocket",
            Self::Sync => "sync",
            Self::Direct => "direct",
        }
    }

    /// The inverse of [`Source::name`].
    pub fn from_name(name: &str) -> Option<Source> {
        [Self::Websocket, Self::Sync, Self::Direct]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do when protection comes after the price already passed a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatePolicy {
    /// Sell the position at market and record the exit.
    ExitAtMarket,
    /// Record it and leave the position to a human (the alert fires).
    RecordOnly,
}

impl LatePolicy {
    /// Lower-case name, as configured.
    pub fn name(self) -> &'static str {
        match self {
            Self::ExitAtMarket => "exit_at_market",
            Self::RecordOnly => "record_only",
        }
    }

    /// The inverse of [`LatePolicy::name`].
    pub fn from_name(name: &str) -> Option<LatePolicy> {
        [Self::ExitAtMarket, Self::RecordOnly]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// How an account's entries are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtectionConfig {
    /// Level distances when the entry has none (`None`: the defaults).
    pub percents: Option<LevelPercents>,
    /// Share of the position on leg 1 (TP1), in `(0, 1]`; 1 means a single leg.
    pub split: Decimal,
    /// Stop-limit or market stop.
    pub stop: StopKind,
    /// What to do when protection comes too late.
    pub late: LatePolicy,
}

impl ProtectionConfig {
    /// Defaults: ±percent levels from [`LevelPercents::DEFAULT`], a 50/50 split,
    /// a stop-limit 0.5 % under the trigger, exit at market when late.
    pub const DEFAULT: ProtectionConfig = ProtectionConfig {
        percents: None,
        split: Decimal::from_parts(5, 0, 0, false, 1),
        stop: StopKind::DEFAULT_LIMIT,
        late: LatePolicy::ExitAtMarket,
    };
}

/// A registered exchange account (its secret stays in the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Id.
    pub id: AccountId,
    /// The user who owns it.
    pub owner: String,
    /// Exchange name, e.g. `binance`.
    pub exchange: String,
    /// Public API key.
    pub api_key: String,
    /// Protection settings.
    pub protection: ProtectionConfig,
    /// False once disabled; disabled accounts are not streamed or reconciled.
    pub active: bool,
}

/// Buy with a base quantity or spend a quote amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderSize {
    /// Base quantity (`quantity`).
    Base(Qty),
    /// Quote amount (`quoteOrderQty`, MARKET only).
    Quote(Decimal),
}

/// Entry order type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Fills at once at the market.
    Market,
    /// Rests at `price` until crossed (GTC).
    Limit {
        /// Limit price.
        price: Price,
    },
}

/// Free-form tags carried with an entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryTags {
    /// The signal that produced it.
    pub signal_id: Option<String>,
    /// The portfolio it belongs to.
    pub portfolio_id: Option<String>,
}

/// What is needed to create an entry; the store assigns id and client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Account.
    pub account: AccountId,
    /// Symbol.
    pub symbol: Symbol,
    /// Type.
    pub kind: EntryKind,
    /// Size.
    pub size: OrderSize,
    /// Protection levels stored with it before it is sent.
    pub levels: EntryLevels,
    /// Tags.
    pub tags: EntryTags,
    /// The client's key for the request, unique per account: a second
    /// entry under a key its account used is not stored
    /// ([`crate::ports::StoreError::IdempotencyKeyUsed`]). `None`: no key,
    /// every request is a new entry.
    pub idempotency_key: Option<IdempotencyKey>,
}

/// One trade of an entry, by exchange trade id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    /// Exchange trade id; unique per symbol.
    pub trade_id: i64,
    /// Price.
    pub price: Price,
    /// Base quantity.
    pub qty: Qty,
    /// Commission charged.
    pub commission: Decimal,
    /// Asset the commission was charged in.
    pub commission_asset: Asset,
    /// Trade time.
    pub time: Millis,
}

/// What a layer saw of an entry order: a snapshot that only ever adds facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// Exchange order id, when known.
    pub order_id: Option<i64>,
    /// Order status seen.
    pub status: EntryStatus,
    /// Cumulative filled base quantity.
    pub executed_qty: Qty,
    /// Cumulative quote transacted.
    pub cumulative_quote: Decimal,
    /// Trades seen (possibly only some of them).
    pub fills: Vec<Fill>,
    /// Base asset held by the account (free + locked), when the layer knows it.
    pub holding: Option<Qty>,
    /// When the evidence was observed.
    pub observed_at: Millis,
}

/// How protection currently stands for an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// Nothing filled yet, so nothing to protect.
    NotNeeded,
    /// Filled and not (yet) covered.
    Unprotected,
    /// Covered by placed legs.
    Protected {
        /// When coverage was first complete.
        at: Millis,
        /// Which layer placed it.
        by: Source,
    },
    /// Cannot be covered; the reason names the rule.
    Unprotectable {
        /// Why.
        reason: String,
    },
    /// Sold at market because protection came too late.
    Exited {
        /// Why.
        reason: String,
    },
    /// Every coin of it is sold.
    Closed,
}

/// An entry with everything known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Id.
    pub id: EntryId,
    /// Account.
    pub account: AccountId,
    /// Symbol.
    pub symbol: Symbol,
    /// Our client order id for it.
    pub client_id: ClientOrderId,
    /// Exchange order id once known.
    pub order_id: Option<i64>,
    /// Type.
    pub kind: EntryKind,
    /// Size requested.
    pub size: OrderSize,
    /// Order status.
    pub status: EntryStatus,
    /// Cumulative filled base quantity.
    pub executed_qty: Qty,
    /// Cumulative quote transacted.
    pub cumulative_quote: Decimal,
    /// Commission paid in the base asset over the recorded fills.
    pub base_commission: Qty,
    /// Commission paid over the recorded fills, by asset (the base asset's
    /// too, as in `base_commission`).
    pub fees: Fees,
    /// Quantity covered by the recorded fills (less than `executed_qty` when
    /// some trades have not been seen one by one).
    pub fills_qty: Qty,
    /// Protection levels.
    pub levels: EntryLevels,
    /// Tags.
    pub tags: EntryTags,
    /// First time a fill was seen.
    pub filled_at: Option<Millis>,
    /// Protection state.
    pub protection: Protection,
    /// Realised quote result once closed or exited at market: what the legs
    /// sold, less the cost and the commissions paid in the quote asset, the
    /// entry's and the legs' ([`crate::protect::realized_quote`]).
    /// Commissions in other assets are apart
    /// ([`crate::protect::other_fees`]).
    pub realized_quote: Option<Decimal>,
    /// Whether `realized_quote` counts every commission of the legs' sales
    /// (written with it, see [`crate::protect::fees_complete`]): `false`
    /// when it leaves out those of sales learnt by lookup, without their
    /// trades. Meaningless while there is no result.
    pub fees_complete: bool,
    /// Creation time.
    pub created_at: Millis,
}

impl Entry {
    /// Average fill price, `None` before any fill.
    pub fn average_price(&self) -> Option<Price> {
        if self.executed_qty.is_zero() {
            return None;
        }
        Price::new(self.cumulative_quote / self.executed_qty.get()).ok()
    }

    /// Filled quantity net of base-asset commission.
    pub fn net_qty(&self) -> Qty {
        self.executed_qty.saturating_sub(self.base_commission)
    }
}

/// A leg as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    /// Entry, leg, generation.
    pub key: LegKey,
    /// Its deterministic client ids.
    pub ids: OcoClientIds,
    /// Symbol.
    pub symbol: String,
    /// Quantity of the list.
    pub qty: Qty,
    /// Take-profit price.
    pub take_profit: Price,
    /// Stop trigger.
    pub stop: Price,
    /// Stop limit.
    pub stop_limit: Option<Price>,
    /// State.
    pub state: LegState,
    /// Sold so far.
    pub sold: LegSold,
    /// The trades of its orders recorded so far (commissions included).
    pub trades: LegTrades,
    /// Layer that claimed it.
    pub source: Source,
    /// Placement attempts.
    pub attempts: u32,
    /// Last error seen for it.
    pub last_error: Option<String>,
    /// Claim time.
    pub claimed_at: Millis,
    /// Last change. For a claimed leg: its claim, or its claimant's fence
    /// right before sending; the claim timeout runs from here.
    pub updated_at: Millis,
}

impl Leg {
    /// What the leg's list still holds: its quantity less what it sold. A
    /// list whose stop triggered and sold part keeps working over the rest
    /// only; a position counts its sales as gone, so a list counted at its
    /// full size would cover those coins twice.
    pub fn unsold(&self) -> Qty {
        self.qty.saturating_sub(self.sold.total())
    }
}

/// An entry's realised result as written by a close or an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Realized {
    /// The result in the quote asset ([`crate::protect::realized_quote`]).
    pub quote: Decimal,
    /// Whether it counts every commission of the legs' sales.
    pub fees_complete: bool,
}

impl Realized {
    /// A result that counts every commission (tests, and sales with no
    /// commission to learn).
    pub fn complete(quote: Decimal) -> Realized {
        Realized {
            quote,
            fees_complete: true,
        }
    }
}

/// Commissions by asset: one total per asset, zero totals left out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fees(BTreeMap<Asset, Decimal>);

impl Fees {
    /// Adds `amount` of `asset`.
    pub fn add(&mut self, asset: &Asset, amount: Decimal) {
        let total = self.0.entry(asset.clone()).or_default();
        *total += amount;
        if total.is_zero() {
            self.0.remove(asset);
        }
    }

    /// The total charged in `asset` (zero when none).
    pub fn of(&self, asset: &Asset) -> Decimal {
        self.0.get(asset).copied().unwrap_or_default()
    }

    /// Each asset with its total, by asset.
    pub fn iter(&self) -> impl Iterator<Item = (&Asset, Decimal)> + '_ {
        self.0.iter().map(|(a, d)| (a, *d))
    }

    /// Nothing charged.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These fees and `other`'s, asset by asset.
    pub fn plus(&self, other: &Fees) -> Fees {
        let mut sum = self.clone();
        for (asset, amount) in other.iter() {
            sum.add(asset, amount);
        }
        sum
    }

    /// These fees without those charged in any of `assets`.
    pub fn without(&self, assets: &[&Asset]) -> Fees {
        Fees(
            self.0
                .iter()
                .filter(|(a, _)| !assets.contains(a))
                .map(|(a, d)| (a.clone(), *d))
                .collect(),
        )
    }
}

impl FromIterator<(Asset, Decimal)> for Fees {
    fn from_iter<I: IntoIterator<Item = (Asset, Decimal)>>(iter: I) -> Fees {
        let mut fees = Fees::default();
        for (asset, amount) in iter {
            fees.add(&asset, amount);
        }
        fees
    }
}

/// Which order of a leg traded: its take-profit, or its stop. A market exit
/// counts as a stop, as in [`LegSold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SaleSide {
    /// The take-profit (`LIMIT_MAKER` above).
    TakeProfit,
    /// The stop below, or a market exit.
    StopLoss,
}

impl SaleSide {
    /// Lower-case name, as stored.
    pub fn name(self) -> &'static str {
        match self {
            Self::TakeProfit => "take_profit",
            Self::StopLoss => "stop_loss",
        }
    }
}

/// What the trades recorded of a leg's orders (each once, by trade id) add
/// up to: the base they sold, by side, and the commissions they were charged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LegTrades {
    /// Base sold by the take-profit's recorded trades.
    pub take_profit_qty: Qty,
    /// Base sold by the stop's (or the exit's) recorded trades.
    pub stop_loss_qty: Qty,
    /// Their commissions, by asset.
    pub fees: Fees,
}

impl LegTrades {
    /// The sides whose recorded trades cover less than `sold` says they
    /// sold: not all of their commissions are known.
    pub fn missing(&self, sold: LegSold) -> Vec<SaleSide> {
        let mut short = Vec::new();
        if self.take_profit_qty < sold.take_profit {
            short.push(SaleSide::TakeProfit);
        }
        if self.stop_loss_qty < sold.stop_loss {
            short.push(SaleSide::StopLoss);
        }
        short
    }

    /// Adds one trade of `side`.
    pub fn add(&mut self, side: SaleSide, trade: &Fill) {
        match side {
            SaleSide::TakeProfit => self.take_profit_qty = self.take_profit_qty.plus(trade.qty),
            SaleSide::StopLoss => self.stop_loss_qty = self.stop_loss_qty.plus(trade.qty),
        }
        self.fees.add(&trade.commission_asset, trade.commission);
    }
}

/// A claim request: the leg as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegClaim {
    /// Entry, leg, generation.
    pub key: LegKey,
    /// Client ids.
    pub ids: OcoClientIds,
    /// Symbol.
    pub symbol: String,
    /// Quantity.
    pub qty: Qty,
    /// Take-profit.
    pub take_profit: Price,
    /// Stop trigger.
    pub stop: Price,
    /// Stop limit.
    pub stop_limit: Option<Price>,
    /// Claiming layer.
    pub source: Source,
    /// Claim time.
    pub at: Millis,
}

/// A change to a leg, applied only if the leg is still in `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegUpdate {
    /// Which leg.
    pub key: LegKey,
    /// Expected current state's name (compare-and-set).
    pub from: &'static str,
    /// New state.
    pub to: LegState,
    /// Error text to keep with it.
    pub error: Option<String>,
    /// When.
    pub at: Millis,
}

/// One line of an entry's append-only history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryEventRecord {
    /// Entry.
    pub entry: EntryId,
    /// Short kind, e.g. `leg_placed`.
    pub kind: String,
    /// Human-readable detail.
    pub detail: String,
    /// Layer that acted, when one did.
    pub source: Option<Source>,
    /// When.
    pub at: Millis,
}
