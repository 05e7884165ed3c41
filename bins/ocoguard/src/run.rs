//! `ocoguard run` and `ocoguard migrate`: every layer (ws-gateway, sync, the
//! entry API) in one process over PostgreSQL and a configured exchange, until
//! SIGINT/SIGTERM; or only the database migrations.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use clap::Args;
use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream, MissingUrls};
use oco_core::ports::{Exchange, Leases};
use oco_core::{IdScheme, Protector, ProtectorConfig, SystemClock};
use store_pg::{PgConfig, PgStore};
use sync::{Reconciler, SyncConfig};
use telemetry::{Exporter, Metrics, ObservedExchange};
use tokio::net::TcpListener;
use tokio::sync::watch;
use ws_gateway::{Gateway, GatewayConfig};

use crate::config::Settings;

/// `ocoguard run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// TOML config file; environment variables override it (see
    /// `ocoguard.example.toml` and `ocoguard config`).
    #[arg(long, short = 'c', env = "OCOGUARD_CONFIG")]
    pub config: Option<PathBuf>,
}

impl Settings {
    /// The adapter configuration for the chosen exchange, URL overrides and
    /// stream settings.
    ///
    /// # Errors
    /// `sim` without both URLs.
    pub fn binance_config(&self) -> anyhow::Result<BinanceConfig> {
        let mut config = self.binance_urls()?;
        config
            .stream
            .set_connection_limits(self.accounts_per_connection, self.stream_connect_attempts);
        Ok(config)
    }

    fn binance_urls(&self) -> anyhow::Result<BinanceConfig> {
        BinanceConfig::for_exchange(
            self.exchange,
            self.binance_rest_url.as_deref(),
            self.binance_ws_url.as_deref(),
        )
        .map_err(|_: MissingUrls| {
            anyhow!("exchange `sim` needs `exchange.rest_url` and `exchange.ws_url`")
        })
    }

    /// The gateway's settings: the standard ones with this file's lease
    /// period, renewal interval, account limit and holder name.
    pub fn gateway_config(&self) -> GatewayConfig {
        let holder = self.gateway_id.clone().unwrap_or_else(default_gateway_id);
        let mut c = GatewayConfig::standard(holder);
        c.lease_ttl = Duration::from_secs(self.lease_ttl_secs);
        c.renew_every = Duration::from_secs(self.lease_renew_secs);
        c.max_accounts = self.max_accounts;
        c
    }

    /// The reconciler's settings: the standard ones with this file's interval,
    /// startup delay, concurrency and weight budget.
    pub fn sync_config(&self) -> SyncConfig {
        let mut c = SyncConfig::standard();
        c.interval = Duration::from_secs(self.sync_interval_secs.max(1));
        c.startup_delay = Duration::from_secs(self.sync_startup_delay_secs);
        c.concurrency = self.sync_concurrency.max(1);
        c.weight_budget_per_minute = self.sync_weight_budget.max(1);
        c
    }
}

/// `hostname-pid`: unique per process on a host, readable in the lease table.
pub fn default_gateway_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ocoguard".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Applies pending migrations; returns their names.
///
/// # Errors
/// An unreachable database or a failed migration.
pub async fn migrate(database_url: &str) -> anyhow::Result<Vec<String>> {
    store_pg::migrate(database_url)
        .await
        .context("applying migrations (DATABASE_URL)")
}

