//! Binance JSON shapes and their explicit conversion into `oco-core` types.
//! Strict types as Binance sends them: decimals as strings (parsed through
//! `Price`/`Qty`), ids and times as integers. Unknown fields, filter types and
//! symbol statuses are tolerated.

use std::str::FromStr;

use oco_core::ports::{
    Balance, ExecutionUpdate, ListOrderSnapshot, ListUpdate, OcoAck, OrderListSnapshot,
    OrderSnapshot, Side, StreamEvent,
};
use oco_core::state::LegSold;
use oco_core::symbol::{MarketLotSize, OrderTypes, PercentPriceBySide};
use oco_core::{
    Asset, EntryStatus, Fill, Millis, Price, Qty, StepSize, Symbol, SymbolRules, TickSize,
};
use rust_decimal::Decimal;
use serde::Deserialize;

/// A payload that does not have the expected shape or values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn perr(what: impl Into<String>) -> ParseError {
    ParseError(what.into())
}

/// Parses JSON text into a wire type.
///
/// # Errors
/// [`ParseError`] naming the serde failure.
pub fn from_json<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, ParseError> {
    serde_json::from_str(text).map_err(|e| perr(e.to_string()))
}

fn price(field: &str, s: &str) -> Result<Price, ParseError> {
    Price::from_str(s).map_err(|e| perr(format!("{field}: {e}")))
}

fn qty(field: &str, s: &str) -> Result<Qty, ParseError> {
    Qty::from_str(s).map_err(|e| perr(format!("{field}: {e}")))
}

/// A non-negative plain decimal (quote amounts, commissions, multipliers).
fn amount(field: &str, s: &str) -> Result<Decimal, ParseError> {
    qty(field, s).map(Qty::get)
}

/// A quote amount that Binance may report as negative on old orders
/// (`cummulativeQuoteQty` < 0 means unknown): read as zero then.
fn quote_amount(field: &str, s: &str) -> Result<Decimal, ParseError> {
    if s.starts_with('-') {
        return Ok(Decimal::ZERO);
    }
    amount(field, s)
}

/// `"0"` disables a bound.
fn optional_price(field: &str, s: &str) -> Result<Option<Price>, ParseError> {
    let v = amount(field, s)?;
    if v.is_zero() {
        Ok(None)
    } else {
        price(field, s).map(Some)
    }
}

/// Binance's error body `{"code": -1121, "msg": "Invalid symbol."}`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ApiErrorBody {
    /// Negative error code.
    pub code: i64,
    /// Message, word for word.
    pub msg: String,
}

/// An order status as Binance spells it.
///
/// # Errors
/// [`ParseError`] for an unknown status.
pub fn order_status(s: &str) -> Result<EntryStatus, ParseError> {
    Ok(match s {
        "NEW" => EntryStatus::New,
        "PENDING_NEW" => EntryStatus::PendingNew,
        "PARTIALLY_FILLED" => EntryStatus::PartiallyFilled,
        "FILLED" => EntryStatus::Filled,
        // PENDING_CANCEL is documented as unused; it is still on its way to canceled.
        "CANCELED" | "PENDING_CANCEL" => EntryStatus::Canceled,
        "EXPIRED" | "EXPIRED_IN_MATCH" => EntryStatus::Expired,
        "REJECTED" => EntryStatus::Rejected,
        other => return Err(perr(format!("unknown order status '{other}'"))),
    })
}

fn side(s: &str) -> Result<Side, ParseError> {
    match s {
        "BUY" => Ok(Side::Buy),
        "SELL" => Ok(Side::Sell),
        other => Err(perr(format!("unknown side '{other}'"))),
    }
}

// ---------------------------------------------------------------- exchangeInfo

/// `GET /api/v3/exchangeInfo`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExchangeInfo {
    /// Listed symbols.
    pub symbols: Vec<SymbolInfo>,
}

/// One symbol of `exchangeInfo`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymbolInfo {
    /// Name.
    pub symbol: String,
    /// `TRADING`, `HALT`, `BREAK`, `END_OF_DAY`, `CANCEL_ONLY`, or newer.
    pub status: String,
    /// Base asset.
    pub base_asset: String,
    /// Quote asset.
    pub quote_asset: String,
    /// OCO lists allowed.
    #[serde(default)]
    pub oco_allowed: bool,
    /// Allowed order types (`None`: not sent, read as a major's).
    #[serde(default)]
    pub order_types: Option<Vec<String>>,
    /// Filters; unknown ones parse as [`Filter::Other`].
    #[serde(default)]
    pub filters: Vec<Filter>,
}

