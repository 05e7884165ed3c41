//! Request parameters: query string and form body merged (the query wins), typed getters
//! that fail with Binance's codes, and the REST signature payload.

use std::str::FromStr;

use rust_decimal::Decimal;

use crate::error::ApiError;

/// Legal range Binance reports for decimal parameters.
pub(crate) const DECIMAL_RANGE: &str = r"^([0-9]{1,20})(\.[0-9]{1,20})?$";
const INT_RANGE: &str = "^[0-9]{1,20}$";
/// Legal range Binance reports for client order ids.
pub(crate) const CLIENT_ID_RANGE: &str = "^[a-zA-Z0-9-_]{1,36}$";
/// Decimal places accepted for prices and quantities (asset precision 8).
pub(crate) const MAX_SCALE: u32 = 8;

/// Merged parameters of one request.
#[derive(Debug, Default, Clone)]
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
}

fn parse_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|_| ApiError::bad(-1100, "Illegal characters found in a parameter."))?;
    for (i, (k, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(ApiError::bad(
                -1101,
                "Duplicate values for a parameter detected.",
            ));
        }
    }
    Ok(pairs)
}

impl Params {
    /// Parses the raw query and body; a name in both keeps the query's value.
    pub fn parse(query: &str, body: &str) -> Result<Self, ApiError> {
        let mut pairs = parse_pairs(query)?;
        for (k, v) in parse_pairs(body)? {
            if !pairs.iter().any(|(k2, _)| *k2 == k) {
                pairs.push((k, v));
            }
        }
        Ok(Self { pairs })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// `-1104` when a parameter outside `allowed` was sent.
    pub fn check_known(&self, allowed: &[&str]) -> Result<(), ApiError> {
        let read = self
            .pairs
            .iter()
            .filter(|(k, _)| allowed.contains(&k.as_str()))
            .count();
        if read < self.pairs.len() {
            return Err(ApiError::bad(
                -1104,
                format!(
                    "Not all sent parameters were read; read '{read}' parameter(s) but was sent '{}'.",
                    self.pairs.len()
                ),
            ));
        }
        Ok(())
    }

    /// Mandatory string parameter (`-1102` when missing or empty).
    pub fn req(&self, name: &str) -> Result<&str, ApiError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::mandatory(name)),
        }
    }

    /// Optional string parameter (`-1105` when sent empty).
    pub fn opt(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            Some("") => Err(ApiError::empty(name)),
            other => Ok(other),
        }
    }

    /// Optional decimal (`-1100` for a malformed number, `-1111` beyond 8 decimals).
    pub fn dec(&self, name: &str) -> Result<Option<Decimal>, ApiError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(v) => parse_decimal(name, v).map(Some),
        }
    }

    /// Mandatory decimal.
    pub fn req_dec(&self, name: &str) -> Result<Decimal, ApiError> {
        let v = self.req(name)?;
        parse_decimal(name, v)
    }

    /// Optional unsigned integer (`-1100` when malformed).
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(v) => parse_u64(name, v).map(Some),
        }
    }

    /// Optional signed integer (order list ids; `-1100` when malformed).
    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(v) => {
                let digits = v.strip_prefix('-').unwrap_or(v);
                if digits.is_empty()
                    || digits.len() > 19
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ApiError::illegal(name, INT_RANGE));
                }
                i64::from_str(v)
                    .map(Some)
                    .map_err(|_| ApiError::illegal(name, INT_RANGE))
            }
        }
    }

    /// Optional client order id (`-1100` outside the legal characters).
    pub fn client_id(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(v) => {
                if valid_client_id(v) {
                    Ok(Some(v))
                } else {
                    Err(ApiError::illegal(name, CLIENT_ID_RANGE))
                }
            }
        }
    }
}

/// Binance accepts `^[.A-Z:/a-z0-9_-]{1,36}$` from real clients.
pub(crate) fn valid_client_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 36
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

