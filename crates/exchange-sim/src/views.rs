//! Wire shapes (REST answers and user-data events) with Binance's field names and order.

use rust_decimal::Decimal;
use serde::Serialize;

use crate::util::ser8;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AckView {
    pub symbol: String,
    pub order_id: u64,
    pub order_list_id: i64,
    pub client_order_id: String,
    pub transact_time: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FillView {
    #[serde(serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub commission: Decimal,
    pub commission_asset: String,
    pub trade_id: u64,
}

/// `RESULT` / `FULL` placement answer and order-list `orderReports` entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ResultView {
    pub symbol: String,
    pub order_id: u64,
    pub order_list_id: i64,
    pub client_order_id: String,
    pub transact_time: u64,
    #[serde(serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub orig_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub executed_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub orig_quote_order_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub cummulative_quote_qty: Decimal,
    pub status: &'static str,
    pub time_in_force: &'static str,
    #[serde(rename = "type")]
    pub order_type: &'static str,
    pub side: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_price: Option<String>,
    pub working_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iceberg_qty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fills: Option<Vec<FillView>>,
    pub self_trade_prevention_mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_reason: Option<&'static str>,
}

/// `DELETE /api/v3/order` answer and cancel `orderReports` entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CancelView {
    pub symbol: String,
    pub orig_client_order_id: String,
    pub order_id: u64,
    pub order_list_id: i64,
    pub client_order_id: String,
    pub transact_time: u64,
    #[serde(serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub orig_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub executed_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub orig_quote_order_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub cummulative_quote_qty: Decimal,
    pub status: &'static str,
    pub time_in_force: &'static str,
    #[serde(rename = "type")]
    pub order_type: &'static str,
    pub side: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iceberg_qty: Option<String>,
    pub self_trade_prevention_mode: &'static str,
}

/// `GET /api/v3/order` answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QueryView {
    pub symbol: String,
    pub order_id: u64,
    pub order_list_id: i64,
    pub client_order_id: String,
    #[serde(serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub orig_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub executed_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub cummulative_quote_qty: Decimal,
    pub status: &'static str,
    pub time_in_force: &'static str,
    #[serde(rename = "type")]
    pub order_type: &'static str,
    pub side: &'static str,
    #[serde(serialize_with = "ser8")]
    pub stop_price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub iceberg_qty: Decimal,
    pub time: u64,
    pub update_time: u64,
    pub is_working: bool,
    pub working_time: i64,
    #[serde(serialize_with = "ser8")]
    pub orig_quote_order_qty: Decimal,
    pub self_trade_prevention_mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_reason: Option<&'static str>,
}

