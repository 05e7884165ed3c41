//! Typed configuration: where Binance is and how hard the adapter may push it.
//! No `Default` and no environment reads: the binary builds it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::error::BinanceError;

/// Which Binance-compatible exchange a process talks to. Every binary is told
/// (`OCO_EXCHANGE`, `--exchange`, `exchange.kind`), never assumes: keys of one
/// exchange sent to another fail every request. Names are lowercase
/// (`production`, `testnet`, `sim`) in flags, variables and files alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Binance Spot, `api.binance.com`.
    Production,
    /// The Binance Spot testnet, `testnet.binance.vision`.
    Testnet,
    /// An `exchange-sim` (or any Binance-compatible endpoint): no preset,
    /// both URLs are required.
    Sim,
}

impl ExchangeKind {
    /// Every kind, in the order help texts list them.
    pub const ALL: [ExchangeKind; 3] = [Self::Production, Self::Testnet, Self::Sim];

    /// The name operators write.
    pub fn name(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Testnet => "testnet",
            Self::Sim => "sim",
        }
    }

    /// One line for help texts.
    pub fn about(self) -> &'static str {
        match self {
            Self::Production => "`api.binance.com`",
            Self::Testnet => "`testnet.binance.vision`",
            Self::Sim => "An `exchange-sim`: both URLs are required",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExchangeKind {
    type Err = UnknownExchangeKind;

    fn from_str(s: &str) -> Result<Self, UnknownExchangeKind> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or(UnknownExchangeKind)
    }
}

/// A name that is none of [`ExchangeKind::ALL`]'s. The caller names the
/// setting and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected `production`, `testnet` or `sim`")]
pub struct UnknownExchangeKind;

/// An exchange without preset endpoints was given fewer than both URLs. The
/// caller names its own settings (flags, variables or file keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("exchange `{kind}` has no preset urls: both the rest and the ws url are required")]
pub struct MissingUrls {
    /// The kind chosen.
    pub kind: ExchangeKind,
}

/// Where the adapter connects and how it behaves. Build it with
/// [`BinanceConfig::production`], [`BinanceConfig::testnet`] or
/// [`BinanceConfig::custom`], then adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinanceConfig {
    /// REST base without a trailing slash, e.g. `https://api.binance.com`;
    /// paths such as `/api/v3/order` are appended.
    pub rest_base: String,
    /// WebSocket API endpoint, e.g. `wss://ws-api.binance.com:443/ws-api/v3`.
    pub ws_api_url: String,
    /// `recvWindow` sent with every signed request (Binance: at most 60 s).
    pub recv_window: Duration,
    /// Whole-request timeout. A placement or cancel that times out is an
    /// unknown outcome.
    pub request_timeout: Duration,
    /// TCP/TLS connect timeout (a connect failure means nothing was sent).
    pub connect_timeout: Duration,
    /// How long cached `exchangeInfo` rules stay fresh.
    pub rules_ttl: Duration,
    /// Request-weight and order-count budgets.
    pub pacing: Pacing,
    /// User-data stream timings.
    pub stream: StreamConfig,
}

/// Budgets the adapter keeps below the exchange's limits. Requests wait for
/// the next window rather than exceed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pacing {
    /// Request weight per minute for this adapter instance (one IP).
    /// Binance's limit is 6000; keep a margin for other processes on the IP.
    pub weight_per_minute: u32,
    /// New orders per 10 s per API key (Binance: 50 or 100 per account).
    pub orders_per_10s: u32,
    /// New orders per day per API key (Binance: 160 000 or 200 000).
    pub orders_per_day: u32,
    /// Longest the adapter waits by itself (pacing, or a `Retry-After` after a
    /// 429) before it answers `RateLimited` instead.
    pub max_wait: Duration,
}

/// Timings of the user-data stream and how sessions share connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Reconnect when nothing at all (event, ping, pong) arrived for this long.
    pub stall_timeout: Duration,
    /// Interval of our own ping frames, so that a silent server is detected
    /// through its missing pongs even when it never pings.
    pub ping_interval: Duration,
    /// Reconnect proactively once a connection is this old (Binance closes
    /// them at 24 h). Each connection takes a random share of the last tenth
    /// off it, so that connections opened together do not all reconnect in
    /// the same second a day later.
    pub max_connection_age: Duration,
    /// First reconnect delay; doubled after each failed attempt.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Time allowed for connect + subscribe.
    pub connect_timeout: Duration,
    /// Events buffered per session between the connection's reader and the
    /// consumer. A session whose buffer is full is ended (the others on its
    /// connection never wait for it).
    pub buffer: usize,
    /// Most live subscriptions (accounts) one connection carries, 1 to 1000
    /// (Binance's cap per connection). The default, 100, keeps a thousand
    /// accounts on ten connections (ten connection attempts when all of
    /// them reconnect, far under Binance's 300 per 5 minutes per IP), while
    /// one lost connection interrupts, and sends to reconciliation, only a
    /// tenth of them, and one reader task parses the events of at most a
    /// hundred accounts.
    pub subscriptions_per_connection: usize,
    /// Connection attempts (first opens and reconnects together, refused
    /// ones included) this process makes at most per
    /// [`StreamConfig::connect_window`]. Binance allows 300 per 5 minutes
    /// per IP; the default, 250, leaves room for a restart's overlap and
    /// other processes on the IP.
    pub connect_attempts: u32,
    /// The window of [`StreamConfig::connect_attempts`].
    pub connect_window: Duration,
    /// Attempts that may go at once; beyond them attempts are spread
    /// evenly, one every `connect_window / connect_attempts`, so a burst of
    /// reconnects (a `serverShutdown` everywhere) never spends the budget
    /// in a second. Between 1 and `connect_attempts`.
    pub connect_burst: u32,
}

