//! Start-up configuration: listen address, accounts, limits, WebSocket timings.

use std::net::SocketAddr;
use std::time::Duration;

use rust_decimal::Decimal;

/// Which asset pays the trading commission of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommissionAsset {
    /// The asset received, as Binance does without BNB: the base asset on BUY fills (the
    /// buyer gets `qty - fee`), the quote asset on SELL fills.
    Base,
    /// Always the quote asset. On BUY fills it is taken from the free quote balance, falling
    /// back to the received base asset when the free quote balance is short.
    Quote,
    /// A third asset (e.g. `BNB`), charged at a fixed conversion: `fee = quote amount × rate ÷
    /// price of <ASSET><QUOTE>` when the simulator lists that symbol, else 1:1 with the quote
    /// amount. When the free balance of that asset is short the fee falls back to [`Self::Base`].
    Other(String),
}

/// Commission rate and paying asset of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commission {
    /// Fraction of each fill, e.g. `0.001` (0.1 %), the same for maker and taker.
    pub rate: Decimal,
    /// Asset the commission is charged in.
    pub asset: CommissionAsset,
}

impl Default for Commission {
    /// 0.1 % in the received asset (BUY fills deliver base minus fee), like Binance's default.
    fn default() -> Self {
        Self {
            rate: Decimal::new(1, 3),
            asset: CommissionAsset::Base,
        }
    }
}

/// One account: API key, HMAC secret, starting balances and commission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSpec {
    /// Value of the `X-MBX-APIKEY` header and of `apiKey` on the WebSocket API.
    pub api_key: String,
    /// HMAC-SHA256 secret.
    pub secret: String,
    /// Starting free balances, e.g. `("USDT", 10000)`.
    pub balances: Vec<(String, Decimal)>,
    /// Commission charged on fills.
    pub commission: Commission,
}

impl AccountSpec {
    /// An account with the default commission (0.001 in the received asset).
    pub fn new(
        api_key: impl Into<String>,
        secret: impl Into<String>,
        balances: Vec<(String, Decimal)>,
    ) -> Self {
        Self {
            api_key: api_key.into(),
            secret: secret.into(),
            balances,
            commission: Commission::default(),
        }
    }

    /// Replaces the commission.
    pub fn with_commission(mut self, commission: Commission) -> Self {
        self.commission = commission;
        self
    }
}

/// Request-weight and order-count limits. Off unless `enabled`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    /// Enforce the limits (headers are sent either way).
    pub enabled: bool,
    /// `REQUEST_WEIGHT` per IP per minute (Binance: 6000).
    pub request_weight_per_minute: u32,
    /// `ORDERS` per account per 10 seconds (Binance: 50 or 100).
    pub orders_per_10s: u32,
    /// `ORDERS` per account per day (Binance: 160000).
    pub orders_per_day: u32,
    /// Requests an IP may send while limited (after a 429) before it is banned with 418.
    pub ban_after_ignored: u32,
    /// Length of a 418 ban.
    pub ban_duration: Duration,
}

impl RateLimits {
    /// No enforcement (the default; benches use it).
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::binance()
        }
    }

    /// Binance's published values, enforced: 6000 weight/min, 50 orders/10 s, 160000 orders/day,
    /// ban after 5 ignored 429s for 2 minutes.
    pub fn binance() -> Self {
        Self {
            enabled: true,
            request_weight_per_minute: 6000,
            orders_per_10s: 50,
            orders_per_day: 160_000,
            ban_after_ignored: 5,
            ban_duration: Duration::from_secs(120),
        }
    }
}

/// Everything [`crate::Sim::start`] needs. Built with [`SimConfig::new`] and `with_*` setters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) accounts: Vec<AccountSpec>,
    pub(crate) admin: bool,
    pub(crate) faults: bool,
    pub(crate) rate_limits: RateLimits,
    pub(crate) max_connection_age: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) request_log_capacity: usize,
}

impl SimConfig {
    /// Defaults: no accounts, admin API on, fault endpoints off, rate limits off, WebSocket
    /// connections live 24 h, pinged every 20 s, dropped 60 s after an unanswered ping.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            accounts: Vec::new(),
            admin: true,
            faults: false,
            rate_limits: RateLimits::off(),
            max_connection_age: Duration::from_secs(24 * 3600),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            request_log_capacity: 100_000,
        }
    }

    /// Adds an account.
    pub fn with_account(mut self, account: AccountSpec) -> Self {
        self.accounts.push(account);
        self
    }

    /// Serves the admin HTTP API under `/admin/` (prices, accounts, inspection).
    pub fn with_admin(mut self, on: bool) -> Self {
        self.admin = on;
        self
    }

    /// Serves the fault-injection endpoints under `/admin/faults/` (implies the admin API).
    pub fn with_faults(mut self, on: bool) -> Self {
        self.faults = on;
        if on {
            self.admin = true;
        }
        self
    }

    /// Request-weight and order-count limits.
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits;
        self
    }

    /// Closes WebSocket API connections after this age (Binance: 24 h).
    pub fn with_max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = age;
        self
    }

    /// Interval of server ping frames on the WebSocket API (Binance: 20 s).
    pub fn with_ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// Disconnect when a ping is not answered within this time (Binance: 1 minute).
    pub fn with_pong_timeout(mut self, timeout: Duration) -> Self {
        self.pong_timeout = timeout;
        self
    }

    /// How many received requests the inspection log keeps (oldest dropped first).
    pub fn with_request_log_capacity(mut self, n: usize) -> Self {
        self.request_log_capacity = n;
        self
    }
}
