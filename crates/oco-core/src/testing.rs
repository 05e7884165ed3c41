//! Test support: a scripted in-memory exchange double, and the behaviour
//! suite every [`Store`] implementation must pass (run on `MemStore` here and
//! on `PgStore` in `store-pg`).
// Test support only: its literals are constants, so a failed parse is a bug in this file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};

use crate::ids::{AccountId, ClientOrderId, EntryId, LegIndex, LegKey, OcoClientIds};
use crate::model::{
    Entry, Evidence, Fill, LegClaim, LegUpdate, Millis, NewEntry, OrderSize, Protection,
    ProtectionConfig, Realized, SaleSide,
};
use crate::money::{Price, Qty};
use crate::ports::{
    ApiCredentials, Balance, CancelOutcome, Exchange, ExchangeError, ListCancelOutcome,
    ListOrderSnapshot, NewAccount, OcoAck, OcoRequest, OrderListSnapshot, OrderRequest,
    OrderSnapshot, Side, Store, StoreError, event,
};
use crate::state::{EntryStatus, LegSold, LegState};
use crate::symbol::{Asset, SymbolRules};

mod hooked;
pub use hooked::{Hooked, StoreHooks};

/// A future that returns `Pending` once, so concurrent tasks interleave at
/// each exchange call the way real network round trips make them.
#[derive(Debug, Default)]
pub struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// What the next `place_oco` call does instead of its normal work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OcoFault {
    /// Places the list, then answers as if the connection dropped.
    UnknownAfterApply,
    /// Answers as if the connection dropped, placing nothing.
    UnknownBeforeApply,
    /// Refuses with this error.
    Fail(ExchangeError),
}

/// A list as the double holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeList {
    /// `orderListId`.
    pub list_id: i64,
    /// Owner's API key.
    pub api_key: String,
    /// The request that created it.
    pub request: OcoRequest,
    /// Still executing.
    pub executing: bool,
    /// Take-profit state.
    pub take_profit: ListOrderSnapshot,
    /// Stop state.
    pub stop_loss: ListOrderSnapshot,
}

#[derive(Default)]
struct FakeState {
    rules: HashMap<String, SymbolRules>,
    prices: HashMap<String, Price>,
    balances: HashMap<String, BTreeMap<String, (Decimal, Decimal)>>,
    lists: Vec<FakeList>,
    orders: HashMap<(String, String), OrderSnapshot>,
    oco_faults: VecDeque<OcoFault>,
    /// Per coming list cancel: `None` cancels as usual, `Some` refuses.
    list_cancel_faults: VecDeque<Option<ExchangeError>>,
    market_depth: HashMap<String, Qty>,
    order_faults: VecDeque<OcoFault>,
    lagging_lookups: usize,
    /// List cancels to come whose answer reports no quantities.
    unreported_cancels: usize,
    market_sells: Vec<String>,
    next_id: i64,
    oco_calls: usize,
    order_calls: usize,
    balance_reads: usize,
    cancel_failure: Option<ExchangeError>,
    /// Commission of each trade of a list's order, and its asset.
    leg_fee: Option<(Decimal, Asset)>,
    /// Trade ids of lists' orders are counted apart, so that they move no
    /// list or order id.
    next_trade: i64,
    /// `open_order_ids` answers `None`, as an exchange that cannot list
    /// open orders.
    no_open_orders: bool,
    /// `open_order_ids` fails with this while it is set.
    open_orders_failure: Option<ExchangeError>,
    /// `order_list` fails with this while it is set.
    list_lookup_failure: Option<ExchangeError>,
    /// Per API key: its placements are held this long (after a `-1015`).
    /// A hold per API key, and how many lists it still lets through.
    placements_held: HashMap<String, (Duration, u32)>,
}

/// An exchange double with Binance's OCO semantics: one quantity locked for
/// both orders, ids unique among open lists, the SELL price rule, and
/// scripted faults. It does no I/O; it yields once per call.
#[derive(Default)]
pub struct FakeExchange {
    state: Mutex<FakeState>,
    before_oco: Mutex<Option<OcoHook>>,
    before_cancel: Mutex<Option<OcoHook>>,
    before_order: Mutex<Option<OcoHook>>,
}

/// What runs before the next call it is set for ([`FakeExchange::before_next_oco`],
/// [`FakeExchange::before_next_cancel`], [`FakeExchange::before_next_order`]).
type OcoHook = Box<dyn FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send>;

fn rejected(code: i32, msg: &str) -> ExchangeError {
    ExchangeError::Rejected {
        code,
        msg: msg.to_owned(),
    }
}

impl FakeExchange {
    /// An exchange with no symbols.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `hook` once, at the start of the next OCO placement: what
    /// happens elsewhere (another layer recording a fill, say) while a
    /// protection is being placed.
    pub fn before_next_oco(
        &self,
        hook: impl FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    ) {
        *self
            .before_oco
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(hook));
    }

    /// Runs `hook` once, at the start of the next list cancel: what happens
    /// elsewhere while a replacement cancels the lists it replaces (a
    /// rate-limit pause holding the call, say).
    pub fn before_next_cancel(
        &self,
        hook: impl FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    ) {
        *self
            .before_cancel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(hook));
    }

    /// Runs `hook` once, at the start of the next `place_order` call: what
    /// happens elsewhere (another layer recording a fill, say) while a
    /// market exit goes out.
    pub fn before_next_order(
        &self,
        hook: impl FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    ) {
        *self
            .before_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(hook));
    }

    /// Scripts the next `place_order` call (the faults mean for an order
    /// what they mean for a list).
    pub fn push_order_fault(&self, fault: OcoFault) {
        self.lock().order_faults.push_back(fault);
    }

    /// The next `n` lookups (`query_order`, `order_list`) answer as if the
    /// order or list did not exist: the exchange's lookups read a database
    /// that can lag its matching engine.
    pub fn lag_next_lookups(&self, n: usize) {
        self.lock().lagging_lookups = n;
    }

    /// The next `n` list cancels cancel as usual but answer without what
    /// the orders had executed (an answer whose reports could not be read).
    pub fn unreport_next_cancels(&self, n: usize) {
        self.lock().unreported_cancels = n;
    }

    /// The client ids of the SELL market orders executed, in order.
    pub fn market_sells(&self) -> Vec<String> {
        self.lock().market_sells.clone()
    }

    /// Every `cancel_order` call fails with `err` until this is called with
    /// `None` (a rate limit, an outage of the order API).
    pub fn fail_cancels(&self, err: Option<ExchangeError>) {
        self.lock().cancel_failure = err;
    }

    /// Whether `open_order_ids` answers `None` from now on, as for an
    /// exchange that cannot list open orders (callers then trust the lists).
    pub fn cannot_list_open_orders(&self, cannot: bool) {
        self.lock().no_open_orders = cannot;
    }

    /// Every `open_order_ids` call fails with `err` until this is called
    /// with `None` (a 5xx, a rate limit).
    pub fn fail_open_order_ids(&self, err: Option<ExchangeError>) {
        self.lock().open_orders_failure = err;
    }

    /// Every `order_list` call fails with `err` until this is called with
    /// `None` (a 5xx, a rate limit).
    pub fn fail_list_lookups(&self, err: Option<ExchangeError>) {
        self.lock().list_lookup_failure = err;
    }

    /// Holds the placements of `api_key` (`None`: lets them go again), as
    /// Binance's adapter does after a `-1015` or once the day's order count
    /// is spent: `place_oco` and `place_order` are refused as rate-limited,
    /// `placements_held` says so, and reads and cancels go on.
    pub fn hold_placements(&self, api_key: &str, hold: Option<Duration>) {
        let mut s = self.lock();
        match hold {
            Some(hold) => s.placements_held.insert(api_key.to_owned(), (hold, 0)),
            None => s.placements_held.remove(api_key),
        };
    }

    /// [`FakeExchange::hold_placements`], with room left for `lists` more
    /// lists first (the day's order count nearly spent): `placements_held`
    /// answers only for more lists than that, and the lists that fit are
    /// placed.
    pub fn hold_placements_beyond(&self, api_key: &str, lists: u32, hold: Duration) {
        self.lock()
            .placements_held
            .insert(api_key.to_owned(), (hold, lists));
    }

    /// How many times `place_order` was called, refused or not.
    pub fn order_calls(&self) -> usize {
        self.lock().order_calls
    }

    /// How many times the balances were read.
    pub fn balance_reads(&self) -> usize {
        self.lock().balance_reads
    }

    /// Executes an order as the matching engine would.
    fn execute_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        let mut s = self.lock();
        let price = *s
            .prices
            .get(&order.symbol)
            .ok_or_else(|| rejected(-1121, "Invalid symbol."))?;
        let qty = match order.size {
            OrderSize::Base(q) => q,
            OrderSize::Quote(q) => Qty::new(q / price.get()).unwrap_or(Qty::ZERO),
        };
        // As Binance's NOTIONAL with applyMinToMarket (BTCUSDT): a MARKET order
        // is measured at the market price.
        let min_notional = s.rules.get(&order.symbol).map(|r| r.min_notional);
        if order.limit.is_none() && min_notional.is_some_and(|m| qty.notional(price) < m) {
            return Err(rejected(-1013, "Filter failure: NOTIONAL"));
        }
        let (base, quote) = s.split_symbol(&order.symbol);
        let crosses = order.limit.is_none_or(|l| match order.side {
            Side::Buy => l >= price,
            Side::Sell => l <= price,
        });
        let asked = qty;
        let qty = match s.market_depth.get(&order.symbol) {
            Some(depth) if order.limit.is_none() => qty.min(*depth),
            _ => qty,
        };
        let book = s.balances.entry(creds.api_key.clone()).or_default();
        if crosses {
            let (from, to, out, inc) = match order.side {
                Side::Buy => (quote, base, qty.notional(price), qty.get()),
                Side::Sell => (base, quote, qty.get(), qty.notional(price)),
            };
            let slot = book.entry(from).or_default();
            if slot.0 < out {
                return Err(rejected(
                    -2010,
                    "Account has insufficient balance for requested action.",
                ));
            }
            slot.0 -= out;
            book.entry(to).or_default().0 += inc;
        }
        s.next_id += 1;
        // Our sells (market exits) are charged like a list's orders.
        let (fee, fee_asset) = match (&s.leg_fee, order.side) {
            (Some((fee, asset)), Side::Sell) => (*fee, asset.clone()),
            _ => (Decimal::ZERO, Asset("BNB".into())),
        };
        let snap = OrderSnapshot {
            order_id: s.next_id,
            client_id: order.client_id.as_str().to_owned(),
            symbol: order.symbol.clone(),
            status: if crosses && qty < asked {
                EntryStatus::Expired
            } else if crosses {
                EntryStatus::Filled
            } else {
                EntryStatus::New
            },
            executed_qty: if crosses { qty } else { Qty::ZERO },
            cumulative_quote: if crosses {
                qty.notional(price)
            } else {
                Decimal::ZERO
            },
            fills: if crosses && !qty.is_zero() {
                vec![Fill {
                    trade_id: s.next_id,
                    price,
                    qty,
                    commission: fee,
                    commission_asset: fee_asset,
                    time: Millis(0),
                }]
            } else {
                Vec::new()
            },
            updated_at: Millis(0),
        };
        if crosses && order.side == Side::Sell && !qty.is_zero() {
            s.market_sells.push(order.client_id.as_str().to_owned());
        }
        s.orders.insert(
            (creds.api_key.clone(), order.client_id.as_str().to_owned()),
            snap.clone(),
        );
        Ok(snap)
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists a symbol at `price`.
    pub fn add_symbol(&self, rules: SymbolRules, price: Price) {
        let mut s = self.lock();
        s.prices.insert(rules.symbol.name.clone(), price);
        s.rules.insert(rules.symbol.name.clone(), rules);
    }

    /// Moves the last price.
    pub fn set_price(&self, symbol: &str, price: Price) {
        self.lock().prices.insert(symbol.to_owned(), price);
    }

    /// Caps what one MARKET order of `symbol` fills (`None`: no cap); like
    /// Binance when the book runs out within the order's price range, the
    /// rest expires.
    pub fn set_market_depth(&self, symbol: &str, depth: Option<Qty>) {
        let mut s = self.lock();
        match depth {
            Some(depth) => s.market_depth.insert(symbol.to_owned(), depth),
            None => s.market_depth.remove(symbol),
        };
    }

    /// Sets an account's free balance of an asset.
    pub fn set_free(&self, api_key: &str, asset: &str, free: Decimal) {
        let mut s = self.lock();
        let slot = s
            .balances
            .entry(api_key.to_owned())
            .or_default()
            .entry(asset.to_owned())
            .or_default();
        slot.0 = free;
    }

    /// The free and locked balance of an asset.
    pub fn balance(&self, api_key: &str, asset: &str) -> (Decimal, Decimal) {
        self.lock()
            .balances
            .get(api_key)
            .and_then(|b| b.get(asset))
            .copied()
            .unwrap_or_default()
    }

    /// Scripts the next `place_oco` call.
    pub fn push_oco_fault(&self, fault: OcoFault) {
        self.lock().oco_faults.push_back(fault);
    }

    /// Scripts the next list cancel: `None` cancels as usual, `Some(err)`
    /// refuses with `err` and leaves the list open. Queued in order.
    pub fn push_list_cancel_fault(&self, fault: Option<ExchangeError>) {
        self.lock().list_cancel_faults.push_back(fault);
    }

    /// Every list ever created, in order.
    pub fn lists(&self) -> Vec<FakeList> {
        self.lock().lists.clone()
    }

    /// Lists still executing.
    pub fn open_lists(&self) -> Vec<FakeList> {
        self.lock()
            .lists
            .iter()
            .filter(|l| l.executing)
            .cloned()
            .collect()
    }

    /// How many times `place_oco` was called.
    pub fn oco_calls(&self) -> usize {
        self.lock().oco_calls
    }

    /// Fills `qty` of the take-profit of an open list. Like Binance, any fill
    /// of the take-profit cancels the stop; a partial fill leaves the rest of
    /// the take-profit resting, unprotected.
    pub fn fill_take_profit(&self, list_client_id: &str, qty: Qty) {
        let mut s = self.lock();
        let Some(i) = s
            .lists
            .iter()
            .position(|l| l.request.ids.list.as_str() == list_client_id && l.executing)
        else {
            return;
        };
        let (api_key, symbol, total, price) = {
            let l = &s.lists[i];
            (
                l.api_key.clone(),
                l.request.symbol.clone(),
                l.request.qty,
                l.request.take_profit,
            )
        };
        let qty = qty.min(total);
        let full = qty == total;
        let before = s.lists[i].take_profit.executed_qty;
        {
            let l = &mut s.lists[i];
            // The list keeps executing while the rest of a partly filled take-profit rests.
            l.executing = !full;
            l.take_profit.executed_qty = qty;
            l.take_profit.cumulative_quote = qty.notional(price);
            l.take_profit.status = if full {
                EntryStatus::Filled
            } else {
                EntryStatus::PartiallyFilled
            };
            l.stop_loss.status = EntryStatus::Expired;
            l.stop_loss.expiry_reason = Some("OCO_TRIGGER".into());
        }
        let list = s.lists[i].clone();
        s.trade_list_order(
            &list,
            SaleSide::TakeProfit,
            qty.saturating_sub(before),
            price,
        );
        let (base, quote) = s.split_symbol(&symbol);
        let book = s.balances.entry(api_key).or_default();
        let slot = book.entry(base).or_default();
        // Sold coins leave the lock; a partial rest stays locked under the resting take-profit.
        slot.1 -= qty.get();
        book.entry(quote).or_default().0 += qty.notional(price);
    }

    /// Triggers and fills the stop of an open list at its limit (or stop) price.
    pub fn fill_stop(&self, list_client_id: &str) {
        let mut s = self.lock();
        let Some(i) = s
            .lists
            .iter()
            .position(|l| l.request.ids.list.as_str() == list_client_id && l.executing)
        else {
            return;
        };
        let (api_key, symbol, qty, price) = {
            let l = &mut s.lists[i];
            let price = l.request.stop_limit.unwrap_or(l.request.stop);
            // What `sell_stop_partly` sold already left the account.
            let rest = l.request.qty.saturating_sub(l.stop_loss.executed_qty);
            l.executing = false;
            l.stop_loss.status = EntryStatus::Filled;
            l.stop_loss.executed_qty = l.request.qty;
            l.stop_loss.cumulative_quote = l.request.qty.notional(price);
            // Removed when the stop triggered, unless `trigger_stop` did already.
            if l.take_profit.status == EntryStatus::New {
                l.take_profit.status = EntryStatus::Expired;
                l.take_profit.expiry_reason = Some("OCO_TRIGGER".into());
            }
            (l.api_key.clone(), l.request.symbol.clone(), rest, price)
        };
        let list = s.lists[i].clone();
        s.trade_list_order(&list, SaleSide::StopLoss, qty, price);
        let (base, quote) = s.split_symbol(&symbol);
        let book = s.balances.entry(api_key).or_default();
        book.entry(base).or_default().1 -= qty.get();
        book.entry(quote).or_default().0 += qty.notional(price);
    }

    /// Triggers the stop of an open list without filling it: like Binance,
    /// the take-profit is removed first (reported as `removed_as`, `EXPIRED`
    /// or `CANCELED`, with `OCO_TRIGGER`), and the list keeps executing with
    /// the stop resting as a limit order, the coins still locked under it.
    pub fn trigger_stop(&self, list_client_id: &str, removed_as: EntryStatus) {
        let mut s = self.lock();
        if let Some(l) = s
            .lists
            .iter_mut()
            .find(|l| l.request.ids.list.as_str() == list_client_id && l.executing)
        {
            l.take_profit.status = removed_as;
            l.take_profit.expiry_reason = Some("OCO_TRIGGER".into());
        }
    }

    /// Triggers the stop of an open list and fills `qty` of it at its limit
    /// (or stop) price: the take-profit is removed (`EXPIRED`,
    /// `OCO_TRIGGER`), and the list keeps executing with the rest of the
    /// stop resting, its coins still locked under it.
    pub fn sell_stop_partly(&self, list_client_id: &str, qty: Qty) {
        let mut s = self.lock();
        let Some(i) = s
            .lists
            .iter()
            .position(|l| l.request.ids.list.as_str() == list_client_id && l.executing)
        else {
            return;
        };
        let (api_key, symbol, sold, price) = {
            let l = &mut s.lists[i];
            let price = l.request.stop_limit.unwrap_or(l.request.stop);
            let before = l.stop_loss.executed_qty;
            // Never the whole list: that is `fill_stop`.
            let total = before.plus(qty).min(l.request.qty);
            if total >= l.request.qty {
                return;
            }
            l.stop_loss.status = EntryStatus::PartiallyFilled;
            l.stop_loss.executed_qty = total;
            l.stop_loss.cumulative_quote = total.notional(price);
            if l.take_profit.status == EntryStatus::New {
                l.take_profit.status = EntryStatus::Expired;
                l.take_profit.expiry_reason = Some("OCO_TRIGGER".into());
            }
            (
                l.api_key.clone(),
                l.request.symbol.clone(),
                total.saturating_sub(before),
                price,
            )
        };
        let list = s.lists[i].clone();
        s.trade_list_order(&list, SaleSide::StopLoss, sold, price);
        let (base, quote) = s.split_symbol(&symbol);
        let book = s.balances.entry(api_key).or_default();
        book.entry(base).or_default().1 -= sold.get();
        book.entry(quote).or_default().0 += sold.notional(price);
    }

    /// Charges each trade of a list's order, and each market sell, from now
    /// on `fee` in `asset` (`None`: nothing, the default).
    pub fn set_leg_commission(&self, fee: Option<(Decimal, &str)>) {
        self.lock().leg_fee = fee.map(|(fee, asset)| (fee, Asset(asset.to_owned())));
    }

    /// Cancels a list as a user would by hand.
    pub fn cancel_externally(&self, list_client_id: &str) {
        let mut s = self.lock();
        s.cancel_list(list_client_id);
    }
}