/// A symbol filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "filterType")]
#[allow(missing_docs)]
pub enum Filter {
    #[serde(rename = "PRICE_FILTER", rename_all = "camelCase")]
    Price {
        min_price: String,
        max_price: String,
        tick_size: String,
    },
    #[serde(rename = "LOT_SIZE", rename_all = "camelCase")]
    LotSize {
        min_qty: String,
        max_qty: String,
        step_size: String,
    },
    #[serde(rename = "MARKET_LOT_SIZE", rename_all = "camelCase")]
    MarketLotSize {
        min_qty: String,
        max_qty: String,
        step_size: String,
    },
    #[serde(rename = "NOTIONAL", rename_all = "camelCase")]
    Notional {
        min_notional: String,
        #[serde(default)]
        max_notional: Option<String>,
    },
    #[serde(rename = "MIN_NOTIONAL", rename_all = "camelCase")]
    MinNotional { min_notional: String },
    #[serde(rename = "PERCENT_PRICE_BY_SIDE", rename_all = "camelCase")]
    PercentPriceBySide {
        bid_multiplier_up: String,
        bid_multiplier_down: String,
        ask_multiplier_up: String,
        ask_multiplier_down: String,
    },
    #[serde(rename = "MAX_NUM_ORDERS", rename_all = "camelCase")]
    MaxNumOrders { max_num_orders: u32 },
    #[serde(rename = "MAX_NUM_ALGO_ORDERS", rename_all = "camelCase")]
    MaxNumAlgoOrders { max_num_algo_orders: u32 },
    #[serde(rename = "MAX_NUM_ORDER_LISTS", rename_all = "camelCase")]
    MaxNumOrderLists { max_num_order_lists: u32 },
    /// Any filter this adapter does not use.
    #[serde(other)]
    Other,
}

