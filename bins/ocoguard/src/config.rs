//! The settings of `ocoguard run` and `ocoguard migrate`: built-in defaults,
//! overridden by a TOML file (`--config`), overridden by environment
//! variables. Every option is listed once, in [`OPTIONS`], with its file key,
//! its variables, its default and its meaning; README's table mirrors it.
//!
//! Errors name the setting and where its value came from (the file with the
//! line and column TOML gives, or the variable), and never repeat the secret
//! key or a database password.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use exchange_binance::config::MAX_SUBSCRIPTIONS_PER_CONNECTION;
use oco_core::IdScheme;
use serde::Deserialize;
use serde::de::IgnoredAny;
use store_pg::SecretKey;

/// One configuration option, as documented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionDoc {
    /// Key in the TOML file (`section.key`).
    pub key: &'static str,
    /// Environment variables, the first one preferred; later ones are older names kept working.
    pub env: &'static [&'static str],
    /// Default, or `required`.
    pub default: &'static str,
    /// What it does.
    pub meaning: &'static str,
}

/// Every option of `ocoguard run`, in the order of the example file.
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "database.url",
        env: &["DATABASE_URL"],
        default: "required",
        meaning: "PostgreSQL URL; migrations run at start under an advisory lock; `run` and the api, ws-gateway and sync services wait up to 60 s for a database that is not up yet",
    },
    OptionDoc {
        key: "database.pool_size",
        env: &["OCO_DB_POOL_SIZE", "SYNC_DB_POOL"],
        default: "16",
        meaning: "database connections (shared by the three layers)",
    },
    OptionDoc {
        key: "database.secret_key_file",
        env: &["OCO_SECRET_KEY_FILE"],
        default: "required unless OCO_SECRET_KEY",
        meaning: "file holding the 32-byte key (64 hex digits or base64) sealing API secrets; OCO_SECRET_KEY gives the key itself and wins; never accepted inline in the file",
    },
    OptionDoc {
        key: "exchange.kind",
        env: &["OCO_EXCHANGE"],
        default: "required",
        meaning: "`production`, `testnet` or `sim` (sim needs both URLs)",
    },
    OptionDoc {
        key: "exchange.rest_url",
        env: &["BINANCE_REST_URL"],
        default: "the kind's preset",
        meaning: "REST base URL",
    },
    OptionDoc {
        key: "exchange.ws_url",
        env: &["BINANCE_WS_URL"],
        default: "the kind's preset",
        meaning: "WebSocket API URL (user-data streams)",
    },
    OptionDoc {
        key: "id_namespace",
        env: &["OCO_ID_NAMESPACE"],
        default: "og",
        meaning: "client-id namespace (1-6 letters or digits), the same for every process sharing the accounts",
    },
    OptionDoc {
        key: "log_format",
        env: &["OCO_LOG_FORMAT"],
        default: "auto",
        meaning: "`auto` (JSON when stderr is not a terminal, human in one), `human` or `json` log lines on stderr (`RUST_LOG` filters, default `info`)",
    },
    OptionDoc {
        key: "api.listen",
        env: &["OCO_API_LISTEN"],
        default: "127.0.0.1:8080",
        meaning: "where the entry API listens",
    },
    OptionDoc {
        key: "metrics.listen",
        env: &["OCO_METRICS_LISTEN"],
        default: "127.0.0.1:9180",
        meaning: "where `GET /metrics` (Prometheus) is served; the entry API serves it too",
    },
    OptionDoc {
        key: "gateway.id",
        env: &["OCO_GATEWAY_ID"],
        default: "hostname-pid",
        meaning: "lease holder name, unique per process",
    },
    OptionDoc {
        key: "gateway.lease_ttl_secs",
        env: &["OCO_LEASE_TTL_SECS"],
        default: "30",
        meaning: "lease period: the longest a dead process's accounts wait for another",
    },
    OptionDoc {
        key: "gateway.lease_renew_secs",
        env: &["OCO_LEASE_RENEW_SECS"],
        default: "10",
        meaning: "how often leases are renewed and new accounts picked up; below the TTL",
    },
    OptionDoc {
        key: "gateway.max_accounts",
        env: &["OCO_MAX_ACCOUNTS"],
        default: "1000",
        meaning: "most accounts this process streams",
    },
    OptionDoc {
        key: "gateway.cpu_wakeup_latency_us",
        env: &["OCO_CPU_WAKEUP_LATENCY_US"],
        default: "(not held)",
        meaning: "hold the machine's CPU wake-up latency at most this many µs while running (Linux PM QoS; needs write access to /dev/cpu_dma_latency): each hop of a fill's path starts sooner; costs power and CPU machine-wide, helps at low rates, not at saturation",
    },
    OptionDoc {
        key: "gateway.accounts_per_connection",
        env: &["OCO_ACCOUNTS_PER_CONNECTION"],
        default: "100",
        meaning: "user-data subscriptions sharing one WebSocket connection (1–1000): a lost connection sends this many accounts to reconciliation",
    },
    OptionDoc {
        key: "gateway.stream_connect_attempts",
        env: &["OCO_STREAM_CONNECT_ATTEMPTS"],
        default: "250",
        meaning: "most WebSocket connection attempts (first opens and reconnects) per 5 minutes; Binance allows 300 per IP, so split it between the processes sharing an IP",
    },
    OptionDoc {
        key: "sync.interval_secs",
        env: &["SYNC_INTERVAL_SECS"],
        default: "300",
        meaning: "seconds between full reconciliation passes",
    },
    OptionDoc {
        key: "sync.startup_delay_secs",
        env: &["SYNC_STARTUP_DELAY_SECS"],
        default: "15",
        meaning: "seconds before the first full pass",
    },
    OptionDoc {
        key: "sync.concurrency",
        env: &["SYNC_CONCURRENCY"],
        default: "8",
        meaning: "accounts reconciled in parallel",
    },
    OptionDoc {
        key: "sync.weight_budget",
        env: &["SYNC_WEIGHT_BUDGET"],
        default: "3000",
        meaning: "request weight per minute this sync process may use (Binance counts 6,000 per IP; several sync processes behind one IP split it; the adapter also stops at the weight the exchange reports used)",
    },
];

