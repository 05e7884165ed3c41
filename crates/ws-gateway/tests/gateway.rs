//! The gateway over the in-memory store, the exchange double and in-memory
//! streams. (The same scenarios over PostgreSQL and the simulator live in the
//! workspace's end-to-end tests.)
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oco_core::ids::IdScheme;
use oco_core::levels::EntryLevels;
use oco_core::mem::MemStore;
use oco_core::model::{
    EntryKind, EntryTags, Fill, Millis, NewEntry, OrderSize, Protection, ProtectionConfig,
};
use oco_core::ports::{
    ApiCredentials, ExecutionUpdate, Leases, NewAccount, Side, Store, StreamEvent, UserStream,
    UserStreamSession,
};
use oco_core::protect::{Protector, ProtectorConfig};
use oco_core::state::EntryStatus;
use oco_core::symbol::Asset;
use oco_core::testing::{FakeExchange, Hooked, StoreHooks, btcusdt_rules};
use oco_core::{AccountId, EntryId, ExchangeError, Price, Qty, SystemClock};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;
use tokio::sync::mpsc;
use ws_gateway::{Gateway, GatewayConfig};

type Tx = mpsc::UnboundedSender<Result<StreamEvent, ExchangeError>>;

/// Streams whose events the test pushes, per API key.
#[derive(Default)]
struct Streams {
    senders: Mutex<HashMap<String, Vec<Tx>>>,
    /// Events a stream of the key holds from its start, already arrived.
    preloaded: Mutex<HashMap<String, Vec<StreamEvent>>>,
    /// Opens refused as rate-limited, each for its wait, before any succeeds.
    rate_limited: Mutex<Vec<Duration>>,
    /// Every open refused while set (the exchange unreachable).
    refuse: std::sync::atomic::AtomicBool,
    /// Opens asked for, refused ones included.
    opens: std::sync::atomic::AtomicU64,
}

struct Session(mpsc::UnboundedReceiver<Result<StreamEvent, ExchangeError>>);

#[async_trait]
impl UserStreamSession for Session {
    async fn next_event(&mut self) -> Result<StreamEvent, ExchangeError> {
        self.0
            .recv()
            .await
            .unwrap_or_else(|| Err(ExchangeError::Transient("closed".into())))
    }

    fn ready_event(&mut self) -> Option<Result<StreamEvent, ExchangeError>> {
        self.0.try_recv().ok()
    }
}

#[async_trait]
impl UserStream for Streams {
    async fn open(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Box<dyn UserStreamSession>, ExchangeError> {
        self.opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(retry_after) = self.rate_limited.lock().unwrap().pop() {
            return Err(ExchangeError::RateLimited { retry_after });
        }
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ExchangeError::Transient("connection refused".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for event in self
            .preloaded
            .lock()
            .unwrap()
            .remove(&creds.api_key)
            .unwrap_or_default()
        {
            let _ = tx.send(Ok(event));
        }
        self.senders
            .lock()
            .unwrap()
            .entry(creds.api_key.clone())
            .or_default()
            .push(tx);
        Ok(Box::new(Session(rx)))
    }
}

impl Streams {
    /// Sends to every open stream of `key`; how many received it.
    fn send(&self, key: &str, event: StreamEvent) -> usize {
        let mut senders = self.senders.lock().unwrap();
        let list = senders.entry(key.to_owned()).or_default();
        list.retain(|tx| !tx.is_closed());
        list.iter()
            .filter(|tx| tx.send(Ok(event.clone())).is_ok())
            .count()
    }

    /// Ends every open stream of `key` with an error.
    fn end(&self, key: &str) {
        let mut senders = self.senders.lock().unwrap();
        for tx in senders.entry(key.to_owned()).or_default().drain(..) {
            let _ = tx.send(Err(ExchangeError::Transient("connection lost".into())));
        }
    }

    fn open_count(&self, key: &str) -> usize {
        let mut senders = self.senders.lock().unwrap();
        let list = senders.entry(key.to_owned()).or_default();
        list.retain(|tx| !tx.is_closed());
        list.len()
    }
}

struct World {
    store: Arc<MemStore>,
    exchange: Arc<FakeExchange>,
    streams: Arc<Streams>,
    protector: Arc<Protector>,
    accounts: Vec<AccountId>,
}

async fn world(n_accounts: usize) -> World {
    world_with(
        n_accounts,
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    )
    .await
}

async fn world_with(n_accounts: usize, config: ProtectorConfig) -> World {
    let store = Arc::new(MemStore::new());
    let exchange = Arc::new(FakeExchange::new());
    exchange.add_symbol(btcusdt_rules(), Price::new(dec!(100)).unwrap());
    let mut accounts = Vec::new();
    for i in 0..n_accounts {
        let key = format!("key-{i}");
        let a = store
            .create_account(NewAccount {
                owner: "o".into(),
                exchange: "binance".into(),
                credentials: ApiCredentials {
                    api_key: key.clone(),
                    secret: SecretString::from("s"),
                },
                protection: ProtectionConfig::DEFAULT,
            })
            .await
            .unwrap();
        exchange.set_free(&key, "BTC", dec!(1000));
        accounts.push(a.id);
    }
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        Arc::new(SystemClock),
        config,
    ));
    World {
        store,
        exchange,
        streams: Arc::new(Streams::default()),
        protector,
        accounts,
    }
}

impl World {
    fn gateway(&self, holder: &str) -> Gateway {
        self.gateway_tuned(holder, |_| {})
    }

    /// [`World::gateway`] with its settings changed by `tune`.
    fn gateway_tuned(&self, holder: &str, tune: impl FnOnce(&mut GatewayConfig)) -> Gateway {
        let mut config = GatewayConfig::standard(holder);
        config.renew_every = Duration::from_millis(50);
        // Short enough for a test, long enough that a loaded machine's late
        // renewal does not expire a live gateway's lease and reopen its streams.
        config.lease_ttl = Duration::from_secs(3);
        tune(&mut config);
        Gateway::new(
            self.store.clone(),
            self.store.clone() as Arc<dyn Leases>,
            self.streams.clone(),
            self.protector.clone(),
            config,
        )
    }

