//! `exchange-sim`: runs the Binance Spot simulator on an address until SIGINT/SIGTERM.
//! Prints the bound address (`IP:PORT`) as the first line of stdout.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use exchange_sim_bin::{Args, config_from_args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listen: SocketAddr = args.listen;
    let config = config_from_args(&args).context("reading arguments")?;
    let sim = exchange_sim::Sim::start(config)
        .await
        .with_context(|| format!("starting exchange-sim on {listen}"))?;
    println!("{}", sim.addr());
    shutdown_signal().await;
    sim.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