/// Which exchange (`exchange.kind`): the adapter's names and endpoint
/// presets, the same for every binary.
pub use exchange_binance::ExchangeKind;

/// Log output: the format every binary shares (`auto`, `human`, `json`).
pub use telemetry::LogFormat;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable.
    Env(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// A configuration that cannot be used. The message names the setting and
/// where it came from; it never holds the secret key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The settings of `ocoguard run`, resolved. `Debug` shows neither the secret
/// key nor a password in the database URL.
#[derive(Clone)]
pub struct Settings {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Database connections.
    pub db_pool_size: usize,
    /// Key API secrets are sealed under.
    pub secret_key: SecretKey,
    /// Which exchange.
    pub exchange: ExchangeKind,
    /// REST base URL overriding the kind's preset.
    pub binance_rest_url: Option<String>,
    /// WebSocket API URL overriding the kind's preset.
    pub binance_ws_url: Option<String>,
    /// Client-id namespace, validated.
    pub id_namespace: String,
    /// Log output.
    pub log_format: LogFormat,
    /// Where the entry API listens.
    pub api_listen: SocketAddr,
    /// Where `GET /metrics` is served.
    pub metrics_listen: SocketAddr,
    /// Lease holder name (default: hostname-pid).
    pub gateway_id: Option<String>,
    /// Lease period, seconds.
    pub lease_ttl_secs: u64,
    /// Lease renewal interval, seconds.
    pub lease_renew_secs: u64,
    /// Most accounts streamed by this process.
    pub max_accounts: usize,
    /// CPU wake-up latency held while running, µs (`None`: not held).
    pub cpu_wakeup_latency_us: Option<u64>,
    /// User-data subscriptions per WebSocket connection.
    pub accounts_per_connection: usize,
    /// WebSocket connection attempts allowed per 5 minutes.
    pub stream_connect_attempts: u32,
    /// Seconds between full sync passes.
    pub sync_interval_secs: u64,
    /// Seconds before the first pass.
    pub sync_startup_delay_secs: u64,
    /// Accounts reconciled in parallel.
    pub sync_concurrency: usize,
    /// Request weight per minute for sync.
    pub sync_weight_budget: u32,
    /// Where each option's value came from, by file key.
    pub sources: BTreeMap<&'static str, Source>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("db_pool_size", &self.db_pool_size)
            .field("secret_key", &self.secret_key)
            .field("exchange", &self.exchange)
            .field("binance_rest_url", &self.binance_rest_url)
            .field("binance_ws_url", &self.binance_ws_url)
            .field("id_namespace", &self.id_namespace)
            .field("log_format", &self.log_format)
            .field("api_listen", &self.api_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("gateway_id", &self.gateway_id)
            .field("lease_ttl_secs", &self.lease_ttl_secs)
            .field("lease_renew_secs", &self.lease_renew_secs)
            .field("max_accounts", &self.max_accounts)
            .field("cpu_wakeup_latency_us", &self.cpu_wakeup_latency_us)
            .field("accounts_per_connection", &self.accounts_per_connection)
            .field("stream_connect_attempts", &self.stream_connect_attempts)
            .field("sync_interval_secs", &self.sync_interval_secs)
            .field("sync_startup_delay_secs", &self.sync_startup_delay_secs)
            .field("sync_concurrency", &self.sync_concurrency)
            .field("sync_weight_budget", &self.sync_weight_budget)
            .finish_non_exhaustive()
    }
}

/// `url` with its password replaced by `***`, whether it sits in the user
/// part or in a `password` query parameter (libpq reads both).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "[unparsable URL]".to_owned();
    };
    let in_query = parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"));
    if parsed.password().is_none() && !in_query {
        return url.to_owned();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if in_query {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

// The file's shape. Every table refuses keys it does not know, so that a typo
// is an error rather than a silently ignored setting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id_namespace: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    database: DatabaseFile,
    #[serde(default)]
    exchange: ExchangeFile,
    #[serde(default)]
    api: ApiFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    gateway: GatewayFile,
    #[serde(default)]
    sync: SyncFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseFile {
    url: Option<String>,
    pool_size: Option<usize>,
    secret_key_file: Option<PathBuf>,
    // Accepted by the parser only to refuse it with a clear message: the key
    // itself does not belong in a file that gets copied around.
    secret_key: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeFile {
    kind: Option<ExchangeKind>,
    rest_url: Option<String>,
    ws_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiFile {
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    id: Option<String>,
    lease_ttl_secs: Option<u64>,
    lease_renew_secs: Option<u64>,
    max_accounts: Option<usize>,
    cpu_wakeup_latency_us: Option<u64>,
    accounts_per_connection: Option<usize>,
    stream_connect_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncFile {
    interval_secs: Option<u64>,
    startup_delay_secs: Option<u64>,
    concurrency: Option<usize>,
    weight_budget: Option<u32>,
}

/// `path`, line and column, what went wrong and, when toml knows it, the
/// key. Never toml's own rendering: it quotes the offending source line, which
/// may hold the secret key or a database password.
fn describe_toml_error(path: &Path, text: &str, mut err: toml::de::Error) -> String {
    let place = match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}: ")
        }
        None => String::new(),
    };
    // Without the input toml renders the message and the key path alone.
    err.set_input(None);
    let rendered = err.to_string();
    let mut lines = rendered.trim_end().lines();
    let message = redact_quoted(lines.next().unwrap_or_default());
    let key = lines
        .next()
        .and_then(|l| l.strip_prefix("in "))
        .map(|k| format!(" (in {k})"))
        .unwrap_or_default();
    format!("config file {}: {place}{message}{key}", path.display())
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `message` with every double-quoted string replaced by `"…"`: serde quotes
/// a refused string value that way (`invalid type: string "…"`), and a value
/// put under the wrong key may be a password.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    let mut escaped = false;
    for c in message.chars() {
        if inside {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                inside = false;
                out.push_str("…\"");
            }
        } else {
            out.push(c);
            inside = c == '"';
        }
    }
    if inside {
        out.push('…');
    }
    out
}

/// The environment as a lookup, so that tests need not touch the process's.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment; non-UTF-8 values count as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn doc(key: &str) -> &'static OptionDoc {
    // OPTIONS is a constant this module indexes by its own literals.
    #[allow(clippy::expect_used)]
    OPTIONS
        .iter()
        .find(|o| o.key == key)
        .expect("every key resolved is in OPTIONS")
}

