//! Input checks, in two steps: the request's own shape (no I/O), then the
//! market (the symbol's rules and its current price). Every refusal names the
//! field, the value and the rule; nothing is stored before both pass.

use std::str::FromStr;

use oco_core::model::{EntryKind, EntryTags, LatePolicy, OrderSize, ProtectionConfig};
use oco_core::{
    AccountId, EntryLevels, LevelPercents, Price, Qty, StopKind, SymbolRules, plan_protection,
    resolve_levels,
};
use rust_decimal::Decimal;

use crate::dto::{CreateEntryRequest, EntryType, LatePolicyDto, ProtectionSettings, StopSettings};
use crate::error::ApiError;

/// Commission assumed to be charged in the base asset when checking that a
/// fill could be protected: Binance's standard spot rate, 0.1 %.
const ASSUMED_BASE_FEE: Decimal = Decimal::from_parts(1, 0, 0, false, 3);

/// Longest tag (`signalId`, `portfolioId`) accepted.
const MAX_TAG_LEN: usize = 128;

/// An entry request whose fields are typed; not yet checked against the market.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedEntry {
    pub account: AccountId,
    pub symbol: String,
    pub kind: EntryKind,
    pub size: OrderSize,
    pub levels: EntryLevels,
    pub tags: EntryTags,
}

fn price(field: &str, text: &str) -> Result<Price, ApiError> {
    Price::from_str(text).map_err(|e| ApiError::field(field, e.to_string()))
}

fn decimal(field: &str, text: &str) -> Result<Decimal, ApiError> {
    Qty::from_str(text).map(Qty::get).map_err(|_| {
        ApiError::field(
            field,
            format!("'{text}' is not a plain decimal number (digits with an optional '.')"),
        )
    })
}

fn tag(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() || v.len() > MAX_TAG_LEN => Err(ApiError::field(
            field,
            format!("must be 1 to {MAX_TAG_LEN} characters, got {}", v.len()),
        )),
        // PostgreSQL's jsonb refuses U+0000, which would surface as a
        // retryable store failure naming no field; other control characters
        // only garble logs and listings.
        Some(v) if v.chars().any(char::is_control) => {
            let at = v.chars().position(char::is_control).unwrap_or_default();
            Err(ApiError::field(
                field,
                format!(
                    "holds a control character at position {at}; only printable characters are allowed"
                ),
            ))
        }
        other => Ok(other),
    }
}

/// Checks the request's own shape: types, presence, combinations.
pub(crate) fn parse_entry(req: CreateEntryRequest) -> Result<ParsedEntry, ApiError> {
    let symbol = req.symbol.trim().to_ascii_uppercase();
    let symbol_ok =
        (2..=20).contains(&symbol.len()) && symbol.bytes().all(|b| b.is_ascii_alphanumeric());
    if !symbol_ok {
        return Err(ApiError::field(
            "symbol",
            format!(
                "'{}' is not a symbol name (2 to 20 letters or digits)",
                req.symbol
            ),
        ));
    }
    let kind = match (req.kind, req.price.as_deref()) {
        (EntryType::Market, None) => EntryKind::Market,
        (EntryType::Market, Some(_)) => {
            return Err(ApiError::field("price", "is only allowed on LIMIT entries"));
        }
        (EntryType::Limit, Some(p)) => EntryKind::Limit {
            price: price("price", p)?,
        },
        (EntryType::Limit, None) => {
            return Err(ApiError::field("price", "is required on LIMIT entries"));
        }
    };
    let size = match (req.quantity.as_deref(), req.quote_order_qty.as_deref()) {
        (Some(q), None) => {
            let qty = Qty::from_str(q).map_err(|e| ApiError::field("quantity", e.to_string()))?;
            if qty.is_zero() {
                return Err(ApiError::field("quantity", "0 must be greater than 0"));
            }
            OrderSize::Base(qty)
        }
        (None, Some(q)) => {
            if req.kind == EntryType::Limit {
                return Err(ApiError::field(
                    "quoteOrderQty",
                    "is only allowed on MARKET entries; give quantity",
                ));
            }
            let quote = decimal("quoteOrderQty", q)?;
            if quote.is_zero() {
                return Err(ApiError::field("quoteOrderQty", "0 must be greater than 0"));
            }
            OrderSize::Quote(quote.normalize())
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "quantity",
                "give either quantity or quoteOrderQty, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::field(
                "quantity",
                "is required (or quoteOrderQty on MARKET entries)",
            ));
        }
    };
    let (tp1, tp2) = match req.tp.as_slice() {
        [tp1] => (price("tp[0]", tp1)?, None),
        [tp1, tp2] => (price("tp[0]", tp1)?, Some(price("tp[1]", tp2)?)),
        other => {
            return Err(ApiError::field(
                "tp",
                format!("must hold 1 or 2 targets, got {}", other.len()),
            ));
        }
    };
    if let Some(tp2) = tp2
        && tp2 < tp1
    {
        return Err(ApiError::field(
            "tp[1]",
            format!("{tp2} is below tp[0] {tp1}"),
        ));
    }
    let sl = req.sl.as_deref().map(|s| price("sl", s)).transpose()?;
    Ok(ParsedEntry {
        account: AccountId(req.account),
        symbol,
        kind,
        size,
        levels: EntryLevels {
            tp1: Some(tp1),
            tp2,
            sl,
        },
        tags: EntryTags {
            signal_id: tag("signalId", req.signal_id)?,
            portfolio_id: tag("portfolioId", req.portfolio_id)?,
        },
    })
}

