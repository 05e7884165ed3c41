//! `sync`: ocoguard's reconciliation worker. Parses its configuration, wires
//! the adapters and runs until SIGINT/SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sync_bin::Config::parse();
    telemetry::init_logs_from_env("info").map_err(anyhow::Error::msg)?;
    sync_bin::run(&config, sync_bin::shutdown_signal()).await
}
