//! Symbols and the exchange filters that bound what may be placed on them.

use std::fmt;

use rust_decimal::Decimal;

use crate::money::{Price, Qty, StepSize, TickSize};

/// An asset code such as `BTC`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Asset(pub String);

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A spot market: `BTCUSDT` trades base `BTC` against quote `USDT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Symbol {
    /// The exchange's name for it.
    pub name: String,
    /// What is bought by a BUY entry.
    pub base: Asset,
    /// What is paid.
    pub quote: Asset,
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// `PERCENT_PRICE_BY_SIDE` multipliers around the reference price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PercentPriceBySide {
    /// Highest BUY price as a multiple of the reference.
    pub bid_up: Decimal,
    /// Lowest BUY price as a multiple of the reference.
    pub bid_down: Decimal,
    /// Highest SELL price as a multiple of the reference.
    pub ask_up: Decimal,
    /// Lowest SELL price as a multiple of the reference.
    pub ask_down: Decimal,
}

/// `MARKET_LOT_SIZE`: the quantity rules of MARKET orders, which must pass
/// `LOT_SIZE` too. Binance disables a bound by giving it as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarketLotSize {
    /// `minQty` (`None`: disabled).
    pub min_qty: Option<Qty>,
    /// `maxQty` (`None`: disabled).
    pub max_qty: Option<Qty>,
    /// `stepSize` (`None`: disabled).
    pub step: Option<StepSize>,
}

/// The order types of `exchangeInfo.orderTypes` that a protective list is
/// made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderTypes {
    /// `LIMIT_MAKER`: the take-profit.
    pub limit_maker: bool,
    /// `STOP_LOSS_LIMIT`: the stop-limit.
    pub stop_loss_limit: bool,
    /// `STOP_LOSS`: the market stop. Binance's majors (BTCUSDT, ETHUSDT,
    /// BNBUSDT…) do not take it.
    pub stop_loss: bool,
}

impl OrderTypes {
    /// What Binance's majors list (`LIMIT, LIMIT_MAKER, MARKET,
    /// STOP_LOSS_LIMIT, TAKE_PROFIT_LIMIT`, BTCUSDT capture): no market stop.
    /// Also what is assumed when `exchangeInfo` does not say.
    pub const MAJOR: OrderTypes = OrderTypes {
        limit_maker: true,
        stop_loss_limit: true,
        stop_loss: false,
    };

    /// Every type protection uses, the market stop included.
    pub const ALL: OrderTypes = OrderTypes {
        limit_maker: true,
        stop_loss_limit: true,
        stop_loss: true,
    };

    /// Reads `exchangeInfo.orderTypes`; names it does not use are ignored.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> OrderTypes {
        let mut types = OrderTypes {
            limit_maker: false,
            stop_loss_limit: false,
            stop_loss: false,
        };
        for name in names {
            match name {
                "LIMIT_MAKER" => types.limit_maker = true,
                "STOP_LOSS_LIMIT" => types.stop_loss_limit = true,
                "STOP_LOSS" => types.stop_loss = true,
                _ => {}
            }
        }
        types
    }
}

/// What the exchange allows on one symbol, typed once from `exchangeInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolRules {
    /// The symbol.
    pub symbol: Symbol,
    /// False when the symbol does not accept new orders (halt, break, cancel-only).
    pub trading: bool,
    /// False when OCO lists are not allowed.
    pub oco_allowed: bool,
    /// `orderTypes`: which stop (market or limit) the list may carry.
    pub order_types: OrderTypes,
    /// `PRICE_FILTER.tickSize`.
    pub tick: TickSize,
    /// `PRICE_FILTER.minPrice` (`None`: disabled).
    pub min_price: Option<Price>,
    /// `PRICE_FILTER.maxPrice` (`None`: disabled).
    pub max_price: Option<Price>,
    /// `LOT_SIZE.stepSize`.
    pub step: StepSize,
    /// `LOT_SIZE.minQty`.
    pub min_qty: Qty,
    /// `LOT_SIZE.maxQty` (`None`: disabled).
    pub max_qty: Option<Qty>,
    /// `NOTIONAL.minNotional`, or the legacy `MIN_NOTIONAL.minNotional`.
    pub min_notional: Decimal,
    /// `NOTIONAL.maxNotional` (`None`: disabled).
    pub max_notional: Option<Decimal>,
    /// `PERCENT_PRICE_BY_SIDE`, when the symbol has it.
    pub percent_price_by_side: Option<PercentPriceBySide>,
    /// `MAX_NUM_ORDERS`: open orders per symbol and account.
    pub max_num_orders: Option<u32>,
    /// `MAX_NUM_ALGO_ORDERS`: open stop / take-profit orders per symbol and account.
    pub max_num_algo_orders: Option<u32>,
    /// `MAX_NUM_ORDER_LISTS`: open order lists per symbol and account.
    pub max_num_order_lists: Option<u32>,
    /// `MARKET_LOT_SIZE`, when the symbol has it (`None`: MARKET orders
    /// answer to `LOT_SIZE` alone).
    pub market_lot_size: Option<MarketLotSize>,
}