impl FakeState {
    /// A trade of `qty` at `price` by the `side` order of `list` (as it
    /// stands after the trade): the order as `query_order` and
    /// `order_trades` then answer it, its ids those the placement answered.
    fn trade_list_order(&mut self, list: &FakeList, side: SaleSide, qty: Qty, price: Price) {
        let (order, client_id, order_id) = match side {
            SaleSide::TakeProfit => (
                &list.take_profit,
                &list.request.ids.take_profit,
                list.list_id + 2,
            ),
            SaleSide::StopLoss => (
                &list.stop_loss,
                &list.request.ids.stop_loss,
                list.list_id + 1,
            ),
        };
        self.next_trade += 1;
        let trade_id = 1_000_000 + self.next_trade;
        let (fee, asset) = self
            .leg_fee
            .clone()
            .unwrap_or((Decimal::ZERO, Asset("BNB".into())));
        let snap = self
            .orders
            .entry((list.api_key.clone(), client_id.as_str().to_owned()))
            .or_insert_with(|| OrderSnapshot {
                order_id,
                client_id: client_id.as_str().to_owned(),
                symbol: list.request.symbol.clone(),
                status: EntryStatus::New,
                executed_qty: Qty::ZERO,
                cumulative_quote: Decimal::ZERO,
                fills: Vec::new(),
                updated_at: Millis(0),
            });
        snap.status = order.status;
        snap.executed_qty = order.executed_qty;
        snap.cumulative_quote = order.cumulative_quote;
        if !qty.is_zero() {
            snap.fills.push(Fill {
                trade_id,
                price,
                qty,
                commission: fee,
                commission_asset: asset,
                time: Millis(0),
            });
        }
    }

    fn split_symbol(&self, symbol: &str) -> (String, String) {
        self.rules.get(symbol).map_or_else(
            || (symbol.to_owned(), String::new()),
            |r| (r.symbol.base.0.clone(), r.symbol.quote.0.clone()),
        )
    }

    /// Cancels an executing list; `None` when there is none. Answers what
    /// its orders had executed, as Binance's `orderReports` do.
    fn cancel_list(&mut self, list_client_id: &str) -> Option<LegSold> {
        let i = self
            .lists
            .iter()
            .position(|l| l.request.ids.list.as_str() == list_client_id && l.executing)?;
        let (api_key, symbol, rest) = {
            let l = &mut self.lists[i];
            l.executing = false;
            // An order already ended (the stop a take-profit fill expired) keeps its end.
            for order in [&mut l.take_profit, &mut l.stop_loss] {
                if !order.status.is_final() {
                    order.status = EntryStatus::Canceled;
                }
            }
            (
                l.api_key.clone(),
                l.request.symbol.clone(),
                // What either order sold already left the account.
                l.request
                    .qty
                    .saturating_sub(l.take_profit.executed_qty)
                    .saturating_sub(l.stop_loss.executed_qty)
                    .get(),
            )
        };
        let (base, _) = self.split_symbol(&symbol);
        let slot = self
            .balances
            .entry(api_key)
            .or_default()
            .entry(base)
            .or_default();
        slot.1 -= rest;
        slot.0 += rest;
        let l = &self.lists[i];
        Some(LegSold {
            take_profit: l.take_profit.executed_qty,
            take_profit_quote: l.take_profit.cumulative_quote,
            stop_loss: l.stop_loss.executed_qty,
            stop_loss_quote: l.stop_loss.cumulative_quote,
        })
    }

    fn place(&mut self, api_key: &str, oco: &OcoRequest) -> Result<OcoAck, ExchangeError> {
        let price = *self
            .prices
            .get(&oco.symbol)
            .ok_or_else(|| rejected(-1121, "Invalid symbol."))?;
        let duplicate = self
            .lists
            .iter()
            .any(|l| l.api_key == api_key && l.executing && l.request.ids.list == oco.ids.list);
        if duplicate {
            return Err(rejected(-2010, "Duplicate order sent."));
        }
        // As Binance: a stop type missing from the symbol's `orderTypes`.
        if let Some(types) = self.rules.get(&oco.symbol).map(|r| r.order_types) {
            if oco.stop_limit.is_none() && !types.stop_loss {
                return Err(rejected(
                    -2010,
                    "Stop loss orders are not supported for this symbol.",
                ));
            }
            if oco.stop_limit.is_some() && !types.stop_loss_limit {
                return Err(rejected(
                    -2010,
                    "Stop loss limit orders are not supported for this symbol.",
                ));
            }
        }
        if !(oco.take_profit > price && price > oco.stop) {
            return Err(rejected(
                -2010,
                "The relationship of the prices for the orders is not correct.",
            ));
        }
        let (base, _) = self.split_symbol(&oco.symbol);
        let slot = self
            .balances
            .entry(api_key.to_owned())
            .or_default()
            .entry(base)
            .or_default();
        if slot.0 < oco.qty.get() {
            return Err(rejected(
                -2010,
                "Account has insufficient balance for requested action.",
            ));
        }
        slot.0 -= oco.qty.get();
        slot.1 += oco.qty.get();
        self.next_id += 3;
        let leg = |client: &ClientOrderId| ListOrderSnapshot {
            client_id: client.as_str().to_owned(),
            status: EntryStatus::New,
            executed_qty: Qty::ZERO,
            cumulative_quote: Decimal::ZERO,
            expiry_reason: None,
        };
        let list = FakeList {
            list_id: self.next_id,
            api_key: api_key.to_owned(),
            request: oco.clone(),
            executing: true,
            take_profit: leg(&oco.ids.take_profit),
            stop_loss: leg(&oco.ids.stop_loss),
        };
        self.lists.push(list);
        Ok(OcoAck {
            list_id: self.next_id,
            take_profit_order_id: self.next_id + 2,
            stop_order_id: self.next_id + 1,
        })
    }

    fn snapshot(list: &FakeList) -> OrderListSnapshot {
        OrderListSnapshot {
            list_id: list.list_id,
            list_client_id: list.request.ids.list.as_str().to_owned(),
            symbol: list.request.symbol.clone(),
            executing: list.executing,
            take_profit: Some(list.take_profit.clone()),
            stop_loss: Some(list.stop_loss.clone()),
        }
    }
}

