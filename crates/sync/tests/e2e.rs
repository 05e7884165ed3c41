//! The scenarios over real parts: `exchange-sim` over HTTP, the
//! Binance adapter, PostgreSQL (`DATABASE_URL`, a fresh database per test).
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{
    AccountSpec, FaultOutcome, FaultWhen, RequestFault, Sim, SimConfig, SimControl,
};
use oco_core::ids::{EntryId, IdScheme};
use oco_core::levels::EntryLevels;
use oco_core::model::{
    EntryKind, EntryTags, Evidence, LegUpdate, NewEntry, OrderSize, Protection, ProtectionConfig,
    Source,
};
use oco_core::ports::{ApiCredentials, Clock, Exchange, NewAccount, OrderRequest, Side, Store};
use oco_core::protect::{Idle, Protector};
use oco_core::{
    AccountId, EntryStatus, Leg, LegState, Price, ProtectOutcome, ProtectorConfig, Qty, SystemClock,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;
use store_pg::PgStore;
use store_pg::testing::TestDb;
use sync::{Reconciler, StrayList, SyncConfig};

struct Acct {
    id: AccountId,
    creds: ApiCredentials,
}

struct E2e {
    _sim: Sim,
    ctl: SimControl,
    db: TestDb,
    store: Arc<PgStore>,
    exchange: Arc<BinanceExchange>,
    ids: IdScheme,
}

fn config() -> SyncConfig {
    let mut c = SyncConfig::standard();
    c.startup_delay = Duration::ZERO;
    c.weight_budget_per_minute = 1_000_000;
    c.order_budget_per_10s = 1_000;
    c
}

async fn e2e() -> E2e {
    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(db.config(4)).await.unwrap());
    let exchange = Arc::new(
        BinanceExchange::new(BinanceConfig::custom(sim.base_url(), sim.ws_api_url())).unwrap(),
    );
    E2e {
        _sim: sim,
        ctl,
        db,
        store,
        exchange,
        ids: IdScheme::new("og").unwrap(),
    }
}

impl E2e {
    fn reconciler(&self) -> Reconciler {
        self.reconciler_with(self.exchange.clone(), config())
    }

    fn reconciler_with(&self, exchange: Arc<dyn Exchange>, config: SyncConfig) -> Reconciler {
        Reconciler::wired(
            exchange,
            self.store.clone(),
            Arc::new(SystemClock),
            ProtectorConfig::new(self.ids.clone()),
            config,
        )
    }

    async fn account(&self, key: &str) -> Acct {
        let secret = format!("{key}-secret");
        self.ctl.add_account(AccountSpec::new(
            key,
            secret.clone(),
            vec![("USDT".into(), dec!(1000000))],
        ));
        let creds = ApiCredentials {
            api_key: key.into(),
            secret: SecretString::from(secret),
        };
        let account = self
            .store
            .create_account(NewAccount {
                owner: key.into(),
                exchange: "binance".into(),
                credentials: creds.clone(),
                protection: ProtectionConfig::DEFAULT,
            })
            .await
            .unwrap();
        Acct {
            id: account.id,
            creds,
        }
    }

    /// The API stores the entry and sends it; its answer is lost and the
    /// gateway is not running, so nobody protects the fill.
    async fn sent_entry(&self, acct: &Acct, limit: Option<Decimal>, qty: Decimal) -> EntryId {
        let ids = self.ids.clone();
        let kind = limit.map_or(EntryKind::Market, |l| EntryKind::Limit {
            price: Price::new(l).unwrap(),
        });
        let entry = self
            .store
            .create_entry(
                NewEntry {
                    account: acct.id,
                    symbol: self.exchange.symbol_rules("BTCUSDT").await.unwrap().symbol,
                    kind,
                    size: OrderSize::Base(Qty::new(qty).unwrap()),
                    levels: EntryLevels::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
                },
                &move |id| ids.entry(id).unwrap(),
                SystemClock.now(),
            )
            .await
            .unwrap();
        self.exchange
            .place_order(
                &acct.creds,
                &OrderRequest {
                    symbol: "BTCUSDT".into(),
                    side: Side::Buy,
                    limit: limit.map(|l| Price::new(l).unwrap()),
                    size: OrderSize::Base(Qty::new(qty).unwrap()),
                    client_id: entry.client_id.clone(),
                },
            )
            .await
            .unwrap();
        entry.id
    }

    /// Layer 1 protects the entry's fill from what its stream showed.
    async fn protect_as_gateway(&self, acct: &Acct, id: EntryId) -> ProtectOutcome {
        let ev = self.fill_evidence(acct, id).await;
        self.protector(ProtectorConfig::new(self.ids.clone()))
            .protect(id, Some(&ev), Source::Websocket)
            .await
            .unwrap()
            .outcome
    }

    fn protector(&self, config: ProtectorConfig) -> Protector {
        Protector::new(
            self.exchange.clone(),
            self.store.clone(),
            Arc::new(SystemClock),
            config,
        )
    }