/// Checks the entry against the symbol's filters and the current price, and
/// that its fill could be protected at all (levels and sizes the exchange
/// would accept for the OCO legs).
pub(crate) fn check_market(
    entry: &ParsedEntry,
    rules: &SymbolRules,
    last: Price,
    protection: &ProtectionConfig,
) -> Result<(), ApiError> {
    let symbol = &rules.symbol.name;
    if !rules.trading {
        return Err(ApiError::Unprocessable {
            code: "symbol_not_trading",
            message: format!("{symbol} does not accept new orders now"),
        });
    }
    // The fill can land anywhere between `low` and `high`.
    let (low, high, low_what, high_what) = match entry.kind {
        EntryKind::Market => (last, last, "the current price", "the current price"),
        EntryKind::Limit { price } => {
            check_limit_price(rules, price, last)?;
            if price < last {
                (price, price, "the limit price", "the limit price")
            } else {
                (last, price, "the current price", "the limit price")
            }
        }
    };
    if let Some(tp1) = entry.levels.tp1
        && tp1 <= high
    {
        return Err(ApiError::field(
            "tp[0]",
            format!("{tp1} is not above {high_what} {high}"),
        ));
    }
    if let Some(sl) = entry.levels.sl
        && sl >= low
    {
        return Err(ApiError::field(
            "sl",
            format!("{sl} is not below {low_what} {low}"),
        ));
    }
    let qty = check_size(rules, entry, last, high)?;

    // Would the fill be protectable? The same planning `protect` will do,
    // on the quantity net of a standard base-asset fee.
    let levels = resolve_levels(
        entry.levels,
        protection.percents,
        low,
        rules,
        protection.stop,
    )
    .map_err(|e| ApiError::Unprocessable {
        code: "unprotectable",
        message: format!("the levels could not protect this entry: {e}"),
    })?;
    let position = Qty::new(qty.get() * (Decimal::ONE - ASSUMED_BASE_FEE)).unwrap_or(Qty::ZERO);
    plan_protection(&oco_core::PlanInput {
        rules,
        levels,
        reference: low,
        position,
        split: protection.split,
        stop_budget: None,
    })
    .map_err(|e| ApiError::Unprocessable {
        code: "unprotectable",
        message: format!("once filled, this entry could not be protected: {e}"),
    })
    .and_then(|plan| match plan.short {
        // Lists too small to hold it all would leave coins without a stop.
        Some(short) => Err(ApiError::Unprocessable {
            code: "unprotectable",
            message: format!("once filled, this entry could not be protected whole: {short}"),
        }),
        None => Ok(()),
    })
}

