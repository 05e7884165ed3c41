//! Fill event → both protective legs acknowledged by the exchange, through the
//! real gateway: `exchange-sim` over real HTTP/WebSocket on 127.0.0.1, the
//! real Binance adapter, PostgreSQL (`TestDb`, `DATABASE_URL`) as the store.
//! Printed side by side with the simulator's bare order round trip, and the
//! RSS of the process with 1,000 open account streams. See BENCH.md.
//!
//! `BENCH_ACCOUNTS` (default 1000) sizes it; `BENCH_RATES` (default
//! `100,250,1000`, at most three rates: one symbol each) sets the paced fill rates.
//! `BENCH_DB_DELAY_US` (default 0) puts that one-way delay on the gateway's
//! link to PostgreSQL (a proxy in this process), as for a database on
//! another host; the link's `SELECT 1` and durable-commit round trips are
//! printed beside the order round trip either way. `BENCH_ENTRIES=limit`
//! fills resting LIMIT entries, accepted before the run, as the price comes
//! down to each (default `market`: MARKET entries, accepted and filled at once,
//! stored before the timed part). `BENCH_ENTRIES=market-now` stores each MARKET
//! entry in the timed part right before sending it, as the API does, so that
//! its read ahead by the gateway races its fill.
//! `BENCH_CPU_WAKEUP_US` holds the machine's CPU wake-up latency at that many
//! µs for the run (`ws_gateway::wakeup`; needs write access to the device), as the gateway's
//! `--cpu-wakeup-latency-us` does.
#![allow(clippy::unwrap_used, missing_docs)] // a bench that cannot unwrap has failed

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream};
use exchange_sim::{AccountSpec, Sim, SimConfig, SimControl};
use oco_core::ids::IdScheme;
use oco_core::levels::EntryLevels;
use oco_core::model::{Entry, EntryKind, EntryTags, NewEntry, OrderSize, ProtectionConfig};
use oco_core::ports::{
    ApiCredentials, Clock, Exchange, Leases, NewAccount, OrderRequest, Side, Store,
};
use oco_core::protect::{Protector, ProtectorConfig};
use oco_core::{AccountId, EntryId, Price, Qty, SystemClock};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;
use store_pg::testing::TestDb;
use store_pg::{PgConfig, PgStore, SecretKey};
use tokio::sync::oneshot;
use ws_gateway::{CpuWakeupLatency, Gateway, GatewayConfig, GatewayStats};

const KEY_HEX: &str = "0707070707070707070707070707070707070707070707070707070707070707";
const BASELINE_REQUESTS: usize = 300;
const OCO_PATH: &str = "/api/v3/orderList/oco";
/// One symbol per rate: an account holds at most 5 untriggered stops per
/// symbol, and an entry's two lists hold two. Prices high enough that
/// `BENCH_ENTRIES=limit`'s walk down (one 0.01 step per account) stays far
/// above the first entries' stops (1 % under their fills).
const SYMBOLS: [(&str, Decimal, Decimal); 3] = [
    ("BTCUSDT", dec!(60000), dec!(0.001)),
    ("ETHUSDT", dec!(3000), dec!(0.02)),
    ("BNBUSDT", dec!(6000), dec!(0.01)),
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_rates() -> Vec<u64> {
    std::env::var("BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 250, 1000])
        .into_iter()
        .take(SYMBOLS.len())
        .collect()
}

fn api_key(i: usize) -> String {
    format!("key-{i}")
}

fn creds(i: usize) -> ApiCredentials {
    ApiCredentials {
        api_key: api_key(i),
        secret: SecretString::from(format!("secret-{i}")),
    }
}

fn binance(sim: &Sim) -> BinanceConfig {
    unpaced(BinanceConfig::custom(sim.base_url(), sim.ws_api_url()))
}

fn unpaced(mut c: BinanceConfig) -> BinanceConfig {
    // The sim does not limit here; neither does the adapter.
    c.pacing.weight_per_minute = u32::MAX / 2;
    c.pacing.orders_per_10s = u32::MAX / 2;
    c.pacing.orders_per_day = u32::MAX / 2;
    c.stream.connect_attempts = u32::MAX / 2;
    c.stream.connect_burst = u32::MAX / 2;
    c
}

fn pg_config(db: &TestDb, pool: usize) -> PgConfig {
    db.config_with_key(pool, SecretKey::parse(KEY_HEX).unwrap())
}

/// `url` with its host and port replaced by `addr`.
fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = rest.split_once('@').map_or(("", rest), |(u, r)| (u, r));
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    let at = if user.is_empty() { "" } else { "@" };
    format!("{scheme}://{user}{at}{addr}{path}")
}

/// The server `url` names, as a socket address.
fn server_of(url: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs as _;
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split('/').next().unwrap();
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    host.to_socket_addrs().unwrap().next().unwrap()
}

/// A TCP proxy to `target` that holds every chunk `delay` before passing it
/// on, each way, without limiting throughput: a database on another host.
/// OS threads with blocking sockets, because their sleeps are precise to
/// tens of µs where the runtime's timer rounds to a millisecond.
fn delay_proxy(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(target) else {
                continue;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            delayed_pipe(client, server, delay);
            delayed_pipe(server2, client2, delay);
        }
    });
    addr
}