impl SymbolInfo {
    /// Types the symbol's rules.
    ///
    /// # Errors
    /// [`ParseError`] when `PRICE_FILTER` or `LOT_SIZE` is missing or a value
    /// is malformed.
    pub fn to_rules(&self) -> Result<SymbolRules, ParseError> {
        let mut tick = None;
        let (mut min_price, mut max_price) = (None, None);
        let mut lot = None;
        let mut market_lot = None;
        let (mut notional, mut legacy_min_notional, mut max_notional) = (None, None, None);
        let mut percent = None;
        let (mut max_orders, mut max_algo, mut max_lists) = (None, None, None);
        for f in &self.filters {
            match f {
                Filter::Price {
                    min_price: lo,
                    max_price: hi,
                    tick_size,
                } => {
                    let t = amount("tickSize", tick_size)?;
                    tick = Some(TickSize::new(t).map_err(|e| perr(format!("tickSize: {e}")))?);
                    min_price = optional_price("minPrice", lo)?;
                    max_price = optional_price("maxPrice", hi)?;
                }
                Filter::LotSize {
                    min_qty,
                    max_qty,
                    step_size,
                } => {
                    let step = StepSize::new(amount("stepSize", step_size)?)
                        .map_err(|e| perr(format!("stepSize: {e}")))?;
                    let min = qty("minQty", min_qty)?;
                    let max = qty("maxQty", max_qty)?;
                    lot = Some((step, min, (!max.is_zero()).then_some(max)));
                }
                Filter::MarketLotSize {
                    min_qty,
                    max_qty,
                    step_size,
                } => {
                    // Zero disables a bound (BTCUSDT sends stepSize 0 with a
                    // maxQty of about 128.5).
                    let non_zero = |field, s| qty(field, s).map(|q| (!q.is_zero()).then_some(q));
                    let step = match non_zero("MARKET_LOT_SIZE stepSize", step_size)? {
                        Some(s) => Some(
                            StepSize::new(s.get())
                                .map_err(|e| perr(format!("MARKET_LOT_SIZE stepSize: {e}")))?,
                        ),
                        None => None,
                    };
                    market_lot = Some(MarketLotSize {
                        min_qty: non_zero("MARKET_LOT_SIZE minQty", min_qty)?,
                        max_qty: non_zero("MARKET_LOT_SIZE maxQty", max_qty)?,
                        step,
                    });
                }
                Filter::Notional {
                    min_notional,
                    max_notional: max,
                } => {
                    notional = Some(amount("minNotional", min_notional)?);
                    if let Some(m) = max {
                        let m = amount("maxNotional", m)?;
                        max_notional = (!m.is_zero()).then_some(m);
                    }
                }
                Filter::MinNotional { min_notional } => {
                    legacy_min_notional = Some(amount("minNotional", min_notional)?);
                }
                Filter::PercentPriceBySide {
                    bid_multiplier_up,
                    bid_multiplier_down,
                    ask_multiplier_up,
                    ask_multiplier_down,
                } => {
                    percent = Some(PercentPriceBySide {
                        bid_up: amount("bidMultiplierUp", bid_multiplier_up)?,
                        bid_down: amount("bidMultiplierDown", bid_multiplier_down)?,
                        ask_up: amount("askMultiplierUp", ask_multiplier_up)?,
                        ask_down: amount("askMultiplierDown", ask_multiplier_down)?,
                    });
                }
                Filter::MaxNumOrders { max_num_orders } => max_orders = Some(*max_num_orders),
                Filter::MaxNumAlgoOrders {
                    max_num_algo_orders,
                } => max_algo = Some(*max_num_algo_orders),
                Filter::MaxNumOrderLists {
                    max_num_order_lists,
                } => max_lists = Some(*max_num_order_lists),
                Filter::Other => {}
            }
        }
        let tick =
            tick.ok_or_else(|| perr(format!("{} has no PRICE_FILTER tick size", self.symbol)))?;
        let (step, min_qty, max_qty) =
            lot.ok_or_else(|| perr(format!("{} has no LOT_SIZE filter", self.symbol)))?;
        Ok(SymbolRules {
            symbol: Symbol {
                name: self.symbol.clone(),
                base: Asset(self.base_asset.clone()),
                quote: Asset(self.quote_asset.clone()),
            },
            trading: self.status == "TRADING",
            oco_allowed: self.oco_allowed,
            // Majors list no STOP_LOSS: a market stop there is refused.
            order_types: self
                .order_types
                .as_ref()
                .map_or(OrderTypes::MAJOR, |names| {
                    OrderTypes::from_names(names.iter().map(String::as_str))
                }),
            tick,
            min_price,
            max_price,
            step,
            min_qty,
            max_qty,
            min_notional: notional.or(legacy_min_notional).unwrap_or(Decimal::ZERO),
            max_notional,
            percent_price_by_side: percent,
            max_num_orders: max_orders,
            max_num_algo_orders: max_algo,
            max_num_order_lists: max_lists,
            market_lot_size: market_lot,
        })
    }
}

// ---------------------------------------------------------------- orders

/// `GET /api/v3/ticker/price?symbol=`.
#[derive(Debug, Clone, Deserialize)]
pub struct TickerPrice {
    /// Symbol.
    pub symbol: String,
    /// Last traded price.
    pub price: String,
}

/// `GET /api/v3/time`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTime {
    /// Server time, ms.
    pub server_time: i64,
}

/// One `fills[]` item of a FULL answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderFill {
    /// Price.
    pub price: String,
    /// Quantity.
    pub qty: String,
    /// Commission.
    pub commission: String,
    /// Commission asset.
    pub commission_asset: String,
    /// Trade id.
    pub trade_id: i64,
}

/// An order: RESULT/FULL placement answers, `GET /api/v3/order`, cancel
/// answers and the `orderReports` of lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderWire {
    /// Symbol.
    pub symbol: String,
    /// Order id.
    pub order_id: i64,
    /// `orderListId` (−1 when alone).
    #[serde(default = "minus_one")]
    pub order_list_id: i64,
    /// Client id (for a cancel answer: the cancel's id).
    pub client_order_id: String,
    /// The order's own id in cancel answers.
    #[serde(default)]
    pub orig_client_order_id: Option<String>,
    /// Placement time (placement and cancel answers).
    #[serde(default)]
    pub transact_time: Option<i64>,
    /// Last update (query answers).
    #[serde(default)]
    pub update_time: Option<i64>,
    /// Filled quantity.
    pub executed_qty: String,
    /// Quote transacted.
    pub cummulative_quote_qty: String,
    /// Status.
    pub status: String,
    /// Type.
    #[serde(rename = "type")]
    pub order_type: String,
    /// Side.
    pub side: String,
    /// Why it expired.
    #[serde(default)]
    pub expiry_reason: Option<String>,
    /// Trades (FULL answers only).
    #[serde(default)]
    pub fills: Vec<OrderFill>,
}

