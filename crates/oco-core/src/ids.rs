//! Identifiers, and the deterministic client order ids that let any order on
//! the exchange be traced back to its entry, leg and generation.
//!
//! Layout: `{ns}-{kind}-{entry}-{leg}-{generation}` (entries omit the last two),
//! for example `og-L-1042-1-0`. Only `[A-Za-z0-9-]` is used: the strictest
//! charset Binance documents is `^[a-zA-Z0-9_-]{1,36}$`, and some clients sign
//! `:` and `/` unencoded.

use std::fmt;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not a client order id Binance accepts.
    #[error("client order id '{0}' must match ^[a-zA-Z0-9_-]{{1,36}}$")]
    IllegalClientId(String),
    /// The namespace is not 1–6 ASCII letters or digits.
    #[error("id namespace '{0}' must be 1 to 6 ASCII letters or digits")]
    IllegalNamespace(String),
    /// The text is not an idempotency key (see [`IdempotencyKey::new`]).
    #[error(
        "must be 1 to {max} printable ASCII characters, not starting or ending with a space",
        max = IdempotencyKey::MAX_LEN
    )]
    IllegalIdempotencyKey,
    /// A number does not fit the id layout.
    #[error("{what} {value} does not fit a client order id (max {max})")]
    TooLarge {
        /// Which number.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The largest that fits.
        max: u64,
    },
}

macro_rules! int_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

int_id!(
    /// An exchange account registered with ocoguard.
    AccountId
);
int_id!(
    /// An entry order placed through (or adopted by) ocoguard.
    EntryId
);

/// A client order id as the exchange accepts it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientOrderId(String);

impl ClientOrderId {
    /// Checks the charset and length.
    ///
    /// # Errors
    /// [`IdError::IllegalClientId`] outside `^[a-zA-Z0-9_-]{1,36}$`.
    pub fn new(text: impl Into<String>) -> Result<Self, IdError> {
        let text = text.into();
        let ok = (1..=36).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(text))
        } else {
            Err(IdError::IllegalClientId(text))
        }
    }

    /// The id as sent to the exchange.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientOrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client's key for one entry request (the `Idempotency-Key` header): a
/// request that carries a key its account already used is answered with the
/// entry stored under it, and nothing is sent again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Longest key accepted.
    pub const MAX_LEN: usize = 64;

    /// Checks the charset and length: 1 to [`IdempotencyKey::MAX_LEN`]
    /// printable ASCII characters (space to `~`), no space first or last (a
    /// proxy may trim it off a header value, and the retry would carry
    /// another key).
    ///
    /// # Errors
    /// [`IdError::IllegalIdempotencyKey`] otherwise.
    pub fn new(text: impl Into<String>) -> Result<Self, IdError> {
        let text = text.into();
        let ok = (1..=Self::MAX_LEN).contains(&text.len())
            && text.bytes().all(|b| (b' '..=b'~').contains(&b))
            && !text.starts_with(' ')
            && !text.ends_with(' ');
        if ok {
            Ok(Self(text))
        } else {
            Err(IdError::IllegalIdempotencyKey)
        }
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which of an entry's OCO pairs: leg 1 carries TP1, leg 2 carries TP2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LegIndex {
    /// TP1 + SL.
    First,
    /// TP2 + SL.
    Second,
}

impl LegIndex {
    /// 1 or 2.
    pub fn number(self) -> u8 {
        match self {
            LegIndex::First => 1,
            LegIndex::Second => 2,
        }
    }

    /// The inverse of [`LegIndex::number`].
    pub fn from_number(n: u8) -> Option<LegIndex> {
        match n {
            1 => Some(LegIndex::First),
            2 => Some(LegIndex::Second),
            _ => None,
        }
    }
}

/// The unit a claim is taken on: one OCO of one entry in one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LegKey {
    /// The protected entry.
    pub entry: EntryId,
    /// Which pair.
    pub leg: LegIndex,
    /// Raised each time the entry's protection is planned anew.
    pub generation: u32,
}