fn delayed_pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
    use std::io::{Read as _, Write as _};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

fn vm_rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Nearest-rank percentile of sorted µs values, in ms.
fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

struct World {
    sim: Sim,
    ctl: SimControl,
    db: TestDb,
    store: Arc<PgStore>,
    placer: Arc<BinanceExchange>,
    accounts: Vec<AccountId>,
    ids: IdScheme,
}

async fn world(n: usize) -> World {
    let mut config = SimConfig::new("127.0.0.1:0".parse().unwrap());
    // The baseline's account, unknown to the store (so not streamed).
    config = config.with_account(AccountSpec::new(
        "key-base",
        "secret-base",
        vec![("USDT".into(), dec!(1000000))],
    ));
    for i in 0..n {
        config = config.with_account(AccountSpec::new(
            api_key(i),
            format!("secret-{i}"),
            vec![("USDT".into(), dec!(100000))],
        ));
    }
    let sim = Sim::start(config).await.unwrap();
    let ctl = sim.control();
    for (symbol, price, _) in SYMBOLS {
        ctl.set_price(symbol, price).unwrap();
    }
    let (db, store, accounts) = stored_accounts(n).await;
    let placer = Arc::new(BinanceExchange::new(binance(&sim)).unwrap());
    World {
        sim,
        ctl,
        db,
        store,
        placer,
        accounts,
        ids: IdScheme::new("og").unwrap(),
    }
}

/// A fresh database holding accounts `0..n`.
async fn stored_accounts(n: usize) -> (TestDb, Arc<PgStore>, Vec<AccountId>) {
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(pg_config(&db, 8)).await.unwrap());
    let mut accounts = Vec::with_capacity(n);
    for i in 0..n {
        let a = store
            .create_account(NewAccount {
                owner: format!("user-{i}"),
                exchange: "binance".into(),
                credentials: creds(i),
                protection: ProtectionConfig::DEFAULT,
            })
            .await
            .unwrap();
        accounts.push(a.id);
    }
    (db, store, accounts)
}

fn rss_kib_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_streams(stats: &GatewayStats, n: usize, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    while stats.streams_up.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stats.streams_up.load(Ordering::Relaxed)
}

/// RSS in KiB before and after `n` streams open, for this process and for the sim.
struct Rss {
    streams: u64,
    opened_in: Duration,
    own: (u64, u64),
    sim: (u64, u64),
}

/// (3) `n` streams against the `exchange-sim` binary run as a child process
/// (`target/<profile>/exchange-sim`, from `cargo build --release -p
/// exchange-sim-bin`), so that this process's growth is the gateway's alone.
async fn rss_with_child_sim(n: usize) -> Option<Rss> {
    use std::io::BufRead;
    let bin = std::env::current_exe()
        .ok()?
        .parent()?
        .parent()?
        .join("exchange-sim");
    if !bin.exists() {
        eprintln!(
            "{} missing: RSS measured with the sim in-process only",
            bin.display()
        );
        return None;
    }
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--listen").arg("127.0.0.1:0");
    for i in 0..n {
        cmd.arg("--account")
            .arg(format!("{}:secret-{i}:USDT=100000", api_key(i)));
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id().to_string();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take()?)
        .read_line(&mut line)
        .ok()?;
    let addr = line.trim().to_owned();
    let cfg = unpaced(BinanceConfig::custom(
        format!("http://{addr}"),
        format!("ws://{addr}/ws-api/v3"),
    ));
    let (db, _store, _) = stored_accounts(n).await;
    let ids = IdScheme::new("og").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = (vm_rss_kib(), rss_kib_of(&pid));
    let t = Instant::now();
    let gw = gateway(&db, None, &cfg, &ids, n).await;
    let streams = wait_streams(&gw.stats, n, Duration::from_secs(40)).await;
    let opened_in = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = (vm_rss_kib(), rss_kib_of(&pid));
    let _ = gw.stop.send(());
    let _ = gw.task.await;
    let _ = child.kill();
    let _ = child.wait();
    Some(Rss {
        streams,
        opened_in,
        own: (before.0, after.0),
        sim: (before.1, after.1),
    })
}