struct Resolver<'a> {
    file: FileConfig,
    path: Option<PathBuf>,
    env: Env<'a>,
    sources: BTreeMap<&'static str, Source>,
}

impl<'a> Resolver<'a> {
    fn new(path: Option<&Path>, env: Env<'a>) -> Result<Self, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config file {}: {e}", path.display()))
                })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError(describe_toml_error(path, &text, e)))?
            }
        };
        if file.database.secret_key.is_some() {
            return Err(ConfigError(format!(
                "config file {}: `database.secret_key` is not accepted in a file; \
                 set `database.secret_key_file` to a file holding the key, or OCO_SECRET_KEY",
                path.map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            )));
        }
        Ok(Self {
            file,
            path: path.map(Path::to_path_buf),
            env,
            sources: BTreeMap::new(),
        })
    }

    /// The first set variable of the option, parsed; an empty value counts as unset.
    fn env_value<T>(&self, key: &'static str) -> Result<Option<(T, Source)>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        for var in doc(key).env {
            let Some(text) = (self.env)(var).filter(|t| !t.trim().is_empty()) else {
                continue;
            };
            return match text.trim().parse::<T>() {
                Ok(v) => Ok(Some((v, Source::Env(var)))),
                Err(e) => Err(ConfigError(format!(
                    "environment variable {var}: invalid value {text:?}: {e}"
                ))),
            };
        }
        Ok(None)
    }

    /// Environment over file over nothing; records the source.
    fn get<T>(&mut self, key: &'static str, file: Option<T>) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        if let Some((v, source)) = self.env_value(key)? {
            self.sources.insert(key, source);
            return Ok(Some(v));
        }
        if file.is_some() {
            self.sources.insert(key, self.file_source());
        }
        Ok(file)
    }

    fn get_or<T>(
        &mut self,
        key: &'static str,
        file: Option<T>,
        default: T,
    ) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(key, file)? {
            Some(v) => Ok(v),
            None => {
                self.sources.insert(key, Source::Default);
                Ok(default)
            }
        }
    }

    fn required<T>(&mut self, key: &'static str, file: Option<T>) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.get(key, file)?.ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &'static str) -> ConfigError {
        let var = doc(key).env.first().copied().unwrap_or_default();
        match &self.path {
            Some(path) => ConfigError(format!(
                "missing required setting `{key}`: set it in {} or set {var}",
                path.display()
            )),
            None => ConfigError(format!(
                "missing required setting `{key}`: set {var}, or `{key}` in the file given by --config"
            )),
        }
    }

    fn file_source(&self) -> Source {
        Source::File(self.path.clone().unwrap_or_default())
    }

    /// "`key` (from SOURCE)" for messages about a value that parsed but is unusable.
    fn named(&self, key: &'static str) -> String {
        match self.sources.get(key) {
            Some(Source::Env(var)) => (*var).to_owned(),
            Some(Source::File(path)) => format!("`{key}` in {}", path.display()),
            Some(Source::Default) | None => format!("`{key}` (default)"),
        }
    }

    fn secret_key(&mut self) -> Result<SecretKey, ConfigError> {
        const KEY: &str = "database.secret_key_file";
        if let Some(text) = (self.env)("OCO_SECRET_KEY").filter(|t| !t.trim().is_empty()) {
            self.sources.insert(KEY, Source::Env("OCO_SECRET_KEY"));
            // KeyError never holds the key, only its length.
            return SecretKey::parse(&text)
                .map_err(|e| ConfigError(format!("environment variable OCO_SECRET_KEY: {e}")));
        }
        let file_path = self.file.database.secret_key_file.take();
        let Some(path) = self.get::<PathBuf>(KEY, file_path)? else {
            return Err(match &self.path {
                Some(path) => ConfigError(format!(
                    "missing required setting `{KEY}`: set it in {} or set OCO_SECRET_KEY_FILE or OCO_SECRET_KEY",
                    path.display()
                )),
                None => ConfigError(format!(
                    "missing required setting `{KEY}`: set OCO_SECRET_KEY or OCO_SECRET_KEY_FILE, or `{KEY}` in the file given by --config"
                )),
            });
        };
        let named = self.named(KEY);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError(format!(
                "{named}: cannot read secret key file {}: {e}",
                path.display()
            ))
        })?;
        SecretKey::parse(&text)
            .map_err(|e| ConfigError(format!("{named}: secret key file {}: {e}", path.display())))
    }

    fn positive<T: Default + PartialOrd>(&self, key: &'static str, v: T) -> Result<T, ConfigError> {
        if v > T::default() {
            Ok(v)
        } else {
            Err(ConfigError(format!("{}: must be above 0", self.named(key))))
        }
    }
}

