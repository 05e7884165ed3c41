//! Rows as diesel reads and writes them, and their checked conversion to and
//! from the domain's records. Every text column that names a state goes back
//! through the domain's own `from_name`; anything unknown is `Corrupt`.

use diesel::pg::data_types::{PgNumeric, PgTimestamp};
use diesel::prelude::*;
use oco_core::levels::{EntryLevels, LevelPercents, StopKind};
use oco_core::model::{
    EntryEventRecord, EntryKind, EntryTags, Fees, LatePolicy, LegTrades, OrderSize, Protection,
    SaleSide,
};
use oco_core::state::{ExternalEnd, LegSold, LegState};
use oco_core::{
    Account, AccountId, Asset, ClientOrderId, Entry, EntryId, EntryStatus, LegIndex, LegKey,
    OcoClientIds, ProtectionConfig, Source, StoreError, Symbol,
};
use serde_json::{Map, Value};

use crate::convert::{
    millis, numeric, read_decimal, read_opt_price, read_price, read_qty, timestamp,
};
use crate::error::corrupt;
use crate::schema::{accounts, entries, entry_events, fills, leg_trades, protection_legs};

/// An `accounts` row without its secret.
#[derive(Queryable, Selectable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub(crate) struct AccountRow {
    pub id: i64,
    pub owner: String,
    pub exchange: String,
    pub api_key: String,
    pub tp1_pct: Option<PgNumeric>,
    pub tp2_pct: Option<PgNumeric>,
    pub sl_pct: Option<PgNumeric>,
    pub split: PgNumeric,
    pub stop_kind: String,
    pub stop_offset_pct: Option<PgNumeric>,
    pub late_policy: String,
    pub active: bool,
}

/// The protection columns of `accounts`, for inserts and updates.
#[derive(Insertable, AsChangeset)]
#[diesel(table_name = accounts, treat_none_as_null = true)]
pub(crate) struct ProtectionColumns {
    pub tp1_pct: Option<PgNumeric>,
    pub tp2_pct: Option<PgNumeric>,
    pub sl_pct: Option<PgNumeric>,
    pub split: PgNumeric,
    pub stop_kind: &'static str,
    pub stop_offset_pct: Option<PgNumeric>,
    pub late_policy: &'static str,
}

impl ProtectionColumns {
    pub(crate) fn from_config(p: &ProtectionConfig) -> ProtectionColumns {
        let (stop_kind, stop_offset_pct) = match p.stop {
            StopKind::Limit { offset_pct } => ("limit", Some(numeric(offset_pct))),
            StopKind::Market => ("market", None),
        };
        ProtectionColumns {
            tp1_pct: p.percents.map(|l| numeric(l.tp1)),
            tp2_pct: p.percents.map(|l| numeric(l.tp2)),
            sl_pct: p.percents.map(|l| numeric(l.sl)),
            split: numeric(p.split),
            stop_kind,
            stop_offset_pct,
            late_policy: p.late.name(),
        }
    }
}

impl AccountRow {
    pub(crate) fn into_account(self) -> Result<Account, StoreError> {
        let what = |col: &str| format!("account {} {col}", self.id);
        let percents = match (&self.tp1_pct, &self.tp2_pct, &self.sl_pct) {
            (Some(tp1), Some(tp2), Some(sl)) => Some(LevelPercents {
                tp1: read_decimal(tp1, &what("tp1_pct"))?,
                tp2: read_decimal(tp2, &what("tp2_pct"))?,
                sl: read_decimal(sl, &what("sl_pct"))?,
            }),
            (None, None, None) => None,
            _ => return Err(corrupt(what("percentages: some set, some not"))),
        };
        let stop = match (self.stop_kind.as_str(), &self.stop_offset_pct) {
            ("limit", Some(o)) => StopKind::Limit {
                offset_pct: read_decimal(o, &what("stop_offset_pct"))?,
            },
            ("market", None) => StopKind::Market,
            (kind, _) => {
                return Err(corrupt(what(&format!(
                    "stop kind '{kind}' with its offset"
                ))));
            }
        };
        let late = LatePolicy::from_name(&self.late_policy)
            .ok_or_else(|| corrupt(what(&format!("late policy '{}'", self.late_policy))))?;
        Ok(Account {
            id: AccountId(self.id),
            owner: self.owner,
            exchange: self.exchange,
            api_key: self.api_key,
            protection: ProtectionConfig {
                percents,
                split: read_decimal(&self.split, &what("split"))?,
                stop,
                late,
            },
            active: self.active,
        })
    }
}