impl StreamConfig {
    /// Values for Binance: a stall after 60 s of silence (the server pings
    /// every 20 s), our pings every 20 s, reconnect between 21 h 27 min and
    /// 23 h 50 min, backoff 250 ms doubling to 30 s, 10 s to connect and
    /// subscribe, 100 subscriptions per connection, at most 250 connection
    /// attempts per 5 minutes, 10 at once, then one every 1.2 s.
    pub fn binance() -> Self {
        Self {
            stall_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(23 * 3600 + 50 * 60),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            buffer: 4096,
            subscriptions_per_connection: 100,
            connect_attempts: 250,
            connect_window: Duration::from_secs(5 * 60),
            connect_burst: 10,
        }
    }

    /// Sets the operator's connection limits: `per_connection` accounts on
    /// one connection and `attempts` connection attempts per
    /// [`StreamConfig::connect_window`], the burst kept within them.
    pub fn set_connection_limits(&mut self, per_connection: usize, attempts: u32) {
        self.subscriptions_per_connection = per_connection;
        self.connect_attempts = attempts;
        self.connect_burst = self.connect_burst.min(attempts);
    }

    /// Checks the values that have a valid range.
    ///
    /// # Errors
    /// [`BinanceError::BadConfig`] naming the field and its rule.
    pub fn validate(&self) -> Result<(), BinanceError> {
        let bad =
            |field: &'static str, reason: String| Err(BinanceError::BadConfig { field, reason });
        if !(1..=MAX_SUBSCRIPTIONS_PER_CONNECTION).contains(&self.subscriptions_per_connection) {
            return bad(
                "stream.subscriptions_per_connection",
                format!(
                    "{} is not between 1 and {MAX_SUBSCRIPTIONS_PER_CONNECTION}",
                    self.subscriptions_per_connection
                ),
            );
        }
        if self.connect_attempts == 0 {
            return bad("stream.connect_attempts", "0 is not at least 1".into());
        }
        if self.connect_window.is_zero() {
            return bad("stream.connect_window", "0 s is not positive".into());
        }
        if !(1..=self.connect_attempts).contains(&self.connect_burst) {
            return bad(
                "stream.connect_burst",
                format!(
                    "{} is not between 1 and connect_attempts ({})",
                    self.connect_burst, self.connect_attempts
                ),
            );
        }
        if self.buffer == 0 {
            return bad("stream.buffer", "0 is not at least 1".into());
        }
        Ok(())
    }
}

/// Binance's cap on active user-data subscriptions per connection.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 1000;

impl Pacing {
    /// 5000 weight/min (of 6000), 40 orders/10 s (of 50), 150 000/day (of
    /// 160 000), waiting at most 10 s by itself.
    pub fn binance() -> Self {
        Self {
            weight_per_minute: 5000,
            orders_per_10s: 40,
            orders_per_day: 150_000,
            max_wait: Duration::from_secs(10),
        }
    }
}

impl BinanceConfig {
    /// The configuration of `kind`: its preset endpoints, each replaced by
    /// the URL given (the REST base without its trailing slash), with the
    /// production timings. The one mapping of every binary's exchange
    /// settings.
    ///
    /// # Errors
    /// [`MissingUrls`] for a kind without presets (`sim`) unless both URLs
    /// are given.
    pub fn for_exchange(
        kind: ExchangeKind,
        rest_url: Option<&str>,
        ws_url: Option<&str>,
    ) -> Result<Self, MissingUrls> {
        let mut config = match kind {
            ExchangeKind::Production => Self::production(),
            ExchangeKind::Testnet => Self::testnet(),
            ExchangeKind::Sim => match (rest_url, ws_url) {
                (Some(rest), Some(ws)) => return Ok(Self::custom(rest, ws)),
                _ => return Err(MissingUrls { kind }),
            },
        };
        if let Some(rest) = rest_url {
            rest.trim_end_matches('/').clone_into(&mut config.rest_base);
        }
        if let Some(ws) = ws_url {
            ws.clone_into(&mut config.ws_api_url);
        }
        Ok(config)
    }

    /// Binance Spot production.
    pub fn production() -> Self {
        Self::custom(
            "https://api.binance.com",
            "wss://ws-api.binance.com:443/ws-api/v3",
        )
    }