impl Settings {
    /// Resolves every option of `ocoguard run`: each comes from its
    /// environment variable if set (non-empty), else from the file at `path`,
    /// else from its default.
    ///
    /// # Errors
    /// An unreadable or malformed file (with line and column), an unknown
    /// key, a value of the wrong type, a missing required setting, a value
    /// out of range; the message names the key or variable and the file.
    pub fn load(path: Option<&Path>, env: Env<'_>) -> Result<Settings, ConfigError> {
        let mut r = Resolver::new(path, env)?;
        let f = std::mem::take(&mut r.file.database.url);
        let database_url = r.required("database.url", f)?;
        let f = r.file.database.pool_size.take();
        let db_pool_size = r.get_or("database.pool_size", f, 16)?;
        let db_pool_size = r.positive("database.pool_size", db_pool_size)?;
        let secret_key = r.secret_key()?;

        let f = r.file.exchange.kind.take();
        let exchange = r.required("exchange.kind", f)?;
        let f = r.file.exchange.rest_url.take();
        let binance_rest_url: Option<String> = r.get("exchange.rest_url", f)?;
        let f = r.file.exchange.ws_url.take();
        let binance_ws_url: Option<String> = r.get("exchange.ws_url", f)?;
        if exchange == ExchangeKind::Sim {
            for (key, v) in [
                ("exchange.rest_url", &binance_rest_url),
                ("exchange.ws_url", &binance_ws_url),
            ] {
                if v.is_none() {
                    let mut err = r.missing(key).0;
                    err.push_str(" (the `sim` exchange has no preset URLs)");
                    return Err(ConfigError(err));
                }
            }
        }

        let f = r.file.id_namespace.take();
        let id_namespace: String = r.get_or("id_namespace", f, "og".to_owned())?;
        if let Err(e) = IdScheme::new(&id_namespace) {
            return Err(ConfigError(format!("{}: {e}", r.named("id_namespace"))));
        }
        let f = r.file.log_format.take();
        let log_format = r.get_or("log_format", f, LogFormat::Auto)?;
        let f = r.file.api.listen.take();
        let api_listen = r.get_or("api.listen", f, SocketAddr::from(([127, 0, 0, 1], 8080)))?;
        let f = r.file.metrics.listen.take();
        let metrics_listen = r.get_or(
            "metrics.listen",
            f,
            SocketAddr::from(([127, 0, 0, 1], 9180)),
        )?;

        let f = r.file.gateway.id.take();
        let gateway_id: Option<String> = r.get("gateway.id", f)?;
        if gateway_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            return Err(ConfigError(format!(
                "{}: must not be empty",
                r.named("gateway.id")
            )));
        }
        let f = r.file.gateway.lease_ttl_secs.take();
        let lease_ttl_secs = r.get_or("gateway.lease_ttl_secs", f, 30)?;
        let lease_ttl_secs = r.positive("gateway.lease_ttl_secs", lease_ttl_secs)?;
        let f = r.file.gateway.lease_renew_secs.take();
        let lease_renew_secs = r.get_or("gateway.lease_renew_secs", f, 10)?;
        let lease_renew_secs = r.positive("gateway.lease_renew_secs", lease_renew_secs)?;
        if lease_renew_secs >= lease_ttl_secs {
            return Err(ConfigError(format!(
                "{} ({lease_renew_secs}) must be below {} ({lease_ttl_secs})",
                r.named("gateway.lease_renew_secs"),
                r.named("gateway.lease_ttl_secs"),
            )));
        }
        let f = r.file.gateway.max_accounts.take();
        let max_accounts = r.get_or("gateway.max_accounts", f, 1000)?;
        let max_accounts = r.positive("gateway.max_accounts", max_accounts)?;
        let f = r.file.gateway.cpu_wakeup_latency_us.take();
        let cpu_wakeup_latency_us = r.get("gateway.cpu_wakeup_latency_us", f)?;
        let f = r.file.gateway.accounts_per_connection.take();
        let accounts_per_connection = r.get_or("gateway.accounts_per_connection", f, 100)?;
        let accounts_per_connection =
            r.positive("gateway.accounts_per_connection", accounts_per_connection)?;
        if accounts_per_connection > MAX_SUBSCRIPTIONS_PER_CONNECTION {
            return Err(ConfigError(format!(
                "{}: at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} (Binance's cap of active subscriptions per connection), got {accounts_per_connection}",
                r.named("gateway.accounts_per_connection"),
            )));
        }
        let f = r.file.gateway.stream_connect_attempts.take();
        let stream_connect_attempts = r.get_or("gateway.stream_connect_attempts", f, 250)?;
        let stream_connect_attempts =
            r.positive("gateway.stream_connect_attempts", stream_connect_attempts)?;

