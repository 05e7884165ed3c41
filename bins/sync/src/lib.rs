//! Wiring of the `sync` binary: configuration from flags and environment,
//! `PgStore` + `BinanceExchange` + `SystemClock` behind the ports, a
//! [`sync::Reconciler`] over them, and the shutdown signal. Here so that
//! end-to-end tests build the process exactly as `main` does.
//!
//! Not here: any reconciliation rule (that is the `sync` crate).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use exchange_binance::{BinanceConfig, BinanceExchange, MissingUrls};
use oco_core::{IdScheme, ProtectorConfig, SystemClock};
use store_pg::{PgConfig, PgStore, SecretKey};
use sync::{Reconciler, SyncConfig};
use telemetry::{Exporter, Metrics, ObservedExchange};

/// Reconciles every active account against Binance and protects what the
/// real-time layer missed. `Debug` shows neither the database URL nor the
/// secret key.
#[derive(Clone, Parser)]
#[command(name = "sync", version, about)]
pub struct Config {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Key the API secrets are encrypted under (64 hex digits or base64).
    #[arg(long, env = "OCO_SECRET_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub secret_key: SecretText,
    /// Which exchange: Binance production, the Binance Spot testnet, or an
    /// `exchange-sim` (which needs both URLs). Required, as for every other
    /// process: keys of one exchange sent to another fail every request.
    #[arg(long, env = "OCO_EXCHANGE", value_parser = exchange_kind())]
    pub exchange: Option<ExchangeKind>,
    /// REST base URL; overrides the exchange's default.
    #[arg(long, env = "BINANCE_REST_URL")]
    pub binance_rest_url: Option<String>,
    /// WebSocket API URL; overrides the exchange's default (unused by sync's
    /// REST calls, read so that one environment serves every process).
    #[arg(long, env = "BINANCE_WS_URL")]
    pub binance_ws_url: Option<String>,
    /// Seconds between full passes.
    #[arg(long, env = "SYNC_INTERVAL_SECS", default_value_t = 300)]
    pub interval_secs: u64,
    /// Seconds before the first full pass.
    #[arg(long, env = "SYNC_STARTUP_DELAY_SECS", default_value_t = 15)]
    pub startup_delay_secs: u64,
    /// Client-id namespace shared by every ocoguard process (1-6 letters or digits).
    #[arg(long, env = "OCO_ID_NAMESPACE", default_value = "og")]
    pub id_namespace: String,
    /// Accounts reconciled in parallel.
    #[arg(long, env = "SYNC_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Request weight per minute sync may use (Binance counts per IP).
    #[arg(long, env = "SYNC_WEIGHT_BUDGET", default_value_t = 3000)]
    pub weight_budget: u32,
    /// Database connections (`OCO_DB_POOL_SIZE`, as the other binaries; default 8).
    #[arg(long = "db-pool-size", env = "OCO_DB_POOL_SIZE")]
    pub db_pool_size: Option<usize>,
    /// The older name of `--db-pool-size`, still read; `OCO_DB_POOL_SIZE` wins.
    #[arg(long = "db-pool", env = "SYNC_DB_POOL", hide = true)]
    pub db_pool: Option<usize>,
    /// Where `GET /metrics` is served (Prometheus).
    #[arg(long, env = "OCO_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: std::net::SocketAddr,
}

/// The default of `--metrics-listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9182";

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
        // Destructured so that a new field cannot be left out unnoticed. The
        // URL may carry the database password: it is never shown.
        let Self {
            database_url: _,
            secret_key,
            exchange,
            binance_rest_url,
            binance_ws_url,
            interval_secs,
            startup_delay_secs,
            id_namespace,
            concurrency,
            weight_budget,
            db_pool_size,
            db_pool,
            metrics_listen,
        } = self;
        f.debug_struct("Config")
            .field("database_url", &"[redacted]")
            .field("secret_key", &secret_key)
            .field("exchange", &exchange)
            .field("binance_rest_url", &binance_rest_url)
            .field("binance_ws_url", &binance_ws_url)
            .field("interval_secs", &interval_secs)
            .field("startup_delay_secs", &startup_delay_secs)
            .field("id_namespace", &id_namespace)
            .field("concurrency", &concurrency)
            .field("weight_budget", &weight_budget)
            .field("db_pool_size", &db_pool_size)
            .field("db_pool", &db_pool)
            .field("metrics_listen", &metrics_listen)
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

    /// The adapter configuration for the chosen exchange and URL overrides.
    ///
    /// # Errors
    /// No exchange chosen; `sim` without both URLs.
    pub fn binance_config(&self) -> anyhow::Result<BinanceConfig> {
        BinanceConfig::for_exchange(
            self.exchange()?,
            self.binance_rest_url.as_deref(),
            self.binance_ws_url.as_deref(),
        )
        .map_err(|_: MissingUrls| {
            anyhow!("--exchange sim needs BINANCE_REST_URL and BINANCE_WS_URL")
        })
    }

    /// Database connections: `OCO_DB_POOL_SIZE`, else the older `SYNC_DB_POOL`, else 8.
    ///
    /// # Errors
    /// Zero, naming the variable it came from.
    pub fn pool_size(&self) -> anyhow::Result<usize> {
        match (self.db_pool_size, self.db_pool) {
            (Some(n), _) => positive("OCO_DB_POOL_SIZE", n),
            (None, Some(n)) => positive("SYNC_DB_POOL", n),
            (None, None) => Ok(8),
        }
    }

    /// The reconciler's settings: the standard ones, overridden by the flags.
    ///
    /// # Errors
    /// A zero interval, concurrency or weight budget: each would run sync
    /// other than asked (a pass every second, or none at all), so it is
    /// refused by name rather than bent to 1.
    pub fn sync_config(&self) -> anyhow::Result<SyncConfig> {
        let mut c = SyncConfig::standard();
        c.interval = Duration::from_secs(positive("SYNC_INTERVAL_SECS", self.interval_secs)?);
        c.startup_delay = Duration::from_secs(self.startup_delay_secs);
        c.concurrency = positive("SYNC_CONCURRENCY", self.concurrency)?;
        c.weight_budget_per_minute = positive("SYNC_WEIGHT_BUDGET", self.weight_budget)?;
        Ok(c)
    }
}

