//! Wiring of the `ws-gateway` binary: configuration from flags and
//! environment, `PgStore` (as `Store` and `Leases`) + `BinanceExchange` +
//! `BinanceUserStream` + `SystemClock` behind the ports, a [`Protector`] and a
//! [`ws_gateway::Gateway`] over them, logging and the shutdown signal. Here so
//! that tests build the process exactly as `main` does.
//!
//! Not here: any streaming or protection rule (that is the `ws-gateway` and
//! `oco-core` crates).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream, MissingUrls};
use oco_core::ports::Leases;
use oco_core::{IdScheme, Protector, ProtectorConfig, SystemClock};
use store_pg::{PgConfig, PgStore, SecretKey};
use telemetry::{Exporter, Metrics, ObservedExchange};
use ws_gateway::{Gateway, GatewayConfig};

/// Streams every leased account's user data from Binance and protects each
/// filled entry with SELL OCO orders as the fill arrives. `Debug` shows
/// neither the database URL nor the secret key.
#[derive(Clone, Parser)]
#[command(name = "ws-gateway", version, about)]
pub struct Config {
    /// What to do (default: run the gateway).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Key the API secrets are encrypted under (64 hex digits or base64).
    #[arg(long, env = "OCO_SECRET_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub secret_key: Option<SecretText>,
    /// Database connections.
    #[arg(long, env = "OCO_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
    /// Which exchange: Binance production, the Binance Spot testnet, or an
    /// `exchange-sim` (which needs both URLs). Required to run the gateway:
    /// keys of one exchange sent to another fail every request.
    #[arg(long, env = "OCO_EXCHANGE", value_parser = exchange_kind())]
    pub exchange: Option<ExchangeKind>,
    /// REST base URL; overrides the exchange's default.
    #[arg(long, env = "BINANCE_REST_URL")]
    pub binance_rest_url: Option<String>,
    /// WebSocket API URL; overrides the exchange's default.
    #[arg(long, env = "BINANCE_WS_URL")]
    pub binance_ws_url: Option<String>,
    /// Client-id namespace shared by every ocoguard process (1-6 letters or digits).
    #[arg(long, env = "OCO_ID_NAMESPACE", default_value = "og")]
    pub id_namespace: String,
    /// This process's lease holder name, unique per process (default: hostname-pid).
    #[arg(long, env = "OCO_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Seconds a lease lasts without renewal: the longest an account goes
    /// unstreamed after its gateway dies.
    #[arg(long, env = "OCO_LEASE_TTL_SECS", default_value_t = 30)]
    pub lease_ttl_secs: u64,
    /// Seconds between lease renewals (and pick-ups of new accounts); below the TTL.
    #[arg(long, env = "OCO_LEASE_RENEW_SECS", default_value_t = 10)]
    pub lease_renew_secs: u64,
    /// Most accounts this process streams.
    #[arg(long, env = "OCO_MAX_ACCOUNTS", default_value_t = 1000)]
    pub max_accounts: usize,
    /// User-data subscriptions sharing one WebSocket connection (1–1000): a
    /// lost connection sends this many accounts to reconciliation.
    #[arg(long, env = "OCO_ACCOUNTS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub accounts_per_connection: u16,
    /// Most WebSocket connection attempts (first opens and reconnects) per 5
    /// minutes. Binance allows 300 per IP: split them between the processes
    /// that share an IP.
    #[arg(long, env = "OCO_STREAM_CONNECT_ATTEMPTS", default_value_t = 250,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub stream_connect_attempts: u32,
    /// Log format.
    #[arg(long, env = "OCO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Where `GET /metrics` is served (Prometheus).
    #[arg(long, env = "OCO_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: std::net::SocketAddr,
    /// Hold this machine's CPU wake-up latency at most this many µs while
    /// running (Linux PM QoS; needs write access to `/dev/cpu_dma_latency`): CPUs poll instead of
    /// halting, so each hop of a fill's path starts sooner. Off by default: it
    /// costs power machine-wide.
    #[arg(long, env = "OCO_CPU_WAKEUP_LATENCY_US")]
    pub cpu_wakeup_latency_us: Option<u64>,
}

/// The default of `--metrics-listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9181";

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Applies pending database migrations, then exits.
    Migrate,
}

/// Which exchange (`OCO_EXCHANGE`): the adapter's names and endpoint presets,
/// the same for every binary.
pub use exchange_binance::ExchangeKind;

/// `--exchange`'s parser: the adapter's names, each listed in the help.
fn exchange_kind() -> impl TypedValueParser<Value = ExchangeKind> {
    PossibleValuesParser::new(
        ExchangeKind::ALL.map(|kind| PossibleValue::new(kind.name()).help(kind.about())),
    )
    .try_map(|name| name.parse::<ExchangeKind>())
}

pub use telemetry::LogFormat;

/// Configuration text that must never be shown: `Debug` redacts it. Parsed
/// only in [`wire`], because clap repeats a refused value in its message.
#[derive(Clone)]
pub struct SecretText(String);