fn minus_one() -> i64 {
    -1
}

impl OrderWire {
    /// The order's own client id (in a cancel answer `clientOrderId` is the
    /// cancel's id).
    pub fn own_client_id(&self) -> &str {
        self.orig_client_order_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.client_order_id)
    }

    /// Types the order; FULL fills are converted with the quote of the
    /// symbol unknown, so their commission asset is kept as sent.
    ///
    /// # Errors
    /// [`ParseError`] on malformed values.
    pub fn to_snapshot(&self) -> Result<OrderSnapshot, ParseError> {
        let time = self.update_time.or(self.transact_time).unwrap_or(0);
        let fills = self
            .fills
            .iter()
            .map(|f| {
                Ok(Fill {
                    trade_id: f.trade_id,
                    price: price("fills.price", &f.price)?,
                    qty: qty("fills.qty", &f.qty)?,
                    commission: amount("fills.commission", &f.commission)?,
                    commission_asset: Asset(f.commission_asset.clone()),
                    time: Millis(time),
                })
            })
            .collect::<Result<Vec<_>, ParseError>>()?;
        Ok(OrderSnapshot {
            order_id: self.order_id,
            client_id: self.own_client_id().to_owned(),
            symbol: self.symbol.clone(),
            status: order_status(&self.status)?,
            executed_qty: qty("executedQty", &self.executed_qty)?,
            cumulative_quote: quote_amount("cummulativeQuoteQty", &self.cummulative_quote_qty)?,
            fills,
            updated_at: Millis(time),
        })
    }

    /// The order as a member of a list.
    ///
    /// # Errors
    /// [`ParseError`] on malformed values.
    pub fn to_list_order(&self) -> Result<ListOrderSnapshot, ParseError> {
        Ok(ListOrderSnapshot {
            client_id: self.own_client_id().to_owned(),
            status: order_status(&self.status)?,
            executed_qty: qty("executedQty", &self.executed_qty)?,
            cumulative_quote: quote_amount("cummulativeQuoteQty", &self.cummulative_quote_qty)?,
            expiry_reason: self.expiry_reason.clone().filter(|r| r != "NONE"),
        })
    }

    /// True for the stop-type leg of an OCO.
    pub fn is_stop_type(&self) -> bool {
        self.order_type.starts_with("STOP_LOSS")
    }
}

/// `orders[]` of a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMember {
    /// Symbol.
    pub symbol: String,
    /// Order id.
    pub order_id: i64,
    /// Client id.
    pub client_order_id: String,
}

/// An order list: OCO placement, `GET /api/v3/orderList`, `openOrderList`,
/// cancel.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderListWire {
    /// `orderListId`.
    pub order_list_id: i64,
    /// `OCO`, `OTO`, ...
    pub contingency_type: String,
    /// `EXEC_STARTED`, `ALL_DONE`, ...
    pub list_status_type: String,
    /// `EXECUTING`, `ALL_DONE`, `REJECT`.
    pub list_order_status: String,
    /// `listClientOrderId`.
    pub list_client_order_id: String,
    /// Time.
    pub transaction_time: i64,
    /// Symbol.
    pub symbol: String,
    /// Member ids.
    pub orders: Vec<ListMember>,
    /// Member states (placement and cancel answers only).
    #[serde(default)]
    pub order_reports: Vec<OrderWire>,
}

impl OrderListWire {
    /// False once the list is done.
    pub fn executing(&self) -> bool {
        self.list_order_status == "EXECUTING"
    }