    /// The entry's fill as the gateway's stream shows it.
    async fn fill_evidence(&self, acct: &Acct, id: EntryId) -> Evidence {
        let client_id = self.store.entry(id).await.unwrap().client_id;
        let snap = self
            .exchange
            .query_order(&acct.creds, "BTCUSDT", client_id.as_str())
            .await
            .unwrap();
        Evidence {
            order_id: Some(snap.order_id),
            status: snap.status,
            executed_qty: snap.executed_qty,
            cumulative_quote: snap.cumulative_quote,
            fills: self
                .exchange
                .order_trades(&acct.creds, "BTCUSDT", snap.order_id)
                .await
                .unwrap(),
            holding: None,
            observed_at: SystemClock.now(),
        }
    }

    /// Moves one placed leg to `to` in the store alone, the exchange
    /// untouched (what a claim taken over while its list was sent leaves when
    /// the withdrawal failed); returns its list client id.
    async fn rewrite_leg(&self, leg: &Leg, to: LegState) -> String {
        let moved = self
            .store
            .update_leg(&LegUpdate {
                key: leg.key,
                from: "placed",
                to,
                error: None,
                at: leg.updated_at,
            })
            .await
            .unwrap();
        assert!(moved);
        leg.ids.list.as_str().to_owned()
    }

    /// Client ids of the account's executing lists, sorted.
    fn executing_lists(&self, key: &str) -> Vec<String> {
        let mut lists: Vec<String> = self
            .ctl
            .order_lists(Some(key))
            .into_iter()
            .filter(|l| l.list_order_status == "EXECUTING")
            .map(|l| l.list_client_order_id)
            .collect();
        lists.sort();
        lists
    }

    fn open_lists(&self, key: &str) -> usize {
        self.ctl
            .order_lists(Some(key))
            .iter()
            .filter(|l| l.list_order_status == "EXECUTING")
            .count()
    }

    fn all_lists(&self, key: &str) -> usize {
        self.ctl.order_lists(Some(key)).len()
    }

    async fn protection(&self, id: EntryId) -> Protection {
        self.store.entry(id).await.unwrap().protection
    }
}

fn is_protected_by_sync(p: &Protection) -> bool {
    matches!(
        p,
        Protection::Protected {
            by: Source::Sync,
            ..
        }
    )
}

#[tokio::test]
async fn market_and_limit_fills_without_the_gateway_are_protected_on_the_next_pass() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let market = t.sent_entry(&a, None, dec!(0.01)).await;
    let limit = t.sent_entry(&a, Some(dec!(59500)), dec!(0.02)).await;
    let sync = t.reconciler();

    let first = sync.pass().await.unwrap();
    assert!(first.failed.is_empty(), "{first:?}");
    assert!(is_protected_by_sync(&t.protection(market).await));
    let resting = t.store.entry(limit).await.unwrap();
    assert_eq!(
        resting.status,
        EntryStatus::New,
        "the LIMIT rests, nothing to protect yet"
    );
    assert_eq!(t.open_lists("k1"), 2);

    // Long after placement the market comes down to the LIMIT and fills it.
    t.ctl.set_price("BTCUSDT", dec!(59500)).unwrap();
    let second = sync.pass().await.unwrap();
    let r = &second.reconciled[0];
    assert!(
        matches!(r.outcome(limit), Some(ProtectOutcome::Placed { .. })),
        "{r:?}"
    );
    let filled = t.store.entry(limit).await.unwrap();
    assert_eq!(filled.status, EntryStatus::Filled);
    assert!(is_protected_by_sync(&filled.protection));
    assert!(
        filled.base_commission.get() > Decimal::ZERO,
        "commission known from the trades"
    );
    assert_eq!(t.open_lists("k1"), 4);

    // A third pass finds all covered and places nothing.
    let third = sync.pass().await.unwrap();
    assert!(third.reconciled[0].protections.is_empty(), "{third:?}");
    assert_eq!(t.all_lists("k1"), 4, "no list placed twice");
    assert!(
        third.weight_used <= 12,
        "one open-list read and one open-order read, got {}",
        third.weight_used
    );
}

#[tokio::test]
async fn a_leg_whose_store_write_was_lost_is_found_by_client_id_not_duplicated() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    // Layer 1 protects the fill...
    let placed = t.protect_as_gateway(&a, id).await;
    assert!(
        matches!(placed, ProtectOutcome::Placed { .. }),
        "{placed:?}"
    );
    assert_eq!(t.all_lists("k1"), 2);
    // ...and crashes after the sends, before the store heard the answers.
    for leg in t.store.legs(id).await.unwrap() {
        let reverted = t
            .store
            .update_leg(&LegUpdate {
                key: leg.key,
                from: "placed",
                to: LegState::Claimed,
                error: None,
                at: leg.updated_at,
            })
            .await
            .unwrap();
        assert!(reverted);
    }

    let sync = t.reconciler();
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert_eq!(r.legs_adopted.len(), 2, "{r:?}");
    assert_eq!(t.all_lists("k1"), 2, "found by client id, not placed again");
    assert!(
        t.store
            .legs(id)
            .await
            .unwrap()
            .iter()
            .all(|l| matches!(l.state, LegState::Placed { .. }))
    );
    assert!(matches!(
        t.protection(id).await,
        Protection::Protected { .. }
    ));
}

