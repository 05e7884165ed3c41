//! In-memory exchange state: accounts, orders, order lists, trades, matching against a
//! per-symbol last price, and the user-data events each change produces.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rust_decimal::{Decimal, RoundingStrategy};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{AccountSpec, Commission, CommissionAsset};
use crate::error::ApiError;
use crate::symbols::SymbolInfo;
use crate::util::{floor_to, gen_client_id};
use crate::views::*;

/// Expiry reason of an OCO leg removed because its sibling started working.
pub(crate) const OCO_TRIGGER: &str = "OCO_TRIGGER";
/// Expiry reason of the stop expired by the fault switch.
pub(crate) const PRICE_RANGE: &str = "EXECUTION_RULE_PRICE_RANGE_EXCEEDED";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "BUY" => Some(Self::Buy),
            "SELL" => Some(Self::Sell),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buy => "BUY",
            Self::Sell => "SELL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OType {
    Market,
    Limit,
    LimitMaker,
    StopLoss,
    StopLossLimit,
    TakeProfit,
    TakeProfitLimit,
}

impl OType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "MARKET" => Self::Market,
            "LIMIT" => Self::Limit,
            "LIMIT_MAKER" => Self::LimitMaker,
            "STOP_LOSS" => Self::StopLoss,
            "STOP_LOSS_LIMIT" => Self::StopLossLimit,
            "TAKE_PROFIT" => Self::TakeProfit,
            "TAKE_PROFIT_LIMIT" => Self::TakeProfitLimit,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Market => "MARKET",
            Self::Limit => "LIMIT",
            Self::LimitMaker => "LIMIT_MAKER",
            Self::StopLoss => "STOP_LOSS",
            Self::StopLossLimit => "STOP_LOSS_LIMIT",
            Self::TakeProfit => "TAKE_PROFIT",
            Self::TakeProfitLimit => "TAKE_PROFIT_LIMIT",
        }
    }
    /// Counted by `MAX_NUM_ALGO_ORDERS`.
    pub fn is_algo(self) -> bool {
        self.is_stop() || self.is_tp()
    }
    pub fn is_stop(self) -> bool {
        matches!(self, Self::StopLoss | Self::StopLossLimit)
    }
    pub fn is_tp(self) -> bool {
        matches!(self, Self::TakeProfit | Self::TakeProfitLimit)
    }
    /// Carries a limit `price`.
    pub fn has_price(self) -> bool {
        matches!(
            self,
            Self::Limit | Self::LimitMaker | Self::StopLossLimit | Self::TakeProfitLimit
        )
    }
    pub fn needs_tif(self) -> bool {
        matches!(
            self,
            Self::Limit | Self::StopLossLimit | Self::TakeProfitLimit
        )
    }
    /// Binance's refusal of the type on a symbol whose `orderTypes` lacks it
    /// (errors.md). No message is documented for LIMIT and LIMIT_MAKER, which
    /// every symbol here allows.
    pub fn unsupported(self) -> &'static str {
        match self {
            Self::Market => "Market orders are not supported for this symbol.",
            Self::StopLoss => "Stop loss orders are not supported for this symbol.",
            Self::StopLossLimit => "Stop loss limit orders are not supported for this symbol.",
            Self::TakeProfit => "Take profit orders are not supported for this symbol.",
            Self::TakeProfitLimit => "Take profit limit orders are not supported for this symbol.",
            Self::Limit | Self::LimitMaker => "Unsupported order combination",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tif {
    Gtc,
    Ioc,
    Fok,
}

impl Tif {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "GTC" => Some(Self::Gtc),
            "IOC" => Some(Self::Ioc),
            "FOK" => Some(Self::Fok),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gtc => "GTC",
            Self::Ioc => "IOC",
            Self::Fok => "FOK",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    New,
    PartiallyFilled,
    Filled,
    Canceled,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::PartiallyFilled => "PARTIALLY_FILLED",
            Self::Filled => "FILLED",
            Self::Canceled => "CANCELED",
            Self::Expired => "EXPIRED",
        }
    }
    pub fn is_open(self) -> bool {
        matches!(self, Self::New | Self::PartiallyFilled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RespType {
    Ack,
    Result,
    Full,
}

impl RespType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ACK" => Some(Self::Ack),
            "RESULT" => Some(Self::Result),
            "FULL" => Some(Self::Full),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Order {
    pub id: u64,
    pub symbol: String,
    pub account: String,
    pub list_id: i64,
    pub cid: String,
    pub side: Side,
    pub otype: OType,
    pub tif: Tif,
    pub price: Decimal,
    pub qty: Decimal,
    pub quote_qty: Decimal,
    pub stop: Decimal,
    pub executed: Decimal,
    pub cum_quote: Decimal,
    pub status: Status,
    pub time_us: u64,
    /// When the lookups Binance serves from its database first see it.
    pub stored_us: u64,
    pub update_us: u64,
    pub working_us: Option<u64>,
    pub triggered: bool,
    pub lock: Decimal,
    pub lock_asset: String,
    pub expiry: Option<&'static str>,
}

impl Order {
    pub fn working_ms(&self) -> i64 {
        self.working_us
            .map(|w| i64::try_from(w / 1000).unwrap_or(i64::MAX))
            .unwrap_or(-1)
    }
    fn stop_opt(&self) -> Option<String> {
        self.otype.is_algo().then(|| crate::util::fmt8(self.stop))
    }
    pub fn is_open(&self) -> bool {
        self.status.is_open()
    }
    pub fn result_view(&self, transact_ms: u64, fills: Option<Vec<FillView>>) -> ResultView {
        ResultView {
            symbol: self.symbol.clone(),
            order_id: self.id,
            order_list_id: self.list_id,
            client_order_id: self.cid.clone(),
            transact_time: transact_ms,
            price: self.price,
            orig_qty: self.qty,
            executed_qty: self.executed,
            orig_quote_order_qty: self.quote_qty,
            cummulative_quote_qty: self.cum_quote,
            status: self.status.as_str(),
            time_in_force: self.tif.as_str(),
            order_type: self.otype.as_str(),
            side: self.side.as_str(),
            stop_price: self.stop_opt(),
            working_time: self.working_ms(),
            iceberg_qty: None,
            fills,
            self_trade_prevention_mode: "NONE",
            expiry_reason: self.expiry,
        }
    }
    pub fn ack_view(&self, transact_ms: u64) -> AckView {
        AckView {
            symbol: self.symbol.clone(),
            order_id: self.id,
            order_list_id: self.list_id,
            client_order_id: self.cid.clone(),
            transact_time: transact_ms,
        }
    }
    pub fn cancel_view(&self, cancel_cid: &str, transact_ms: u64) -> CancelView {
        CancelView {
            symbol: self.symbol.clone(),
            orig_client_order_id: self.cid.clone(),
            order_id: self.id,
            order_list_id: self.list_id,
            client_order_id: cancel_cid.to_string(),
            transact_time: transact_ms,
            price: self.price,
            orig_qty: self.qty,
            executed_qty: self.executed,
            orig_quote_order_qty: self.quote_qty,
            cummulative_quote_qty: self.cum_quote,
            status: self.status.as_str(),
            time_in_force: self.tif.as_str(),
            order_type: self.otype.as_str(),
            side: self.side.as_str(),
            stop_price: self.stop_opt(),
            iceberg_qty: None,
            self_trade_prevention_mode: "NONE",
        }
    }
    fn is_working(&self) -> bool {
        self.is_open() && self.working_us.is_some()
    }
    pub fn query_view(&self) -> QueryView {
        QueryView {
            symbol: self.symbol.clone(),
            order_id: self.id,
            order_list_id: self.list_id,
            client_order_id: self.cid.clone(),
            price: self.price,
            orig_qty: self.qty,
            executed_qty: self.executed,
            cummulative_quote_qty: self.cum_quote,
            status: self.status.as_str(),
            time_in_force: self.tif.as_str(),
            order_type: self.otype.as_str(),
            side: self.side.as_str(),
            stop_price: self.stop,
            iceberg_qty: Decimal::ZERO,
            time: self.time_us / 1000,
            update_time: self.update_us / 1000,
            is_working: self.is_working(),
            working_time: self.working_ms(),
            orig_quote_order_qty: self.quote_qty,
            self_trade_prevention_mode: "NONE",
            expiry_reason: self.expiry,
        }
    }
    pub fn open_view(&self) -> OpenOrderView {
        OpenOrderView {
            symbol: self.symbol.clone(),
            order_id: self.id,
            order_list_id: self.list_id,
            client_order_id: self.cid.clone(),
            price: self.price,
            orig_qty: self.qty,
            executed_qty: self.executed,
            cummulative_quote_qty: self.cum_quote,
            status: self.status.as_str(),
            time_in_force: self.tif.as_str(),
            order_type: self.otype.as_str(),
            side: self.side.as_str(),
            stop_price: self.stop,
            iceberg_qty: Decimal::ZERO,
            time: self.time_us / 1000,
            update_time: self.update_us / 1000,
            is_working: self.is_working(),
            orig_quote_order_qty: self.quote_qty,
            working_time: self.working_ms(),
            self_trade_prevention_mode: "NONE",
            expiry_reason: self.expiry,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct OrderList {
    pub id: i64,
    pub symbol: String,
    pub account: String,
    pub cid: String,
    pub done: bool,
    pub legs: Vec<u64>,
    pub time_us: u64,
    /// When the lookups Binance serves from its database first see it.
    pub stored_us: u64,
    pub update_us: u64,
    pub lock: Decimal,
    pub lock_asset: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Trade {
    pub id: u64,
    pub symbol: String,
    pub account: String,
    pub order_id: u64,
    pub list_id: i64,
    pub price: Decimal,
    pub qty: Decimal,
    pub quote_qty: Decimal,
    pub commission: Decimal,
    pub commission_asset: String,
    pub time_us: u64,
    pub is_buyer: bool,
    pub is_maker: bool,
}

impl Trade {
    pub fn view(&self) -> TradeView {
        TradeView {
            symbol: self.symbol.clone(),
            id: self.id,
            order_id: self.order_id,
            order_list_id: self.list_id,
            price: self.price,
            qty: self.qty,
            quote_qty: self.quote_qty,
            commission: self.commission,
            commission_asset: self.commission_asset.clone(),
            time: self.time_us / 1000,
            is_buyer: self.is_buyer,
            is_maker: self.is_maker,
            is_best_match: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Balance {
    pub free: Decimal,
    pub locked: Decimal,
}

#[derive(Debug)]
pub(crate) struct Account {
    pub secret: String,
    pub balances: BTreeMap<String, Balance>,
    pub commission: Commission,
    pub revoked: bool,
    pub update_us: u64,
    pub uid: u64,
    pub orders: Vec<u64>,
    pub lists: Vec<i64>,
    pub trades: Vec<usize>,
    pub open_cids: HashMap<String, u64>,
    pub open_list_cids: HashMap<String, i64>,
    pub cid_latest: HashMap<(String, String), u64>,
    pub list_cid_latest: HashMap<String, i64>,
}

/// A message to one WebSocket API connection.
#[derive(Debug, Clone)]
pub(crate) enum ConnMsg {
    /// A ready-to-send text frame (an enveloped event) of subscription `.0`.
    Event(u64, String),
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Send `serverShutdown`, then close.
    Shutdown,
    /// Send the `-2015` revocation error, then close.
    Revoke,
    /// End one subscription with `eventStreamTerminated`.
    Terminate(u64),
}

#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub conn_id: u64,
    pub sub_id: u64,
    pub tx: UnboundedSender<ConnMsg>,
}

#[derive(Debug, Default)]
pub(crate) struct Knobs {
    pub expire_next_stops: u32,
    pub fill_parts: HashMap<String, u32>,
    pub partial_next: HashMap<String, Decimal>,
    /// How long (µs) a placement stays out of the lookups Binance serves
    /// from its database: every account's, unless it has its own below.
    pub lookup_lag_us: u64,
    pub lookup_lag_us_of: HashMap<String, u64>,
}

#[derive(Debug)]
pub(crate) struct SymState {
    pub info: SymbolInfo,
    pub price: Decimal,
    pub next_trade_id: u64,
    pub open: BTreeSet<u64>,
    /// Open orders by the price at which a move acts on them (fills a limit,
    /// triggers a stop): those acting when the price is at or below their
    /// key, and those acting at or above it. A price move looks at these
    /// alone instead of every open order of the symbol.
    watch_down: BTreeSet<(Decimal, u64)>,
    watch_up: BTreeSet<(Decimal, u64)>,
    /// Each watched order's entry in one of the two.
    watched: HashMap<u64, Watch>,
}

/// Where a price move acts on an order: at or below (`down`) or at or above
/// the price.
#[derive(Debug, Clone, Copy)]
struct Watch {
    down: bool,
    price: Decimal,
}

impl SymState {
    fn new(info: SymbolInfo) -> Self {
        SymState {
            price: info.start_price,
            info,
            next_trade_id: 1,
            open: BTreeSet::new(),
            watch_down: BTreeSet::new(),
            watch_up: BTreeSet::new(),
            watched: HashMap::new(),
        }
    }

    /// Order `id` is open, watched at `watch` (if any price acts on it).
    fn opened(&mut self, id: u64, watch: Option<Watch>) {
        self.open.insert(id);
        self.rewatch(id, watch);
    }

    /// Order `id` reached a final status.
    fn closed(&mut self, id: u64) {
        self.open.remove(&id);
        self.rewatch(id, None);
    }

    /// Order `id` is now watched at `watch` (a triggered stop becomes a limit).
    fn rewatch(&mut self, id: u64, watch: Option<Watch>) {
        if let Some(old) = self.watched.remove(&id) {
            let set = if old.down {
                &mut self.watch_down
            } else {
                &mut self.watch_up
            };
            set.remove(&(old.price, id));
        }
        if let Some(new) = watch {
            let set = if new.down {
                &mut self.watch_down
            } else {
                &mut self.watch_up
            };
            set.insert((new.price, id));
            self.watched.insert(id, new);
        }
    }

    /// The open orders a price of `p` may act on, by id (the order in which
    /// a move handles them).
    fn acted_on_at(&self, p: Decimal) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .watch_down
            .range((p, 0)..)
            .chain(self.watch_up.range(..=(p, u64::MAX)))
            .map(|(_, id)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// A parsed, filter-checked single order.
#[derive(Debug, Clone)]
pub(crate) struct NewOrder {
    pub symbol: String,
    pub side: Side,
    pub otype: OType,
    pub tif: Tif,
    pub qty: Option<Decimal>,
    pub quote_qty: Option<Decimal>,
    pub price: Decimal,
    pub stop: Decimal,
    pub cid: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct LegSpec {
    pub otype: OType,
    pub price: Decimal,
    pub stop: Decimal,
    pub tif: Tif,
    pub cid: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct NewOco {
    pub symbol: String,
    pub side: Side,
    pub qty: Decimal,
    pub list_cid: Option<String>,
    pub above: LegSpec,
    pub below: LegSpec,
}

enum Action {
    Trigger,
    Fill(Decimal),
}

/// The whole exchange state, guarded by one mutex in [`crate::Shared`].
#[derive(Debug)]
pub(crate) struct Engine {
    pub symbols: BTreeMap<String, SymState>,
    pub accounts: HashMap<String, Account>,
    pub orders: HashMap<u64, Order>,
    pub lists: HashMap<i64, OrderList>,
    pub trades: Vec<Trade>,
    pub knobs: Knobs,
    pub subs: HashMap<String, Vec<Subscriber>>,
    next_order_id: u64,
    next_list_id: i64,
    next_exec_id: u64,
    next_uid: u64,
    id_seed: u64,
    pending: Vec<(String, String)>,
    touched: Vec<(String, String)>,
}

fn round8(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(8, RoundingStrategy::MidpointAwayFromZero)
}

impl Engine {
    pub fn new(symbols: Vec<SymbolInfo>) -> Self {
        let symbols = symbols
            .into_iter()
            .map(|info| (info.symbol.clone(), SymState::new(info)))
            .collect();
        Self {
            symbols,
            accounts: HashMap::new(),
            orders: HashMap::new(),
            lists: HashMap::new(),
            trades: Vec::new(),
            knobs: Knobs::default(),
            subs: HashMap::new(),
            next_order_id: 1,
            next_list_id: 1,
            next_exec_id: 1,
            next_uid: 354_937_868,
            id_seed: crate::util::now_us(),
            pending: Vec::new(),
            touched: Vec::new(),
        }
    }

    fn new_cid(&mut self) -> String {
        self.id_seed = self.id_seed.wrapping_add(1);
        gen_client_id(self.id_seed)
    }

    /// Adds an account, or replaces secret, commission and balances of an existing one.
    pub fn upsert_account(&mut self, spec: &AccountSpec, now_us: u64) {
        let balances: BTreeMap<String, Balance> = spec
            .balances
            .iter()
            .map(|(a, v)| {
                (
                    a.clone(),
                    Balance {
                        free: *v,
                        locked: Decimal::ZERO,
                    },
                )
            })
            .collect();
        if let Some(acct) = self.accounts.get_mut(&spec.api_key) {
            acct.secret = spec.secret.clone();
            acct.commission = spec.commission.clone();
            for (asset, b) in balances {
                let e = acct.balances.entry(asset).or_default();
                e.free = b.free;
            }
            acct.update_us = now_us;
            acct.revoked = false;
            return;
        }
        self.next_uid += 1;
        self.accounts.insert(
            spec.api_key.clone(),
            Account {
                secret: spec.secret.clone(),
                balances,
                commission: spec.commission.clone(),
                revoked: false,
                update_us: now_us,
                uid: self.next_uid,
                orders: Vec::new(),
                lists: Vec::new(),
                trades: Vec::new(),
                open_cids: HashMap::new(),
                open_list_cids: HashMap::new(),
                cid_latest: HashMap::new(),
                list_cid_latest: HashMap::new(),
            },
        );
    }

    fn wants(&self, acct: &str) -> bool {
        self.subs.get(acct).is_some_and(|v| !v.is_empty())
    }

    fn push_event<T: serde::Serialize>(&mut self, acct: &str, ev: &T) {
        if let Ok(json) = serde_json::to_string(ev) {
            self.pending.push((acct.to_string(), json));
        }
    }

    fn touch(&mut self, acct: &str, asset: &str, now_us: u64) {
        if let Some(a) = self.accounts.get_mut(acct) {
            a.update_us = now_us;
        }
        if self.wants(acct) {
            self.touched.push((acct.to_string(), asset.to_string()));
        }
    }

    fn bal_mut(&mut self, acct: &str, asset: &str) -> Option<&mut Balance> {
        self.accounts
            .get_mut(acct)
            .map(|a| a.balances.entry(asset.to_string()).or_default())
    }

    /// Sends the events collected by the last operation, `outboundAccountPosition` last.
    pub fn flush(&mut self, now_us: u64) {
        if !self.touched.is_empty() {
            let touched = std::mem::take(&mut self.touched);
            let mut order: Vec<String> = Vec::new();
            let mut assets: HashMap<String, Vec<String>> = HashMap::new();
            for (acct, asset) in touched {
                let list = assets.entry(acct.clone()).or_insert_with(|| {
                    order.push(acct.clone());
                    Vec::new()
                });
                if !list.contains(&asset) {
                    list.push(asset);
                }
            }
            for acct in order {
                let Some(a) = self.accounts.get(&acct) else {
                    continue;
                };
                let balances = assets
                    .get(&acct)
                    .map(|v| {
                        v.iter()
                            .map(|asset| {
                                let b = a.balances.get(asset).copied().unwrap_or_default();
                                PositionBalance {
                                    a: asset.clone(),
                                    f: b.free,
                                    l: b.locked,
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let ev = PositionEvent {
                    e: "outboundAccountPosition",
                    event_time: now_us / 1000,
                    u: a.update_us / 1000,
                    balances,
                };
                self.push_event(&acct, &ev);
            }
        }
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        for (acct, json) in pending {
            if let Some(subs) = self.subs.get_mut(&acct) {
                subs.retain(|s| {
                    let msg = format!("{{\"subscriptionId\":{},\"event\":{}}}", s.sub_id, json);
                    s.tx.send(ConnMsg::Event(s.sub_id, msg)).is_ok()
                });
            }
        }
    }

    fn exec_report(
        &mut self,
        oid: u64,
        exec_type: &'static str,
        fill: Option<(&FillView, bool)>,
        cancel_cid: Option<&str>,
        now_us: u64,
    ) {
        let Some(o) = self.orders.get(&oid) else {
            return;
        };
        if !self.wants(&o.account) {
            return;
        }
        self.next_exec_id += 1;
        let (c, orig) = match cancel_cid {
            Some(cc) => (cc.to_string(), o.cid.clone()),
            None => (o.cid.clone(), String::new()),
        };
        let (l, lp, n, na, t, maker) = match fill {
            Some((f, maker)) => (
                f.qty,
                f.price,
                crate::util::fmt8(f.commission),
                Some(f.commission_asset.clone()),
                i64::try_from(f.trade_id).unwrap_or(-1),
                maker,
            ),
            None => (
                Decimal::ZERO,
                Decimal::ZERO,
                "0".to_string(),
                None,
                -1,
                false,
            ),
        };
        let now_ms = now_us / 1000;
        let ev = ExecReport {
            e: "executionReport",
            event_time: now_ms,
            symbol: o.symbol.clone(),
            client_order_id: c,
            side: o.side.as_str(),
            order_type: o.otype.as_str(),
            tif: o.tif.as_str(),
            qty: o.qty,
            price: o.price,
            stop_price: o.stop,
            iceberg_qty: Decimal::ZERO,
            order_list_id: o.list_id,
            orig_client_order_id: orig,
            exec_type,
            status: o.status.as_str(),
            reject_reason: "NONE",
            order_id: o.id,
            last_qty: l,
            cum_qty: o.executed,
            last_price: lp,
            commission: n,
            commission_asset: na,
            transact_time: now_ms,
            trade_id: t,
            exec_id: self.next_exec_id,
            on_book: o.is_working(),
            maker,
            ignore: fill.is_some(),
            created: o.time_us / 1000,
            cum_quote: o.cum_quote,
            last_quote: round8(l * lp),
            quote_order_qty: o.quote_qty,
            working_time: o.working_us.map(|w| w / 1000),
            stp: "NONE",
            expiry_reason: o.expiry,
        };
        let acct = o.account.clone();
        self.push_event(&acct, &ev);
    }

    fn list_status(&mut self, list_id: i64, now_us: u64) {
        let Some(l) = self.lists.get(&list_id) else {
            return;
        };
        if !self.wants(&l.account) {
            return;
        }
        let orders = l
            .legs
            .iter()
            .filter_map(|id| self.orders.get(id))
            .map(|o| ListOrderEventRef {
                s: o.symbol.clone(),
                i: o.id,
                c: o.cid.clone(),
            })
            .collect();
        let (lst, los) = if l.done {
            ("ALL_DONE", "ALL_DONE")
        } else {
            ("EXEC_STARTED", "EXECUTING")
        };
        let ev = ListStatusEvent {
            e: "listStatus",
            event_time: now_us / 1000,
            s: l.symbol.clone(),
            g: l.id,
            c: "OCO",
            l: lst,
            list_order_status: los,
            r: "NONE",
            list_client_order_id: l.cid.clone(),
            transact_time: now_us / 1000,
            orders,
        };
        let acct = l.account.clone();
        self.push_event(&acct, &ev);
    }

    pub fn list_view(
        &self,
        l: &OrderList,
        reports: Option<Vec<ReportView>>,
        transact_ms: u64,
    ) -> ListView {
        let (lst, los) = if l.done {
            ("ALL_DONE", "ALL_DONE")
        } else {
            ("EXEC_STARTED", "EXECUTING")
        };
        ListView {
            order_list_id: l.id,
            contingency_type: "OCO",
            list_status_type: lst,
            list_order_status: los,
            list_client_order_id: l.cid.clone(),
            transaction_time: transact_ms,
            symbol: l.symbol.clone(),
            orders: l
                .legs
                .iter()
                .filter_map(|id| self.orders.get(id))
                .map(|o| ListOrderRef {
                    symbol: o.symbol.clone(),
                    order_id: o.id,
                    client_order_id: o.cid.clone(),
                })
                .collect(),
            order_reports: reports,
        }
    }

    pub fn price(&self, symbol: &str) -> Option<Decimal> {
        self.symbols.get(symbol).map(|s| s.price)
    }

    fn open_counts(&self, acct: &Account, symbol: &str) -> (usize, usize, usize) {
        let mut orders = 0;
        let mut algo = 0;
        for oid in acct.open_cids.values() {
            if let Some(o) = self.orders.get(oid)
                && o.symbol == symbol
                && o.is_open()
            {
                orders += 1;
                if o.otype.is_algo() && !o.triggered {
                    algo += 1;
                }
            }
        }
        let lists = acct
            .open_list_cids
            .values()
            .filter(|id| self.lists.get(id).is_some_and(|l| l.symbol == symbol))
            .count();
        (orders, algo, lists)
    }

    fn triggers(o: &Order, p: Decimal) -> bool {
        match (o.otype.is_stop(), o.side) {
            (true, Side::Sell) => p <= o.stop,
            (true, Side::Buy) => p >= o.stop,
            (false, Side::Sell) => p >= o.stop,
            (false, Side::Buy) => p <= o.stop,
        }
    }

    fn marketable(side: Side, p: Decimal, limit: Decimal) -> bool {
        match side {
            Side::Buy => p <= limit,
            Side::Sell => p >= limit,
        }
    }

    fn check_free(&self, acct: &str, asset: &str, amount: Decimal) -> Result<(), ApiError> {
        let free = self
            .accounts
            .get(acct)
            .and_then(|a| a.balances.get(asset))
            .map(|b| b.free)
            .unwrap_or_default();
        if free < amount {
            return Err(ApiError::insufficient());
        }
        Ok(())
    }

    fn lock(&mut self, acct: &str, asset: &str, amount: Decimal, now_us: u64) {
        if let Some(b) = self.bal_mut(acct, asset) {
            b.free -= amount;
            b.locked += amount;
        }
        self.touch(acct, asset, now_us);
    }

    /// Places a single order. Returns its id and the fills made at placement.
    pub fn place(
        &mut self,
        acct_key: &str,
        req: NewOrder,
        now_us: u64,
    ) -> Result<(u64, Vec<FillView>), ApiError> {
        let sym = self
            .symbols
            .get(&req.symbol)
            .ok_or_else(ApiError::bad_symbol)?;
        let p = sym.price;
        let info = sym.info.clone();
        if !self.accounts.contains_key(acct_key) {
            return Err(ApiError::bad_key());
        }
        let cid = match req.cid.clone() {
            Some(c) => c,
            None => self.new_cid(),
        };
        let acct = self.accounts.get(acct_key).ok_or_else(ApiError::bad_key)?;
        if acct.open_cids.contains_key(&cid) {
            return Err(ApiError::dup());
        }
        let (n_orders, n_algo, _) = self.open_counts(acct, &req.symbol);
        if n_orders + 1 > info.max_num_orders {
            return Err(ApiError::rejected("Filter failure: MAX_NUM_ORDERS"));
        }
        if req.otype.is_algo() && n_algo + 1 > info.max_num_algo_orders {
            return Err(ApiError::rejected("Filter failure: MAX_NUM_ALGO_ORDERS"));
        }
        let _ = acct;
        let mut qty = req.qty.unwrap_or_default();
        if req.otype == OType::Market && req.qty.is_none() {
            let quote = req.quote_qty.unwrap_or_default();
            qty = if p.is_zero() {
                Decimal::ZERO
            } else {
                floor_to(quote / p, info.step)
            };
            if qty < info.min_qty || qty.is_zero() {
                return Err(ApiError::filter("LOT_SIZE"));
            }
        }
        let probe = Order {
            id: 0,
            symbol: req.symbol.clone(),
            account: acct_key.to_string(),
            list_id: -1,
            cid: cid.clone(),
            side: req.side,
            otype: req.otype,
            tif: req.tif,
            price: req.price,
            qty,
            quote_qty: req.quote_qty.unwrap_or_default(),
            stop: req.stop,
            executed: Decimal::ZERO,
            cum_quote: Decimal::ZERO,
            status: Status::New,
            time_us: now_us,
            stored_us: self.stored_at(acct_key, now_us),
            update_us: now_us,
            working_us: if req.otype.is_algo() {
                None
            } else {
                Some(now_us)
            },
            triggered: false,
            lock: Decimal::ZERO,
            lock_asset: String::new(),
            expiry: None,
        };
        if req.otype == OType::LimitMaker && Self::marketable(req.side, p, req.price) {
            return Err(ApiError::rejected(
                "Order would immediately match and take.",
            ));
        }
        if req.otype.is_algo() && Self::triggers(&probe, p) {
            return Err(ApiError::rejected("Order would trigger immediately."));
        }
        let (lock_asset, lock_amount) = match req.side {
            Side::Sell => (info.base.clone(), qty),
            Side::Buy => {
                let px = if req.otype.has_price() {
                    req.price
                } else if req.otype.is_algo() {
                    req.stop
                } else {
                    p
                };
                (info.quote.clone(), round8(qty * px))
            }
        };
        self.check_free(acct_key, &lock_asset, lock_amount)?;
        self.lock(acct_key, &lock_asset, lock_amount, now_us);
        let id = self.next_order_id;
        self.next_order_id += 1;
        let mut order = probe;
        order.id = id;
        order.lock = lock_amount;
        order.lock_asset = lock_asset;
        let watch = Self::watch_of(&order);
        self.orders.insert(id, order);
        if let Some(a) = self.accounts.get_mut(acct_key) {
            a.orders.push(id);
            a.open_cids.insert(cid.clone(), id);
            a.cid_latest.insert((req.symbol.clone(), cid), id);
        }
        if let Some(s) = self.symbols.get_mut(&req.symbol) {
            s.opened(id, watch);
        }
        self.exec_report(id, "NEW", None, None, now_us);
        let mut fills = Vec::new();
        match req.otype {
            OType::Market => fills = self.do_fill(id, p, false, now_us),
            OType::Limit => {
                if Self::marketable(req.side, p, req.price) {
                    fills = self.do_fill(id, p, false, now_us);
                }
                if req.tif != Tif::Gtc && self.orders.get(&id).is_some_and(Order::is_open) {
                    let reason = if req.tif == Tif::Ioc {
                        "UNFILLED_IOC_QUANTITY_EXPIRED"
                    } else {
                        "UNFILLED_FOK_ORDER_EXPIRED"
                    };
                    self.expire(id, reason, now_us);
                }
            }
            _ => {}
        }
        Ok((id, fills))
    }

    /// Places an OCO. Returns the list id; legs are stored stop-type first.
    pub fn place_oco(&mut self, acct_key: &str, req: NewOco, now_us: u64) -> Result<i64, ApiError> {
        let sym = self
            .symbols
            .get(&req.symbol)
            .ok_or_else(ApiError::bad_symbol)?;
        let p = sym.price;
        let info = sym.info.clone();
        // Which leg is the contingent (stop/take-profit trigger) one, per side.
        let (above, below) = (&req.above, &req.below);
        let ok_prices = match req.side {
            Side::Sell => {
                let above_ref = if above.otype.is_tp() {
                    above.stop
                } else {
                    above.price
                };
                above_ref > p && p > below.stop
            }
            Side::Buy => {
                let below_ref = if below.otype.is_tp() {
                    below.stop
                } else {
                    below.price
                };
                above.stop > p && p > below_ref
            }
        };
        if !ok_prices {
            return Err(ApiError::rejected(
                "The relationship of the prices for the orders is not correct.",
            ));
        }
        let list_cid = match req.list_cid.clone() {
            Some(c) => c,
            None => self.new_cid(),
        };
        let above_cid = match above.cid.clone() {
            Some(c) => c,
            None => self.new_cid(),
        };
        let below_cid = match below.cid.clone() {
            Some(c) => c,
            None => self.new_cid(),
        };
        let acct = self.accounts.get(acct_key).ok_or_else(ApiError::bad_key)?;
        if acct.open_list_cids.contains_key(&list_cid)
            || above_cid == below_cid
            || acct.open_cids.contains_key(&above_cid)
            || acct.open_cids.contains_key(&below_cid)
        {
            return Err(ApiError::dup());
        }
        let (n_orders, n_algo, n_lists) = self.open_counts(acct, &req.symbol);
        let algo_legs = usize::from(above.otype.is_algo()) + usize::from(below.otype.is_algo());
        if n_orders + 2 > info.max_num_orders {
            return Err(ApiError::rejected("Filter failure: MAX_NUM_ORDERS"));
        }
        if n_algo + algo_legs > info.max_num_algo_orders {
            return Err(ApiError::rejected("Filter failure: MAX_NUM_ALGO_ORDERS"));
        }
        if n_lists + 1 > info.max_num_order_lists {
            return Err(ApiError::rejected("Filter failure: MAX_NUM_ORDER_LISTS"));
        }
        let (lock_asset, lock_amount) = match req.side {
            // Both legs sell the same coins: the quantity is locked once.
            Side::Sell => (info.base.clone(), req.qty),
            Side::Buy => {
                let px = |l: &LegSpec| if l.otype.has_price() { l.price } else { l.stop };
                (
                    info.quote.clone(),
                    round8(req.qty * px(above).max(px(below))),
                )
            }
        };
        self.check_free(acct_key, &lock_asset, lock_amount)?;
        self.lock(acct_key, &lock_asset, lock_amount, now_us);
        let list_id = self.next_list_id;
        self.next_list_id += 1;
        let mut legs = vec![(above.clone(), above_cid), (below.clone(), below_cid)];
        // Binance lists the stop-type leg first, with the lower orderId.
        legs.sort_by_key(|(l, _)| u8::from(!l.otype.is_stop()) * 2 + u8::from(!l.otype.is_algo()));
        let mut ids = Vec::new();
        for (leg, cid) in legs {
            let id = self.next_order_id;
            self.next_order_id += 1;
            let order = Order {
                id,
                symbol: req.symbol.clone(),
                account: acct_key.to_string(),
                list_id,
                cid: cid.clone(),
                side: req.side,
                otype: leg.otype,
                tif: leg.tif,
                price: leg.price,
                qty: req.qty,
                quote_qty: Decimal::ZERO,
                stop: leg.stop,
                executed: Decimal::ZERO,
                cum_quote: Decimal::ZERO,
                status: Status::New,
                time_us: now_us,
                stored_us: self.stored_at(acct_key, now_us),
                update_us: now_us,
                working_us: if leg.otype.is_algo() {
                    None
                } else {
                    Some(now_us)
                },
                triggered: false,
                lock: Decimal::ZERO,
                lock_asset: String::new(),
                expiry: None,
            };
            let watch = Self::watch_of(&order);
            self.orders.insert(id, order);
            if let Some(a) = self.accounts.get_mut(acct_key) {
                a.orders.push(id);
                a.open_cids.insert(cid.clone(), id);
                a.cid_latest.insert((req.symbol.clone(), cid), id);
            }
            if let Some(s) = self.symbols.get_mut(&req.symbol) {
                s.opened(id, watch);
            }
            ids.push(id);
        }
        self.lists.insert(
            list_id,
            OrderList {
                id: list_id,
                symbol: req.symbol.clone(),
                account: acct_key.to_string(),
                cid: list_cid.clone(),
                done: false,
                legs: ids.clone(),
                time_us: now_us,
                stored_us: self.stored_at(acct_key, now_us),
                update_us: now_us,
                lock: lock_amount,
                lock_asset,
            },
        );
        if let Some(a) = self.accounts.get_mut(acct_key) {
            a.lists.push(list_id);
            a.open_list_cids.insert(list_cid.clone(), list_id);
            a.list_cid_latest.insert(list_cid, list_id);
        }
        for id in ids {
            self.exec_report(id, "NEW", None, None, now_us);
        }
        self.list_status(list_id, now_us);
        Ok(list_id)
    }

    /// Splits a fill according to the fault knobs and executes it.
    fn do_fill(&mut self, oid: u64, price: Decimal, maker: bool, now_us: u64) -> Vec<FillView> {
        let Some(o) = self.orders.get(&oid) else {
            return Vec::new();
        };
        let symbol = o.symbol.clone();
        let remaining = o.qty - o.executed;
        let is_market = matches!(o.otype, OType::Market | OType::StopLoss | OType::TakeProfit);
        let is_limit_leg = o.list_id >= 0 && o.otype == OType::LimitMaker;
        let step = self
            .symbols
            .get(&symbol)
            .map(|s| s.info.step)
            .unwrap_or_default();
        let mut qty = remaining;
        if !is_market && let Some(ratio) = self.knobs.partial_next.remove(&symbol) {
            let mut q = floor_to(remaining * ratio, step);
            if q <= Decimal::ZERO {
                q = step.min(remaining);
            }
            qty = q.min(remaining);
        }
        let parts = self
            .knobs
            .fill_parts
            .get(&symbol)
            .copied()
            .unwrap_or(1)
            .max(1);
        let mut chunks = Vec::new();
        let each = floor_to(qty / Decimal::from(parts), step);
        let mut left = qty;
        for _ in 1..parts {
            if each <= Decimal::ZERO || each >= left {
                break;
            }
            chunks.push(each);
            left -= each;
        }
        chunks.push(left);
        let mut fills = Vec::new();
        for q in chunks {
            if q <= Decimal::ZERO {
                continue;
            }
            fills.push(self.fill(oid, q, price, maker, now_us));
        }
        if is_limit_leg {
            // Binance: the touched LIMIT_MAKER executes, then the stop leg is removed.
            self.expire_siblings(oid, now_us);
        }
        fills
    }

    fn fee(
        &self,
        acct: &str,
        side: Side,
        info: &SymbolInfo,
        qty: Decimal,
        quote_amt: Decimal,
    ) -> (Decimal, String) {
        let Some(a) = self.accounts.get(acct) else {
            return (Decimal::ZERO, info.quote.clone());
        };
        let rate = a.commission.rate;
        let received = || match side {
            Side::Buy => (round8(qty * rate), info.base.clone()),
            Side::Sell => (round8(quote_amt * rate), info.quote.clone()),
        };
        let free = |asset: &str| a.balances.get(asset).map(|b| b.free).unwrap_or_default();
        match &a.commission.asset {
            CommissionAsset::Base => received(),
            CommissionAsset::Quote => {
                let f = round8(quote_amt * rate);
                if side == Side::Sell || free(&info.quote) >= f {
                    (f, info.quote.clone())
                } else {
                    received()
                }
            }
            CommissionAsset::Other(x) => {
                let conv = if *x == info.quote {
                    Decimal::ONE
                } else {
                    self.symbols
                        .get(&format!("{x}{}", info.quote))
                        .map(|s| s.price)
                        .filter(|p| !p.is_zero())
                        .unwrap_or(Decimal::ONE)
                };
                let f = round8(quote_amt * rate / conv);
                if free(x) >= f {
                    (f, x.clone())
                } else {
                    received()
                }
            }
        }
    }

    /// Takes `amount` of `asset` from the lock held for `oid` (its list's lock for a leg),
    /// the rest from the free balance.
    fn consume_lock(&mut self, oid: u64, acct: &str, asset: &str, amount: Decimal) {
        let Some(o) = self.orders.get(&oid) else {
            return;
        };
        let list_id = o.list_id;
        let held = if list_id >= 0 {
            self.lists.get(&list_id).map(|l| l.lock).unwrap_or_default()
        } else {
            o.lock
        };
        let from_lock = amount.min(held);
        if list_id >= 0 {
            if let Some(l) = self.lists.get_mut(&list_id) {
                l.lock -= from_lock;
            }
        } else if let Some(o) = self.orders.get_mut(&oid) {
            o.lock -= from_lock;
        }
        if let Some(b) = self.bal_mut(acct, asset) {
            b.locked -= from_lock;
            b.free -= amount - from_lock;
        }
    }

    fn fill(
        &mut self,
        oid: u64,
        qty: Decimal,
        price: Decimal,
        maker: bool,
        now_us: u64,
    ) -> FillView {
        let (acct, symbol, side, list_id) = match self.orders.get(&oid) {
            Some(o) => (o.account.clone(), o.symbol.clone(), o.side, o.list_id),
            None => (String::new(), String::new(), Side::Buy, -1),
        };
        let Some(sym) = self.symbols.get_mut(&symbol) else {
            return FillView {
                price,
                qty,
                commission: Decimal::ZERO,
                commission_asset: String::new(),
                trade_id: 0,
            };
        };
        let trade_id = sym.next_trade_id;
        sym.next_trade_id += 1;
        let info = sym.info.clone();
        let quote_amt = round8(qty * price);
        let (spent_asset, spent, got_asset, got) = match side {
            Side::Buy => (info.quote.clone(), quote_amt, info.base.clone(), qty),
            Side::Sell => (info.base.clone(), qty, info.quote.clone(), quote_amt),
        };
        self.consume_lock(oid, &acct, &spent_asset, spent);
        if let Some(b) = self.bal_mut(&acct, &got_asset) {
            b.free += got;
        }
        let (fee, fee_asset) = self.fee(&acct, side, &info, qty, quote_amt);
        if let Some(b) = self.bal_mut(&acct, &fee_asset) {
            b.free -= fee;
        }
        self.touch(&acct, &spent_asset, now_us);
        self.touch(&acct, &got_asset, now_us);
        self.touch(&acct, &fee_asset, now_us);
        let mut filled = false;
        if let Some(o) = self.orders.get_mut(&oid) {
            o.executed += qty;
            o.cum_quote += quote_amt;
            o.update_us = now_us;
            if o.working_us.is_none() {
                o.working_us = Some(now_us);
            }
            if o.executed >= o.qty {
                o.status = Status::Filled;
                filled = true;
            } else {
                o.status = Status::PartiallyFilled;
            }
        }
        let idx = self.trades.len();
        self.trades.push(Trade {
            id: trade_id,
            symbol,
            account: acct.clone(),
            order_id: oid,
            list_id,
            price,
            qty,
            quote_qty: quote_amt,
            commission: fee,
            commission_asset: fee_asset.clone(),
            time_us: now_us,
            is_buyer: side == Side::Buy,
            is_maker: maker,
        });
        if let Some(a) = self.accounts.get_mut(&acct) {
            a.trades.push(idx);
        }
        let view = FillView {
            price,
            qty,
            commission: fee,
            commission_asset: fee_asset,
            trade_id,
        };
        self.exec_report(oid, "TRADE", Some((&view, maker)), None, now_us);
        if filled {
            self.finish(oid, now_us);
        }
        view
    }

    /// Bookkeeping once an order reached a final status: releases locks, ends its list.
    fn finish(&mut self, oid: u64, now_us: u64) {
        let Some(o) = self.orders.get(&oid) else {
            return;
        };
        let (acct, symbol, cid, list_id, lock, lock_asset) = (
            o.account.clone(),
            o.symbol.clone(),
            o.cid.clone(),
            o.list_id,
            o.lock,
            o.lock_asset.clone(),
        );
        if let Some(s) = self.symbols.get_mut(&symbol) {
            s.closed(oid);
        }
        if let Some(a) = self.accounts.get_mut(&acct)
            && a.open_cids.get(&cid) == Some(&oid)
        {
            a.open_cids.remove(&cid);
        }
        if list_id < 0 {
            if lock > Decimal::ZERO {
                self.release(&acct, &lock_asset, lock, now_us);
            }
            if let Some(o) = self.orders.get_mut(&oid) {
                o.lock = Decimal::ZERO;
            }
            return;
        }
        let Some(l) = self.lists.get(&list_id) else {
            return;
        };
        let all_final = l
            .legs
            .iter()
            .all(|id| self.orders.get(id).is_none_or(|o| !o.is_open()));
        if !all_final || l.done {
            return;
        }
        let (lcid, llock, lasset) = (l.cid.clone(), l.lock, l.lock_asset.clone());
        if let Some(l) = self.lists.get_mut(&list_id) {
            l.done = true;
            l.lock = Decimal::ZERO;
            l.update_us = now_us;
        }
        if llock > Decimal::ZERO {
            self.release(&acct, &lasset, llock, now_us);
        }
        if let Some(a) = self.accounts.get_mut(&acct)
            && a.open_list_cids.get(&lcid) == Some(&list_id)
        {
            a.open_list_cids.remove(&lcid);
        }
        self.list_status(list_id, now_us);
    }

    fn release(&mut self, acct: &str, asset: &str, amount: Decimal, now_us: u64) {
        if let Some(b) = self.bal_mut(acct, asset) {
            b.locked -= amount;
            b.free += amount;
        }
        self.touch(acct, asset, now_us);
    }

    fn expire(&mut self, oid: u64, reason: &'static str, now_us: u64) {
        if let Some(o) = self.orders.get_mut(&oid) {
            if !o.is_open() {
                return;
            }
            o.status = Status::Expired;
            o.expiry = Some(reason);
            o.update_us = now_us;
        }
        self.exec_report(oid, "EXPIRED", None, None, now_us);
        self.finish(oid, now_us);
    }

    fn cancel_one(&mut self, oid: u64, cancel_cid: &str, now_us: u64) {
        if let Some(o) = self.orders.get_mut(&oid) {
            if !o.is_open() {
                return;
            }
            o.status = Status::Canceled;
            o.update_us = now_us;
        }
        self.exec_report(oid, "CANCELED", None, Some(cancel_cid), now_us);
        self.finish(oid, now_us);
    }

    fn expire_siblings(&mut self, oid: u64, now_us: u64) {
        let Some(o) = self.orders.get(&oid) else {
            return;
        };
        let Some(l) = self.lists.get(&o.list_id) else {
            return;
        };
        let others: Vec<u64> = l.legs.iter().copied().filter(|id| *id != oid).collect();
        for id in others {
            self.expire(id, OCO_TRIGGER, now_us);
        }
    }

    fn trigger(&mut self, oid: u64, now_us: u64) {
        let Some(o) = self.orders.get(&oid) else {
            return;
        };
        let (symbol, side, otype, limit, in_list) =
            (o.symbol.clone(), o.side, o.otype, o.price, o.list_id >= 0);
        if in_list {
            // Binance: a triggering stop cancels the LIMIT_MAKER before it executes.
            self.expire_siblings(oid, now_us);
        }
        if let Some(o) = self.orders.get_mut(&oid) {
            o.triggered = true;
            o.working_us = Some(now_us);
            o.update_us = now_us;
            let watch = Self::watch_of(o);
            if let Some(s) = self.symbols.get_mut(&symbol) {
                s.rewatch(oid, watch);
            }
        }
        if self.knobs.expire_next_stops > 0 {
            self.knobs.expire_next_stops -= 1;
            self.expire(oid, PRICE_RANGE, now_us);
            return;
        }
        let p = self.price(&symbol).unwrap_or_default();
        match otype {
            OType::StopLoss | OType::TakeProfit => {
                self.do_fill(oid, p, false, now_us);
            }
            _ => {
                if Self::marketable(side, p, limit) {
                    self.do_fill(oid, p, false, now_us);
                }
            }
        }
    }

    /// Where a price move acts on `o` as it stands: what [`Self::action`]
    /// decides, as a price and a direction.
    fn watch_of(o: &Order) -> Option<Watch> {
        if !o.is_open() {
            return None;
        }
        if o.otype.is_algo() && !o.triggered {
            // As `triggers`.
            let down = matches!(
                (o.otype.is_stop(), o.side),
                (true, Side::Sell) | (false, Side::Buy)
            );
            return Some(Watch {
                down,
                price: o.stop,
            });
        }
        // As `marketable`.
        o.otype.has_price().then_some(Watch {
            down: o.side == Side::Buy,
            price: o.price,
        })
    }

    fn action(o: &Order, p: Decimal) -> Option<Action> {
        if !o.is_open() {
            return None;
        }
        if o.otype.is_algo() && !o.triggered {
            return Self::triggers(o, p).then_some(Action::Trigger);
        }
        if o.otype.has_price() && Self::marketable(o.side, p, o.price) {
            return Some(Action::Fill(o.price));
        }
        None
    }

    /// Moves the last price and runs matching for the symbol.
    pub fn set_price(&mut self, symbol: &str, price: Decimal, now_us: u64) -> bool {
        let Some(s) = self.symbols.get_mut(symbol) else {
            return false;
        };
        s.price = price;
        let mut acted: HashSet<u64> = HashSet::new();
        loop {
            let ids = self
                .symbols
                .get(symbol)
                .map(|s| s.acted_on_at(price))
                .unwrap_or_default();
            let mut any = false;
            for id in ids {
                let Some(o) = self.orders.get(&id) else {
                    continue;
                };
                match Self::action(o, price) {
                    Some(Action::Trigger) => {
                        acted.insert(id);
                        self.trigger(id, now_us);
                        any = true;
                    }
                    Some(Action::Fill(px)) if acted.insert(id) => {
                        self.do_fill(id, px, true, now_us);
                        any = true;
                    }
                    _ => {}
                }
            }
            if !any {
                break;
            }
        }
        true
    }

    /// Finds an order of `acct` on `symbol` by id and/or client id (Binance's rules).
    pub fn find_order(
        &self,
        acct: &str,
        symbol: &str,
        order_id: Option<u64>,
        cid: Option<&str>,
        not_found: fn() -> ApiError,
    ) -> Result<u64, ApiError> {
        let a = self.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
        let id = match (order_id, cid) {
            (Some(id), _) => id,
            (None, Some(c)) => *a
                .cid_latest
                .get(&(symbol.to_string(), c.to_string()))
                .ok_or_else(not_found)?,
            (None, None) => return Err(ApiError::either("orderId", "origClientOrderId")),
        };
        let o = self.orders.get(&id).ok_or_else(not_found)?;
        if o.account != acct || o.symbol != symbol {
            return Err(not_found());
        }
        if let (Some(_), Some(c)) = (order_id, cid)
            && o.cid != c
        {
            return Err(ApiError::bad(
                -2039,
                "Client order ID is not correct for this order ID.",
            ));
        }
        Ok(id)
    }

    /// When something `acct` places at `now_us` reaches the lookups Binance
    /// serves from its database: after the lookup lag in force for it then.
    fn stored_at(&self, acct: &str, now_us: u64) -> u64 {
        let lag = self
            .knobs
            .lookup_lag_us_of
            .get(acct)
            .copied()
            .unwrap_or(self.knobs.lookup_lag_us);
        now_us.saturating_add(lag)
    }

    /// [`Self::find_order`] as `GET /api/v3/order` answers it: an order
    /// whose lookup lag still runs is not stored yet (`-2013`, even before a
    /// client id that does not match it is noticed), and a client id reused
    /// by it finds the newest stored order that had it.
    pub fn find_stored_order(
        &self,
        acct: &str,
        symbol: &str,
        order_id: Option<u64>,
        cid: Option<&str>,
        now_us: u64,
    ) -> Result<u64, ApiError> {
        if let Some(o) = order_id.and_then(|id| self.orders.get(&id))
            && o.account == acct
            && o.stored_us > now_us
        {
            return Err(ApiError::no_order());
        }
        let id = self.find_order(acct, symbol, order_id, cid, ApiError::no_order)?;
        let o = self.orders.get(&id).ok_or_else(ApiError::no_order)?;
        if o.stored_us <= now_us {
            return Ok(id);
        }
        let a = self.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
        a.orders
            .iter()
            .rev()
            .filter_map(|id| self.orders.get(id))
            .find(|o| {
                o.symbol == symbol && cid.is_some_and(|c| o.cid == c) && o.stored_us <= now_us
            })
            .map(|o| o.id)
            .ok_or_else(ApiError::no_order)
    }

    /// [`Self::find_list`] as `GET /api/v3/orderList` answers it: a list
    /// whose lookup lag still runs is not stored yet (`-2018`), and a list
    /// client id reused by it finds the newest stored list that had it.
    pub fn find_stored_list(
        &self,
        acct: &str,
        list_id: Option<i64>,
        cid: Option<&str>,
        now_us: u64,
    ) -> Result<i64, ApiError> {
        let id = self.find_list(acct, list_id, cid, ApiError::no_list)?;
        let l = self.lists.get(&id).ok_or_else(ApiError::no_list)?;
        if l.stored_us <= now_us {
            return Ok(id);
        }
        if list_id.is_some() {
            return Err(ApiError::no_list());
        }
        let a = self.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
        a.lists
            .iter()
            .rev()
            .filter_map(|id| self.lists.get(id))
            .find(|l| cid.is_some_and(|c| l.cid == c) && l.stored_us <= now_us)
            .map(|l| l.id)
            .ok_or_else(ApiError::no_list)
    }

    /// Cancels an order (a list leg cancels the whole list). Returns the order's cancel view.
    #[allow(clippy::too_many_arguments)]
    pub fn cancel(
        &mut self,
        acct: &str,
        symbol: &str,
        order_id: Option<u64>,
        cid: Option<&str>,
        cancel_cid: Option<String>,
        restriction: Option<&str>,
        now_us: u64,
    ) -> Result<CancelView, ApiError> {
        let id = self.find_order(acct, symbol, order_id, cid, ApiError::unknown_cancel)?;
        let o = self.orders.get(&id).ok_or_else(ApiError::unknown_cancel)?;
        if !o.is_open() {
            return Err(ApiError::unknown_cancel());
        }
        match restriction {
            Some("ONLY_NEW") if o.status != Status::New => {
                return Err(ApiError::bad(
                    -2011,
                    "Order was not canceled due to cancel restrictions.",
                ));
            }
            Some("ONLY_PARTIALLY_FILLED") if o.status != Status::PartiallyFilled => {
                return Err(ApiError::bad(
                    -2011,
                    "Order was not canceled due to cancel restrictions.",
                ));
            }
            _ => {}
        }
        let list_id = o.list_id;
        let cancel_cid = match cancel_cid {
            Some(c) => c,
            None => self.new_cid(),
        };
        if list_id >= 0 {
            let legs = self
                .lists
                .get(&list_id)
                .map(|l| l.legs.clone())
                .unwrap_or_default();
            for leg in legs {
                self.cancel_one(leg, &cancel_cid, now_us);
            }
        } else {
            self.cancel_one(id, &cancel_cid, now_us);
        }
        let o = self.orders.get(&id).ok_or_else(ApiError::unknown_cancel)?;
        Ok(o.cancel_view(&cancel_cid, now_us / 1000))
    }

    /// Finds an order list of `acct` by id or list client id.
    pub fn find_list(
        &self,
        acct: &str,
        list_id: Option<i64>,
        cid: Option<&str>,
        not_found: fn() -> ApiError,
    ) -> Result<i64, ApiError> {
        let a = self.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
        let id = match (list_id, cid) {
            (Some(id), _) => id,
            (None, Some(c)) => *a.list_cid_latest.get(c).ok_or_else(not_found)?,
            (None, None) => return Err(ApiError::either("orderListId", "listClientOrderId")),
        };
        let l = self.lists.get(&id).ok_or_else(not_found)?;
        if l.account != acct {
            return Err(not_found());
        }
        if let (Some(_), Some(c)) = (list_id, cid)
            && l.cid != c
        {
            return Err(not_found());
        }
        Ok(id)
    }

    /// Cancels an open order list. Returns the cancel answer.
    pub fn cancel_list(
        &mut self,
        acct: &str,
        symbol: &str,
        list_id: Option<i64>,
        cid: Option<&str>,
        cancel_cid: Option<String>,
        now_us: u64,
    ) -> Result<ListView, ApiError> {
        let id = self.find_list(acct, list_id, cid, ApiError::unknown_list_cancel)?;
        let l = self
            .lists
            .get(&id)
            .ok_or_else(ApiError::unknown_list_cancel)?;
        if l.done || l.symbol != symbol {
            return Err(ApiError::unknown_list_cancel());
        }
        let legs = l.legs.clone();
        let cancel_cid = match cancel_cid {
            Some(c) => c,
            None => self.new_cid(),
        };
        for leg in &legs {
            self.cancel_one(*leg, &cancel_cid, now_us);
        }
        let reports = legs
            .iter()
            .filter_map(|id| self.orders.get(id))
            .map(|o| ReportView::Cancel(o.cancel_view(&cancel_cid, now_us / 1000)))
            .collect();
        let l = self
            .lists
            .get(&id)
            .ok_or_else(ApiError::unknown_list_cancel)?;
        Ok(self.list_view(l, Some(reports), now_us / 1000))
    }

    /// Adds `delta` to a free balance (admin deposit/withdrawal) with a `balanceUpdate` event.
    pub fn adjust_balance(&mut self, acct: &str, asset: &str, delta: Decimal, now_us: u64) -> bool {
        let Some(b) = self.bal_mut(acct, asset) else {
            return false;
        };
        b.free += delta;
        if self.wants(acct) {
            let ev = BalanceUpdateEvent {
                e: "balanceUpdate",
                event_time: now_us / 1000,
                a: asset.to_string(),
                d: delta,
                clear_time: now_us / 1000,
            };
            self.push_event(acct, &ev);
        }
        self.touch(acct, asset, now_us);
        true
    }

    pub fn account_view(&self, acct: &str, omit_zero: bool) -> Option<AccountView> {
        let a = self.accounts.get(acct)?;
        let rate = a.commission.rate;
        let bps = (rate * Decimal::from(10_000)).trunc();
        let bps = i64::try_from(bps.mantissa() / 10i128.pow(bps.scale())).unwrap_or(0);
        let r8 = crate::util::fmt8(rate);
        Some(AccountView {
            maker_commission: bps,
            taker_commission: bps,
            buyer_commission: 0,
            seller_commission: 0,
            commission_rates: CommissionRatesView {
                maker: r8.clone(),
                taker: r8,
                buyer: crate::util::fmt8(Decimal::ZERO),
                seller: crate::util::fmt8(Decimal::ZERO),
            },
            can_trade: true,
            can_withdraw: true,
            can_deposit: true,
            brokered: false,
            require_self_trade_prevention: false,
            prevent_sor: false,
            update_time: a.update_us / 1000,
            account_type: "SPOT",
            balances: a
                .balances
                .iter()
                .filter(|(_, b)| !(omit_zero && b.free.is_zero() && b.locked.is_zero()))
                .map(|(asset, b)| BalanceView {
                    asset: asset.clone(),
                    free: b.free,
                    locked: b.locked,
                })
                .collect(),
            permissions: vec!["SPOT"],
            uid: a.uid,
        })
    }

    /// Removes every subscription of connection `conn_id`.
    pub fn drop_conn_subs(&mut self, conn_id: u64) {
        for v in self.subs.values_mut() {
            v.retain(|s| s.conn_id != conn_id);
        }
        self.subs.retain(|_, v| !v.is_empty());
    }
}