    /// The Spot testnet (reset about monthly, no commission by default).
    pub fn testnet() -> Self {
        Self::custom(
            "https://testnet.binance.vision",
            "wss://ws-api.testnet.binance.vision/ws-api/v3",
        )
    }

    /// Any Binance-compatible endpoint, e.g. `exchange-sim` at
    /// `http://127.0.0.1:PORT` and `ws://127.0.0.1:PORT/ws-api/v3`, with the
    /// production timings.
    pub fn custom(rest_base: impl Into<String>, ws_api_url: impl Into<String>) -> Self {
        let rest_base: String = rest_base.into();
        Self {
            rest_base: rest_base.trim_end_matches('/').to_owned(),
            ws_api_url: ws_api_url.into(),
            recv_window: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            rules_ttl: Duration::from_secs(15 * 60),
            pacing: Pacing::binance(),
            stream: StreamConfig::binance(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(tweak: impl FnOnce(&mut StreamConfig)) -> &'static str {
        let mut c = StreamConfig::binance();
        tweak(&mut c);
        match c.validate() {
            Err(BinanceError::BadConfig { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn stream_settings_out_of_range_are_refused_by_name() {
        assert!(StreamConfig::binance().validate().is_ok());
        for ok in [1, MAX_SUBSCRIPTIONS_PER_CONNECTION] {
            let mut c = StreamConfig::binance();
            c.subscriptions_per_connection = ok;
            assert!(c.validate().is_ok(), "{ok}");
        }
        for bad in [0, MAX_SUBSCRIPTIONS_PER_CONNECTION + 1] {
            assert_eq!(
                refused(|c| c.subscriptions_per_connection = bad),
                "stream.subscriptions_per_connection"
            );
        }
        assert_eq!(
            refused(|c| c.connect_attempts = 0),
            "stream.connect_attempts"
        );
        assert_eq!(
            refused(|c| c.connect_window = Duration::ZERO),
            "stream.connect_window"
        );
        assert_eq!(refused(|c| c.connect_burst = 0), "stream.connect_burst");
        assert_eq!(
            refused(|c| c.connect_burst = c.connect_attempts + 1),
            "stream.connect_burst"
        );
        assert_eq!(refused(|c| c.buffer = 0), "stream.buffer");
    }

    #[test]
    fn each_exchange_kind_maps_to_its_endpoints() {
        let check = |kind, rest: Option<&str>, ws: Option<&str>, expected: (&str, &str)| {
            let c = BinanceConfig::for_exchange(kind, rest, ws)
                .unwrap_or_else(|e| panic!("{kind} {rest:?} {ws:?}: {e}"));
            assert_eq!(
                (c.rest_base.as_str(), c.ws_api_url.as_str()),
                expected,
                "{kind} {rest:?} {ws:?}"
            );
            assert_eq!(c.pacing, Pacing::binance(), "{kind}: production timings");
        };
        let prod = BinanceConfig::production();
        let test = BinanceConfig::testnet();
        let presets = [
            (ExchangeKind::Production, &prod),
            (ExchangeKind::Testnet, &test),
        ];
        for (kind, preset) in presets {
            check(kind, None, None, (&preset.rest_base, &preset.ws_api_url));
            check(
                kind,
                Some("http://proxy:9/"),
                None,
                ("http://proxy:9", &preset.ws_api_url),
            );
            check(
                kind,
                None,
                Some("ws://proxy:9/ws"),
                (&preset.rest_base, "ws://proxy:9/ws"),
            );
        }
        check(
            ExchangeKind::Sim,
            Some("http://127.0.0.1:9400/"),
            Some("ws://127.0.0.1:9400/ws-api/v3"),
            ("http://127.0.0.1:9400", "ws://127.0.0.1:9400/ws-api/v3"),
        );
        for (rest, ws) in [
            (None, None),
            (Some("http://s"), None),
            (None, Some("ws://s")),
        ] {
            assert_eq!(
                BinanceConfig::for_exchange(ExchangeKind::Sim, rest, ws),
                Err(MissingUrls {
                    kind: ExchangeKind::Sim
                }),
                "{rest:?} {ws:?}"
            );
        }
    }

    #[test]
    fn exchange_kinds_are_read_by_their_lowercase_names() {
        for kind in ExchangeKind::ALL {
            assert_eq!(kind.name().parse(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
        }
        for bad in ["Production", "prod", "mainnet", ""] {
            assert_eq!(
                bad.parse::<ExchangeKind>(),
                Err(UnknownExchangeKind),
                "{bad}"
            );
        }
        assert_eq!(
            UnknownExchangeKind.to_string(),
            "expected `production`, `testnet` or `sim`"
        );
    }

    #[test]
    fn the_default_pace_stays_under_binances_connection_limit() {
        let c = StreamConfig::binance();
        // Binance: 300 connection attempts per 5 minutes per IP.
        assert!(c.connect_window >= Duration::from_secs(300));
        assert!(c.connect_attempts < 300);
    }
}
