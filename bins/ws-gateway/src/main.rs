//! `ws-gateway`: ocoguard's real-time layer. Parses its configuration, wires
//! the adapters and runs until SIGINT/SIGTERM (or applies migrations with
//! `ws-gateway migrate`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ws_gateway_bin::Config::parse();
    ws_gateway_bin::init_tracing(config.log_format);
    ws_gateway_bin::run(&config, ws_gateway_bin::shutdown_signal()).await
}
