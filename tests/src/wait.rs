//! Polling with a deadline, instead of sleeping to synchronise.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Calls `probe` every 50 ms until it returns `Some`, for at most `timeout`.
///
/// # Errors
/// When the deadline passes; the message names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
