//! ocoguard in one process. `demo` starts the bundled exchange simulator, a
//! store, and all three layers (ws-gateway, sync, api) in-process, drives
//! entries through the HTTP API, injects a stream outage and a gateway
//! restart, moves prices through targets and stops, and reports. `run`
//! starts the three layers against a configured exchange and PostgreSQL;
//! `migrate` applies the database migrations.

pub mod config;
pub mod demo;
pub mod run;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Settings};

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
    Run(run::RunArgs),
    /// Applies pending database migrations (`database.url` / DATABASE_URL), then exits.
    Migrate(run::RunArgs),
    /// Checks the settings `run` would use and prints each with its source
    /// (default, file or variable); secrets are never shown.
    Config(run::RunArgs),
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
            let settings = Settings::load(args.config.as_deref(), &config::process_env)?;
            init_logs_as("info", settings.log_format);
            run::run_all(&settings, api_bin::shutdown_signal()).await
        }
        Command::Config(args) => {
            let settings = Settings::load(args.config.as_deref(), &config::process_env)?;
            print_settings(&mut std::io::stdout(), &settings)?;
            Ok(())
        }
        Command::Migrate(args) => {
            let database_url = config::database_url(args.config.as_deref(), &config::process_env)?;
            init_logs("info");
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

/// Logs to stderr (JSON unless stderr is a terminal), filtered by `RUST_LOG`,
/// else by `default`.
pub fn init_logs(default: &str) {
    init_logs_as(default, LogFormat::Auto);
}

/// Logs to stderr in `format` (JSON lines carry the fields of every enclosing
/// span: account, entry, client id), filtered by `RUST_LOG`, else by `default`.
pub fn init_logs_as(default: &str, format: LogFormat) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    let _ = tracing::subscriber::set_global_default(telemetry::log_subscriber(
        format,
        &filter,
        std::io::stderr,
    ));
}

/// Writes `key = value  # source` for every option, secrets redacted.
///
/// # Errors
/// When `out` fails.
pub fn print_settings(out: &mut dyn std::io::Write, settings: &Settings) -> std::io::Result<()> {
    for (key, shown, source) in settings.describe() {
        writeln!(out, "{key:<26} {shown:<40} ({source})")?;
    }
    Ok(())
}
