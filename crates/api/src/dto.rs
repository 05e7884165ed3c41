//! The HTTP wire shapes: camelCase JSON, money as strings in Binance's plain
//! decimal notation (`"0.001"`), converted explicitly to and from the domain
//! types. Core types derive no `Serialize`; these do.

use std::collections::BTreeMap;
use std::fmt;

use oco_core::model::{
    Entry, EntryEventRecord, EntryKind, Fees, LatePolicy, Leg, OrderSize, Protection,
    ProtectionConfig,
};
use oco_core::{Account, LegState, StopKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A problem body: every error the API returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// Machine code, e.g. `invalid_field`, `exchange_rejected`.
    pub code: String,
    /// What went wrong, for a human, naming values and rules.
    pub message: String,
    /// The offending field, e.g. `tp[0]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Binance's error code, for `exchange_rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binance_code: Option<i32>,
    /// The entry concerned, when one was stored (for
    /// `idempotency_key_reused`: the entry stored under the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<i64>,
    /// For `account_has_open_entries` and `account_left_disabled`: how many
    /// entries of the account are still open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_entries: Option<usize>,
    /// For `account_has_open_entries` and `account_left_disabled`: up to five
    /// of them, lowest id first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_ids: Option<Vec<i64>>,
}

/// How the stop leg executes once triggered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StopSettings {
    /// `STOP_LOSS_LIMIT`, its limit `offsetPct` percent under the trigger.
    Limit {
        /// Percent, e.g. `"0.5"`.
        #[serde(rename = "offsetPct")]
        offset_pct: String,
    },
    /// `STOP_LOSS` (market once triggered) where the symbol allows it. Binance's
    /// majors (BTCUSDT…) do not: there the stop is a `STOP_LOSS_LIMIT` 0.5 %
    /// under the trigger, and the entry's `stop_substituted` event says so.
    Market,
}

/// What to do when protection comes after the market passed a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicyDto {
    /// Sell at market and record it.
    ExitAtMarket,
    /// Record it and leave the position to a human.
    RecordOnly,
}

/// An account's protection settings. In a request every field is optional:
/// absent fields keep their current value (or the default on creation).
/// `tp1Pct`, `tp2Pct` and `slPct` are distances from the fill in percent,
/// used when an entry carries no level of its own.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtectionSettings {
    /// First target, percent above the fill (default `"1"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp1_pct: Option<String>,
    /// Second target, percent above the fill (default `"2"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp2_pct: Option<String>,
    /// Stop, percent under the fill (default `"1"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sl_pct: Option<String>,
    /// Share of the position on leg 1 (TP1), in `(0, 1]` (default `"0.5"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Stop type (default limit, 0.5 % under the trigger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSettings>,
    /// Late policy (default `exit_at_market`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_policy: Option<LatePolicyDto>,
}

impl ProtectionSettings {
    /// The settings as they stand, every field filled.
    pub fn from_config(config: &ProtectionConfig) -> ProtectionSettings {
        let percents = config.percents.unwrap_or(oco_core::LevelPercents::DEFAULT);
        ProtectionSettings {
            tp1_pct: Some(percents.tp1.normalize().to_string()),
            tp2_pct: Some(percents.tp2.normalize().to_string()),
            sl_pct: Some(percents.sl.normalize().to_string()),
            split: Some(config.split.normalize().to_string()),
            stop: Some(match config.stop {
                StopKind::Limit { offset_pct } => StopSettings::Limit {
                    offset_pct: offset_pct.normalize().to_string(),
                },
                StopKind::Market => StopSettings::Market,
            }),
            late_policy: Some(match config.late {
                LatePolicy::ExitAtMarket => LatePolicyDto::ExitAtMarket,
                LatePolicy::RecordOnly => LatePolicyDto::RecordOnly,
            }),
        }
    }
}

