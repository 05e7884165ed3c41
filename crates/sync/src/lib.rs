//! Layer 2 of ocoguard: reconciliation. At startup (after a delay), every
//! interval, and at once for accounts the gateway flags, it compares each
//! account's open entries with the exchange and calls
//! [`oco_core::Protector::protect`] (source `sync`) for whatever Layer 1
//! missed: fills seen by nobody, legs whose answer was lost, lists that ended
//! while nobody listened. Open lists of ours whose leg is not live (stray
//! lists) are reported, never canceled. It paces itself under the node's request-weight
//! budget and stops hammering accounts whose keys or requests keep failing.
//!
//! Not here: planning, placing or recording protection (that is `protect`, in
//! `oco-core`), the user-data stream (`ws-gateway`), SQL or HTTP (the `Store`
//! and `Exchange` ports), configuration from the environment (`bins/sync`).

pub mod breaker;
pub mod budget;
pub mod config;
pub mod error;
pub mod metrics;
pub mod reconcile;

pub use breaker::OpenReason;
pub use budget::{MeteredExchange, ORDER_WAIT_MAX, OrderMeter, WeightMeter, urgent, weight};
pub use config::{BreakerConfig, RetryConfig, SyncConfig};
pub use error::SyncError;
pub use metrics::{MetricsSnapshot, outcome_name};
pub use reconcile::{AccountReport, PassReport, Reconciler, StrayList};