    /// Starts gateway `gw-1` over the world's single account, waits for its
    /// stream and takes the flag its fresh subscription sets; the sender
    /// stops it.
    async fn streaming_one(&self) -> tokio::sync::oneshot::Sender<()> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(self.gateway("gw-1").run(async move {
            let _ = stop_rx.await;
        }));
        wait_until("the stream", Duration::from_secs(5), || {
            self.streams.open_count(&key(0)) == 1
        })
        .await;
        // The fresh subscription itself flags the account: nothing is replayed.
        assert_eq!(
            self.store.take_flagged(10).await.unwrap(),
            vec![self.accounts[0]]
        );
        stop_tx
    }

    /// Waits up to `limit` until the single account is flagged again.
    async fn flagged_again(&self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.store.take_flagged(10).await.unwrap() != vec![self.accounts[0]] {
            assert!(Instant::now() < deadline, "{what} flags the account");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Another caller claims the first leg of `entry`'s `generation` for
    /// `qty` and dies before sending it.
    async fn claim_and_die(&self, entry: EntryId, generation: u32, qty: Decimal) {
        let leg = oco_core::LegKey {
            entry,
            leg: oco_core::LegIndex::First,
            generation,
        };
        let claimed = self
            .store
            .claim_legs(&[oco_core::model::LegClaim {
                key: leg,
                ids: IdScheme::new("og").unwrap().oco(leg).unwrap(),
                symbol: "BTCUSDT".into(),
                qty: Qty::new(qty).unwrap(),
                take_profit: Price::new(dec!(101)).unwrap(),
                stop: Price::new(dec!(99)).unwrap(),
                stop_limit: None,
                source: oco_core::model::Source::Sync,
                at: oco_core::Clock::now(&SystemClock),
            }])
            .await
            .unwrap();
        assert_eq!(claimed, vec![true], "claimed by the caller that dies");
    }

    async fn entry(&self, account: AccountId) -> (EntryId, String) {
        let ids = IdScheme::new("og").unwrap();
        let e = self
            .store
            .create_entry(
                NewEntry {
                    account,
                    symbol: btcusdt_rules().symbol,
                    kind: EntryKind::Market,
                    size: OrderSize::Base(Qty::new(dec!(0.2)).unwrap()),
                    levels: EntryLevels::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
                },
                &move |id| ids.entry(id).unwrap(),
                Millis(0),
            )
            .await
            .unwrap();
        (e.id, e.client_id.as_str().to_owned())
    }

    /// Fills a new entry of the single account on its stream and waits for
    /// its two lists: the entry and one of its placed legs.
    async fn protected_from_the_stream(&self) -> (EntryId, oco_core::model::Leg) {
        let (entry, client_id) = self.entry(self.accounts[0]).await;
        self.streams.send(&key(0), fill_event(&client_id, 1));
        wait_until("two legs", Duration::from_secs(5), || {
            self.exchange.open_lists().len() == 2
        })
        .await;
        let leg = self
            .store
            .legs(entry)
            .await
            .unwrap()
            .into_iter()
            .find(|l| matches!(l.state, oco_core::LegState::Placed { .. }))
            .unwrap();
        (entry, leg)
    }

    /// Cancels `leg`'s list as a user would by hand, and sends what the
    /// stream says of it: both orders canceled with nothing executed and no
    /// expiry reason (which one update cannot tell from the take-profit a
    /// triggered stop removes), then the list's end.
    fn cancel_by_hand_on_the_stream(&self, leg: &oco_core::model::Leg) {
        self.exchange.cancel_externally(leg.ids.list.as_str());
        for (client_id, order_type) in [
            (leg.ids.stop_loss.as_str(), "STOP_LOSS_LIMIT"),
            (leg.ids.take_profit.as_str(), "LIMIT_MAKER"),
        ] {
            let StreamEvent::Execution(accepted) = accepted_event(client_id, 9) else {
                unreachable!("accepted_event makes an execution")
            };
            self.streams.send(
                &key(0),
                StreamEvent::Execution(ExecutionUpdate {
                    side: Side::Sell,
                    order_type: order_type.into(),
                    execution: "CANCELED".into(),
                    status: EntryStatus::Canceled,
                    ..accepted
                }),
            );
        }
        self.streams.send(
            &key(0),
            StreamEvent::List(oco_core::ports::ListUpdate {
                symbol: "BTCUSDT".into(),
                list_id: 77,
                list_client_id: leg.ids.list.as_str().to_owned(),
                executing: false,
                event_time: Millis(3),
            }),
        );
    }
}

fn fill_event(client_id: &str, trade_id: i64) -> StreamEvent {
    StreamEvent::Execution(ExecutionUpdate {
        symbol: "BTCUSDT".into(),
        client_id: client_id.into(),
        order_id: trade_id,
        list_id: -1,
        side: Side::Buy,
        order_type: "MARKET".into(),
        execution: "TRADE".into(),
        status: EntryStatus::Filled,
        executed_qty: Qty::new(dec!(0.2)).unwrap(),
        cumulative_quote: dec!(20),
        fill: Some(Fill {
            trade_id,
            price: Price::new(dec!(100)).unwrap(),
            qty: Qty::new(dec!(0.2)).unwrap(),
            commission: dec!(0),
            commission_asset: Asset("BNB".into()),
            time: Millis(1),
        }),
        expiry_reason: None,
        event_time: Millis(2),
    })
}

async fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn key(i: usize) -> String {
    format!("key-{i}")
}

fn accepted_event(client_id: &str, order_id: i64) -> StreamEvent {
    let StreamEvent::Execution(fill) = fill_event(client_id, order_id) else {
        unreachable!("fill_event makes an execution")
    };
    StreamEvent::Execution(ExecutionUpdate {
        execution: "NEW".into(),
        status: EntryStatus::New,
        executed_qty: Qty::ZERO,
        cumulative_quote: dec!(0),
        fill: None,
        ..fill
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acceptance_with_its_fill_already_behind_it_is_not_written() {
    let w = world(1).await;
    let (first, first_client) = w.entry(w.accounts[0]).await;
    // Acceptance and fill both arrived before the gateway reads the first,
    // as a MARKET entry's do: one write.
    w.streams.preloaded.lock().unwrap().insert(
        key(0),
        vec![
            accepted_event(&first_client, 41),
            fill_event(&first_client, 41),
        ],
    );
    let gateway = w.gateway("gw-1");
    let stats = gateway.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = stopped.await;
    }));
    wait_until("two legs", Duration::from_secs(5), || {
        w.exchange.open_lists().len() == 2
    })
    .await;
    let entry = w.store.entry(first).await.unwrap();
    assert_eq!(entry.order_id, Some(41), "the fill names the order");
    assert_eq!(entry.status, EntryStatus::Filled);
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.superseded, 1, "{snapshot:?}");

    // An acceptance alone (a LIMIT entry resting) is recorded.
    let (second, second_client) = w.entry(w.accounts[0]).await;
    w.streams.send(&key(0), accepted_event(&second_client, 42));
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.store.entry(second).await.unwrap().status != EntryStatus::New {
        assert!(Instant::now() < deadline, "the acceptance is recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.store.entry(second).await.unwrap().order_id, Some(42));
    assert_eq!(stats.snapshot().superseded, 1);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_on_the_stream_gets_both_legs() {
    let w = world(1).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gw = tokio::spawn(w.gateway("gw-1").run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("the stream to open", Duration::from_secs(5), || {
        w.streams.open_count(&key(0)) == 1
    })
    .await;
    let (_, client_id) = w.entry(w.accounts[0]).await;
    assert_eq!(w.streams.send(&key(0), fill_event(&client_id, 1)), 1);
    wait_until("two legs", Duration::from_secs(5), || {
        w.exchange.open_lists().len() == 2
    })
    .await;
    stop_tx.send(()).unwrap();
    gw.await.unwrap().unwrap();
    // Shutdown releases the lease at once.
    let taken = w
        .store
        .acquire_leases("other", 10, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_fills_across_a_hundred_accounts_are_each_protected_once() {
    let w = world(100).await;
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(w.gateway("gw-1").run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("100 streams", Duration::from_secs(10), || {
        (0..100).all(|i| w.streams.open_count(&key(i)) == 1)
    })
    .await;
    let mut entries = Vec::new();
    for round in 0..10 {
        for (i, account) in w.accounts.iter().enumerate() {
            let (id, client_id) = w.entry(*account).await;
            // Each fill is delivered twice, as a reconnecting stream or a second layer might.
            w.streams
                .send(&key(i), fill_event(&client_id, (round * 1000 + i) as i64));
            w.streams
                .send(&key(i), fill_event(&client_id, (round * 1000 + i) as i64));
            entries.push(id);
        }
    }
    wait_until("2,000 legs", Duration::from_secs(60), || {
        w.exchange.lists().len() >= 2000
    })
    .await;
    // Let any duplicate work finish, then check nothing was placed twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.exchange.lists().len(), 2000);
    assert_eq!(w.exchange.oco_calls(), 2000, "no leg was sent twice");
    for id in entries {
        assert_eq!(
            w.store.legs(id).await.unwrap().len(),
            2,
            "entry {id} has exactly its two legs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_flags_the_account_for_reconciliation() {
    let w = world(1).await;
    let _stop = w.streaming_one().await;
    w.streams.send(
        &key(0),
        StreamEvent::Gap {
            from: Millis(1),
            to: Millis(2),
        },
    );
    w.flagged_again("the gap", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_split_the_accounts_and_a_dead_ones_accounts_move() {
    let w = world(4).await;
    let a_cfg = w.gateway("gw-a");
    let (stop_a, rx_a) = tokio::sync::oneshot::channel::<()>();
    let (_stop_b, rx_b) = tokio::sync::oneshot::channel::<()>();
    let gw_a = tokio::spawn(a_cfg.run(async move {
        let _ = rx_a.await;
    }));
    wait_until("gw-a streams all four", Duration::from_secs(5), || {
        (0..4).all(|i| w.streams.open_count(&key(i)) == 1)
    })
    .await;
    let gw_b = w.gateway("gw-b");
    let b_stats = gw_b.stats();
    tokio::spawn(gw_b.run(async move {
        let _ = rx_b.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        (0..4).all(|i| w.streams.open_count(&key(i)) == 1),
        "each account has one stream"
    );
    // gw-a stops; gw-b takes every account.
    stop_a.send(()).unwrap();
    gw_a.await.unwrap().unwrap();
    // gw-a's aborted tasks drop their sessions a moment after `run` returns:
    // until gw-b reports its own four streams, an open one may still be gw-a's.
    wait_until("gw-b streams all four", Duration::from_secs(10), || {
        b_stats.snapshot().streams_up == 4 && (0..4).all(|i| w.streams.open_count(&key(i)) == 1)
    })
    .await;
    let (_, client_id) = w.entry(w.accounts[2]).await;
    assert_eq!(
        w.streams.send(&key(2), fill_event(&client_id, 7)),
        1,
        "exactly one stream receives it"
    );
    wait_until("legs", Duration::from_secs(15), || {
        w.exchange.open_lists().len() == 2
    })
    .await;
}

/// Delays every placement of one API key, as a slow exchange connection would.
struct SlowFor {
    inner: Arc<FakeExchange>,
    slow_key: String,
}

#[async_trait]
impl oco_core::Exchange for SlowFor {
    async fn symbol_rules(&self, s: &str) -> Result<oco_core::SymbolRules, ExchangeError> {
        self.inner.symbol_rules(s).await
    }
    fn invalidate_rules(&self, s: &str) {
        self.inner.invalidate_rules(s)
    }
    fn placements_held(&self, c: &ApiCredentials, lists: u32) -> Option<Duration> {
        self.inner.placements_held(c, lists)
    }
    async fn last_price(&self, s: &str) -> Result<Price, ExchangeError> {
        self.inner.last_price(s).await
    }
    async fn balances(
        &self,
        c: &ApiCredentials,
    ) -> Result<Vec<oco_core::ports::Balance>, ExchangeError> {
        self.inner.balances(c).await
    }
    async fn place_order(
        &self,
        c: &ApiCredentials,
        o: &oco_core::ports::OrderRequest,
    ) -> Result<oco_core::ports::OrderSnapshot, ExchangeError> {
        self.inner.place_order(c, o).await
    }
    async fn query_order(
        &self,
        c: &ApiCredentials,
        s: &str,
        id: &str,
    ) -> Result<oco_core::ports::OrderSnapshot, ExchangeError> {
        self.inner.query_order(c, s, id).await
    }
    async fn order_trades(
        &self,
        c: &ApiCredentials,
        s: &str,
        id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        self.inner.order_trades(c, s, id).await
    }
    async fn cancel_order(
        &self,
        c: &ApiCredentials,
        s: &str,
        id: &str,
    ) -> Result<oco_core::ports::CancelOutcome, ExchangeError> {
        self.inner.cancel_order(c, s, id).await
    }
    async fn place_oco(
        &self,
        c: &ApiCredentials,
        o: &oco_core::ports::OcoRequest,
    ) -> Result<oco_core::ports::OcoAck, ExchangeError> {
        if c.api_key == self.slow_key {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        self.inner.place_oco(c, o).await
    }
    async fn order_list(
        &self,
        c: &ApiCredentials,
        s: &str,
        id: &str,
    ) -> Result<Option<oco_core::ports::OrderListSnapshot>, ExchangeError> {
        self.inner.order_list(c, s, id).await
    }
    async fn open_order_lists(
        &self,
        c: &ApiCredentials,
    ) -> Result<Vec<oco_core::ports::OrderListSnapshot>, ExchangeError> {
        self.inner.open_order_lists(c).await
    }
    async fn cancel_order_list(
        &self,
        c: &ApiCredentials,
        s: &str,
        id: &str,
    ) -> Result<oco_core::ports::ListCancelOutcome, ExchangeError> {
        self.inner.cancel_order_list(c, s, id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_account_does_not_delay_another() {
    let mut w = world(2).await;
    w.protector = Arc::new(Protector::new(
        Arc::new(SlowFor {
            inner: w.exchange.clone(),
            slow_key: key(0),
        }),
        w.store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    ));
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(w.gateway("gw-1").run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("two streams", Duration::from_secs(5), || {
        (0..2).all(|i| w.streams.open_count(&key(i)) == 1)
    })
    .await;
    let (_, slow) = w.entry(w.accounts[0]).await;
    let (fast_id, fast) = w.entry(w.accounts[1]).await;
    w.streams.send(&key(0), fill_event(&slow, 1));
    w.streams.send(&key(1), fill_event(&fast, 2));
    let started = Instant::now();
    let store = w.store.clone();
    loop {
        if store.legs(fast_id).await.unwrap().len() == 2 && w.exchange.open_lists().len() == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the fast account waited for the slow one"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        w.exchange.open_lists().iter().all(|l| l.api_key == key(1)),
        "only the fast account is protected so far"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_placement_flags_the_account_at_once() {
    let w = world(1).await;
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(w.gateway("gw-1").run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("the stream", Duration::from_secs(5), || {
        w.streams.open_count(&key(0)) == 1
    })
    .await;
    // The fresh subscription's own flag first.
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.store.take_flagged(10).await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the subscription flags the account"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.exchange.push_oco_fault(oco_core::testing::OcoFault::Fail(
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(1),
        },
    ));
    let (_, client_id) = w.entry(w.accounts[0]).await;
    w.streams.send(&key(0), fill_event(&client_id, 1));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if w.store.take_flagged(10).await.unwrap() == vec![w.accounts[0]] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a refused placement flags the account for sync"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_never_completes_flags_the_account_once_stale() {
    let mut config = ProtectorConfig::new(IdScheme::new("og").unwrap());
    config.claim_timeout = Duration::from_millis(300);
    let w = world_with(1, config).await;
    let _stop = w.streaming_one().await;
    let (entry, client_id) = w.entry(w.accounts[0]).await;
    // Another caller claimed the entry's first leg and died before sending.
    w.claim_and_die(entry, 0, dec!(0.1)).await;
    assert_eq!(w.streams.send(&key(0), fill_event(&client_id, 1)), 1);
    // The gateway finds the claim in flight and places nothing...
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(w.exchange.oco_calls(), 0);
    assert!(w.store.take_flagged(10).await.unwrap().is_empty());
    // ...and once the claim is stale, hands the entry to sync.
    w.flagged_again("the stale claim", Duration::from_secs(10))
        .await;
}

/// A fill of `executed` in all, of which this trade is `qty`.
fn part_fill_event(client_id: &str, trade_id: i64, qty: Decimal, executed: Decimal) -> StreamEvent {
    let StreamEvent::Execution(fill) = fill_event(client_id, trade_id) else {
        unreachable!("fill_event makes an execution")
    };
    let partial = executed < dec!(0.2);
    StreamEvent::Execution(ExecutionUpdate {
        status: if partial {
            EntryStatus::PartiallyFilled
        } else {
            EntryStatus::Filled
        },
        executed_qty: Qty::new(executed).unwrap(),
        cumulative_quote: executed * dec!(100),
        fill: fill.fill.map(|f| Fill {
            qty: Qty::new(qty).unwrap(),
            ..f
        }),
        ..fill
    })
}

/// An entry protected once, whose position then grew while another caller
/// claimed its next generation and died before sending: the entry still
/// reads `Protected` (it stays so once first reached), yet the grown position
/// waits on a claim nobody will send. The gateway flags it for sync once the
/// claim is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_claim_on_an_entry_already_protected_flags_the_account() {
    let mut config = ProtectorConfig::new(IdScheme::new("og").unwrap());
    config.claim_timeout = Duration::from_millis(300);
    let w = world_with(1, config).await;
    let _stop = w.streaming_one().await;
    let (entry, client_id) = w.entry(w.accounts[0]).await;
    w.streams.send(
        &key(0),
        part_fill_event(&client_id, 1, dec!(0.1), dec!(0.1)),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Protected { .. }
    ) {
        assert!(Instant::now() < deadline, "the first part is protected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let placed = w.exchange.oco_calls();
    // Another caller saw the rest, claimed generation 1 and died.
    w.claim_and_die(entry, 1, dec!(0.2)).await;
    w.streams.send(
        &key(0),
        part_fill_event(&client_id, 2, dec!(0.1), dec!(0.2)),
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(w.exchange.oco_calls(), placed, "the claim is in flight");
    assert!(w.store.take_flagged(10).await.unwrap().is_empty());
    assert!(matches!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    w.flagged_again(
        "the stale claim of a later generation",
        Duration::from_secs(10),
    )
    .await;
}

/// The update of `leg`'s take-profit filling `qty` of it in one trade: the
/// exchange drops the list's stop, the rest of the take-profit rests alone.
fn take_profit_part(leg: &oco_core::model::Leg, trade_id: i64, qty: Decimal) -> StreamEvent {
    let StreamEvent::Execution(whole) = take_profit_trade(leg, trade_id, dec!(0)) else {
        unreachable!("take_profit_trade makes an execution")
    };
    let qty = Qty::new(qty).unwrap();
    StreamEvent::Execution(ExecutionUpdate {
        status: EntryStatus::PartiallyFilled,
        executed_qty: qty,
        cumulative_quote: qty.notional(leg.take_profit),
        fill: whole.fill.map(|f| Fill { qty, ..f }),
        ..whole
    })
}

/// Waits up to 5 s until leg `key` of `entry` is in the state named `state`.
async fn leg_reaches(w: &World, entry: EntryId, key: oco_core::LegKey, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let legs = w.store.legs(entry).await.unwrap();
        if legs.iter().any(|l| l.key == key && l.state.name() == state) {
            return;
        }
        assert!(Instant::now() < deadline, "leg {key} {state}: {legs:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A list's take-profit fills in part (the exchange drops its stop) while
/// another caller's next generation is in flight: the follow-up finds the
/// claim and leaves the position to that caller. Once it has recorded its
/// lists the entry reads `Protected` with no claim left, whether or not it
/// saw the end (one that placed what it had planned before would leave the
/// rest without a stop, labelled covered). The gateway does not take the
/// label's word for it: past the claim timeout it flags the account, and
/// sync looks at the legs themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leg_ending_while_another_callers_placement_is_in_flight_flags_the_account() {
    let mut config = ProtectorConfig::new(IdScheme::new("og").unwrap());
    config.claim_timeout = Duration::from_secs(1);
    let w = world_with(1, config).await;
    let _stop = w.streaming_one().await;
    let (entry, leg) = w.protected_from_the_stream().await;
    // Another caller claimed generation 1 and is placing it.
    w.claim_and_die(entry, 1, dec!(0.2)).await;
    let next = oco_core::LegKey {
        entry,
        leg: oco_core::LegIndex::First,
        generation: 1,
    };
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), Qty::new(dec!(0.04)).unwrap());
    assert_eq!(
        w.streams
            .send(&key(0), take_profit_part(&leg, 901, dec!(0.04))),
        1
    );
    leg_reaches(&w, entry, leg.key, "canceled_externally").await;
    leg_reaches(&w, entry, next, "claimed").await;
    // That caller records its list placed and the entry stays labelled
    // protected, as by one that did not see the end.
    assert!(
        w.store
            .update_leg(&oco_core::model::LegUpdate {
                key: next,
                from: "claimed",
                to: oco_core::LegState::Placed { list_id: 9_999 },
                error: None,
                at: oco_core::Clock::now(&SystemClock),
            })
            .await
            .unwrap()
    );
    assert!(matches!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    assert!(
        w.store.take_flagged(10).await.unwrap().is_empty(),
        "not before the claim timeout"
    );
    w.flagged_again(
        "a leg's end left to a placement in flight",
        Duration::from_secs(10),
    )
    .await;
}

/// What the open lists hold under a stop still working (a list whose
/// take-profit filled in part lost its stop; its rest holds none).
fn stopped_qty(w: &World) -> Decimal {
    w.exchange
        .open_lists()
        .iter()
        .filter(|l| !l.stop_loss.status.is_final())
        .map(|l| l.request.qty.get())
        .sum()
}

/// The rest of a partly filled take-profit cannot be canceled (the order
/// API refuses, as under a rate limit): the entry's next fill still gets
/// lists of its own, over the coins the rest does not lock, but the rest
/// has no stop, so the account is flagged as for any protection left
/// incomplete, not left to sync's next full pass. When the rest is
/// canceled in the end (by hand here), its own update frees its coins, and
/// they are protected at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_placed_beside_a_take_profit_rest_still_open_flag_the_account() {
    let w = world(1).await;
    let _stop = w.streaming_one().await;
    let (entry, client_id) = w.entry(w.accounts[0]).await;
    w.streams.send(
        &key(0),
        part_fill_event(&client_id, 1, dec!(0.1), dec!(0.1)),
    );
    wait_until("the first part's list", Duration::from_secs(5), || {
        w.exchange.open_lists().len() == 1
    })
    .await;
    let leg = w.store.legs(entry).await.unwrap().remove(0);
    assert_eq!(leg.qty, Qty::new(dec!(0.1)).unwrap());

    w.exchange.fail_cancels(Some(ExchangeError::RateLimited {
        retry_after: Duration::from_secs(1),
    }));
    w.exchange
        .fill_take_profit(leg.ids.list.as_str(), Qty::new(dec!(0.04)).unwrap());
    w.streams
        .send(&key(0), take_profit_part(&leg, 901, dec!(0.04)));
    // Nothing else to place beside the rest: that call fails already.
    w.flagged_again("the rest's refused cancel", Duration::from_secs(5))
        .await;

    w.streams.send(
        &key(0),
        part_fill_event(&client_id, 2, dec!(0.1), dec!(0.2)),
    );
    let next = oco_core::LegKey {
        entry,
        leg: oco_core::LegIndex::First,
        generation: 1,
    };
    leg_reaches(&w, entry, next, "placed").await;
    assert_eq!(stopped_qty(&w), dec!(0.1), "the second part has its stop");
    assert_eq!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Unprotected
    );
    w.flagged_again(
        "lists placed beside a rest without a stop",
        Duration::from_secs(5),
    )
    .await;

    // The rest canceled by hand: its order's update and its list's end.
    w.exchange.fail_cancels(None);
    w.exchange.cancel_externally(leg.ids.list.as_str());
    let StreamEvent::Execution(part) = take_profit_part(&leg, 902, dec!(0.04)) else {
        unreachable!("take_profit_part makes an execution")
    };
    w.streams.send(
        &key(0),
        StreamEvent::Execution(ExecutionUpdate {
            execution: "CANCELED".into(),
            status: EntryStatus::Canceled,
            fill: None,
            ..part
        }),
    );
    w.streams.send(
        &key(0),
        StreamEvent::List(oco_core::ports::ListUpdate {
            symbol: "BTCUSDT".into(),
            list_id: 77,
            list_client_id: leg.ids.list.as_str().to_owned(),
            executing: false,
            event_time: Millis(6),
        }),
    );
    leg_reaches(&w, entry, leg.key, "replaced").await;
    wait_until(
        "every coin held under a stop",
        Duration::from_secs(5),
        || stopped_qty(&w) == dec!(0.16),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Protected { .. }
    ) {
        assert!(Instant::now() < deadline, "labelled protected again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gateway asked to stop while a protection is on its way finishes it
/// first: aborted between its claim and the exchange, the position would
/// wait for the claim timeout and a lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopping_finishes_the_protection_in_hand() {
    let w = world(1).await;
    let (stop_tx, run) = running(&w).await;
    let (entry, client_id) = w.entry(w.accounts[0]).await;
    let placing = hold_next_oco(&w, 500);
    assert_eq!(w.streams.send(&key(0), fill_event(&client_id, 1)), 1);
    tokio::time::timeout(Duration::from_secs(5), placing)
        .await
        .expect("the protection is being placed")
        .unwrap();
    let stopping = Instant::now();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("the gateway stops within its drain grace")
        .unwrap()
        .unwrap();
    assert!(
        stopping.elapsed() >= Duration::from_millis(300),
        "it waited for the protection"
    );
    assert_eq!(w.exchange.open_lists().len(), 2, "both legs went out");
    assert!(matches!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Protected { .. }
    ));
    let held = w
        .store
        .renew_leases("gw-1", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(held.is_empty(), "its leases are released: {held:?}");
}

/// A stream refused as rate-limited is opened again once the wait it was
/// told has passed, not at the next step of the reopen backoff (500 ms, then
/// 1 s): asking a rate-limiting exchange sooner only draws another refusal,
/// and a ban of the IP grows with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_as_rate_limited_waits_as_told() {
    let w = world(1).await;
    w.streams
        .rate_limited
        .lock()
        .unwrap()
        .push(Duration::from_millis(1500));
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(w.gateway("gw-1").run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("the stream", Duration::from_secs(10), || {
        w.streams.open_count(&key(0)) == 1
    })
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1450),
        "opened again after {waited:?}, before the 1.5 s it was told"
    );
    let _ = stop_tx.send(());
}

/// A stream that ends while it cannot be opened again (the exchange's
/// WebSocket API unreachable) flags its account at once: its fills meanwhile
/// are sync's, over REST, not left until a stream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_and_cannot_reopen_flags_the_account_at_once() {
    let w = world(1).await;
    let _stop = w.streaming_one().await;
    w.streams
        .refuse
        .store(true, std::sync::atomic::Ordering::Relaxed);
    w.streams.end(&key(0));
    w.flagged_again("the ended stream", Duration::from_secs(1))
        .await;
    assert_eq!(w.streams.open_count(&key(0)), 0, "not reopened");
}

/// A stopping gateway handles the events its streams had already delivered
/// (here a fill that arrived just as it was asked to stop) before it lets
/// the account go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopping_handles_the_events_already_delivered() {
    let w = world(1).await;
    let (stop_tx, run) = running(&w).await;
    let (first, first_client) = w.entry(w.accounts[0]).await;
    let (second, second_client) = w.entry(w.accounts[0]).await;
    // The first fill's protection is on its way when the stop comes; the
    // second fill is already in the stream's channel behind it.
    let placing = hold_next_oco(&w, 300);
    assert_eq!(w.streams.send(&key(0), fill_event(&first_client, 1)), 1);
    tokio::time::timeout(Duration::from_secs(5), placing)
        .await
        .expect("the first protection is being placed")
        .unwrap();
    assert_eq!(w.streams.send(&key(0), fill_event(&second_client, 2)), 1);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("the gateway stops within its drain grace")
        .unwrap()
        .unwrap();
    for entry in [first, second] {
        assert!(
            matches!(
                w.store.entry(entry).await.unwrap().protection,
                Protection::Protected { .. }
            ),
            "entry {entry} protected before the gateway let go"
        );
    }
}

/// Starts gateway `gw-1` and waits for the single account's stream; the
/// sender stops it, the handle ends when it has stopped.
async fn running(
    w: &World,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), ws_gateway::GatewayError>>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(w.gateway("gw-1").run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("the stream", Duration::from_secs(5), || {
        w.streams.open_count(&key(0)) == 1
    })
    .await;
    (stop_tx, run)
}

/// Holds the next OCO placement for `ms`; the receiver hears when it begins.
fn hold_next_oco(w: &World, ms: u64) -> tokio::sync::oneshot::Receiver<()> {
    let (placing_tx, placing) = tokio::sync::oneshot::channel::<()>();
    w.exchange.before_next_oco(move || {
        Box::pin(async move {
            let _ = placing_tx.send(());
            tokio::time::sleep(Duration::from_millis(ms)).await;
        })
    });
    placing
}

/// A lease taken over from a gateway that died is flagged for
/// reconciliation even while its stream cannot be opened (the exchange
/// refuses): the dead gateway's missed events are sync's at once, not at its
/// next full pass. Failing again, it is not flagged again; the stream that
/// opens in the end flags it (events since were missed too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_is_flagged_while_its_stream_cannot_open() {
    use std::sync::atomic::Ordering::Relaxed;
    let w = world(1).await;
    // A gateway that died holding the account's lease.
    w.store
        .acquire_leases("gw-dead", 10, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    w.streams.refuse.store(true, Relaxed);
    let gateway = w.gateway("gw-1");
    let stats = gateway.stats();
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = stop_rx.await;
    }));
    w.flagged_again("the takeover", Duration::from_secs(2))
        .await;
    assert_eq!(w.streams.open_count(&key(0)), 0, "no stream open");
    wait_until("two refused opens", Duration::from_secs(5), || {
        w.streams.opens.load(Relaxed) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        w.store.take_flagged(10).await.unwrap().is_empty(),
        "flagged once for the gap"
    );
    assert_eq!(stats.snapshot().flags, 1);
    w.streams.refuse.store(false, Relaxed);
    w.flagged_again("the stream opening at last", Duration::from_secs(5))
        .await;
    assert_eq!(w.streams.open_count(&key(0)), 1);
}

/// A stream that stays down flags its account again while it is down, so
/// that sync looks for the fills missed since the first flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stays_down_flags_its_account_again() {
    use std::sync::atomic::Ordering::Relaxed;
    let w = world(1).await;
    w.streams.refuse.store(true, Relaxed);
    let gateway = w.gateway_tuned("gw-1", |config| {
        config.reflag_while_down = Duration::from_millis(300);
    });
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = stop_rx.await;
    }));
    w.flagged_again("the first refused open", Duration::from_secs(2))
        .await;
    // Taken by sync: a later fill is missed too, and needs another flag.
    w.flagged_again("the stream still down", Duration::from_secs(3))
        .await;
    assert_eq!(w.streams.open_count(&key(0)), 0, "no stream open");
}

/// A stream that opens at the first attempt flags its account once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_at_once_flags_its_account_once() {
    let w = world(1).await;
    let gateway = w.gateway("gw-1");
    let stats = gateway.stats();
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = stop_rx.await;
    }));
    w.flagged_again("the stream opening", Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(w.store.take_flagged(10).await.unwrap().is_empty());
    assert_eq!(stats.snapshot().flags, 1);
}

/// A list end on one account's stream whose client id names an entry of
/// another account is not applied to that entry: looked up with this
/// account's keys the list is not found, and that absence must not end the
/// other account's leg (nor place a new generation for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_end_naming_another_accounts_entry_is_ignored() {
    let mut config = ProtectorConfig::new(IdScheme::new("og").unwrap());
    // A placed leg a lookup does not find counts as ended outside once this old.
    config.claim_timeout = Duration::from_millis(100);
    let w = world_with(2, config).await;
    let gateway = w.gateway("gw-1");
    let stats = gateway.stats();
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("two streams", Duration::from_secs(5), || {
        (0..2).all(|i| w.streams.open_count(&key(i)) == 1)
    })
    .await;
    let (entry, client_id) = w.entry(w.accounts[1]).await;
    w.streams.send(&key(1), fill_event(&client_id, 1));
    wait_until("two legs", Duration::from_secs(5), || {
        w.exchange.open_lists().len() == 2
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(
        w.store.entry(entry).await.unwrap().protection,
        Protection::Protected { .. }
    ) {
        assert!(Instant::now() < deadline, "the entry is protected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let legs = w.store.legs(entry).await.unwrap();
    let placed = w.exchange.oco_calls();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Account 0's stream: a list of its own under an id naming account 1's entry.
    w.streams.send(
        &key(0),
        StreamEvent::List(oco_core::ports::ListUpdate {
            symbol: "BTCUSDT".into(),
            list_id: 77,
            list_client_id: legs[0].ids.list.as_str().to_owned(),
            executing: false,
            event_time: Millis(3),
        }),
    );
    // Handled in order: once the gap behind it is counted, the list end was handled.
    w.streams.send(
        &key(0),
        StreamEvent::Gap {
            from: Millis(1),
            to: Millis(2),
        },
    );
    wait_until("the events handled", Duration::from_secs(5), || {
        stats.snapshot().gaps == 1
    })
    .await;
    assert_eq!(w.store.legs(entry).await.unwrap(), legs, "legs unchanged");
    assert_eq!(w.exchange.oco_calls(), placed, "nothing placed");
    assert_eq!(w.exchange.open_lists().len(), 2);
}

/// A list canceled by hand: both of its orders are reported canceled with
/// nothing executed and no expiry reason, which one order's update cannot
/// tell from the take-profit a triggered stop removes. The list's end
/// (`listStatus` `ALL_DONE`) is looked up, and the coins it held are
/// protected again at once, before any reconciliation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_canceled_by_hand_is_protected_again_at_its_end() {
    let w = world(1).await;
    let _stop_tx = w.streaming_one().await;
    let (entry, gone) = w.protected_from_the_stream().await;
    w.cancel_by_hand_on_the_stream(&gone);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let legs = w.store.legs(entry).await.unwrap();
        let ended = legs.iter().any(|l| {
            l.key == gone.key && matches!(l.state, oco_core::LegState::CanceledExternally { .. })
        });
        let again = legs
            .iter()
            .any(|l| l.key.generation == 1 && matches!(l.state, oco_core::LegState::Placed { .. }));
        if ended && again {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the list's end is protected again: {legs:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let open: Decimal = w
        .exchange
        .open_lists()
        .iter()
        .map(|l| l.request.qty.get())
        .sum();
    assert_eq!(open, dec!(0.2), "the whole position has a stop again");
    assert!(
        w.store.take_flagged(10).await.unwrap().is_empty(),
        "not left to reconciliation"
    );
}

/// The same list end, but its lookup does not show it: the exchange reads
/// lists from a database that can lag the end (a failed lookup leaves the
/// same). `ALL_DONE` alone does not say what the list sold, so the leg stays
/// working in the store; the gateway must not let `protect` call the coins
/// covered by it. Within moments the coins get a stop again or the account
/// is flagged for reconciliation, never left to sync's next full pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_end_its_lookup_does_not_show_is_not_taken_for_coverage() {
    let w = world(1).await;
    let _stop_tx = w.streaming_one().await;
    let (entry, gone) = w.protected_from_the_stream().await;
    w.exchange.lag_next_lookups(1);
    w.cancel_by_hand_on_the_stream(&gone);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if w.store.take_flagged(10).await.unwrap() == vec![w.accounts[0]] {
            // Flagged, not protected again: the label must not say covered.
            let e = w.store.entry(entry).await.unwrap();
            assert!(
                !matches!(e.protection, oco_core::model::Protection::Protected { .. }),
                "labelled protected while the list's end is unread: {e:?}"
            );
            let history = w.store.events(entry).await.unwrap();
            assert!(
                history
                    .iter()
                    .any(|h| h.kind == oco_core::protect::LIST_END_UNREAD),
                "{history:?}"
            );
            break;
        }
        let legs = w.store.legs(entry).await.unwrap();
        let again = legs
            .iter()
            .any(|l| l.key.generation == 1 && matches!(l.state, oco_core::LegState::Placed { .. }));
        if again {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a list end left unread is neither protected again nor flagged: {legs:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The world's leases, except that every renewal after the first fails at
/// once; notes when the first began.
struct RenewalsFail {
    store: Arc<MemStore>,
    first: Mutex<Option<Instant>>,
}

#[async_trait]
impl Leases for RenewalsFail {
    async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<(AccountId, bool)>, oco_core::StoreError> {
        self.store.acquire_leases(holder, max, ttl).await
    }

    async fn renew_leases(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Vec<AccountId>, oco_core::StoreError> {
        {
            let mut first = self.first.lock().unwrap();
            if first.is_some() {
                return Err(oco_core::StoreError::Unavailable(
                    "connection refused".into(),
                ));
            }
            *first = Some(Instant::now());
        }
        self.store.renew_leases(holder, ttl).await
    }

    async fn release_leases(&self, holder: &str) -> Result<(), oco_core::StoreError> {
        self.store.release_leases(holder).await
    }
}

/// A gateway that cannot renew its leases lets its accounts go one renewal
/// interval before the lease period since the last renewal that went
/// through began (not at the first failed renewal after the whole period):
/// by then another gateway may be about to take them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_let_go_a_renewal_interval_before_their_leases_end() {
    let w = world(1).await;
    let leases = Arc::new(RenewalsFail {
        store: w.store.clone(),
        first: Mutex::new(None),
    });
    let mut config = GatewayConfig::standard("gw-1");
    config.renew_every = Duration::from_millis(500);
    config.lease_ttl = Duration::from_secs(2);
    let gateway = Gateway::new(
        w.store.clone(),
        leases.clone(),
        w.streams.clone(),
        w.protector.clone(),
        config,
    );
    let stats = gateway.stats();
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = stop_rx.await;
    }));
    wait_until("the stream", Duration::from_secs(5), || {
        stats.snapshot().streams_up == 1
    })
    .await;
    wait_until("the stream let go", Duration::from_secs(5), || {
        stats.snapshot().streams_up == 0
    })
    .await;
    let renewed = leases.first.lock().unwrap().unwrap();
    let held = renewed.elapsed();
    assert!(
        held >= Duration::from_millis(1400) && held < Duration::from_millis(1900),
        "let go {held:?} after the last renewal began; leases of 2 s renewed every 500 ms"
    );
    assert!(stats.stream_states().is_empty());
}

/// Hooks holding every leg-trade write (a take-profit's commission, written
/// after protection as bookkeeping) until the test lets them through, as a
/// database slow to commit would.
struct HeldTrades {
    /// Leg-trade writes that have arrived, held or not.
    arrived: std::sync::atomic::AtomicUsize,
    /// Holds a permit once the writes may go through.
    open: tokio::sync::Semaphore,
}

impl HeldTrades {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            arrived: std::sync::atomic::AtomicUsize::new(0),
            open: tokio::sync::Semaphore::new(0),
        })
    }

    fn arrived(&self) -> usize {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets every write through, held ones and later ones.
    fn let_through(&self) {
        self.open.add_permits(1);
    }
}

#[async_trait]
impl StoreHooks<MemStore> for HeldTrades {
    async fn record_leg_trades(
        &self,
        inner: &MemStore,
        key: oco_core::LegKey,
        side: oco_core::model::SaleSide,
        trades: &[Fill],
    ) -> Result<(), oco_core::StoreError> {
        self.arrived
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The permit goes back when dropped: once open, every write passes.
        let _open = self.open.acquire().await;
        inner.record_leg_trades(key, side, trades).await
    }
}

impl World {
    /// The protector writes through `hooks` on the world's store (the
    /// gateway's own reads, flags and leases go to the store beneath).
    fn protector_through(&mut self, hooks: Arc<HeldTrades>) {
        self.protector = Arc::new(Protector::new(
            self.exchange.clone(),
            Arc::new(Hooked::new(self.store.clone(), hooks)),
            Arc::new(SystemClock),
            ProtectorConfig::new(IdScheme::new("og").unwrap()),
        ));
    }

    /// The USDT commissions recorded on leg `key` of `entry`.
    async fn commission(&self, entry: EntryId, key: oco_core::LegKey) -> Decimal {
        let legs = self.store.legs(entry).await.unwrap();
        let leg = legs.into_iter().find(|l| l.key == key).unwrap();
        leg.trades.fees.of(&Asset("USDT".into()))
    }

    /// Waits up to 5 s for `fee` USDT recorded on leg `key` of `entry`.
    async fn commission_recorded(&self, entry: EntryId, key: oco_core::LegKey, fee: Decimal) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.commission(entry, key).await != fee {
            assert!(
                Instant::now() < deadline,
                "the commission of {entry}'s take-profit is recorded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The update of `leg`'s take-profit filling whole in one trade that paid
/// `fee` USDT.
fn take_profit_trade(leg: &oco_core::model::Leg, trade_id: i64, fee: Decimal) -> StreamEvent {
    StreamEvent::Execution(ExecutionUpdate {
        symbol: "BTCUSDT".into(),
        client_id: leg.ids.take_profit.as_str().into(),
        order_id: trade_id,
        list_id: 77,
        side: Side::Sell,
        order_type: "LIMIT_MAKER".into(),
        execution: "TRADE".into(),
        status: EntryStatus::Filled,
        executed_qty: leg.qty,
        cumulative_quote: leg.qty.notional(leg.take_profit),
        fill: Some(Fill {
            trade_id,
            price: leg.take_profit,
            qty: leg.qty,
            commission: fee,
            commission_asset: Asset("USDT".into()),
            time: Millis(5),
        }),
        expiry_reason: None,
        event_time: Millis(5),
    })
}

/// Entry A protected from the stream and one of its legs' take-profit
/// filled on the stream, its trade's write held: the entry, that leg.
async fn take_profit_held(w: &World, held: &HeldTrades) -> (EntryId, oco_core::model::Leg) {
    let (a, leg) = w.protected_from_the_stream().await;
    w.exchange.fill_take_profit(leg.ids.list.as_str(), leg.qty);
    assert_eq!(
        w.streams
            .send(&key(0), take_profit_trade(&leg, 900, dec!(0.0101))),
        1
    );
    wait_until(
        "the take-profit's trade write",
        Duration::from_secs(5),
        || held.arrived() == 1,
    )
    .await;
    (a, leg)
}

/// A take-profit's trade write (its commission: bookkeeping) held up in the
/// store does not hold up the account's next event: another entry's fill
/// right behind it gets both its legs meanwhile, and the commission is
/// recorded once the write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leg_trade_write_held_up_does_not_delay_the_next_fill() {
    let mut w = world(1).await;
    let held = HeldTrades::new();
    w.protector_through(held.clone());
    let (stop_tx, run) = running(&w).await;
    let (a, leg) = take_profit_held(&w, &held).await;

    let (b, b_client) = w.entry(w.accounts[0]).await;
    assert_eq!(w.streams.send(&key(0), fill_event(&b_client, 2)), 1);
    // A's other leg, and B's two.
    wait_until(
        "B's two legs while A's trade write is held",
        Duration::from_secs(5),
        || w.exchange.open_lists().len() == 3,
    )
    .await;
    let b_legs = w.store.legs(b).await.unwrap();
    assert!(
        b_legs.len() == 2
            && b_legs
                .iter()
                .all(|l| matches!(l.state, oco_core::LegState::Placed { .. })),
        "{b_legs:?}"
    );
    assert_eq!(held.arrived(), 1);
    assert_eq!(
        w.commission(a, leg.key).await,
        dec!(0),
        "A's trade is not written yet"
    );

    held.let_through();
    w.commission_recorded(a, leg.key, dec!(0.0101)).await;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("the gateway stops")
        .unwrap()
        .unwrap();
}

/// A gateway stopping finishes the bookkeeping its account queued (within
/// the drain grace) before it lets the account go: nobody reads a leg's
/// trades again, so a commission dropped would stay missing from the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopping_finishes_the_bookkeeping_queued() {
    let mut w = world(1).await;
    let held = HeldTrades::new();
    w.protector_through(held.clone());
    let (stop_tx, run) = running(&w).await;
    let (a, leg) = take_profit_held(&w, &held).await;

    stop_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!run.is_finished(), "the gateway waits for the bookkeeping");
    held.let_through();
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("the gateway stops within its drain grace")
        .unwrap()
        .unwrap();
    assert_eq!(
        w.commission(a, leg.key).await,
        dec!(0.0101),
        "recorded before the account was let go"
    );
    let held_leases = w
        .store
        .renew_leases("gw-1", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(held_leases.is_empty(), "its leases are released");
}

/// Bookkeeping held past the drain grace does not keep a stopping gateway
/// from letting the account go and releasing its lease, and does not
/// outlive the account's task (it would race the account's next holder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookkeeping_held_past_the_drain_grace_is_dropped_at_shutdown() {
    let mut w = world(1).await;
    let held = HeldTrades::new();
    w.protector_through(held.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        w.gateway_tuned("gw-1", |c| c.drain_grace = Duration::from_millis(300))
            .run(async move {
                let _ = stop_rx.await;
            }),
    );
    wait_until("the stream", Duration::from_secs(5), || {
        w.streams.open_count(&key(0)) == 1
    })
    .await;
    let (a, leg) = take_profit_held(&w, &held).await;

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("the gateway stops once its drain grace is over")
        .unwrap()
        .unwrap();
    let held_leases = w
        .store
        .renew_leases("gw-1", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(held_leases.is_empty(), "its leases are released");
    held.let_through();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        w.commission(a, leg.key).await,
        dec!(0),
        "the held write was dropped with the account's task"
    );
}