#[async_trait]
impl Exchange for FakeExchange {
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError> {
        YieldNow::default().await;
        self.lock()
            .rules
            .get(symbol)
            .cloned()
            .ok_or_else(|| rejected(-1121, "Invalid symbol."))
    }

    fn invalidate_rules(&self, _symbol: &str) {}

    fn cached_symbol_rules(&self, symbol: &str) -> Option<SymbolRules> {
        self.lock().rules.get(symbol).cloned()
    }

    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError> {
        YieldNow::default().await;
        self.lock()
            .prices
            .get(symbol)
            .copied()
            .ok_or_else(|| rejected(-1121, "Invalid symbol."))
    }

    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError> {
        YieldNow::default().await;
        let mut s = self.lock();
        s.balance_reads += 1;
        Ok(s.balances
            .get(&creds.api_key)
            .map(|b| {
                b.iter()
                    .map(|(asset, (free, locked))| Balance {
                        asset: asset.clone(),
                        free: Qty::new(*free).unwrap_or(Qty::ZERO),
                        locked: Qty::new(*locked).unwrap_or(Qty::ZERO),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        let hook = self
            .before_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(hook) = hook {
            hook().await;
        }
        YieldNow::default().await;
        let fault = {
            let mut s = self.lock();
            s.order_calls += 1;
            if let Some((retry_after, _)) = s.placements_held.get(&creds.api_key) {
                return Err(ExchangeError::RateLimited {
                    retry_after: *retry_after,
                });
            }
            s.order_faults.pop_front()
        };
        match fault {
            None => self.execute_order(creds, order),
            Some(OcoFault::UnknownAfterApply) => {
                self.execute_order(creds, order)?;
                Err(ExchangeError::UnknownOutcome(
                    "connection reset after send".into(),
                ))
            }
            Some(OcoFault::UnknownBeforeApply) => {
                Err(ExchangeError::UnknownOutcome("timeout".into()))
            }
            Some(OcoFault::Fail(err)) => Err(err),
        }
    }

    async fn query_order(
        &self,
        creds: &ApiCredentials,
        _symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError> {
        YieldNow::default().await;
        let mut s = self.lock();
        if s.lagging_lookups > 0 {
            s.lagging_lookups -= 1;
            return Err(ExchangeError::NotFound);
        }
        s.orders
            .get(&(creds.api_key.clone(), client_id.to_owned()))
            .cloned()
            .ok_or(ExchangeError::NotFound)
    }
    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        _symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        YieldNow::default().await;
        Ok(self
            .lock()
            .orders
            .iter()
            .filter(|((k, _), o)| k == &creds.api_key && o.order_id == order_id)
            .flat_map(|(_, o)| o.fills.clone())
            .collect())
    }

    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        _symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError> {
        YieldNow::default().await;
        let mut s = self.lock();
        if let Some(err) = s.cancel_failure.clone() {
            return Err(err);
        }
        // Only the resting rest of a partly filled take-profit can be open outside a list.
        let Some(i) = s.lists.iter().position(|l| {
            l.api_key == creds.api_key
                && l.take_profit.client_id == client_id
                && l.take_profit.status == EntryStatus::PartiallyFilled
        }) else {
            return Ok(CancelOutcome::NotOpen);
        };
        let (symbol, rest) = {
            let l = &mut s.lists[i];
            l.take_profit.status = EntryStatus::Canceled;
            l.executing = false;
            (
                l.request.symbol.clone(),
                l.request.qty.saturating_sub(l.take_profit.executed_qty),
            )
        };
        let (base, _) = s.split_symbol(&symbol);
        let slot = s
            .balances
            .entry(creds.api_key.clone())
            .or_default()
            .entry(base)
            .or_default();
        slot.1 -= rest.get();
        slot.0 += rest.get();
        Ok(CancelOutcome::Canceled)
    }

    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError> {
        let hook = self
            .before_oco
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(hook) = hook {
            hook().await;
        }
        YieldNow::default().await;
        let mut s = self.lock();
        s.oco_calls += 1;
        if let Some((retry_after, room)) = s.placements_held.get_mut(&creds.api_key) {
            if *room == 0 {
                return Err(ExchangeError::RateLimited {
                    retry_after: *retry_after,
                });
            }
            *room -= 1;
        }
        match s.oco_faults.pop_front() {
            None => s.place(&creds.api_key, oco),
            Some(OcoFault::UnknownAfterApply) => {
                s.place(&creds.api_key, oco)?;
                Err(ExchangeError::UnknownOutcome(
                    "connection reset after send".into(),
                ))
            }
            Some(OcoFault::UnknownBeforeApply) => {
                Err(ExchangeError::UnknownOutcome("timeout".into()))
            }
            Some(OcoFault::Fail(err)) => Err(err),
        }
    }

    async fn order_list(
        &self,
        creds: &ApiCredentials,
        _symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError> {
        YieldNow::default().await;
        let mut s = self.lock();
        if let Some(err) = s.list_lookup_failure.clone() {
            return Err(err);
        }
        if s.lagging_lookups > 0 {
            s.lagging_lookups -= 1;
            return Ok(None);
        }
        // The latest list under that id: ids are reusable once a list is done.
        Ok(s.lists
            .iter()
            .rev()
            .find(|l| l.api_key == creds.api_key && l.request.ids.list.as_str() == list_client_id)
            .map(FakeState::snapshot))
    }

    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError> {
        YieldNow::default().await;
        Ok(self
            .lock()
            .lists
            .iter()
            .filter(|l| l.api_key == creds.api_key && l.executing)
            .map(FakeState::snapshot)
            .collect())
    }

    async fn open_order_ids(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
    ) -> Result<Option<Vec<String>>, ExchangeError> {
        YieldNow::default().await;
        let open = |o: &ListOrderSnapshot| {
            matches!(
                o.status,
                EntryStatus::New | EntryStatus::PartiallyFilled | EntryStatus::PendingNew
            )
        };
        let state = self.lock();
        if let Some(err) = state.open_orders_failure.clone() {
            return Err(err);
        }
        if state.no_open_orders {
            return Ok(None);
        }
        let mut ids = Vec::new();
        for list in state
            .lists
            .iter()
            .filter(|l| l.api_key == creds.api_key && l.executing && l.request.symbol == symbol)
        {
            for order in [&list.take_profit, &list.stop_loss] {
                if open(order) {
                    ids.push(order.client_id.clone());
                }
            }
        }
        Ok(Some(ids))
    }

    fn placements_held(&self, creds: &ApiCredentials, lists: u32) -> Option<Duration> {
        self.lock()
            .placements_held
            .get(&creds.api_key)
            .filter(|(_, room)| lists > *room)
            .map(|(hold, _)| *hold)
    }

    async fn cancel_order_list(
        &self,
        _creds: &ApiCredentials,
        _symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError> {
        let hook = self
            .before_cancel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(hook) = hook {
            hook().await;
        }
        YieldNow::default().await;
        let mut state = self.lock();
        if let Some(Some(err)) = state.list_cancel_faults.pop_front() {
            return Err(err);
        }
        let Some(sold) = state.cancel_list(list_client_id) else {
            return Ok(ListCancelOutcome::NotOpen);
        };
        if state.unreported_cancels > 0 {
            state.unreported_cancels -= 1;
            return Ok(ListCancelOutcome::Canceled(None));
        }
        Ok(ListCancelOutcome::Canceled(Some(sold)))
    }
}

/// BTCUSDT with Binance's real filters (tick 0.01, step 0.00001, min
/// notional 5, five stop orders per symbol) and order types (no market stop).
pub fn btcusdt_rules() -> SymbolRules {
    SymbolRules {
        symbol: btc_usdt(),
        trading: true,
        oco_allowed: true,
        order_types: crate::symbol::OrderTypes::MAJOR,
        tick: crate::money::TickSize::new(dec("0.01")).expect("literal tick"),
        min_price: Some(price("0.01")),
        max_price: Some(price("1000000")),
        step: crate::money::StepSize::new(dec("0.00001")).expect("literal step"),
        min_qty: qty("0.00001"),
        max_qty: Some(qty("9000")),
        min_notional: dec("5"),
        max_notional: Some(dec("9000000")),
        percent_price_by_side: Some(crate::symbol::PercentPriceBySide {
            bid_up: dec("5"),
            bid_down: dec("0.2"),
            ask_up: dec("5"),
            ask_down: dec("0.2"),
        }),
        max_num_orders: Some(200),
        max_num_algo_orders: Some(5),
        max_num_order_lists: Some(20),
        // Binance's BTCUSDT has MARKET_LOT_SIZE maxQty ≈ 128.5; left off so
        // that no test's exit depends on it unless it sets it.
        market_lot_size: None,
    }
}

/// A failed expectation of the store behaviour suite.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// An expectation did not hold.
    #[error("store behaviour: {0}")]
    Expectation(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(SuiteError::Expectation(format!($($msg)+)));
        }
    };
}

fn dec(s: &str) -> Decimal {
    s.parse().expect("literal decimal")
}

fn qty(s: &str) -> Qty {
    Qty::new(dec(s)).expect("literal quantity")
}

fn price(s: &str) -> Price {
    Price::new(dec(s)).expect("literal price")
}

fn btc_usdt() -> crate::symbol::Symbol {
    crate::symbol::Symbol {
        name: "BTCUSDT".into(),
        base: Asset("BTC".into()),
        quote: Asset("USDT".into()),
    }
}

fn fill(trade_id: i64, q: &str, p: &str, fee: &str, fee_asset: &str) -> Fill {
    Fill {
        trade_id,
        price: price(p),
        qty: qty(q),
        commission: dec(fee),
        commission_asset: Asset(fee_asset.into()),
        time: Millis(1_000 + trade_id),
    }
}

/// Runs the behaviour every [`Store`] must have on a fresh, empty store:
/// accounts and secrets, entries, monotonic evidence, atomic claims,
/// compare-and-set leg updates, history and reconcile flags.
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn store_behaviour(store: &dyn Store) -> Result<(), SuiteError> {
    let creds = ApiCredentials {
        api_key: "suite-key".into(),
        secret: SecretString::from("suite-secret"),
    };
    let account = store
        .create_account(NewAccount {
            owner: "alice".into(),
            exchange: "binance".into(),
            credentials: creds.clone(),
            protection: ProtectionConfig::DEFAULT,
        })
        .await?;
    ensure!(account.active, "a new account is active");
    ensure!(
        account.protection == ProtectionConfig::DEFAULT,
        "protection settings round-trip"
    );
    let dup = store
        .create_account(NewAccount {
            owner: "bob".into(),
            exchange: "binance".into(),
            credentials: creds.clone(),
            protection: ProtectionConfig::DEFAULT,
        })
        .await;
    ensure!(
        matches!(dup, Err(StoreError::Conflict(_))),
        "a second account with the same key is a conflict, got {dup:?}"
    );
    let back = store.credentials(account.id).await?;
    ensure!(
        back.secret.expose_secret() == "suite-secret",
        "the secret round-trips"
    );
    ensure!(
        !format!("{back:?}").contains("suite-secret"),
        "Debug of credentials hides the secret"
    );
    ensure!(
        store.account(AccountId(account.id.0 + 1000)).await.is_err(),
        "an unknown account is not found"
    );

    let mut protection = ProtectionConfig::DEFAULT;
    protection.split = Decimal::ONE;
    let updated = store
        .update_account(account.id, Some(protection), None)
        .await?;
    ensure!(
        updated.protection.split == Decimal::ONE && updated.active,
        "account settings update, the active flag as it was: {updated:?}"
    );
    let disabled = store.update_account(account.id, None, Some(false)).await?;
    ensure!(
        !disabled.active && disabled.protection.split == Decimal::ONE,
        "the active flag changes alone, the settings as they were: {disabled:?}"
    );
    let settings_only = store
        .update_account(account.id, Some(ProtectionConfig::DEFAULT), None)
        .await?;
    ensure!(
        !settings_only.active,
        "a settings change leaves a disabled account disabled: {settings_only:?}"
    );
    let enabled = store
        .update_account(account.id, Some(protection), Some(true))
        .await?;
    ensure!(
        enabled.active && enabled.protection.split == Decimal::ONE,
        "both change together: {enabled:?}"
    );
    ensure!(
        store.update_account(account.id, None, None).await? == enabled,
        "no change answers the account as it is"
    );
    ensure!(
        store.active_accounts().await?.len() == 1,
        "one active account"
    );

    let new_entry = NewEntry {
        account: account.id,
        symbol: btc_usdt(),
        kind: crate::model::EntryKind::Market,
        size: OrderSize::Base(qty("1")),
        levels: crate::levels::EntryLevels {
            tp1: Some(price("101")),
            tp2: Some(price("102")),
            sl: Some(price("99")),
        },
        tags: crate::model::EntryTags {
            signal_id: Some("sig-1".into()),
            portfolio_id: None,
        },
        idempotency_key: None,
    };
    let id_of = |id: EntryId| ClientOrderId::new(format!("t-E-{id}")).expect("literal id");
    let entry = store
        .create_entry(new_entry.clone(), &id_of, Millis(10))
        .await?;
    ensure!(
        entry.status == EntryStatus::PendingNew,
        "a new entry is pending"
    );
    ensure!(
        entry.client_id.as_str() == format!("t-E-{}", entry.id),
        "client id comes from the id"
    );
    let read = store.entry(entry.id).await?;
    ensure!(read == entry, "entry round-trips: {read:?} vs {entry:?}");
    ensure!(
        read.levels.sl == Some(price("99")),
        "levels are stored with the entry"
    );
    ensure!(
        read.tags.signal_id.as_deref() == Some("sig-1"),
        "tags are stored"
    );

    // Evidence: newer first, then an older, smaller snapshot; nothing may go back.
    let full = Evidence {
        order_id: Some(77),
        status: EntryStatus::Filled,
        executed_qty: qty("1"),
        cumulative_quote: dec("100"),
        fills: vec![
            fill(1, "0.4", "100", "0.0004", "BTC"),
            fill(2, "0.6", "100", "0.06", "USDT"),
        ],
        holding: None,
        observed_at: Millis(20),
    };
    let partial = Evidence {
        order_id: Some(77),
        status: EntryStatus::PartiallyFilled,
        executed_qty: qty("0.4"),
        cumulative_quote: dec("40"),
        fills: vec![fill(1, "0.4", "100", "0.0004", "BTC")],
        holding: None,
        observed_at: Millis(15),
    };
    let after_full = store.record_evidence(entry.id, &full).await?;
    let after_old = store.record_evidence(entry.id, &partial).await?;
    ensure!(
        after_old.status == EntryStatus::Filled,
        "status never goes back, got {}",
        after_old.status
    );
    ensure!(
        after_old.executed_qty == qty("1"),
        "executed never goes back, got {}",
        after_old.executed_qty
    );
    ensure!(
        after_old.cumulative_quote == dec("100"),
        "quote never goes back"
    );
    ensure!(
        after_old.base_commission == qty("0.0004"),
        "only base-asset fees count, once each, got {}",
        after_old.base_commission
    );
    ensure!(
        after_old.fees.of(&Asset("BTC".into())) == dec("0.0004")
            && after_old.fees.of(&Asset("USDT".into())) == dec("0.06")
            && after_old.fees.iter().count() == 2
            && store.entry(entry.id).await?.fees == after_old.fees,
        "the fills' fees are kept by asset, once each, got {:?}",
        after_old.fees
    );
    ensure!(
        after_old.net_qty() == qty("0.9996"),
        "net = filled - base fee"
    );
    ensure!(after_old.order_id == Some(77), "order id is kept");
    ensure!(
        after_full.filled_at == Some(Millis(1_001)),
        "filled_at is the first trade's time, got {:?}",
        after_full.filled_at
    );
    ensure!(
        after_old.protection == Protection::Unprotected,
        "a filled entry starts unprotected"
    );
    ensure!(
        store
            .open_entries(account.id)
            .await?
            .iter()
            .any(|e| e.id == entry.id),
        "a filled, unprotected entry is open"
    );

    // Evidence seen on another account's stream touches nothing; on its own
    // account it merges like `record_evidence`.
    let more = Evidence {
        fills: vec![fill(3, "0.5", "100", "0", "BNB")],
        executed_qty: qty("1.5"),
        cumulative_quote: dec("150"),
        ..full.clone()
    };
    let elsewhere = store
        .record_evidence_of(AccountId(account.id.0 + 1_000), entry.id, &more)
        .await?;
    ensure!(
        elsewhere.is_none(),
        "evidence of another account is refused, got {elsewhere:?}"
    );
    ensure!(
        store.entry(entry.id).await? == after_old,
        "refused evidence leaves the entry as it was"
    );
    let missing = store
        .record_evidence_of(account.id, EntryId(i64::MAX - 7), &more)
        .await?;
    ensure!(missing.is_none(), "no such entry: None, not an error");
    let owned = store
        .record_evidence_of(account.id, entry.id, &more)
        .await?
        .ok_or_else(|| SuiteError::Expectation("the account's own entry was refused".into()))?;
    ensure!(
        owned.executed_qty == qty("1.5") && owned.fills_qty == qty("1.5"),
        "evidence of the owning account merges, got {} / {}",
        owned.executed_qty,
        owned.fills_qty
    );
    ensure!(
        owned.base_commission == qty("0.0004"),
        "a fee in another asset adds nothing to the base fee"
    );

    // Claims and compare-and-set updates.
    let key = LegKey {
        entry: entry.id,
        leg: LegIndex::First,
        generation: 0,
    };
    let ids = OcoClientIds {
        list: ClientOrderId::new("t-L-1-1-0").expect("literal id"),
        take_profit: ClientOrderId::new("t-T-1-1-0").expect("literal id"),
        stop_loss: ClientOrderId::new("t-S-1-1-0").expect("literal id"),
    };
    let claim = LegClaim {
        key,
        ids,
        symbol: "BTCUSDT".into(),
        qty: qty("0.5"),
        take_profit: price("101"),
        stop: price("99"),
        stop_limit: Some(price("98.5")),
        source: crate::model::Source::Websocket,
        at: Millis(30),
    };
    let claims = futures_util::future::join_all((0..50).map(|_| store.claim_leg(&claim))).await;
    let won = claims.iter().filter(|c| matches!(c, Ok(true))).count();
    ensure!(
        won == 1,
        "exactly one of 50 concurrent claimers wins, got {won}"
    );
    ensure!(
        claims.iter().all(Result::is_ok),
        "losing claims are not errors"
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs.len() == 1 && legs[0].state == LegState::Claimed,
        "one claimed leg"
    );
    ensure!(
        legs[0].stop_limit == Some(price("98.5")) && legs[0].qty == qty("0.5"),
        "leg prices round-trip"
    );
    let placed = LegUpdate {
        key,
        from: "claimed",
        to: LegState::Placed { list_id: 9 },
        error: None,
        at: Millis(31),
    };
    ensure!(
        store.update_leg(&placed).await?,
        "claimed -> placed applies"
    );
    ensure!(
        !store.update_leg(&placed).await?,
        "a second claimed -> placed does not"
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs[0].state == LegState::Placed { list_id: 9 },
        "placed with its list id"
    );
    let not_placed = LegUpdate {
        key,
        from: "placed",
        to: LegState::NotPlaced {
            code: Some(-2010),
            reason: "why".into(),
        },
        error: Some("boom".into()),
        at: Millis(32),
    };
    ensure!(
        store.update_leg(&not_placed).await?,
        "placed -> not placed applies"
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs[0].state == not_placed.to,
        "state with code and reason round-trips: {:?}",
        legs[0].state
    );
    ensure!(
        legs[0].last_error.as_deref() == Some("boom"),
        "last error is kept"
    );

    let sold_big = LegSold {
        take_profit: qty("0.3"),
        take_profit_quote: dec("30.3"),
        ..LegSold::default()
    };
    let sold_small = LegSold {
        take_profit: qty("0.1"),
        take_profit_quote: dec("10.1"),
        stop_loss: qty("0.2"),
        stop_loss_quote: dec("19.8"),
    };
    store.record_leg_sold(key, sold_big, Millis(40)).await?;
    store.record_leg_sold(key, sold_small, Millis(41)).await?;
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs[0].sold == sold_big.merge(sold_small),
        "sold only grows, got {:?}",
        legs[0].sold
    );

    // Trades of the leg's orders count once each, whoever reports them (the
    // stream, a lookup), at once or not.
    let take_profit = [
        fill(501, "0.3", "101", "0.0303", "USDT"),
        fill(502, "0.1", "101", "0.00002", "BNB"),
    ];
    store
        .record_leg_trades(key, SaleSide::TakeProfit, &take_profit)
        .await?;
    let stop = [fill(503, "0.2", "99", "0.0198", "USDT")];
    let (a, b) = futures_util::future::join(
        store.record_leg_trades(key, SaleSide::TakeProfit, &take_profit),
        store.record_leg_trades(key, SaleSide::StopLoss, &stop),
    )
    .await;
    a?;
    b?;
    let late = [fill(504, "0.05", "101", "0.00505", "USDT")];
    let (a, b) = futures_util::future::join(
        store.record_leg_trades(key, SaleSide::TakeProfit, &late),
        store.record_leg_trades(key, SaleSide::TakeProfit, &late),
    )
    .await;
    a?;
    b?;
    let legs = store.legs(entry.id).await?;
    let usdt = Asset("USDT".into());
    let bnb = Asset("BNB".into());
    ensure!(
        legs[0].trades.take_profit_qty == qty("0.45")
            && legs[0].trades.stop_loss_qty == qty("0.2")
            && legs[0].trades.fees.of(&usdt) == dec("0.05515")
            && legs[0].trades.fees.of(&bnb) == dec("0.00002")
            && legs[0].trades.fees.iter().count() == 2,
        "each leg trade counts once, got {:?}",
        legs[0].trades
    );
    ensure!(
        legs[0].sold == sold_big.merge(sold_small),
        "trades leave what the leg sold as it was, got {:?}",
        legs[0].sold
    );
    let stranger = LegKey {
        generation: 7,
        ..key
    };
    ensure!(
        matches!(
            store
                .record_leg_trades(stranger, SaleSide::TakeProfit, &late)
                .await,
            Err(StoreError::NotFound { .. })
        ),
        "trades of an unknown leg are refused"
    );

    // The rest of a partly filled take-profit, canceled by ocoguard: the one
    // move out of an external end, written as a compare-and-set like any other.
    let rest = LegKey {
        leg: LegIndex::Second,
        ..key
    };
    let rest_claim = LegClaim {
        key: rest,
        ids: OcoClientIds {
            list: ClientOrderId::new("t-L-1-2-0").expect("literal id"),
            take_profit: ClientOrderId::new("t-T-1-2-0").expect("literal id"),
            stop_loss: ClientOrderId::new("t-S-1-2-0").expect("literal id"),
        },
        ..claim.clone()
    };
    ensure!(store.claim_leg(&rest_claim).await?, "second leg claimed");
    let moves = [
        ("claimed", LegState::Placed { list_id: 10 }),
        (
            "placed",
            LegState::CanceledExternally {
                why: crate::state::ExternalEnd::TakeProfitPartial,
            },
        ),
        ("canceled_externally", LegState::Replaced),
    ];
    for (from, to) in moves {
        let update = LegUpdate {
            key: rest,
            from,
            to: to.clone(),
            error: None,
            at: Millis(42),
        };
        ensure!(store.update_leg(&update).await?, "{from} -> {to} applies");
    }
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs.iter().find(|l| l.key == rest).map(|l| &l.state) == Some(&LegState::Replaced),
        "a canceled take-profit rest reads replaced: {legs:?}"
    );

    // Protection state, closing, history.
    store
        .set_protection(
            entry.id,
            &Protection::Protected {
                at: Millis(50),
                by: crate::model::Source::Sync,
            },
        )
        .await?;
    let e = store.entry(entry.id).await?;
    ensure!(
        e.protection
            == Protection::Protected {
                at: Millis(50),
                by: crate::model::Source::Sync
            },
        "protection round-trips, got {:?}",
        e.protection
    );
    store
        .append_event(&event(entry.id, "a", "first", None, Millis(1)))
        .await?;
    store
        .append_event(&event(
            entry.id,
            "b",
            "second",
            Some(crate::model::Source::Direct),
            Millis(2),
        ))
        .await?;
    let history = store.events(entry.id).await?;
    ensure!(
        history.iter().map(|h| h.kind.as_str()).collect::<Vec<_>>() == ["a", "b"],
        "history is append-only and ordered"
    );
    store
        .close_entry(entry.id, Realized::complete(dec("-1.5")), Millis(60))
        .await?;
    let e = store.entry(entry.id).await?;
    ensure!(
        e.protection == Protection::Closed && e.realized_quote == Some(dec("-1.5")),
        "closed with its result"
    );
    ensure!(
        !store
            .open_entries(account.id)
            .await?
            .iter()
            .any(|x| x.id == entry.id),
        "a closed entry is not open"
    );
    // A protection write from a copy of the entry read before it closed (a
    // placer whose take-profit filled while it placed) leaves it closed.
    let stale = Protection::Protected {
        at: Millis(61),
        by: crate::model::Source::Websocket,
    };
    store.set_protection(entry.id, &stale).await?;
    let written = store
        .record_outcomes(entry.id, &[], &[], Some(&stale))
        .await?;
    let e = store.entry(entry.id).await?;
    ensure!(
        e.protection == Protection::Closed
            && written.entry.protection == Protection::Closed
            && e.realized_quote == Some(dec("-1.5")),
        "a closed entry stays closed under a protection write, got {:?} ({:?} answered)",
        e.protection,
        written.entry.protection
    );
    // A sale recorded after the close: closing again replaces the result.
    // Its result leaving out commissions of sales learnt by lookup says so.
    let partial = Realized {
        quote: dec("2.25"),
        fees_complete: false,
    };
    store.close_entry(entry.id, partial, Millis(62)).await?;
    let e = store.entry(entry.id).await?;
    ensure!(
        e.protection == Protection::Closed
            && e.realized_quote == Some(dec("2.25"))
            && !e.fees_complete,
        "closed again with the new result, its commissions incomplete, got {:?} {}",
        e.realized_quote,
        e.fees_complete
    );
    store
        .close_entry(entry.id, Realized::complete(dec("2.25")), Millis(63))
        .await?;
    ensure!(
        store.entry(entry.id).await?.fees_complete,
        "a recount with every commission says so"
    );
    let read = store.entry(entry.id).await?;
    store
        .exit_entry(entry.id, "late", Realized::complete(dec("-3")), &read)
        .await?;
    let e = store.entry(entry.id).await?;
    ensure!(
        e.protection == Protection::Closed && e.realized_quote == Some(dec("2.25")),
        "an exit recorded from a copy read before the close leaves it closed, got {:?} {:?}",
        e.protection,
        e.realized_quote
    );

    // An exit settles the coins it sold, not the order: while the order can
    // still fill the entry is open, and coins filled after the exit make it
    // unprotected again.
    let exited = store
        .create_entry(new_entry.clone(), &id_of, Millis(61))
        .await?;
    let part = Evidence {
        order_id: Some(78),
        status: EntryStatus::PartiallyFilled,
        executed_qty: qty("0.4"),
        cumulative_quote: dec("40"),
        fills: vec![fill(901, "0.4", "100", "0", "BNB")],
        holding: None,
        observed_at: Millis(62),
    };
    store.record_evidence(exited.id, &part).await?;
    let why = Protection::Exited {
        reason: "late".into(),
    };
    let read = store.entry(exited.id).await?;
    ensure!(
        store
            .exit_entry(exited.id, "late", Realized::complete(dec("-0.8")), &read)
            .await?,
        "an exit of the entry as read is written"
    );
    let e = store.entry(exited.id).await?;
    ensure!(
        e.protection == why && e.realized_quote == Some(dec("-0.8")),
        "an exit is recorded with its reason and result, got {:?} {:?}",
        e.protection,
        e.realized_quote
    );
    let is_open = |entries: Vec<Entry>| entries.iter().any(|x| x.id == exited.id);
    ensure!(
        is_open(store.open_entries(account.id).await?),
        "an exited entry whose order can still fill is open"
    );
    let rest = Evidence {
        status: EntryStatus::Filled,
        executed_qty: qty("1"),
        cumulative_quote: dec("100"),
        fills: vec![
            fill(901, "0.4", "100", "0", "BNB"),
            fill(902, "0.6", "100", "0", "BNB"),
        ],
        observed_at: Millis(63),
        ..part.clone()
    };
    let stale = store.entry(exited.id).await?;
    let after = store.record_evidence(exited.id, &rest).await?;
    // An exit's recount read before those coins filled must not write
    // `Exited` over the entry they reopened.
    ensure!(
        !store
            .exit_entry(exited.id, "late", Realized::complete(dec("-9")), &stale)
            .await?,
        "an exit from a read the entry has left behind is refused"
    );
    ensure!(
        after.protection == Protection::Unprotected
            && store.entry(exited.id).await?.protection == Protection::Unprotected,
        "coins filled after an exit are unprotected, got {:?}",
        after.protection
    );
    ensure!(
        after.realized_quote.is_none() && store.entry(exited.id).await?.realized_quote.is_none(),
        "coins filled after an exit drop its result until the entry closes, got {:?}",
        after.realized_quote
    );
    let read = store.entry(exited.id).await?;
    store
        .exit_entry(exited.id, "late", Realized::complete(dec("-1.5")), &read)
        .await?;
    store
        .set_protection(
            exited.id,
            &Protection::Protected {
                at: Millis(63),
                by: crate::model::Source::Sync,
            },
        )
        .await?;
    let e = store.entry(exited.id).await?;
    ensure!(
        matches!(e.protection, Protection::Protected { .. }) && e.realized_quote.is_none(),
        "an exited entry protected again has no result, got {:?} {:?}",
        e.protection,
        e.realized_quote
    );
    ensure!(
        is_open(store.open_entries(account.id).await?),
        "an entry with coins filled after its exit is open"
    );
    let read = store.entry(exited.id).await?;
    store
        .exit_entry(exited.id, "late", Realized::complete(dec("-1.25")), &read)
        .await?;
    store.record_evidence(exited.id, &rest).await?;
    let e = store.entry(exited.id).await?;
    ensure!(
        e.protection == why && e.realized_quote == Some(dec("-1.25")),
        "evidence already known leaves an exit and its result as they are, got {:?} {:?}",
        e.protection,
        e.realized_quote
    );
    ensure!(
        !is_open(store.open_entries(account.id).await?),
        "an exited entry whose order is done is not open"
    );

    // Reconcile flags are taken once.
    store.flag_reconcile(account.id, "gap", Millis(70)).await?;
    store
        .flag_reconcile(account.id, "gap again", Millis(71))
        .await?;
    let (a, b) = futures_util::future::join(store.take_flagged(10), store.take_flagged(10)).await;
    let taken = a?.len() + b?.len();
    ensure!(
        taken == 1,
        "a flagged account is taken exactly once, got {taken}"
    );
    ensure!(
        store.take_flagged(10).await?.is_empty(),
        "flags are cleared when taken"
    );
    store
        .flag_reconcile_many(
            &[
                (account.id, "stream opened".to_owned()),
                (account.id, "stream opened again".to_owned()),
            ],
            Millis(72),
        )
        .await?;
    ensure!(
        store.take_flagged(10).await? == [account.id],
        "two flags of one account in one write flag it once"
    );
    ensure!(
        matches!(
            store
                .flag_reconcile(AccountId(account.id.0 + 10_000), "gap", Millis(73))
                .await,
            Err(StoreError::NotFound { .. })
        ),
        "an unknown account is not flagged"
    );
    due_behaviour(store, account.id).await?;
    batch_behaviour(store, account.id).await?;
    fence_behaviour(store, account.id).await
}

/// A claim fenced right before its send is not taken over until the claim
/// timeout has run again from the fence; a claim taken over cannot be fenced
/// (its claimant sends nothing); of a fence and a takeover racing, exactly one
/// applies.
async fn fence_behaviour(store: &dyn Store, account: AccountId) -> Result<(), SuiteError> {
    const STALE: std::time::Duration = std::time::Duration::from_secs(30);
    let id_of = |id: EntryId| ClientOrderId::new(format!("t-E-{id}")).expect("literal id");
    let entry = store
        .create_entry(
            NewEntry {
                account,
                symbol: btc_usdt(),
                kind: crate::model::EntryKind::Market,
                size: OrderSize::Base(qty("1")),
                levels: crate::levels::EntryLevels::default(),
                tags: crate::model::EntryTags::default(),
                idempotency_key: None,
            },
            &id_of,
            Millis(1_000),
        )
        .await?;
    let key = |leg: LegIndex| LegKey {
        entry: entry.id,
        leg,
        generation: 0,
    };
    let claim = |leg: LegIndex| {
        let id = |k: &str| {
            ClientOrderId::new(format!("f-{k}-{}-{}-0", entry.id, leg.number()))
                .expect("literal id")
        };
        LegClaim {
            key: key(leg),
            ids: OcoClientIds {
                list: id("L"),
                take_profit: id("T"),
                stop_loss: id("S"),
            },
            symbol: "BTCUSDT".into(),
            qty: qty("0.5"),
            take_profit: price("101"),
            stop: price("99"),
            stop_limit: None,
            source: crate::model::Source::Sync,
            at: Millis(1_000),
        }
    };
    let (first, second) = (key(LegIndex::First), key(LegIndex::Second));
    let won = store
        .claim_legs(&[claim(LegIndex::First), claim(LegIndex::Second)])
        .await?;
    ensure!(won == [true, true], "both legs claimed, got {won:?}");
    let take = |key: LegKey, at: i64| LegUpdate {
        key,
        from: "claimed",
        to: LegState::NotPlaced {
            code: None,
            reason: "lookup found no such list".into(),
        },
        error: None,
        at: Millis(at),
    };
    ensure!(
        !store.take_over_leg(&take(first, 31_000), STALE).await?,
        "a claim exactly the timeout old is not taken over"
    );
    let fenced = store
        .fence_legs(entry.id, &[first, second], Millis(20_000))
        .await?;
    ensure!(
        fenced == [true, true],
        "claimed legs are fenced, got {fenced:?}"
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs.iter()
            .all(|l| l.state == LegState::Claimed && l.updated_at == Millis(20_000)),
        "a fence keeps the claim and stamps it: {legs:?}"
    );
    ensure!(
        !store.take_over_leg(&take(first, 45_000), STALE).await?,
        "a claim fenced 25 s ago is not taken over, though claimed 44 s ago"
    );
    ensure!(
        store.legs(entry.id).await?[0].state == LegState::Claimed,
        "a refused takeover changes nothing"
    );
    ensure!(
        store.take_over_leg(&take(first, 50_001), STALE).await?,
        "a claim unwritten for longer than the timeout is taken over"
    );
    ensure!(
        !store.take_over_leg(&take(first, 90_000), STALE).await?,
        "a leg taken over is not taken again"
    );
    let fenced = store
        .fence_legs(entry.id, &[first, second], Millis(50_002))
        .await?;
    ensure!(
        fenced == [false, true],
        "a claim taken over cannot be fenced, got {fenced:?}"
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        matches!(legs[0].state, LegState::NotPlaced { .. }) && legs[1].state == LegState::Claimed,
        "a refused fence changes nothing: {legs:?}"
    );
    // The claimant's fence and a taker's compare-and-set race: one applies.
    let (fence, taken) = futures_util::future::join(
        store.fence_legs(entry.id, &[second], Millis(90_000)),
        store.take_over_leg(&take(second, 90_000), STALE),
    )
    .await;
    let (fence, taken) = (fence?, taken?);
    ensure!(
        (fence == [true]) != taken,
        "exactly one of a racing fence and takeover applies, got {fence:?} and {taken}"
    );
    let missing = LegKey {
        generation: 7,
        ..first
    };
    ensure!(
        matches!(
            store.take_over_leg(&take(missing, 90_000), STALE).await,
            Err(StoreError::NotFound { .. })
        ),
        "taking over a leg that does not exist is an error"
    );
    Ok(())
}

/// Claims of several legs in one write, and outcomes recorded together.
async fn batch_behaviour(store: &dyn Store, account: AccountId) -> Result<(), SuiteError> {
    let id_of = |id: EntryId| ClientOrderId::new(format!("t-E-{id}")).expect("literal id");
    let entry = store
        .create_entry(
            NewEntry {
                account,
                symbol: btc_usdt(),
                kind: crate::model::EntryKind::Market,
                size: OrderSize::Base(qty("1")),
                levels: crate::levels::EntryLevels::default(),
                tags: crate::model::EntryTags::default(),
                idempotency_key: None,
            },
            &id_of,
            Millis(100),
        )
        .await?;
    let claim = |leg: LegIndex, generation: u32| {
        let key = LegKey {
            entry: entry.id,
            leg,
            generation,
        };
        let id = |k: &str| {
            ClientOrderId::new(format!("t-{k}-{}-{}-{generation}", entry.id, leg.number()))
                .expect("literal id")
        };
        LegClaim {
            key,
            ids: OcoClientIds {
                list: id("L"),
                take_profit: id("T"),
                stop_loss: id("S"),
            },
            symbol: "BTCUSDT".into(),
            qty: qty("0.5"),
            take_profit: price("101"),
            stop: price("99"),
            stop_limit: None,
            source: crate::model::Source::Websocket,
            at: Millis(110),
        }
    };
    let generation0 = [claim(LegIndex::First, 0), claim(LegIndex::Second, 0)];
    let results =
        futures_util::future::join_all((0..10).map(|_| store.claim_legs(&generation0))).await;
    let mut wins = [0usize; 2];
    for r in results {
        for (i, won) in r?.into_iter().enumerate() {
            wins[i] += usize::from(won);
        }
    }
    ensure!(
        wins == [1, 1],
        "each leg of a batch claim is won by exactly one of 10 callers: {wins:?}"
    );
    let mixed = store
        .claim_legs(&[claim(LegIndex::First, 0), claim(LegIndex::First, 1)])
        .await?;
    ensure!(
        mixed == [false, true],
        "a batch claim answers per leg: {mixed:?}"
    );
    ensure!(store.legs(entry.id).await?.len() == 3, "three legs claimed");

    let update = |leg: LegIndex, generation: u32, from: &'static str| LegUpdate {
        key: LegKey {
            entry: entry.id,
            leg,
            generation,
        },
        from,
        to: LegState::Placed { list_id: 7 },
        error: None,
        at: Millis(120),
    };
    let before = store.events(entry.id).await?.len();
    let missing = store
        .record_outcomes(
            entry.id,
            &[
                update(LegIndex::First, 0, "claimed"),
                update(LegIndex::Second, 9, "claimed"),
            ],
            &[event(entry.id, "leg_placed", "x", None, Millis(120))],
            None,
        )
        .await;
    ensure!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "an unknown leg fails the whole record: {missing:?}"
    );
    ensure!(
        store.events(entry.id).await?.len() == before
            && store
                .legs(entry.id)
                .await?
                .iter()
                .all(|l| l.state == LegState::Claimed),
        "a failed record changes nothing"
    );
    let protected = Protection::Protected {
        at: Millis(121),
        by: crate::model::Source::Websocket,
    };
    let recorded = store
        .record_outcomes(
            entry.id,
            &[
                update(LegIndex::First, 0, "claimed"),
                update(LegIndex::Second, 0, "unknown"),
            ],
            &[
                event(entry.id, "leg_placed", "a", None, Millis(120)),
                event(entry.id, "protected", "b", None, Millis(121)),
            ],
            Some(&protected),
        )
        .await?;
    ensure!(
        recorded.applied == [true, false],
        "each update is compare-and-set: {:?}",
        recorded.applied
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs.iter()
            .filter(|l| l.state == LegState::Placed { list_id: 7 })
            .count()
            == 1,
        "only the matching update applied: {legs:?}"
    );
    let kinds: Vec<String> = store
        .events(entry.id)
        .await?
        .into_iter()
        .skip(before)
        .map(|e| e.kind)
        .collect();
    ensure!(
        kinds == ["leg_placed", "protected"],
        "events appended in order: {kinds:?}"
    );
    let after = store.entry(entry.id).await?;
    ensure!(
        after.protection == protected,
        "protection set with the outcomes"
    );
    ensure!(
        recorded.entry == after,
        "the entry answered is the entry after the write: {:?}",
        recorded.entry
    );
    // Lists that cannot hold the whole position: placed, and the entry
    // unprotectable with the reason, in the same write.
    let short = Protection::Unprotectable {
        reason: "position 1 is over LOT_SIZE maxQty 0.3".into(),
    };
    let recorded = store
        .record_outcomes(
            entry.id,
            &[update(LegIndex::Second, 0, "claimed")],
            &[event(entry.id, "unprotectable", "c", None, Millis(122))],
            Some(&short),
        )
        .await?;
    ensure!(
        recorded.applied == [true] && recorded.entry.protection == short,
        "an unprotectable reason is set with the outcomes: {:?}",
        recorded.entry.protection
    );

    // A generation is won whole or not at all, whatever shape each claimer
    // planned: one leg of everything from a smaller fill, or two.
    let one_leg = |generation: u32| {
        [LegClaim {
            qty: qty("1"),
            ..claim(LegIndex::First, generation)
        }]
    };
    let two_legs = |generation: u32| {
        [
            claim(LegIndex::First, generation),
            claim(LegIndex::Second, generation),
        ]
    };
    ensure!(
        store.claim_legs(&one_leg(2)).await? == [true],
        "a one-leg plan claims a free generation"
    );
    let late = store.claim_legs(&two_legs(2)).await?;
    ensure!(
        late == [false, false],
        "a two-leg plan of a generation already claimed wins none of it, not its free second leg: {late:?}"
    );
    ensure!(
        store.claim_legs(&two_legs(3)).await? == [true, true]
            && store.claim_legs(&one_leg(3)).await? == [false],
        "a two-leg plan claims a free generation whole, and a one-leg plan then loses it"
    );
    ensure!(
        store.claim_legs(&one_leg(5)).await? == [true],
        "a one-leg plan claims a free generation"
    );
    let [first, second] = two_legs(5);
    let reversed = store.claim_legs(&[second, first]).await?;
    ensure!(
        reversed == [false, false],
        "the first leg decides whatever the order of the claims: {reversed:?}"
    );
    let racers = futures_util::future::join_all((0..10).map(|i| async move {
        if i % 2 == 0 {
            store.claim_legs(&one_leg(4)).await
        } else {
            store.claim_legs(&two_legs(4)).await
        }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let winners: Vec<&Vec<bool>> = racers.iter().filter(|r| r.contains(&true)).collect();
    ensure!(
        winners.len() == 1 && winners[0].iter().all(|won| *won),
        "of 10 racing claimers of both shapes one wins, all of its legs: {racers:?}"
    );
    let generation4 = store
        .legs(entry.id)
        .await?
        .into_iter()
        .filter(|l| l.key.generation == 4)
        .count();
    ensure!(
        generation4 == winners[0].len(),
        "generation 4 holds the winner's legs only: {generation4}"
    );
    Ok(())
}

/// Periodic reconciliation shared by several takers, on a store whose only
/// account so far is `first` (active).
async fn due_behaviour(store: &dyn Store, first: AccountId) -> Result<(), SuiteError> {
    let hour = Duration::from_secs(3600);
    let short = Duration::from_millis(300);
    let new_account = |key: &str| NewAccount {
        owner: "carol".into(),
        exchange: "binance".into(),
        credentials: ApiCredentials {
            api_key: key.into(),
            secret: SecretString::from("suite-secret-2"),
        },
        protection: ProtectionConfig::DEFAULT,
    };
    let second = store.create_account(new_account("suite-key-2")).await?.id;
    let off = store.create_account(new_account("suite-key-3")).await?.id;
    store.update_account(off, None, Some(false)).await?;

    let (a, b) = futures_util::future::join(
        store.take_due_accounts("sync-a", hour, short, 1),
        store.take_due_accounts("sync-b", hour, short, 1),
    )
    .await;
    let (a, b) = (a?, b?);
    ensure!(
        a.len() == 1 && b.len() == 1 && a != b,
        "two takers split the due accounts: {a:?} and {b:?}"
    );
    let mut both = [a[0], b[0]];
    both.sort();
    ensure!(
        both == [first, second],
        "never-reconciled active accounts are due, inactive ones never: {both:?}"
    );
    let again = store.take_due_accounts("sync-c", hour, hour, 10).await?;
    ensure!(
        again.is_empty(),
        "taken accounts are not taken again: {again:?}"
    );

    // sync-a finishes; sync-b dies: its account is due again once its take expires.
    store
        .mark_reconciled(a[0], std::time::Instant::now())
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let retaken = loop {
        let got = store.take_due_accounts("sync-c", hour, hour, 10).await?;
        if !got.is_empty() {
            break got;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "an expired take makes the account due again"
        );
        YieldNow::default().await;
    };
    ensure!(
        retaken == b,
        "only the dead taker's account comes back, got {retaken:?}"
    );
    store
        .mark_reconciled(b[0], std::time::Instant::now())
        .await?;
    let none = store.take_due_accounts("sync-a", hour, hour, 10).await?;
    ensure!(
        none.is_empty(),
        "an account reconciled within the interval is not due: {none:?}"
    );
    let due = store
        .take_due_accounts("sync-a", Duration::ZERO, hour, 10)
        .await?;
    ensure!(
        due == [first, second],
        "accounts reconciled an interval ago are due again, oldest first: {due:?}"
    );
    let unknown = AccountId(off.0 + 1000);
    ensure!(
        matches!(
            store
                .mark_reconciled(unknown, std::time::Instant::now())
                .await,
            Err(StoreError::NotFound { .. })
        ),
        "marking an unknown account is not found"
    );
    retry_behaviour(store, first, second, off).await
}

/// Deferred reconciliations: `first` and `second` active and taken by
/// `sync-a` for an hour, `off` inactive.
async fn retry_behaviour(
    store: &dyn Store,
    first: AccountId,
    second: AccountId,
    off: AccountId,
) -> Result<(), SuiteError> {
    use std::time::Duration;
    let hour = Duration::from_secs(3600);
    store
        .mark_reconciled(first, std::time::Instant::now())
        .await?;
    store
        .mark_reconciled(second, std::time::Instant::now())
        .await?;
    ensure!(
        store.take_due_retries("sync-a", hour, 10).await?.is_empty(),
        "no retry pending, none taken"
    );
    // A pass of `first` left work undone: due again after the backoff, not before.
    store
        .defer_reconcile(first, Duration::from_millis(300))
        .await?;
    store.defer_reconcile(off, Duration::ZERO).await?;
    let early = store.take_due_retries("sync-a", hour, 10).await?;
    ensure!(
        early.is_empty(),
        "a retry is not taken before its time, nor an inactive account's: {early:?}"
    );
    let periodic = store
        .take_due_accounts("sync-a", Duration::ZERO, hour, 10)
        .await?;
    ensure!(
        periodic == [second],
        "a pending retry holds the account back from the periodic pass too: {periodic:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let retried = loop {
        let got = store.take_due_retries("sync-b", hour, 10).await?;
        if !got.is_empty() {
            break got;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "a deferred account is due once its backoff has passed"
        );
        YieldNow::default().await;
    };
    ensure!(retried == [first], "only the retry is taken: {retried:?}");
    let again = store.take_due_retries("sync-c", hour, 10).await?;
    ensure!(
        again.is_empty(),
        "a taken retry is not taken again: {again:?}"
    );
    let again = store
        .take_due_accounts("sync-c", Duration::ZERO, hour, 10)
        .await?;
    ensure!(again.is_empty(), "nor by the periodic pass: {again:?}");
    // The retry left work undone again: a new retry, and the take ends.
    store.defer_reconcile(first, Duration::ZERO).await?;
    let due = store.take_due_accounts("sync-c", hour, hour, 10).await?;
    ensure!(
        due == [first],
        "a due retry makes the account due within its interval too: {due:?}"
    );
    store
        .mark_reconciled(first, std::time::Instant::now())
        .await?;
    ensure!(
        store.take_due_retries("sync-c", hour, 10).await?.is_empty()
            && store
                .take_due_accounts("sync-c", hour, hour, 10)
                .await?
                .is_empty(),
        "a reconciliation clears the retry"
    );
    let unknown = AccountId(off.0 + 1000);
    ensure!(
        matches!(
            store.defer_reconcile(unknown, Duration::ZERO).await,
            Err(StoreError::NotFound { .. })
        ),
        "deferring an unknown account is not found"
    );
    Ok(())
}

/// Runs the behaviour of [`Store::create_entry`] on a disabled account on a
/// fresh store: refused with [`StoreError::AccountInactive`] naming the
/// account, nothing stored; taken again once the account is enabled; an
/// unknown account is not found.
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn inactive_account_behaviour(store: &dyn Store) -> Result<(), SuiteError> {
    let account = store
        .create_account(NewAccount {
            owner: "dave".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: "inactive-key".into(),
                secret: SecretString::from("inactive-secret"),
            },
            protection: ProtectionConfig::DEFAULT,
        })
        .await?;
    let new_entry = NewEntry {
        account: account.id,
        symbol: btc_usdt(),
        kind: crate::model::EntryKind::Market,
        size: OrderSize::Base(qty("1")),
        levels: crate::levels::EntryLevels::default(),
        tags: crate::model::EntryTags::default(),
        idempotency_key: None,
    };
    let id_of = |id: EntryId| ClientOrderId::new(format!("ia-E-{id}")).expect("literal id");
    store.update_account(account.id, None, Some(false)).await?;
    let refused = store
        .create_entry(new_entry.clone(), &id_of, Millis(10))
        .await;
    ensure!(
        refused
            == Err(StoreError::AccountInactive {
                account: account.id
            }),
        "an entry on a disabled account is refused as inactive, got {refused:?}"
    );
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        message.contains(&format!("account {}", account.id)) && message.contains("disabled"),
        "the refusal names the account and why: '{message}'"
    );
    ensure!(
        store.open_entries(account.id).await?.is_empty(),
        "a refused entry is not stored"
    );

    store.update_account(account.id, None, Some(true)).await?;
    let entry = store
        .create_entry(new_entry.clone(), &id_of, Millis(11))
        .await?;
    let open = store.open_entries(account.id).await?;
    ensure!(
        open.len() == 1 && open[0].id == entry.id,
        "enabled again, the account takes the entry: {open:?}"
    );

    let unknown = AccountId(account.id.0 + 10_000);
    let missing = store
        .create_entry(
            NewEntry {
                account: unknown,
                ..new_entry
            },
            &id_of,
            Millis(12),
        )
        .await;
    ensure!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "an entry on an unknown account is not found, got {missing:?}"
    );
    Ok(())
}

/// Runs the behaviour of idempotency keys ([`NewEntry::idempotency_key`])
/// on a fresh store: an entry under a key its account already used is not
/// stored, and the call answers [`StoreError::IdempotencyKeyUsed`] with the
/// entry as stored now, also once the account is disabled; keys are per
/// account and case-sensitive; entries without a key are all stored; the
/// [`Users`](crate::ports::Users) port finds an entry by its key.
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn idempotency_behaviour<S: Store + crate::ports::Users>(
    store: &S,
) -> Result<(), SuiteError> {
    let mut accounts = Vec::new();
    for key in ["idem-key-a", "idem-key-b"] {
        let account = store
            .create_account(NewAccount {
                owner: "erin".into(),
                exchange: "binance".into(),
                credentials: ApiCredentials {
                    api_key: key.into(),
                    secret: SecretString::from("idem-secret"),
                },
                protection: ProtectionConfig::DEFAULT,
            })
            .await?;
        accounts.push(account.id);
    }
    let (a, b) = (accounts[0], accounts[1]);
    let key = |text: &str| crate::ids::IdempotencyKey::new(text).expect("literal key");
    let new_entry = |account, q: &str, idempotency_key| NewEntry {
        account,
        symbol: btc_usdt(),
        kind: crate::model::EntryKind::Limit { price: price("90") },
        size: OrderSize::Base(qty(q)),
        levels: crate::levels::EntryLevels::default(),
        tags: crate::model::EntryTags::default(),
        idempotency_key,
    };
    let id_of = |id: EntryId| ClientOrderId::new(format!("ik-E-{id}")).expect("literal id");

    let first = store
        .create_entry(new_entry(a, "1", Some(key("retry 1"))), &id_of, Millis(1))
        .await?;
    let seen = store
        .record_evidence(
            first.id,
            &Evidence {
                order_id: Some(7),
                status: EntryStatus::New,
                executed_qty: Qty::ZERO,
                cumulative_quote: Decimal::ZERO,
                fills: vec![],
                holding: None,
                observed_at: Millis(2),
            },
        )
        .await?;
    // Another body under the same key: the store answers with the entry
    // and leaves telling them apart to the caller.
    let again = store
        .create_entry(new_entry(a, "2", Some(key("retry 1"))), &id_of, Millis(3))
        .await;
    ensure!(
        again == Err(StoreError::IdempotencyKeyUsed(Box::new(seen.clone()))),
        "a used key answers with its entry as stored now, got {again:?}"
    );
    let stored = store.entries_of(a, None, 10).await?;
    ensure!(
        stored.len() == 1,
        "nothing stored under a used key: {stored:?}"
    );
    ensure!(
        store.entry_by_idempotency_key(a, &key("retry 1")).await? == Some(seen.clone()),
        "the key finds its entry"
    );
    ensure!(
        store
            .entry_by_idempotency_key(b, &key("retry 1"))
            .await?
            .is_none(),
        "another account's key finds nothing"
    );

    let other_account = store
        .create_entry(new_entry(b, "1", Some(key("retry 1"))), &id_of, Millis(4))
        .await?;
    let other_case = store
        .create_entry(new_entry(a, "1", Some(key("Retry 1"))), &id_of, Millis(5))
        .await?;
    let keyless = [
        store
            .create_entry(new_entry(a, "1", None), &id_of, Millis(6))
            .await?,
        store
            .create_entry(new_entry(a, "1", None), &id_of, Millis(7))
            .await?,
    ];
    let ids: BTreeSet<EntryId> = [first.id, other_account.id, other_case.id]
        .into_iter()
        .chain(keyless.iter().map(|e| e.id))
        .collect();
    ensure!(
        ids.len() == 5,
        "keys are per account and case-sensitive, and entries without one are all stored: {ids:?}"
    );

    store.update_account(a, None, Some(false)).await?;
    let disabled = store
        .create_entry(new_entry(a, "1", Some(key("retry 1"))), &id_of, Millis(8))
        .await;
    ensure!(
        matches!(&disabled, Err(StoreError::IdempotencyKeyUsed(e)) if e.id == first.id),
        "a used key answers with its entry on a disabled account too, got {disabled:?}"
    );
    let fresh = store
        .create_entry(new_entry(a, "1", Some(key("retry 2"))), &id_of, Millis(9))
        .await;
    ensure!(
        fresh == Err(StoreError::AccountInactive { account: a }),
        "a new key on a disabled account is refused as inactive, got {fresh:?}"
    );
    ensure!(
        store
            .entry_by_idempotency_key(a, &key("retry 2"))
            .await?
            .is_none(),
        "a refused entry leaves its key free"
    );
    Ok(())
}

/// Runs the behaviour of [`Store::record_fill_and_claim`] on a fresh store:
/// another account's fill writes nothing; a fill merges and claims what the
/// planner asks, from the merged entry and the context read before; a
/// claim already taken is lost without losing the evidence.
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn fill_claim_behaviour(store: &dyn Store) -> Result<(), SuiteError> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let account = store
        .create_account(NewAccount {
            owner: "carol".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: "fill-claim-key".into(),
                secret: SecretString::from("fill-claim-secret"),
            },
            protection: ProtectionConfig::DEFAULT,
        })
        .await?;
    let id_of = |id: EntryId| ClientOrderId::new(format!("fc-E-{id}")).expect("literal id");
    let market_entry = |at: i64| {
        store.create_entry(
            NewEntry {
                account: account.id,
                symbol: btc_usdt(),
                kind: crate::model::EntryKind::Market,
                size: OrderSize::Base(qty("1")),
                levels: crate::levels::EntryLevels::default(),
                tags: crate::model::EntryTags::default(),
                idempotency_key: None,
            },
            &id_of,
            Millis(at),
        )
    };
    let entry = market_entry(10).await?;
    // Generation 0's leg `leg` of entry `of`, of `q`.
    let leg_claim = |of: EntryId, leg: LegIndex, q: Qty| {
        let key = LegKey {
            entry: of,
            leg,
            generation: 0,
        };
        let id = |k: &str| {
            ClientOrderId::new(format!("fc-{k}-{of}-{}-0", leg.number())).expect("literal id")
        };
        LegClaim {
            key,
            ids: OcoClientIds {
                list: id("L"),
                take_profit: id("T"),
                stop_loss: id("S"),
            },
            symbol: "BTCUSDT".into(),
            qty: q,
            take_profit: price("101"),
            stop: price("99"),
            stop_limit: None,
            source: crate::model::Source::Websocket,
            at: Millis(20),
        }
    };
    // Plans half and half of what is filled, once there is a fill and no leg.
    let calls = AtomicUsize::new(0);
    let first_only = |merged: &Entry, context: &crate::ports::FillContext| {
        calls.fetch_add(1, Ordering::SeqCst);
        if !context.legs.is_empty() || merged.executed_qty.is_zero() {
            return Vec::new();
        }
        let half = Qty::new(merged.executed_qty.get() / Decimal::TWO).expect("half a quantity");
        vec![
            leg_claim(entry.id, LegIndex::First, half),
            leg_claim(entry.id, LegIndex::Second, half),
        ]
    };
    let filled = Evidence {
        order_id: Some(501),
        status: EntryStatus::Filled,
        executed_qty: qty("1"),
        cumulative_quote: dec("100"),
        fills: vec![fill(501, "1", "100", "0", "BNB")],
        holding: None,
        observed_at: Millis(15),
    };

    let foreign = store
        .record_fill_and_claim(
            AccountId(account.id.0 + 1_000),
            entry.id,
            &filled,
            &first_only,
        )
        .await?;
    ensure!(
        foreign.is_none(),
        "a fill seen on another account's stream is refused"
    );
    ensure!(
        store.entry(entry.id).await? == entry && store.legs(entry.id).await?.is_empty(),
        "a refused fill writes nothing"
    );

    let accepted = Evidence {
        status: EntryStatus::New,
        executed_qty: Qty::ZERO,
        cumulative_quote: Decimal::ZERO,
        fills: Vec::new(),
        ..filled.clone()
    };
    let recorded = store
        .record_fill_and_claim(account.id, entry.id, &accepted, &first_only)
        .await?
        .ok_or_else(|| SuiteError::Expectation("the account's own entry was refused".into()))?;
    ensure!(
        recorded.entry.status == EntryStatus::New && recorded.claims.is_empty(),
        "an acceptance records its status and claims nothing, got {:?} / {} claims",
        recorded.entry.status,
        recorded.claims.len()
    );
    ensure!(
        recorded.context.credentials.api_key == "fill-claim-key"
            && recorded.context.account.id == account.id,
        "the context is the account's"
    );

    let recorded = store
        .record_fill_and_claim(account.id, entry.id, &filled, &first_only)
        .await?
        .ok_or_else(|| SuiteError::Expectation("the account's own fill was refused".into()))?;
    ensure!(
        recorded.entry.executed_qty == qty("1") && recorded.entry.fills_qty == qty("1"),
        "the fill is merged, got {} / {}",
        recorded.entry.executed_qty,
        recorded.entry.fills_qty
    );
    ensure!(
        recorded.entry == store.entry(entry.id).await?,
        "the entry answered is the entry stored"
    );
    ensure!(
        recorded.context.legs.is_empty(),
        "the legs are read before the claim"
    );
    ensure!(
        recorded.claims.len() == 2 && recorded.won == vec![true, true],
        "both planned legs are claimed, got {:?}",
        recorded.won
    );
    let legs = store.legs(entry.id).await?;
    ensure!(
        legs.len() == 2
            && legs
                .iter()
                .all(|l| l.state == LegState::Claimed && l.qty == qty("0.5")),
        "the claims are stored with the planned sizes, got {legs:?}"
    );

    // Seen again (another layer, a replay): nothing new, and the planner sees the legs.
    let again = store
        .record_fill_and_claim(account.id, entry.id, &filled, &first_only)
        .await?
        .ok_or_else(|| SuiteError::Expectation("a replayed fill was refused".into()))?;
    ensure!(
        again.context.legs.len() == 2 && again.claims.is_empty(),
        "a replay claims nothing once legs exist"
    );

    // A planner that claims generation 0 again loses it, and the new fill still lands.
    let stubborn = |_: &Entry, _: &crate::ports::FillContext| {
        vec![leg_claim(entry.id, LegIndex::First, qty("0.25"))]
    };
    let more = Evidence {
        fills: vec![
            fill(501, "1", "100", "0", "BNB"),
            fill(502, "0.5", "100", "0", "BNB"),
        ],
        executed_qty: qty("1.5"),
        cumulative_quote: dec("150"),
        ..filled.clone()
    };
    let lost = store
        .record_fill_and_claim(account.id, entry.id, &more, &stubborn)
        .await?
        .ok_or_else(|| SuiteError::Expectation("a further fill was refused".into()))?;
    ensure!(
        lost.won == vec![false],
        "a leg already claimed is lost, got {:?}",
        lost.won
    );
    ensure!(
        store.entry(entry.id).await?.fills_qty == qty("1.5"),
        "the evidence lands even when its claim is lost"
    );
    ensure!(
        store
            .legs(entry.id)
            .await?
            .iter()
            .all(|l| l.qty == qty("0.5")),
        "a lost claim changes no leg"
    );
    ensure!(
        calls.load(Ordering::SeqCst) >= 3,
        "the planner is asked on every fill of the account"
    );

    // Another layer recorded the fill first (api, sync): nothing left to
    // merge, and the stream's call still claims the legs.
    let third = market_entry(25).await?;
    let known = Evidence {
        fills: vec![fill(701, "1", "100", "0", "BNB")],
        ..filled.clone()
    };
    store.record_evidence(third.id, &known).await?;
    let plan_third = |merged: &Entry, context: &crate::ports::FillContext| {
        if context.legs.is_empty() && !merged.executed_qty.is_zero() {
            vec![
                leg_claim(third.id, LegIndex::First, qty("0.5")),
                leg_claim(third.id, LegIndex::Second, qty("0.5")),
            ]
        } else {
            Vec::new()
        }
    };
    let late = store
        .record_fill_and_claim(account.id, third.id, &known, &plan_third)
        .await?
        .ok_or_else(|| SuiteError::Expectation("a recorded fill was refused".into()))?;
    ensure!(
        late.won == vec![true, true] && store.legs(third.id).await?.len() == 2,
        "a fill another layer recorded first still has its legs claimed, got {:?}",
        late.won
    );

    // Racing callers, each with a different part of the fills of a second
    // entry: every fill lands, and each leg is won by exactly one of them.
    let racing = market_entry(30).await?;
    let plan_racing = |_: &Entry, context: &crate::ports::FillContext| {
        if context.legs.is_empty() {
            vec![
                leg_claim(racing.id, LegIndex::First, qty("0.1")),
                leg_claim(racing.id, LegIndex::Second, qty("0.1")),
            ]
        } else {
            Vec::new()
        }
    };
    let parts: Vec<Evidence> = (1..=8i64)
        .map(|k| Evidence {
            order_id: Some(600),
            status: if k == 8 {
                EntryStatus::Filled
            } else {
                EntryStatus::PartiallyFilled
            },
            executed_qty: Qty::new(Decimal::new(k, 1)).expect("a quantity"),
            cumulative_quote: Decimal::new(k * 10, 0),
            fills: vec![fill(600 + k, "0.1", "100", "0", "BNB")],
            holding: None,
            observed_at: Millis(40 + k),
        })
        .collect();
    let results = futures_util::future::join_all(
        parts
            .iter()
            .map(|ev| store.record_fill_and_claim(account.id, racing.id, ev, &plan_racing)),
    )
    .await;
    let mut wins = [0usize; 2];
    for result in results {
        let recorded = result?.ok_or_else(|| {
            SuiteError::Expectation("a racing fill of the account was refused".into())
        })?;
        for (claim, won) in recorded.claims.iter().zip(&recorded.won) {
            if *won {
                wins[usize::from(claim.key.leg == LegIndex::Second)] += 1;
            }
        }
    }
    ensure!(
        wins == [1, 1],
        "each leg is won exactly once across racing callers, got {wins:?}"
    );
    let merged = store.entry(racing.id).await?;
    ensure!(
        merged.fills_qty == qty("0.8") && merged.executed_qty == qty("0.8"),
        "every racing fill lands, got {} / {}",
        merged.fills_qty,
        merged.executed_qty
    );
    ensure!(
        store.legs(racing.id).await?.len() == 2,
        "two legs are stored for the racing entry"
    );
    Ok(())
}

