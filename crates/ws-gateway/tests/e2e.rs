//! The gateway end to end: real PostgreSQL (`TestDb`), `exchange-sim` over
//! real HTTP/WebSocket, the real Binance adapter. Entries are placed the way
//! the API does (stored first with our client id, then sent); protection is
//! left to the gateway, which only learns of the fills from the stream.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ids::IdScheme;
use oco_core::levels::EntryLevels;
use oco_core::model::{
    EntryKind, EntryTags, NewEntry, OrderSize, Protection, ProtectionConfig, Source,
};
use oco_core::ports::{
    ApiCredentials, Clock, Exchange, Leases, NewAccount, OrderRequest, Side, Store,
};
use oco_core::protect::{Protector, ProtectorConfig};
use oco_core::{AccountId, EntryId, EntryStatus, Price, Qty, StoreError, SystemClock};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;
use store_pg::testing::TestDb;
use store_pg::{PgConfig, PgStore, SecretKey};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use ws_gateway::{Gateway, GatewayConfig, GatewayError, GatewayStats};

const KEY_HEX: &str = "0707070707070707070707070707070707070707070707070707070707070707";

fn pg_config(db: &TestDb, pool: usize) -> PgConfig {
    db.config_with_key(pool, SecretKey::parse(KEY_HEX).unwrap())
}

/// The adapter as the binary builds it for the simulator, with a weight
/// budget that does not pace a test's burst (the sim's limits are off).
fn binance(sim: &Sim) -> BinanceConfig {
    let mut c = BinanceConfig::custom(sim.base_url(), sim.ws_api_url());
    c.pacing.weight_per_minute = 1_000_000;
    c
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

struct World {
    sim: Sim,
    db: TestDb,
    store: Arc<PgStore>,
    /// The API's exchange client: places entries only.
    placer: BinanceExchange,
    accounts: Vec<AccountId>,
    ids: IdScheme,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), GatewayError>>,
    stats: Arc<GatewayStats>,
    /// The gateway's own store.
    store: Arc<PgStore>,
    /// Reads new entries ahead of their fills, as the binary does.
    learner: store_pg::EntryLearner,
}

