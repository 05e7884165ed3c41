//! Observability of ocoguard: the Prometheus metrics every binary exports
//! ([`Metrics`]), derived from what `protect` returns (a
//! [`oco_core::protect::ProtectObserver`]), from exchange answers
//! ([`ObservedExchange`]) and from coverage queries on the store
//! ([`refresh_coverage`]); the `GET /metrics` endpoint ([`router`],
//! [`serve`]); and the log subscriber ([`init_logs`]).
//!
//! No label carries a secret or an unbounded value: `source` has three
//! values, `code` is an exchange error code or kind, `account` an account id,
//! `outcome` one of `protect`'s outcomes.
//!
//! Not here: any protection rule (`oco-core`), SQL (behind the
//! [`oco_core::ports::Coverage`] port), or process wiring (`bins/*`).

mod exchange;
mod http;
#[cfg(feature = "test-support")]
pub mod log_audit;
mod logs;
mod metrics;
mod refresh;

pub use exchange::{ObservedExchange, error_code};
pub use http::{Exporter, METRICS_CONTENT_TYPE, router, serve};
pub use logs::{
    LOG_FORMAT_VAR, LogFormat, init_logs, init_logs_from_env, log_format_from_env, log_subscriber,
};
pub use metrics::{LATENCY_BUCKETS, Metrics, outcome_name};
pub use refresh::{COVERAGE_REFRESH, refresh_coverage};