/// (1) The sim's bare round trip, from the client: MARKET BUYs one after the other.
async fn baseline(w: &World) -> Vec<u64> {
    let c = ApiCredentials {
        api_key: "key-base".into(),
        secret: SecretString::from("secret-base".to_owned()),
    };
    let size = OrderSize::Base(Qty::new(dec!(0.001)).unwrap());
    let mut us = Vec::with_capacity(BASELINE_REQUESTS);
    for k in 0..BASELINE_REQUESTS + 20 {
        let req = OrderRequest {
            symbol: "BTCUSDT".into(),
            side: Side::Buy,
            limit: None,
            size,
            client_id: oco_core::ids::ClientOrderId::new(format!("base-{k}")).unwrap(),
        };
        let t = Instant::now();
        w.placer.place_order(&c, &req).await.unwrap();
        let took = t.elapsed().as_micros() as u64;
        if k >= 20 {
            us.push(took); // the first 20 warm the connection pool
        }
    }
    us.sort_unstable();
    us
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ws_gateway::GatewayError>>,
    stats: Arc<GatewayStats>,
    store: Arc<PgStore>,
    /// Reads new entries ahead of their fills, as the binary does.
    _learner: store_pg::EntryLearner,
}

async fn gateway(
    db: &TestDb,
    db_url: Option<&str>,
    cfg: &BinanceConfig,
    ids: &IdScheme,
    max_accounts: usize,
) -> Running {
    let mut pg = pg_config(db, 8);
    if let Some(url) = db_url {
        pg.url = url.to_owned();
    }
    let store = Arc::new(PgStore::connect(pg).await.unwrap());
    // As the binary does at start.
    store.warm_up().await.unwrap();
    let learner = store_pg::learn_announced_entries(store.clone());
    let gw_store = store.clone();
    let exchange = BinanceExchange::new(cfg.clone()).unwrap();
    let streams = BinanceUserStream::new(cfg.clone()).unwrap();
    let protector = Arc::new(Protector::new(
        Arc::new(exchange),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(ids.clone()),
    ));
    let mut config = GatewayConfig::standard("gw-bench");
    // Leases renewed as deployed (every 10 s): renewing 1,000 of them is not free.
    config.max_accounts = max_accounts;
    config.min_backoff = Duration::from_millis(50);
    let gateway = Gateway::new(
        store.clone(),
        store as Arc<dyn Leases>,
        Arc::new(streams),
        protector,
        config,
    );
    let stats = gateway.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.run(async move {
        let _ = stopped.await;
    }));
    Running {
        stop,
        task,
        stats,
        store: gw_store,
        _learner: learner,
    }
}

