//! The demo: every layer in one process against the bundled simulator.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream};
use exchange_sim::{AccountSpec, Sim, SimConfig, SimControl};
use oco_core::mem::MemStore;
use oco_core::model::{Protection, Source};
use oco_core::ports::{Exchange, Leases, UserStream, Users};
use oco_core::state::{EntryStatus, LegState};
use oco_core::{EntryId, Store, SystemClock};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use store_pg::{PgConfig, PgStore, SecretKey};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use ws_gateway::{Gateway, GatewayConfig};

const API_SECRET: &str = "demo-api-secret";

/// A name unique to this run, so that runs against one PostgreSQL database never collide.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}", nanos % 0xffff_ffff_ffff)
}

/// One entry of the final report.
#[derive(Debug, Clone)]
pub struct Row {
    /// What the demo did with it.
    pub label: &'static str,
    /// Entry id.
    pub entry: EntryId,
    /// Symbol.
    pub symbol: String,
    /// Order status.
    pub status: EntryStatus,
    /// Filled base quantity.
    pub executed: Decimal,
    /// Protection state.
    pub protection: Protection,
    /// Fill → protected, in ms.
    pub latency_ms: Option<i64>,
    /// Protective lists placed, by layer.
    pub legs_by_layer: BTreeMap<&'static str, usize>,
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// One row per entry.
    pub rows: Vec<Row>,
    /// Wall time of the whole demo.
    pub elapsed: Duration,
}

impl DemoReport {
    /// True when every entry that filled is protected, closed or exited.
    pub fn all_filled_protected(&self) -> bool {
        self.rows
            .iter()
            .filter(|r| r.executed > Decimal::ZERO)
            .all(|r| {
                matches!(
                    r.protection,
                    Protection::Protected { .. } | Protection::Closed | Protection::Exited { .. }
                )
            })
    }

    /// The row of an entry by its label.
    pub fn row(&self, label: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.label == label)
    }
}

struct Progress<'a> {
    out: &'a mut dyn Write,
    started: Instant,
}

impl Progress<'_> {
    fn say(&mut self, line: impl AsRef<str>) {
        let t = self.started.elapsed();
        let _ = writeln!(self.out, "[{:>5.1}s] {}", t.as_secs_f32(), line.as_ref());
    }
}

/// Runs the demo, writing progress and the report to `out`.
///
/// # Errors
/// When a part cannot start, or a step does not happen within its deadline.
pub async fn run(out: &mut dyn Write) -> anyhow::Result<DemoReport> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            // A generated key would lock the database to this one run: the key must be the operator's.
            let text = std::env::var("OCO_SECRET_KEY").context(
                "OCO_SECRET_KEY must be set when DATABASE_URL is (64 hex digits or base64)",
            )?;
            let key =
                SecretKey::parse(&text).map_err(|e| anyhow::anyhow!("OCO_SECRET_KEY: {e}"))?;
            run_on_postgres(url, key, out).await
        }
        _ => run_in_memory(out).await,
    }
}

/// The demo on the in-memory store.
///
/// # Errors
/// As [`run`].
pub async fn run_in_memory(out: &mut dyn Write) -> anyhow::Result<DemoReport> {
    run_with(Arc::new(MemStore::new()), "in-memory", out).await
}

/// The demo on PostgreSQL at `url`, API secrets sealed under `key`.
///
/// # Errors
/// As [`run`], and when the database cannot be reached or was sealed under another key.
pub async fn run_on_postgres(
    url: String,
    key: SecretKey,
    out: &mut dyn Write,
) -> anyhow::Result<DemoReport> {
    let store = PgStore::connect(PgConfig {
        url,
        pool_size: 8,
        secret_key: key,
    })
    .await
    .context("connecting to DATABASE_URL")?;
    run_with(Arc::new(store), "PostgreSQL (DATABASE_URL)", out).await
}

struct Layers {
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

fn gateway<S: Store + Leases + 'static>(
    store: &Arc<S>,
    streams: &Arc<dyn UserStream>,
    protector: &Arc<oco_core::Protector>,
    holder: &str,
) -> (
    Arc<ws_gateway::GatewayStats>,
    oneshot::Sender<()>,
    JoinHandle<()>,
) {
    let mut config = GatewayConfig::standard(holder);
    config.renew_every = Duration::from_millis(200);
    config.lease_ttl = Duration::from_secs(2);
    config.min_backoff = Duration::from_millis(100);
    config.max_backoff = Duration::from_millis(500);
    let gw = Gateway::new(
        store.clone(),
        store.clone(),
        streams.clone(),
        protector.clone(),
        config,
    );
    let stats = gw.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = gw
            .run(async move {
                let _ = rx.await;
            })
            .await;
    });
    (stats, tx, task)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn price_of(ctl: &SimControl, symbol: &str) -> anyhow::Result<Decimal> {
    ctl.price(symbol)
        .with_context(|| format!("price of {symbol}"))
}

