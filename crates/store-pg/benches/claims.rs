//! Claim + outcome round trips on local PostgreSQL at a paced 1,000
//! protections/s, next to a bare `SELECT 1` through the same pool in the same
//! run. Each protection claims one leg (`INSERT … ON CONFLICT DO NOTHING`)
//! and then records its outcome (compare-and-set `claimed → placed`).
//!
//! Every commit waits for PostgreSQL's WAL flush (`synchronous_commit = on`,
//! the production setting), so the figures are bounded below by the disk's
//! `fdatasync` time. For comparison the same load runs once more with
//! `synchronous_commit = off` on the bench's own connections: that isolates
//! the store's own cost and is never how the service runs.
//!
//! Run: `cargo bench -p store-pg --bench claims`
//! (needs `DATABASE_URL` or the default server; about 15 s).
// A bench binary: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl as _;
use oco_core::model::{EntryKind, EntryTags, LegClaim, LegUpdate, NewEntry, OrderSize};
use oco_core::ports::NewAccount;
use oco_core::{
    ApiCredentials, Asset, ClientOrderId, EntryId, LegIndex, LegKey, LegState, Millis,
    OcoClientIds, ProtectionConfig, Source, Store, Symbol,
};
use secrecy::SecretString;
use store_pg::PgStore;
use store_pg::testing::TestDb;

const RATE_PER_S: u64 = 1_000;
const SECONDS: u64 = 3;
const ENTRIES: u64 = 300;
const POOL: usize = 16;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run());
}

fn key(entry: EntryId, generation: u32) -> LegKey {
    LegKey {
        entry,
        leg: LegIndex::First,
        generation,
    }
}

fn claim(entry: EntryId, generation: u32) -> LegClaim {
    let id = |k: &str| ClientOrderId::new(format!("b-{k}-{entry}-1-{generation}")).unwrap();
    LegClaim {
        key: key(entry, generation),
        ids: OcoClientIds {
            list: id("L"),
            take_profit: id("T"),
            stop_loss: id("S"),
        },
        symbol: "BTCUSDT".into(),
        qty: "0.00512".parse().unwrap(),
        take_profit: "64123.45".parse().unwrap(),
        stop: "61999.01".parse().unwrap(),
        stop_limit: Some("61689.02".parse().unwrap()),
        source: Source::Websocket,
        at: Millis(1_700_000_000_000),
    }
}

struct Sample {
    claim: Duration,
    update: Duration,
    both: Duration,
}

/// The `per_cent` percentile of sorted samples (nearest rank, integer arithmetic).
fn pct(sorted: &[Duration], per_cent: usize) -> Duration {
    let i = ((sorted.len() - 1) * per_cent + 50) / 100;
    sorted[i.min(sorted.len() - 1)]
}

fn line(name: &str, mut xs: Vec<Duration>) -> (Duration, Duration) {
    xs.sort();
    let (p50, p99, max) = (pct(&xs, 50), pct(&xs, 99), *xs.last().unwrap());
    println!(
        "{name:<28} n={:<5} p50={:>7.1} µs  p99={:>7.1} µs  max={:>8.1} µs",
        xs.len(),
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        max.as_secs_f64() * 1e6
    );
    (p50, p99)
}