impl Running {
    fn up(&self) -> u64 {
        self.stats.streams_up.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn world(n_accounts: usize) -> World {
    let mut config = SimConfig::new("127.0.0.1:0".parse().unwrap()).with_faults(true);
    for i in 0..n_accounts {
        config = config.with_account(AccountSpec::new(
            api_key(i),
            format!("secret-{i}"),
            vec![("USDT".into(), dec!(100000))],
        ));
    }
    let sim = Sim::start(config).await.unwrap();
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(pg_config(&db, 8)).await.unwrap());
    let mut accounts = Vec::new();
    for i in 0..n_accounts {
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
    let placer = BinanceExchange::new(binance(&sim)).unwrap();
    World {
        sim,
        db,
        store,
        placer,
        accounts,
        ids: IdScheme::new("og").unwrap(),
    }
}

impl World {
    /// A gateway process: its own pool, exchange client and streams, as
    /// `bins/ws-gateway` wires them.
    async fn gateway(&self, holder: &str, max_accounts: usize) -> Running {
        self.gateway_with(holder, max_accounts, binance(&self.sim))
            .await
    }

    /// [`World::gateway`] with the adapter configured as `adapter`.
    async fn gateway_with(
        &self,
        holder: &str,
        max_accounts: usize,
        adapter: BinanceConfig,
    ) -> Running {
        self.gateway_on(holder, max_accounts, adapter, |store| store, |_| {})
            .await
    }

    /// [`World::gateway_with`], its leases taken through what `leases`
    /// makes of its store, its settings changed by `tune`.
    async fn gateway_on(
        &self,
        holder: &str,
        max_accounts: usize,
        adapter: BinanceConfig,
        leases: impl FnOnce(Arc<PgStore>) -> Arc<dyn Leases>,
        tune: impl FnOnce(&mut GatewayConfig),
    ) -> Running {
        let store = Arc::new(PgStore::connect(pg_config(&self.db, 8)).await.unwrap());
        let exchange = BinanceExchange::new(adapter.clone()).unwrap();
        let streams = BinanceUserStream::new(adapter).unwrap();
        let protector = Arc::new(Protector::new(
            Arc::new(exchange),
            store.clone(),
            Arc::new(SystemClock),
            ProtectorConfig::new(self.ids.clone()),
        ));
        let mut config = GatewayConfig::standard(holder);
        config.renew_every = Duration::from_millis(100);
        config.lease_ttl = Duration::from_secs(3);
        config.max_accounts = max_accounts;
        config.min_backoff = Duration::from_millis(50);
        tune(&mut config);
        let gateway = Gateway::new(
            store.clone(),
            leases(store.clone()),
            Arc::new(streams),
            protector,
            config,
        );
        let learner = store_pg::learn_announced_entries(store.clone());
        let stats = gateway.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Running {
            stop,
            task,
            stats,
            store,
            learner,
        }
    }

    /// A MARKET BUY as the API sends it: stored with our client id, then
    /// placed under that id. Nobody calls `protect`.
    async fn buy(&self, account: usize, symbol: &str, qty: Decimal) -> EntryId {
        self.buy_at(account, symbol, qty, None).await
    }

    /// [`World::buy`], as a LIMIT BUY at `limit` when given.
    async fn buy_at(
        &self,
        account: usize,
        symbol: &str,
        qty: Decimal,
        limit: Option<Decimal>,
    ) -> EntryId {
        let entry = self.stored(account, symbol, qty, limit).await;
        self.place(account, &entry).await;
        entry.id
    }

    /// The first half of [`World::buy_at`]: the entry stored as the API
    /// stores it, not sent yet.
    async fn stored(
        &self,
        account: usize,
        symbol: &str,
        qty: Decimal,
        limit: Option<Decimal>,
    ) -> oco_core::Entry {
        let ids = self.ids.clone();
        let limit = limit.map(|l| Price::new(l).unwrap());
        let size = OrderSize::Base(Qty::new(qty).unwrap());
        self.store
            .create_entry(
                NewEntry {
                    account: self.accounts[account],
                    symbol: self.placer.symbol_rules(symbol).await.unwrap().symbol,
                    kind: limit.map_or(EntryKind::Market, |price| EntryKind::Limit { price }),
                    size,
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

    /// The second half of [`World::buy_at`]: `entry` sent under its client id.
    async fn place(&self, account: usize, entry: &oco_core::Entry) {
        let limit = match entry.kind {
            EntryKind::Limit { price } => Some(price),
            _ => None,
        };
        self.placer
            .place_order(
                &creds(account),
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
    }

    /// Open order lists on the sim.
    fn open_lists(&self) -> usize {
        self.sim
            .control()
            .order_lists(None)
            .iter()
            .filter(|l| l.list_order_status == "EXECUTING")
            .count()
    }

    /// Whether every entry is protected, by `by` when given.
    async fn all_protected(&self, entries: &[EntryId], by: Option<Source>) -> bool {
        for id in entries {
            let e = self.store.entry(*id).await.unwrap();
            let ok = match e.protection {
                Protection::Protected { by: b, .. } => by.is_none_or(|want| want == b),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Each entry has exactly two legs in the store, and the sim holds
    /// exactly one list per stored leg, under that leg's client id.
    async fn assert_each_protected_once(&self, entries: &[EntryId]) {
        let lists = self.sim.control().order_lists(None);
        let mut ours = 0;
        for id in entries {
            let legs = self.store.legs(*id).await.unwrap();
            assert_eq!(legs.len(), 2, "entry {id} has exactly its two legs");
            for leg in &legs {
                let n = lists
                    .iter()
                    .filter(|l| l.list_client_order_id == leg.ids.list.as_str())
                    .count();
                assert_eq!(
                    n, 1,
                    "leg {:?} of entry {id} is on the exchange once",
                    leg.key
                );
                ours += 1;
            }
        }
        assert_eq!(lists.len(), ours, "no list beyond the stored legs");
    }
}

/// Polls `check` until it holds; fails the test at `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fill_gets_both_legs_on_the_exchange() {
    let w = world(1).await;
    w.sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let gw = w.gateway("gw-1", 10).await;
    wait_for("the stream", Duration::from_secs(10), || async {
        gw.up() == 1 && w.sim.control().subscription_count() == 1
    })
    .await;
    let entry = w.buy(0, "BTCUSDT", dec!(0.01)).await;
    wait_for("two open lists", Duration::from_secs(10), || async {
        w.open_lists() == 2
    })
    .await;
    wait_for(
        "protected by websocket",
        Duration::from_secs(10),
        || async { w.all_protected(&[entry], Some(Source::Websocket)).await },
    )
    .await;
    w.assert_each_protected_once(&[entry]).await;
    // Both legs sell what was bought, net of the base commission (0.1 %).
    let legs = w.store.legs(entry).await.unwrap();
    let sold: Decimal = legs.iter().map(|l| l.qty.get()).sum();
    assert_eq!(sold, dec!(0.00999));
    // The counters move once `follow` returns, just after the store shows the protection.
    wait_for("the gateway's counters", Duration::from_secs(5), || async {
        let stats = gw.stats.snapshot();
        stats.entry_fills == 1 && stats.placements == 2
    })
    .await;
    gw.stop().await;
    // The stop released the lease: another holder takes the account at once.
    let taken = w
        .store
        .acquire_leases("other", 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
}

/// One account, BTCUSDT at 60,000, and gateway `holder` streaming it with its
/// listener for new entries up.
async fn streaming_and_listening(holder: &str) -> (World, Running) {
    let w = world(1).await;
    w.sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let gw = w.gateway(holder, 1).await;
    let listening = gw.learner.listening();
    wait_for(
        "the stream and the listener",
        Duration::from_secs(10),
        || async { gw.up() == 1 && listening.load(Ordering::Relaxed) },
    )
    .await;
    (w, gw)
}

/// A MARKET entry stored while the gateway follows its account is read as
/// it is announced: its fill, which reaches the gateway with no acceptance
/// written before it, is written and claimed without a read, once. (The
/// symbol's first fill in the process only fetches its rules: a plan from
/// what was read needs them at hand, so a first MARKET entry is protected
/// the long way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_market_entry_stored_while_its_account_is_followed_is_filled_without_a_read() {
    let (w, gw) = streaming_and_listening("gw-1").await;
    let first = w.buy(0, "BTCUSDT", dec!(0.01)).await;
    wait_for("the first protected", Duration::from_secs(10), || async {
        w.all_protected(&[first], Some(Source::Websocket)).await
    })
    .await;
    // The first entry's hint, if its read ahead won the race, went with its fill.
    assert_eq!(gw.store.hinted_entries(), 0);
    let entry = w.stored(0, "BTCUSDT", dec!(0.01), None).await;
    wait_for("the entry read ahead", Duration::from_secs(10), || async {
        gw.store.hinted_entries() == 1
    })
    .await;
    assert_eq!(gw.store.hinted_accounts(), 1, "the account's keys kept");
    let before = gw.store.hint_stats();
    w.place(0, &entry).await;
    wait_for(
        "protected by websocket",
        Duration::from_secs(10),
        || async { w.all_protected(&[entry.id], Some(Source::Websocket)).await },
    )
    .await;
    w.assert_each_protected_once(&[first, entry.id]).await;
    let after = gw.store.hint_stats();
    assert_eq!(
        (after.used - before.used, after.stale - before.stale),
        (1, 0),
        "the fill written from what was read ahead"
    );
    gw.stop().await;
}

/// A lease lost and taken back while the account's old task still finishes
/// a protection (within the drain grace) leaves the account followed: the
/// old task, once it ends, does not tell the store it no longer follows the
/// account, which the new task follows. The account's next entries are still
/// read ahead of their fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_back_while_the_old_task_drains_stays_followed() {
    let (w, gw) = streaming_and_listening("gw-a").await;
    // The old task is busy: its OCOs are answered 3 s late.
    w.sim
        .control()
        .set_response_delay(Duration::from_secs(3), Some("/api/v3/orderList/oco".into()));
    let entry = w.buy(0, "BTCUSDT", dec!(0.01)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = |holder: &str| {
        format!(
            "UPDATE account_leases SET holder = '{holder}', \
             expires_at = now() + interval '1 hour' WHERE account_id = {}",
            w.accounts[0].0
        )
    };
    w.db.run_sql(&lease("gw-elsewhere")).await;
    wait_for("the lease seen lost", Duration::from_secs(5), || async {
        gw.stats.stream_states().is_empty()
    })
    .await;
    w.db.run_sql(&lease("gw-a")).await;
    wait_for("the lease seen back", Duration::from_secs(5), || async {
        gw.stats.stream_states().len() == 1
    })
    .await;
    assert!(
        !w.all_protected(&[entry], None).await,
        "the old task is still placing: the race this test is about"
    );
    w.sim.control().set_response_delay(Duration::ZERO, None);
    wait_for(
        "the old task's protection",
        Duration::from_secs(10),
        || async { w.all_protected(&[entry], Some(Source::Websocket)).await },
    )
    .await;
    // The old task ends once its protection is recorded; its unfollow runs
    // right after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = w.stored(0, "BTCUSDT", dec!(0.01), None).await;
    wait_for(
        "the next entry read ahead",
        Duration::from_secs(5),
        || async { gw.store.hinted_entries() == 1 },
    )
    .await;
    assert_eq!(gw.store.hinted_accounts(), 1, "its keys kept");
    w.place(0, &next).await;
    wait_for("the next protected", Duration::from_secs(10), || async {
        w.all_protected(&[next.id], Some(Source::Websocket)).await
    })
    .await;
    w.assert_each_protected_once(&[entry, next.id]).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_stream_each_account_once_and_place_no_duplicate_legs() {
    let w = world(3).await;
    w.sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    // At most two accounts each, so both must take part.
    let a = w.gateway("gw-a", 2).await;
    let b = w.gateway("gw-b", 2).await;
    wait_for("three streams", Duration::from_secs(10), || async {
        a.up() + b.up() == 3 && w.sim.control().subscription_count() == 3
    })
    .await;
    assert!(a.up() >= 1 && b.up() >= 1, "both gateways stream");
    let mut entries = Vec::new();
    for _ in 0..2 {
        for i in 0..3 {
            entries.push(w.buy(i, "BTCUSDT", dec!(0.01)).await);
        }
    }
    wait_for("12 lists", Duration::from_secs(15), || async {
        w.open_lists() >= 12 && w.all_protected(&entries, Some(Source::Websocket)).await
    })
    .await;
    // Still one subscription per account, and nothing placed twice.
    assert_eq!(w.sim.control().subscription_count(), 3);
    assert_eq!(w.sim.control().order_lists(None).len(), 12);
    w.assert_each_protected_once(&entries).await;
    // Counters move just after the store shows the protection: wait for them, then check none overshoots.
    wait_for("the gateways' counters", Duration::from_secs(5), || async {
        let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
        sa.entry_fills + sb.entry_fills >= 6 && sa.placements + sb.placements >= 12
    })
    .await;
    let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
    assert_eq!(sa.entry_fills + sb.entry_fills, 6, "each fill handled once");
    assert_eq!(sa.placements + sb.placements, 12);
    a.stop().await;
    b.stop().await;
}

/// One account, a gateway `gw-a` following it, and a resting LIMIT entry
/// whose acceptance the gateway has written, so that it keeps the account's
/// keys as a hint.
async fn following_a_resting_entry() -> (World, Running, EntryId) {
    let w = world(1).await;
    w.sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let a = w.gateway("gw-a", 1).await;
    wait_for("the stream", Duration::from_secs(10), || async {
        a.up() == 1
    })
    .await;
    let entry = w.buy_at(0, "BTCUSDT", dec!(0.01), Some(dec!(59000))).await;
    wait_for("the acceptance learnt", Duration::from_secs(10), || async {
        a.store.hinted_accounts() == 1
            && w.store.entry(entry).await.unwrap().status == EntryStatus::New
    })
    .await;
    (w, a, entry)
}

/// A gateway keeps an account's decrypted keys as a hint while it follows
/// the account's stream (learnt at a resting entry's acceptance), and drops
/// them when it stops following it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_following_an_account_forgets_its_keys() {
    let (w, a, entry) = following_a_resting_entry().await;
    let store = a.store.clone();
    a.stop().await;
    assert_eq!(store.hinted_accounts(), 0, "keys dropped with the lease");
    // Nothing stored changed.
    assert_eq!(w.store.entry(entry).await.unwrap().status, EntryStatus::New);
}

/// A gateway whose lease moves to another holder stops following the
/// account and drops its keys while it goes on running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_lease_moves_elsewhere_forgets_the_accounts_keys() {
    let (w, a, entry) = following_a_resting_entry().await;
    let store = a.store.clone();
    // Another node holds the lease now, for longer than the test runs.
    w.db.run_sql(&format!(
        "UPDATE account_leases SET holder = 'gw-elsewhere', \
         expires_at = now() + interval '1 hour' WHERE account_id = {}",
        w.accounts[0].0
    ))
    .await;
    wait_for("the stream stopped", Duration::from_secs(10), || async {
        a.up() == 0 && store.hinted_accounts() == 0
    })
    .await;
    assert_eq!(w.store.entry(entry).await.unwrap().status, EntryStatus::New);
    a.stop().await;
}

/// A gateway's leases, except that every renewal after the first never
/// answers, as on a pooled connection gone half-open.
struct RenewalsHang {
    store: Arc<PgStore>,
    renewals: AtomicU64,
}

#[async_trait::async_trait]
impl Leases for RenewalsHang {
    async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<(AccountId, bool)>, StoreError> {
        Leases::acquire_leases(self.store.as_ref(), holder, max, ttl).await
    }

    async fn renew_leases(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Vec<AccountId>, StoreError> {
        if self.renewals.fetch_add(1, Ordering::Relaxed) > 0 {
            std::future::pending::<()>().await;
        }
        Leases::renew_leases(self.store.as_ref(), holder, ttl).await
    }

    async fn release_leases(&self, holder: &str) -> Result<(), StoreError> {
        Leases::release_leases(self.store.as_ref(), holder).await
    }
}

/// A gateway's leases that note, when an acquisition first returns an
/// account, how many streams another gateway had up at that moment.
struct NoteOtherAtAcquire {
    store: Arc<PgStore>,
    other: Arc<GatewayStats>,
    noted: Arc<std::sync::Mutex<Option<u64>>>,
}

#[async_trait::async_trait]
impl Leases for NoteOtherAtAcquire {
    async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<(AccountId, bool)>, StoreError> {
        let taken = Leases::acquire_leases(self.store.as_ref(), holder, max, ttl).await?;
        if !taken.is_empty() {
            let mut noted = self.noted.lock().unwrap();
            noted.get_or_insert(self.other.streams_up.load(Ordering::Relaxed));
        }
        Ok(taken)
    }

    async fn renew_leases(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Vec<AccountId>, StoreError> {
        Leases::renew_leases(self.store.as_ref(), holder, ttl).await
    }

    async fn release_leases(&self, holder: &str) -> Result<(), StoreError> {
        Leases::release_leases(self.store.as_ref(), holder).await
    }
}

/// A gateway whose lease renewal hangs (a half-open pooled connection: TCP
/// would give up after about 15 min) lets its accounts go before their
/// leases end: by the time another gateway takes the account, the first no
/// longer streams it. And it still stops when told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_renewal_hangs_lets_its_accounts_go_before_another_takes_them() {
    let w = world(1).await;
    // Leases of 3 s renewed every second: let go 2 s after the last renewal
    // that went through began.
    let a = w
        .gateway_on(
            "gw-a",
            10,
            binance(&w.sim),
            |store| {
                Arc::new(RenewalsHang {
                    store,
                    renewals: AtomicU64::new(0),
                })
            },
            |config| config.renew_every = Duration::from_secs(1),
        )
        .await;
    wait_for("gw-a's stream", Duration::from_secs(10), || async {
        a.up() == 1 && w.sim.control().subscription_count() == 1
    })
    .await;
    let noted = Arc::new(std::sync::Mutex::new(None));
    let b = w
        .gateway_on(
            "gw-b",
            10,
            binance(&w.sim),
            |store| {
                Arc::new(NoteOtherAtAcquire {
                    store,
                    other: a.stats.clone(),
                    noted: noted.clone(),
                })
            },
            |_| {},
        )
        .await;
    wait_for("gw-b's stream", Duration::from_secs(15), || async {
        b.up() == 1
    })
    .await;
    assert_eq!(
        *noted.lock().unwrap(),
        Some(0),
        "gw-a still streamed the account when gw-b took it"
    );
    assert!(a.stats.stream_states().is_empty(), "gw-a let it go");
    wait_for("one subscription", Duration::from_secs(10), || async {
        w.sim.control().subscription_count() == 1
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), a.stop())
        .await
        .expect("gw-a stops while its renewal hangs");
    b.stop().await;
}

/// Every kind of gap on a real stream flags the account for `sync` with a
/// row naming why and a notification: the connection dropped, the server
/// silent, the subscription ended by the server, the server shutting down,
/// and the lease taken over after its holder stopped renewing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_gap_flags_the_account_with_a_row_and_a_notification() {
    let w = world(1).await;
    let ctl = w.sim.control();
    let account = w.accounts[0];
    // The server pings every 200 ms (Binance: 20 s), and a server that pings
    // is judged silent once its pings stop, after two seconds here (Binance:
    // 60 s): answers to our own pings do not count then.
    ctl.set_ws_timings(
        Duration::from_millis(200),
        Duration::from_secs(10),
        Duration::from_secs(3600),
    );
    let mut adapter = binance(&w.sim);
    adapter.stream.stall_timeout = Duration::from_secs(2);
    let gw = w.gateway_with("gw-1", 10, adapter).await;
    let mut listener = w.store.listen_reconcile().await.unwrap();
    let cases: [(&str, &str); 5] = [
        ("dropped", "stream gap"),
        ("stalled", "stream gap"),
        ("terminated", "stream gap"),
        ("server shutdown", "stream gap"),
        ("lease taken over", "lease takeover"),
    ];
    for (gap, reason) in cases {
        wait_for(
            &format!("the stream before '{gap}'"),
            Duration::from_secs(15),
            || async { gw.up() == 1 && ctl.subscription_count() == 1 },
        )
        .await;
        // What the stream's opening flagged is taken first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(notified) =
            tokio::time::timeout(Duration::from_millis(200), listener.recv()).await
        {
            notified.unwrap();
        }
        w.store.take_flagged(10).await.unwrap();
        match gap {
            "dropped" => assert_eq!(ctl.drop_streams(Some(&api_key(0))), 1),
            "stalled" => {
                ctl.set_streams_stalled(true);
                tokio::time::sleep(Duration::from_secs(3)).await;
                ctl.set_streams_stalled(false);
            }
            "terminated" => assert_eq!(ctl.terminate_subscriptions(&api_key(0)), 1),
            "server shutdown" => assert_eq!(ctl.server_shutdown(Some(&api_key(0))), 1),
            _ => {
                // Another holder that then stops renewing: the gateway lets
                // the account go, and takes it over once the lease expires.
                w.db.run_sql(&format!(
                    "UPDATE account_leases SET holder = 'gw-gone', \
                     expires_at = now() + interval '1 second' WHERE account_id = {}",
                    account.0
                ))
                .await;
            }
        }
        let notified = tokio::time::timeout(Duration::from_secs(15), listener.recv())
            .await
            .unwrap_or_else(|_| panic!("no notification after '{gap}'"))
            .unwrap();
        assert_eq!(notified, account, "{gap}");
        assert_eq!(
            w.db.texts("SELECT reason AS s FROM reconcile_flags").await,
            vec![reason.to_owned()],
            "{gap}"
        );
        assert_eq!(
            w.store.take_flagged(10).await.unwrap(),
            vec![account],
            "{gap}"
        );
    }
    assert!(
        gw.stats.snapshot().gaps >= 4,
        "the gateway counted the gaps"
    );
    gw.stop().await;
}

/// A gap that comes while reconcile flags cannot be written (the database
/// refuses them) is still flagged, once they can be: the gateway owes the
/// flag and writes it again until it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_the_database_refused_is_written_once_it_can_be() {
    let w = world(1).await;
    let ctl = w.sim.control();
    let account = w.accounts[0];
    let gw = w.gateway("gw-1", 10).await;
    wait_for("the stream", Duration::from_secs(15), || async {
        gw.up() == 1 && ctl.subscription_count() == 1
    })
    .await;
    wait_for("the opening's flag", Duration::from_secs(10), || async {
        gw.stats.snapshot().flags >= 1
    })
    .await;
    assert_eq!(w.store.take_flagged(10).await.unwrap(), vec![account]);
    w.db.run_sql("ALTER TABLE reconcile_flags RENAME TO reconcile_flags_away")
        .await;
    assert_eq!(ctl.drop_streams(Some(&api_key(0))), 1);
    wait_for("a refused flag write", Duration::from_secs(15), || async {
        let s = gw.stats.snapshot();
        s.flag_failures >= 1 && s.flags_owed == 1
    })
    .await;
    w.db.run_sql("ALTER TABLE reconcile_flags_away RENAME TO reconcile_flags")
        .await;
    wait_for("the owed flag", Duration::from_secs(15), || async {
        w.db.texts("SELECT reason AS s FROM reconcile_flags").await == ["stream gap"]
    })
    .await;
    assert_eq!(gw.stats.snapshot().flags_owed, 0);
    assert_eq!(w.store.take_flagged(10).await.unwrap(), vec![account]);
    gw.stop().await;
}

/// An account registered while a gateway runs is streamed and protected
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_registered_while_the_gateway_runs_is_followed() {
    let mut w = world(1).await;
    let ctl = w.sim.control();
    ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    let gw = w.gateway("gw-1", 10).await;
    wait_for("the first stream", Duration::from_secs(10), || async {
        gw.up() == 1
    })
    .await;
    ctl.add_account(AccountSpec::new(
        api_key(1),
        "secret-1".to_owned(),
        vec![("USDT".into(), dec!(100000))],
    ));
    let added = w
        .store
        .create_account(NewAccount {
            owner: "user-1".into(),
            exchange: "binance".into(),
            credentials: creds(1),
            protection: ProtectionConfig::DEFAULT,
        })
        .await
        .unwrap();
    w.accounts.push(added.id);
    wait_for(
        "the new account's stream",
        Duration::from_secs(10),
        || async { gw.up() == 2 && ctl.subscription_count() == 2 },
    )
    .await;
    let entry = w.buy(1, "BTCUSDT", dec!(0.01)).await;
    wait_for("its fill protected", Duration::from_secs(10), || async {
        w.all_protected(&[entry], Some(Source::Websocket)).await
    })
    .await;
    w.assert_each_protected_once(&[entry]).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_during_fills_flags_the_account_and_sync_protects_each_fill_once() {
    let w = world(1).await;
    let ctl = w.sim.control();
    ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    let gw = w.gateway("gw-1", 10).await;
    wait_for("the stream", Duration::from_secs(10), || async {
        gw.up() == 1 && ctl.subscription_count() == 1
    })
    .await;
    // The fresh subscription flags the account; take that flag first.
    wait_for("the subscription flag", Duration::from_secs(5), || async {
        w.store.take_flagged(10).await.unwrap() == vec![w.accounts[0]]
    })
    .await;
    let first = w.buy(0, "BTCUSDT", dec!(0.01)).await;
    wait_for(
        "the first fill protected",
        Duration::from_secs(10),
        || async { w.all_protected(&[first], Some(Source::Websocket)).await },
    )
    .await;
    // The connection dies; two fills happen while nobody listens.
    assert_eq!(ctl.drop_streams(Some(&api_key(0))), 1);
    let missed = vec![
        w.buy(0, "BTCUSDT", dec!(0.01)).await,
        w.buy(0, "ETHUSDT", dec!(0.1)).await,
    ];
    wait_for("the gap flag", Duration::from_secs(15), || async {
        w.store.take_flagged(10).await.unwrap() == vec![w.accounts[0]]
    })
    .await;
    assert!(gw.stats.snapshot().gaps >= 1, "the gateway saw the gap");
    // Nothing replays the missed fills: they are still bare.
    for id in &missed {
        assert!(
            w.store.legs(*id).await.unwrap().is_empty(),
            "entry {id} was protected without a replay"
        );
    }
    // sync reconciles the flagged account.
    let reconciler = sync::Reconciler::wired(
        Arc::new(BinanceExchange::new(binance(&w.sim)).unwrap()),
        w.store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(w.ids.clone()),
        sync::SyncConfig::standard(),
    );
    reconciler.reconcile_account(w.accounts[0]).await.unwrap();
    assert!(w.all_protected(&missed, Some(Source::Sync)).await);
    let all: Vec<EntryId> = std::iter::once(first).chain(missed).collect();
    w.assert_each_protected_once(&all).await;
    assert_eq!(w.open_lists(), 6);
    // A second pass (or a late duplicate) places nothing more.
    reconciler.reconcile_account(w.accounts[0]).await.unwrap();
    assert_eq!(ctl.order_lists(None).len(), 6);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_profit_fill_and_a_stop_fill_close_the_entry() {
    let w = world(1).await;
    let ctl = w.sim.control();
    ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    let gw = w.gateway("gw-1", 10).await;
    wait_for("the stream", Duration::from_secs(10), || async {
        gw.up() == 1 && ctl.subscription_count() == 1
    })
    .await;
    let entry = w.buy(0, "BTCUSDT", dec!(0.01)).await;
    wait_for("two legs", Duration::from_secs(10), || async {
        w.open_lists() == 2 && w.all_protected(&[entry], Some(Source::Websocket)).await
    })
    .await;
    let mut legs = w.store.legs(entry).await.unwrap();
    legs.sort_by_key(|l| l.take_profit.get());
    let (low, high) = (&legs[0], &legs[1]);
    assert!(
        low.take_profit.get() < high.take_profit.get(),
        "two targets"
    );
    // Through the first target only.
    let tp = low.take_profit.get();
    ctl.set_price("BTCUSDT", (tp + high.take_profit.get()) / dec!(2))
        .unwrap();
    wait_for("the first list done", Duration::from_secs(10), || async {
        w.open_lists() == 1
    })
    .await;
    // Below the other list's stop (above its stop limit, so it fills).
    let stop = high.stop.get();
    let under = high
        .stop_limit
        .map_or(stop - dec!(10), |l| (stop + l.get()) / dec!(2));
    ctl.set_price("BTCUSDT", under.round_dp(2)).unwrap();
    wait_for("the entry closed", Duration::from_secs(10), || async {
        let e = w.store.entry(entry).await.unwrap();
        e.protection == Protection::Closed && e.realized_quote.is_some()
    })
    .await;
    assert_eq!(w.open_lists(), 0);
    let e = w.store.entry(entry).await.unwrap();
    let realized = e.realized_quote.unwrap();
    // Half sold about +1 %, half about −1 %: a small result either way, net of fees.
    assert!(
        realized.abs() < dec!(5),
        "realized {realized} out of range for 0.01 BTC at 60,000"
    );
    assert_eq!(
        ctl.order_lists(None).len(),
        2,
        "no list replaced a filled one"
    );
    gw.stop().await;
}

/// "1,000 fills across 100 accounts", reshaped: an account holds at most 5
/// untriggered stops per symbol (Binance's MAX_NUM_ALGO_ORDERS, enforced by the
/// sim), so an account takes 2 entries (4 stop legs) on each of the three
/// symbols, and 167 accounts make 1,002 fills. About 10 s on 2 cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_fills_across_many_accounts_are_each_protected_once() {
    const ACCOUNTS: usize = 167;
    let w = Arc::new(world(ACCOUNTS).await);
    let ctl = w.sim.control();
    ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    ctl.set_price("ETHUSDT", dec!(3000)).unwrap();
    ctl.set_price("BNBUSDT", dec!(600)).unwrap();
    // The tests' short lease (3 s): renewals run on the store's lease
    // connections, so the burst of fills does not delay them until the
    // gateway takes a busy pool for a lost database and lets every account go.
    let gw = w.gateway("gw-1", 1000).await;
    wait_for("every stream", Duration::from_secs(30), || async {
        gw.up() == ACCOUNTS as u64 && ctl.subscription_count() == ACCOUNTS
    })
    .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..ACCOUNTS {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..2 {
                ids.push(w.buy(i, "BTCUSDT", dec!(0.001)).await);
                ids.push(w.buy(i, "ETHUSDT", dec!(0.02)).await);
                ids.push(w.buy(i, "BNBUSDT", dec!(0.1)).await);
            }
            ids
        }));
    }
    let mut entries = Vec::new();
    for t in tasks {
        entries.extend(t.await.unwrap());
    }
    let fills = entries.len();
    assert_eq!(fills, ACCOUNTS * 6);
    wait_for("every fill protected", Duration::from_secs(60), || async {
        w.open_lists() >= 2 * fills && w.all_protected(&entries, None).await
    })
    .await;
    let took = started.elapsed();
    assert!(
        w.all_protected(&entries, Some(Source::Websocket)).await,
        "every entry protected by the stream"
    );
    w.assert_each_protected_once(&entries).await;
    wait_for(
        "the gateway's counters",
        Duration::from_secs(10),
        || async {
            let s = gw.stats.snapshot();
            s.entry_fills >= fills as u64 && s.placements >= 2 * fills as u64
        },
    )
    .await;
    let s = gw.stats.snapshot();
    assert_eq!(s.entry_fills, fills as u64);
    assert_eq!(s.placements, 2 * fills as u64);
    assert_eq!(s.failures, 0);
    eprintln!("{fills} fills across {ACCOUNTS} accounts protected in {took:?}");
}