fn pct(price: Decimal, percent: i64) -> Decimal {
    (price * (Decimal::ONE_HUNDRED + Decimal::from(percent)) / Decimal::ONE_HUNDRED).round_dp(2)
}

fn permille(price: Decimal, per_mille: i64) -> Decimal {
    (price * (Decimal::from(1000) + Decimal::from(per_mille)) / Decimal::from(1000)).round_dp(2)
}

async fn run_with<S>(
    store: Arc<S>,
    store_name: &str,
    out: &mut dyn Write,
) -> anyhow::Result<DemoReport>
where
    S: Store + Users + Leases + oco_core::ports::Coverage + 'static,
{
    let mut p = Progress {
        out,
        started: Instant::now(),
    };
    let tag = run_tag();
    let api_key = format!("demo-key-{tag}");
    let user = format!("demo-{tag}");
    let api_key = api_key.as_str();
    let sim = Sim::start(
        SimConfig::new("127.0.0.1:0".parse()?)
            .with_faults(true)
            .with_account(AccountSpec::new(
                api_key,
                API_SECRET,
                vec![("USDT".into(), Decimal::from(100_000))],
            )),
    )
    .await
    .context("starting the exchange simulator")?;
    let ctl = sim.control();
    p.say(format!(
        "exchange simulator on {} (Binance Spot API); store: {store_name}",
        sim.base_url()
    ));

    let binance = BinanceConfig::custom(sim.base_url(), sim.ws_api_url());
    let exchange: Arc<dyn Exchange> = Arc::new(BinanceExchange::new(binance.clone())?);
    let streams: Arc<dyn UserStream> = Arc::new(BinanceUserStream::new(binance)?);
    let clock = Arc::new(SystemClock);
    let state = api_bin::app_state(store.clone(), exchange.clone(), clock.clone(), "demo")?;
    let protector = state.protector.clone();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_addr = listener.local_addr()?;
    let mut layers = Layers {
        stop: Vec::new(),
        tasks: Vec::new(),
    };
    let (api_stop, api_rx) = oneshot::channel::<()>();
    layers.stop.push(api_stop);
    layers.tasks.push(tokio::spawn(async move {
        let _ = api_bin::serve(listener, state, async move {
            let _ = api_rx.await;
        })
        .await;
    }));
    let (gw_stats, gw_stop, gw_task) = gateway(&store, &streams, &protector, "demo-gateway-1");
    let mut sync_config = sync::SyncConfig::standard();
    sync_config.startup_delay = Duration::from_secs(1);
    sync_config.interval = Duration::from_secs(2);
    let reconciler = sync::Reconciler::new(
        exchange.clone(),
        store.clone(),
        clock.clone(),
        protector.clone(),
        sync_config,
    );
    let (sync_stop, sync_rx) = oneshot::channel::<()>();
    layers.stop.push(sync_stop);
    layers.tasks.push(tokio::spawn(async move {
        let _ = reconciler
            .run(async move {
                let _ = sync_rx.await;
            })
            .await;
    }));
    p.say(format!(
        "layers up: api on http://{api_addr}, ws-gateway, sync (every 2 s)"
    ));

    let token = api::auth::new_token();
    store
        .create_user(&user, &api::auth::hash_token(&token))
        .await?;
    let http = reqwest::Client::new();
    let base = format!("http://{api_addr}/v1");
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let reply = post(
        "/accounts",
        json!({"exchange": "binance", "apiKey": api_key, "apiSecret": API_SECRET}),
    )
    .await?;
    let account: Value = reply.error_for_status()?.json().await?;
    let account_id = account["id"].as_i64().context("account id in the reply")?;
    p.say(format!(
        "user '{user}' registered account {account_id} through POST /v1/accounts"
    ));
    let gw_up = gw_stats.clone();
    wait_for("the user-data stream", Duration::from_secs(10), || {
        let up = gw_up.snapshot().streams_up == 1;
        async move { up }
    })
    .await?;

    let mut entries: Vec<(&'static str, EntryId)> = Vec::new();
    let place = async |label: &'static str, body: Value| -> anyhow::Result<EntryId> {
        let reply = post("/entries", body).await?;
        let status = reply.status();
        let json: Value = reply.json().await?;
        if !status.is_success() {
            bail!("{label}: the API answered {status}: {json}");
        }
        let id = EntryId(json["id"].as_i64().context("entry id")?);
        Ok(id)
    };

    let btc = price_of(&ctl, "BTCUSDT")?;
    let eth = price_of(&ctl, "ETHUSDT")?;
    let bnb = price_of(&ctl, "BNBUSDT")?;
    let a = place(
        "market",
        json!({"account": account_id, "symbol": "BTCUSDT", "type": "MARKET", "quantity": "0.01",
               "tp": [pct(btc, 1).to_string()]}),
    )
    .await?;
    entries.push(("MARKET, one target, default stop", a));
    p.say(format!(
        "MARKET BTCUSDT 0.01 → entry {a}: filled in its own response and protected at once (the report names the layer that won)"
    ));
    let b = place(
        "market-own-levels",
        json!({"account": account_id, "symbol": "ETHUSDT", "type": "MARKET", "quantity": "0.1",
               "tp": [pct(eth, 1).to_string(), pct(eth, 2).to_string()], "sl": pct(eth, -1).to_string()}),
    )
    .await?;
    entries.push(("MARKET, own TP1/TP2/SL", b));
    p.say(format!(
        "MARKET ETHUSDT 0.1 with its own levels → entry {b}"
    ));
    let d = place(
        "limit-later",
        json!({"account": account_id, "symbol": "BTCUSDT", "type": "LIMIT", "quantity": "0.01",
               "price": permille(btc, -5).to_string(),
               "tp": [pct(btc, 1).to_string(), pct(btc, 2).to_string()], "sl": pct(permille(btc, -5), -1).to_string()}),
    )
    .await?;
    entries.push(("LIMIT, fills after a gateway restart", d));
    p.say(format!(
        "LIMIT BTCUSDT 0.01 @ {} → entry {d}: resting, no legs yet",
        permille(btc, -5)
    ));

    // A stream outage while a LIMIT fills: only sync can see it.
    ctl.set_refuse_streams(true);
    ctl.drop_streams(None);
    let c_price = permille(bnb, -10);
    let c = place(
        "limit-in-outage",
        json!({"account": account_id, "symbol": "BNBUSDT", "type": "LIMIT", "quantity": "0.2",
               "price": c_price.to_string(),
               "tp": [pct(bnb, 1).to_string(), pct(bnb, 2).to_string()], "sl": pct(c_price, -1).to_string()}),
    )
    .await?;
    entries.push(("LIMIT, fills during a stream outage", c));
    ctl.set_price("BNBUSDT", permille(bnb, -15))?;
    p.say(format!("stream outage injected; LIMIT BNBUSDT 0.2 @ {c_price} → entry {c} filled while nobody listened"));
    let s = store.clone();
    wait_for(
        "sync to protect the entry filled during the outage",
        Duration::from_secs(15),
        || {
            let s = s.clone();
            async move {
                matches!(
                    s.entry(c).await.map(|e| e.protection),
                    Ok(Protection::Protected { .. })
                )
            }
        },
    )
    .await?;
    p.say(format!(
        "entry {c} protected by sync (reconciliation after the gap)"
    ));
    ctl.set_refuse_streams(false);

    // A gateway crash, in-process: the task is aborted without releasing its
    // lease, so the new instance takes the account over as a new process would.
    gw_task.abort();
    drop(gw_stop);
    let (gw2_stats, gw2_stop, gw2_task) = gateway(&store, &streams, &protector, "demo-gateway-2");
    layers.stop.push(gw2_stop);
    layers.tasks.push(gw2_task);
    let up2 = gw2_stats.clone();
    wait_for(
        "the restarted gateway to take the account over",
        Duration::from_secs(15),
        || {
            let up = up2.snapshot().streams_up == 1;
            async move { up }
        },
    )
    .await?;
    p.say("ws-gateway crashed (aborted, lease not released) and restarted: the new instance took the account's lease over");

    ctl.set_price("BTCUSDT", permille(btc, -6))?;
    let s = store.clone();
    wait_for(
        "the gateway to protect the LIMIT that filled",
        Duration::from_secs(10),
        || {
            let s = s.clone();
            async move {
                matches!(
                    s.entry(d).await.map(|e| e.protection),
                    Ok(Protection::Protected { .. })
                )
            }
        },
    )
    .await?;
    p.say(format!(
        "BTCUSDT dipped: entry {d} filled and was protected from the stream"
    ));

    // Targets and stops: ETH rallies through both take-profits, BNB falls through its stop.
    ctl.set_price("ETHUSDT", pct(eth, 2))?;
    let c_entry = store.entry(c).await?;
    let c_fill = c_entry.average_price().map_or(c_price, |p| p.get());
    ctl.set_price("BNBUSDT", permille(c_fill, -12))?;
    let s = store.clone();
    wait_for(
        "take-profits and the stop to close their entries",
        Duration::from_secs(15),
        || {
            let s = s.clone();
            async move {
                let closed = |id| {
                    let s = s.clone();
                    async move {
                        matches!(
                            s.entry(id).await.map(|e| e.protection),
                            Ok(Protection::Closed)
                        )
                    }
                };
                closed(b).await && closed(c).await
            }
        },
    )
    .await?;
    p.say(format!("ETHUSDT rallied: entry {b} closed by its take-profits; BNBUSDT fell: entry {c} closed by its stop"));

    let resting = place(
        "limit-resting",
        json!({"account": account_id, "symbol": "BTCUSDT", "type": "LIMIT", "quantity": "0.01",
               "price": pct(btc, -5).to_string(), "tp": [pct(btc, 1).to_string()]}),
    )
    .await?;
    entries.push(("LIMIT, resting", resting));

    let mut rows = Vec::new();
    for (label, id) in &entries {
        let e = store.entry(*id).await?;
        let legs = store.legs(*id).await?;
        let mut by_layer: BTreeMap<&'static str, usize> = BTreeMap::new();
        for leg in legs
            .iter()
            .filter(|l| !matches!(l.state, LegState::NotPlaced { .. } | LegState::Claimed))
        {
            *by_layer.entry(leg.source.name()).or_default() += 1;
        }
        // Protected = every list of the first generation acknowledged by the
        // exchange: `protect` records the "protected" event right after the acks.
        let protected_at = store
            .events(*id)
            .await?
            .iter()
            .filter(|ev| ev.kind == "protected")
            .map(|ev| ev.at)
            .min();
        let latency_ms = match (e.filled_at, protected_at) {
            (Some(f), Some(p)) => Some(p.0 - f.0),
            _ => None,
        };
        rows.push(Row {
            label,
            entry: *id,
            symbol: e.symbol.name.clone(),
            status: e.status,
            executed: e.executed_qty.get(),
            protection: e.protection.clone(),
            latency_ms,
            legs_by_layer: by_layer,
        });
        let _ = e.realized_quote;
    }
    let report = DemoReport {
        rows,
        elapsed: p.started.elapsed(),
    };
    print_report(&mut p, &report, &store).await?;

    for stop in layers.stop {
        let _ = stop.send(());
    }
    for task in layers.tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    sim.shutdown().await;
    Ok(report)
}