/// Every layer in this process until `shutdown` completes: the gateway, sync
/// and the entry API, over PostgreSQL and the configured exchange. The three
/// layers share one exchange client, hence one pacer: Binance counts request
/// weight and bans per IP, so the process keeps one weight budget, and a
/// 429 or 418 met by any layer holds back the requests of all of them.
///
/// # Errors
/// Bad settings (the message names the variable, never the secret key), an
/// unreachable database, an address that cannot be bound, a layer that fails.
pub async fn run_all(args: &Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let _wakeup = args
        .cpu_wakeup_latency_us
        .and_then(ws_gateway::CpuWakeupLatency::hold_or_warn);
    let ids = IdScheme::new(&args.id_namespace).context("id_namespace")?;
    let binance = args.binance_config()?;
    let secret_key = args.secret_key.clone();
    let store = Arc::new(
        PgStore::connect_patiently(
            PgConfig {
                url: args.database_url.clone(),
                pool_size: args.db_pool_size.max(1),
                secret_key,
            },
            store_pg::STARTUP_PATIENCE,
        )
        .await
        .context("connecting to the database (`database.url`, the secret key)")?,
    );
    store.migrate().await.context("applying migrations")?;
    // Not fatal: the pools open lazily otherwise, only the first fills are slower.
    if let Err(err) = store.warm_up().await {
        tracing::warn!(error = %err, "could not open the database connections ahead of the first fills");
    }
    // One registry for the three layers: placements are told apart by source.
    let metrics = Metrics::new();
    // One client for the three layers, as for the IP they share: one weight
    // budget (three clients would each spend `pacing.weight_per_minute` of
    // the IP's 6,000) and one hold after a 429 or 418 (repeated 429s from
    // clients that did not hear of it get the IP banned).
    let client = BinanceExchange::new(binance.clone())
        .context("building the Binance client (`exchange.rest_url`)")?;
    if let Err(err) = client.sync_time().await {
        // Not fatal: the adapter re-syncs by itself after a -1021.
        tracing::warn!(error = %err, "could not read the exchange's time at start");
    }
    // The stream's connections and subscriptions spend the same per-IP
    // weight as the orders: charged to the same pacer.
    let streams = BinanceUserStream::sharing_weight_with(binance.clone(), &client)
        .context("building the Binance stream client (`exchange.ws_url`)")?;
    let weight = client.clone();
    metrics.watch_weight(move || weight.used_weight());
    let exchange: Arc<dyn Exchange> =
        Arc::new(ObservedExchange::new(Arc::new(client), metrics.clone()));

    // Layer 1: the user-data streams.
    let gateway_config = args.gateway_config();
    let holder = gateway_config.holder.clone();
    let gw_protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(ids.clone()),
    ));
    gw_protector.set_observer(metrics.clone());
    let gateway = Gateway::new(
        store.clone(),
        store.clone() as Arc<dyn Leases>,
        Arc::new(streams),
        gw_protector,
        gateway_config,
    );
    let stream_stats = gateway.stats();
    metrics.on_scrape(move |m| {
        m.set_streams(&stream_stats.stream_states());
        let s = stream_stats.snapshot();
        m.set_gateway_flags(s.flags_owed, s.flag_failures);
    });
    let hints = store.clone();
    metrics.on_scrape(move |m| {
        let counts = hints.hint_stats();
        m.set_hint_counts(counts.used, counts.stale);
    });
    // Layer 2: reconciliation.
    let sync_config = args.sync_config();
    let reconciler = Arc::new(Reconciler::wired(
        exchange.clone(),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(ids.clone()),
        sync_config,
    ));
    reconciler.protector().set_observer(metrics.clone());
    {
        let reconciler = reconciler.clone();
        metrics.on_scrape(move |m| {
            let open: Vec<_> = reconciler
                .open_breakers()
                .into_iter()
                .map(|(a, _)| a)
                .collect();
            m.set_open_breakers(&open);
        });
    }
    // Flags announced by any process (this gateway's, another node's) wake
    // the flag loop at once; the guard ends the task however this returns.
    let ringer = store_pg::ring_on_flags(store.clone(), reconciler.flag_bell());
    metrics.watch_flag_listener(store_pg::RECONCILE_CHANNEL, ringer.listening());
    // New entries of the accounts the gateway follows are read as they are
    // stored, so that their fills skip that read.
    let learner = store_pg::learn_announced_entries(store.clone());
    metrics.watch_entry_listener(store_pg::ENTRY_CHANNEL, learner.listening());
    // Layer 3: the entry API.
    let state = api_bin::app_state(
        store.clone(),
        exchange,
        Arc::new(SystemClock),
        &args.id_namespace,
    )?;
    state.protector.set_observer(metrics.clone());
    let listener = TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding `api.listen` {}", args.api_listen))?;
    let exporter = Exporter::start(
        args.metrics_listen,
        metrics.clone(),
        store.clone(),
        Arc::new(SystemClock),
    )
    .await
    .with_context(|| format!("binding `metrics.listen` {}", args.metrics_listen))?;

    let (stop, _) = watch::channel(false);
    let signal = |stop: &watch::Sender<bool>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.wait_for(|fired| *fired).await;
        }
    };
    let gw_task = tokio::spawn(gateway.run(signal(&stop)));
    let sync_task = {
        let (r, sig) = (reconciler.clone(), signal(&stop));
        tokio::spawn(async move { r.run(sig).await })
    };
    let api_task = tokio::spawn(api_bin::serve_observed(
        listener,
        state,
        metrics,
        signal(&stop),
    ));
    tracing::info!(
        holder = %holder,
        exchange = ?args.exchange,
        api = %args.api_listen,
        namespace = %args.id_namespace,
        metrics = %exporter.local_addr(),
        "ocoguard started: ws-gateway, sync, entry API"
    );
    shutdown.await;
    tracing::info!("stopping");
    stop.send_replace(true);
    let gw = gw_task.await.context("the gateway task")?;
    sync_task.await.context("the sync task")?;
    drop(ringer);
    let api = api_task.await.context("the API task")?;
    gw.context("stopping the gateway")?;
    api?;
    tracing::info!("ocoguard stopped, leases released");
    Ok(())
}