/// Runs the lease behaviour every [`Leases`](crate::ports::Leases) store must
/// have, on a store holding exactly two active accounts and no leases.
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn lease_behaviour(leases: &dyn crate::ports::Leases) -> Result<(), SuiteError> {
    use std::time::Duration;
    let long = Duration::from_secs(60);
    let a = leases.acquire_leases("gw-a", 10, long).await?;
    ensure!(
        a.len() == 2 && a.iter().all(|(_, taken_over)| !taken_over),
        "gw-a takes both free accounts: {a:?}"
    );
    let b = leases.acquire_leases("gw-b", 10, long).await?;
    ensure!(b.is_empty(), "held leases are not taken: {b:?}");
    ensure!(
        leases.renew_leases("gw-a", long).await?.len() == 2,
        "gw-a renews both"
    );
    leases.release_leases("gw-a").await?;
    let b = leases
        .acquire_leases("gw-b", 1, Duration::from_millis(200))
        .await?;
    ensure!(
        b.len() == 1,
        "released leases are free; max is respected: {b:?}"
    );
    // Let gw-b's short lease expire: gw-a takes it over and is told so.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let a = leases.acquire_leases("gw-a", 10, long).await?;
        if a.iter()
            .any(|(id, taken_over)| *id == b[0].0 && *taken_over)
        {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "an expired lease moves to another holder"
        );
        YieldNow::default().await;
    }
    ensure!(
        leases.renew_leases("gw-b", long).await?.is_empty(),
        "the old holder lost it"
    );
    Ok(())
}