async fn print_report<S: Store>(
    p: &mut Progress<'_>,
    report: &DemoReport,
    store: &Arc<S>,
) -> anyhow::Result<()> {
    let _ = writeln!(p.out);
    let _ = writeln!(
        p.out,
        "{:<38} {:>5} {:<8} {:<17} {:<24} {:>9} {:<22} {:>10}",
        "entry", "id", "symbol", "status", "protection", "fill→prot", "lists by layer", "realised"
    );
    let mut by_layer: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in &report.rows {
        let protection = match &r.protection {
            Protection::Protected { by, .. } => format!("protected ({by})"),
            Protection::Closed => "closed".into(),
            Protection::NotNeeded => "nothing filled".into(),
            Protection::Unprotected => "UNPROTECTED".into(),
            Protection::Unprotectable { .. } => "unprotectable".into(),
            Protection::Exited { .. } => "exited at market".into(),
        };
        let layers = r
            .legs_by_layer
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        for (k, v) in &r.legs_by_layer {
            *by_layer.entry(k).or_default() += v;
        }
        let realized = store
            .entry(r.entry)
            .await?
            .realized_quote
            .map_or_else(|| "-".into(), |q| q.round_dp(4).to_string());
        let latency = r
            .latency_ms
            .map_or_else(|| "-".into(), |ms| format!("{ms} ms"));
        let _ = writeln!(
            p.out,
            "{:<38} {:>5} {:<8} {:<17} {:<24} {:>9} {:<22} {:>10}",
            r.label,
            r.entry.0,
            r.symbol,
            r.status.name(),
            protection,
            latency,
            layers,
            realized
        );
    }
    let total: usize = by_layer.values().sum();
    let _ = writeln!(p.out);
    let layers = [Source::Websocket, Source::Sync, Source::Direct]
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s.name(),
                by_layer.get(s.name()).copied().unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(p.out, "protective lists placed: {total} ({layers})");
    let _ = writeln!(
        p.out,
        "every filled entry protected: {}; demo took {:.1} s",
        if report.all_filled_protected() {
            "yes"
        } else {
            "NO"
        },
        report.elapsed.as_secs_f32()
    );
    Ok(())
}
