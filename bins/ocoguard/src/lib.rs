//! ocoguard in one process. `demo` starts the bundled exchange simulator, a
//! store, and all three layers (ws-gateway, sync, api) in-process, drives
//! entries through the HTTP API, injects a stream outage and a gateway
//! restart, moves prices through targets and stops, and reports.

pub mod demo;

/// Errors only, so that the demo's progress lines read well (`RUST_LOG` overrides).
pub fn init_quiet_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}
