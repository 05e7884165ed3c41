//! Wiring of the `api` binary: configuration from flags and environment,
//! the PostgreSQL store and the Binance adapter behind the `api` crate's
//! router, and the `users add` subcommand. Kept in a library so that
//! end-to-end tests start exactly what the binary starts.
//!
//! Not here: request handling or any rule (the `api` crate), SQL (`store-pg`),
//! exchange protocol (`exchange-binance`).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use api::AppState;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use exchange_binance::{BinanceConfig, BinanceExchange, MissingUrls};
use oco_core::ports::SystemClock;
use oco_core::ports::{Clock, Coverage, Exchange, Store, Users};
use oco_core::{IdScheme, Protector, ProtectorConfig};
use store_pg::{PgConfig, PgStore, SecretKey};
use telemetry::{Exporter, Metrics, ObservedExchange};
use tokio::net::TcpListener;
use tracing::info;

/// `api`: the entry API of ocoguard.
#[derive(Debug, Parser)]
#[command(name = "api", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves the HTTP API.
    Serve(ServeArgs),
    /// Manages API users.
    Users {
        /// What to do with users.
        #[command(subcommand)]
        command: UsersCommand,
    },
}

/// `api users …`.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Registers a user and prints their API token once (only its hash is kept).
    Add {
        /// User name.
        name: String,
        /// Database settings.
        #[command(flatten)]
        db: DbArgs,
    },
}

/// Where the database is and the key for API secrets at rest. `Debug` shows
/// neither the URL nor the key.
#[derive(Args)]
pub struct DbArgs {
    /// `postgres://user:password@host:port/database`.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Key API secrets are encrypted under: 32 bytes as 64 hex digits or base64.
    #[arg(long = "secret-key", env = "OCO_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
    /// Database connections.
    #[arg(long = "db-pool-size", env = "OCO_DB_POOL_SIZE", default_value_t = 8)]
    pub pool_size: usize,
}

impl fmt::Debug for DbArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry the database password, and the key opens every
        // stored API secret.
        f.debug_struct("DbArgs")
            .field("database_url", &"[redacted]")
            .field("secret_key", &"[redacted]")
            .field("pool_size", &self.pool_size)
            .finish()
    }
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

/// `api serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "OCO_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Exchange endpoints.
    #[arg(long, env = "OCO_EXCHANGE", value_parser = exchange_kind())]
    pub exchange: ExchangeKind,
    /// REST base, overriding the preset (required for `sim`).
    #[arg(long = "binance-rest-url", env = "BINANCE_REST_URL")]
    pub rest_url: Option<String>,
    /// WebSocket API URL, overriding the preset (required for `sim`).
    #[arg(long = "binance-ws-url", env = "BINANCE_WS_URL")]
    pub ws_url: Option<String>,
    /// Client-id namespace (1 to 6 letters or digits); the same for every
    /// ocoguard process sharing the exchange accounts.
    #[arg(long = "id-namespace", env = "OCO_ID_NAMESPACE", default_value = "og")]
    pub namespace: String,
    /// Database settings.
    #[command(flatten)]
    pub db: DbArgs,
}

/// The Binance adapter's settings for `args`.
///
/// # Errors
/// When `sim` lacks its URLs.
pub fn binance_config(args: &ServeArgs) -> anyhow::Result<BinanceConfig> {
    BinanceConfig::for_exchange(
        args.exchange,
        args.rest_url.as_deref(),
        args.ws_url.as_deref(),
    )
    .map_err(|_: MissingUrls| anyhow!("--exchange sim needs BINANCE_REST_URL and BINANCE_WS_URL"))
}

/// Connects to the database (applying migrations) with `db`'s settings, at
/// once: for commands a person runs and wants an answer from.
///
/// # Errors
/// A malformed key (named `OCO_SECRET_KEY`) or an unreachable database.
pub async fn connect_store(db: &DbArgs) -> anyhow::Result<PgStore> {
    connect_store_within(db, std::time::Duration::ZERO).await
}