    /// Which member is the take-profit and which the stop, by our client ids
    /// first, then by order type; never by position.
    fn legs(
        &self,
        tp_client_id: Option<&str>,
        sl_client_id: Option<&str>,
    ) -> (Option<&OrderWire>, Option<&OrderWire>) {
        let by_id = |id: Option<&str>| {
            id.and_then(|id| self.order_reports.iter().find(|r| r.own_client_id() == id))
        };
        let tp =
            by_id(tp_client_id).or_else(|| self.order_reports.iter().find(|r| !r.is_stop_type()));
        let sl =
            by_id(sl_client_id).or_else(|| self.order_reports.iter().find(|r| r.is_stop_type()));
        (tp, sl)
    }

    /// The acknowledgement of a placed OCO.
    ///
    /// # Errors
    /// [`ParseError`] when a leg cannot be identified.
    pub fn to_ack(&self, tp_client_id: &str, sl_client_id: &str) -> Result<OcoAck, ParseError> {
        let member = |id: &str, stop: bool| -> Option<i64> {
            self.orders
                .iter()
                .find(|m| m.client_order_id == id)
                .map(|m| m.order_id)
                .or_else(|| {
                    self.order_reports
                        .iter()
                        .find(|r| r.is_stop_type() == stop)
                        .map(|r| r.order_id)
                })
        };
        let tp = member(tp_client_id, false)
            .ok_or_else(|| perr("OCO answer lacks the take-profit order"))?;
        let sl =
            member(sl_client_id, true).ok_or_else(|| perr("OCO answer lacks the stop order"))?;
        if tp == sl {
            return Err(perr("OCO answer has one order for both legs"));
        }
        Ok(OcoAck {
            list_id: self.order_list_id,
            take_profit_order_id: tp,
            stop_order_id: sl,
        })
    }

    /// The list with whatever leg states the answer carries.
    ///
    /// # Errors
    /// [`ParseError`] on malformed leg values.
    pub fn to_snapshot(
        &self,
        tp_client_id: Option<&str>,
        sl_client_id: Option<&str>,
    ) -> Result<OrderListSnapshot, ParseError> {
        let (tp, sl) = self.legs(tp_client_id, sl_client_id);
        Ok(OrderListSnapshot {
            list_id: self.order_list_id,
            list_client_id: self.list_client_order_id.clone(),
            symbol: self.symbol.clone(),
            executing: self.executing(),
            take_profit: tp.map(OrderWire::to_list_order).transpose()?,
            stop_loss: sl.map(OrderWire::to_list_order).transpose()?,
        })
    }
}

/// The answer to `DELETE /api/v3/orderList`: only its `orderReports` are
/// read, so that a header field gone or renamed never hides what the
/// canceled orders had sold.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListCancelWire {
    /// The state of each order of the list after the cancel.
    #[serde(default)]
    pub order_reports: Vec<OrderWire>,
}

impl ListCancelWire {
    /// What the take-profit and the stop had executed when the list was
    /// canceled; `None` unless the answer reports exactly one of each, both
    /// in a final state (then their quantities can no longer grow).
    ///
    /// # Errors
    /// [`ParseError`] on malformed quantities.
    pub fn to_sold(&self) -> Result<Option<LegSold>, ParseError> {
        let (stops, targets): (Vec<&OrderWire>, Vec<&OrderWire>) =
            self.order_reports.iter().partition(|r| r.is_stop_type());
        let ([sl], [tp]) = (stops.as_slice(), targets.as_slice()) else {
            return Ok(None);
        };
        let (tp, sl) = (tp.to_list_order()?, sl.to_list_order()?);
        if !(tp.status.is_final() && sl.status.is_final()) {
            return Ok(None);
        }
        Ok(Some(LegSold {
            take_profit: tp.executed_qty,
            take_profit_quote: tp.cumulative_quote,
            stop_loss: sl.executed_qty,
            stop_loss_quote: sl.cumulative_quote,
        }))
    }
}

/// `GET /api/v3/myTrades` item.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TradeWire {
    /// Symbol.
    pub symbol: String,
    /// Trade id.
    pub id: i64,
    /// Order id.
    pub order_id: i64,
    /// Price.
    pub price: String,
    /// Quantity.
    pub qty: String,
    /// Commission.
    pub commission: String,
    /// Commission asset.
    pub commission_asset: String,
    /// Time.
    pub time: i64,
}