/// `POST /v1/accounts`. `Debug` never shows the secret.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAccountRequest {
    /// Exchange name; only `binance` for now.
    pub exchange: String,
    /// Public API key.
    pub api_key: String,
    /// API secret; stored encrypted, never returned.
    pub api_secret: String,
    /// Protection settings (defaults when absent).
    #[serde(default)]
    pub protection: Option<ProtectionSettings>,
}

impl fmt::Debug for CreateAccountRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateAccountRequest")
            .field("exchange", &self.exchange)
            .field("api_key", &self.api_key)
            .field("api_secret", &"[redacted]")
            .field("protection", &self.protection)
            .finish()
    }
}

/// `PATCH /v1/accounts/{id}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateAccountRequest {
    /// Fields to change; absent fields keep their value.
    #[serde(default)]
    pub protection: Option<ProtectionSettings>,
    /// False disables the account (no new entries, no streaming, no
    /// reconciliation); refused with `account_has_open_entries` while any of
    /// its entries is open.
    #[serde(default)]
    pub active: Option<bool>,
}

/// An account as shown (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    /// Id.
    pub id: i64,
    /// Owning user.
    pub owner: String,
    /// Exchange name.
    pub exchange: String,
    /// Public API key.
    pub api_key: String,
    /// False once disabled.
    pub active: bool,
    /// Protection settings, every field filled.
    pub protection: ProtectionSettings,
}

impl AccountView {
    /// The view of an account.
    pub fn of(account: &Account) -> AccountView {
        AccountView {
            id: account.id.0,
            owner: account.owner.clone(),
            exchange: account.exchange.clone(),
            api_key: account.api_key.clone(),
            active: account.active,
            protection: ProtectionSettings::from_config(&account.protection),
        }
    }
}

/// Entry order type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum EntryType {
    /// Fills at once at the market.
    Market,
    /// Rests at `price` until crossed (GTC).
    Limit,
}

/// `POST /v1/entries`: a BUY entry. Give exactly one of `quantity` (base)
/// and `quoteOrderQty` (quote, MARKET only); `price` only for LIMIT.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateEntryRequest {
    /// Account id (one of yours).
    pub account: i64,
    /// Symbol, e.g. `BTCUSDT`.
    pub symbol: String,
    /// `MARKET` or `LIMIT`.
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Base quantity, e.g. `"0.001"`.
    #[serde(default)]
    pub quantity: Option<String>,
    /// Quote amount to spend, e.g. `"100"` (MARKET only).
    #[serde(default)]
    pub quote_order_qty: Option<String>,
    /// Limit price (LIMIT only).
    #[serde(default)]
    pub price: Option<String>,
    /// Targets: `[tp1]` or `[tp1, tp2]`, above the price, `tp1 <= tp2`.
    pub tp: Vec<String>,
    /// Stop-loss trigger, below the price (else the account's percentage).
    #[serde(default)]
    pub sl: Option<String>,
    /// The signal that produced it.
    #[serde(default)]
    pub signal_id: Option<String>,
    /// The portfolio it belongs to.
    #[serde(default)]
    pub portfolio_id: Option<String>,
}

/// How protection stands for an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectionView {
    /// `not_needed`, `unprotected`, `protected`, `unprotectable`, `exited`
    /// or `closed`.
    pub state: String,
    /// When coverage was complete (ms since the epoch), for `protected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
    /// Which layer placed it (`direct`, `websocket`, `sync`), for `protected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why, for `unprotectable` and `exited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ProtectionView {
    /// The view of a protection state.
    pub fn of(p: &Protection) -> ProtectionView {
        let plain = |state: &str| ProtectionView {
            state: state.to_owned(),
            at: None,
            by: None,
            reason: None,
        };
        match p {
            Protection::NotNeeded => plain("not_needed"),
            Protection::Unprotected => plain("unprotected"),
            Protection::Protected { at, by } => ProtectionView {
                at: Some(at.0),
                by: Some(by.name().to_owned()),
                ..plain("protected")
            },
            Protection::Unprotectable { reason } => ProtectionView {
                reason: Some(reason.clone()),
                ..plain("unprotectable")
            },
            Protection::Exited { reason } => ProtectionView {
                reason: Some(reason.clone()),
                ..plain("exited")
            },
            Protection::Closed => plain("closed"),
        }
    }
}

