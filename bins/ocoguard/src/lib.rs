//! ocoguard in one process. `demo` starts the bundled exchange simulator, a
//! store, and all three layers (ws-gateway, sync, api) in-process, drives
//! entries through the HTTP API, injects a stream outage and a gateway
//! restart, moves prices through targets and stops, and reports. `run`
//! starts the three layers against a configured exchange and PostgreSQL;
//! `migrate` applies the database migrations.

pub mod demo;
pub mod run;

use clap::{Parser, Subcommand};

/// ocoguard: every filled spot entry protected by exchange-side OCO orders.
#[derive(Debug, Parser)]
#[command(name = "ocoguard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs every layer in one process against the bundled exchange simulator
    /// (in-memory store, or PostgreSQL when DATABASE_URL is set) and reports.
    Demo,
    /// Runs ws-gateway, sync and the entry API in one process against a
    /// configured exchange and PostgreSQL, until SIGINT/SIGTERM.
    Run(Box<run::RunArgs>),
    /// Applies pending database migrations, then exits.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

/// Runs the parsed command line.
///
/// # Errors
/// A demo step that failed or filled entries left unprotected; bad settings,
/// an unreachable database or a failing layer for `run` and `migrate`.
pub async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo => {
            init_quiet_logs();
            let report = demo::run(&mut std::io::stdout()).await?;
            if !report.all_filled_protected() {
                anyhow::bail!("some filled entries were not protected; see the report above");
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logs("info")?;
            run::run_all(&args, api_bin::shutdown_signal()).await
        }
        Command::Migrate { database_url } => {
            init_logs("info")?;
            let applied = run::migrate(&database_url).await?;
            println!("{} migration(s) applied", applied.len());
            for name in applied {
                println!("  {name}");
            }
            Ok(())
        }
    }
}

/// Errors only, human-readable, so that the demo's progress lines read well
/// (`RUST_LOG` overrides the filter).
pub fn init_quiet_logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".to_owned());
    let _ = tracing::subscriber::set_global_default(telemetry::log_subscriber(
        telemetry::LogFormat::Human,
        &filter,
        std::io::stderr,
    ));
}

/// Logs to stderr in the format `OCO_LOG_FORMAT` names (`json` in
/// production, human-readable by default), filtered by `RUST_LOG`, else by
/// `default`.
///
/// # Errors
/// When `OCO_LOG_FORMAT` holds an unknown value.
pub fn init_logs(default: &str) -> anyhow::Result<()> {
    telemetry::init_logs_from_env(default).map_err(anyhow::Error::msg)
}
