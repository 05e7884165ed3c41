//! Built-in symbols, their filters, static filter checks and the `exchangeInfo` shape.

use rust_decimal::Decimal;
use serde::Serialize;

use crate::engine::OType;
use crate::error::ApiError;
use crate::util::{fmt8, is_multiple};

/// `orderTypes` of Binance's majors (BTCUSDT capture): no plain `STOP_LOSS`
/// nor `TAKE_PROFIT`.
const MAJOR_ORDER_TYPES: [OType; 5] = [
    OType::Limit,
    OType::LimitMaker,
    OType::Market,
    OType::StopLossLimit,
    OType::TakeProfitLimit,
];

/// Every order type, in Binance's order (the documentation's ETHBTC example).
const ALL_ORDER_TYPES: [OType; 7] = [
    OType::Limit,
    OType::LimitMaker,
    OType::Market,
    OType::StopLoss,
    OType::StopLossLimit,
    OType::TakeProfit,
    OType::TakeProfitLimit,
];

/// Static description of one symbol (filters as on Binance).
#[derive(Debug, Clone)]
pub(crate) struct SymbolInfo {
    pub symbol: String,
    pub base: String,
    pub quote: String,
    pub start_price: Decimal,
    pub min_price: Decimal,
    pub max_price: Decimal,
    pub tick: Decimal,
    pub min_qty: Decimal,
    pub max_qty: Decimal,
    pub step: Decimal,
    pub market_min_qty: Decimal,
    pub market_max_qty: Decimal,
    pub market_step: Decimal,
    pub min_notional: Decimal,
    pub max_notional: Decimal,
    pub multiplier_up: Decimal,
    pub multiplier_down: Decimal,
    pub max_num_orders: usize,
    pub max_num_algo_orders: usize,
    pub max_num_order_lists: usize,
    /// `orderTypes`: a type not listed is refused (`-2010`).
    pub order_types: Vec<OType>,
    /// `ocoAllowed`.
    pub oco_allowed: bool,
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn spot(
    symbol: &str,
    base: &str,
    quote: &str,
    start: &str,
    tick: &str,
    step: &str,
    max_qty: &str,
    market_max_qty: &str,
) -> SymbolInfo {
    SymbolInfo {
        symbol: symbol.into(),
        base: base.into(),
        quote: quote.into(),
        start_price: d(start),
        min_price: d(tick),
        max_price: d("1000000"),
        tick: d(tick),
        min_qty: d(step),
        max_qty: d(max_qty),
        step: d(step),
        market_min_qty: Decimal::ZERO,
        market_max_qty: d(market_max_qty),
        market_step: Decimal::ZERO,
        min_notional: d("5"),
        max_notional: d("9000000"),
        multiplier_up: d("5"),
        multiplier_down: d("0.2"),
        max_num_orders: 200,
        max_num_algo_orders: 5,
        max_num_order_lists: 20,
        order_types: MAJOR_ORDER_TYPES.to_vec(),
        oco_allowed: true,
    }
}

/// BTCUSDT, ETHUSDT, BNBUSDT with Binance's filters and order types
/// (BTCUSDT values from a real capture); ETHBTC, the documentation's example
/// symbol, with every order type, the market stop `STOP_LOSS` included.
pub(crate) fn builtin() -> Vec<SymbolInfo> {
    vec![
        spot(
            "BTCUSDT",
            "BTC",
            "USDT",
            "60000.00",
            "0.01",
            "0.00001",
            "9000",
            "128.52621715",
        ),
        spot(
            "ETHUSDT", "ETH", "USDT", "3000.00", "0.01", "0.0001", "9000", "3000",
        ),
        spot(
            "BNBUSDT", "BNB", "USDT", "600.00", "0.01", "0.001", "9000", "5000",
        ),
        SymbolInfo {
            min_notional: d("0.0001"),
            order_types: ALL_ORDER_TYPES.to_vec(),
            ..spot(
                "ETHBTC", "ETH", "BTC", "0.05000", "0.00001", "0.0001", "100000", "1000",
            )
        },
    ]
}

/// What a static filter check needs to know about an order.
pub(crate) struct FilterInput {
    pub is_buy: bool,
    pub is_market: bool,
    pub quantity: Option<Decimal>,
    pub price: Option<Decimal>,
    pub stop_price: Option<Decimal>,
    pub last_price: Decimal,
}

impl SymbolInfo {
    /// Refuses an order type not in `orderTypes` as Binance's matching engine
    /// does (`-2010 "Stop loss orders are not supported for this symbol."`).
    pub fn allows(&self, otype: OType) -> Result<(), ApiError> {
        if self.order_types.contains(&otype) {
            Ok(())
        } else {
            Err(ApiError::rejected(otype.unsupported()))
        }
    }