/// One protective OCO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegView {
    /// 1 (TP1 + SL) or 2 (TP2 + SL).
    pub leg: u8,
    /// Raised each time protection is planned anew.
    pub generation: u32,
    /// `claimed`, `placed`, `unknown`, `take_profit_filled`,
    /// `stop_loss_filled`, `canceled_externally`, `replaced`, `not_placed`,
    /// `unprotectable`.
    pub state: String,
    /// The exchange's `orderListId`, once placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_id: Option<i64>,
    /// `listClientOrderId`.
    pub list_client_id: String,
    /// Take-profit client id.
    pub take_profit_client_id: String,
    /// Stop-loss client id.
    pub stop_loss_client_id: String,
    /// Quantity of both orders.
    pub qty: String,
    /// `LIMIT_MAKER` price.
    pub take_profit: String,
    /// Stop trigger.
    pub stop: String,
    /// Stop limit (absent for a market stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_limit: Option<String>,
    /// Base sold so far by either side.
    pub sold_qty: String,
    /// Commissions its orders' trades were charged, by asset, as far as
    /// they are recorded (absent when none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fees: BTreeMap<String, String>,
    /// Layer that claimed it.
    pub source: String,
    /// Placement attempts.
    pub attempts: u32,
    /// Last error, e.g. a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Last change (ms since the epoch).
    pub updated_at: i64,
}

impl LegView {
    /// The view of a leg.
    pub fn of(leg: &Leg) -> LegView {
        LegView {
            leg: leg.key.leg.number(),
            generation: leg.key.generation,
            state: leg.state.name().to_owned(),
            list_id: match leg.state {
                LegState::Placed { list_id } => Some(list_id),
                _ => None,
            },
            list_client_id: leg.ids.list.to_string(),
            take_profit_client_id: leg.ids.take_profit.to_string(),
            stop_loss_client_id: leg.ids.stop_loss.to_string(),
            qty: leg.qty.to_string(),
            take_profit: leg.take_profit.to_string(),
            stop: leg.stop.to_string(),
            stop_limit: leg.stop_limit.map(|p| p.to_string()),
            sold_qty: leg.sold.total().to_string(),
            fees: fees_view(&leg.trades.fees),
            source: leg.source.name().to_owned(),
            attempts: leg.attempts,
            last_error: leg.last_error.clone(),
            updated_at: leg.updated_at.0,
        }
    }
}

/// One line of an entry's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// Short kind, e.g. `leg_placed`.
    pub kind: String,
    /// Detail.
    pub detail: String,
    /// Layer that acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When (ms since the epoch).
    pub at: i64,
}

impl EventView {
    /// The view of an event.
    pub fn of(e: &EntryEventRecord) -> EventView {
        EventView {
            kind: e.kind.clone(),
            detail: e.detail.clone(),
            source: e.source.map(|s| s.name().to_owned()),
            at: e.at.0,
        }
    }
}