/// Starts one `job` every 1/RATE s for SECONDS s (late ticks start at once)
/// and collects what each returns.
async fn paced<T, F, Fut>(job: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let n = RATE_PER_S * SECONDS;
    let period = Duration::from_micros(1_000_000 / RATE_PER_S);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        tokio::time::sleep_until(start + period * i as u32).await;
        tasks.push(tokio::spawn(job(i)));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The store's entries, and how long each `create_entry` took (one at a time).
async fn setup(store: &PgStore) -> (Vec<EntryId>, Vec<Duration>) {
    let account = store
        .create_account(NewAccount {
            owner: "bench".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: format!("bench-key-{}", rand_suffix()),
                secret: SecretString::from("bench-secret"),
            },
            protection: ProtectionConfig::DEFAULT,
        })
        .await
        .unwrap();
    let mut entries = Vec::new();
    let mut took = Vec::new();
    for _ in 0..ENTRIES {
        let t = std::time::Instant::now();
        let e = store
            .create_entry(
                NewEntry {
                    account: account.id,
                    symbol: Symbol {
                        name: "BTCUSDT".into(),
                        base: Asset("BTC".into()),
                        quote: Asset("USDT".into()),
                    },
                    kind: EntryKind::Market,
                    size: OrderSize::Base("0.01".parse().unwrap()),
                    levels: Default::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
                },
                &|id| ClientOrderId::new(format!("b-E-{id}")).unwrap(),
                Millis(1),
            )
            .await
            .unwrap();
        took.push(t.elapsed());
        entries.push(e.id);
    }
    (entries, took)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn protect_once(store: &PgStore, entry: EntryId, generation: u32, list_id: i64) -> Sample {
    let t0 = Instant::now();
    assert!(
        store.claim_leg(&claim(entry, generation)).await.unwrap(),
        "fresh claim"
    );
    let t1 = Instant::now();
    let applied = store
        .update_leg(&LegUpdate {
            key: key(entry, generation),
            from: "claimed",
            to: LegState::Placed { list_id },
            error: None,
            at: Millis(1_700_000_000_001),
        })
        .await
        .unwrap();
    assert!(applied);
    let t2 = Instant::now();
    Sample {
        claim: t1 - t0,
        update: t2 - t1,
        both: t2 - t0,
    }
}

async fn select_1(store: &PgStore) -> Duration {
    let t0 = Instant::now();
    let mut conn = store.pool().get().await.unwrap();
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .unwrap();
    t0.elapsed()
}

/// Paced claims + outcomes on `store`; returns the claim+outcome p99.
async fn measure(label: &str, store: Arc<PgStore>, base50: Duration, base99: Duration) {
    let (entries, created) = setup(&store).await;
    let entries = Arc::new(entries);
    // Warm up: open the pool's connections and prepare the statements.
    let warm = (0..(2 * POOL as u64)).map(|i| protect_once(&store, entries[i as usize], 90_000, 0));
    futures_util::future::join_all(warm).await;
    // One at a time: the bare cost of the two round trips.
    let mut sequential = Vec::new();
    for i in 0..200u64 {
        sequential.push(
            protect_once(
                &store,
                entries[(i % ENTRIES) as usize],
                80_000 + (i / ENTRIES) as u32,
                0,
            )
            .await,
        );
    }
    let samples = {
        let store = Arc::clone(&store);
        paced(move |i| {
            let store = Arc::clone(&store);
            let entry = entries[(i % ENTRIES) as usize];
            async move { protect_once(&store, entry, (i / ENTRIES) as u32, i as i64).await }
        })
        .await
    };
    println!("-- {label}");
    // An entry is stored before its order is sent: the API's own wait.
    let (c50, c99) = line("create_entry, sequential", created);
    println!(
        "ratio to SELECT 1: create_entry p50 {:.1}x p99 {:.1}x",
        c50.as_secs_f64() / base50.as_secs_f64(),
        c99.as_secs_f64() / base99.as_secs_f64()
    );
    line(
        "claim + outcome, sequential",
        sequential.iter().map(|s| s.both).collect(),
    );
    let (c50, c99) = line("claim_leg", samples.iter().map(|s| s.claim).collect());
    let (u50, u99) = line(
        "update_leg (outcome)",
        samples.iter().map(|s| s.update).collect(),
    );
    let (b50, b99) = line("claim + outcome", samples.iter().map(|s| s.both).collect());
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "ratio to SELECT 1: claim p50 {:.1}x p99 {:.1}x; outcome p50 {:.1}x p99 {:.1}x; both p50 {:.1}x p99 {:.1}x",
        ratio(c50, base50),
        ratio(c99, base99),
        ratio(u50, base50),
        ratio(u99, base99),
        ratio(b50, base50),
        ratio(b99, base99)
    );
    let target = Duration::from_millis(1);
    println!(
        "1 ms p99 per round trip: claim {}, outcome {}",
        if c99 <= target { "met" } else { "MISSED" },
        if u99 <= target { "met" } else { "MISSED" },
    );
}

async fn run() {
    let db = TestDb::new().await;
    let key = store_pg::SecretKey::generate();
    let durable = Arc::new(
        PgStore::connect(db.config_with_key(POOL, key.clone()))
            .await
            .expect("connecting"),
    );
    let mut async_config = db.config_with_key(POOL, key);
    async_config
        .url
        .push_str("?options=-c%20synchronous_commit%3Doff");
    let async_commit = Arc::new(PgStore::connect(async_config).await.expect("connecting"));
    println!(
        "store-pg claims bench: {RATE_PER_S} protections/s for {SECONDS} s per run, pool {POOL}, 2 tokio workers, local PostgreSQL"
    );
    for _ in 0..(2 * POOL) {
        select_1(&durable).await;
    }
    let baseline = {
        let store = Arc::clone(&durable);
        paced(move |_| {
            let store = Arc::clone(&store);
            async move { select_1(&store).await }
        })
        .await
    };
    let (base50, base99) = line("baseline SELECT 1 (pooled)", baseline);
    measure(
        "synchronous_commit = on (production)",
        durable,
        base50,
        base99,
    )
    .await;
    measure(
        "synchronous_commit = off (comparison only: store cost without the WAL flush)",
        async_commit,
        base50,
        base99,
    )
    .await;
}
