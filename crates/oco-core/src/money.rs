//! Prices, quantities and the grid sizes they snap to.
//!
//! Every amount is a [`Decimal`]; parsing accepts exactly the plain decimal
//! notation Binance accepts (`^[0-9]{1,20}(\.[0-9]{1,20})?$`) so a value that
//! would be refused by the exchange is refused here first.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

/// Why an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The text is not a plain non-negative decimal.
    #[error("{what} '{text}' is not a plain decimal number")]
    Malformed {
        /// Which kind of amount was being parsed.
        what: &'static str,
        /// The offending text.
        text: String,
    },
    /// The value breaks the type's range.
    #[error("{what} {value} must be {rule}")]
    OutOfRange {
        /// Which kind of amount.
        what: &'static str,
        /// The offending value.
        value: Decimal,
        /// The rule it broke, e.g. `greater than 0`.
        rule: &'static str,
    },
}

fn parse_plain(what: &'static str, text: &str) -> Result<Decimal, MoneyError> {
    let malformed = || MoneyError::Malformed {
        what,
        text: text.to_owned(),
    };
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let digits_ok =
        |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok(int) || frac.is_some_and(|f| !digits_ok(f)) {
        return Err(malformed());
    }
    Decimal::from_str(text).map_err(|_| malformed())
}

macro_rules! decimal_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal, $rule:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Decimal);

        impl $name {
            /// Checks the range and wraps the value.
            ///
            /// # Errors
            /// [`MoneyError::OutOfRange`] when the value breaks the type's rule.
            pub fn new(value: Decimal) -> Result<Self, MoneyError> {
                let ok: fn(Decimal) -> bool = $ok;
                if ok(value) {
                    Ok(Self(value.normalize()))
                } else {
                    Err(MoneyError::OutOfRange { what: $what, value, rule: $rule })
                }
            }

            /// The inner decimal.
            pub fn get(self) -> Decimal {
                self.0
            }
        }

        impl FromStr for $name {
            type Err = MoneyError;
            fn from_str(s: &str) -> Result<Self, MoneyError> {
                Self::new(parse_plain($what, s)?)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

decimal_newtype!(
    /// A price in quote asset per unit of base asset; always greater than zero.
    Price, "price", "greater than 0", |v| v > Decimal::ZERO
);
decimal_newtype!(
    /// A base-asset quantity; zero or more.
    Qty, "quantity", "zero or more", |v| v >= Decimal::ZERO
);
decimal_newtype!(
    /// A price grid (`PRICE_FILTER.tickSize`); greater than zero.
    TickSize, "tick size", "greater than 0", |v| v > Decimal::ZERO
);
decimal_newtype!(
    /// A quantity grid (`LOT_SIZE.stepSize`); greater than zero.
    StepSize, "step size", "greater than 0", |v| v > Decimal::ZERO
);

impl Price {
    /// The largest multiple of `tick` that is not above this price.
    /// `None` when that multiple is zero (the price is under one tick).
    pub fn round_down_to(self, tick: TickSize) -> Option<Price> {
        Price::new((self.0 / tick.0).floor() * tick.0).ok()
    }

    /// The smallest multiple of `tick` that is not below this price.
    pub fn round_up_to(self, tick: TickSize) -> Price {
        Price((self.0 / tick.0).ceil() * tick.0).normalized()
    }

    /// True when the price sits on the grid.
    pub fn is_on(self, tick: TickSize) -> bool {
        (self.0 % tick.0).is_zero()
    }

    /// `self × (1 + pct / 100)`; `None` when the result is not positive.
    pub fn scaled_pct(self, pct: Decimal) -> Option<Price> {
        Price::new(self.0 + self.0 * pct / Decimal::ONE_HUNDRED).ok()
    }

    fn normalized(self) -> Price {
        Price(self.0.normalize())
    }
}

impl Qty {
    /// Zero.
    pub const ZERO: Qty = Qty(Decimal::ZERO);

    /// The largest multiple of `step` that is not above this quantity.
    pub fn floor_to(self, step: StepSize) -> Qty {
        Qty(((self.0 / step.0).floor() * step.0).normalize())
    }

    /// True when the quantity sits on the grid.
    pub fn is_on(self, step: StepSize) -> bool {
        (self.0 % step.0).is_zero()
    }

    /// True when zero.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// `self − other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: Qty) -> Qty {
        Qty((self.0 - other.0).max(Decimal::ZERO).normalize())
    }

    /// `self + other`.
    pub fn plus(self, other: Qty) -> Qty {
        Qty((self.0 + other.0).normalize())
    }

    /// Quote value of this quantity at `price`.
    pub fn notional(self, price: Price) -> Decimal {
        self.0 * price.0
    }
}

impl Default for Qty {
    fn default() -> Self {
        Qty::ZERO
    }
}

impl std::iter::Sum for Qty {
    fn sum<I: Iterator<Item = Qty>>(iter: I) -> Qty {
        iter.fold(Qty::ZERO, Qty::plus)
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    #[test]
    fn parses_binance_notation_only() {
        assert_eq!("49252.5".parse::<Price>().unwrap().get(), dec!(49252.5));
        assert_eq!("0.00999".parse::<Qty>().unwrap().get(), dec!(0.00999));
        assert_eq!("0".parse::<Qty>().unwrap(), Qty::ZERO);
        for bad in ["1e-05", "-1", "+1", ".5", "5.", "", "1,5", " 1", "0x10"] {
            assert!(bad.parse::<Qty>().is_err(), "{bad} should be refused");
        }
        assert!("0".parse::<Price>().is_err(), "a zero price is refused");
    }

    #[test]
    fn display_has_no_trailing_zeros_or_exponent() {
        assert_eq!("0.00100000".parse::<Qty>().unwrap().to_string(), "0.001");
        assert_eq!("50000.00".parse::<Price>().unwrap().to_string(), "50000");
    }

    #[test]
    fn rounding_directions() {
        let tick = TickSize::new(dec!(0.01)).unwrap();
        let p = Price::new(dec!(101.2345)).unwrap();
        assert_eq!(p.round_down_to(tick).unwrap().get(), dec!(101.23));
        assert_eq!(p.round_up_to(tick).get(), dec!(101.24));
        assert!(
            Price::new(dec!(0.001))
                .unwrap()
                .round_down_to(tick)
                .is_none()
        );
        let step = StepSize::new(dec!(0.001)).unwrap();
        assert_eq!(
            Qty::new(dec!(1.23456)).unwrap().floor_to(step).get(),
            dec!(1.234)
        );
    }
}