/// An entry with its protection state and legs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntryView {
    /// Id.
    pub id: i64,
    /// Account id.
    pub account: i64,
    /// Symbol.
    pub symbol: String,
    /// `MARKET` or `LIMIT`.
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Base quantity asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<String>,
    /// Quote amount asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote_order_qty: Option<String>,
    /// Limit price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    /// Targets stored with the entry.
    pub tp: Vec<String>,
    /// Stop stored with the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sl: Option<String>,
    /// Signal tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_id: Option<String>,
    /// Portfolio tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portfolio_id: Option<String>,
    /// Deterministic client order id, e.g. `og-E-17`.
    pub client_id: String,
    /// Exchange order id, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<i64>,
    /// `pending_new`, `new`, `partially_filled`, `filled`, `canceled`,
    /// `expired` or `rejected`.
    pub status: String,
    /// Filled base quantity.
    pub executed_qty: String,
    /// Quote transacted.
    pub cumulative_quote: String,
    /// Average fill price, once filled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_price: Option<String>,
    /// Commission paid in the base asset.
    pub base_commission: String,
    /// First fill (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filled_at: Option<i64>,
    /// Creation (ms since the epoch).
    pub created_at: i64,
    /// Protection state.
    pub protection: ProtectionView,
    /// Realised quote result, once closed or exited at market: what the
    /// legs (and any market exit) sold, less the cost and less every
    /// commission paid in the quote asset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_quote: Option<String>,
    /// Whether `realizedQuote` counts every commission of the legs' sales,
    /// with it (absent while there is no result). `false`: the result
    /// leaves out commissions of sales learnt by lookup (a list's end found
    /// while the stream was down carries no trades); a trade reported later
    /// recounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fees_complete: Option<bool>,
    /// Commissions `realizedQuote` does not count, by asset: those paid in
    /// an asset other than the quote (BNB, say), by the entry's fills (but
    /// the base asset's, in `baseCommission`) and by the legs' trades.
    /// Absent when none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other_fees: BTreeMap<String, String>,
    /// Every leg, every generation.
    pub legs: Vec<LegView>,
    /// History, oldest first (on `GET /v1/entries/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventView>>,
    /// What the caller should know about this answer, e.g. an unknown
    /// outcome being resolved by reconciliation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl EntryView {
    /// The view of an entry and its legs.
    pub fn of(entry: &Entry, legs: &[Leg]) -> EntryView {
        let (kind, price) = match entry.kind {
            EntryKind::Market => (EntryType::Market, None),
            EntryKind::Limit { price } => (EntryType::Limit, Some(price.to_string())),
        };
        let (quantity, quote_order_qty) = match entry.size {
            OrderSize::Base(q) => (Some(q.to_string()), None),
            OrderSize::Quote(q) => (None, Some(q.normalize().to_string())),
        };
        let mut tp = Vec::new();
        if let Some(tp1) = entry.levels.tp1 {
            tp.push(tp1.to_string());
        }
        if let Some(tp2) = entry.levels.tp2 {
            tp.push(tp2.to_string());
        }
        let other_fees = fees_view(&oco_core::protect::other_fees(entry, legs));
        let mut legs: Vec<&Leg> = legs.iter().collect();
        legs.sort_by_key(|l| (l.key.generation, l.key.leg));
        EntryView {
            id: entry.id.0,
            account: entry.account.0,
            symbol: entry.symbol.name.clone(),
            kind,
            quantity,
            quote_order_qty,
            price,
            tp,
            sl: entry.levels.sl.map(|p| p.to_string()),
            signal_id: entry.tags.signal_id.clone(),
            portfolio_id: entry.tags.portfolio_id.clone(),
            client_id: entry.client_id.to_string(),
            order_id: entry.order_id,
            status: entry.status.name().to_owned(),
            executed_qty: entry.executed_qty.to_string(),
            cumulative_quote: entry.cumulative_quote.normalize().to_string(),
            avg_price: entry.average_price().map(|p| p.to_string()),
            base_commission: entry.base_commission.to_string(),
            filled_at: entry.filled_at.map(|t| t.0),
            created_at: entry.created_at.0,
            protection: ProtectionView::of(&entry.protection),
            realized_quote: entry.realized_quote.map(|q| q.normalize().to_string()),
            fees_complete: entry.realized_quote.map(|_| entry.fees_complete),
            other_fees,
            legs: legs.into_iter().map(LegView::of).collect(),
            events: None,
            note: None,
        }
    }
}

/// Commissions by asset, as the wire shows them.
fn fees_view(fees: &Fees) -> BTreeMap<String, String> {
    fees.iter()
        .map(|(asset, amount)| (asset.0.clone(), amount.normalize().to_string()))
        .collect()
}

/// `GET /v1/entries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EntryList {
    /// Newest first.
    pub entries: Vec<EntryView>,
}

/// `GET /v1/accounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AccountList {
    /// The caller's accounts.
    pub accounts: Vec<AccountView>,
}