#[tokio::test]
async fn a_price_already_past_the_stop_exits_at_market_and_is_recorded() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    // Bought at 60000; the -1 % stop is 59400; the market fell further meanwhile.
    t.ctl.set_price("BTCUSDT", dec!(59300)).unwrap();
    let sync = t.reconciler();
    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        matches!(r.outcome(id), Some(ProtectOutcome::Exited { .. })),
        "{r:?}"
    );
    assert!(matches!(t.protection(id).await, Protection::Exited { .. }));
    let events = t.store.events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "exited" && e.source == Some(Source::Sync)),
        "{events:?}"
    );
    assert_eq!(t.open_lists("k1"), 0);
    let btc = t
        .ctl
        .balance("k1", "BTC")
        .map_or(Decimal::ZERO, |b| b.free + b.locked);
    assert!(btc < dec!(0.00001), "position sold, {btc} BTC left");
    assert!(t.store.open_entries(a.id).await.unwrap().is_empty());
}

/// Both take-profits fill while no gateway listens; the next pass learns
/// the sales from lookups, which carry no trades, and closes the entry
/// without reading any: the result is the sales less the cost, and the
/// entry says its commissions are not all counted.
#[tokio::test]
async fn take_profits_sold_while_nobody_listened_close_with_their_commissions_marked_missing() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    let sync = t.reconciler();
    sync.pass().await.unwrap();
    assert!(is_protected_by_sync(&t.protection(id).await));
    let legs = t.store.legs(id).await.unwrap();
    let top = legs.iter().map(|l| l.take_profit.get()).max().unwrap();
    t.ctl.set_price("BTCUSDT", top).unwrap();
    assert_eq!(t.open_lists("k1"), 0, "both take-profits filled");

    sync.reconcile_account(a.id).await.unwrap();
    let e = t.store.entry(id).await.unwrap();
    assert_eq!(e.protection, Protection::Closed);
    let sells: Vec<_> = t
        .ctl
        .trades(Some("k1"))
        .into_iter()
        .filter(|tr| !tr.is_buyer)
        .collect();
    assert_eq!(sells.len(), 2, "{sells:?}");
    let sales: Decimal = sells.iter().map(|tr| tr.quote_qty).sum();
    assert_eq!(e.realized_quote, Some(sales - e.cumulative_quote));
    assert!(!e.fees_complete, "the sales' commissions are not known");
}

#[tokio::test]
async fn a_take_profit_filled_in_part_while_nobody_listened_gets_its_rest_a_stop() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    let sync = t.reconciler();
    sync.pass().await.unwrap();
    assert!(is_protected_by_sync(&t.protection(id).await));
    // The market touches TP1 and fills 40 % of it. The exchange cancels
    // that list's stop, and the list keeps executing with the rest of its
    // take-profit: the open lists look as before. No gateway listens.
    let legs = t.store.legs(id).await.unwrap();
    let first = legs
        .iter()
        .find(|l| l.key.leg == oco_core::ids::LegIndex::First)
        .unwrap();
    t.ctl.partial_fill_next("BTCUSDT", dec!(0.4)).unwrap();
    t.ctl.set_price("BTCUSDT", first.take_profit.get()).unwrap();
    let bare = |t: &E2e| -> Vec<String> {
        let open = t.ctl.open_orders("k1");
        let mut lists: Vec<i64> = open.iter().map(|o| o.order_list_id).collect();
        lists.sort_unstable();
        lists.dedup();
        lists
            .into_iter()
            .filter(|id| {
                *id >= 0
                    && !open
                        .iter()
                        .any(|o| o.order_list_id == *id && o.order_type.starts_with("STOP_LOSS"))
            })
            .map(|id| id.to_string())
            .collect()
    };
    // The market comes back: nothing else fills.
    t.ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    assert_eq!(bare(&t).len(), 1, "one list rests without its stop");
    assert_eq!(t.open_lists("k1"), 2, "both lists still executing");

    let r = sync.reconcile_account(a.id).await.unwrap();
    assert!(
        r.lists_ended.iter().any(|(key, state)| *key == first.key
            && *state
                == LegState::CanceledExternally {
                    why: oco_core::state::ExternalEnd::TakeProfitPartial
                }),
        "{r:?}"
    );
    assert!(bare(&t).is_empty(), "every open list has its stop again");
    let sold = t.store.legs(id).await.unwrap();
    let first = sold.iter().find(|l| l.key == first.key).unwrap();
    assert!(
        first.sold.take_profit.get() > Decimal::ZERO,
        "its sale recorded"
    );
    let held: Decimal = t
        .ctl
        .open_orders("k1")
        .iter()
        .filter(|o| o.order_type.starts_with("STOP_LOSS"))
        .map(|o| o.orig_qty)
        .sum();
    let sold: Decimal = t
        .store
        .legs(id)
        .await
        .unwrap()
        .iter()
        .map(|l| l.sold.total().get())
        .sum();
    let owed = t.store.entry(id).await.unwrap().net_qty().get() - sold;
    assert!(
        owed - held < dec!(0.00001),
        "the stops hold the {owed} left, not {held}"
    );
    assert!(is_protected_by_sync(&t.protection(id).await));
}

