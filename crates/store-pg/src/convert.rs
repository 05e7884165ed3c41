//! Exact conversions between the domain's values and PostgreSQL's wire types.
//!
//! Money is `NUMERIC` on the database side and [`Decimal`] on ours. Diesel maps
//! `NUMERIC` to `bigdecimal` only, so this module converts through diesel's
//! [`PgNumeric`] (the binary wire form: base-10000 digits, weight, scale)
//! digit by digit: no float and no rounding ever happens. A stored value that
//! does not fit a `Decimal` (more than 28 significant digits) is reported as
//! corrupt, never rounded.
//!
//! Times are `TIMESTAMPTZ` on the database side (microseconds since
//! 2000-01-01) and [`Millis`] on ours; the store only ever writes whole
//! milliseconds, so the round trip is exact.

use std::fmt::Write as _;

use diesel::pg::data_types::{PgNumeric, PgTimestamp};
use oco_core::{Millis, Price, Qty};
use rust_decimal::Decimal;

use crate::error::corrupt;
use oco_core::StoreError;

/// Unix epoch minus PostgreSQL's epoch (2000-01-01), in milliseconds.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// `d` as `NUMERIC`, exactly (same digits, same scale).
pub(crate) fn numeric(d: Decimal) -> PgNumeric {
    let scale = d.scale() as usize;
    let mut text = d.mantissa().unsigned_abs().to_string();
    if text.len() <= scale {
        text = "0".repeat(scale + 1 - text.len()) + &text;
    }
    let (int, frac) = text.split_at(text.len() - scale);
    let int = int.trim_start_matches('0');
    let int = "0".repeat((4 - int.len() % 4) % 4) + int;
    let frac = frac.to_owned() + &"0".repeat((4 - frac.len() % 4) % 4);
    let all = int.clone() + &frac;
    let mut digits: Vec<i16> = all
        .as_bytes()
        .chunks(4)
        .map(|g| g.iter().fold(0i16, |acc, b| acc * 10 + i16::from(b - b'0')))
        .collect();
    // At most 8 integer groups (a Decimal is below 8e28), so the cast cannot wrap.
    let mut weight = (int.len() / 4) as i16 - 1;
    while digits.first() == Some(&0) {
        digits.remove(0);
        weight -= 1;
    }
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    // Scale is at most 28, so it fits.
    let scale = scale as u16;
    if d.is_sign_negative() && !digits.is_empty() {
        PgNumeric::Negative {
            weight,
            scale,
            digits,
        }
    } else {
        PgNumeric::Positive {
            weight,
            scale,
            digits,
        }
    }
}

/// `NUMERIC` back to a decimal, exactly; `Err` names why it cannot be.
pub(crate) fn decimal(n: &PgNumeric) -> Result<Decimal, String> {
    let (negative, weight, scale, digits) = match n {
        PgNumeric::Positive {
            weight,
            scale,
            digits,
        } => (false, *weight, *scale, digits),
        PgNumeric::Negative {
            weight,
            scale,
            digits,
        } => (true, *weight, *scale, digits),
        PgNumeric::NaN => return Err("NaN is not a decimal".to_owned()),
    };
    if digits.iter().any(|g| !(0..=9999).contains(g)) {
        return Err(format!("numeric digit group out of range in {digits:?}"));
    }
    // A Decimal holds at most 29 integer digits: 8 groups.
    if weight > 7 {
        return Err(format!(
            "numeric with weight {weight} exceeds a decimal's range"
        ));
    }
    let w = i32::from(weight);
    let group = |i: i32| {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i))
            .copied()
            .unwrap_or(0)
    };
    let mut int = String::new();
    if w < 0 {
        int.push('0');
    } else {
        for i in 0..=w {
            if i == 0 {
                let _ = write!(int, "{}", group(i));
            } else {
                let _ = write!(int, "{:04}", group(i));
            }
        }
    }
    let mut frac = String::new();
    for _ in 0..(-w - 1).max(0) {
        frac.push_str("0000");
    }
    let len = i32::try_from(digits.len()).map_err(|_| "too many numeric digits".to_owned())?;
    for i in (w + 1).max(0)..len {
        let _ = write!(frac, "{:04}", group(i));
    }
    // Keep the declared scale where a decimal can (trailing zeros carry no value).
    let significant = frac.trim_end_matches('0').len();
    let target = usize::from(scale).min(28).max(significant);
    if frac.len() < target {
        frac.push_str(&"0".repeat(target - frac.len()));
    } else {
        frac.truncate(target);
    }
    let sign = if negative { "-" } else { "" };
    let text = if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    };
    Decimal::from_str_exact(&text)
        .map_err(|e| format!("numeric {text} does not fit a decimal exactly: {e}"))
}

/// Reads a stored amount, naming the record and column on failure.
pub(crate) fn read_decimal(n: &PgNumeric, what: &str) -> Result<Decimal, StoreError> {
    decimal(n).map_err(|e| corrupt(format!("{what}: {e}")))
}