/// [`connect_store`], waiting up to `patience` for a database that is not up
/// yet (the server, started alongside its database).
///
/// # Errors
/// As [`connect_store`], once `patience` is spent.
pub async fn connect_store_within(
    db: &DbArgs,
    patience: std::time::Duration,
) -> anyhow::Result<PgStore> {
    let secret_key = SecretKey::parse(&db.secret_key).context("reading OCO_SECRET_KEY")?;
    let store = PgStore::connect_patiently(
        PgConfig {
            url: db.database_url.clone(),
            pool_size: db.pool_size.max(1),
            secret_key,
        },
        patience,
    )
    .await
    .context("connecting to DATABASE_URL")?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// The API's state over one store that keeps both entries and users.
///
/// # Errors
/// An illegal id namespace.
pub fn app_state<S>(
    store: Arc<S>,
    exchange: Arc<dyn Exchange>,
    clock: Arc<dyn Clock>,
    namespace: &str,
) -> anyhow::Result<AppState>
where
    S: Store + Users + Coverage + 'static,
{
    let ids = IdScheme::new(namespace).context("reading OCO_ID_NAMESPACE")?;
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        clock.clone(),
        ProtectorConfig::new(ids.clone()),
    ));
    Ok(AppState {
        store: store.clone(),
        users: store.clone(),
        coverage: store,
        exchange,
        protector,
        clock,
        ids,
    })
}

/// Serves the API on `listener` until `shutdown` completes.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    info!(%addr, "entry API listening");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the entry API")
}

/// Serves the API and `GET /metrics` (from `metrics`) on `listener` until
/// `shutdown` completes.
///
/// # Errors
/// When the server fails.
pub async fn serve_observed(
    listener: TcpListener,
    state: AppState,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    info!(%addr, "entry API listening, metrics on /metrics");
    axum::serve(
        listener,
        telemetry::router(metrics).merge(api::router(state)),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving the entry API")
}

/// The exchange as the API uses it: errors counted in `metrics`, its used
/// weight watched.
pub fn observed_exchange(exchange: BinanceExchange, metrics: &Arc<Metrics>) -> Arc<dyn Exchange> {
    let weight = exchange.clone();
    metrics.watch_weight(move || weight.used_weight());
    Arc::new(ObservedExchange::new(Arc::new(exchange), metrics.clone()))
}

/// Registers `name` and returns their new token; only its hash is stored.
///
/// # Errors
/// When the name is taken or the store fails.
pub async fn add_user(users: &dyn Users, name: &str) -> anyhow::Result<String> {
    let name = name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        bail!("user name must be 1 to 64 printable characters");
    }
    let token = api::new_token();
    users
        .create_user(name, &api::hash_token(&token))
        .await
        .with_context(|| format!("registering user {name}"))?;
    Ok(token)
}

/// Runs the command line.
///
/// # Errors
/// Configuration, database or server failures, with context.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let store = Arc::new(connect_store_within(&args.db, store_pg::STARTUP_PATIENCE).await?);
            // Not fatal: the pools open lazily otherwise, only the first orders are slower.
            if let Err(err) = store.warm_up().await {
                tracing::warn!(error = %err, "could not open the database connections ahead of the first orders");
            }
            let exchange = BinanceExchange::new(binance_config(&args)?)
                .context("building the Binance adapter")?;
            let metrics = Metrics::new();
            let state = app_state(
                store.clone(),
                observed_exchange(exchange, &metrics),
                Arc::new(SystemClock),
                &args.namespace,
            )?;
            state.protector.set_observer(metrics.clone());
            let _refresher = Exporter::refresh_only(metrics.clone(), store, Arc::new(SystemClock));
            let listener = TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding OCO_API_LISTEN {}", args.listen))?;
            serve_observed(listener, state, metrics, shutdown_signal()).await
        }
        Command::Users {
            command: UsersCommand::Add { name, db },
        } => {
            let store = connect_store(&db).await?;
            let token = add_user(&store, &name).await?;
            eprintln!("user {name} registered; their token is shown once, below");
            println!("{token}");
            Ok(())
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    const PASSWORD: &str = "db-pass-4f1c";
    const KEY: &str = "7f3a9c2e5b8d1f4a6c0e9b2d5f8a1c4e7b0d3f6a9c2e5b8d1f4a7c0e3b6d9f2a";

    fn debug_of(args: &[&str]) -> String {
        match Cli::try_parse_from(args) {
            Ok(cli) => format!("{cli:?}"),
            Err(e) => panic!("{args:?} did not parse: {e}"),
        }
    }

    #[test]
    fn debug_shows_neither_the_database_password_nor_the_secret_key() {
        let url = format!("postgres://oco:{PASSWORD}@db.internal:5432/oco");
        let db = ["--database-url", url.as_str(), "--secret-key", KEY];
        let users = [&["api", "users", "add", "alice"][..], &db[..]].concat();
        let serve = [&["api", "serve", "--exchange", "testnet"][..], &db[..]].concat();
        for args in [users, serve] {
            let debug = debug_of(&args);
            assert!(debug.contains("DbArgs"), "{debug}");
            assert!(
                !debug.contains(PASSWORD),
                "Debug shows the password: {debug}"
            );
            assert!(!debug.contains(KEY), "Debug shows the key: {debug}");
        }
    }
}
