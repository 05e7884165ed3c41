//! `api`: the entry API of ocoguard (`api serve`, `api users add NAME`).
//! Parses the command line, installs logging, runs; the wiring is in the
//! library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logs_from_env("info").map_err(anyhow::Error::msg)?;
    api_bin::run(api_bin::Cli::parse()).await
}