/// Runs the behaviour every [`Users`](crate::ports::Users) store must have,
/// on a fresh, empty store that also implements [`Store`].
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn users_behaviour<S: Store + crate::ports::Users>(store: &S) -> Result<(), SuiteError> {
    store.create_user("alice", "hash-a").await?;
    store.create_user("bob", "hash-b").await?;
    let dup = store.create_user("alice", "hash-c").await;
    ensure!(
        matches!(dup, Err(StoreError::Conflict(_))),
        "a taken name is a conflict, got {dup:?}"
    );
    ensure!(
        store.user_by_token("hash-b").await?.as_deref() == Some("bob"),
        "token hash finds its user"
    );
    ensure!(
        store.user_by_token("nope").await?.is_none(),
        "an unknown token finds nobody"
    );
    let mut ids = Vec::new();
    for (owner, key) in [("alice", "ka"), ("bob", "kb")] {
        let a = store
            .create_account(NewAccount {
                owner: owner.into(),
                exchange: "binance".into(),
                credentials: ApiCredentials {
                    api_key: key.into(),
                    secret: SecretString::from("s"),
                },
                protection: ProtectionConfig::DEFAULT,
            })
            .await?;
        ids.push(a.id);
    }
    let alice = store.accounts_of("alice").await?;
    ensure!(
        alice.len() == 1 && alice[0].id == ids[0],
        "a user sees only their accounts: {alice:?}"
    );
    let new_entry = |account| NewEntry {
        account,
        symbol: btc_usdt(),
        kind: crate::model::EntryKind::Limit { price: price("90") },
        size: OrderSize::Base(qty("0.1")),
        levels: crate::levels::EntryLevels::default(),
        tags: crate::model::EntryTags::default(),
        idempotency_key: None,
    };
    let id_of = |id: EntryId| ClientOrderId::new(format!("u-E-{id}")).expect("literal id");
    let first = store
        .create_entry(new_entry(ids[0]), &id_of, Millis(1))
        .await?;
    let second = store
        .create_entry(new_entry(ids[0]), &id_of, Millis(2))
        .await?;
    store
        .create_entry(new_entry(ids[1]), &id_of, Millis(3))
        .await?;
    store
        .record_evidence(
            first.id,
            &Evidence {
                order_id: Some(1),
                status: EntryStatus::New,
                executed_qty: Qty::ZERO,
                cumulative_quote: Decimal::ZERO,
                fills: vec![],
                holding: None,
                observed_at: Millis(4),
            },
        )
        .await?;
    let all = store.entries_of(ids[0], None, 10).await?;
    ensure!(
        all.iter().map(|e| e.id).collect::<Vec<_>>() == vec![second.id, first.id],
        "entries of one account, newest first: {all:?}"
    );
    let new = store.entries_of(ids[0], Some(EntryStatus::New), 10).await?;
    ensure!(
        new.len() == 1 && new[0].id == first.id,
        "filtered by status"
    );
    ensure!(
        store.entries_of(ids[0], None, 1).await?.len() == 1,
        "limited"
    );
    Ok(())
}