/// An `entries` row.
#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = entries, check_for_backend(diesel::pg::Pg))]
pub(crate) struct EntryRow {
    pub id: i64,
    pub account_id: i64,
    pub symbol: String,
    pub base_asset: String,
    pub quote_asset: String,
    pub client_order_id: String,
    pub exchange_order_id: Option<i64>,
    pub order_type: String,
    pub limit_price: Option<PgNumeric>,
    pub requested_qty: Option<PgNumeric>,
    pub requested_quote: Option<PgNumeric>,
    pub status: String,
    pub executed_qty: PgNumeric,
    pub cumulative_quote: PgNumeric,
    pub base_commission: PgNumeric,
    pub fills_qty: PgNumeric,
    pub metadata: Value,
    pub filled_at: Option<PgTimestamp>,
    pub protection: String,
    pub protection_reason: Option<String>,
    pub protected_at: Option<PgTimestamp>,
    pub protected_by: Option<String>,
    pub realized_quote: Option<PgNumeric>,
    pub created_at: PgTimestamp,
    pub fees: Value,
    pub fees_complete: bool,
}

/// A new `entries` row (written by `cached::InsertEntry`).
pub(crate) struct NewEntryRow {
    pub id: i64,
    pub account_id: i64,
    pub symbol: String,
    pub base_asset: String,
    pub quote_asset: String,
    pub client_order_id: String,
    pub order_type: &'static str,
    pub limit_price: Option<PgNumeric>,
    pub requested_qty: Option<PgNumeric>,
    pub requested_quote: Option<PgNumeric>,
    pub status: &'static str,
    pub metadata: Value,
    pub protection: &'static str,
    pub created_at: PgTimestamp,
    pub idempotency_key: Option<String>,
}

/// The protection columns of `entries`. `protected_at`/`protected_by` are
/// written only when protection is complete and kept afterwards, as history.
#[derive(AsChangeset)]
#[diesel(table_name = entries)]
pub(crate) struct EntryProtectionColumns {
    pub protection: &'static str,
    pub protection_reason: Option<Option<String>>,
    pub protected_at: Option<PgTimestamp>,
    pub protected_by: Option<&'static str>,
}

impl EntryProtectionColumns {
    pub(crate) fn from_protection(p: &Protection) -> Result<EntryProtectionColumns, StoreError> {
        let plain = |name| EntryProtectionColumns {
            protection: name,
            protection_reason: Some(None),
            protected_at: None,
            protected_by: None,
        };
        Ok(match p {
            Protection::NotNeeded => plain("not_needed"),
            Protection::Unprotected => plain("unprotected"),
            Protection::Closed => plain("closed"),
            Protection::Protected { at, by } => EntryProtectionColumns {
                protected_at: Some(timestamp(*at)?),
                protected_by: Some(by.name()),
                ..plain("protected")
            },
            Protection::Unprotectable { reason } => EntryProtectionColumns {
                protection_reason: Some(Some(reason.clone())),
                ..plain("unprotectable")
            },
            Protection::Exited { reason } => EntryProtectionColumns {
                protection_reason: Some(Some(reason.clone())),
                ..plain("exited")
            },
        })
    }
}

/// The entry's levels and tags as its `metadata` JSONB (strings, absent when unset).
pub(crate) fn metadata(levels: &EntryLevels, tags: &EntryTags) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), Value::String(v));
        }
    };
    put("tp1", levels.tp1.map(|p| p.to_string()));
    put("tp2", levels.tp2.map(|p| p.to_string()));
    put("sl", levels.sl.map(|p| p.to_string()));
    put("finalSignalId", tags.signal_id.clone());
    put("portfolioId", tags.portfolio_id.clone());
    Value::Object(m)
}

fn metadata_str(meta: &Value, key: &str, what: &str) -> Result<Option<String>, StoreError> {
    match meta.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(corrupt(format!(
            "{what} metadata {key}: expected a string, got {other}"
        ))),
    }
}