pub(crate) fn parse_u64(name: &str, v: &str) -> Result<u64, ApiError> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::illegal(name, INT_RANGE));
    }
    u64::from_str(v).map_err(|_| ApiError::bad(-1108, format!("Parameter '{name}' overflowed.")))
}

/// Parses `^([0-9]{1,20})(\.[0-9]{1,20})?$` into a decimal with at most 8 significant decimals.
pub(crate) fn parse_decimal(name: &str, v: &str) -> Result<Decimal, ApiError> {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (v, None),
    };
    let int_ok = !int.is_empty() && int.len() <= 20 && int.bytes().all(|b| b.is_ascii_digit());
    let frac_ok = frac
        .is_none_or(|f| !f.is_empty() && f.len() <= 20 && f.bytes().all(|b| b.is_ascii_digit()));
    if !int_ok || !frac_ok {
        return Err(ApiError::illegal(name, DECIMAL_RANGE));
    }
    let significant = frac.map(|f| f.trim_end_matches('0').len()).unwrap_or(0);
    if significant > MAX_SCALE as usize {
        return Err(ApiError::precision(name));
    }
    // Trailing zeros beyond 8 places carry no value; drop them so Decimal's 28 digits suffice.
    let trimmed = match frac {
        Some(f) => {
            let keep = f.trim_end_matches('0');
            if keep.is_empty() {
                int.to_string()
            } else {
                format!("{int}.{keep}")
            }
        }
        None => int.to_string(),
    };
    Decimal::from_str(&trimmed)
        .map(|d| d.normalize())
        .map_err(|_| ApiError::bad(-1108, format!("Parameter '{name}' overflowed.")))
}

/// The REST signature payload (query then body, both as received, without the
/// `signature` pair) and the signature, if one was sent.
pub(crate) fn signed_payload(query: &str, body: &str) -> (String, Option<String>) {
    let mut sig = None;
    let mut strip = |raw: &str| -> String {
        if !raw.contains("signature=") {
            return raw.to_string();
        }
        let mut kept: Vec<&str> = Vec::new();
        for part in raw.split('&') {
            if let Some(v) = part.strip_prefix("signature=") {
                if sig.is_none() {
                    sig = Some(v.to_string());
                }
            } else {
                kept.push(part);
            }
        }
        kept.join("&")
    };
    let q = strip(query);
    let b = strip(body);
    (q + &b, sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_wins_over_body() {
        let p = Params::parse("symbol=BTCUSDT&side=BUY", "side=SELL&type=LIMIT").unwrap();
        assert_eq!(p.get("side"), Some("BUY"));
        assert_eq!(p.get("type"), Some("LIMIT"));
    }

    #[test]
    fn duplicate_in_one_source_is_rejected() {
        let e = Params::parse("a=1&a=2", "").unwrap_err();
        assert_eq!(e.code, -1101);
    }

    #[test]
    fn decimals_follow_binance_pattern() {
        assert_eq!(
            parse_decimal("q", "49252.5").unwrap(),
            Decimal::new(492_525, 1)
        );
        assert_eq!(parse_decimal("q", "1e-05").unwrap_err().code, -1100);
        assert_eq!(parse_decimal("q", "-1").unwrap_err().code, -1100);
        assert_eq!(parse_decimal("q", "0.000000001").unwrap_err().code, -1111);
        assert!(parse_decimal("q", "0.10000000000").is_ok());
    }

    #[test]
    fn signature_is_stripped_from_either_part() {
        let (p, s) = signed_payload("a=1&signature=ab", "b=2");
        assert_eq!(p, "a=1b=2");
        assert_eq!(s.as_deref(), Some("ab"));
        let (p, s) = signed_payload("", "a=1&b=2&signature=cd");
        assert_eq!(p, "a=1&b=2");
        assert_eq!(s.as_deref(), Some("cd"));
    }
}