impl TradeWire {
    /// Types the trade.
    ///
    /// # Errors
    /// [`ParseError`] on malformed values.
    pub fn to_fill(&self) -> Result<Fill, ParseError> {
        Ok(Fill {
            trade_id: self.id,
            price: price("price", &self.price)?,
            qty: qty("qty", &self.qty)?,
            commission: amount("commission", &self.commission)?,
            commission_asset: Asset(self.commission_asset.clone()),
            time: Millis(self.time),
        })
    }
}

/// `GET /api/v3/account`.
#[derive(Debug, Clone, Deserialize)]
pub struct AccountWire {
    /// Balances.
    pub balances: Vec<BalanceWire>,
}

/// One balance.
#[derive(Debug, Clone, Deserialize)]
pub struct BalanceWire {
    /// Asset.
    pub asset: String,
    /// Free.
    pub free: String,
    /// Locked.
    pub locked: String,
}

impl AccountWire {
    /// Types the balances.
    ///
    /// # Errors
    /// [`ParseError`] on malformed values.
    pub fn to_balances(&self) -> Result<Vec<Balance>, ParseError> {
        self.balances
            .iter()
            .map(|b| {
                Ok(Balance {
                    asset: b.asset.clone(),
                    free: qty("free", &b.free)?,
                    locked: qty("locked", &b.locked)?,
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------- stream

/// A text frame of the WebSocket API: a response to one of our requests, or
/// a user-data event.
#[derive(Debug, Clone, Deserialize)]
pub struct WsFrame {
    /// Request id (responses; `null` for unsolicited errors).
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    /// HTTP-like status (responses).
    #[serde(default)]
    pub status: Option<u16>,
    /// Result (successful responses).
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Error (failed responses).
    #[serde(default)]
    pub error: Option<WsError>,
    /// Subscription the event belongs to.
    #[serde(default, rename = "subscriptionId")]
    pub subscription_id: Option<i64>,
    /// The event (events only).
    #[serde(default)]
    pub event: Option<serde_json::Value>,
    /// Event type of a bare event, outside the `{subscriptionId, event}`
    /// envelope (as the retired listenKey streams sent them).
    #[serde(default, rename = "e")]
    pub bare_event: Option<String>,
}

/// `error` of a WebSocket API response.
#[derive(Debug, Clone, Deserialize)]
pub struct WsError {
    /// Code.
    pub code: i64,
    /// Message.
    pub msg: String,
    /// Extra data (`retryAfter` epoch ms on 418/429).
    #[serde(default)]
    pub data: Option<WsErrorData>,
}

/// `error.data`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WsErrorData {
    /// Epoch ms until which requests are refused.
    #[serde(default)]
    pub retry_after: Option<i64>,
    /// Server time, ms.
    #[serde(default)]
    pub server_time: Option<i64>,
}

/// `executionReport`.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct ExecutionReport {
    #[serde(rename = "E")]
    pub event_time: i64,
    #[serde(rename = "s")]
    pub symbol: String,
    #[serde(rename = "c")]
    pub client_id: String,
    #[serde(rename = "C", default)]
    pub orig_client_id: Option<String>,
    #[serde(rename = "S")]
    pub side: String,
    #[serde(rename = "o")]
    pub order_type: String,
    #[serde(rename = "g")]
    pub list_id: i64,
    #[serde(rename = "x")]
    pub execution: String,
    #[serde(rename = "X")]
    pub status: String,
    #[serde(rename = "i")]
    pub order_id: i64,
    #[serde(rename = "l")]
    pub last_qty: String,
    #[serde(rename = "z")]
    pub cum_qty: String,
    #[serde(rename = "L")]
    pub last_price: String,
    #[serde(rename = "n")]
    pub commission: String,
    #[serde(rename = "N")]
    pub commission_asset: Option<String>,
    #[serde(rename = "T")]
    pub transact_time: i64,
    #[serde(rename = "t")]
    pub trade_id: i64,
    #[serde(rename = "Z")]
    pub cum_quote: String,
    #[serde(rename = "eR", default)]
    pub expiry_reason: Option<String>,
}

impl ExecutionReport {
    /// Types the update; `fill` is set for `TRADE` executions.
    ///
    /// # Errors
    /// [`ParseError`] on malformed values.
    pub fn to_update(&self) -> Result<ExecutionUpdate, ParseError> {
        // For a cancel `c` is the cancel request's id; the order's own is `C`.
        let client_id = self
            .orig_client_id
            .as_deref()
            .filter(|c| !c.is_empty())
            .unwrap_or(&self.client_id)
            .to_owned();
        let fill = if self.execution == "TRADE" {
            Some(Fill {
                trade_id: self.trade_id,
                price: price("L", &self.last_price)?,
                qty: qty("l", &self.last_qty)?,
                commission: amount("n", &self.commission)?,
                commission_asset: Asset(self.commission_asset.clone().unwrap_or_default()),
                time: Millis(self.transact_time),
            })
        } else {
            None
        };
        Ok(ExecutionUpdate {
            symbol: self.symbol.clone(),
            client_id,
            order_id: self.order_id,
            list_id: self.list_id,
            side: side(&self.side)?,
            order_type: self.order_type.clone(),
            execution: self.execution.clone(),
            status: order_status(&self.status)?,
            executed_qty: qty("z", &self.cum_qty)?,
            cumulative_quote: quote_amount("Z", &self.cum_quote)?,
            fill,
            expiry_reason: self.expiry_reason.clone().filter(|r| r != "NONE"),
            event_time: Millis(self.event_time),
        })
    }
}

/// `listStatus`.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct ListStatusEvent {
    #[serde(rename = "E")]
    pub event_time: i64,
    #[serde(rename = "s")]
    pub symbol: String,
    #[serde(rename = "g")]
    pub list_id: i64,
    #[serde(rename = "L")]
    pub list_order_status: String,
    #[serde(rename = "C")]
    pub list_client_id: String,
}

/// `outboundAccountPosition`.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct AccountPosition {
    #[serde(rename = "E")]
    pub event_time: i64,
    #[serde(rename = "B")]
    pub balances: Vec<PositionBalance>,
}

/// One `B[]` item.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct PositionBalance {
    #[serde(rename = "a")]
    pub asset: String,
    #[serde(rename = "f")]
    pub free: String,
    #[serde(rename = "l")]
    pub locked: String,
}

/// What a user-data event means to the session.
// Short-lived, moved once per frame: boxing would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Hand this to the consumer.
    Event(StreamEvent),
    /// The server ends the connection or the subscription: reconnect.
    Reconnect(&'static str),
    /// Nothing the domain uses (`balanceUpdate`, unknown types).
    Ignored(String),
}

/// True for the event types [`decode_event`] hands to the consumer: fills,
/// list updates and balances, which must never be dropped unseen.
pub fn is_known_event(kind: &str) -> bool {
    matches!(
        kind,
        "executionReport" | "listStatus" | "outboundAccountPosition"
    )
}

/// Decodes the inner `event` object of a user-data frame.
///
/// # Errors
/// [`ParseError`] for a known event type with a malformed body.
pub fn decode_event(event: serde_json::Value) -> Result<Decoded, ParseError> {
    let kind = event
        .get("e")
        .and_then(|e| e.as_str())
        .unwrap_or("")
        .to_owned();
    let de = |e: serde_json::Error| perr(format!("{kind}: {e}"));
    Ok(match kind.as_str() {
        "executionReport" => {
            let r: ExecutionReport = serde_json::from_value(event).map_err(de)?;
            Decoded::Event(StreamEvent::Execution(r.to_update()?))
        }
        "listStatus" => {
            let l: ListStatusEvent = serde_json::from_value(event).map_err(de)?;
            Decoded::Event(StreamEvent::List(ListUpdate {
                symbol: l.symbol,
                list_id: l.list_id,
                list_client_id: l.list_client_id,
                executing: l.list_order_status == "EXECUTING",
                event_time: Millis(l.event_time),
            }))
        }
        "outboundAccountPosition" => {
            let p: AccountPosition = serde_json::from_value(event).map_err(de)?;
            let balances = p
                .balances
                .iter()
                .map(|b| {
                    Ok(Balance {
                        asset: b.asset.clone(),
                        free: qty("f", &b.free)?,
                        locked: qty("l", &b.locked)?,
                    })
                })
                .collect::<Result<Vec<_>, ParseError>>()?;
            Decoded::Event(StreamEvent::Balances(balances))
        }
        "serverShutdown" => Decoded::Reconnect("serverShutdown"),
        "eventStreamTerminated" => Decoded::Reconnect("eventStreamTerminated"),
        _ => Decoded::Ignored(kind),
    })
}
