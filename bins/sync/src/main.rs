//! `sync`: ocoguard's reconciliation worker. Parses its configuration, wires
//! the adapters and runs until SIGINT/SIGTERM.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sync_bin::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    sync_bin::run(&config, sync_bin::shutdown_signal()).await
}