fn check_limit_price(rules: &SymbolRules, price: Price, last: Price) -> Result<(), ApiError> {
    if !price.is_on(rules.tick) {
        return Err(ApiError::field(
            "price",
            format!("{price} is not a multiple of the tick size {}", rules.tick),
        ));
    }
    if let Some(min) = rules.min_price
        && price < min
    {
        return Err(ApiError::field(
            "price",
            format!("{price} is below the minimum price {min}"),
        ));
    }
    if let Some(max) = rules.max_price
        && price > max
    {
        return Err(ApiError::field(
            "price",
            format!("{price} is above the maximum price {max}"),
        ));
    }
    if let Some(pp) = rules.percent_price_by_side {
        let (lo, hi) = (last.get() * pp.bid_down, last.get() * pp.bid_up);
        if price.get() < lo || price.get() > hi {
            return Err(ApiError::field(
                "price",
                format!(
                    "{price} is outside the allowed BUY range [{}, {}] around the current price {last}",
                    lo.normalize(),
                    hi.normalize()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks the size against `LOT_SIZE` and `NOTIONAL`; returns the base
/// quantity expected to fill.
fn check_size(
    rules: &SymbolRules,
    entry: &ParsedEntry,
    last: Price,
    at: Price,
) -> Result<Qty, ApiError> {
    let (qty, field) = match entry.size {
        OrderSize::Base(qty) => (qty, "quantity"),
        OrderSize::Quote(quote) => {
            if quote < rules.min_notional {
                return Err(ApiError::field(
                    "quoteOrderQty",
                    format!(
                        "{quote} is below the minimum notional {}",
                        rules.min_notional.normalize()
                    ),
                ));
            }
            let qty = Qty::new(quote / last.get())
                .unwrap_or(Qty::ZERO)
                .floor_to(rules.step);
            if qty < rules.min_qty || qty.is_zero() {
                return Err(ApiError::field(
                    "quoteOrderQty",
                    format!(
                        "{quote} buys {qty} at the current price {last}, below the minimum quantity {}",
                        rules.min_qty
                    ),
                ));
            }
            return Ok(qty);
        }
    };
    if qty < rules.min_qty {
        return Err(ApiError::field(
            field,
            format!("{qty} is below the minimum quantity {}", rules.min_qty),
        ));
    }
    if let Some(max) = rules.max_qty
        && qty > max
    {
        return Err(ApiError::field(
            field,
            format!("{qty} is above the maximum quantity {max}"),
        ));
    }
    if !qty.is_on(rules.step) {
        return Err(ApiError::field(
            field,
            format!(
                "{qty} is not a multiple of the step size {} (try {})",
                rules.step,
                qty.floor_to(rules.step)
            ),
        ));
    }
    // A MARKET order also passes `MARKET_LOT_SIZE` (Binance's majors leave
    // it open; others cap market orders well under `LOT_SIZE`).
    if matches!(entry.kind, EntryKind::Market)
        && let Err(violation) = rules.check_market_qty(qty)
    {
        return Err(ApiError::field(field, violation.to_string()));
    }
    let notional = qty.notional(at).normalize();
    if notional < rules.min_notional {
        return Err(ApiError::field(
            field,
            format!(
                "notional {notional} ({qty} × {at}) is below the minimum notional {}",
                rules.min_notional.normalize()
            ),
        ));
    }
    if let Some(max) = rules.max_notional
        && notional > max
    {
        return Err(ApiError::field(
            field,
            format!(
                "notional {notional} ({qty} × {at}) is above the maximum notional {}",
                max.normalize()
            ),
        ));
    }
    Ok(qty)
}

/// `base` with the given settings applied; absent fields keep their value.
pub(crate) fn apply_settings(
    base: ProtectionConfig,
    s: &ProtectionSettings,
) -> Result<ProtectionConfig, ApiError> {
    let mut config = base;
    if s.tp1_pct.is_some() || s.tp2_pct.is_some() || s.sl_pct.is_some() {
        let mut pct = base.percents.unwrap_or(LevelPercents::DEFAULT);
        if let Some(v) = &s.tp1_pct {
            pct.tp1 = decimal("protection.tp1Pct", v)?;
        }
        if let Some(v) = &s.tp2_pct {
            pct.tp2 = decimal("protection.tp2Pct", v)?;
        }
        if let Some(v) = &s.sl_pct {
            pct.sl = decimal("protection.slPct", v)?;
        }
        let pct = pct
            .validate()
            .map_err(|e| ApiError::field("protection", e.to_string()))?;
        config.percents = Some(pct);
    }
    if let Some(v) = &s.split {
        let split = decimal("protection.split", v)?;
        if split.is_zero() || split > Decimal::ONE {
            return Err(ApiError::field(
                "protection.split",
                format!("{v} must be greater than 0 and at most 1"),
            ));
        }
        config.split = split.normalize();
    }
    if let Some(stop) = &s.stop {
        config.stop = match stop {
            StopSettings::Market => StopKind::Market,
            StopSettings::Limit { offset_pct } => {
                let field = "protection.stop.offsetPct";
                let offset = decimal(field, offset_pct)?;
                if offset.is_zero() || offset >= Decimal::ONE_HUNDRED {
                    return Err(ApiError::field(
                        field,
                        format!("{offset_pct} must be greater than 0 and less than 100"),
                    ));
                }
                StopKind::Limit {
                    offset_pct: offset.normalize(),
                }
            }
        };
    }
    if let Some(late) = s.late_policy {
        config.late = match late {
            LatePolicyDto::ExitAtMarket => LatePolicy::ExitAtMarket,
            LatePolicyDto::RecordOnly => LatePolicy::RecordOnly,
        };
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use oco_core::testing::btcusdt_rules;
    use rust_decimal_macros::dec;

    use super::*;

    fn request(qty: &str, tp: &[&str], sl: Option<&str>) -> CreateEntryRequest {
        CreateEntryRequest {
            account: 1,
            symbol: "btcusdt".into(),
            kind: EntryType::Market,
            quantity: Some(qty.into()),
            quote_order_qty: None,
            price: None,
            tp: tp.iter().map(|s| (*s).to_owned()).collect(),
            sl: sl.map(str::to_owned),
            signal_id: None,
            portfolio_id: None,
        }
    }

    fn check(req: CreateEntryRequest) -> Result<(), ApiError> {
        let parsed = parse_entry(req)?;
        let last = Price::new(dec!(100)).map_err(|e| ApiError::Internal(e.to_string()))?;
        check_market(&parsed, &btcusdt_rules(), last, &ProtectionConfig::DEFAULT)
    }

    fn field_of(r: Result<(), ApiError>) -> Option<String> {
        r.err().and_then(|e| e.problem().field)
    }

    #[test]
    fn sane_market_entry_passes() {
        assert_eq!(check(request("1", &["101", "102"], Some("99"))), Ok(()));
    }

    #[test]
    fn a_market_quantity_over_market_lot_size_is_refused_and_a_limit_one_is_not() {
        let mut rules = btcusdt_rules();
        rules.market_lot_size = Some(oco_core::symbol::MarketLotSize {
            min_qty: None,
            max_qty: Some(Qty::new(dec!(0.5)).unwrap()),
            step: None,
        });
        let last = Price::new(dec!(100)).unwrap();
        let run = |req: CreateEntryRequest| {
            parse_entry(req)
                .and_then(|parsed| check_market(&parsed, &rules, last, &ProtectionConfig::DEFAULT))
        };
        let refused = run(request("1", &["101"], Some("99")))
            .err()
            .map(|e| e.problem());
        let (field, message) = refused.map(|p| (p.field, p.message)).unwrap_or_default();
        assert_eq!(field.as_deref(), Some("quantity"), "{message}");
        assert!(message.contains("MARKET_LOT_SIZE"), "{message}");
        assert_eq!(run(request("0.5", &["101"], Some("99"))), Ok(()));
        let mut limit = request("1", &["101"], Some("98"));
        limit.kind = EntryType::Limit;
        limit.price = Some("99.5".into());
        assert_eq!(
            run(limit),
            Ok(()),
            "LIMIT orders are bound by LOT_SIZE only"
        );
    }

    #[test]
    fn an_entry_its_lists_could_not_hold_whole_is_refused() {
        // 2.9 at 40 passes NOTIONAL's 120 as an order. Lists at targets 41
        // and 42 each hold up to 120 / 42 of it: two hold it whole. With a
        // second target at 100, each holds at most 120 / 100: two hold 2.4.
        let mut rules = btcusdt_rules();
        rules.max_notional = Some(dec!(120));
        rules.max_qty = None;
        let last = Price::new(dec!(40)).unwrap();
        let run = |req: CreateEntryRequest| {
            parse_entry(req)
                .and_then(|parsed| check_market(&parsed, &rules, last, &ProtectionConfig::DEFAULT))
        };
        assert_eq!(run(request("2.9", &["41", "42"], Some("39"))), Ok(()));
        let refused = run(request("2.9", &["41", "100"], Some("39")))
            .err()
            .map(|e| e.problem());
        let (code, message) = refused.map(|p| (p.code, p.message)).unwrap_or_default();
        assert_eq!(code, "unprotectable", "{message}");
        assert!(message.contains("maxNotional"), "{message}");
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let cases: [(CreateEntryRequest, &str); 7] = [
            (request("1", &["99"], None), "tp[0]"),
            (request("1", &["101"], Some("100.5")), "sl"),
            (request("1", &["102", "101"], None), "tp[1]"),
            (request("-1", &["101"], None), "quantity"),
            (request("0.000001", &["101"], None), "quantity"),
            (request("0.000015", &["101"], None), "quantity"),
            (request("0.01", &["101"], None), "quantity"),
        ];
        for (req, field) in cases {
            let dbg = format!("{req:?}");
            assert_eq!(field_of(check(req)).as_deref(), Some(field), "{dbg}");
        }
    }

    #[test]
    fn a_tag_with_a_control_character_is_refused_naming_its_field() {
        for (signal, portfolio, field) in [
            (Some("sig\u{0}7"), None, "signalId"),
            (None, Some("p\n1"), "portfolioId"),
        ] {
            let mut req = request("1", &["101"], None);
            req.signal_id = signal.map(str::to_owned);
            req.portfolio_id = portfolio.map(str::to_owned);
            let err = parse_entry(req).err().map(|e| e.problem());
            assert_eq!(
                err.as_ref().and_then(|p| p.field.as_deref()),
                Some(field),
                "{err:?}"
            );
            assert_eq!(err.map(|p| p.code).as_deref(), Some("invalid_field"));
        }
        let mut req = request("1", &["101"], None);
        req.signal_id = Some("sig-7 ü".into());
        assert!(parse_entry(req).is_ok(), "printable text passes");
    }

    #[test]
    fn messages_carry_the_numbers() {
        let err = check(request("1", &["99"], None))
            .err()
            .map(|e| e.problem());
        assert_eq!(
            err.map(|p| p.message).as_deref(),
            Some("tp[0]: 99 is not above the current price 100")
        );
    }

    #[test]
    fn settings_apply_field_by_field_and_refuse_out_of_range() {
        let s = ProtectionSettings {
            sl_pct: Some("2".into()),
            stop: Some(StopSettings::Market),
            ..ProtectionSettings::default()
        };
        let c = apply_settings(ProtectionConfig::DEFAULT, &s);
        let c = c.as_ref().ok();
        assert_eq!(c.and_then(|c| c.percents).map(|p| p.sl), Some(dec!(2)));
        assert_eq!(c.map(|c| c.stop), Some(StopKind::Market));
        let bad = ProtectionSettings {
            split: Some("1.5".into()),
            ..ProtectionSettings::default()
        };
        let err = apply_settings(ProtectionConfig::DEFAULT, &bad).err();
        assert_eq!(
            err.and_then(|e| e.problem().field).as_deref(),
            Some("protection.split")
        );
    }
}