fn metadata_price(
    meta: &Value,
    key: &str,
    what: &str,
) -> Result<Option<oco_core::Price>, StoreError> {
    metadata_str(meta, key, what)?
        .map(|s| {
            s.parse()
                .map_err(|e| corrupt(format!("{what} metadata {key}: {e}")))
        })
        .transpose()
}

impl EntryRow {
    pub(crate) fn into_entry(self) -> Result<Entry, StoreError> {
        let what = |col: &str| format!("entry {} {col}", self.id);
        let kind = match (self.order_type.as_str(), &self.limit_price) {
            ("market", None) => EntryKind::Market,
            ("limit", Some(p)) => EntryKind::Limit {
                price: read_price(p, &what("limit_price"))?,
            },
            (t, _) => {
                return Err(corrupt(what(&format!(
                    "order type '{t}' with its limit price"
                ))));
            }
        };
        let size = match (&self.requested_qty, &self.requested_quote) {
            (Some(q), None) => OrderSize::Base(read_qty(q, &what("requested_qty"))?),
            (None, Some(q)) => OrderSize::Quote(read_decimal(q, &what("requested_quote"))?),
            _ => {
                return Err(corrupt(what(
                    "requested size: not exactly one of qty and quote",
                )));
            }
        };
        let status = EntryStatus::from_name(&self.status)
            .ok_or_else(|| corrupt(what(&format!("status '{}'", self.status))))?;
        let reason = || {
            self.protection_reason
                .clone()
                .ok_or_else(|| corrupt(what("protection without its reason")))
        };
        let protection = match self.protection.as_str() {
            "not_needed" => Protection::NotNeeded,
            "unprotected" => Protection::Unprotected,
            "closed" => Protection::Closed,
            "protected" => {
                let at = self
                    .protected_at
                    .ok_or_else(|| corrupt(what("protected without protected_at")))?;
                let by = self.protected_by.as_deref().and_then(Source::from_name);
                Protection::Protected {
                    at: millis(at, &what("protected_at"))?,
                    by: by.ok_or_else(|| corrupt(what("protected_by")))?,
                }
            }
            "unprotectable" => Protection::Unprotectable { reason: reason()? },
            "exited" => Protection::Exited { reason: reason()? },
            other => return Err(corrupt(what(&format!("protection '{other}'")))),
        };
        let meta_what = what("");
        let levels = EntryLevels {
            tp1: metadata_price(&self.metadata, "tp1", &meta_what)?,
            tp2: metadata_price(&self.metadata, "tp2", &meta_what)?,
            sl: metadata_price(&self.metadata, "sl", &meta_what)?,
        };
        let tags = EntryTags {
            signal_id: metadata_str(&self.metadata, "finalSignalId", &meta_what)?,
            portfolio_id: metadata_str(&self.metadata, "portfolioId", &meta_what)?,
        };
        Ok(Entry {
            id: EntryId(self.id),
            account: AccountId(self.account_id),
            symbol: Symbol {
                name: self.symbol.clone(),
                base: Asset(self.base_asset.clone()),
                quote: Asset(self.quote_asset.clone()),
            },
            client_id: ClientOrderId::new(self.client_order_id.clone())
                .map_err(|e| corrupt(what(&format!("client order id: {e}"))))?,
            order_id: self.exchange_order_id,
            kind,
            size,
            status,
            executed_qty: read_qty(&self.executed_qty, &what("executed_qty"))?,
            cumulative_quote: read_decimal(&self.cumulative_quote, &what("cumulative_quote"))?,
            base_commission: read_qty(&self.base_commission, &what("base_commission"))?,
            fees: read_fees(&self.fees, &what("fees")),
            fills_qty: read_qty(&self.fills_qty, &what("fills_qty"))?,
            levels,
            tags,
            filled_at: self
                .filled_at
                .map(|t| millis(t, &what("filled_at")))
                .transpose()?,
            protection,
            realized_quote: self
                .realized_quote
                .as_ref()
                .map(|q| read_decimal(q, &what("realized_quote")))
                .transpose()?,
            fees_complete: self.fees_complete,
            created_at: millis(self.created_at, &what("created_at"))?,
        })
    }
}

