//! Coverage gauges, read periodically from the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use oco_core::ports::{Clock, Coverage};

use crate::metrics::Metrics;

/// How often [`refresh_coverage`] reads the store by default.
pub const COVERAGE_REFRESH: Duration = Duration::from_secs(10);

/// Reads the coverage of every account from the store at once and then
/// every `every`, copying it into `metrics`, until `shutdown` completes. A
/// failed query is logged and counted; the gauges keep their last figures
/// (their `oco_coverage_updated_timestamp_seconds` stops moving).
pub async fn refresh_coverage(
    metrics: Arc<Metrics>,
    coverage: Arc<dyn Coverage>,
    clock: Arc<dyn Clock>,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        // One unprotected entry is enough: the oldest gives the age.
        match coverage.coverage(None, 1).await {
            Ok(report) => metrics.set_coverage(&report, clock.now()),
            Err(err) => {
                metrics.coverage_failed();
                tracing::warn!(error = %err, "coverage query failed; gauges keep their last figures");
            }
        }
    }
}