/// Runs the behaviour every [`crate::ports::Coverage`] must have on a fresh,
/// empty store that also implements [`Store`]: which entries count as filled,
/// protected and unprotected, per owner and overall, the oldest unprotected
/// first, placements by layer, and each owner's recent history.
///
/// # Errors
/// The first expectation that does not hold, or a store failure.
pub async fn coverage_behaviour<S: Store + crate::ports::Coverage>(
    store: &S,
) -> Result<(), SuiteError> {
    use crate::model::{Protection, Source};
    let empty = store.coverage(None, 10).await?;
    ensure!(
        empty.filled == 0 && empty.ratio_ppm() == 1_000_000 && empty.unprotected.is_empty(),
        "an empty store is fully covered: {empty:?}"
    );
    let mut accounts = Vec::new();
    for (owner, key) in [("alice", "cov-a"), ("bob", "cov-b")] {
        let a = store
            .create_account(NewAccount {
                owner: owner.into(),
                exchange: "binance".into(),
                credentials: ApiCredentials {
                    api_key: key.into(),
                    secret: SecretString::from("s"),
                },
                protection: ProtectionConfig::DEFAULT,
            })
            .await?;
        accounts.push(a.id);
    }
    let (alice, bob) = (accounts[0], accounts[1]);
    let id_of = |id: EntryId| ClientOrderId::new(format!("c-E-{id}")).expect("literal id");
    // Entry `n` fills (when it does) with trade `n`, at time 1_000 + n.
    let entry = |account, n: i64, filled: bool| async move {
        let e = store
            .create_entry(
                NewEntry {
                    account,
                    symbol: btc_usdt(),
                    kind: crate::model::EntryKind::Market,
                    size: OrderSize::Base(qty("1")),
                    levels: crate::levels::EntryLevels::default(),
                    tags: crate::model::EntryTags::default(),
                    idempotency_key: None,
                },
                &id_of,
                Millis(n),
            )
            .await?;
        if filled {
            store
                .record_evidence(
                    e.id,
                    &Evidence {
                        order_id: Some(n),
                        status: EntryStatus::Filled,
                        executed_qty: qty("1"),
                        cumulative_quote: dec("100"),
                        fills: vec![fill(n, "1", "100", "0", "USDT")],
                        holding: None,
                        observed_at: Millis(2_000 + n),
                    },
                )
                .await?;
        }
        Ok::<_, SuiteError>(e)
    };
    let protected = entry(alice, 1, true).await?;
    let late = entry(alice, 3, true).await?;
    let early = entry(alice, 2, true).await?;
    let resting = entry(alice, 4, false).await?;
    let closed = entry(alice, 5, true).await?;
    let stuck = entry(alice, 6, true).await?;
    let bobs = entry(bob, 7, true).await?;
    let leg = |e: &crate::model::Entry, leg: LegIndex, source: Source| LegClaim {
        key: LegKey {
            entry: e.id,
            leg,
            generation: 0,
        },
        ids: OcoClientIds {
            list: ClientOrderId::new(format!("c-L-{}-{}", e.id, leg.number())).expect("id"),
            take_profit: ClientOrderId::new(format!("c-T-{}-{}", e.id, leg.number())).expect("id"),
            stop_loss: ClientOrderId::new(format!("c-S-{}-{}", e.id, leg.number())).expect("id"),
        },
        symbol: "BTCUSDT".into(),
        qty: qty("0.5"),
        take_profit: price("101"),
        stop: price("99"),
        stop_limit: None,
        source,
        at: Millis(3_000),
    };
    let placed = |claim: &LegClaim| LegUpdate {
        key: claim.key,
        from: "claimed",
        to: LegState::Placed { list_id: 1 },
        error: None,
        at: Millis(3_001),
    };
    for (e, l, source, acked) in [
        (&protected, LegIndex::First, Source::Websocket, true),
        (&protected, LegIndex::Second, Source::Websocket, true),
        (&closed, LegIndex::First, Source::Direct, true),
        (&bobs, LegIndex::First, Source::Sync, true),
        // Claimed but never acknowledged: not a placement.
        (&early, LegIndex::First, Source::Sync, false),
    ] {
        let claim = leg(e, l, source);
        ensure!(store.claim_leg(&claim).await?, "claim {}", claim.key);
        if acked {
            ensure!(
                store.update_leg(&placed(&claim)).await?,
                "place {}",
                claim.key
            );
        }
    }
    store
        .set_protection(
            protected.id,
            &Protection::Protected {
                at: Millis(3_002),
                by: Source::Websocket,
            },
        )
        .await?;
    store.set_protection(closed.id, &Protection::Closed).await?;
    store
        .set_protection(
            stuck.id,
            &Protection::Unprotectable {
                reason: "below the minimum notional".into(),
            },
        )
        .await?;
    store
        .set_protection(
            bobs.id,
            &Protection::Protected {
                at: Millis(3_003),
                by: Source::Sync,
            },
        )
        .await?;
    for (e, kind, at) in [
        (&protected, "protected", 10),
        (&bobs, "protected", 11),
        (&stuck, "unprotectable", 12),
        (&early, "first", 13),
        (&early, "second", 13),
    ] {
        store
            .append_event(&crate::ports::event(e.id, kind, "d", None, Millis(at)))
            .await?;
    }

    let a = store.coverage(Some("alice"), 10).await?;
    ensure!(
        a.filled == 4 && a.protected == 1 && a.unprotected_count == 3,
        "alice: protected, two unprotected and one unprotectable entry are filled; the resting and closed ones are not: {a:?}"
    );
    ensure!(
        a.ratio_ppm() == 250_000,
        "alice's ratio, got {}",
        a.ratio_ppm()
    );
    let order: Vec<(EntryId, Millis, &str)> = a
        .unprotected
        .iter()
        .map(|u| (u.entry, u.filled_at, u.state))
        .collect();
    ensure!(
        order
            == vec![
                (early.id, Millis(1_002), "unprotected"),
                (late.id, Millis(1_003), "unprotected"),
                (stuck.id, Millis(1_006), "unprotectable"),
            ],
        "unprotected entries, oldest first fill first, with their state: {order:?}"
    );
    let first = &a.unprotected[0];
    ensure!(
        first.account == alice
            && first.symbol == "BTCUSDT"
            && first.client_id == early.client_id.to_string(),
        "an unprotected entry names its account, symbol and client id: {first:?}"
    );
    ensure!(
        a.placements
            == vec![
                (Source::Websocket, 2),
                (Source::Sync, 0),
                (Source::Direct, 1)
            ],
        "alice's acknowledged lists by layer (a bare claim is not one): {:?}",
        a.placements
    );
    ensure!(
        !a.unprotected.iter().any(|u| u.entry == resting.id),
        "an entry that has not filled is not exposed"
    );
    let all = store.coverage(None, 2).await?;
    ensure!(
        all.filled == 5 && all.protected == 2 && all.unprotected_count == 3,
        "every account: {all:?}"
    );
    ensure!(
        all.unprotected.len() == 2 && all.unprotected[0].entry == early.id,
        "the limit keeps the oldest: {:?}",
        all.unprotected
    );
    ensure!(
        all.placements
            == vec![
                (Source::Websocket, 2),
                (Source::Sync, 1),
                (Source::Direct, 1)
            ],
        "every account's lists by layer: {:?}",
        all.placements
    );
    let b = store.coverage(Some("bob"), 10).await?;
    ensure!(
        b.filled == 1 && b.protected == 1 && b.unprotected.is_empty() && b.ratio_ppm() == 1_000_000,
        "bob is covered: {b:?}"
    );
    ensure!(
        store.coverage(Some("nobody"), 10).await?.filled == 0,
        "an unknown owner has nothing"
    );

    let events = store.recent_events("alice", 3).await?;
    let seen: Vec<(EntryId, &str)> = events.iter().map(|e| (e.entry, e.kind.as_str())).collect();
    ensure!(
        seen == vec![
            (early.id, "second"),
            (early.id, "first"),
            (stuck.id, "unprotectable")
        ],
        "alice's latest events, newest first, written order reversed within a moment, limited: {seen:?}"
    );
    ensure!(
        store
            .recent_events("bob", 10)
            .await?
            .iter()
            .all(|e| e.entry == bobs.id),
        "bob sees only his entries' events"
    );
    Ok(())
}