        let f = r.file.sync.interval_secs.take();
        let sync_interval_secs = r.get_or("sync.interval_secs", f, 300)?;
        let sync_interval_secs = r.positive("sync.interval_secs", sync_interval_secs)?;
        let f = r.file.sync.startup_delay_secs.take();
        let sync_startup_delay_secs = r.get_or("sync.startup_delay_secs", f, 15)?;
        let f = r.file.sync.concurrency.take();
        let sync_concurrency = r.get_or("sync.concurrency", f, 8)?;
        let sync_concurrency = r.positive("sync.concurrency", sync_concurrency)?;
        let f = r.file.sync.weight_budget.take();
        let sync_weight_budget = r.get_or("sync.weight_budget", f, 3000)?;
        let sync_weight_budget = r.positive("sync.weight_budget", sync_weight_budget)?;

        Ok(Settings {
            database_url,
            db_pool_size,
            secret_key,
            exchange,
            binance_rest_url,
            binance_ws_url,
            id_namespace,
            log_format,
            api_listen,
            metrics_listen,
            gateway_id,
            lease_ttl_secs,
            lease_renew_secs,
            max_accounts,
            cpu_wakeup_latency_us,
            accounts_per_connection,
            stream_connect_attempts,
            sync_interval_secs,
            sync_startup_delay_secs,
            sync_concurrency,
            sync_weight_budget,
            sources: r.sources,
        })
    }

    /// `(file key, value shown, source)` for every option, secrets redacted,
    /// for `ocoguard config`.
    pub fn describe(&self) -> Vec<(&'static str, String, Source)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(preset)".to_owned());
        let values = [
            ("database.url", redact_url(&self.database_url)),
            ("database.pool_size", self.db_pool_size.to_string()),
            ("database.secret_key_file", "[redacted]".to_owned()),
            (
                "exchange.kind",
                format!("{:?}", self.exchange).to_lowercase(),
            ),
            ("exchange.rest_url", opt(&self.binance_rest_url)),
            ("exchange.ws_url", opt(&self.binance_ws_url)),
            ("id_namespace", self.id_namespace.clone()),
            (
                "log_format",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
            ("api.listen", self.api_listen.to_string()),
            ("metrics.listen", self.metrics_listen.to_string()),
            (
                "gateway.id",
                self.gateway_id
                    .clone()
                    .unwrap_or_else(|| "(hostname-pid)".to_owned()),
            ),
            ("gateway.lease_ttl_secs", self.lease_ttl_secs.to_string()),
            (
                "gateway.lease_renew_secs",
                self.lease_renew_secs.to_string(),
            ),
            ("gateway.max_accounts", self.max_accounts.to_string()),
            (
                "gateway.cpu_wakeup_latency_us",
                self.cpu_wakeup_latency_us
                    .map_or_else(|| "(not held)".to_owned(), |us| us.to_string()),
            ),
            (
                "gateway.accounts_per_connection",
                self.accounts_per_connection.to_string(),
            ),
            (
                "gateway.stream_connect_attempts",
                self.stream_connect_attempts.to_string(),
            ),
            ("sync.interval_secs", self.sync_interval_secs.to_string()),
            (
                "sync.startup_delay_secs",
                self.sync_startup_delay_secs.to_string(),
            ),
            ("sync.concurrency", self.sync_concurrency.to_string()),
            ("sync.weight_budget", self.sync_weight_budget.to_string()),
        ];
        values
            .into_iter()
            .map(|(key, shown)| {
                let source = self.sources.get(key).cloned().unwrap_or(Source::Default);
                (key, shown, source)
            })
            .collect()
    }
}

/// The database URL alone, for `ocoguard migrate`: `DATABASE_URL`, else
/// `database.url` in the file. Other settings are not checked.
///
/// # Errors
/// As [`Settings::load`] for the file; a missing URL.
pub fn database_url(path: Option<&Path>, env: Env<'_>) -> Result<String, ConfigError> {
    let mut r = Resolver::new(path, env)?;
    let f = r.file.database.url.take();
    r.required("database.url", f)
}