    /// Refuses an order list when `ocoAllowed` is false.
    pub fn allows_oco(&self) -> Result<(), ApiError> {
        if self.oco_allowed {
            Ok(())
        } else {
            Err(ApiError::rejected(
                "OCO orders are not supported for this symbol",
            ))
        }
    }

    /// Static filters, in Binance's order; failures are `-1013 Filter failure: NAME`.
    pub fn check(&self, o: &FilterInput) -> Result<(), ApiError> {
        for p in [o.price, o.stop_price].into_iter().flatten() {
            if p < self.min_price || p > self.max_price || !is_multiple(p, self.tick) {
                return Err(ApiError::filter("PRICE_FILTER"));
            }
        }
        if let Some(p) = o.price {
            let (lo, hi) = (
                o.last_price * self.multiplier_down,
                o.last_price * self.multiplier_up,
            );
            if p < lo || p > hi {
                return Err(ApiError::filter("PERCENT_PRICE_BY_SIDE"));
            }
        }
        if let Some(q) = o.quantity {
            if o.is_market
                && (q < self.market_min_qty
                    || (!self.market_max_qty.is_zero() && q > self.market_max_qty)
                    || !is_multiple(q, self.market_step))
            {
                return Err(ApiError::filter("MARKET_LOT_SIZE"));
            }
            if q < self.min_qty || q > self.max_qty || !is_multiple(q, self.step) {
                return Err(ApiError::filter("LOT_SIZE"));
            }
            let ref_price = if o.is_market {
                Some(o.last_price)
            } else {
                o.price.or(o.stop_price)
            };
            if let Some(p) = ref_price {
                let notional = p * q;
                // applyMinToMarket=true, applyMaxToMarket=false as on BTCUSDT.
                if notional < self.min_notional || (!o.is_market && notional > self.max_notional) {
                    return Err(ApiError::filter("NOTIONAL"));
                }
            }
        }
        let _ = o.is_buy;
        Ok(())
    }

