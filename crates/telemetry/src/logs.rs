//! The log subscriber: JSON lines for production, human-readable lines for
//! the demo and terminals.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, with the fields of every enclosing span
    /// (account, entry, client id) under `spans`.
    Json,
}

/// A subscriber writing `format` to `writer`, filtered by `filter` (a
/// `RUST_LOG` directive such as `info`).
pub fn log_subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::new(filter);
    match format {
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt()
                .json()
                .with_current_span(false)
                .with_span_list(true)
                .with_env_filter(filter)
                .with_writer(writer)
                .finish(),
        ),
        LogFormat::Human => Box::new(
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(writer)
                .finish(),
        ),
    }
}

/// Installs the process's subscriber on stderr (`RUST_LOG`, default `info`);
/// a second call changes nothing.
pub fn init_logs(format: LogFormat) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let _ =
        tracing::subscriber::set_global_default(log_subscriber(format, &filter, std::io::stderr));
}
