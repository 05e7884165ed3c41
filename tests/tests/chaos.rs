//! The chaos run: N accounts, M entries, random price paths, and random
//! faults — `kill -9` and restart of `api`, `ws-gateway` and `sync`, stream
//! drops and stalls, 5xx-after-apply, 429s, and a restart of PostgreSQL (a
//! private cluster, never the shared server) — then a quiet period and the
//! invariants, checked against the store and the simulator's own view.
//!
//! Seeded (`CHAOS_SEED`, printed; `random` for a fresh one), bounded in time,
//! stops by itself. `CHAOS_SCALE=large` runs the larger configuration.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use e2e::sim::{SimList, SimOrder, SimTrade};
use e2e::{ApiClient, LayerSettings, Layers, PrivatePg, Proc, SimAdmin, SimProc, scratch_dir};
use oco_core::model::Protection;
use oco_core::ports::{Store, Users};
use oco_core::{AccountId, EntryId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::json;
use store_pg::{PgConfig, PgStore, SecretKey};
use tokio::task::JoinSet;

/// Longest a filled entry may wait, from its fill at the exchange to its
/// first protective list accepted there (or its exit order). Why 45 s:
/// a claimant killed between its claim and its send blocks the other layers
/// for the claim timeout (30 s, `ProtectorConfig::new`); then sync's next
/// pass (interval 2 s) or a flagged reconcile takes over; add the longest
/// outage a fault causes here (a process down up to 3 s, PostgreSQL down up
/// to 3 s, a stall up to 3 s, a lease TTL of 3 s) and 4 s of slack for a
/// loaded 2-core machine.
const UNPROTECTED_BOUND: Duration = Duration::from_secs(45);

const SYMBOLS: [(&str, &str, u32); 3] = [
    ("BTCUSDT", "0.01", 2),
    ("ETHUSDT", "0.1", 2),
    ("BNBUSDT", "0.5", 2),
];

#[derive(Debug, Clone, Copy)]
struct Scale {
    accounts: usize,
    gateways: u32,
    entries: usize,
    chaos: Duration,
    quiet_max: Duration,
}

impl Scale {
    fn from_env() -> (String, Scale) {
        let name = std::env::var("CHAOS_SCALE").unwrap_or_else(|_| "ci".into());
        let scale = match name.as_str() {
            "large" => Scale {
                accounts: 8,
                gateways: 2,
                entries: 200,
                chaos: Duration::from_secs(300),
                quiet_max: Duration::from_secs(90),
            },
            _ => Scale {
                accounts: 3,
                gateways: 1,
                entries: 36,
                chaos: Duration::from_secs(60),
                quiet_max: Duration::from_secs(75),
            },
        };
        (name, scale)
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("CHAOS_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SEED {text:?} is not a number or `random`")),
        Err(_) => 20_261_202,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillApi,
    KillGateway,
    KillSync,
    StreamDrop,
    StreamStall,
    Error5xxAfterApply,
    Throttle429,
    PgRestart,
}

const FAULTS: [Fault; 8] = [
    Fault::KillApi,
    Fault::KillGateway,
    Fault::KillSync,
    Fault::StreamDrop,
    Fault::StreamStall,
    Fault::Error5xxAfterApply,
    Fault::Throttle429,
    Fault::PgRestart,
];

/// What one tick draws for faults. Everything a fault could use is drawn on
/// every tick, fired or not, so that the faults' random stream does not
/// depend on which kinds were skipped (timing) and never shifts the prices
/// and entries, which have their own.
#[derive(Debug, Clone, Copy)]
struct FaultDraw {
    /// A fault fires on this tick (probability 1/8: every 2 s on average).
    fire: bool,
    /// The kind, once every kind was injected.
    random_kind: Fault,
    /// How long the target stays down (process, PostgreSQL, stall).
    outage: Duration,
    /// Which gateway a `KillGateway` kills (0-based).
    gateway: usize,
    /// A 5xx hits entry orders (`/api/v3/order`), else OCO lists.
    on_orders: bool,
    /// How many requests fail with a 5xx after being applied.
    failures: u32,
    /// How many requests get a 429.
    throttled: u32,
}

/// The faults' schedule: the first faults go through every kind once, in an
/// order shuffled from the seed, then kinds are drawn uniformly. A kind still
/// owed whose attempt was skipped (its target already down) goes to the back
/// of the queue and is tried again, so that every kind is injected in a run.
struct FaultSchedule {
    rng: StdRng,
    owed: VecDeque<Fault>,
}

impl FaultSchedule {
    fn new(seed: u64) -> FaultSchedule {
        // Its own stream, derived from the seed ("faults" in ASCII).
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0000_6661_756c_7473);
        let mut kinds = FAULTS;
        kinds.shuffle(&mut rng);
        FaultSchedule {
            rng,
            owed: kinds.into_iter().collect(),
        }
    }

    fn draw(&mut self, gateways: usize) -> FaultDraw {
        let rng = &mut self.rng;
        FaultDraw {
            fire: rng.random_bool(0.125),
            random_kind: FAULTS[rng.random_range(0..FAULTS.len())],
            outage: Duration::from_millis(rng.random_range(300..3000)),
            gateway: rng.random_range(0..gateways.max(1)),
            on_orders: rng.random_bool(0.5),
            failures: rng.random_range(1..=2),
            throttled: rng.random_range(1..=3),
        }
    }

    /// Whether some kind was not injected yet.
    fn owes(&self) -> bool {
        !self.owed.is_empty()
    }

    /// The kind to try: the first one still owed, else the random one.
    fn kind(&self, draw: &FaultDraw) -> Fault {
        self.owed.front().copied().unwrap_or(draw.random_kind)
    }

    /// Records an attempt at `kind`: an owed kind injected is paid; one
    /// skipped goes to the back of the queue, behind the kinds not tried yet.
    fn attempted(&mut self, kind: Fault, injected: bool) {
        if self.owed.front() == Some(&kind) {
            self.owed.pop_front();
            if !injected {
                self.owed.push_back(kind);
            }
        }
    }
}

