//! `api`: the entry API of ocoguard (`api serve`, `api users add NAME`).
//! Parses the command line, installs logging, runs; the wiring is in the
//! library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    api_bin::run(api_bin::Cli::parse()).await
}