    pub fn view(&self) -> SymbolView {
        SymbolView {
            symbol: self.symbol.clone(),
            status: "TRADING",
            base_asset: self.base.clone(),
            base_asset_precision: 8,
            quote_asset: self.quote.clone(),
            quote_precision: 8,
            quote_asset_precision: 8,
            base_commission_precision: 8,
            quote_commission_precision: 8,
            order_types: self.order_types.iter().map(|t| t.as_str()).collect(),
            iceberg_allowed: false,
            oco_allowed: self.oco_allowed,
            oto_allowed: false,
            opo_allowed: false,
            quote_order_qty_market_allowed: true,
            allow_trailing_stop: false,
            cancel_replace_allowed: false,
            amend_allowed: false,
            peg_instructions_allowed: false,
            is_spot_trading_allowed: true,
            is_margin_trading_allowed: false,
            filters: vec![
                FilterView::PriceFilter {
                    min_price: fmt8(self.min_price),
                    max_price: fmt8(self.max_price),
                    tick_size: fmt8(self.tick),
                },
                FilterView::LotSize {
                    min_qty: fmt8(self.min_qty),
                    max_qty: fmt8(self.max_qty),
                    step_size: fmt8(self.step),
                },
                FilterView::IcebergParts { limit: 10 },
                FilterView::MarketLotSize {
                    min_qty: fmt8(self.market_min_qty),
                    max_qty: fmt8(self.market_max_qty),
                    step_size: fmt8(self.market_step),
                },
                FilterView::PercentPriceBySide {
                    bid_multiplier_up: self.multiplier_up.normalize().to_string(),
                    bid_multiplier_down: self.multiplier_down.normalize().to_string(),
                    ask_multiplier_up: self.multiplier_up.normalize().to_string(),
                    ask_multiplier_down: self.multiplier_down.normalize().to_string(),
                    avg_price_mins: 5,
                },
                FilterView::Notional {
                    min_notional: fmt8(self.min_notional),
                    apply_min_to_market: true,
                    max_notional: fmt8(self.max_notional),
                    apply_max_to_market: false,
                    avg_price_mins: 5,
                },
                FilterView::MaxNumOrders {
                    max_num_orders: self.max_num_orders,
                },
                FilterView::MaxNumAlgoOrders {
                    max_num_algo_orders: self.max_num_algo_orders,
                },
                FilterView::MaxNumOrderLists {
                    max_num_order_lists: self.max_num_order_lists,
                },
            ],
            permissions: vec![],
            permission_sets: vec![vec!["SPOT"]],
            default_self_trade_prevention_mode: "NONE",
            allowed_self_trade_prevention_modes: vec!["NONE"],
        }
    }
}

/// One symbol of `exchangeInfo`, field order as Binance sends it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SymbolView {
    symbol: String,
    status: &'static str,
    base_asset: String,
    base_asset_precision: u32,
    quote_asset: String,
    quote_precision: u32,
    quote_asset_precision: u32,
    base_commission_precision: u32,
    quote_commission_precision: u32,
    order_types: Vec<&'static str>,
    iceberg_allowed: bool,
    oco_allowed: bool,
    oto_allowed: bool,
    opo_allowed: bool,
    quote_order_qty_market_allowed: bool,
    allow_trailing_stop: bool,
    cancel_replace_allowed: bool,
    amend_allowed: bool,
    peg_instructions_allowed: bool,
    is_spot_trading_allowed: bool,
    is_margin_trading_allowed: bool,
    filters: Vec<FilterView>,
    permissions: Vec<&'static str>,
    permission_sets: Vec<Vec<&'static str>>,
    default_self_trade_prevention_mode: &'static str,
    allowed_self_trade_prevention_modes: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "filterType")]
pub(crate) enum FilterView {
    #[serde(rename = "PRICE_FILTER", rename_all = "camelCase")]
    PriceFilter {
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
    #[serde(rename = "ICEBERG_PARTS")]
    IcebergParts { limit: u32 },
    #[serde(rename = "MARKET_LOT_SIZE", rename_all = "camelCase")]
    MarketLotSize {
        min_qty: String,
        max_qty: String,
        step_size: String,
    },
    #[serde(rename = "PERCENT_PRICE_BY_SIDE", rename_all = "camelCase")]
    PercentPriceBySide {
        bid_multiplier_up: String,
        bid_multiplier_down: String,
        ask_multiplier_up: String,
        ask_multiplier_down: String,
        avg_price_mins: u32,
    },
    #[serde(rename = "NOTIONAL", rename_all = "camelCase")]
    Notional {
        min_notional: String,
        apply_min_to_market: bool,
        max_notional: String,
        apply_max_to_market: bool,
        avg_price_mins: u32,
    },
    #[serde(rename = "MAX_NUM_ORDERS", rename_all = "camelCase")]
    MaxNumOrders { max_num_orders: usize },
    #[serde(rename = "MAX_NUM_ALGO_ORDERS", rename_all = "camelCase")]
    MaxNumAlgoOrders { max_num_algo_orders: usize },
    #[serde(rename = "MAX_NUM_ORDER_LISTS", rename_all = "camelCase")]
    MaxNumOrderLists { max_num_order_lists: usize },
}

/// One `rateLimits` entry of `exchangeInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RateLimitView {
    pub rate_limit_type: &'static str,
    pub interval: &'static str,
    pub interval_num: u32,
    pub limit: u32,
}

/// `GET /api/v3/exchangeInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExchangeInfoView {
    pub timezone: &'static str,
    pub server_time: u64,
    pub rate_limits: Vec<RateLimitView>,
    pub exchange_filters: Vec<()>,
    pub symbols: Vec<SymbolView>,
    pub sors: Vec<()>,
}