/// A BUY of `qty` on `symbol` as the API stores it: with our client id, MARKET,
/// or LIMIT at `limit`; [`place`] sends it. Nobody calls `protect`.
async fn store_entry(
    store: Arc<PgStore>,
    placer: Arc<BinanceExchange>,
    ids: IdScheme,
    account: AccountId,
    (symbol, qty, limit): (&'static str, Decimal, Option<Decimal>),
) -> Entry {
    store
        .create_entry(
            NewEntry {
                account,
                symbol: placer.symbol_rules(symbol).await.unwrap().symbol,
                kind: limit.map_or(EntryKind::Market, |l| EntryKind::Limit {
                    price: Price::new(l).unwrap(),
                }),
                size: OrderSize::Base(Qty::new(qty).unwrap()),
                levels: EntryLevels::default(),
                tags: EntryTags::default(),
                idempotency_key: None,
            },
            &move |id| ids.entry(id).unwrap(),
            SystemClock.now(),
        )
        .await
        .unwrap()
}

/// Sends a stored entry under its client id through the adapter, as the API
/// does after storing it.
async fn place(placer: Arc<BinanceExchange>, i: usize, entry: Entry) -> EntryId {
    let limit = match entry.kind {
        EntryKind::Limit { price } => Some(price),
        EntryKind::Market => None,
    };
    placer
        .place_order(
            &creds(i),
            &OrderRequest {
                symbol: entry.symbol.name.clone(),
                side: Side::Buy,
                limit,
                size: entry.size,
                client_id: entry.client_id.clone(),
            },
        )
        .await
        .unwrap();
    entry.id
}

/// The entries of accounts `0..n` on `symbol`, stored 50 at a time.
async fn store_entries(
    w: &World,
    n: usize,
    (symbol, qty): (&'static str, Decimal),
    limit: impl Fn(usize) -> Option<Decimal>,
) -> Vec<Entry> {
    let mut stored = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let batch = chunk.iter().map(|&i| {
            store_entry(
                w.store.clone(),
                w.placer.clone(),
                w.ids.clone(),
                w.accounts[i],
                (symbol, qty, limit(i)),
            )
        });
        stored.extend(futures_util::future::join_all(batch).await);
    }
    stored
}

/// Which entries the bench fills: MARKET BUYs, accepted and filled in one
/// go, or resting LIMIT BUYs that the price comes down to later.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entries {
    Market,
    /// MARKET BUYs each stored right before it is sent, in the timed part.
    MarketNow,
    Limit,
}

fn env_entries() -> Entries {
    match std::env::var("BENCH_ENTRIES").as_deref() {
        Ok("limit") => Entries::Limit,
        Ok("market") | Err(_) => Entries::Market,
        Ok("market-now") => Entries::MarketNow,
        Ok(other) => panic!("BENCH_ENTRIES={other}: expected market, market-now or limit"),
    }
}

/// The limit of account `i`'s resting entry on a symbol trading at `price`:
/// one tick per account below it, so that each step of the price fills one.
fn limit_of(price: Decimal, i: usize) -> Decimal {
    price - LIMIT_STEP * Decimal::from(i + 1)
}

/// Well above every symbol's tick size.
const LIMIT_STEP: Decimal = dec!(0.01);

/// Polled every 20 ms while the gateway catches up: a count, not a copy of
/// every list under the sim's lock, so that the polling does not hold up
/// the placements it waits for.
fn executing_lists(ctl: &SimControl) -> usize {
    ctl.executing_list_count()
}

struct RateResult {
    target: u64,
    fills: usize,
    /// Fills per second as the exchange saw them (first to last trade).
    placed_rate: f64,
    /// Fills per second protected (first trade to last second OCO).
    protected_rate: f64,
    all_protected: bool,
    /// Trade → second OCO request received, µs, sorted.
    received: Vec<u64>,
    /// The slowest fills as (trade → second OCO received µs, trade time µs
    /// since the epoch), slowest first: `BENCH_SLOWEST` of them.
    slowest: Vec<(u64, u64)>,
    /// Trade → second OCO answered, µs, sorted.
    answered: Vec<u64>,
    /// `received` of the fills traded [`SETTLED_AFTER_US`] or more after the
    /// first: without the first fills of a symbol in the process (its rules
    /// fetched, connections to the exchange opened).
    settled: Vec<u64>,
}

/// See [`RateResult::settled`].
const SETTLED_AFTER_US: u64 = 300_000;

