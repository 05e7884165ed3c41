//! ocoguard's benchmark suite, one run: fill → protected latency of each
//! layer next to the simulator's bare order round trip, then throughput of
//! the real-time layer at 100 / 1,000 / 10,000 streamed accounts.
//!
//! Real parts only: `exchange-sim` in a child process (this binary run with
//! `--serve-sim`, so that its sockets and memory are not this process's) over
//! real HTTP/WebSocket on 127.0.0.1, the Binance adapter, a fresh PostgreSQL
//! database per world (`TestDb`, `DATABASE_URL`), and the layers wired as
//! their binaries wire them. Fill and protection times are the exchange's:
//! the entry's trade time and the answer time of the second OCO list request
//! (both the simulator's clock, µs since the epoch).
//!
//! `cargo bench -p ocoguard --bench suite`; `BENCH_QUICK=1` for a smoke run
//! (small worlds, a few seconds). `BENCH_TIERS` (default `100,1000,10000`)
//! and `BENCH_TIER_FILLS` (default 1000: fills per tier, at most one per
//! account) size the throughput part. See BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench that cannot unwrap has failed

use std::collections::HashMap;
use std::io::{BufRead as _, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use futures_util::StreamExt as _;
use oco_core::ids::{ClientOrderId, IdScheme};
use oco_core::levels::EntryLevels;
use oco_core::model::{EntryKind, EntryTags, NewEntry, OrderSize, ProtectionConfig};
use oco_core::ports::{
    ApiCredentials, Clock, Exchange, Leases, NewAccount, OrderRequest, Side, Store, Users,
};
use oco_core::protect::{Protector, ProtectorConfig};
use oco_core::{AccountId, Qty, SystemClock};
use rust_decimal::Decimal;
use secrecy::SecretString;
use serde::Deserialize;
use store_pg::testing::TestDb;
use store_pg::{PgConfig, PgStore, SecretKey};
use sync::{Reconciler, SyncConfig};
use tokio::sync::oneshot;
use ws_gateway::{Gateway, GatewayConfig, GatewayStats};

const KEY_HEX: &str = "0909090909090909090909090909090909090909090909090909090909090909";
const OCO_PATH: &str = "/api/v3/orderList/oco";
const SYMBOL: &str = "BTCUSDT";
const PRICE: i64 = 60_000;
/// 0.001 BTC: two legs of 0.0005 (the default split), each above the minimum notional.
fn qty() -> Decimal {
    Decimal::new(1, 3)
}

// ---------------------------------------------------------------- settings

struct Plan {
    quick: bool,
    baseline: usize,
    /// Entries per layer in the latency part.
    per_layer: usize,
    /// Paced rate of the websocket-latency fills (well below saturation).
    ws_rate: u64,
    tiers: Vec<usize>,
    tier_fills: usize,
    /// Placements in flight at once in the throughput part.
    in_flight: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let list = |name: &str, default: &[usize]| -> Vec<usize> {
            std::env::var(name)
                .ok()
                .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_else(|| default.to_vec())
        };
        let num = |name: &str, default: usize| -> usize {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        if quick {
            Plan {
                quick,
                baseline: 50,
                per_layer: 20,
                ws_rate: 50,
                tiers: list("BENCH_TIERS", &[10, 50]),
                tier_fills: num("BENCH_TIER_FILLS", 50),
                in_flight: 16,
            }
        } else {
            Plan {
                quick,
                baseline: 300,
                per_layer: 200,
                ws_rate: 50,
                tiers: list("BENCH_TIERS", &[100, 1000, 10_000]),
                tier_fills: num("BENCH_TIER_FILLS", 1000),
                in_flight: 32,
            }
        }
    }
}

// ---------------------------------------------------------------- the simulator, as a child process

fn api_key(i: usize) -> String {
    format!("key-{i}")
}

fn creds(i: usize) -> ApiCredentials {
    ApiCredentials {
        api_key: api_key(i),
        secret: SecretString::from(format!("secret-{i}")),
    }
}

/// Child mode: a simulator with the baseline account and `n` others, the
/// admin API on, its address on stdout; it exits when stdin closes (the
/// parent ended or dropped it).
fn serve_sim(n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut config = SimConfig::new("127.0.0.1:0".parse().unwrap())
            .with_admin(true)
            .with_request_log_capacity(200_000)
            .with_account(AccountSpec::new(
                "key-base",
                "secret-base",
                vec![("USDT".into(), Decimal::from(10_000_000))],
            ));
        for i in 0..n {
            config = config.with_account(AccountSpec::new(
                api_key(i),
                format!("secret-{i}"),
                vec![("USDT".into(), Decimal::from(100_000))],
            ));
        }
        let sim = Sim::start(config).await.unwrap();
        sim.control()
            .set_price(SYMBOL, Decimal::from(PRICE))
            .unwrap();
        println!("{}", sim.addr());
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .unwrap();
    });
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TradeRow {
    api_key: String,
    symbol: String,
    order_list_id: i64,
    is_buyer: bool,
    time_us: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestRow {
    seq: u64,
    method: String,
    path: String,
    api_key: Option<String>,
    received_us: u64,
    responded_us: u64,
    status: u16,
}

struct ChildSim {
    child: Child,
    addr: String,
    http: reqwest::Client,
}

impl ChildSim {
    fn start(n: usize) -> ChildSim {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--serve-sim")
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        ChildSim {
            child,
            addr: line.trim().to_owned(),
            http: reqwest::Client::new(),
        }
    }

    fn binance(&self) -> BinanceConfig {
        let mut c = BinanceConfig::custom(
            format!("http://{}", self.addr),
            format!("ws://{}/ws-api/v3", self.addr),
        );
        // The sim does not limit here; neither does the adapter.
        c.pacing.weight_per_minute = u32::MAX / 2;
        c.pacing.orders_per_10s = u32::MAX / 2;
        c.pacing.orders_per_day = u32::MAX / 2;
        c.stream.connect_attempts = u32::MAX / 2;
        c.stream.connect_burst = u32::MAX / 2;
        c
    }

    async fn admin<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.http
            .get(format!("http://{}/admin/{path}", self.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Every trade, or one account's.
    async fn trades(&self, key: Option<&str>) -> Vec<TradeRow> {
        match key {
            Some(k) => self.admin(&format!("trades?apiKey={k}")).await,
            None => self.admin("trades").await,
        }
    }

    /// The request log from `since` (its `seq`) on.
    async fn requests(&self, since: u64) -> Vec<RequestRow> {
        self.admin(&format!("requests?sinceSeq={since}")).await
    }

    /// The `seq` the next request will have.
    async fn next_seq(&self) -> u64 {
        self.requests(0).await.last().map_or(0, |r| r.seq + 1)
    }

    fn rss_kib(&self) -> u64 {
        rss_kib_of(&self.child.id().to_string())
    }
}

impl Drop for ChildSim {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

// ---------------------------------------------------------------- a world: sim + database + accounts

struct World {
    sim: ChildSim,
    db: TestDb,
    store: Arc<PgStore>,
    placer: Arc<BinanceExchange>,
    accounts: Vec<AccountId>,
    ids: IdScheme,
}

fn pg_config(db: &TestDb, pool: usize) -> PgConfig {
    db.config_with_key(pool, SecretKey::parse(KEY_HEX).unwrap())
}

async fn world(n: usize) -> World {
    let sim = ChildSim::start(n);
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(pg_config(&db, 16)).await.unwrap());
    // Accounts are created 16 at a time: durable inserts, each waiting on a WAL flush.
    let mut made: Vec<(usize, AccountId)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let a = store
                    .create_account(NewAccount {
                        owner: "bench".into(),
                        exchange: "binance".into(),
                        credentials: creds(i),
                        protection: ProtectionConfig::DEFAULT,
                    })
                    .await
                    .unwrap();
                (i, a.id)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    made.sort_unstable();
    let placer = Arc::new(BinanceExchange::new(sim.binance()).unwrap());
    World {
        sim,
        db,
        store,
        placer,
        accounts: made.into_iter().map(|(_, id)| id).collect(),
        ids: IdScheme::new("og").unwrap(),
    }
}

/// Per account among `keys`: its entry's trade time and the answer time of its
/// second OCO list (µs, sim clock). Accounts not yet protected are missing.
struct Times {
    trade: HashMap<String, u64>,
    protected: HashMap<String, (u64, u64)>,
}

async fn times(sim: &ChildSim, keys: &[String], since: u64) -> Times {
    let want: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut trade = HashMap::new();
    let one = if keys.len() == 1 {
        Some(keys[0].as_str())
    } else {
        None
    };
    for t in sim.trades(one).await {
        if t.symbol == SYMBOL
            && t.is_buyer
            && t.order_list_id == -1
            && want.contains(t.api_key.as_str())
        {
            let e = trade.entry(t.api_key).or_insert(t.time_us);
            *e = (*e).min(t.time_us);
        }
    }
    let mut lists: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for r in sim.requests(since).await {
        if r.method == "POST"
            && r.path == OCO_PATH
            && r.status == 200
            && let Some(k) = r.api_key.filter(|k| want.contains(k.as_str()))
        {
            lists
                .entry(k)
                .or_default()
                .push((r.received_us, r.responded_us));
        }
    }
    let protected = lists
        .into_iter()
        .filter_map(|(k, mut v)| {
            v.sort_unstable();
            v.get(1).map(|&second| (k, second))
        })
        .collect();
    Times { trade, protected }
}

/// Polls until every account in `keys` has its two lists (requests from
/// `since` on), or `limit` passes. The poll period does not enter the
/// figures: those are the exchange's own timestamps.
async fn wait_protected(sim: &ChildSim, keys: &[String], since: u64, limit: Duration) -> Times {
    let deadline = Instant::now() + limit;
    let every = Duration::from_millis(if keys.len() == 1 { 10 } else { 100 });
    loop {
        let t = times(sim, keys, since).await;
        if t.protected.len() >= keys.len() || Instant::now() >= deadline {
            return t;
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------- statistics

/// Sorted µs samples.
struct Sample(Vec<u64>);

impl Sample {
    fn new(mut v: Vec<u64>) -> Sample {
        v.sort_unstable();
        Sample(v)
    }

    /// Nearest-rank percentile, ms.
    fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1] as f64 / 1000.0
    }
}

// ---------------------------------------------------------------- the layers

struct Task<T> {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<T>,
}

impl<T> Task<T> {
    async fn stop(self) -> T {
        let _ = self.stop.send(());
        self.handle.await.unwrap()
    }
}

async fn until(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

async fn start_gateway(
    w: &World,
    max_accounts: usize,
) -> (
    Task<Result<(), ws_gateway::GatewayError>>,
    Arc<GatewayStats>,
) {
    // Its own pool and clients, as a separate process would have.
    let store = Arc::new(PgStore::connect(pg_config(&w.db, 8)).await.unwrap());
    let cfg = w.sim.binance();
    let protector = Arc::new(Protector::new(
        Arc::new(BinanceExchange::new(cfg.clone()).unwrap()),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(w.ids.clone()),
    ));
    // Standard leases (30 s, renewed every 10 s): the first renewal tick
    // acquires every account at once, and a faster renewal would load the
    // database with lease updates no production gateway makes.
    let mut config = GatewayConfig::standard("bench-gw");
    config.max_accounts = max_accounts;
    config.min_backoff = Duration::from_millis(50);
    let gateway = Gateway::new(
        store.clone(),
        store as Arc<dyn Leases>,
        Arc::new(BinanceUserStream::new(cfg).unwrap()),
        protector,
        config,
    );
    let stats = gateway.stats();
    let (stop, stopped) = oneshot::channel();
    let handle = tokio::spawn(gateway.run(until(stopped)));
    (Task { stop, handle }, stats)
}

async fn wait_streams(stats: &GatewayStats, n: usize, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    while stats.streams_up.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stats.streams_up.load(Ordering::Relaxed)
}

/// (0) The bare round trip: a MARKET BUY through the adapter, timed at the client.
async fn baseline(w: &World, n: usize) -> Sample {
    let c = ApiCredentials {
        api_key: "key-base".into(),
        secret: SecretString::from("secret-base".to_owned()),
    };
    let size = OrderSize::Base(Qty::new(qty()).unwrap());
    let mut us = Vec::with_capacity(n);
    for k in 0..n + 20 {
        let req = OrderRequest {
            symbol: SYMBOL.into(),
            side: Side::Buy,
            limit: None,
            size,
            client_id: ClientOrderId::new(format!("base-{k}")).unwrap(),
        };
        let t = Instant::now();
        w.placer.place_order(&c, &req).await.unwrap();
        if k >= 20 {
            us.push(t.elapsed().as_micros() as u64); // the first 20 warm the pool
        }
    }
    Sample::new(us)
}

struct LayerResult {
    name: &'static str,
    measured: usize,
    wanted: usize,
    latency: Sample,
    note: String,
}

fn fill_to_protected(t: &Times, keys: &[String]) -> Vec<u64> {
    keys.iter()
        .filter_map(|k| Some(t.protected.get(k)?.1.saturating_sub(*t.trade.get(k)?)))
        .collect()
}

/// (1) direct: MARKET entries through the HTTP API, protected from the order's own response.
async fn direct(w: &World, range: std::ops::Range<usize>) -> LayerResult {
    let store = Arc::new(PgStore::connect(pg_config(&w.db, 8)).await.unwrap());
    let token = api::new_token();
    store
        .create_user("bench", &api::hash_token(&token))
        .await
        .unwrap();
    let state = api_bin::app_state(
        store,
        Arc::new(BinanceExchange::new(w.sim.binance()).unwrap()),
        Arc::new(SystemClock),
        "og",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let handle = tokio::spawn(api_bin::serve(listener, state, until(stopped)));
    let server = Task { stop, handle };

    let http = reqwest::Client::new();
    let mut round_trips = Vec::new();
    for i in range.clone() {
        let body = serde_json::json!({
            "account": w.accounts[i].0, "symbol": SYMBOL, "type": "MARKET",
            "quantity": qty().to_string(), "tp": [(PRICE + 600).to_string()],
        });
        let t = Instant::now();
        let reply = http
            .post(format!("{base}/entries"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(reply.status().is_success(), "{:?}", reply.text().await);
        round_trips.push(t.elapsed().as_micros() as u64);
    }
    server.stop().await.unwrap();
    let keys: Vec<String> = range.clone().map(api_key).collect();
    let t = times(&w.sim, &keys, 0).await;
    let rt = Sample::new(round_trips);
    LayerResult {
        name: "direct (api protects a MARKET entry from its own response)",
        measured: t.protected.len(),
        wanted: keys.len(),
        latency: Sample::new(fill_to_protected(&t, &keys)),
        note: format!(
            "POST /v1/entries round trip p50 {:.2} ms, p99 {:.2} ms",
            rt.ms(50.0),
            rt.ms(99.0)
        ),
    }
}

/// (2) sync: fills nobody streamed, found by a flag (`flagged`) and by a full pass (`passed`).
async fn sync_layer(
    w: &World,
    flagged: std::ops::Range<usize>,
    passed: std::ops::Range<usize>,
) -> (LayerResult, LayerResult) {
    for i in flagged.clone().chain(passed.clone()) {
        unprotected_buy(w, i).await.unwrap();
    }
    let store = Arc::new(PgStore::connect(pg_config(&w.db, 8)).await.unwrap());
    let mut config = SyncConfig::standard();
    // Only the flag poll runs on its own; the full pass is called below.
    config.startup_delay = Duration::from_secs(3600);
    // The sim does not limit; the bench measures work, not the weight budget.
    config.weight_budget_per_minute = u32::MAX / 2;
    let reconciler = Arc::new(Reconciler::wired(
        Arc::new(BinanceExchange::new(w.sim.binance()).unwrap()),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(w.ids.clone()),
        config,
    ));
    // As the binaries wire it: each flag's notification wakes the flag loop.
    let ringer = store_pg::ring_on_flags(store.clone(), reconciler.flag_bell());
    let (stop, stopped) = oneshot::channel();
    let handle = {
        let r = reconciler.clone();
        tokio::spawn(async move { r.run(until(stopped)).await })
    };
    let running = Task { stop, handle };

    // Flags, as the gateway raises them after a gap or a refused placement:
    // one account at a time, each protected before the next is flagged, so
    // that the figure is one flag's latency, not a queue's.
    let flag_keys: Vec<String> = flagged.clone().map(api_key).collect();
    let (mut from_flag, mut from_fill) = (Vec::new(), Vec::new());
    for (k, i) in flagged.clone().enumerate() {
        // Each flag would otherwise come just after the poll that protected the
        // previous one, a whole period before the next poll: spread the flags
        // over the period as independent ones would be.
        tokio::time::sleep(Duration::from_millis((k as u64 * 97) % 250)).await;
        let key = [api_key(i)];
        let since = w.sim.next_seq().await;
        let flagged_at = now_us();
        store
            .flag_reconcile(w.accounts[i], "bench", SystemClock.now())
            .await
            .unwrap();
        let t = wait_protected(&w.sim, &key, since, Duration::from_secs(10)).await;
        if let Some(&(_, done)) = t.protected.get(&key[0]) {
            from_flag.push(done.saturating_sub(flagged_at));
            from_fill.extend(fill_to_protected(&t, &key));
        }
    }
    let flag_result = LayerResult {
        name: "sync, flagged account (from the flag: woken by its notification, polled every 250 ms besides)",
        measured: from_flag.len(),
        wanted: flag_keys.len(),
        latency: Sample::new(from_flag),
        note: format!(
            "{} accounts flagged one at a time at spread phases of the poll, each protected before the next; the fills were placed before sync started (fill → protected p50 {:.0} ms: how long they waited)",
            flag_keys.len(),
            Sample::new(from_fill).ms(50.0)
        ),
    };

    let pass_keys: Vec<String> = passed.clone().map(api_key).collect();
    let since = w.sim.next_seq().await;
    let pass_start = now_us();
    let report = reconciler.pass().await.unwrap();
    let t = wait_protected(&w.sim, &pass_keys, since, Duration::from_secs(60)).await;
    let from_pass: Vec<u64> = pass_keys
        .iter()
        .filter_map(|k| Some(t.protected.get(k)?.1.saturating_sub(pass_start)))
        .collect();
    running.stop().await;
    drop(ringer);
    let pass_result = LayerResult {
        name: "sync, full pass finding the fills (from the pass start)",
        measured: t.protected.len(),
        wanted: pass_keys.len(),
        latency: Sample::new(from_pass),
        note: format!(
            "one pass over {} accounts ({} with a fill to protect, concurrency {}) took {:.2} s, weight {}",
            report.accounts,
            pass_keys.len(),
            reconciler.config().concurrency,
            report.elapsed.as_secs_f64(),
            report.weight_used
        ),
    };
    (flag_result, pass_result)
}

/// (3) websocket: fills placed directly, paced; the gateway sees them on the stream.
async fn websocket(w: &World, range: std::ops::Range<usize>, rate: u64) -> LayerResult {
    let (gw, stats) = start_gateway(w, w.accounts.len()).await;
    let up = wait_streams(&stats, w.accounts.len(), Duration::from_secs(60)).await;
    let keys: Vec<String> = range.clone().map(api_key).collect();
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = tokio::time::Instant::now();
    let mut pending = Vec::new();
    for (k, i) in range.clone().enumerate() {
        tokio::time::sleep_until(start + period * k as u32).await;
        pending.push(unprotected_buy(w, i));
    }
    for p in futures_util::future::join_all(pending).await {
        p.unwrap();
    }
    let t = wait_protected(&w.sim, &keys, 0, Duration::from_secs(60)).await;
    let s = stats.snapshot();
    gw.stop().await.unwrap();
    LayerResult {
        name: "websocket (gateway sees the fill on the stream)",
        measured: t.protected.len(),
        wanted: keys.len(),
        latency: Sample::new(fill_to_protected(&t, &keys)),
        note: format!(
            "{up} streams open, fills paced at {rate}/s; gateway: {} failures, {} gaps",
            s.failures, s.gaps
        ),
    }
}

/// A MARKET BUY as the API would send it, but with nobody protecting it: the
/// entry stored under our client id, then placed through the adapter. Started
/// now, awaited by the caller (a pacing loop must not wait on it).
fn unprotected_buy(w: &World, i: usize) -> tokio::task::JoinHandle<()> {
    let (store, placer, ids, account) = (
        w.store.clone(),
        w.placer.clone(),
        w.ids.clone(),
        w.accounts[i],
    );
    tokio::spawn(async move {
        let size = OrderSize::Base(Qty::new(qty()).unwrap());
        let entry = store
            .create_entry(
                NewEntry {
                    account,
                    symbol: placer.symbol_rules(SYMBOL).await.unwrap().symbol,
                    kind: EntryKind::Market,
                    size,
                    levels: EntryLevels::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
                },
                &move |id| ids.entry(id).unwrap(),
                SystemClock.now(),
            )
            .await
            .unwrap();
        placer
            .place_order(
                &creds(i),
                &OrderRequest {
                    symbol: SYMBOL.into(),
                    side: Side::Buy,
                    limit: None,
                    size,
                    client_id: entry.client_id.clone(),
                },
            )
            .await
            .unwrap();
    })
}

// ---------------------------------------------------------------- throughput

struct TierResult {
    accounts: usize,
    streams: u64,
    opened_in: Duration,
    fills: usize,
    protected: usize,
    offered_per_s: f64,
    protected_per_s: f64,
    latency: Sample,
    gw_rss_per_stream_kib: f64,
    sim_rss_per_stream_kib: f64,
    setup: Duration,
    failures: u64,
}

async fn tier(n: usize, plan: &Plan) -> TierResult {
    let t0 = Instant::now();
    let w = world(n).await;
    let setup = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (own_before, sim_before) = (rss_kib_of("self"), w.sim.rss_kib());
    let t = Instant::now();
    let (gw, stats) = start_gateway(&w, n).await;
    let streams = wait_streams(&stats, n, Duration::from_secs(180)).await;
    let opened_in = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (own_after, sim_after) = (rss_kib_of("self"), w.sim.rss_kib());
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / streams.max(1) as f64;

    // One fill on each of `fills` accounts spread over the streamed ones, as fast
    // as `in_flight` placers go: the offered load exceeds what is protected.
    let fills = plan.tier_fills.min(n);
    let chosen: Vec<usize> = (0..fills).map(|k| k * n / fills).collect();
    let keys: Vec<String> = chosen.iter().copied().map(api_key).collect();
    futures_util::stream::iter(chosen.clone())
        .map(|i| unprotected_buy(&w, i))
        .buffer_unordered(plan.in_flight)
        .for_each(|r| async move { r.unwrap() })
        .await;
    let limit = Duration::from_secs(30 + fills as u64 / 20);
    let times = wait_protected(&w.sim, &keys, 0, limit).await;
    let failures = stats.snapshot().failures;
    gw.stop().await.unwrap();

    let trades: Vec<u64> = times.trade.values().copied().collect();
    let (first, last) = (
        trades.iter().copied().min().unwrap_or(0),
        trades.iter().copied().max().unwrap_or(0),
    );
    let last_protected = times.protected.values().map(|p| p.1).max().unwrap_or(0);
    let secs = |a: u64, b: u64| (b.saturating_sub(a) as f64 / 1e6).max(1e-6);
    TierResult {
        accounts: n,
        streams,
        opened_in,
        fills: trades.len(),
        protected: times.protected.len(),
        offered_per_s: trades.len().saturating_sub(1) as f64 / secs(first, last),
        protected_per_s: times.protected.len() as f64 / secs(first, last_protected),
        latency: Sample::new(fill_to_protected(&times, &keys)),
        gw_rss_per_stream_kib: per(own_before, own_after),
        sim_rss_per_stream_kib: per(sim_before, sim_after),
        setup,
        failures,
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--serve-sim") {
        let n = args.get(at + 1).and_then(|v| v.parse().ok()).unwrap_or(0);
        serve_sim(n);
        return;
    }
    // reqwest is built without a default TLS provider; the adapter installs ring the same way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(Plan::from_env()));
}

async fn run(plan: Plan) {
    let t0 = Instant::now();
    let l = plan.per_layer;
    eprintln!(
        "suite: {} mode; latency world of {} accounts, tiers {:?}, {} fills per tier",
        if plan.quick { "quick" } else { "full" },
        3 * l,
        plan.tiers,
        plan.tier_fills
    );
    let w = world(3 * l).await;
    let base = baseline(&w, plan.baseline).await;
    eprintln!("baseline done ({:?})", t0.elapsed());
    let direct = direct(&w, 0..l).await;
    eprintln!("direct done ({:?})", t0.elapsed());
    let (flag, pass) = sync_layer(&w, l..l + l / 2, l + l / 2..2 * l).await;
    eprintln!("sync done ({:?})", t0.elapsed());
    let ws = websocket(&w, 2 * l..3 * l, plan.ws_rate).await;
    eprintln!("websocket done ({:?})", t0.elapsed());
    drop(w);

    let mut tiers = Vec::new();
    for &n in &plan.tiers {
        let r = tier(n, &plan).await;
        eprintln!(
            "tier {n}: {} streams in {:.1} s, {}/{} protected ({:?})",
            r.streams,
            r.opened_in.as_secs_f64(),
            r.protected,
            r.fills,
            t0.elapsed()
        );
        tiers.push(r);
    }

    println!();
    println!(
        "ocoguard bench suite ({} mode) — exchange-sim (child process) + PostgreSQL + layers on 127.0.0.1",
        if plan.quick { "quick" } else { "full" }
    );
    println!();
    println!("| measure | measured | p50 ms | p99 ms | p50 / baseline p50 | p99 / baseline p99 |");
    println!("|---|---|---|---|---|---|");
    let (b50, b99) = (base.ms(50.0), base.ms(99.0));
    println!(
        "| baseline: MARKET BUY round trip to the sim (client side) | {} | {b50:.3} | {b99:.3} | 1.0 | 1.0 |",
        base.0.len()
    );
    for r in [&direct, &ws, &flag, &pass] {
        let (p50, p99) = (r.latency.ms(50.0), r.latency.ms(99.0));
        println!(
            "| fill → protected, {} | {}/{} | {p50:.3} | {p99:.3} | {:.1} | {:.1} |",
            r.name,
            r.measured,
            r.wanted,
            p50 / b50,
            p99 / b99
        );
    }
    println!();
    for r in [&direct, &ws, &flag, &pass] {
        println!("- {}: {}", r.name, r.note);
    }
    println!();
    println!(
        "| accounts streamed | streams up in | fills | protected | offered fills/s | protected fills/s | p50 ms | p99 ms | p50 / baseline p50 | gateway RSS per stream | sim RSS per stream | setup |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &tiers {
        let (p50, p99) = (r.latency.ms(50.0), r.latency.ms(99.0));
        println!(
            "| {} | {} in {:.1} s | {} | {} | {:.0} | {:.0} | {p50:.1} | {p99:.1} | {:.0} | {:.1} KiB | {:.1} KiB | {:.1} s |",
            r.accounts,
            r.streams,
            r.opened_in.as_secs_f64(),
            r.fills,
            r.protected,
            r.offered_per_s,
            r.protected_per_s,
            p50 / b50,
            r.gw_rss_per_stream_kib,
            r.sim_rss_per_stream_kib,
            r.setup.as_secs_f64()
        );
        if r.failures > 0 {
            println!(
                "  (tier {}: gateway reported {} failures)",
                r.accounts, r.failures
            );
        }
    }
    println!();
    println!("whole run {:.1} s", t0.elapsed().as_secs_f64());
}
