//! Binance Spot adapter of ocoguard: implements `oco-core`'s [`Exchange`]
//! port over signed REST ([`BinanceExchange`]) and its [`UserStream`] port
//! over the WebSocket API user-data subscription ([`BinanceUserStream`]).
//! It signs requests (HMAC-SHA256), keeps the server-time offset, paces
//! requests under the weight and order-count limits, maps every Binance
//! answer into the domain's [`ExchangeError`] kinds, caches `exchangeInfo`
//! rules, and keeps the user-data stream alive across reconnects, reporting
//! each interruption as a [`StreamEvent::Gap`]. User-data sessions are
//! subscriptions multiplexed onto shared connections (100 per connection by
//! default), and every connection attempt of the process is paced under
//! Binance's per-IP limit.
//!
//! Not here: deciding what to place (that is `oco-core`'s `protect`),
//! retrying placements (an unknown outcome is returned, never resent), any
//! storage, or reading the environment. Production, the spot testnet and
//! `exchange-sim` differ only in [`BinanceConfig`]'s URLs: every binary names
//! them with [`ExchangeKind`] and maps the choice and its URL overrides with
//! [`BinanceConfig::for_exchange`].
//!
//! [`Exchange`]: oco_core::ports::Exchange
//! [`UserStream`]: oco_core::ports::UserStream
//! [`ExchangeError`]: oco_core::ExchangeError
//! [`StreamEvent::Gap`]: oco_core::ports::StreamEvent::Gap

pub mod config;
pub mod error;
pub mod pacing;
mod rest;
pub mod sign;
mod stream;
pub mod wire;

pub use config::{
    BinanceConfig, ExchangeKind, MissingUrls, Pacing, StreamConfig, UnknownExchangeKind,
};
pub use error::BinanceError;
pub use pacing::PacingSnapshot;
pub use rest::BinanceExchange;
pub use stream::{BinanceStreamSession, BinanceUserStream};
