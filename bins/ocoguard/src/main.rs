//! `ocoguard`: the one-command demo against the bundled exchange simulator,
//! every layer in one process (`run`), and the migrations (`migrate`).
//! Parses the command line and runs it; the wiring is in the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match ocoguard::run_cli(ocoguard::Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ocoguard: {err:#}");
            ExitCode::FAILURE
        }
    }
}