impl fmt::Display for LegKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/g{}",
            self.entry,
            self.leg.number(),
            self.generation
        )
    }
}

/// What an order with one of our client ids is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderRole {
    /// The entry order itself.
    Entry(EntryId),
    /// The order list (its `listClientOrderId`).
    List(LegKey),
    /// The take-profit (`LIMIT_MAKER`, above) order of a list.
    TakeProfit(LegKey),
    /// The stop-loss (below) order of a list.
    StopLoss(LegKey),
    /// A market exit placed when protection came too late.
    Exit(LegKey),
}

/// The three client ids of one OCO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcoClientIds {
    /// `listClientOrderId`.
    pub list: ClientOrderId,
    /// `aboveClientOrderId` (take-profit).
    pub take_profit: ClientOrderId,
    /// `belowClientOrderId` (stop-loss).
    pub stop_loss: ClientOrderId,
}

/// Largest entry id that fits the layout; the store's sequences stay far below it.
pub const MAX_ENTRY_ID: u64 = 999_999_999_999_999;
/// Largest generation that fits the layout.
pub const MAX_GENERATION: u32 = 99_999;

/// Mints and parses our client ids under a namespace, so that two deployments
/// sharing an exchange account cannot mistake each other's orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdScheme {
    ns: String,
}

impl IdScheme {
    /// A scheme under `ns` (1–6 ASCII letters or digits, e.g. `og`).
    ///
    /// # Errors
    /// [`IdError::IllegalNamespace`] otherwise.
    pub fn new(ns: &str) -> Result<Self, IdError> {
        if (1..=6).contains(&ns.len()) && ns.bytes().all(|b| b.is_ascii_alphanumeric()) {
            Ok(Self { ns: ns.to_owned() })
        } else {
            Err(IdError::IllegalNamespace(ns.to_owned()))
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The client id of an entry order.
    ///
    /// # Errors
    /// [`IdError::TooLarge`] for an id beyond [`MAX_ENTRY_ID`].
    pub fn entry(&self, entry: EntryId) -> Result<ClientOrderId, IdError> {
        let e = check_entry(entry)?;
        ClientOrderId::new(format!("{}-E-{e}", self.ns))
    }

    /// The client ids of an OCO.
    ///
    /// # Errors
    /// [`IdError::TooLarge`] when the entry id or generation does not fit.
    pub fn oco(&self, key: LegKey) -> Result<OcoClientIds, IdError> {
        Ok(OcoClientIds {
            list: self.leg_id('L', key)?,
            take_profit: self.leg_id('T', key)?,
            stop_loss: self.leg_id('S', key)?,
        })
    }

    /// The client id of a market exit for `key`.
    ///
    /// # Errors
    /// [`IdError::TooLarge`] when the entry id or generation does not fit.
    pub fn exit(&self, key: LegKey) -> Result<ClientOrderId, IdError> {
        self.leg_id('X', key)
    }

    fn leg_id(&self, kind: char, key: LegKey) -> Result<ClientOrderId, IdError> {
        let e = check_entry(key.entry)?;
        if key.generation > MAX_GENERATION {
            return Err(IdError::TooLarge {
                what: "generation",
                value: u64::from(key.generation),
                max: u64::from(MAX_GENERATION),
            });
        }
        ClientOrderId::new(format!(
            "{}-{kind}-{e}-{}-{}",
            self.ns,
            key.leg.number(),
            key.generation
        ))
    }

    /// What one of our ids names; `None` for ids of other namespaces or
    /// orders placed by hand.
    pub fn parse(&self, id: &str) -> Option<OrderRole> {
        let rest = id.strip_prefix(self.ns.as_str())?.strip_prefix('-')?;
        let mut parts = rest.split('-');
        let kind = parts.next()?;
        let entry = EntryId(parse_num(parts.next()?)?);
        if kind == "E" {
            return parts.next().is_none().then_some(OrderRole::Entry(entry));
        }
        let leg = LegIndex::from_number(u8::try_from(parse_num(parts.next()?)?).ok()?)?;
        let generation = u32::try_from(parse_num(parts.next()?)?).ok()?;
        if parts.next().is_some() {
            return None;
        }
        let key = LegKey {
            entry,
            leg,
            generation,
        };
        match kind {
            "L" => Some(OrderRole::List(key)),
            "T" => Some(OrderRole::TakeProfit(key)),
            "S" => Some(OrderRole::StopLoss(key)),
            "X" => Some(OrderRole::Exit(key)),
            _ => None,
        }
    }
}

fn check_entry(entry: EntryId) -> Result<u64, IdError> {
    match u64::try_from(entry.0) {
        Ok(v) if v <= MAX_ENTRY_ID => Ok(v),
        _ => Err(IdError::TooLarge {
            what: "entry id",
            value: entry.0.unsigned_abs(),
            max: MAX_ENTRY_ID,
        }),
    }
}

// Only canonical decimal (no sign, no leading zeros) so that parse ∘ mint is a bijection.
fn parse_num(s: &str) -> Option<i64> {
    let canonical = !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn mints_readable_ids() {
        let ids = IdScheme::new("og").unwrap();
        let key = LegKey {
            entry: EntryId(1042),
            leg: LegIndex::Second,
            generation: 3,
        };
        let oco = ids.oco(key).unwrap();
        assert_eq!(oco.list.as_str(), "og-L-1042-2-3");
        assert_eq!(oco.take_profit.as_str(), "og-T-1042-2-3");
        assert_eq!(oco.stop_loss.as_str(), "og-S-1042-2-3");
        assert_eq!(ids.entry(EntryId(7)).unwrap().as_str(), "og-E-7");
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_up_to_64() {
        for good in [
            "a",
            "order 17",
            "~!#$%&'()*+,-./:;<=>?@[]^_`{|}",
            &"k".repeat(64),
        ] {
            assert_eq!(IdempotencyKey::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            " a",
            "a ",
            "tab\there",
            "caf\u{e9}",
            "nul\0",
            &"k".repeat(65),
        ] {
            assert_eq!(
                IdempotencyKey::new(bad),
                Err(IdError::IllegalIdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_foreign_and_malformed_ids() {
        let ids = IdScheme::new("og").unwrap();
        for foreign in [
            "x-ABCDEF1234",
            "og2-L-1-1-0",
            "og-L-01-1-0",
            "og-L-1-3-0",
            "og-E-1-1",
            "og-Q-1-1-0",
            "og-L-1-1-0-9",
        ] {
            assert_eq!(ids.parse(foreign), None, "{foreign}");
        }
        assert!(IdScheme::new("o:g").is_err());
        assert!(ClientOrderId::new("a".repeat(37)).is_err());
        assert!(ClientOrderId::new("has.dot").is_err());
    }

    proptest! {
        #[test]
        fn every_minted_id_parses_back(
            entry in 0..=MAX_ENTRY_ID as i64,
            second in any::<bool>(),
            generation in 0..=MAX_GENERATION,
            ns in "[a-zA-Z0-9]{1,6}",
        ) {
            let ids = IdScheme::new(&ns).unwrap();
            let key = LegKey {
                entry: EntryId(entry),
                leg: if second { LegIndex::Second } else { LegIndex::First },
                generation,
            };
            let oco = ids.oco(key).unwrap();
            prop_assert!(oco.list.as_str().len() <= 36);
            prop_assert_eq!(ids.parse(oco.list.as_str()), Some(OrderRole::List(key)));
            prop_assert_eq!(ids.parse(oco.take_profit.as_str()), Some(OrderRole::TakeProfit(key)));
            prop_assert_eq!(ids.parse(oco.stop_loss.as_str()), Some(OrderRole::StopLoss(key)));
            prop_assert_eq!(ids.parse(ids.exit(key).unwrap().as_str()), Some(OrderRole::Exit(key)));
            prop_assert_eq!(
                ids.parse(ids.entry(EntryId(entry)).unwrap().as_str()),
                Some(OrderRole::Entry(EntryId(entry)))
            );
        }
    }
}
