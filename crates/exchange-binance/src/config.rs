//! Typed configuration: where Binance is and how hard the adapter may push it.
//! No `Default` and no environment reads: the binary builds it.

use std::time::Duration;

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

/// Timings of the user-data stream session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Reconnect when nothing at all (event, ping, pong) arrived for this long.
    pub stall_timeout: Duration,
    /// Interval of our own ping frames, so that a silent server is detected
    /// through its missing pongs even when it never pings.
    pub ping_interval: Duration,
    /// Reconnect proactively once a connection is this old (Binance closes
    /// them at 24 h).
    pub max_connection_age: Duration,
    /// First reconnect delay; doubled after each failed attempt.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Time allowed for connect + subscribe.
    pub connect_timeout: Duration,
    /// Events buffered between the connection task and the consumer.
    pub buffer: usize,
}

impl StreamConfig {
    /// Values for Binance: a stall after 60 s of silence (the server pings
    /// every 20 s), our pings every 20 s, reconnect at 23 h 50 min, backoff
    /// 250 ms doubling to 30 s, 10 s to connect and subscribe.
    pub fn binance() -> Self {
        Self {
            stall_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(23 * 3600 + 50 * 60),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            buffer: 4096,
        }
    }
}

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