/// Something to undo at a given time.
#[derive(Debug)]
enum Undo {
    Restart(usize),
    Unstall,
    PgStart,
}

struct Procs {
    list: Vec<Proc>, // api, the gateways, sync
    down: Vec<bool>,
    self_exits: Vec<u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_leaves_every_fill_protected_closed_or_explained() {
    let (scale_name, scale) = Scale::from_env();
    let seed = seed_from_env();
    eprintln!(
        "chaos: seed {seed} (CHAOS_SEED={seed} to replay), scale {scale_name}: {} accounts, {} entries, {:?} of faults",
        scale.accounts, scale.entries, scale.chaos
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut schedule = FaultSchedule::new(seed);
    eprintln!(
        "chaos: the first faults, one of each kind: {:?}",
        schedule.owed
    );
    let started = Instant::now();

    let dir = scratch_dir("chaos").unwrap();
    let pg = PrivatePg::start().unwrap();
    pg.create_database("ocoguard").unwrap();
    let db_url = pg.url("ocoguard");
    store_pg::migrate(&db_url).await.unwrap();

    let keys: Vec<(String, String)> = (0..scale.accounts)
        .map(|i| (format!("chaos-k{i}"), format!("chaos-s{i}")))
        .collect();
    let specs: Vec<String> = keys
        .iter()
        .map(|(k, s)| format!("{k}:{s}:USDT=1000000"))
        .collect();
    let sim = SimProc::start(&specs, &[], &dir).unwrap();
    let admin = sim.admin().clone();
    let layers = Layers::new(&dir, &db_url, &sim, LayerSettings::quick()).unwrap();
    let mut list = vec![layers.start(layers.api_spec()).unwrap()];
    for n in 1..=scale.gateways {
        list.push(layers.start(layers.gateway_spec(n)).unwrap());
    }
    list.push(layers.start(layers.sync_spec()).unwrap());
    let n_procs = list.len();
    let mut procs = Procs {
        list,
        down: vec![false; n_procs],
        self_exits: vec![0; n_procs],
    };
    let token = layers.add_user("chaos").unwrap();
    let client = ApiClient::new(&layers.api_url(), &token);
    client.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut accounts = Vec::new();
    for (k, s) in &keys {
        accounts.push(client.create_account(k, s).await.unwrap());
    }

    let mut prices: BTreeMap<&str, Decimal> = BTreeMap::new();
    for (symbol, _, _) in SYMBOLS {
        prices.insert(symbol, admin.price(symbol).await.unwrap());
    }

    // The run: one tick every 250 ms.
    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    // Attempts whose target was already down (a kind owed is tried again).
    let mut skipped = 0u32;
    // Kinds still owed halfway through are tried every second from then on,
    // so that a run of unlucky draws cannot leave one out.
    let mut last_try = Instant::now();
    let mut undo: Vec<(Instant, Undo)> = Vec::new();
    let mut posts: JoinSet<(Option<(i64, Decimal)>, u16)> = JoinSet::new();
    let mut attempted = 0usize;
    // Acknowledged entries with the filled quantity the API reported.
    let mut acked: Vec<(i64, Decimal)> = Vec::new();
    let mut refused: BTreeMap<u16, u32> = BTreeMap::new();
    let mut pg_down = false;
    let mut stalled = false;
    let mut violations: Vec<String> = Vec::new();
    let chaos_end = Instant::now() + scale.chaos;
    let owed_by = Instant::now() + scale.chaos / 2;
    let mut tick = 0u64;
    while Instant::now() < chaos_end {
        tick += 1;
        // Random price paths: each symbol moves by up to ±0.25 % per tick.
        for (symbol, _, decimals) in SYMBOLS {
            let p = prices[symbol];
            let bp: i64 = rng.random_range(-25..=25);
            let next = (p + p * Decimal::new(bp, 4)).round_dp(decimals);
            prices.insert(symbol, next);
            let _ = admin.set_price(symbol, next).await;
        }
        // Entries, spread over the first four fifths of the run.
        // By wall time, not ticks: a tick takes longer than 250 ms on a loaded machine.
        let elapsed_ms = scale
            .chaos
            .saturating_sub(chaos_end - Instant::now())
            .as_millis() as u64;
        let due = (scale.entries as u64 * elapsed_ms * 5)
            / (scale.chaos.as_millis() as u64 * 4).max(1)
            + 1;
        while attempted < scale.entries && (attempted as u64) < due {
            attempted += 1;
            let account = accounts[rng.random_range(0..accounts.len())];
            let (symbol, qty, decimals) = SYMBOLS[rng.random_range(0..SYMBOLS.len())];
            let p = prices[symbol];
            let pct = |bp: i64| (p + p * Decimal::new(bp, 4)).round_dp(decimals).to_string();
            let mut body = json!({"account": account, "symbol": symbol, "type": "MARKET",
                                  "quantity": qty, "tp": [pct(100), pct(200)]});
            if rng.random_bool(0.4) {
                body["type"] = json!("LIMIT");
                body["price"] = json!(pct(-rng.random_range(10..40)));
            }
            let client = client.clone();
            posts.spawn(async move {
                match client.post_entry(body).await {
                    Ok((status, body)) if (200..300).contains(&status) => {
                        let executed = body["executedQty"]
                            .as_str()
                            .and_then(|q| q.parse().ok())
                            .unwrap_or(Decimal::ZERO);
                        (body["id"].as_i64().map(|id| (id, executed)), status)
                    }
                    Ok((status, _)) => (None, status),
                    Err(_) => (None, 0),
                }
            });
        }
        while let Some(done) = posts.try_join_next() {
            match done.unwrap() {
                (Some(ack), _) => acked.push(ack),
                (None, status) => *refused.entry(status).or_default() += 1,
            }
        }
        // Undo what is due.
        let now = Instant::now();
        let (due_now, later): (Vec<_>, Vec<_>) = undo.drain(..).partition(|(t, _)| *t <= now);
        undo = later;
        for (_, u) in due_now {
            match u {
                Undo::Restart(i) => {
                    procs.list[i].restart().unwrap();
                    procs.down[i] = false;
                }
                Undo::Unstall => {
                    admin.stall_streams(false).await.unwrap();
                    stalled = false;
                }
                Undo::PgStart => {
                    pg.start_server().unwrap();
                    pg_down = false;
                }
            }
        }
        // A supervisor restarts a process that exited by itself.
        for i in 0..procs.list.len() {
            if !procs.down[i] && procs.list[i].exited().is_some() {
                procs.self_exits[i] += 1;
                procs.down[i] = true;
                undo.push((now + Duration::from_millis(500), Undo::Restart(i)));
            }
        }
        // A fault every 2 s on average.
        let draw = schedule.draw(n_procs - 2);
        let forced = schedule.owes() && now >= owed_by && now - last_try >= Duration::from_secs(1);
        if draw.fire || forced {
            last_try = now;
            let fault = schedule.kind(&draw);
            let outage = draw.outage;
            let injected = match fault {
                Fault::KillApi | Fault::KillGateway | Fault::KillSync => {
                    let i = match fault {
                        Fault::KillApi => 0,
                        Fault::KillGateway => 1 + draw.gateway,
                        _ => n_procs - 1,
                    };
                    if procs.down[i] {
                        false
                    } else {
                        procs.list[i].kill9();
                        procs.down[i] = true;
                        undo.push((now + outage, Undo::Restart(i)));
                        true
                    }
                }
                // Only a stream that is up can be dropped.
                Fault::StreamDrop => {
                    matches!(admin.subscriptions().await, Ok(n) if n > 0)
                        && admin.drop_streams().await.is_ok()
                }
                Fault::StreamStall => {
                    if stalled {
                        false
                    } else {
                        admin.stall_streams(true).await.unwrap();
                        stalled = true;
                        undo.push((now + outage, Undo::Unstall));
                        true
                    }
                }
                Fault::Error5xxAfterApply => {
                    let prefix = if draw.on_orders {
                        "/api/v3/order"
                    } else {
                        "/api/v3/orderList"
                    };
                    admin
                        .fail_requests(Some("POST"), prefix, draw.failures, true)
                        .await
                        .is_ok()
                }
                Fault::Throttle429 => admin.throttle(draw.throttled, 1).await.is_ok(),
                Fault::PgRestart => {
                    if pg_down {
                        false
                    } else {
                        pg.stop_immediate().unwrap();
                        pg_down = true;
                        undo.push((now + outage, Undo::PgStart));
                        true
                    }
                }
            };
            schedule.attempted(fault, injected);
            if injected {
                *faults.entry(fault).or_default() += 1;
            } else {
                skipped += 1;
            }
        }
        // Sample the exchange-side invariants while it all happens.
        if tick.is_multiple_of(8) {
            let view = ExchangeView::read(&admin, &keys).await;
            violations.extend(view.leg_violations());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Quiet: faults off, everything up again, prices held.
    admin.clear_faults().await.unwrap();
    admin.stall_streams(false).await.unwrap();
    for (_, u) in undo.drain(..) {
        match u {
            Undo::Restart(i) => {
                procs.list[i].restart().unwrap();
                procs.down[i] = false;
            }
            Undo::Unstall => {}
            Undo::PgStart => pg.start_server().unwrap(),
        }
    }
    for i in 0..procs.list.len() {
        if procs.list[i].exited().is_some() {
            procs.self_exits[i] += 1;
            procs.list[i].restart().unwrap();
        }
    }
    while let Some(done) = posts.join_next().await {
        match done.unwrap() {
            (Some(ack), _) => acked.push(ack),
            (None, status) => *refused.entry(status).or_default() += 1,
        }
    }
    let chaos_took = started.elapsed();
    let store = PgStore::connect(PgConfig {
        url: db_url.clone(),
        pool_size: 2,
        secret_key: SecretKey::parse(&layers.key_hex).unwrap(),
    })
    .await
    .unwrap();
    let quiet_end = Instant::now() + scale.quiet_max;
    let (view, report) = loop {
        let view = ExchangeView::read(&admin, &keys).await;
        let report = Report::check(&view, &store, &accounts, &acked).await;
        if report.problems.is_empty() || Instant::now() >= quiet_end {
            break (view, report);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    violations.extend(view.leg_violations());

    // The summary.
    let mut table = String::new();
    let line = |t: &mut String, k: &str, v: String| t.push_str(&format!("  {k:<34} {v}\n"));
    line(&mut table, "seed", seed.to_string());
    line(
        &mut table,
        "entries attempted / acknowledged",
        format!("{attempted} / {}", acked.len()),
    );
    line(
        &mut table,
        "not acknowledged (status: n)",
        format!("{refused:?} (0 = no answer)"),
    );
    line(&mut table, "entries filled", report.filled.to_string());
    line(&mut table, "fills (trades)", view.buy_trades().to_string());
    for fault in FAULTS {
        let n = faults.get(&fault).copied().unwrap_or(0);
        line(&mut table, &format!("fault {fault:?}"), n.to_string());
    }
    line(
        &mut table,
        "faults skipped (target down)",
        skipped.to_string(),
    );
    for (i, p) in procs.list.iter().enumerate() {
        line(
            &mut table,
            &format!("{} starts (self-exits)", p.name()),
            format!("{} ({})", p.starts(), procs.self_exits[i]),
        );
    }
    for (layer, n) in &report.placements {
        line(
            &mut table,
            &format!("lists placed by {layer}"),
            n.to_string(),
        );
    }
    for (state, n) in &report.outcomes {
        line(&mut table, &format!("outcome {state}"), n.to_string());
    }
    for (id, reason) in &report.unprotectable {
        line(
            &mut table,
            &format!("entry {id} unprotectable"),
            reason.clone(),
        );
    }
    if !report.recovered.is_empty() {
        line(
            &mut table,
            "unprotectable a while, then covered",
            format!("{:?} (not in the times below)", report.recovered),
        );
    }
    line(
        &mut table,
        "unprotected time max / p99 / p50",
        format!(
            "{} ms / {} ms / {} ms (bound {} ms)",
            report.max_ms(),
            report.percentile_ms(99),
            report.percentile_ms(50),
            UNPROTECTED_BOUND.as_millis()
        ),
    );
    line(
        &mut table,
        "wall time (faults+setup / total)",
        format!(
            "{:.1} s / {:.1} s",
            chaos_took.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
    );
    eprintln!("chaos summary\n{table}");

    let logs = || {
        procs
            .list
            .iter()
            .map(|p| p.log_tail(40))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        report.problems.is_empty(),
        "seed {seed}: {} problem(s):\n{}\n{}",
        report.problems.len(),
        report.problems.join("\n"),
        logs()
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: leg invariants broken:\n{}",
        violations.join("\n")
    );
    let never: Vec<Fault> = FAULTS
        .into_iter()
        .filter(|f| !faults.contains_key(f))
        .collect();
    assert!(
        never.is_empty(),
        "seed {seed}: fault kinds never injected: {never:?} (injected {faults:?}, \
         {skipped} attempts skipped, still owed {:?})",
        schedule.owed
    );
    assert!(report.filled > 0, "seed {seed}: nothing filled");
    assert!(
        report.max_ms() <= UNPROTECTED_BOUND.as_millis() as u64,
        "seed {seed}: an entry stayed unprotected {} ms, over the bound of {} ms: {:?}",
        report.max_ms(),
        UNPROTECTED_BOUND.as_millis(),
        report.worst
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the exchange holds for our accounts.
struct ExchangeView {
    orders: Vec<SimOrder>,
    lists: Vec<SimList>,
    trades: Vec<SimTrade>,
}

/// The entry id of one of our client ids (`og-E-7`, `og-L-7-1-0`, `og-T-7-1-0`, …).
fn entry_of(client_id: &str) -> Option<(char, i64)> {
    let mut parts = client_id.strip_prefix("og-")?.split('-');
    let kind = parts.next()?.chars().next()?;
    Some((kind, parts.next()?.parse().ok()?))
}

impl ExchangeView {
    async fn read(admin: &SimAdmin, keys: &[(String, String)]) -> ExchangeView {
        let mut v = ExchangeView {
            orders: Vec::new(),
            lists: Vec::new(),
            trades: Vec::new(),
        };
        for (k, _) in keys {
            v.orders.extend(admin.orders(k).await.unwrap());
            v.lists.extend(admin.order_lists(k).await.unwrap());
            v.trades.extend(admin.trades(k).await.unwrap());
        }
        v
    }

    fn buy_trades(&self) -> usize {
        self.trades.iter().filter(|t| t.is_buyer).count()
    }

    fn entry_orders(&self) -> impl Iterator<Item = (i64, &SimOrder)> {
        self.orders
            .iter()
            .filter_map(|o| match entry_of(&o.client_order_id) {
                Some(('E', id)) if o.side == "BUY" => Some((id, o)),
                _ => None,
            })
    }

    fn lists_of(&self, entry: i64) -> impl Iterator<Item = &SimList> {
        self.lists
            .iter()
            .filter(move |l| entry_of(&l.list_client_order_id) == Some(('L', entry)))
    }

    /// Net filled quantity of an entry: bought minus the base-asset commission.
    fn net_filled(&self, entry: &SimOrder) -> Decimal {
        let base = entry.symbol.trim_end_matches("USDT");
        let fee: Decimal = self
            .trades
            .iter()
            .filter(|t| t.api_key == entry.api_key && t.order_id == entry.order_id)
            .filter(|t| t.commission_asset == base)
            .map(|t| t.commission)
            .sum();
        entry.executed_qty - fee
    }

    /// No entry has more executing lists than planned (2), and what its
    /// lists sold plus what they still offer never exceeds the net fill.
    fn leg_violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let orders_by_id: BTreeMap<(&str, u64), &SimOrder> = self
            .orders
            .iter()
            .map(|o| ((o.api_key.as_str(), o.order_id), o))
            .collect();
        for (id, entry) in self.entry_orders() {
            let executing: Vec<&SimList> = self
                .lists_of(id)
                .filter(|l| l.list_order_status == "EXECUTING")
                .collect();
            if executing.len() > 2 {
                out.push(format!(
                    "entry {id}: {} executing lists: {:?}",
                    executing.len(),
                    executing
                        .iter()
                        .map(|l| &l.list_client_order_id)
                        .collect::<Vec<_>>()
                ));
            }
            let sold: Decimal = self
                .orders
                .iter()
                .filter(|o| {
                    o.side == "SELL" && entry_of(&o.client_order_id).map(|e| e.1) == Some(id)
                })
                .map(|o| o.executed_qty)
                .sum();
            let offered: Decimal = executing
                .iter()
                .map(|l| {
                    l.order_ids
                        .iter()
                        .filter_map(|oid| orders_by_id.get(&(l.api_key.as_str(), *oid)))
                        .filter(|o| matches!(o.status.as_str(), "NEW" | "PARTIALLY_FILLED"))
                        .map(|o| o.orig_qty - o.executed_qty)
                        .max()
                        .unwrap_or(Decimal::ZERO)
                })
                .sum();
            let net = self.net_filled(entry);
            if sold + offered > net {
                out.push(format!(
                    "entry {id}: sold {sold} + offered {offered} exceeds the net fill {net}"
                ));
            }
        }
        out
    }
}

/// Legs the accounts' default protection plans per generation: TP1 + SL
/// and TP2 + SL (every chaos entry has two targets).
const PLANNED_LEGS: usize = 2;

/// A leg as the store holds it, reduced to what the leg invariants need.
#[derive(Debug, Clone)]
struct StoredLeg {
    list: String,
    generation: u32,
    /// Claimed, placed or unknown: may hold coins on the book.
    active: bool,
    qty: Decimal,
}

/// The store's leg invariants for entry `id`, once nothing is in flight
/// (`protect` claims a new generation before it cancels the older lists, so
/// they do not hold in the middle of a replacement): no generation holds
/// more legs than planned; no more legs are active, all generations
/// together, than one generation plans; and the active legs' quantities
/// never exceed the net fill, as the store records it (executed minus the
/// base-asset commission) and, when the exchange shows the entry order, as
/// the exchange does.
fn store_leg_violations(
    id: i64,
    store_net: Decimal,
    exchange_net: Option<Decimal>,
    legs: &[StoredLeg],
) -> Vec<String> {
    let mut out = Vec::new();
    let mut per_generation: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for leg in legs {
        per_generation
            .entry(leg.generation)
            .or_default()
            .push(&leg.list);
    }
    for (generation, lists) in &per_generation {
        if lists.len() > PLANNED_LEGS {
            out.push(format!(
                "entry {id}: {} legs in generation {generation}, {PLANNED_LEGS} planned: {lists:?}",
                lists.len()
            ));
        }
    }
    let active: Vec<&StoredLeg> = legs.iter().filter(|l| l.active).collect();
    if active.len() > PLANNED_LEGS {
        out.push(format!(
            "entry {id}: {} active legs in the store, {PLANNED_LEGS} planned: {:?}",
            active.len(),
            active.iter().map(|l| &l.list).collect::<Vec<_>>()
        ));
    }
    let active_qty: Decimal = active.iter().map(|l| l.qty).sum();
    let net = exchange_net.map_or(store_net, |x| x.min(store_net));
    if active_qty > net {
        out.push(format!(
            "entry {id}: active legs in the store hold {active_qty}, more than the net fill \
             (store {store_net}, exchange {exchange_net:?}): {:?}",
            active.iter().map(|l| (&l.list, l.qty)).collect::<Vec<_>>()
        ));
    }
    out
}

/// The invariants against the store, and the figures.
struct Report {
    problems: Vec<String>,
    filled: usize,
    placements: BTreeMap<String, u32>,
    outcomes: BTreeMap<String, u32>,
    unprotected_ms: Vec<u64>,
    worst: Option<(i64, u64)>,
    unprotectable: Vec<(i64, String)>,
    /// Entries recorded unprotectable for a while (stop budget), covered later.
    recovered: Vec<i64>,
}

impl Report {
    async fn check(
        view: &ExchangeView,
        store: &PgStore,
        accounts: &[i64],
        acked: &[(i64, Decimal)],
    ) -> Report {
        let mut r = Report {
            problems: Vec::new(),
            filled: 0,
            placements: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            unprotected_ms: Vec::new(),
            worst: None,
            unprotectable: Vec::new(),
            recovered: Vec::new(),
        };
        // Nothing acknowledged is lost.
        for (id, executed) in acked {
            match store.entry(EntryId(*id)).await {
                Ok(e) if e.client_id.as_str() != format!("og-E-{id}") => r
                    .problems
                    .push(format!("entry {id} stored as {}", e.client_id.as_str())),
                Ok(e) if e.executed_qty.get() < *executed => r.problems.push(format!(
                    "entry {id}: the API acknowledged {executed} filled, the store holds {}",
                    e.executed_qty.get()
                )),
                Ok(_) => {}
                Err(err) => r.problems.push(format!(
                    "acknowledged entry {id} missing from the store: {err}"
                )),
            }
        }
        let mut known_lists: BTreeSet<String> = BTreeSet::new();
        for (id, order) in view.entry_orders() {
            let entry = match store.entry(EntryId(id)).await {
                Ok(e) => e,
                Err(err) => {
                    r.problems.push(format!(
                        "exchange order og-E-{id} has no entry in the store: {err}"
                    ));
                    continue;
                }
            };
            let legs = store.legs(EntryId(id)).await.unwrap_or_default();
            known_lists.extend(legs.iter().map(|l| l.ids.list.as_str().to_owned()));
            if order.executed_qty.is_zero() {
                continue;
            }
            r.filled += 1;
            let state = match &entry.protection {
                Protection::Protected { .. } => "protected",
                Protection::Closed => "closed",
                Protection::Unprotectable { .. } => "unprotectable",
                Protection::Exited { .. } => "exited",
                Protection::Unprotected => "unprotected",
                Protection::NotNeeded => "not recorded as filled",
            };
            *r.outcomes.entry(state.to_owned()).or_default() += 1;
            let lists: Vec<&SimList> = view.lists_of(id).collect();
            match &entry.protection {
                Protection::Protected { .. } => {
                    if !lists.iter().any(|l| l.list_order_status == "EXECUTING") {
                        r.problems.push(format!(
                            "entry {id} is protected in the store but has no executing list"
                        ));
                    }
                }
                Protection::Unprotectable { reason } if reason.trim().is_empty() => {
                    r.problems
                        .push(format!("entry {id} unprotectable without a reason"));
                }
                Protection::Unprotectable { reason } => {
                    r.unprotectable.push((id, reason.clone()));
                }
                Protection::Closed | Protection::Exited { .. } => {}
                other => r.problems.push(format!(
                    "entry {id} filled {} but {other:?} ({:?})",
                    order.executed_qty, entry.status
                )),
            }
            // Fill → first list (or exit order) accepted at the exchange.
            let filled_at = view
                .trades
                .iter()
                .filter(|t| t.api_key == order.api_key && t.order_id == order.order_id)
                .map(|t| t.time_us)
                .min();
            let covered_at = lists
                .iter()
                .map(|l| l.created_us)
                .chain(view.orders.iter().filter_map(|o| {
                    (entry_of(&o.client_order_id) == Some(('X', id))).then_some(o.created_us)
                }))
                .min();
            let was_unprotectable = store
                .events(EntryId(id))
                .await
                .unwrap_or_default()
                .iter()
                .any(|e| e.kind == "unprotectable");
            if was_unprotectable && !matches!(entry.protection, Protection::Unprotectable { .. }) {
                // Its wait was a recorded limit (stop budget), not a lapse of the layers.
                r.recovered.push(id);
                continue;
            }
            if let Some(filled_at) = filled_at {
                if let Some(covered_at) = covered_at {
                    let ms = covered_at.saturating_sub(filled_at) / 1000;
                    r.unprotected_ms.push(ms);
                    if r.worst.is_none_or(|(_, w)| ms > w) {
                        r.worst = Some((id, ms));
                    }
                } else if !matches!(entry.protection, Protection::Unprotectable { .. }) {
                    r.problems.push(format!(
                        "entry {id} filled but no list or exit reached the exchange"
                    ));
                }
            }
        }
        // The store's own view of every entry's legs.
        let exchange_net: BTreeMap<i64, Decimal> = view
            .entry_orders()
            .map(|(id, order)| (id, view.net_filled(order)))
            .collect();
        for account in accounts {
            let entries = match store.entries_of(AccountId(*account), None, 100_000).await {
                Ok(entries) => entries,
                Err(err) => {
                    r.problems
                        .push(format!("listing the entries of account {account}: {err}"));
                    continue;
                }
            };
            for entry in entries {
                let id = entry.id.0;
                let legs = match store.legs(entry.id).await {
                    Ok(legs) => legs,
                    Err(err) => {
                        r.problems
                            .push(format!("reading the legs of entry {id}: {err}"));
                        continue;
                    }
                };
                let legs: Vec<StoredLeg> = legs
                    .iter()
                    .map(|l| StoredLeg {
                        list: l.ids.list.as_str().to_owned(),
                        generation: l.key.generation,
                        active: l.state.is_active(),
                        qty: l.qty.get(),
                    })
                    .collect();
                r.problems.extend(store_leg_violations(
                    id,
                    entry.net_qty().get(),
                    exchange_net.get(&id).copied(),
                    &legs,
                ));
            }
        }
        // Every list the exchange holds under our ids is known to the store.
        for l in &view.lists {
            if l.list_client_order_id.starts_with("og-")
                && !known_lists.contains(&l.list_client_order_id)
            {
                r.problems.push(format!(
                    "list {} on the exchange is unknown to the store",
                    l.list_client_order_id
                ));
            }
        }
        for id in view
            .lists
            .iter()
            .filter_map(|l| entry_of(&l.list_client_order_id))
            .map(|e| e.1)
            .collect::<BTreeSet<_>>()
        {
            for leg in store.legs(EntryId(id)).await.unwrap_or_default() {
                if view
                    .lists
                    .iter()
                    .any(|l| l.list_client_order_id == leg.ids.list.as_str())
                {
                    *r.placements.entry(leg.source.to_string()).or_default() += 1;
                }
            }
        }
        r
    }

    fn max_ms(&self) -> u64 {
        self.unprotected_ms.iter().copied().max().unwrap_or(0)
    }

    fn percentile_ms(&self, p: usize) -> u64 {
        let mut v = self.unprotected_ms.clone();
        v.sort_unstable();
        if v.is_empty() {
            return 0;
        }
        v[((v.len() - 1) * p) / 100]
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn leg(list: &str, generation: u32, active: bool, qty: &str) -> StoredLeg {
        StoredLeg {
            list: list.to_owned(),
            generation,
            active,
            qty: qty.parse().unwrap(),
        }
    }

    #[test]
    fn the_schedule_goes_through_every_kind_first_in_a_seeded_order() {
        let order = |seed| {
            let mut s = FaultSchedule::new(seed);
            (0..FAULTS.len())
                .map(|_| {
                    let draw = s.draw(2);
                    let kind = s.kind(&draw);
                    s.attempted(kind, true);
                    kind
                })
                .collect::<Vec<_>>()
        };
        let first = order(20_261_202);
        assert_eq!(first.iter().collect::<BTreeSet<_>>().len(), FAULTS.len());
        assert_eq!(first, order(20_261_202), "reproducible from the seed");
        assert_ne!(first, order(42), "another seed, another order");
        let mut s = FaultSchedule::new(1);
        while s.owes() {
            let draw = s.draw(2);
            let kind = s.kind(&draw);
            s.attempted(kind, true);
        }
        let draw = s.draw(2);
        assert_eq!(s.kind(&draw), draw.random_kind, "then random");
    }

    #[test]
    fn a_skipped_kind_is_tried_again_after_the_others() {
        let mut s = FaultSchedule::new(7);
        let draw = s.draw(1);
        let first = s.kind(&draw);
        s.attempted(first, false);
        assert!(s.owes());
        assert_ne!(s.kind(&draw), first, "the next kind goes first");
        assert_eq!(
            s.owed.back(),
            Some(&first),
            "the skipped one waits at the back"
        );
        for _ in 1..FAULTS.len() {
            let kind = s.kind(&draw);
            s.attempted(kind, true);
        }
        assert_eq!(s.kind(&draw), first, "retried");
        s.attempted(first, true);
        assert!(!s.owes());
    }

    #[test]
    fn the_store_check_finds_extra_legs_and_oversized_ones() {
        let d = |t: &str| t.parse::<Decimal>().unwrap();
        let fine = [
            leg("og-L-7-1-0", 0, false, "0.05"),
            leg("og-L-7-2-0", 0, false, "0.05"),
            leg("og-L-7-1-1", 1, true, "0.05"),
            leg("og-L-7-2-1", 1, true, "0.0499"),
        ];
        assert!(store_leg_violations(7, d("0.0999"), Some(d("0.0999")), &fine).is_empty());
        let three = [
            leg("og-L-7-1-0", 0, false, "0.03"),
            leg("og-L-7-2-0", 0, false, "0.03"),
            leg("og-L-7-3-0", 0, false, "0.03"),
        ];
        let v = store_leg_violations(7, d("0.0999"), None, &three);
        assert!(
            v.len() == 1 && v[0].contains("3 legs in generation 0"),
            "{v:?}"
        );
        let overlapping = [
            leg("og-L-7-1-0", 0, true, "0.02"),
            leg("og-L-7-1-1", 1, true, "0.02"),
            leg("og-L-7-2-1", 1, true, "0.02"),
        ];
        let v = store_leg_violations(7, d("0.0999"), None, &overlapping);
        assert!(v.len() == 1 && v[0].contains("3 active legs"), "{v:?}");
        let v = store_leg_violations(7, d("0.0999"), Some(d("0.0998")), &fine);
        assert!(
            v.len() == 1 && v[0].contains("more than the net fill"),
            "{v:?}"
        );
        let v = store_leg_violations(7, d("0.0998"), None, &fine);
        assert!(
            v.len() == 1 && v[0].contains("more than the net fill"),
            "{v:?}"
        );
    }
}
