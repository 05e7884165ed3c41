//! `ocoguard`: the one-command demo against the bundled exchange simulator.

use clap::{Parser, Subcommand};

/// ocoguard: every filled spot entry protected by exchange-side OCO orders.
#[derive(Debug, Parser)]
#[command(name = "ocoguard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every layer in one process against the bundled exchange simulator
    /// (in-memory store, or PostgreSQL when DATABASE_URL is set) and reports.
    Demo,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            ocoguard::init_quiet_logs();
            let report = ocoguard::demo::run(&mut std::io::stdout()).await?;
            if !report.all_filled_protected() {
                anyhow::bail!("some filled entries were not protected; see the report above");
            }
            Ok(())
        }
    }
}