fn positive<T: Default + PartialOrd>(var: &str, v: T) -> anyhow::Result<T> {
    if v > T::default() {
        Ok(v)
    } else {
        bail!("{var}: must be above 0")
    }
}

/// Connects the store (migrating it) and the exchange, and builds the reconciler.
///
/// # Errors
/// No exchange chosen, a zero setting, bad namespace or URL, a database that cannot be reached or whose secrets
/// were encrypted under another key.
pub async fn wire(config: &Config) -> anyhow::Result<Reconciler> {
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
) -> anyhow::Result<(Reconciler, Arc<PgStore>)> {
    let ids = IdScheme::new(&config.id_namespace).context("OCO_ID_NAMESPACE")?;
    let binance = config.binance_config()?;
    let sync_config = config.sync_config()?;
    let pool_size = config.pool_size()?;
    let secret_key = SecretKey::parse(&config.secret_key.0).context("OCO_SECRET_KEY")?;
    let store = PgStore::connect_patiently(
        PgConfig {
            url: config.database_url.clone(),
            pool_size,
            secret_key,
        },
        store_pg::STARTUP_PATIENCE,
    )
    .await
    .context("connecting to the database (DATABASE_URL, OCO_SECRET_KEY)")?;
    let exchange =
        BinanceExchange::new(binance).context("building the Binance client (BINANCE_REST_URL)")?;
    if let Err(err) = exchange.sync_time().await {
        // Not fatal: the adapter re-syncs by itself after a -1021.
        tracing::warn!(error = %err, "could not read the exchange's time at start");
    }
    let weight = exchange.clone();
    metrics.watch_weight(move || weight.used_weight());
    let store = Arc::new(store);
    let reconciler = Reconciler::wired(
        Arc::new(ObservedExchange::new(Arc::new(exchange), metrics.clone())),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(ids),
        sync_config,
    );
    reconciler.protector().set_observer(metrics.clone());
    Ok((reconciler, store))
}

/// Keeps `oco_breaker_open` in step with `reconciler`'s breakers.
pub fn watch_breakers(metrics: &Metrics, reconciler: Arc<Reconciler>) {
    metrics.on_scrape(move |m| {
        let open: Vec<_> = reconciler
            .open_breakers()
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        m.set_open_breakers(&open);
    });
}

/// Wires and runs until `shutdown` completes.
///
/// # Errors
/// As [`wire`].
pub async fn run(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let (reconciler, store) = wire_observed(config, &metrics).await?;
    let reconciler = Arc::new(reconciler);
    watch_breakers(&metrics, reconciler.clone());
    // Flags announced by any process wake the flag loop at once.
    let ringer = store_pg::ring_on_flags(store.clone(), reconciler.flag_bell());
    metrics.watch_flag_listener(store_pg::RECONCILE_CHANNEL, ringer.listening());
    let exporter = Exporter::start(config.metrics_listen, metrics, store, Arc::new(SystemClock))
        .await
        .with_context(|| format!("binding OCO_METRICS_LISTEN {}", config.metrics_listen))?;
    tracing::info!(
        exchange = ?config.exchange()?,
        metrics = %exporter.local_addr(),
        interval_s = config.interval_secs,
        startup_delay_s = config.startup_delay_secs,
        namespace = %config.id_namespace,
        "sync started"
    );
    reconciler.run(shutdown).await;
    drop(ringer);
    let m = reconciler.metrics();
    tracing::info!(
        passes = m.passes,
        accounts = m.accounts_reconciled,
        weight = m.weight_used,
        "sync stopped"
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