impl SecretText {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

fn parse_secret(text: &str) -> Result<SecretText, std::convert::Infallible> {
    Ok(SecretText::new(text))
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be left out unnoticed.
        let Self {
            command,
            database_url,
            secret_key,
            db_pool_size,
            exchange,
            binance_rest_url,
            binance_ws_url,
            id_namespace,
            gateway_id,
            lease_ttl_secs,
            lease_renew_secs,
            max_accounts,
            accounts_per_connection,
            stream_connect_attempts,
            log_format,
            metrics_listen,
            cpu_wakeup_latency_us,
        } = self;
        // The URL may carry the database password.
        let database_url = database_url.as_ref().map(|_| "[redacted]");
        f.debug_struct("Config")
            .field("command", &command)
            .field("database_url", &database_url)
            .field("secret_key", &secret_key)
            .field("db_pool_size", &db_pool_size)
            .field("exchange", &exchange)
            .field("binance_rest_url", &binance_rest_url)
            .field("binance_ws_url", &binance_ws_url)
            .field("id_namespace", &id_namespace)
            .field("gateway_id", &gateway_id)
            .field("lease_ttl_secs", &lease_ttl_secs)
            .field("lease_renew_secs", &lease_renew_secs)
            .field("max_accounts", &max_accounts)
            .field("accounts_per_connection", &accounts_per_connection)
            .field("stream_connect_attempts", &stream_connect_attempts)
            .field("log_format", &log_format)
            .field("metrics_listen", &metrics_listen)
            .field("cpu_wakeup_latency_us", &cpu_wakeup_latency_us)
            .finish()
    }
}

impl Config {
    /// The chosen exchange, or an error naming `OCO_EXCHANGE`.
    ///
    /// # Errors
    /// When it is not set.
    pub fn exchange(&self) -> anyhow::Result<ExchangeKind> {
        self.exchange
            .context("OCO_EXCHANGE (or --exchange) is required: production, testnet or sim")
    }

    /// The database URL, or an error naming `DATABASE_URL`.
    ///
    /// # Errors
    /// When it is not set.
    pub fn database_url(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_deref()
            .context("DATABASE_URL (or --database-url) is required")
    }

    /// The adapter configuration for the chosen exchange, URL overrides and
    /// stream settings.
    ///
    /// # Errors
    /// No exchange chosen; `sim` without both URLs.
    pub fn binance_config(&self) -> anyhow::Result<BinanceConfig> {
        let mut config = self.binance_urls()?;
        config.stream.set_connection_limits(
            usize::from(self.accounts_per_connection),
            self.stream_connect_attempts,
        );
        Ok(config)
    }

    fn binance_urls(&self) -> anyhow::Result<BinanceConfig> {
        BinanceConfig::for_exchange(
            self.exchange()?,
            self.binance_rest_url.as_deref(),
            self.binance_ws_url.as_deref(),
        )
        .map_err(|_: MissingUrls| {
            anyhow!("--exchange sim needs BINANCE_REST_URL and BINANCE_WS_URL")
        })
    }

    /// The gateway's settings: the standard ones, overridden by the flags.
    ///
    /// # Errors
    /// A renewal interval not below the lease TTL, or zero values.
    pub fn gateway_config(&self) -> anyhow::Result<GatewayConfig> {
        if self.lease_ttl_secs == 0 || self.lease_renew_secs == 0 || self.max_accounts == 0 {
            bail!("OCO_LEASE_TTL_SECS, OCO_LEASE_RENEW_SECS and OCO_MAX_ACCOUNTS must be above 0");
        }
        if self.lease_renew_secs >= self.lease_ttl_secs {
            bail!(
                "OCO_LEASE_RENEW_SECS ({}) must be below OCO_LEASE_TTL_SECS ({})",
                self.lease_renew_secs,
                self.lease_ttl_secs
            );
        }
        let holder = self.gateway_id.clone().unwrap_or_else(default_gateway_id);
        if holder.trim().is_empty() {
            bail!("OCO_GATEWAY_ID must not be empty");
        }
        let mut c = GatewayConfig::standard(holder);
        c.lease_ttl = Duration::from_secs(self.lease_ttl_secs);
        c.renew_every = Duration::from_secs(self.lease_renew_secs);
        c.max_accounts = self.max_accounts;
        Ok(c)
    }
}

/// `hostname-pid`: unique per process on a host, readable in the lease table.
pub fn default_gateway_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Installs the tracing subscriber on stderr (`RUST_LOG`, default `info`),
/// the same as every other binary's: JSON lines carry the fields of every
/// enclosing span (account, entry, client id).
pub fn init_tracing(format: LogFormat) {
    telemetry::init_logs(format);
}

/// Connects the store (migrating it), the exchange and its streams, and
/// builds the gateway.
///
/// # Errors
/// Missing or malformed settings (the message names the variable and never
/// repeats the secret key), a database that cannot be reached or whose
/// secrets were encrypted under another key.
pub async fn wire(config: &Config) -> anyhow::Result<Gateway> {
    Ok(wire_observed(config, &Metrics::new()).await?.0)
}