/// A `fills` row.
#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = fills, check_for_backend(diesel::pg::Pg))]
pub(crate) struct FillRow {
    pub account_id: i64,
    pub symbol: String,
    pub trade_id: i64,
    pub entry_id: i64,
    pub price: PgNumeric,
    pub qty: PgNumeric,
    pub commission: PgNumeric,
    pub commission_asset: String,
    pub traded_at: PgTimestamp,
}

impl FillRow {
    pub(crate) fn from_fill(entry: &Entry, f: &oco_core::Fill) -> Result<FillRow, StoreError> {
        Ok(FillRow {
            account_id: entry.account.0,
            symbol: entry.symbol.name.clone(),
            trade_id: f.trade_id,
            entry_id: entry.id.0,
            price: numeric(f.price.get()),
            qty: numeric(f.qty.get()),
            commission: numeric(f.commission),
            commission_asset: f.commission_asset.0.clone(),
            traded_at: timestamp(f.time)?,
        })
    }

    pub(crate) fn into_fill(self) -> Result<oco_core::Fill, StoreError> {
        let what = |col: &str| format!("fill {}/{} {col}", self.symbol, self.trade_id);
        Ok(oco_core::Fill {
            trade_id: self.trade_id,
            price: read_price(&self.price, &what("price"))?,
            qty: read_qty(&self.qty, &what("qty"))?,
            commission: read_decimal(&self.commission, &what("commission"))?,
            commission_asset: Asset(self.commission_asset.clone()),
            time: millis(self.traded_at, &what("traded_at"))?,
        })
    }
}

/// A `leg_trades` row: one trade of a leg's order.
#[derive(Insertable)]
#[diesel(table_name = leg_trades)]
pub(crate) struct LegTradeRow {
    pub account_id: i64,
    pub symbol: String,
    pub trade_id: i64,
    pub entry_id: i64,
    pub leg: i16,
    pub generation: i32,
    pub side: &'static str,
    pub price: PgNumeric,
    pub qty: PgNumeric,
    pub commission: PgNumeric,
    pub commission_asset: String,
    pub traded_at: PgTimestamp,
}

impl LegTradeRow {
    pub(crate) fn new(
        account: AccountId,
        symbol: &str,
        key: LegKey,
        side: SaleSide,
        f: &oco_core::Fill,
    ) -> Result<LegTradeRow, StoreError> {
        let (entry_id, leg, generation) = leg_key_columns(key);
        Ok(LegTradeRow {
            account_id: account.0,
            symbol: symbol.to_owned(),
            trade_id: f.trade_id,
            entry_id,
            leg,
            generation,
            side: side.name(),
            price: numeric(f.price.get()),
            qty: numeric(f.qty.get()),
            commission: numeric(f.commission),
            commission_asset: f.commission_asset.0.clone(),
            traded_at: timestamp(f.time)?,
        })
    }
}

/// Commissions by asset as stored: a JSONB object of decimal strings.
pub(crate) fn fees_json(fees: &Fees) -> Value {
    Value::Object(
        fees.iter()
            .map(|(asset, amount)| (asset.0.clone(), Value::String(amount.to_string())))
            .collect(),
    )
}

/// Commissions by asset as stored. Leniently: they only ever enter the
/// realised result, so a part that cannot be read is left out with a
/// warning, never made an error that would fail the entry's protection.
fn read_fees(value: &Value, what: &str) -> Fees {
    let Value::Object(map) = value else {
        tracing::warn!(what, %value, "commissions not an object: left out of the result");
        return Fees::default();
    };
    map.iter()
        .filter_map(|(asset, amount)| {
            let parsed = amount
                .as_str()
                .and_then(|s| s.parse::<rust_decimal::Decimal>().ok());
            if parsed.is_none() {
                tracing::warn!(what, asset = %asset, %amount, "commission not a decimal string: left out of the result");
            }
            parsed.map(|a| (Asset(asset.clone()), a))
        })
        .collect()
}

/// An `entry_events` row.
#[derive(Queryable, Selectable)]
#[diesel(table_name = entry_events, check_for_backend(diesel::pg::Pg))]
pub(crate) struct EventRow {
    pub entry_id: i64,
    pub kind: String,
    pub detail: String,
    pub source: Option<String>,
    pub at: PgTimestamp,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<EntryEventRecord, StoreError> {
        let source = match &self.source {
            None => None,
            Some(s) => Some(Source::from_name(s).ok_or_else(|| {
                corrupt(format!("event of entry {} source '{s}'", self.entry_id))
            })?),
        };
        Ok(EntryEventRecord {
            entry: EntryId(self.entry_id),
            kind: self.kind,
            detail: self.detail,
            source,
            at: millis(self.at, "event time")?,
        })
    }
}