/// A filter a planned order would break.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterViolation {
    /// Price out of `PRICE_FILTER`.
    #[error("price {price} is outside PRICE_FILTER [{min:?}, {max:?}] or off tick {tick}")]
    PriceFilter {
        /// The price.
        price: Price,
        /// Lower bound.
        min: Option<Price>,
        /// Upper bound.
        max: Option<Price>,
        /// Grid.
        tick: TickSize,
    },
    /// Quantity out of `LOT_SIZE`.
    #[error("quantity {qty} is outside LOT_SIZE [{min}, {max:?}] or off step {step}")]
    LotSize {
        /// The quantity.
        qty: Qty,
        /// Lower bound.
        min: Qty,
        /// Upper bound.
        max: Option<Qty>,
        /// Grid.
        step: StepSize,
    },
    /// A MARKET order's quantity out of `MARKET_LOT_SIZE`.
    #[error("quantity {qty} is outside MARKET_LOT_SIZE [{min:?}, {max:?}] or off step {step:?}")]
    MarketLotSize {
        /// The quantity.
        qty: Qty,
        /// Lower bound.
        min: Option<Qty>,
        /// Upper bound.
        max: Option<Qty>,
        /// Grid.
        step: Option<StepSize>,
    },
    /// `price × qty` out of `NOTIONAL`.
    #[error("notional {notional} is outside NOTIONAL [{min}, {max:?}]")]
    Notional {
        /// `price × qty`.
        notional: Decimal,
        /// Lower bound.
        min: Decimal,
        /// Upper bound.
        max: Option<Decimal>,
    },
    /// A SELL price out of `PERCENT_PRICE_BY_SIDE` around the reference.
    #[error(
        "sell price {price} is outside PERCENT_PRICE_BY_SIDE [{low}, {high}] around {reference}"
    )]
    PercentPrice {
        /// The price.
        price: Price,
        /// Reference price used.
        reference: Price,
        /// Lowest allowed.
        low: Decimal,
        /// Highest allowed.
        high: Decimal,
    },
}

impl SymbolRules {
    /// Checks a price against `PRICE_FILTER`.
    ///
    /// # Errors
    /// The violated filter.
    pub fn check_price(&self, price: Price) -> Result<(), FilterViolation> {
        let in_range =
            self.min_price.is_none_or(|m| price >= m) && self.max_price.is_none_or(|m| price <= m);
        if in_range && price.is_on(self.tick) {
            Ok(())
        } else {
            Err(FilterViolation::PriceFilter {
                price,
                min: self.min_price,
                max: self.max_price,
                tick: self.tick,
            })
        }
    }

    /// Checks a SELL price against `PERCENT_PRICE_BY_SIDE` around `reference`.
    ///
    /// # Errors
    /// The violated filter.
    pub fn check_sell_percent(
        &self,
        price: Price,
        reference: Price,
    ) -> Result<(), FilterViolation> {
        let Some(pp) = self.percent_price_by_side else {
            return Ok(());
        };
        let low = reference.get() * pp.ask_down;
        let high = reference.get() * pp.ask_up;
        if price.get() >= low && price.get() <= high {
            Ok(())
        } else {
            Err(FilterViolation::PercentPrice {
                price,
                reference,
                low,
                high,
            })
        }
    }

    /// Checks a quantity against `LOT_SIZE`.
    ///
    /// # Errors
    /// The violated filter.
    pub fn check_qty(&self, qty: Qty) -> Result<(), FilterViolation> {
        let in_range =
            qty >= self.min_qty && !qty.is_zero() && self.max_qty.is_none_or(|m| qty <= m);
        if in_range && qty.is_on(self.step) {
            Ok(())
        } else {
            Err(FilterViolation::LotSize {
                qty,
                min: self.min_qty,
                max: self.max_qty,
                step: self.step,
            })
        }
    }

    /// Checks the quantity of a MARKET order against `MARKET_LOT_SIZE` (its
    /// `LOT_SIZE` check is [`SymbolRules::check_qty`]).
    ///
    /// # Errors
    /// The violated filter.
    pub fn check_market_qty(&self, qty: Qty) -> Result<(), FilterViolation> {
        let Some(m) = self.market_lot_size else {
            return Ok(());
        };
        let in_range =
            m.min_qty.is_none_or(|min| qty >= min) && m.max_qty.is_none_or(|max| qty <= max);
        if in_range && m.step.is_none_or(|step| qty.is_on(step)) {
            Ok(())
        } else {
            Err(FilterViolation::MarketLotSize {
                qty,
                min: m.min_qty,
                max: m.max_qty,
                step: m.step,
            })
        }
    }

    /// Floors a MARKET order's quantity to `LOT_SIZE.stepSize` and, when set,
    /// to `MARKET_LOT_SIZE.stepSize`.
    pub fn floor_market_qty(&self, qty: Qty) -> Qty {
        let qty = qty.floor_to(self.step);
        match self.market_lot_size.and_then(|m| m.step) {
            Some(step) => qty.floor_to(step),
            None => qty,
        }
    }

    /// Checks `qty × price` against `NOTIONAL`.
    ///
    /// # Errors
    /// The violated filter.
    pub fn check_notional(&self, qty: Qty, price: Price) -> Result<(), FilterViolation> {
        let notional = qty.notional(price);
        if notional >= self.min_notional && self.max_notional.is_none_or(|m| notional <= m) {
            Ok(())
        } else {
            Err(FilterViolation::Notional {
                notional,
                min: self.min_notional,
                max: self.max_notional,
            })
        }
    }
}