/// The gateway placed both lists and crashed before the store heard the
/// answers; then TP1 filled in part, which cancels its list's stop while the
/// list keeps executing. Sync finds both lists open by client id. The one
/// without its stop is not adopted as working protection: it is followed
/// as the placed leg it is (its sale recorded, its rest replaced), and the
/// coins left get a stop.
#[tokio::test]
async fn a_list_found_open_without_its_stop_is_not_adopted_as_protection() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    let placed = t.protect_as_gateway(&a, id).await;
    assert!(
        matches!(placed, ProtectOutcome::Placed { .. }),
        "{placed:?}"
    );
    let legs = t.store.legs(id).await.unwrap();
    for leg in &legs {
        let reverted = t
            .store
            .update_leg(&LegUpdate {
                key: leg.key,
                from: "placed",
                to: LegState::Claimed,
                error: None,
                at: leg.updated_at,
            })
            .await
            .unwrap();
        assert!(reverted);
    }
    let first = legs
        .iter()
        .find(|l| l.key.leg == oco_core::ids::LegIndex::First)
        .unwrap();
    t.ctl.partial_fill_next("BTCUSDT", dec!(0.4)).unwrap();
    t.ctl.set_price("BTCUSDT", first.take_profit.get()).unwrap();
    t.ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    let stops = |t: &E2e| -> Decimal {
        t.ctl
            .open_orders("k1")
            .iter()
            .filter(|o| o.order_type.starts_with("STOP_LOSS"))
            .map(|o| o.orig_qty)
            .sum()
    };
    assert_eq!(t.open_lists("k1"), 2, "both lists still executing");
    assert!(stops(&t) < first.qty.get() * dec!(2), "one stop is gone");

    let r = t.reconciler().reconcile_account(a.id).await.unwrap();
    assert_eq!(r.legs_adopted.len(), 2, "{r:?}");
    assert!(
        r.lists_ended.iter().any(|(key, state)| *key == first.key
            && *state
                == LegState::CanceledExternally {
                    why: oco_core::state::ExternalEnd::TakeProfitPartial
                }),
        "{r:?}"
    );
    let after = t.store.legs(id).await.unwrap();
    let sold: Decimal = after.iter().map(|l| l.sold.total().get()).sum();
    assert!(sold > Decimal::ZERO, "the take-profit's sale recorded");
    let owed = t.store.entry(id).await.unwrap().net_qty().get() - sold;
    let held = stops(&t);
    assert!(
        owed - held < dec!(0.00001),
        "the stops hold the {owed} left, not {held}"
    );
}

#[tokio::test]
async fn revoked_keys_open_the_breaker_and_other_accounts_are_unaffected() {
    let t = e2e().await;
    let bad = t.account("revoked").await;
    let good = t.account("k1").await;
    t.sent_entry(&bad, None, dec!(0.01)).await;
    let id = t.sent_entry(&good, None, dec!(0.01)).await;
    t.ctl.revoke_key("revoked");

    let sync = t.reconciler();
    let report = sync.pass().await.unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, bad.id);
    assert!(report.failed[0].1.is_auth(), "{:?}", report.failed[0].1);
    assert!(is_protected_by_sync(&t.protection(id).await));
    assert_eq!(t.open_lists("k1"), 2);
    assert_eq!(sync.open_breakers().len(), 1);

    let again = sync.pass().await.unwrap();
    assert_eq!(again.skipped.len(), 1, "{again:?}");
    assert_eq!(again.skipped[0].0, bad.id);
    assert_eq!(sync.metrics().breaker_opens, 1);
}

fn shared_config(holder: &str) -> SyncConfig {
    let mut c = config();
    c.holder = holder.into();
    c.interval = Duration::from_secs(3600);
    c.concurrency = 3;
    c
}