/// A `protection_legs` row.
#[derive(Queryable, Selectable)]
#[diesel(table_name = protection_legs, check_for_backend(diesel::pg::Pg))]
pub(crate) struct LegRow {
    pub entry_id: i64,
    pub leg: i16,
    pub generation: i32,
    pub list_client_id: String,
    pub take_profit_client_id: String,
    pub stop_loss_client_id: String,
    pub order_list_id: Option<i64>,
    pub symbol: String,
    pub qty: PgNumeric,
    pub take_profit_price: PgNumeric,
    pub stop_price: PgNumeric,
    pub stop_limit_price: Option<PgNumeric>,
    pub state: String,
    pub not_placed_code: Option<i32>,
    pub state_reason: Option<String>,
    pub external_end: Option<String>,
    pub sold_take_profit: PgNumeric,
    pub sold_take_profit_quote: PgNumeric,
    pub sold_stop_loss: PgNumeric,
    pub sold_stop_loss_quote: PgNumeric,
    pub source: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub claimed_at: PgTimestamp,
    pub updated_at: PgTimestamp,
    pub traded_take_profit: PgNumeric,
    pub traded_stop_loss: PgNumeric,
    pub fees: Value,
}

/// A new `protection_legs` row (a claim).
#[derive(Insertable)]
#[diesel(table_name = protection_legs)]
pub(crate) struct NewLegRow {
    pub entry_id: i64,
    pub leg: i16,
    pub generation: i32,
    pub list_client_id: String,
    pub take_profit_client_id: String,
    pub stop_loss_client_id: String,
    pub symbol: String,
    pub qty: PgNumeric,
    pub take_profit_price: PgNumeric,
    pub stop_price: PgNumeric,
    pub stop_limit_price: Option<PgNumeric>,
    pub state: &'static str,
    pub source: &'static str,
    pub attempts: i32,
    pub claimed_at: PgTimestamp,
    pub updated_at: PgTimestamp,
}

/// The columns one leg update writes. `order_list_id` is written only when
/// placed and kept afterwards (history); `last_error` only when given.
#[derive(AsChangeset)]
#[diesel(table_name = protection_legs)]
pub(crate) struct LegUpdateColumns {
    pub state: &'static str,
    pub order_list_id: Option<i64>,
    pub not_placed_code: Option<Option<i32>>,
    pub state_reason: Option<Option<String>>,
    pub external_end: Option<Option<&'static str>>,
    pub last_error: Option<String>,
    pub updated_at: PgTimestamp,
}

impl LegUpdateColumns {
    pub(crate) fn new(s: &LegState, error: Option<String>, at: PgTimestamp) -> LegUpdateColumns {
        let mut c = LegUpdateColumns {
            state: s.name(),
            order_list_id: None,
            not_placed_code: Some(None),
            state_reason: Some(None),
            external_end: Some(None),
            last_error: error,
            updated_at: at,
        };
        match s {
            LegState::Placed { list_id } => c.order_list_id = Some(*list_id),
            LegState::NotPlaced { code, reason } => {
                c.not_placed_code = Some(*code);
                c.state_reason = Some(Some(reason.clone()));
            }
            LegState::Unprotectable { reason } => c.state_reason = Some(Some(reason.clone())),
            LegState::CanceledExternally { why } => c.external_end = Some(Some(why.name())),
            LegState::Claimed
            | LegState::Unknown
            | LegState::TakeProfitFilled
            | LegState::StopLossFilled
            | LegState::Replaced => {}
        }
        c
    }
}

/// The leg's key as stored (leg number, generation).
pub(crate) fn leg_key_columns(key: LegKey) -> (i64, i16, i32) {
    (
        key.entry.0,
        i16::from(key.leg.number()),
        // Generations are bounded by the id layout (≤ 99 999).
        i32::try_from(key.generation).unwrap_or(i32::MAX),
    )
}