/// As [`wire`], feeding `metrics` (placements, latency, exchange errors and
/// weight); also returns the store, for the coverage gauges.
///
/// # Errors
/// As [`wire`].
pub async fn wire_observed(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Gateway, Arc<PgStore>)> {
    let ids = IdScheme::new(&config.id_namespace).context("OCO_ID_NAMESPACE")?;
    let gateway_config = config.gateway_config()?;
    let binance = config.binance_config()?;
    let secret = config
        .secret_key
        .as_ref()
        .context("OCO_SECRET_KEY (or --secret-key) is required")?;
    // `KeyError` never holds the key; the context names the variable.
    let secret_key = SecretKey::parse(&secret.0).context("OCO_SECRET_KEY")?;
    let store = Arc::new(
        PgStore::connect_patiently(
            PgConfig {
                url: config.database_url()?.to_owned(),
                pool_size: config.db_pool_size.max(1),
                secret_key,
            },
            store_pg::STARTUP_PATIENCE,
        )
        .await
        .context("connecting to the database (DATABASE_URL, OCO_SECRET_KEY)")?,
    );
    // Not fatal: the pools open lazily otherwise, only the first fills are slower.
    if let Err(err) = store.warm_up().await {
        tracing::warn!(error = %err, "could not open the database connections ahead of the first fills");
    }
    let exchange = BinanceExchange::new(binance.clone())
        .context("building the Binance client (BINANCE_REST_URL)")?;
    if let Err(err) = exchange.sync_time().await {
        // Not fatal: the adapter re-syncs by itself after a -1021.
        tracing::warn!(error = %err, "could not read the exchange's time at start");
    }
    // The stream's connections and subscriptions spend the same per-IP
    // weight as the orders: charged to the REST client's pacer.
    let streams = BinanceUserStream::sharing_weight_with(binance, &exchange)
        .context("building the Binance stream client (BINANCE_WS_URL)")?;
    let weight = exchange.clone();
    metrics.watch_weight(move || weight.used_weight());
    let protector = Arc::new(Protector::new(
        Arc::new(ObservedExchange::new(Arc::new(exchange), metrics.clone())),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(ids),
    ));
    protector.set_observer(metrics.clone());
    let gateway = Gateway::new(
        store.clone(),
        store.clone() as Arc<dyn Leases>,
        Arc::new(streams),
        protector,
        gateway_config,
    );
    let stats = gateway.stats();
    metrics.on_scrape(move |m| {
        m.set_streams(&stats.stream_states());
        let s = stats.snapshot();
        m.set_gateway_flags(s.flags_owed, s.flag_failures);
    });
    let hints = store.clone();
    metrics.on_scrape(move |m| {
        let counts = hints.hint_stats();
        m.set_hint_counts(counts.used, counts.stale);
    });
    Ok((gateway, store))
}

/// Runs the chosen command: migrations, or the gateway until `shutdown`
/// completes (then its leases are released).
///
/// # Errors
/// As [`wire`]; failed migrations; leases that could not be released.
pub async fn run(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some(Command::Migrate) = config.command {
        let applied = store_pg::migrate(config.database_url()?)
            .await
            .context("applying migrations (DATABASE_URL)")?;
        tracing::info!(applied = applied.len(), ?applied, "migrations applied");
        return Ok(());
    }
    let _wakeup = config
        .cpu_wakeup_latency_us
        .and_then(ws_gateway::CpuWakeupLatency::hold_or_warn);
    let metrics = Metrics::new();
    let (gateway, store) = wire_observed(config, &metrics).await?;
    // New entries of the accounts followed here are read as they are stored,
    // so that their fills skip that read; the guard ends the task on return.
    let learner = store_pg::learn_announced_entries(store.clone());
    metrics.watch_entry_listener(store_pg::ENTRY_CHANNEL, learner.listening());
    let exporter = Exporter::start(config.metrics_listen, metrics, store, Arc::new(SystemClock))
        .await
        .with_context(|| format!("binding OCO_METRICS_LISTEN {}", config.metrics_listen))?;
    let stats = gateway.stats();
    let holder = config.gateway_config()?.holder;
    tracing::info!(
        holder = %holder,
        exchange = ?config.exchange()?,
        namespace = %config.id_namespace,
        lease_ttl_s = config.lease_ttl_secs,
        renew_s = config.lease_renew_secs,
        max_accounts = config.max_accounts,
        metrics = %exporter.local_addr(),
        "ws-gateway started"
    );
    gateway
        .run(shutdown)
        .await
        .context("stopping the gateway")?;
    let s = stats.snapshot();
    tracing::info!(
        holder = %holder,
        events = s.events,
        entry_fills = s.entry_fills,
        superseded = s.superseded,
        placements = s.placements,
        gaps = s.gaps,
        failures = s.failures,
        "ws-gateway stopped, leases released"
    );
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