/// (2) `n` fills on `symbol`, one per account, paced at `rate` per second.
async fn paced(
    w: &World,
    entries: Entries,
    rate: u64,
    (symbol, price, qty): (&'static str, Decimal, Decimal),
    n: usize,
) -> RateResult {
    // Every entry stored before the timed part, as the API stores each
    // before placing it: the timed part offers only the orders (MARKET) or
    // the price moves (LIMIT), so the load generator keeps up with the rate.
    let stored = match entries {
        Entries::Market => store_entries(w, n, (symbol, qty), |_| None).await,
        Entries::MarketNow => Vec::new(),
        Entries::Limit => {
            assert!(
                price - limit_of(price, n) <= price * dec!(0.005),
                "BENCH_ENTRIES=limit: {n} steps of {LIMIT_STEP} from {price} reach the first entries' stops; use fewer accounts"
            );
            store_entries(w, n, (symbol, qty), |i| Some(limit_of(price, i))).await
        }
    };
    if entries == Entries::Limit {
        // Every entry resting and accepted before the first fill.
        let mut ids = Vec::with_capacity(n);
        for chunk in stored.chunks(50) {
            let placed = futures_util::future::join_all(
                chunk
                    .iter()
                    .enumerate()
                    .map(|(k, e)| place(w.placer.clone(), ids.len() + k, e.clone())),
            )
            .await;
            ids.extend(placed);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for id in ids {
            while w.store.entry(id).await.unwrap().status != oco_core::EntryStatus::New {
                assert!(Instant::now() < deadline, "entry {id} never accepted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    w.ctl.clear_requests();
    let lists_before = executing_lists(&w.ctl);
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    if entries == Entries::MarketNow {
        for i in 0..n {
            tokio::time::sleep_until(start + period * i as u32).await;
            let (store, placer, ids) = (w.store.clone(), w.placer.clone(), w.ids.clone());
            let account = w.accounts[i];
            tasks.push(tokio::spawn(async move {
                let entry =
                    store_entry(store, placer.clone(), ids, account, (symbol, qty, None)).await;
                place(placer, i, entry).await
            }));
        }
    }
    for (i, entry) in stored.into_iter().enumerate() {
        tokio::time::sleep_until(start + period * i as u32).await;
        match entries {
            Entries::Market => tasks.push(tokio::spawn(place(w.placer.clone(), i, entry))),
            Entries::MarketNow => unreachable!("stored in the timed part"),
            // The price comes down to the next resting entry, which fills.
            Entries::Limit => w.ctl.set_price(symbol, limit_of(price, i)).unwrap(),
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every entry gets two lists; wait for them (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut all_protected = false;
    while Instant::now() < deadline {
        if executing_lists(&w.ctl) >= lists_before + 2 * n {
            all_protected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The entry's trade time, per account (one entry per account on this symbol).
    let mut trade_us: HashMap<String, u64> = HashMap::new();
    for t in w.ctl.trades(None) {
        if t.symbol == symbol && t.is_buyer && t.order_list_id == -1 && t.api_key != "key-base" {
            let e = trade_us.entry(t.api_key.clone()).or_insert(t.time_us);
            *e = (*e).min(t.time_us);
        }
    }
    // The OCO list requests per account, in order of arrival.
    let mut ocos: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for r in w.ctl.requests() {
        if r.method == "POST"
            && r.path == OCO_PATH
            && r.status == 200
            && let Some(k) = r.api_key
        {
            ocos.entry(k)
                .or_default()
                .push((r.received_us, r.responded_us));
        }
    }
    let (mut received, mut answered, mut settled) = (Vec::new(), Vec::new(), Vec::new());
    let mut timed = Vec::new();
    let first_trade = trade_us.values().copied().min().unwrap_or(0);
    let (mut last_trade, mut last_oco) = (0, 0);
    for (key, &t) in &trade_us {
        last_trade = last_trade.max(t);
        let Some(list) = ocos.get_mut(key) else {
            continue;
        };
        list.sort_unstable();
        if let Some(&(rx, tx)) = list.get(1) {
            received.push(rx.saturating_sub(t));
            timed.push((rx.saturating_sub(t), t));
            answered.push(tx.saturating_sub(t));
            if t >= first_trade + SETTLED_AFTER_US {
                settled.push(rx.saturating_sub(t));
            }
            last_oco = last_oco.max(rx);
        }
    }
    received.sort_unstable();
    timed.sort_unstable_by(|a, b| b.cmp(a));
    timed.truncate(env_usize("BENCH_SLOWEST", 0));
    answered.sort_unstable();
    settled.sort_unstable();
    let span = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / 1e6;
    let fills = trade_us.len();
    RateResult {
        target: rate,
        fills,
        placed_rate: (fills.saturating_sub(1)) as f64 / span(first_trade, last_trade).max(1e-6),
        protected_rate: received.len() as f64 / span(first_trade, last_oco).max(1e-6),
        all_protected,
        received,
        slowest: timed,
        answered,
        settled,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let n = env_usize("BENCH_ACCOUNTS", 1000);
    let rates = env_rates();
    let entries = env_entries();
    // Held for the whole run, the baseline's round trips included, as
    // `--cpu-wakeup-latency-us` holds it for the gateway process.
    let wakeup = std::env::var("BENCH_CPU_WAKEUP_US").ok().map(|us| {
        let us = us.parse().expect("BENCH_CPU_WAKEUP_US: whole microseconds");
        CpuWakeupLatency::hold(Duration::from_micros(us)).unwrap()
    });
    let t0 = Instant::now();
    // (3) first, while this process is fresh.
    let child = rss_with_child_sim(n).await;
    if let Some(r) = &child {
        eprintln!("child sim: {} streams up in {:?}", r.streams, r.opened_in);
    }
    let w = world(n).await;
    eprintln!("setup: {n} accounts in {:?}", t0.elapsed());

    // (1) baseline
    let base = baseline(&w).await;
    let (b50, b99) = (pct_ms(&base, 50.0), pct_ms(&base, 99.0));
    // The gateway's link to the database, direct or through the delay.
    let delay = Duration::from_micros(env_usize("BENCH_DB_DELAY_US", 0) as u64);
    let db_url =
        (!delay.is_zero()).then(|| via(w.db.url(), delay_proxy(server_of(w.db.url()), delay)));
    let (select1, commit) =
        TestDb::round_trips(db_url.as_deref().unwrap_or(w.db.url()), BASELINE_REQUESTS).await;

    // (3) RSS with every account's stream open (the sim is in this process).
    let rss_before = vm_rss_kib();
    let t = Instant::now();
    let gw = gateway(&w.db, db_url.as_deref(), &binance(&w.sim), &w.ids, n).await;
    let streams = wait_streams(&gw.stats, n, Duration::from_secs(40)).await;
    let opened_in = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = vm_rss_kib();
    eprintln!(
        "{streams} streams up in {opened_in:?} (sim: {} subscriptions, {} connections)",
        w.ctl.subscription_count(),
        w.ctl.connection_count()
    );

    // (2) fill → both legs on the exchange, at paced rates
    let mut results = Vec::new();
    for (k, &rate) in rates.iter().enumerate() {
        let (symbol, _, _) = SYMBOLS[k];
        let r = paced(&w, entries, rate, SYMBOLS[k], n).await;
        let st = gw.stats.snapshot();
        eprintln!(
            "rate {rate}/s on {symbol}: {} fills, {} measured, all protected: {}; sim lists {}; gateway stats so far: {} entry fills, {} placements, {} failures",
            r.fills,
            r.received.len(),
            r.all_protected,
            w.ctl.order_lists(None).len(),
            st.entry_fills,
            st.placements,
            st.failures
        );
        results.push(r);
    }
    let rss_end = vm_rss_kib();
    let s = gw.stats.snapshot();
    let hints = gw.store.hint_stats();
    let _ = gw.stop.send(());
    let _ = gw.task.await;

    println!();
    println!(
        "ws-gateway latency bench — {n} accounts, {} entries, sim + gateway + PostgreSQL on 127.0.0.1; gateway ↔ database one-way delay {} µs; CPU wake-up latency {}",
        match entries {
            Entries::Market => "MARKET (accepted and filled together)",
            Entries::MarketNow => {
                "MARKET (each stored right before it is sent, accepted and filled together)"
            }
            Entries::Limit => "resting LIMIT (accepted first, filled as the price comes down)",
        },
        delay.as_micros(),
        match &wakeup {
            Some(held) => format!("held at {} µs", held.held().as_micros()),
            None => "as the machine has it".to_owned(),
        }
    );
    println!();
    println!(
        "| measure | n | p50 ms | p99 ms | p50 / baseline p50 | p99 vs baseline p99 + 2 ms | kept up |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| (1) baseline: MARKET BUY round trip (client side) | {} | {b50:.3} | {b99:.3} | 1.00 | — | — |",
        base.len()
    );
    for (what, v) in [
        (
            "`SELECT 1` round trip on the gateway's database link",
            &select1,
        ),
        (
            "durable commit round trip (WAL flush) on that link",
            &commit,
        ),
    ] {
        println!(
            "| (1) {what} | {} | {:.3} | {:.3} | {:.2} | — | — |",
            v.len(),
            pct_ms(v, 50.0),
            pct_ms(v, 99.0),
            pct_ms(v, 50.0) / b50
        );
    }
    let kept_up = |r: &RateResult| {
        r.all_protected
            && r.placed_rate >= 0.95 * r.target as f64
            && r.protected_rate >= 0.95 * r.placed_rate
    };
    for r in &results {
        for (what, v) in [
            ("second OCO received", &r.received),
            ("second OCO answered", &r.answered),
            ("second OCO received, after the first 0.3 s", &r.settled),
        ] {
            let (p50, p99) = (pct_ms(v, 50.0), pct_ms(v, 99.0));
            let target = b99 + 2.0;
            println!(
                "| (2) fill → {what}, target {}/s (placed {:.0}/s, protected {:.0}/s) | {} | {p50:.3} | {p99:.3} | {:.1} | {} ({:.3} ms) | {} |",
                r.target,
                r.placed_rate,
                r.protected_rate,
                v.len(),
                p50 / b50,
                if p99 <= target { "within" } else { "over" },
                target,
                if kept_up(r) { "yes" } else { "no" }
            );
        }
    }
    // The tail's shape: whether the p99 is a few outliers or a shifted bulk.
    println!();
    for r in &results {
        let v = &r.received;
        let bar_us = ((b99 + 2.0) * 1000.0) as u64;
        let over = v.iter().filter(|&&us| us > bar_us).count();
        println!(
            "tail of fill → second OCO received, {}/s: p90 {:.3} / p95 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms; {over} of {} over the bar ({:.1} %)",
            r.target,
            pct_ms(v, 90.0),
            pct_ms(v, 95.0),
            pct_ms(v, 99.0),
            pct_ms(v, 99.9),
            pct_ms(v, 100.0),
            v.len(),
            100.0 * over as f64 / v.len().max(1) as f64
        );
        // When the slowest were traded (UTC time of day), to set beside the
        // database's and the machine's logs.
        for &(us, at) in &r.slowest {
            let day_us = at % 86_400_000_000;
            println!(
                "  slow fill at {}/s: {:.3} ms, traded {:02}:{:02}:{:02}.{:06} UTC",
                r.target,
                us as f64 / 1000.0,
                day_us / 3_600_000_000,
                day_us / 60_000_000 % 60,
                day_us / 1_000_000 % 60,
                day_us % 1_000_000
            );
        }
    }
    let best = results
        .iter()
        .filter(|r| kept_up(r))
        .map(|r| r.target)
        .max();
    println!();
    println!(
        "highest paced rate kept up (placed ≥ 95 % of target, protected ≥ 95 % of placed): {}",
        best.map_or("none".to_owned(), |r| format!("{r} fills/s"))
    );
    println!();
    println!(
        "(3) in-process sim, VmRSS: {} MiB before the gateway, {} MiB with {streams} streams open (+{} MiB, {:.1} KiB per stream; sim share not separated, and pages freed by the child-sim phase are reused), {} MiB after the fills",
        rss_before / 1024,
        rss_after / 1024,
        rss_after.saturating_sub(rss_before) / 1024,
        rss_after.saturating_sub(rss_before) as f64 / streams.max(1) as f64,
        rss_end / 1024
    );
    if let Some(r) = &child {
        let d = |(a, b): (u64, u64)| b.saturating_sub(a);
        println!(
            "(3) sim as a child process, {} streams opened in {:.1} s: this process (gateway) {} → {} MiB (+{} MiB, {:.1} KiB per stream); sim process {} → {} MiB (+{} MiB, {:.1} KiB per stream)",
            r.streams,
            r.opened_in.as_secs_f64(),
            r.own.0 / 1024,
            r.own.1 / 1024,
            d(r.own) / 1024,
            d(r.own) as f64 / r.streams.max(1) as f64,
            r.sim.0 / 1024,
            r.sim.1 / 1024,
            d(r.sim) / 1024,
            d(r.sim) as f64 / r.streams.max(1) as f64,
        );
    }
    println!(
        "gateway stats: {} entry fills, {} placements, {} failures, {} gaps; first fills written without a read first: {} ({} stale hints); whole run {:?}",
        s.entry_fills,
        s.placements,
        s.failures,
        s.gaps,
        hints.used,
        hints.stale,
        t0.elapsed()
    );
}