impl LegRow {
    pub(crate) fn into_leg(self) -> Result<oco_core::Leg, StoreError> {
        let leg = u8::try_from(self.leg).ok().and_then(LegIndex::from_number);
        let key = LegKey {
            entry: EntryId(self.entry_id),
            leg: leg.ok_or_else(|| {
                corrupt(format!(
                    "leg of entry {}: number {}",
                    self.entry_id, self.leg
                ))
            })?,
            generation: u32::try_from(self.generation).map_err(|_| {
                corrupt(format!(
                    "leg of entry {}: generation {}",
                    self.entry_id, self.generation
                ))
            })?,
        };
        let what = |col: &str| format!("leg {key} {col}");
        let reason = || {
            self.state_reason
                .clone()
                .ok_or_else(|| corrupt(what("state without its reason")))
        };
        let state = match self.state.as_str() {
            "claimed" => LegState::Claimed,
            "placed" => LegState::Placed {
                list_id: self
                    .order_list_id
                    .ok_or_else(|| corrupt(what("placed without order_list_id")))?,
            },
            "unknown" => LegState::Unknown,
            "take_profit_filled" => LegState::TakeProfitFilled,
            "stop_loss_filled" => LegState::StopLossFilled,
            "canceled_externally" => LegState::CanceledExternally {
                why: self
                    .external_end
                    .as_deref()
                    .and_then(ExternalEnd::from_name)
                    .ok_or_else(|| corrupt(what("external_end")))?,
            },
            "replaced" => LegState::Replaced,
            "not_placed" => LegState::NotPlaced {
                code: self.not_placed_code,
                reason: reason()?,
            },
            "unprotectable" => LegState::Unprotectable { reason: reason()? },
            other => return Err(corrupt(what(&format!("state '{other}'")))),
        };
        let client_id = |s: &str, col: &str| {
            ClientOrderId::new(s).map_err(|e| corrupt(what(&format!("{col}: {e}"))))
        };
        Ok(oco_core::Leg {
            key,
            ids: OcoClientIds {
                list: client_id(&self.list_client_id, "list_client_id")?,
                take_profit: client_id(&self.take_profit_client_id, "take_profit_client_id")?,
                stop_loss: client_id(&self.stop_loss_client_id, "stop_loss_client_id")?,
            },
            symbol: self.symbol.clone(),
            qty: read_qty(&self.qty, &what("qty"))?,
            take_profit: read_price(&self.take_profit_price, &what("take_profit_price"))?,
            stop: read_price(&self.stop_price, &what("stop_price"))?,
            stop_limit: read_opt_price(self.stop_limit_price.as_ref(), &what("stop_limit_price"))?,
            state,
            sold: LegSold {
                take_profit: read_qty(&self.sold_take_profit, &what("sold_take_profit"))?,
                take_profit_quote: read_decimal(
                    &self.sold_take_profit_quote,
                    &what("sold_take_profit_quote"),
                )?,
                stop_loss: read_qty(&self.sold_stop_loss, &what("sold_stop_loss"))?,
                stop_loss_quote: read_decimal(
                    &self.sold_stop_loss_quote,
                    &what("sold_stop_loss_quote"),
                )?,
            },
            trades: LegTrades {
                take_profit_qty: read_qty(&self.traded_take_profit, &what("traded_take_profit"))?,
                stop_loss_qty: read_qty(&self.traded_stop_loss, &what("traded_stop_loss"))?,
                fees: read_fees(&self.fees, &what("fees")),
            },
            source: Source::from_name(&self.source)
                .ok_or_else(|| corrupt(what(&format!("source '{}'", self.source))))?,
            attempts: u32::try_from(self.attempts).map_err(|_| corrupt(what("attempts")))?,
            last_error: self.last_error.clone(),
            claimed_at: millis(self.claimed_at, &what("claimed_at"))?,
            updated_at: millis(self.updated_at, &what("updated_at"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commissions_that_cannot_be_read_are_left_out_not_an_error() {
        let fees = read_fees(
            &serde_json::json!({"BNB": "0.25", "USDT": 5, "BTC": "x"}),
            "entry 1 fees",
        );
        assert_eq!(
            fees.of(&Asset("BNB".into())),
            rust_decimal::Decimal::new(25, 2)
        );
        assert_eq!(fees.iter().count(), 1, "only the readable part");
        assert!(read_fees(&serde_json::json!([1, 2]), "entry 1 fees").is_empty());
    }
}