fn reconciled(report: &sync::PassReport) -> Vec<AccountId> {
    report.reconciled.iter().map(|r| r.account).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reconcilers_split_a_pass_each_account_once_and_no_leg_twice() {
    let t = e2e().await;
    let mut accounts = Vec::new();
    let mut entries = Vec::new();
    for i in 0..12 {
        let key = format!("k{i}");
        let a = t.account(&key).await;
        entries.push(t.sent_entry(&a, None, dec!(0.01)).await);
        accounts.push((a.id, key));
    }
    let one = t.reconciler_with(t.exchange.clone(), shared_config("sync-one"));
    let two = t.reconciler_with(t.exchange.clone(), shared_config("sync-two"));

    let (p1, p2) = tokio::join!(one.due_pass(), two.due_pass());
    let (p1, p2) = (p1.unwrap(), p2.unwrap());
    assert!(
        p1.failed.is_empty() && p2.failed.is_empty(),
        "{p1:?} {p2:?}"
    );
    let (r1, r2) = (reconciled(&p1), reconciled(&p2));
    assert!(
        !r1.is_empty() && !r2.is_empty(),
        "both processes took part: {r1:?} / {r2:?}"
    );
    assert!(
        r1.iter().all(|id| !r2.contains(id)),
        "no account reconciled by both: {r1:?} / {r2:?}"
    );
    let mut all: Vec<AccountId> = r1.iter().chain(&r2).copied().collect();
    all.sort();
    let expected: Vec<AccountId> = accounts.iter().map(|(id, _)| *id).collect();
    assert_eq!(all, expected, "every account reconciled");

    for (id, (_, key)) in entries.iter().zip(&accounts) {
        assert!(is_protected_by_sync(&t.protection(*id).await));
        let legs = t.store.legs(*id).await.unwrap();
        assert_eq!(
            t.all_lists(key),
            legs.len(),
            "one list per leg on the exchange for {key}"
        );
        assert!(
            legs.iter().all(|l| l.key.generation == 0),
            "placed once: {legs:?}"
        );
    }

    // Within the interval neither process reconciles anything again.
    let (q1, q2) = tokio::join!(one.due_pass(), two.due_pass());
    let (q1, q2) = (q1.unwrap(), q2.unwrap());
    assert_eq!(q1.accounts + q2.accounts, 0, "{q1:?} {q2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accounts_of_a_sync_that_dies_mid_pass_are_reconciled_by_the_other() {
    let t = e2e().await;
    let mut accounts = Vec::new();
    let mut entries = Vec::new();
    for i in 0..6 {
        let a = t.account(&format!("k{i}")).await;
        entries.push(t.sent_entry(&a, None, dec!(0.01)).await);
        accounts.push(a.id);
    }
    // The dying process talks to an exchange that never answers: it hangs in
    // its first requests with the accounts taken, and is then killed.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let holder = {
        let reached = reached.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hole.accept().await {
                reached.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        })
    };
    let silent: Arc<dyn Exchange> =
        Arc::new(BinanceExchange::new(BinanceConfig::custom(hole_url.clone(), hole_url)).unwrap());
    let mut dying_config = shared_config("sync-dying");
    // Long enough that the survivor's first pass ends before it expires on a
    // loaded machine (else that pass takes the dead one's batch too).
    dying_config.pass_lease = Duration::from_secs(5);
    let dying = Arc::new(t.reconciler_with(silent, dying_config));
    let survivor = t.reconciler_with(t.exchange.clone(), shared_config("sync-survivor"));

    let pass = {
        let dying = dying.clone();
        tokio::spawn(async move { dying.due_pass().await })
    };
    // Its first request means it has taken its batch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reached.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dying process reaches the exchange"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pass.abort();
    assert!(pass.await.unwrap_err().is_cancelled(), "killed mid-pass");

    // At once the survivor reconciles the rest, not the batch the dead one holds...
    let first = survivor.due_pass().await.unwrap();
    let got = reconciled(&first);
    assert_eq!(
        got.len(),
        3,
        "the dead one's batch of 3 is still taken: {first:?}"
    );
    let lost: Vec<AccountId> = accounts
        .iter()
        .copied()
        .filter(|id| !got.contains(id))
        .collect();
    // ...and once the dead one's take expires, those too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut later = Vec::new();
    while later.len() < lost.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead process's accounts come back: {later:?}"
        );
        later.extend(reconciled(&survivor.due_pass().await.unwrap()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    later.sort();
    assert_eq!(later, lost, "exactly the dead process's accounts");
    for id in &entries {
        assert!(is_protected_by_sync(&t.protection(*id).await), "{id}");
    }
    for i in 0..6 {
        assert_eq!(t.all_lists(&format!("k{i}")), 2, "each leg placed once");
    }
    holder.abort();
}

/// A flag on PostgreSQL wakes sync through its notification
/// (`store_pg::ring_on_flags`), without a poll. After the listening
/// connection is killed, a flag set while nobody listens is taken when the
/// listener comes back, and the next flag wakes sync through its
/// notification again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_wakes_sync_through_its_notification_even_after_the_listener_is_lost() {
    let t = e2e().await;
    // Two accounts: one holds at most 5 stops per symbol (two per entry).
    let accounts = [t.account("k1").await, t.account("k2").await];
    let mut c = shared_config("sync-bell");
    c.startup_delay = Duration::from_secs(3600);
    // One poll as the loop starts, then none for an hour.
    c.flag_poll = Duration::from_secs(3600);
    let sync = t.reconciler_with(t.exchange.clone(), c);
    let ringer = store_pg::ring_on_flags(t.store.clone(), sync.flag_bell());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = sync.run(async {
        let _ = stopped.await;
    });
    let listening = || async { t.db.listeners(store_pg::RECONCILE_CHANNEL).await };
    let flag_and_wait = |what: &'static str, account: usize| {
        let (t, a) = (&t, &accounts[account]);
        async move {
            let entry = t.sent_entry(a, None, dec!(0.01)).await;
            t.store
                .flag_reconcile(a.id, "stream gap", SystemClock.now())
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !is_protected_by_sync(&t.protection(entry).await) {
                assert!(std::time::Instant::now() < deadline, "{what}: not woken");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // One process listening, other than `before`; `pg_stat_activity` shows
    // the LISTEN once it ran, so wait a moment more for the ring of its
    // start: what follows is then a notification's doing.
    let listened = |before: Vec<String>, what: &'static str| {
        let listening = &listening;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let now = listening().await;
                if now.len() == 1 && now != before {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return now;
                }
                assert!(std::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let scenario = async {
        let first = listened(Vec::new(), "nobody listens").await;
        flag_and_wait("a flag announced", 0).await;
        // The listening connection dies (a failover, an administrator).
        t.db.run_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = 'LISTEN oco_reconcile'",
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !listening().await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the listener lives on"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Announced to no one: only the ring as the listener comes back takes it.
        flag_and_wait("a flag set while nobody listened", 0).await;
        listened(first, "never listening again").await;
        flag_and_wait("a flag announced after the listener came back", 1).await;
        let _ = stop.send(());
    };
    tokio::join!(runner, scenario);
    drop(ringer);
    assert_eq!(t.open_lists("k1"), 4, "each entry protected once");
    assert_eq!(t.open_lists("k2"), 2, "each entry protected once");
    assert_eq!(sync.metrics().passes, 0, "no full pass ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagged_account_is_reconciled_within_two_seconds_on_postgres() {
    let t = e2e().await;
    let a = t.account("k1").await;
    // A fill nobody saw (no gateway), then the flag a gateway sets after a gap.
    let entry = t.sent_entry(&a, None, dec!(0.01)).await;
    let mut c = shared_config("sync-flags");
    c.startup_delay = Duration::from_secs(3600);
    c.flag_poll = Duration::from_millis(250);
    let sync = t.reconciler_with(t.exchange.clone(), c);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = sync.run(async {
        let _ = stopped.await;
    });
    let scenario = async {
        // Let the loop start, so that the time measured is the flag's alone.
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.store
            .flag_reconcile(a.id, "stream gap", SystemClock.now())
            .await
            .unwrap();
        let flagged = std::time::Instant::now();
        let deadline = flagged + Duration::from_secs(10);
        while !is_protected_by_sync(&t.protection(entry).await) {
            assert!(
                std::time::Instant::now() < deadline,
                "never protected after the flag"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = flagged.elapsed();
        let _ = stop.send(());
        took
    };
    let ((), took) = tokio::join!(runner, scenario);
    assert!(
        took < Duration::from_secs(2),
        "a flagged account is reconciled within 2 s: took {took:?}"
    );
    assert_eq!(t.open_lists("k1"), 2);
    assert_eq!(sync.metrics().passes, 0, "no full pass ran");
}

fn stray_events(events: &[oco_core::model::EntryEventRecord]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e.kind == "stray_list")
        .map(|e| e.detail.as_str())
        .collect()
}

#[tokio::test]
async fn a_stray_list_is_reported_with_its_leg_state_noted_once_and_left_on_the_exchange() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    let placed = t.protect_as_gateway(&a, id).await;
    assert!(
        matches!(placed, ProtectOutcome::Placed { .. }),
        "{placed:?}"
    );
    let mut legs = t.store.legs(id).await.unwrap();
    legs.sort_by_key(|l| l.key.leg);
    assert_eq!(legs.len(), 2, "{legs:?}");
    // The first list lives on while the store says it was never placed.
    let not_placed = LegState::NotPlaced {
        code: None,
        reason: "lookup found no such list".into(),
    };
    let stray = t.rewrite_leg(&legs[0], not_placed.clone()).await;
    let before = t.executing_lists("k1");
    assert_eq!(before.len(), 2);
    assert!(before.contains(&stray));
    let expected = vec![StrayList {
        entry: id,
        leg: legs[0].key,
        client_id: stray.clone(),
        state: not_placed.clone(),
    }];
    t.ctl.clear_requests();

    let sync = t.reconciler();
    for pass in 1..=2_u64 {
        let r = sync.reconcile_account(a.id).await.unwrap();
        assert_eq!(r.stray_lists, expected, "pass {pass}: {r:?}");
        assert!(r.unknown_lists.is_empty(), "pass {pass}: {r:?}");
        assert!(r.legs_adopted.is_empty(), "pass {pass}: {r:?}");
        assert_eq!(sync.metrics().stray_lists, pass, "counted once per pass");
        // Untouched: no cancel, no new list, its leg as the store had it.
        assert_eq!(t.executing_lists("k1"), before, "pass {pass}: {r:?}");
        let legs_now = t.store.legs(id).await.unwrap();
        let leg = legs_now.iter().find(|l| l.key == legs[0].key).unwrap();
        assert_eq!(leg.state, not_placed, "pass {pass}");
        // Written to the entry's history on the first pass only.
        let events = t.store.events(id).await.unwrap();
        let noted = stray_events(&events);
        assert_eq!(noted.len(), 1, "pass {pass}: {events:?}");
        assert!(
            noted[0].contains(&stray)
                && noted[0].contains("not_placed")
                && noted[0].contains("cancel it by hand after checking the account"),
            "{noted:?}"
        );
    }
    let writes: Vec<_> = t
        .ctl
        .requests()
        .into_iter()
        .filter(|q| q.method != "GET")
        .map(|q| (q.method, q.path))
        .collect();
    assert!(
        writes.is_empty(),
        "nothing sent to the exchange: {writes:?}"
    );

    // A restarted process finds the line in the history and writes no other.
    let restarted = t.reconciler();
    let r = restarted.reconcile_account(a.id).await.unwrap();
    assert_eq!(r.stray_lists, expected, "{r:?}");
    let events = t.store.events(id).await.unwrap();
    assert_eq!(stray_events(&events).len(), 1, "{events:?}");
    assert_eq!(t.executing_lists("k1"), before);
}

/// A pass that leaves a protection undone (the exchange answers 503 to the
/// lists) is not recorded as a reconciliation: its retry is kept in the
/// store, so after the process is gone another one takes the account once
/// the backoff has passed, not an interval later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_left_by_a_pass_whose_lists_failed_outlives_its_process() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let entry = t.sent_entry(&a, None, dec!(0.01)).await;
    t.ctl.fail_requests(exchange_sim::RequestFault {
        method: Some("POST".into()),
        path_prefix: "/api/v3/orderList".into(),
        count: 2,
        when: exchange_sim::FaultWhen::Before,
        outcome: exchange_sim::FaultOutcome::Status(503),
    });
    let backoff = Duration::from_secs(2);
    // The 503s leave the lists' outcome unknown: a claim that old is looked
    // up and, not found, placed again by the next pass.
    let reconciler = |c: SyncConfig| {
        let mut protector = ProtectorConfig::new(t.ids.clone());
        protector.claim_timeout = backoff;
        Reconciler::wired(
            t.exchange.clone(),
            t.store.clone(),
            Arc::new(SystemClock),
            protector,
            c,
        )
    };
    let mut c = shared_config("sync-gone");
    c.retry.after_protection = backoff;
    let gone = reconciler(c);
    let report = gone.due_pass().await.unwrap();
    let outcome = report.reconciled[0].outcome(entry).cloned();
    assert!(
        matches!(
            outcome,
            Some(ProtectOutcome::Failed { .. } | ProtectOutcome::Pending { .. })
        ),
        "the lists were refused: {report:?}"
    );
    let failed_at = std::time::Instant::now();
    assert_eq!(t.open_lists("k1"), 0);
    // The process restarts: its memory is gone.
    drop(gone);

    let next = reconciler(shared_config("sync-next"));
    let deadline = failed_at + Duration::from_secs(15);
    let mut taken_at = None;
    while !is_protected_by_sync(&t.protection(entry).await) {
        assert!(
            std::time::Instant::now() < deadline,
            "not protected; the account was taken again after {:?}",
            taken_at.map(|at: std::time::Instant| at.duration_since(failed_at))
        );
        let pass = next.due_pass().await.unwrap();
        if taken_at.is_none() && reconciled(&pass).contains(&a.id) {
            taken_at = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = taken_at.unwrap().duration_since(failed_at);
    assert!(
        waited >= backoff - Duration::from_millis(100),
        "due again before the backoff: {waited:?}"
    );
    assert!(is_protected_by_sync(&t.protection(entry).await));
    assert_eq!(t.open_lists("k1"), 2);
}

/// How long the simulator keeps a fresh placement out of the lookups Binance
/// serves from its database (`GET orderList`, `GET order`) in the tests
/// below: longer than their first protect calls and pass take on a loaded
/// machine, well within the claim timeout (30 s) past which a miss counts
/// as absence.
const LOOKUP_LAG: Duration = Duration::from_secs(3);

/// The next two list placements (a generation's) fail with a 503 that
/// leaves their outcome unknown, `when` the exchange applied them or not.
fn lost_list_answers(when: FaultWhen) -> RequestFault {
    RequestFault {
        method: Some("POST".into()),
        path_prefix: "/api/v3/orderList/oco".into(),
        count: 2,
        when,
        outcome: FaultOutcome::Status(503),
    }
}

impl E2e {
    /// Gives the account coins of the entry's base asset that are not the
    /// entry's (the user's own, another entry's): the exchange's balance
    /// lock would not refuse a second set of lists then, only ocoguard can.
    fn hold_other_coins(&self, key: &str) {
        self.ctl.deposit(key, "BTC", dec!(1)).unwrap();
    }

    /// How many list placements reached the simulator.
    fn list_posts(&self) -> usize {
        self.ctl
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/api/v3/orderList/oco")
            .count()
    }

    /// After lost answers: the simulator holds one list per client id, each
    /// under the client id of a leg of the entry that follows it (`placed`
    /// of them), no list under the others, and the entry is protected.
    async fn assert_one_list_per_leg(&self, key: &str, id: EntryId, placed: usize) {
        let mut on_sim: HashMap<String, Vec<i64>> = HashMap::new();
        for l in self.ctl.order_lists(Some(key)) {
            assert_eq!(l.list_order_status, "EXECUTING", "{l:?}");
            on_sim
                .entry(l.list_client_order_id)
                .or_default()
                .push(l.order_list_id);
        }
        assert!(on_sim.values().all(|ids| ids.len() == 1), "{on_sim:?}");
        assert_eq!(on_sim.len(), placed, "{on_sim:?}");
        let legs = self.store.legs(id).await.unwrap();
        for leg in &legs {
            let listed = on_sim.get(leg.ids.list.as_str()).map(|ids| ids[0]);
            match leg.state {
                LegState::Placed { list_id } => assert_eq!(Some(list_id), listed, "{leg:?}"),
                _ => assert_eq!(listed, None, "a list no leg follows: {leg:?}"),
            }
        }
        assert!(
            matches!(self.protection(id).await, Protection::Protected { .. }),
            "{:?}",
            self.protection(id).await
        );
    }
}

/// Binance applies both lists of a generation but the answers are lost
/// (503), and its lookups read from its database (`GET orderList`) miss the
/// lists for a few seconds. The adapter then looks for them among the open
/// lists (memory first on Binance, current): the call that lost the answers
/// finds them at once, and nothing is sent again, then or later.
#[tokio::test]
async fn lists_whose_answers_were_lost_while_lookups_lag_are_found_not_placed_again() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    t.hold_other_coins("k1");
    let ev = t.fill_evidence(&a, id).await;
    let gateway = t.protector(ProtectorConfig::new(t.ids.clone()));
    t.ctl.set_lookup_lag(LOOKUP_LAG, None);
    t.ctl.fail_requests(lost_list_answers(FaultWhen::After));

    let sent = Instant::now();
    let first = gateway
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap()
        .outcome;
    assert!(
        matches!(&first, ProtectOutcome::Placed { legs, .. } if legs.len() == 2),
        "{first:?}"
    );
    assert_eq!(t.all_lists("k1"), 2, "both lists were applied");
    let again = gateway
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap()
        .outcome;
    assert!(
        sent.elapsed() < LOOKUP_LAG,
        "the calls came after the lag ({:?}): they tested nothing",
        sent.elapsed()
    );
    assert_eq!(again, ProtectOutcome::Nothing(Idle::Covered));
    assert_eq!(t.list_posts(), 2, "no list sent twice");
    t.assert_one_list_per_leg("k1", id, 2).await;
}

/// The same lost answers, found by the gateway's own call among the open
/// lists; a sync pass while the database lookups still miss them reads the
/// legs' lists as working (found among the open lists), not as ended: it
/// adopts nothing, sends nothing and leaves the entry protected.
#[tokio::test]
async fn a_sync_pass_while_lookups_lag_leaves_lists_whose_answers_were_lost_working() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    t.hold_other_coins("k1");
    t.ctl.set_lookup_lag(LOOKUP_LAG, None);
    t.ctl.fail_requests(lost_list_answers(FaultWhen::After));
    let sent = Instant::now();
    let first = t.protect_as_gateway(&a, id).await;
    assert!(
        matches!(&first, ProtectOutcome::Placed { legs, .. } if legs.len() == 2),
        "{first:?}"
    );

    let r = t.reconciler().reconcile_account(a.id).await.unwrap();
    assert!(
        sent.elapsed() < LOOKUP_LAG,
        "the pass came after the lag ({:?}): it tested nothing",
        sent.elapsed()
    );
    assert!(r.lists_ended.is_empty(), "{r:?}");
    assert!(r.lists_unread.is_empty(), "{r:?}");
    assert_eq!(t.list_posts(), 2, "no list sent twice");
    t.assert_one_list_per_leg("k1", id, 2).await;
}

/// Both placements fail before the exchange applies them, with 503s that
/// leave the outcome unknown, and the lookups lag. A miss counts as absence
/// only past the claim timeout: calls before it send nothing, the first
/// after it places the lists, once each.
#[tokio::test]
async fn lists_never_placed_are_placed_only_once_the_claim_timeout_has_passed() {
    let t = e2e().await;
    let a = t.account("k1").await;
    let id = t.sent_entry(&a, None, dec!(0.01)).await;
    t.hold_other_coins("k1");
    let ev = t.fill_evidence(&a, id).await;
    let claim_timeout = Duration::from_secs(2);
    let gateway = t.protector(ProtectorConfig {
        claim_timeout,
        ..ProtectorConfig::new(t.ids.clone())
    });
    t.ctl.set_lookup_lag(Duration::from_secs(1), None);
    t.ctl.fail_requests(lost_list_answers(FaultWhen::Before));

    let first = gateway
        .protect(id, Some(&ev), Source::Websocket)
        .await
        .unwrap()
        .outcome;
    let lost = Instant::now();
    assert!(
        matches!(&first, ProtectOutcome::Pending { legs } if legs.len() == 2),
        "{first:?}"
    );
    assert_eq!(t.all_lists("k1"), 0, "nothing applied");
    let deadline = lost + Duration::from_secs(20);
    let mut outcome = first;
    while matches!(outcome, ProtectOutcome::Pending { .. }) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = Instant::now();
        outcome = gateway
            .protect(id, None, Source::Websocket)
            .await
            .unwrap()
            .outcome;
        if before.duration_since(lost) < claim_timeout {
            assert!(
                matches!(outcome, ProtectOutcome::Pending { .. }),
                "{outcome:?} within the claim timeout"
            );
            assert_eq!(t.list_posts(), 2, "sent again within the claim timeout");
        }
    }
    assert!(
        matches!(&outcome, ProtectOutcome::Placed { legs, .. } if legs.len() == 2),
        "{outcome:?}"
    );
    assert!(lost.elapsed() >= claim_timeout);
    assert_eq!(t.list_posts(), 4, "each list sent once more");
    t.assert_one_list_per_leg("k1", id, 2).await;
}
