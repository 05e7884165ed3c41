//! The log subscriber: JSON lines for production, human-readable lines for
//! the demo and terminals.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Log output, as every binary reads it (flag, variable, config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (a service manager, a container, a
    /// log shipper: production), human-readable in a terminal.
    Auto,
    /// Human-readable lines.
    Human,
    /// One JSON object per line, with the fields of every enclosing span
    /// (account, entry, client id) under `spans`.
    Json,
}

impl LogFormat {
    /// `Auto` decided for stderr; the others as they are.
    pub fn for_stderr(self) -> LogFormat {
        use std::io::IsTerminal as _;
        match self {
            LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Human,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }

    /// Parses `auto`, `human` or `json` (any case, surrounding blanks ignored).
    ///
    /// # Errors
    /// A message naming the accepted values.
    pub fn parse(text: &str) -> Result<LogFormat, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(LogFormat::Auto),
            "json" => Ok(LogFormat::Json),
            "human" => Ok(LogFormat::Human),
            other => Err(format!(
                "{other:?} is not a log format: use auto, json or human"
            )),
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        LogFormat::parse(text)
    }
}

/// A subscriber writing `format` to `writer`, filtered by `filter` (a
/// `RUST_LOG` directive such as `info`). `Auto` is decided for stderr, the
/// process's log stream, whatever `writer` is: pass `Json` or `Human` for
/// another writer.
pub fn log_subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::new(filter);
    match format.for_stderr() {
        LogFormat::Json | LogFormat::Auto => Box::new(
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

/// The variable naming the log format: `auto`, `json` or `human`.
pub const LOG_FORMAT_VAR: &str = "OCO_LOG_FORMAT";

/// The log format `OCO_LOG_FORMAT` asks for, `default` when it is unset.
///
/// # Errors
/// A message naming the variable and the accepted values when it holds
/// anything else.
pub fn log_format_from_env(default: LogFormat) -> Result<LogFormat, String> {
    match std::env::var(LOG_FORMAT_VAR) {
        Err(_) => Ok(default),
        // An empty variable counts as unset, as everywhere in the configuration.
        Ok(v) if v.trim().is_empty() => Ok(default),
        Ok(v) => LogFormat::parse(&v).map_err(|e| format!("{LOG_FORMAT_VAR}={e}")),
    }
}

/// Installs the process's subscriber on stderr in the format
/// `OCO_LOG_FORMAT` names (`auto` when unset), filtered by `RUST_LOG`, else by
/// `default_filter`.
///
/// # Errors
/// When `OCO_LOG_FORMAT` holds an unknown value.
pub fn init_logs_from_env(default_filter: &str) -> Result<(), String> {
    let format = log_format_from_env(LogFormat::Auto)?;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| default_filter.to_owned());
    let _ =
        tracing::subscriber::set_global_default(log_subscriber(format, &filter, std::io::stderr));
    Ok(())
}