/// Reads a stored quantity (≥ 0).
pub(crate) fn read_qty(n: &PgNumeric, what: &str) -> Result<Qty, StoreError> {
    Qty::new(read_decimal(n, what)?).map_err(|e| corrupt(format!("{what}: {e}")))
}

/// Reads a stored price (> 0).
pub(crate) fn read_price(n: &PgNumeric, what: &str) -> Result<Price, StoreError> {
    Price::new(read_decimal(n, what)?).map_err(|e| corrupt(format!("{what}: {e}")))
}

/// Reads an optional stored price.
pub(crate) fn read_opt_price(
    n: Option<&PgNumeric>,
    what: &str,
) -> Result<Option<Price>, StoreError> {
    n.map(|n| read_price(n, what)).transpose()
}

/// `m` as `TIMESTAMPTZ`.
///
/// # Errors
/// `Conflict` for a time PostgreSQL cannot hold.
pub(crate) fn timestamp(m: Millis) -> Result<PgTimestamp, StoreError> {
    m.0.checked_sub(PG_EPOCH_MS)
        .and_then(|ms| ms.checked_mul(1000))
        .map(PgTimestamp)
        .ok_or_else(|| StoreError::Conflict(format!("time {m} is out of range")))
}

/// `TIMESTAMPTZ` back to milliseconds (sub-millisecond parts, which the store
/// never writes, are floored).
pub(crate) fn millis(t: PgTimestamp, what: &str) -> Result<Millis, StoreError> {
    // PostgreSQL's ±infinity.
    if t.0 == i64::MAX || t.0 == i64::MIN {
        return Err(corrupt(format!("{what}: infinite timestamp")));
    }
    Ok(Millis(t.0.div_euclid(1000) + PG_EPOCH_MS))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    use super::*;

    fn round_trip(d: Decimal) -> Decimal {
        decimal(&numeric(d)).unwrap()
    }

    #[test]
    fn known_wire_forms() {
        assert_eq!(
            numeric(dec!(12345.678)),
            PgNumeric::Positive {
                weight: 1,
                scale: 3,
                digits: vec![1, 2345, 6780]
            }
        );
        assert_eq!(
            numeric(dec!(0.0001)),
            PgNumeric::Positive {
                weight: -1,
                scale: 4,
                digits: vec![1]
            }
        );
        assert_eq!(
            numeric(dec!(0.00000001)),
            PgNumeric::Positive {
                weight: -2,
                scale: 8,
                digits: vec![1]
            }
        );
        assert_eq!(
            numeric(dec!(10000)),
            PgNumeric::Positive {
                weight: 1,
                scale: 0,
                digits: vec![1]
            }
        );
        assert_eq!(
            numeric(dec!(-1.5)),
            PgNumeric::Negative {
                weight: 0,
                scale: 1,
                digits: vec![1, 5000]
            }
        );
        assert_eq!(
            numeric(dec!(0.00)),
            PgNumeric::Positive {
                weight: 0,
                scale: 2,
                digits: vec![]
            }
        );
        assert_eq!(
            numeric(-dec!(0)),
            PgNumeric::Positive {
                weight: 0,
                scale: 0,
                digits: vec![]
            }
        );
    }

    #[test]
    fn keeps_scale_and_value() {
        for d in [
            dec!(0),
            dec!(1.50),
            dec!(-0.0004),
            dec!(49252.5),
            dec!(0.00999),
            Decimal::MAX,
            Decimal::MIN,
        ] {
            let back = round_trip(d);
            assert_eq!(back, d);
            assert_eq!(back.scale(), d.scale(), "{d}");
        }
        let tiny = Decimal::new(1, 28);
        assert_eq!(round_trip(tiny), tiny);
    }

    #[test]
    fn refuses_what_a_decimal_cannot_hold() {
        assert!(decimal(&PgNumeric::NaN).is_err());
        let huge = PgNumeric::Positive {
            weight: 8,
            scale: 0,
            digits: vec![1],
        };
        assert!(decimal(&huge).is_err());
        let too_fine = PgNumeric::Positive {
            weight: -8,
            scale: 32,
            digits: vec![1],
        };
        assert!(decimal(&too_fine).is_err());
        let bad_digit = PgNumeric::Positive {
            weight: 0,
            scale: 0,
            digits: vec![10000],
        };
        assert!(decimal(&bad_digit).is_err());
    }

    #[test]
    fn times_are_exact_in_ms() {
        for ms in [0, 1, -1, 946_684_800_000, 1_700_000_000_123] {
            assert_eq!(
                millis(timestamp(Millis(ms)).unwrap(), "t").unwrap(),
                Millis(ms)
            );
        }
        assert!(timestamp(Millis(i64::MAX)).is_err());
    }

    proptest! {
        #[test]
        fn any_decimal_round_trips(lo in any::<u32>(), mid in any::<u32>(), hi in any::<u32>(), neg in any::<bool>(), scale in 0u32..=28) {
            let d = Decimal::from_parts(lo, mid, hi, neg, scale);
            let back = round_trip(d);
            prop_assert_eq!(back, d);
            prop_assert_eq!(back.scale(), d.scale());
        }
    }
}