/// `GET /api/v3/openOrders` / `allOrders` entry (same fields, Binance's order).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OpenOrderView {
    pub symbol: String,
    pub order_id: u64,
    pub order_list_id: i64,
    pub client_order_id: String,
    #[serde(serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub orig_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub executed_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub cummulative_quote_qty: Decimal,
    pub status: &'static str,
    pub time_in_force: &'static str,
    #[serde(rename = "type")]
    pub order_type: &'static str,
    pub side: &'static str,
    #[serde(serialize_with = "ser8")]
    pub stop_price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub iceberg_qty: Decimal,
    pub time: u64,
    pub update_time: u64,
    pub is_working: bool,
    #[serde(serialize_with = "ser8")]
    pub orig_quote_order_qty: Decimal,
    pub working_time: i64,
    pub self_trade_prevention_mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListOrderRef {
    pub symbol: String,
    pub order_id: u64,
    pub client_order_id: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub(crate) enum ReportView {
    Ack(AckView),
    Result(ResultView),
    Cancel(CancelView),
}

/// Order list header (+ `orderReports` on placement and cancel).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListView {
    pub order_list_id: i64,
    pub contingency_type: &'static str,
    pub list_status_type: &'static str,
    pub list_order_status: &'static str,
    pub list_client_order_id: String,
    pub transaction_time: u64,
    pub symbol: String,
    pub orders: Vec<ListOrderRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_reports: Option<Vec<ReportView>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TradeView {
    pub symbol: String,
    pub id: u64,
    pub order_id: u64,
    pub order_list_id: i64,
    #[serde(serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(serialize_with = "ser8")]
    pub qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub quote_qty: Decimal,
    #[serde(serialize_with = "ser8")]
    pub commission: Decimal,
    pub commission_asset: String,
    pub time: u64,
    pub is_buyer: bool,
    pub is_maker: bool,
    pub is_best_match: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BalanceView {
    pub asset: String,
    #[serde(serialize_with = "ser8")]
    pub free: Decimal,
    #[serde(serialize_with = "ser8")]
    pub locked: Decimal,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CommissionRatesView {
    pub maker: String,
    pub taker: String,
    pub buyer: String,
    pub seller: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AccountView {
    pub maker_commission: i64,
    pub taker_commission: i64,
    pub buyer_commission: i64,
    pub seller_commission: i64,
    pub commission_rates: CommissionRatesView,
    pub can_trade: bool,
    pub can_withdraw: bool,
    pub can_deposit: bool,
    pub brokered: bool,
    pub require_self_trade_prevention: bool,
    pub prevent_sor: bool,
    pub update_time: u64,
    pub account_type: &'static str,
    pub balances: Vec<BalanceView>,
    pub permissions: Vec<&'static str>,
    pub uid: u64,
}

/// `executionReport` with every documented field (single-letter keys, Binance's order).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ExecReport {
    #[serde(rename = "e")]
    pub e: &'static str,
    #[serde(rename = "E")]
    pub event_time: u64,
    #[serde(rename = "s")]
    pub symbol: String,
    #[serde(rename = "c")]
    pub client_order_id: String,
    #[serde(rename = "S")]
    pub side: &'static str,
    #[serde(rename = "o")]
    pub order_type: &'static str,
    #[serde(rename = "f")]
    pub tif: &'static str,
    #[serde(rename = "q", serialize_with = "ser8")]
    pub qty: Decimal,
    #[serde(rename = "p", serialize_with = "ser8")]
    pub price: Decimal,
    #[serde(rename = "P", serialize_with = "ser8")]
    pub stop_price: Decimal,
    #[serde(rename = "F", serialize_with = "ser8")]
    pub iceberg_qty: Decimal,
    #[serde(rename = "g")]
    pub order_list_id: i64,
    #[serde(rename = "C")]
    pub orig_client_order_id: String,
    #[serde(rename = "x")]
    pub exec_type: &'static str,
    #[serde(rename = "X")]
    pub status: &'static str,
    #[serde(rename = "r")]
    pub reject_reason: &'static str,
    #[serde(rename = "i")]
    pub order_id: u64,
    #[serde(rename = "l", serialize_with = "ser8")]
    pub last_qty: Decimal,
    #[serde(rename = "z", serialize_with = "ser8")]
    pub cum_qty: Decimal,
    #[serde(rename = "L", serialize_with = "ser8")]
    pub last_price: Decimal,
    #[serde(rename = "n")]
    pub commission: String,
    #[serde(rename = "N")]
    pub commission_asset: Option<String>,
    #[serde(rename = "T")]
    pub transact_time: u64,
    #[serde(rename = "t")]
    pub trade_id: i64,
    #[serde(rename = "I")]
    pub exec_id: u64,
    #[serde(rename = "w")]
    pub on_book: bool,
    #[serde(rename = "m")]
    pub maker: bool,
    #[serde(rename = "M")]
    pub ignore: bool,
    #[serde(rename = "O")]
    pub created: u64,
    #[serde(rename = "Z", serialize_with = "ser8")]
    pub cum_quote: Decimal,
    #[serde(rename = "Y", serialize_with = "ser8")]
    pub last_quote: Decimal,
    #[serde(rename = "Q", serialize_with = "ser8")]
    pub quote_order_qty: Decimal,
    #[serde(rename = "W", skip_serializing_if = "Option::is_none")]
    pub working_time: Option<u64>,
    #[serde(rename = "V")]
    pub stp: &'static str,
    #[serde(rename = "eR", skip_serializing_if = "Option::is_none")]
    pub expiry_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ListOrderEventRef {
    pub s: String,
    pub i: u64,
    pub c: String,
}

/// `listStatus` event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ListStatusEvent {
    pub e: &'static str,
    #[serde(rename = "E")]
    pub event_time: u64,
    pub s: String,
    pub g: i64,
    pub c: &'static str,
    pub l: &'static str,
    #[serde(rename = "L")]
    pub list_order_status: &'static str,
    pub r: &'static str,
    #[serde(rename = "C")]
    pub list_client_order_id: String,
    #[serde(rename = "T")]
    pub transact_time: u64,
    #[serde(rename = "O")]
    pub orders: Vec<ListOrderEventRef>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct PositionBalance {
    pub a: String,
    #[serde(serialize_with = "ser8")]
    pub f: Decimal,
    #[serde(serialize_with = "ser8")]
    pub l: Decimal,
}

/// `outboundAccountPosition` event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PositionEvent {
    pub e: &'static str,
    #[serde(rename = "E")]
    pub event_time: u64,
    pub u: u64,
    #[serde(rename = "B")]
    pub balances: Vec<PositionBalance>,
}

/// `balanceUpdate` event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BalanceUpdateEvent {
    pub e: &'static str,
    #[serde(rename = "E")]
    pub event_time: u64,
    pub a: String,
    #[serde(serialize_with = "ser8")]
    pub d: Decimal,
    #[serde(rename = "T")]
    pub clear_time: u64,
}
