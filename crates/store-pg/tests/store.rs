//! `PgStore` on a real PostgreSQL: the shared behaviour suite, concurrency,
//! secrets at rest, leases, reconcile flags and lost connections.
// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use oco_core::levels::EntryLevels;
use oco_core::model::{
    EntryKind, EntryTags, Evidence, LegClaim, NewEntry, OrderSize, Protection, Realized,
};
use oco_core::ports::{NewAccount, Users as _};
use oco_core::{
    AccountId, ApiCredentials, Asset, ClientOrderId, Entry, EntryId, EntryStatus, Fill,
    IdempotencyKey, LegIndex, LegKey, Millis, OcoClientIds, Price, ProtectionConfig, Qty, Source,
    Store, StoreError, Symbol,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::{ExposeSecret as _, SecretString};
use store_pg::testing::TestDb;
use store_pg::{PgStore, SecretKey};

async fn store(db: &TestDb) -> PgStore {
    PgStore::connect(db.config(8))
        .await
        .expect("connecting to the test database")
}

fn qty(s: &str) -> Qty {
    s.parse().unwrap()
}

fn price(s: &str) -> Price {
    s.parse().unwrap()
}

async fn new_account(store: &dyn Store, key: &str) -> oco_core::Account {
    store
        .create_account(NewAccount {
            owner: "alice".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: key.into(),
                secret: SecretString::from(format!("secret-of-{key}")),
            },
            protection: ProtectionConfig::DEFAULT,
        })
        .await
        .unwrap()
}

async fn new_entry(store: &dyn Store, account: AccountId) -> Entry {
    store
        .create_entry(
            entry_request(account),
            &|id| ClientOrderId::new(format!("t-E-{id}")).unwrap(),
            Millis(1_700_000_000_000),
        )
        .await
        .unwrap()
}

fn entry_request(account: AccountId) -> NewEntry {
    NewEntry {
        account,
        symbol: Symbol {
            name: "BTCUSDT".into(),
            base: Asset("BTC".into()),
            quote: Asset("USDT".into()),
        },
        kind: EntryKind::Limit {
            price: price("100.5"),
        },
        size: OrderSize::Base(qty("1")),
        levels: EntryLevels {
            tp1: Some(price("101")),
            tp2: None,
            sl: Some(price("99.25")),
        },
        tags: EntryTags {
            signal_id: None,
            portfolio_id: Some("pf-9".into()),
        },
        idempotency_key: None,
    }
}

fn claim(entry: EntryId, generation: u32) -> LegClaim {
    let id = |k: &str| ClientOrderId::new(format!("t-{k}-{entry}-1-{generation}")).unwrap();
    LegClaim {
        key: LegKey {
            entry,
            leg: LegIndex::First,
            generation,
        },
        ids: OcoClientIds {
            list: id("L"),
            take_profit: id("T"),
            stop_loss: id("S"),
        },
        symbol: "BTCUSDT".into(),
        qty: qty("0.5"),
        take_profit: price("101"),
        stop: price("99"),
        stop_limit: None,
        source: Source::Sync,
        at: Millis(5),
    }
}

async fn raw(db: &TestDb) -> AsyncPgConnection {
    AsyncPgConnection::establish(db.url()).await.unwrap()
}

#[tokio::test]
async fn pg_store_passes_the_store_behaviour_suite() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    oco_core::testing::store_behaviour(&store).await.unwrap();
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn entry_rows(db: &TestDb) -> i64 {
    let row: Count = diesel::sql_query("SELECT count(*) AS n FROM entries")
        .get_result(&mut raw(db).await)
        .await
        .unwrap();
    row.n
}

/// Waits until `n` backends of the test database wait on a lock, or until
/// `done()` (the racing call went through without waiting).
async fn until_waiting_on_locks(conn: &mut AsyncPgConnection, n: i64, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .get_result(conn)
        .await
        .unwrap();
        if waiting.n >= n || done() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} backends never waited on a lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn pg_store_refuses_an_entry_on_a_disabled_account() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    oco_core::testing::inactive_account_behaviour(&store)
        .await
        .unwrap();
    assert_eq!(
        entry_rows(&db).await,
        1,
        "only the entry taken once the account was enabled again"
    );
}

#[tokio::test]
async fn pg_store_keeps_one_entry_per_idempotency_key() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    oco_core::testing::idempotency_behaviour(&store)
        .await
        .unwrap();
}

/// `release_idempotency_key` frees an entry's key and nothing else: the
/// entry stays, a new entry can take the key, releasing the first entry
/// again leaves the new one's key alone, an entry without a key is left
/// as it is, and an unknown entry is not found.
async fn a_released_key_can_be_taken_again<S: Store + oco_core::ports::Users>(store: &S) {
    let account = new_account(store, "k-release").await.id;
    let key = IdempotencyKey::new("resend me").unwrap();
    let keyed = |n: i64| {
        let key = key.clone();
        async move {
            store
                .create_entry(
                    NewEntry {
                        idempotency_key: Some(key),
                        ..entry_request(account)
                    },
                    &|id| ClientOrderId::new(format!("t-E-{id}")).unwrap(),
                    Millis(1_700_000_000_000 + n),
                )
                .await
        }
    };
    let first = keyed(1).await.unwrap();
    assert!(
        matches!(keyed(2).await, Err(StoreError::IdempotencyKeyUsed(e)) if e.id == first.id),
        "held before the release"
    );
    store.release_idempotency_key(first.id).await.unwrap();
    assert_eq!(
        store.entry_by_idempotency_key(account, &key).await.unwrap(),
        None,
        "the key finds nothing once released"
    );
    assert_eq!(
        store.entry(first.id).await.unwrap(),
        first,
        "the entry itself is kept as it was"
    );
    let second = keyed(3).await.unwrap();
    assert_ne!(second.id, first.id, "a new entry under the released key");

    // Released again by the first entry: the key is the second's now.
    store.release_idempotency_key(first.id).await.unwrap();
    assert_eq!(
        store.entry_by_idempotency_key(account, &key).await.unwrap(),
        Some(second.clone()),
        "another entry's key is left alone"
    );
    let keyless = new_entry(store, account).await;
    store.release_idempotency_key(keyless.id).await.unwrap();
    assert_eq!(store.entry(keyless.id).await.unwrap(), keyless);
    let missing = store.release_idempotency_key(EntryId(999_999)).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn pg_store_releases_an_idempotency_key() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    a_released_key_can_be_taken_again(&store).await;
    // The column itself is cleared, for the unique index to let the key go.
    assert_eq!(
        db.texts("SELECT coalesce(idempotency_key, '-') AS s FROM entries ORDER BY id")
            .await,
        ["-", "resend me", "-"]
    );
}

#[tokio::test]
async fn mem_store_releases_an_idempotency_key() {
    a_released_key_can_be_taken_again(&oco_core::mem::MemStore::new()).await;
}

/// Two requests with the same idempotency key, let go together: their
/// inserts race on the key, one stores the entry, the other waits for its
/// commit and answers with it. One row; both name the same entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_entries_racing_with_one_key_store_one() {
    use diesel_async::SimpleAsyncConnection as _;
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k-same-key").await.id;
    // Holds the account's row, so that both inserts queue behind it and
    // start together when it is let go.
    let mut gate = raw(&db).await;
    gate.batch_execute(&format!(
        "BEGIN; SELECT id FROM accounts WHERE id = {account} FOR UPDATE"
    ))
    .await
    .unwrap();
    let racing: Vec<_> = (0..2)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create_entry(
                        NewEntry {
                            idempotency_key: Some(IdempotencyKey::new("same-key").unwrap()),
                            ..entry_request(account)
                        },
                        &|id| ClientOrderId::new(format!("t-E-{id}")).unwrap(),
                        Millis(1_700_000_000_000 + n),
                    )
                    .await
            })
        })
        .collect();
    until_waiting_on_locks(&mut raw(&db).await, 2, || {
        racing.iter().all(tokio::task::JoinHandle::is_finished)
    })
    .await;
    gate.batch_execute("ROLLBACK").await.unwrap();

    let mut stored = Vec::new();
    let mut answered = Vec::new();
    for call in racing {
        match call.await.unwrap() {
            Ok(entry) => stored.push(entry),
            Err(StoreError::IdempotencyKeyUsed(entry)) => answered.push(*entry),
            Err(e) => panic!("neither stored nor answered with the entry: {e}"),
        }
    }
    assert_eq!(entry_rows(&db).await, 1, "one row for one key");
    assert_eq!(
        (stored.len(), answered.len()),
        (1, 1),
        "one stores, one answers: {stored:?} {answered:?}"
    );
    assert_eq!(answered[0], stored[0], "both name the same entry");
    assert_eq!(
        store
            .entry_by_idempotency_key(account, &IdempotencyKey::new("same-key").unwrap())
            .await
            .unwrap(),
        Some(stored[0].clone())
    );
}

/// A request and its resend with one key, where the first's send never
/// reached the exchange and it releases the key at once: the resend, whose
/// insert met the key before the release, never answers that the active
/// account is disabled (a client would not resend after that); it stores
/// the entry or names the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_released_while_its_resend_waits_never_reads_as_a_disabled_account() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k-released").await.id;
    for round in 0..150 {
        let key = IdempotencyKey::new(format!("released-{round}")).unwrap();
        let racing: Vec<_> = (0..2)
            .map(|n| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    let made = store
                        .create_entry(
                            NewEntry {
                                idempotency_key: Some(key),
                                ..entry_request(account)
                            },
                            &|id| ClientOrderId::new(format!("t-E-{id}")).unwrap(),
                            Millis(1_700_000_000_000 + n),
                        )
                        .await;
                    // The first to store it: its send is refused before the
                    // exchange, and it lets the key go at once.
                    if let Ok(entry) = &made {
                        store.release_idempotency_key(entry.id).await.unwrap();
                    }
                    made
                })
            })
            .collect();
        for call in racing {
            match call.await.unwrap() {
                Ok(_) | Err(StoreError::IdempotencyKeyUsed(_)) => {}
                Err(e) => panic!("round {round}: a resend racing a released key got {e}"),
            }
        }
    }
}

/// The gate on the account is part of the insert's one statement, still
/// prepared once per connection: no read and no second statement before an
/// entry's order goes out.
#[tokio::test]
async fn create_entry_stays_one_statement_prepared_once_per_connection() {
    let db = TestDb::new().await;
    let store = PgStore::connect(db.config(1)).await.unwrap();
    let account = new_account(&store, "k-prepared").await.id;
    for _ in 0..3 {
        new_entry(&store, account).await;
    }
    // An idempotency key is one more bound value, not another text.
    store
        .create_entry(
            NewEntry {
                idempotency_key: Some(IdempotencyKey::new("k-1").unwrap()),
                ..entry_request(account)
            },
            &|id| ClientOrderId::new(format!("t-E-{id}")).unwrap(),
            Millis(1_700_000_000_000),
        )
        .await
        .unwrap();
    let mut conn = store.pool().get().await.unwrap();
    let inserts: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_prepared_statements \
         WHERE statement LIKE 'INSERT INTO entries %FROM accounts a WHERE a.id = $% \
         AND a.active FOR SHARE ON CONFLICT % DO NOTHING RETURNING *'",
    )
    .get_result(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        inserts.n, 1,
        "one gated insert, prepared once for four entries"
    );
}

/// A disable whose write is in (not yet committed) when an entry is
/// created: the entry's insert waits for it and is then refused, so the
/// disable's re-check finds nothing and the disable stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_behind_a_disables_write_is_refused() {
    use diesel_async::SimpleAsyncConnection as _;
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k-disable-first").await.id;
    let mut disable = raw(&db).await;
    disable
        .batch_execute(&format!(
            "BEGIN; UPDATE accounts SET active = false WHERE id = {account}"
        ))
        .await
        .unwrap();
    let creating = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .create_entry(
                    entry_request(account),
                    &|id| ClientOrderId::new(format!("t-E-{id}")).unwrap(),
                    Millis(1_700_000_000_000),
                )
                .await
        }
    });
    until_waiting_on_locks(&mut raw(&db).await, 1, || creating.is_finished()).await;
    disable.batch_execute("COMMIT").await.unwrap();

    let created = creating.await.unwrap();
    assert_eq!(created, Err(StoreError::AccountInactive { account }));
    assert!(
        store.open_entries(account).await.unwrap().is_empty(),
        "the disable's re-check finds no entry"
    );
    assert_eq!(entry_rows(&db).await, 0, "nothing stored");
}

/// An entry whose insert is in (it holds the account, and waits on another
/// transaction's row with its client id) when a disable writes: the
/// disable's write waits for the entry's commit, so its re-check sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_behind_an_entrys_insert_sees_the_entry() {
    use diesel_async::SimpleAsyncConnection as _;
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k-entry-first").await.id;
    // Holds client id `t-held`: the entry's insert, once it has the
    // account's row, waits on the unique index until this rolls back.
    let mut holder = raw(&db).await;
    holder
        .batch_execute(&format!(
            "BEGIN; INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, \
             client_order_id, order_type, requested_qty, status, metadata, protection, \
             created_at) VALUES (nextval('entry_ids'), {account}, 'BTCUSDT', 'BTC', 'USDT', \
             't-held', 'market', 1, 'pending_new', '{{}}', 'not_needed', now())"
        ))
        .await
        .unwrap();
    let creating = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .create_entry(
                    entry_request(account),
                    &|_| ClientOrderId::new("t-held").unwrap(),
                    Millis(1_700_000_000_000),
                )
                .await
        }
    });
    let mut watch = raw(&db).await;
    until_waiting_on_locks(&mut watch, 1, || creating.is_finished()).await;
    // The disable as the API runs it: check, write, check again.
    let disabling = tokio::spawn({
        let store = store.clone();
        async move {
            let before = store.open_entries(account).await?;
            store.update_account(account, None, Some(false)).await?;
            let after = store.open_entries(account).await?;
            Ok::<_, StoreError>((before, after))
        }
    });
    until_waiting_on_locks(&mut watch, 2, || disabling.is_finished()).await;
    holder.batch_execute("ROLLBACK").await.unwrap();

    let entry = creating.await.unwrap().unwrap();
    let (before, after) = disabling.await.unwrap().unwrap();
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(
        after.iter().map(|e| e.id).collect::<Vec<_>>(),
        [entry.id],
        "the disable's re-check sees the entry stored before its write"
    );
}

/// The claimant's fence right before it sends and a taker's takeover of the
/// same stale claim, racing on separate connections: for every leg exactly
/// one of them applies, and the row says which.
#[tokio::test]
async fn a_fence_and_a_takeover_racing_never_both_apply() {
    use oco_core::model::LegUpdate;
    use oco_core::state::LegState;
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "k-fence").await;
    let entry = new_entry(&store, account.id).await;
    let claims: Vec<LegClaim> = (0..24).map(|g| claim(entry.id, g)).collect();
    for c in &claims {
        assert!(store.claim_leg(c).await.unwrap());
    }
    // Claimed at 5 ms, raced at 60 s: every claim is stale for a 30 s timeout.
    let at = Millis(60_000);
    let stale = Duration::from_secs(30);
    let fences = claims
        .iter()
        .map(|c| store.fence_legs(entry.id, std::slice::from_ref(&c.key), at));
    let takes: Vec<LegUpdate> = claims
        .iter()
        .map(|c| LegUpdate {
            key: c.key,
            from: "claimed",
            to: LegState::NotPlaced {
                code: None,
                reason: "lookup found no such list".into(),
            },
            error: None,
            at,
        })
        .collect();
    let takeovers = takes.iter().map(|u| store.take_over_leg(u, stale));
    let (fenced, taken) = futures_util::future::join(
        futures_util::future::join_all(fences),
        futures_util::future::join_all(takeovers),
    )
    .await;
    let legs = store.legs(entry.id).await.unwrap();
    for ((claim, fenced), taken) in claims.iter().zip(fenced).zip(taken) {
        let fenced = fenced.unwrap() == [true];
        let taken = taken.unwrap();
        assert!(
            fenced != taken,
            "{}: fenced {fenced}, taken {taken}",
            claim.key
        );
        let leg = legs.iter().find(|l| l.key == claim.key).unwrap();
        if fenced {
            assert_eq!((&leg.state, leg.updated_at), (&LegState::Claimed, at));
        } else {
            assert!(matches!(leg.state, LegState::NotPlaced { .. }), "{leg:?}");
        }
    }
    // A fenced claim is not taken over before the timeout has run from its fence.
    let late_claim = claim(entry.id, 24);
    assert!(store.claim_leg(&late_claim).await.unwrap());
    assert_eq!(
        store
            .fence_legs(entry.id, &[late_claim.key], at)
            .await
            .unwrap(),
        [true]
    );
    let early = LegUpdate {
        key: late_claim.key,
        at: Millis(60_000 + 30_000),
        ..takes[0].clone()
    };
    assert!(!store.take_over_leg(&early, stale).await.unwrap());
    let late = LegUpdate {
        at: Millis(60_000 + 30_001),
        ..early
    };
    assert!(store.take_over_leg(&late, stale).await.unwrap());
}

#[tokio::test]
async fn pg_store_records_a_fill_and_its_claims_in_one_write() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    oco_core::testing::fill_claim_behaviour(&store)
        .await
        .unwrap();
}

/// The entry changes between the snapshot and the write (another layer's
/// evidence lands while the legs are planned): the write applies nothing,
/// claims included, and the retry plans from the entry as it now is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_ride_only_on_a_merge_that_applied() {
    use oco_core::ports::FillContext;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "cas-key").await;
    let entry = new_entry(&store, account.id).await;
    let trade = |id: i64, q: &str| Fill {
        trade_id: id,
        price: price("100"),
        qty: qty(q),
        commission: Decimal::ZERO,
        commission_asset: Asset("BNB".into()),
        time: Millis(1_700_000_000_100 + id),
    };
    let other_layer = Evidence {
        order_id: Some(9),
        status: EntryStatus::PartiallyFilled,
        executed_qty: qty("0.4"),
        cumulative_quote: dec!(40),
        fills: vec![trade(901, "0.4")],
        holding: None,
        observed_at: Millis(1_700_000_000_200),
    };
    let seen = Evidence {
        status: EntryStatus::Filled,
        executed_qty: qty("1"),
        cumulative_quote: dec!(100),
        fills: vec![trade(902, "0.6")],
        ..other_layer.clone()
    };
    let leg = |index: LegIndex, q: Qty| {
        let id = |k: &str| {
            ClientOrderId::new(format!("t-{k}-{}-{}-0", entry.id, index.number())).unwrap()
        };
        LegClaim {
            key: LegKey {
                entry: entry.id,
                leg: index,
                generation: 0,
            },
            ids: OcoClientIds {
                list: id("L"),
                take_profit: id("T"),
                stop_loss: id("S"),
            },
            qty: q,
            ..claim(entry.id, 0)
        }
    };
    let calls = AtomicUsize::new(0);
    let plan = |merged: &Entry, context: &FillContext| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(store.record_evidence(entry.id, &other_layer))
                    .unwrap()
            });
        }
        if !context.legs.is_empty() {
            return Vec::new();
        }
        let half = Qty::new(merged.fills_qty.get() / Decimal::TWO).unwrap();
        vec![leg(LegIndex::First, half), leg(LegIndex::Second, half)]
    };
    let recorded = store
        .record_fill_and_claim(account.id, entry.id, &seen, &plan)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        AtomicUsize::load(&calls, Ordering::SeqCst),
        2,
        "the lost compare-and-set plans again"
    );
    assert_eq!(recorded.won, vec![true, true], "{recorded:?}");
    assert_eq!(
        recorded.entry.fills_qty,
        qty("1"),
        "both layers' fills land"
    );
    let legs = store.legs(entry.id).await.unwrap();
    assert_eq!(legs.len(), 2);
    assert!(
        legs.iter().all(|l| l.qty == qty("0.5")),
        "the claims are the retry's, planned from every fill: {legs:?}"
    );
}

/// The placer writes its outcomes from a copy of the entry read before it
/// placed; a take-profit that filled meanwhile may have closed the entry.
/// The write still moves the legs, but leaves the entry closed (so does a
/// plain protection write), and closing it again for a sale recorded late
/// changes its result, not the time it closed.
#[tokio::test]
async fn a_stale_protection_write_leaves_a_closed_entry_closed() {
    use oco_core::model::LegUpdate;
    use oco_core::state::LegState;
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "k-closed").await;
    let entry = new_entry(&store, account.id).await;
    let leg = claim(entry.id, 0);
    assert!(store.claim_leg(&leg).await.unwrap());
    let closed_at = Millis(1_700_000_060_000);
    store
        .close_entry(entry.id, Realized::complete(dec!(-1.5)), closed_at)
        .await
        .unwrap();

    let stale = Protection::Protected {
        at: Millis(1_700_000_061_000),
        by: Source::Websocket,
    };
    let placed = LegUpdate {
        key: leg.key,
        from: "claimed",
        to: LegState::Placed { list_id: 7 },
        error: None,
        at: Millis(1_700_000_061_000),
    };
    let written = store
        .record_outcomes(entry.id, &[placed], &[], Some(&stale))
        .await
        .unwrap();
    assert_eq!(written.applied, [true], "the legs still move");
    assert_eq!(written.entry.protection, Protection::Closed);
    store.set_protection(entry.id, &stale).await.unwrap();
    let read = store.entry(entry.id).await.unwrap();
    assert_eq!(read.protection, Protection::Closed);
    assert_eq!(read.realized_quote, Some(dec!(-1.5)));
    assert_eq!(
        store.legs(entry.id).await.unwrap()[0].state,
        LegState::Placed { list_id: 7 }
    );
    assert!(matches!(
        store
            .set_protection(EntryId(entry.id.0 + 1_000), &stale)
            .await,
        Err(StoreError::NotFound { .. })
    ));

    store
        .close_entry(
            entry.id,
            Realized::complete(dec!(2.25)),
            Millis(1_700_000_090_000),
        )
        .await
        .unwrap();
    assert_eq!(
        store.entry(entry.id).await.unwrap().realized_quote,
        Some(dec!(2.25))
    );
    #[derive(diesel::QueryableByName)]
    struct Closed {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        ms: i64,
    }
    let row: Closed = diesel::sql_query(
        "SELECT (extract(epoch FROM closed_at) * 1000)::int8 AS ms FROM entries WHERE id = $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(entry.id.0)
    .get_result(&mut raw(&db).await)
    .await
    .unwrap();
    assert_eq!(row.ms, closed_at.0, "the first close time is kept");
}

#[tokio::test]
async fn mem_store_records_a_fill_and_its_claims_the_same_way() {
    oco_core::testing::fill_claim_behaviour(&oco_core::mem::MemStore::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn mem_store_passes_the_same_suite() {
    oco_core::testing::store_behaviour(&oco_core::mem::MemStore::new())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_claimers_exactly_one_wins() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k1").await;
    let entry = new_entry(store.as_ref(), account.id).await;
    for generation in 0..3 {
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.claim_leg(&claim(entry.id, generation)).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            if t.await.unwrap().unwrap() {
                won += 1;
            }
        }
        assert_eq!(won, 1, "generation {generation}: exactly one of 50 wins");
    }
    assert_eq!(store.legs(entry.id).await.unwrap().len(), 3);
    // The list client id is unique on its own too.
    let mut same_list = claim(entry.id, 7);
    same_list.ids = claim(entry.id, 0).ids;
    assert!(
        !store.claim_leg(&same_list).await.unwrap(),
        "a reused list client id loses"
    );
    let missing = claim(EntryId(entry.id.0 + 1000), 0);
    assert!(matches!(
        store.claim_leg(&missing).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// The stream and sync's lookups report a leg's trades, each many times,
/// all at once, some trades in several reports: each is stored once and the
/// leg's sums count it once, as the trades table itself says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leg_trades_reported_many_times_at_once_count_once() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k1").await;
    let entry = new_entry(store.as_ref(), account.id).await;
    let key = claim(entry.id, 0).key;
    assert!(store.claim_leg(&claim(entry.id, 0)).await.unwrap());
    // Trade t: 0.05 sold, charged 0.005 USDT; every third also 0.00001 BNB apart.
    let trade = |t: i64| {
        let (fee, asset) = if t % 3 == 0 {
            ("0.00001", "BNB")
        } else {
            ("0.005", "USDT")
        };
        fill(t, "0.05", fee, asset)
    };
    let tasks: Vec<_> = (0..40)
        .map(|n: i64| {
            let store = Arc::clone(&store);
            // Report n holds trades n % 10 + 1 ..= n % 10 + 3: overlapping.
            let trades: Vec<Fill> = (n % 10 + 1..=n % 10 + 3).map(trade).collect();
            tokio::spawn(async move {
                store
                    .record_leg_trades(key, oco_core::model::SaleSide::TakeProfit, &trades)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Trades 1..=12 are known: 4 of them (3, 6, 9, 12) in BNB.
    let leg = store.legs(entry.id).await.unwrap().remove(0);
    assert_eq!(leg.trades.take_profit_qty, qty("0.6"));
    assert_eq!(leg.trades.stop_loss_qty, Qty::ZERO);
    assert_eq!(leg.trades.fees.of(&Asset("USDT".into())), dec!(0.04));
    assert_eq!(leg.trades.fees.of(&Asset("BNB".into())), dec!(0.00004));
    let stored: Count = diesel::sql_query("SELECT count(*) AS n FROM leg_trades")
        .get_result(&mut raw(&db).await)
        .await
        .unwrap();
    assert_eq!(stored.n, 12, "each trade stored once");
}

fn fill(trade_id: i64, q: &str, fee: &str, fee_asset: &str) -> Fill {
    Fill {
        trade_id,
        price: price("100"),
        qty: qty(q),
        commission: fee.parse().unwrap(),
        commission_asset: Asset(fee_asset.into()),
        time: Millis(2_000 + trade_id),
    }
}

/// Snapshot `n` of an order filling in ten trades of 0.1, each paying a BTC fee.
fn snapshot(n: i64) -> Evidence {
    let fills: Vec<Fill> = (1..=n).map(|t| fill(t, "0.1", "0.0001", "BTC")).collect();
    let executed = Decimal::new(n, 1);
    Evidence {
        order_id: Some(555),
        status: if n == 10 {
            EntryStatus::Filled
        } else if n == 0 {
            EntryStatus::New
        } else {
            EntryStatus::PartiallyFilled
        },
        executed_qty: Qty::new(executed).unwrap(),
        cumulative_quote: executed * dec!(100),
        // Layers often see only the last trade.
        fills: fills
            .into_iter()
            .rev()
            .take(if n % 2 == 0 { 1 } else { 10 })
            .collect(),
        holding: None,
        observed_at: Millis(3_000 + n),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_out_of_order_evidence_ends_monotonic() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k1").await;
    let entry = new_entry(store.as_ref(), account.id).await;
    // Every snapshot three times, shuffled by interleaving, all at once.
    let mut order: Vec<i64> = (0..=10)
        .chain((0..=10).rev())
        .chain((0..=10).map(|i| (i * 7) % 11))
        .collect();
    order.rotate_left(5);
    let tasks: Vec<_> = order
        .iter()
        .map(|&n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let seen = snapshot(n);
                let after = store.record_evidence(entry.id, &seen).await.unwrap();
                assert!(
                    after.executed_qty >= seen.executed_qty,
                    "never below what was just seen"
                );
                after
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let end = store.entry(entry.id).await.unwrap();
    assert_eq!(end.status, EntryStatus::Filled);
    assert_eq!(end.executed_qty, qty("1"));
    assert_eq!(end.cumulative_quote, dec!(100));
    assert_eq!(
        end.fills_qty,
        qty("1"),
        "all ten trades were seen once each"
    );
    assert_eq!(end.base_commission, qty("0.001"), "each fee counted once");
    assert_eq!(end.filled_at, Some(Millis(2_001)));
    assert_eq!(end.order_id, Some(555));
    assert_eq!(end.protection, Protection::Unprotected);

    // The same evidence through the in-memory store ends in the same place.
    let mem = oco_core::mem::MemStore::new();
    let mem_account = new_account(&mem, "k1").await;
    let mem_entry = new_entry(&mem, mem_account.id).await;
    for &n in &order {
        mem.record_evidence(mem_entry.id, &snapshot(n))
            .await
            .unwrap();
    }
    let mem_end = mem.entry(mem_entry.id).await.unwrap();
    let strip = |e: Entry| Entry {
        id: EntryId(0),
        account: AccountId(0),
        client_id: ClientOrderId::new("x").unwrap(),
        ..e
    };
    assert_eq!(strip(end), strip(mem_end), "pg and mem merge alike");
}

#[tokio::test]
async fn a_trade_stored_for_another_entry_is_left_out_and_nothing_is_half_written() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "k1").await;
    let a = new_entry(&store, account.id).await;
    let b = new_entry(&store, account.id).await;
    store.record_evidence(a.id, &snapshot(1)).await.unwrap();
    // Entry b's evidence names trade 1 (already a's) and trade 2 (new).
    let mut ev = snapshot(2);
    ev.executed_qty = qty("0.1");
    ev.cumulative_quote = dec!(10);
    let after = store
        .record_evidence_of(account.id, b.id, &ev)
        .await
        .unwrap()
        .expect("b is the account's");
    assert_eq!(after.fills_qty, qty("0.1"), "only trade 2 is b's");
    assert_eq!(after.base_commission, qty("0.0001"));
    let a_now = store.entry(a.id).await.unwrap();
    assert_eq!(a_now.fills_qty, qty("0.1"), "a keeps its trade");

    // Seen on another account's stream: refused, and no fill row is written.
    let mut foreign = snapshot(5);
    foreign.fills.retain(|f| f.trade_id >= 3);
    let refused = store
        .record_evidence_of(AccountId(account.id.0 + 99), b.id, &foreign)
        .await
        .unwrap();
    assert!(refused.is_none());
    let mut conn = raw(&db).await;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let fills: Count = diesel::sql_query("SELECT count(*) AS n FROM fills")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(fills.n, 2, "trades 1 (a) and 2 (b) only");
    assert_eq!(store.entry(b.id).await.unwrap(), after);
}

#[tokio::test]
async fn evidence_never_lowers_stored_values_even_if_written_by_sql() {
    // GREATEST in the UPDATE keeps the stored maximum whatever a merge computed.
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "k1").await;
    let entry = new_entry(&store, account.id).await;
    store.record_evidence(entry.id, &snapshot(3)).await.unwrap();
    let mut conn = raw(&db).await;
    diesel::sql_query("UPDATE entries SET executed_qty = 0.9 WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(entry.id.0)
        .execute(&mut conn)
        .await
        .unwrap();
    let after = store.record_evidence(entry.id, &snapshot(4)).await.unwrap();
    assert_eq!(after.executed_qty, qty("0.9"));
    assert_eq!(after.status, EntryStatus::PartiallyFilled);
}

#[tokio::test]
async fn entries_keep_levels_in_jsonb_metadata_and_amounts_exactly() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "k1").await;
    let e = new_entry(&store, account.id).await;
    assert_eq!(store.entry(e.id).await.unwrap(), e);
    let mut conn = raw(&db).await;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        meta: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        limit: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let row: Row = diesel::sql_query(
        "SELECT metadata::text AS meta, limit_price::text AS limit, \
         (SELECT count(*) FROM entries WHERE metadata @> '{\"sl\": \"99.25\"}') AS n FROM entries WHERE id = $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(e.id.0)
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        row.meta,
        r#"{"sl": "99.25", "tp1": "101", "portfolioId": "pf-9"}"#
    );
    assert_eq!(row.limit, "100.5");
    assert_eq!(row.n, 1, "metadata is queryable by containment (GIN)");
    // Amounts with many places round-trip exactly.
    let mut ev = snapshot(1);
    ev.cumulative_quote = dec!(10.123456789012345678);
    let after = store.record_evidence(e.id, &ev).await.unwrap();
    assert_eq!(after.cumulative_quote, dec!(10.123456789012345678));
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_a_wrong_key_is_refused_at_connect() {
    let db = TestDb::new().await;
    let key = SecretKey::generate();
    let store = PgStore::connect(db.config_with_key(2, key.clone()))
        .await
        .unwrap();
    let account = new_account(&store, "k1").await;
    let mut conn = raw(&db).await;
    #[derive(diesel::QueryableByName)]
    struct Blob {
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        secret_ciphertext: Vec<u8>,
    }
    let blob: Blob = diesel::sql_query("SELECT secret_ciphertext FROM accounts")
        .get_result(&mut conn)
        .await
        .unwrap();
    let needle = b"secret-of-k1";
    assert!(
        !blob
            .secret_ciphertext
            .windows(needle.len())
            .any(|w| w == needle),
        "no secret in clear"
    );
    let debug = format!("{store:?}");
    assert!(
        debug.contains("redacted") && !debug.contains(db.name()),
        "{debug}"
    );
    drop(store);

    // The same key works again; another key is refused before any decrypt.
    let again = PgStore::connect(db.config_with_key(2, key)).await.unwrap();
    assert_eq!(
        again
            .credentials(account.id)
            .await
            .unwrap()
            .secret
            .expose_secret(),
        "secret-of-k1"
    );
    let wrong = PgStore::connect(db.config_with_key(2, SecretKey::generate())).await;
    match wrong {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("secret key"), "{msg}"),
        other => panic!("a wrong key must be refused at connect, got {other:?}"),
    }

    // A ciphertext moved to another account's row does not decrypt there.
    let other = new_account(&again, "k2").await;
    diesel::sql_query(
        "UPDATE accounts SET secret_ciphertext = (SELECT secret_ciphertext FROM accounts WHERE id = $1) WHERE id = $2",
    )
    .bind::<diesel::sql_types::BigInt, _>(account.id.0)
    .bind::<diesel::sql_types::BigInt, _>(other.id.0)
    .execute(&mut conn)
    .await
    .unwrap();
    let err = again.credentials(other.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(!err.to_string().contains("secret-of"), "{err}");
}

#[tokio::test]
async fn expired_leases_move_to_another_holder() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let a = new_account(&store, "k1").await;
    let b = new_account(&store, "k2").await;
    let c = new_account(&store, "k3").await;
    store.update_account(c.id, None, Some(false)).await.unwrap();

    let long = Duration::from_secs(60);
    assert_eq!(
        store.acquire_leases("node-1", 1, long).await.unwrap(),
        vec![a.id]
    );
    assert_eq!(
        store.acquire_leases("node-2", 10, long).await.unwrap(),
        vec![b.id],
        "inactive accounts are not leased"
    );
    assert!(
        store
            .acquire_leases("node-2", 10, long)
            .await
            .unwrap()
            .is_empty(),
        "live leases stay"
    );
    assert_eq!(
        store.renew_leases("node-1", long).await.unwrap(),
        vec![a.id]
    );

    // node-1 dies: its short lease expires and node-2 takes the account.
    store
        .renew_leases("node-1", Duration::from_millis(200))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let moved = loop {
        let got = store.acquire_leases("node-2", 10, long).await.unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "the expired lease never moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(moved, vec![a.id]);
    assert!(
        store.renew_leases("node-1", long).await.unwrap().is_empty(),
        "node-1 learns it lost the lease"
    );
    let mut held = store.renew_leases("node-2", long).await.unwrap();
    held.sort();
    assert_eq!(held, vec![a.id, b.id]);

    // Disabling an account drops its lease at the next renewal.
    store.update_account(b.id, None, Some(false)).await.unwrap();
    assert_eq!(
        store.renew_leases("node-2", long).await.unwrap(),
        vec![a.id]
    );
    assert_eq!(store.release_leases("node-2").await.unwrap(), 1);
    assert_eq!(
        store.acquire_leases("node-3", 10, long).await.unwrap(),
        vec![a.id],
        "released leases are free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_lease_acquirers_never_share_an_account() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    for i in 0..20 {
        new_account(store.as_ref(), &format!("k{i}")).await;
    }
    let tasks: Vec<_> = (0..5)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .acquire_leases(&format!("node-{n}"), 6, Duration::from_secs(60))
                    .await
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap().unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "an account was leased twice");
    assert!(n <= 20);
}

/// Fills holding every connection of the pool they write through (here
/// claims, each waiting on a row lock another process holds) hold up no lease
/// call of the gateway's: leases have connections of their own, so a gateway
/// does not take a busy pool for a lost database and let its accounts go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_calls_go_through_while_fills_hold_every_pooled_connection() {
    use diesel_async::SimpleAsyncConnection as _;
    use oco_core::ports::Leases;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    const POOL: usize = 2;
    // Well under the pool's 5 s wait, which a lease call queued behind the
    // fills would spend before failing.
    const PROMPT: Duration = Duration::from_secs(2);
    async fn prompt<T>(call: &str, leased: impl Future<Output = Result<T, StoreError>>) -> T {
        tokio::time::timeout(PROMPT, leased)
            .await
            .unwrap_or_else(|_| panic!("{call} waited behind the fills for {PROMPT:?}"))
            .unwrap()
    }
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(db.config(POOL)).await.unwrap());
    let account = new_account(store.as_ref(), "k1").await;
    let entry = new_entry(store.as_ref(), account.id).await.id;

    let mut locker = raw(&db).await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM entries WHERE id = {entry} FOR UPDATE"
        ))
        .await
        .unwrap();
    let claims: Vec<_> = (0..POOL)
        .map(|generation| {
            let store = Arc::clone(&store);
            let claim = claim(entry, u32::try_from(generation).unwrap());
            tokio::spawn(async move { store.claim_legs(&[claim]).await })
        })
        .collect();
    let busy = |store: &PgStore| {
        let status = store.pool().status();
        status.size == POOL && status.available == 0
    };
    // Not on the locker's connection: in a transaction the activity view
    // stays as first read.
    let mut watcher = raw(&db).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .get_result(&mut watcher)
        .await
        .unwrap();
        if usize::try_from(waiting.n).unwrap() == POOL && busy(&store) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the claims never took every pooled connection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let long = Duration::from_secs(60);
    let store_ref = store.as_ref();
    assert_eq!(
        prompt(
            "acquiring",
            Leases::acquire_leases(store_ref, "gw-1", 10, long)
        )
        .await,
        vec![(account.id, false)]
    );
    assert_eq!(
        prompt("renewing", Leases::renew_leases(store_ref, "gw-1", long)).await,
        vec![account.id]
    );
    prompt("releasing", Leases::release_leases(store_ref, "gw-1")).await;
    assert!(busy(&store), "the fills held the pool throughout");
    assert!(
        claims.iter().all(|c| !c.is_finished()),
        "the claims still wait"
    );

    // Delayed, not failed: the claims go through once the row is free.
    locker.batch_execute("COMMIT").await.unwrap();
    for c in claims {
        assert_eq!(c.await.unwrap().unwrap(), vec![true]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flagged_accounts_are_taken_once_and_announced() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let mut listener = store.listen_reconcile().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(new_account(store.as_ref(), &format!("k{i}")).await.id);
    }
    for id in &ids {
        store.flag_reconcile(*id, "gap", Millis(1)).await.unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, ids[0], "NOTIFY carries the account id");
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store.take_flagged(3).await.unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got);
                }
            })
        })
        .collect();
    let mut taken = Vec::new();
    for t in tasks {
        taken.extend(t.await.unwrap());
    }
    taken.sort();
    assert_eq!(taken, ids, "every flag taken exactly once");
    assert!(matches!(
        store
            .flag_reconcile(AccountId(99_999), "x", Millis(1))
            .await,
        Err(StoreError::NotFound { .. })
    ));

    // Many in one write: each announced once, taken once, duplicates merged.
    while tokio::time::timeout(Duration::from_millis(100), listener.recv())
        .await
        .is_ok()
    {}
    let mut many: Vec<(AccountId, String)> = ids[..10]
        .iter()
        .map(|id| (*id, "stream opened".to_owned()))
        .collect();
    many.push((ids[0], "stream opened again".to_owned()));
    store.flag_reconcile_many(&many, Millis(2)).await.unwrap();
    let mut announced = Vec::new();
    while let Ok(Ok(id)) = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
        announced.push(id);
        if announced.len() == 10 {
            break;
        }
    }
    announced.sort();
    assert_eq!(announced, ids[..10], "one NOTIFY per account flagged");
    let mut taken = store.take_flagged(100).await.unwrap();
    taken.sort();
    assert_eq!(taken, ids[..10], "each account flagged once");
    let with_unknown = [
        (ids[11], "x".to_owned()),
        (AccountId(99_999), "x".to_owned()),
    ];
    assert!(matches!(
        store.flag_reconcile_many(&with_unknown, Millis(3)).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        store.take_flagged(100).await.unwrap().is_empty(),
        "an unknown account fails the whole write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takers_split_due_accounts_once_each() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(new_account(store.as_ref(), &format!("d{i}")).await.id);
    }
    let hour = Duration::from_secs(3600);
    let tasks: Vec<_> = (0..6)
        .map(|t| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let holder = format!("sync-{t}");
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .take_due_accounts(&holder, hour, hour, 3)
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    for id in &got {
                        store.mark_reconciled(*id, Instant::now()).await.unwrap();
                    }
                    mine.extend(got);
                }
            })
        })
        .collect();
    let mut taken = Vec::new();
    for t in tasks {
        taken.extend(t.await.unwrap());
    }
    taken.sort();
    assert_eq!(taken, ids, "every due account taken exactly once");
    assert!(
        store
            .take_due_accounts("late", hour, hour, 100)
            .await
            .unwrap()
            .is_empty(),
        "nothing is due within the interval"
    );
}

/// A pass that began before another process deferred the account (its pass
/// of the account failed meanwhile) and completes after: its mark keeps
/// that retry. A retry written before the pass began is cleared by it.
async fn a_stale_pass_keeps_a_newer_retry(store: &dyn Store) {
    let account = new_account(store, "stale-pass").await.id;
    let hour = Duration::from_secs(3600);
    // Reconciled once: only a retry makes it due within the hour.
    store
        .mark_reconciled(account, Instant::now())
        .await
        .unwrap();
    // Apart by more than any clock's grain, so the order is never in doubt.
    let apart = Duration::from_millis(20);

    // P1's pass begins; P2's pass of the account fails and defers it (due at
    // once); P1's pass completes.
    let began = Instant::now();
    tokio::time::sleep(apart).await;
    store
        .defer_reconcile(account, Duration::ZERO)
        .await
        .unwrap();
    store.mark_reconciled(account, began).await.unwrap();
    assert_eq!(
        store.take_due_retries("sync-c", hour, 10).await.unwrap(),
        [account],
        "the retry written while the pass ran was kept"
    );

    // P2's retry fails again and defers it; a pass begun after that
    // completes: the retry is done with.
    store
        .defer_reconcile(account, Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(apart).await;
    store
        .mark_reconciled(account, Instant::now())
        .await
        .unwrap();
    assert!(
        store
            .take_due_retries("sync-c", hour, 10)
            .await
            .unwrap()
            .is_empty(),
        "a retry written before the pass began is cleared"
    );
    assert!(
        store
            .take_due_accounts("sync-c", hour, hour, 10)
            .await
            .unwrap()
            .is_empty(),
        "nor is the account due within its interval"
    );
}

#[tokio::test]
async fn pg_store_keeps_a_retry_written_after_the_pass_began() {
    let db = TestDb::new().await;
    a_stale_pass_keeps_a_newer_retry(&store(&db).await).await;
}

#[tokio::test]
async fn mem_store_keeps_a_retry_written_after_the_pass_began() {
    a_stale_pass_keeps_a_newer_retry(&oco_core::mem::MemStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_lose_nothing_acknowledged() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(store.as_ref(), "k1").await;
    let mut entries = Vec::new();
    for _ in 0..40 {
        entries.push(new_entry(store.as_ref(), account.id).await.id);
    }
    // A killer terminates every backend of the store's pool, again and again.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = Arc::clone(&stop);
        let mut conn = raw(&db).await;
        tokio::spawn(async move {
            let mut kills = 0;
            while !std::sync::atomic::AtomicBool::load(&stop, std::sync::atomic::Ordering::Relaxed)
            {
                diesel::sql_query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .execute(&mut conn)
                .await
                .unwrap();
                kills += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            kills
        })
    };
    let mut acknowledged = Vec::new();
    let mut accepted = Vec::new();
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, id) in entries.iter().enumerate() {
        // The order's first NEW (a one-statement write of its own), then a fill.
        let mut first_new = snapshot(0);
        first_new.order_id = Some(9_000 + i as i64);
        while Instant::now() < deadline {
            match store.record_evidence(*id, &first_new).await {
                Ok(e) => {
                    accepted.push((*id, e.status, e.order_id));
                    break;
                }
                Err(StoreError::Unavailable(_)) => failed += 1,
                Err(other) => panic!("entry {id}: {other:?}"),
            }
        }
        while Instant::now() < deadline {
            match store
                .record_evidence(*id, &snapshot(1 + (i as i64 % 10)))
                .await
            {
                Ok(e) => {
                    acknowledged.push((*id, e.executed_qty));
                    break;
                }
                Err(StoreError::Unavailable(_)) => failed += 1,
                Err(other) => panic!("entry {id}: {other:?}"),
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(kills > 0);
    assert_eq!(
        acknowledged.len(),
        entries.len(),
        "every write eventually went through"
    );
    assert_eq!(accepted.len(), entries.len());
    for (id, status, order_id) in accepted {
        let stored = store.entry(id).await.unwrap();
        assert_eq!(status, EntryStatus::New, "entry {id}");
        assert_eq!(
            stored.order_id, order_id,
            "entry {id}: acknowledged order id kept"
        );
    }
    for (id, executed) in acknowledged {
        let stored = store.entry(id).await.unwrap();
        assert!(
            stored.executed_qty >= executed,
            "entry {id}: acknowledged {executed}, stored {}",
            stored.executed_qty
        );
    }
    eprintln!("{failed} calls failed as Unavailable during {kills} kill rounds");
}

#[tokio::test]
async fn pg_store_has_the_users_behaviour() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    oco_core::testing::users_behaviour(&store).await.unwrap();
}

#[tokio::test]
async fn pg_store_has_the_lease_behaviour_of_the_port() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    new_account(&store, "lease-a").await;
    new_account(&store, "lease-b").await;
    oco_core::testing::lease_behaviour(&store).await.unwrap();
}

#[tokio::test]
async fn pg_store_has_the_coverage_behaviour() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    oco_core::testing::coverage_behaviour(&store).await.unwrap();
}

#[tokio::test]
async fn the_first_new_of_an_order_merges_like_any_evidence() {
    // NEW with nothing filled takes a one-statement path; it must end where the
    // general merge (and the in-memory store) ends, whatever state it meets.
    let db = TestDb::new().await;
    let store = store(&db).await;
    let mem = oco_core::mem::MemStore::new();
    let new = |order_id: i64| Evidence {
        order_id: Some(order_id),
        ..snapshot(0)
    };
    let strip = |e: Entry| Entry {
        id: EntryId(0),
        account: AccountId(0),
        client_id: ClientOrderId::new("x").unwrap(),
        ..e
    };
    let cases: Vec<Vec<Evidence>> = vec![
        // pending_new → new, order named.
        vec![new(555)],
        // Named already: a second NEW with another id keeps the first.
        vec![new(555), new(777)],
        // A fill came first: the late NEW lowers nothing.
        vec![snapshot(3), new(555)],
        // Filled, then a replayed NEW.
        vec![snapshot(10), new(555)],
    ];
    for (i, steps) in cases.iter().enumerate() {
        let pg_account = new_account(&store, &format!("pg{i}")).await;
        let pg_entry = new_entry(&store, pg_account.id).await;
        assert_eq!(pg_entry.status, EntryStatus::PendingNew);
        let mem_account = new_account(&mem, &format!("mem{i}")).await;
        let mem_entry = new_entry(&mem, mem_account.id).await;
        let (mut pg_after, mut mem_after) = (None, None);
        for ev in steps {
            pg_after = Some(store.record_evidence(pg_entry.id, ev).await.unwrap());
            mem_after = Some(mem.record_evidence(mem_entry.id, ev).await.unwrap());
        }
        let (pg_after, mem_after) = (pg_after.unwrap(), mem_after.unwrap());
        assert_eq!(
            strip(pg_after.clone()),
            strip(mem_after),
            "case {i}: pg and mem merge alike"
        );
        assert_eq!(
            strip(store.entry(pg_entry.id).await.unwrap()),
            strip(pg_after.clone()),
            "case {i}: what was returned is what is stored"
        );
        assert_eq!(pg_after.order_id, Some(555), "case {i}");
    }
    let first = store.entry(EntryId(1)).await.unwrap();
    assert_eq!(first.status, EntryStatus::New);
}

#[tokio::test]
async fn warm_up_opens_every_connection_and_prepares_the_fill_reads() {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    async fn count(conn: &mut AsyncPgConnection, sql: &str) -> i64 {
        let row: Count = diesel::sql_query(sql).get_result(conn).await.unwrap();
        row.n
    }
    /// Statements prepared on `conn` whose text is `LIKE` `pattern`.
    async fn prepared(conn: &mut AsyncPgConnection, pattern: &str) -> i64 {
        let sql = format!(
            "SELECT count(*) AS n FROM pg_prepared_statements \
             WHERE statement LIKE '{pattern}' AND statement NOT LIKE '%pg_prepared_statements%'"
        );
        count(conn, &sql).await
    }
    let db = TestDb::new().await;
    let store = PgStore::connect(db.config(3)).await.unwrap();
    let mut raw = raw(&db).await;

    store.warm_up().await.unwrap();

    assert_eq!(store.pool().status().size, 3);
    assert_eq!(store.evidence_pool().status().size, 3);
    assert_eq!(
        store.lease_pool().status().size,
        store_pg::LEASE_CONNECTIONS,
        "the leases' connections opened too"
    );
    // Both pools' three connections, each prepared with the fill's four reads
    // (the snapshot, the keys, the settings, the legs).
    let reads = "SELECT count(*) AS n FROM pg_prepared_statements \
                 WHERE statement NOT LIKE '%pg_prepared_statements%' AND (\
                 statement LIKE '%\"entries\" LEFT OUTER JOIN \"fills\"%' \
                 OR statement LIKE '%\"accounts\".\"secret_ciphertext\", \"accounts\".\"version\" FROM%' \
                 OR statement LIKE '%\"accounts\".\"late_policy\"%' \
                 OR statement LIKE '%FROM \"protection_legs\" WHERE%')";
    let mut pids = Vec::new();
    for pool in [store.pool(), store.evidence_pool()] {
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.get().await.unwrap());
        }
        for conn in &mut conns {
            let fill_reads = count(conn, reads).await;
            assert_eq!(
                fill_reads, 4,
                "the fill's reads prepared on a warmed connection"
            );
            // The evidence writes: on durable connections the merge with its
            // claims, as read and as hinted, and the outcomes' call; on
            // evidence ones the merge alone.
            let merges = prepared(conn, "WITH new_fills AS (INSERT INTO fills%").await;
            let hinted = prepared(conn, "WITH new_fills%merged AS%version FROM accounts%").await;
            let outcomes = prepared(conn, "%FROM record_outcomes(%").await;
            // Past PostgreSQL's custom plans: the merges' next binds reuse a
            // generic plan instead of planning again (about 1.2 ms a fill).
            let unsettled = count(
                conn,
                "SELECT count(*) AS n FROM pg_prepared_statements \
                 WHERE statement LIKE 'WITH new_fills AS (INSERT INTO fills%' \
                 AND generic_plans = 0",
            )
            .await;
            assert_eq!(unsettled, 0, "every merge has settled on its generic plan");
            if std::ptr::eq(pool, store.pool()) {
                assert_eq!(
                    (merges, hinted, outcomes),
                    (2, 1, 1),
                    "merge and claim, read and hinted; the outcomes' call"
                );
            } else {
                assert_eq!((merges, hinted, outcomes), (1, 0, 0), "the merge alone");
            }
            pids.push(count(conn, "SELECT pg_backend_pid()::int8 AS n").await);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 6, "six distinct connections: {pids:?}");
    let written = count(
        &mut raw,
        "SELECT (SELECT count(*) FROM entries) + (SELECT count(*) FROM fills) \
         + (SELECT count(*) FROM protection_legs) + (SELECT count(*) FROM accounts) \
         + (SELECT count(*) FROM reconcile_schedule) AS n",
    )
    .await;
    assert_eq!(written, 0);
}

/// Legs planned from the context the store hands over: half the filled
/// quantity each with the account's split, and none once legs exist. The
/// split each plan saw is kept, to tell which settings it was given.
fn split_planner(
    entry: EntryId,
) -> impl Fn(&Entry, &oco_core::ports::FillContext) -> Vec<LegClaim> {
    let leg = move |index: LegIndex, q: Qty| {
        let id =
            |k: &str| ClientOrderId::new(format!("h-{k}-{entry}-{}-0", index.number())).unwrap();
        LegClaim {
            key: LegKey {
                entry,
                leg: index,
                generation: 0,
            },
            ids: OcoClientIds {
                list: id("L"),
                take_profit: id("T"),
                stop_loss: id("S"),
            },
            qty: q,
            ..claim(entry, 0)
        }
    };
    move |merged, context| {
        if !context.legs.is_empty() {
            return Vec::new();
        }
        let split = context.account.protection.split;
        let first = Qty::new(merged.fills_qty.get() * split).unwrap();
        let rest = Qty::new(merged.fills_qty.get() - first.get()).unwrap();
        vec![leg(LegIndex::First, first), leg(LegIndex::Second, rest)]
    }
}

fn accepted(order_id: i64) -> Evidence {
    Evidence {
        order_id: Some(order_id),
        ..snapshot(0)
    }
}

fn filled(order_id: i64, trades: &[(i64, &str)], executed: &str) -> Evidence {
    let executed = qty(executed);
    Evidence {
        order_id: Some(order_id),
        status: if executed == qty("1") {
            EntryStatus::Filled
        } else {
            EntryStatus::PartiallyFilled
        },
        executed_qty: executed,
        cumulative_quote: executed.get() * dec!(100),
        fills: trades
            .iter()
            .map(|(t, q)| fill(*t, q, "0", "BNB"))
            .collect(),
        holding: None,
        observed_at: Millis(4_000),
    }
}

/// A new entry of `account`, accepted (`NEW`, order `order_id`) through
/// `store` as the gateway records it.
async fn accepted_entry(store: &PgStore, account: AccountId, order_id: i64) -> Entry {
    let entry = new_entry(store, account).await;
    store
        .record_evidence_of(account, entry.id, &accepted(order_id))
        .await
        .unwrap();
    entry
}

/// `evidence` of `entry` recorded through `store` and its legs claimed with
/// [`split_planner`].
async fn fill_first(
    store: &PgStore,
    account: AccountId,
    entry: EntryId,
    evidence: &Evidence,
) -> oco_core::ports::RecordedFill {
    let plan = split_planner(entry);
    store
        .record_fill_and_claim(account, entry, evidence, &plan)
        .await
        .unwrap()
        .unwrap()
}

/// A fill of 0.4 at 100 (trade `trade_id`) stored under `entry` by SQL
/// alone, the row left as it was: what a writer leaves that stored its fills
/// and then lost its compare-and-set.
async fn fill_beside(
    conn: &mut AsyncPgConnection,
    account: AccountId,
    entry: EntryId,
    trade_id: i64,
) {
    diesel::sql_query(format!(
        "INSERT INTO fills (account_id, symbol, trade_id, entry_id, price, qty, commission, \
         commission_asset, traded_at) VALUES ({account}, 'BTCUSDT', {trade_id}, {entry}, 100, \
         0.4, 0, 'BNB', now())"
    ))
    .execute(conn)
    .await
    .unwrap();
}

/// The quantities of `entry`'s legs, by leg and generation.
async fn leg_qtys(store: &PgStore, entry: EntryId) -> Vec<Qty> {
    store
        .legs(entry)
        .await
        .unwrap()
        .iter()
        .map(|l| l.qty)
        .collect()
}

/// An entry accepted through this store has its first fill written and
/// claimed without a read first, and ends exactly as one written the long way.
#[tokio::test]
async fn a_first_fill_after_its_acceptance_skips_the_read_and_ends_the_same() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let strip = |e: Entry| Entry {
        id: EntryId(0),
        client_id: ClientOrderId::new("x").unwrap(),
        ..e
    };
    let account = new_account(&store, "hint-key").await;
    // As the gateway says so when it takes the account's lease.
    store.following(account.id);
    let mut ends = Vec::new();
    for accept_first in [true, false] {
        let entry = new_entry(&store, account.id).await;
        if accept_first {
            let after = store
                .record_evidence_of(account.id, entry.id, &accepted(555))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(after.status, EntryStatus::New);
        }
        let before = store.hint_stats();
        let fill = filled(555, &[(entry.id.0 * 10, "1")], "1");
        let plan = split_planner(entry.id);
        let recorded = store
            .record_fill_and_claim(account.id, entry.id, &fill, &plan)
            .await
            .unwrap()
            .unwrap();
        let used = store.hint_stats().used - before.used;
        assert_eq!(
            used,
            u64::from(accept_first),
            "accepted first: {accept_first}"
        );
        assert_eq!(recorded.won, vec![true, true], "{recorded:?}");
        assert_eq!(recorded.context.credentials.api_key, "hint-key");
        assert_eq!(
            recorded.context.credentials.secret.expose_secret(),
            "secret-of-hint-key"
        );
        assert!(recorded.context.legs.is_empty());
        let stored = store.entry(entry.id).await.unwrap();
        assert_eq!(
            stored, recorded.entry,
            "what was answered is what is stored"
        );
        let legs = store.legs(entry.id).await.unwrap();
        assert_eq!(legs.len(), 2, "{legs:?}");
        // Without the acceptance the entry still reads `pending_new`'s order id
        // from the fill; compare what the fill itself decides.
        ends.push((
            strip(stored),
            legs.iter().map(|l| l.qty).collect::<Vec<_>>(),
        ));
    }
    assert_eq!(ends[0].1, ends[1].1, "the same legs either way");
    assert_eq!(ends[0].0.fills_qty, ends[1].0.fills_qty);
    assert_eq!(ends[0].0.status, ends[1].0.status);
    assert_eq!(ends[0].0.executed_qty, ends[1].0.executed_qty);
    assert_eq!(ends[0].0.protection, ends[1].0.protection);
    assert_eq!(store.hint_stats().stale, 0);
}

/// What a store learnt at an entry's acceptance goes stale when another
/// process writes the entry or changes the account before the fill: the
/// write from the hint matches nothing, the fill is read and planned again,
/// and what is stored is what the long way stores.
#[tokio::test]
async fn a_stale_hint_is_caught_by_the_write_and_the_fill_read_again() {
    let db = TestDb::new().await;
    // Two processes: one key.
    let config = db.config(8);
    let here = PgStore::connect(config.clone()).await.unwrap();
    let elsewhere = PgStore::connect(config).await.unwrap();
    let account = new_account(&here, "stale-key").await;
    here.following(account.id);

    // The entry moved on elsewhere: a first part filled there.
    let entry = accepted_entry(&here, account.id, 556).await;
    elsewhere
        .record_evidence(entry.id, &filled(556, &[(701, "0.4")], "0.4"))
        .await
        .unwrap();
    let recorded = fill_first(
        &here,
        account.id,
        entry.id,
        &filled(556, &[(702, "0.6")], "1"),
    )
    .await;
    assert_eq!(here.hint_stats().stale, 1);
    assert_eq!(here.hint_stats().used, 0);
    assert_eq!(recorded.entry.fills_qty, qty("1"), "both parts count");
    assert_eq!(recorded.won, vec![true, true]);
    assert_eq!(
        leg_qtys(&here, entry.id).await,
        vec![qty("0.5"), qty("0.5")],
        "planned from both parts"
    );

    // The account changed elsewhere: the fill is planned with its new split.
    let entry = accepted_entry(&here, account.id, 557).await;
    let settings = ProtectionConfig {
        split: dec!(0.3),
        ..ProtectionConfig::DEFAULT
    };
    elsewhere
        .update_account(account.id, Some(settings), None)
        .await
        .unwrap();
    let recorded = fill_first(
        &here,
        account.id,
        entry.id,
        &filled(557, &[(801, "1")], "1"),
    )
    .await;
    assert_eq!(here.hint_stats().stale, 2);
    assert_eq!(recorded.context.account.protection.split, dec!(0.3));
    let legs = here.legs(entry.id).await.unwrap();
    assert_eq!(
        legs.iter().map(|l| l.qty).collect::<Vec<_>>(),
        vec![qty("0.3"), qty("0.7")],
        "planned with the settings as changed: {legs:?}"
    );

    // Read again, the account is known anew: the next accepted entry's fill
    // takes the short way with the new settings.
    let entry = accepted_entry(&here, account.id, 558).await;
    fill_first(
        &here,
        account.id,
        entry.id,
        &filled(558, &[(901, "1")], "1"),
    )
    .await;
    assert_eq!(here.hint_stats().used, 1);
    assert_eq!(
        leg_qtys(&here, entry.id).await,
        vec![qty("0.3"), qty("0.7")]
    );

    // Evidence written here after the acceptance forgets the hint: the next
    // fill takes the read without a write that matches nothing first.
    let entry = accepted_entry(&here, account.id, 559).await;
    here.record_evidence(entry.id, &filled(559, &[(951, "0.4")], "0.4"))
        .await
        .unwrap();
    let recorded = fill_first(
        &here,
        account.id,
        entry.id,
        &filled(559, &[(952, "0.6")], "1"),
    )
    .await;
    assert_eq!(recorded.entry.fills_qty, qty("1"));
    assert_eq!(here.hint_stats(), store_pg::HintStats { used: 1, stale: 2 });
}

/// A new entry of an account this process follows, read when it is
/// announced and before anything of it was accepted (a MARKET entry's fill
/// is the first the stream says of it), has its first fill written and
/// claimed without a read, and ends exactly as one written the long way.
/// Nothing is kept of an account not followed, of another account's entry,
/// of an entry already filled, or once the account is let go.
#[tokio::test]
async fn an_announced_entry_of_a_followed_account_is_read_ahead_of_its_fill() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "ahead-key").await;
    let other = new_account(&store, "other-ahead-key").await;
    let entry = new_entry(&store, account.id).await;
    assert!(
        !store.learn_announced(account.id, entry.id).await.unwrap(),
        "not followed"
    );
    assert_eq!((store.hinted_entries(), store.hinted_accounts()), (0, 0));
    store.following(account.id);
    let others = new_entry(&store, other.id).await;
    assert!(
        !store.learn_announced(account.id, others.id).await.unwrap(),
        "another account's entry"
    );
    assert!(store.learn_announced(account.id, entry.id).await.unwrap());
    assert_eq!((store.hinted_entries(), store.hinted_accounts()), (1, 1));

    // The two fills below differ in their trades' ids, hence times.
    let strip = |e: Entry| Entry {
        id: EntryId(0),
        client_id: ClientOrderId::new("x").unwrap(),
        filled_at: None,
        ..e
    };
    let ahead = fill_first(
        &store,
        account.id,
        entry.id,
        &filled(561, &[(1101, "1")], "1"),
    )
    .await;
    assert_eq!(
        store.hint_stats(),
        store_pg::HintStats { used: 1, stale: 0 }
    );
    assert_eq!(ahead.won, vec![true, true], "{ahead:?}");
    assert_eq!(ahead.context.credentials.api_key, "ahead-key");
    assert_eq!(store.entry(entry.id).await.unwrap(), ahead.entry);
    assert!(
        !store.learn_announced(account.id, entry.id).await.unwrap(),
        "filled: nothing to read ahead"
    );
    // The long way, for the same fill on an entry not read ahead.
    let long = new_entry(&store, account.id).await;
    let read = fill_first(
        &store,
        account.id,
        long.id,
        &filled(561, &[(1102, "1")], "1"),
    )
    .await;
    assert_eq!(store.hint_stats().used, 1, "this one was read");
    assert_eq!(strip(read.entry), strip(ahead.entry));
    assert_eq!(
        leg_qtys(&store, long.id).await,
        leg_qtys(&store, entry.id).await
    );

    store.unfollowed(account.id);
    let later = new_entry(&store, account.id).await;
    assert!(
        !store.learn_announced(account.id, later.id).await.unwrap(),
        "let go"
    );
    assert_eq!((store.hinted_entries(), store.hinted_accounts()), (0, 0));
}

/// A read ahead goes stale when another process (the API, from the order's
/// own response) writes the entry's acceptance or its fill first: the write
/// from it matches nothing, the fill is read, and what is stored is what the
/// long way stores, with each leg claimed once.
#[tokio::test]
async fn a_read_ahead_made_stale_by_another_process_claims_nothing_twice() {
    let db = TestDb::new().await;
    let config = db.config(8);
    let gateway = PgStore::connect(config.clone()).await.unwrap();
    let api = PgStore::connect(config).await.unwrap();
    let account = new_account(&gateway, "race-key").await;
    gateway.following(account.id);

    // The API recorded the acceptance from its response after the read ahead.
    let accepted_there = new_entry(&api, account.id).await;
    assert!(
        gateway
            .learn_announced(account.id, accepted_there.id)
            .await
            .unwrap()
    );
    api.record_evidence(accepted_there.id, &accepted(563))
        .await
        .unwrap();
    let recorded = fill_first(
        &gateway,
        account.id,
        accepted_there.id,
        &filled(563, &[(1301, "1")], "1"),
    )
    .await;
    assert_eq!(
        gateway.hint_stats(),
        store_pg::HintStats { used: 0, stale: 1 }
    );
    assert_eq!(recorded.won, vec![true, true]);
    assert_eq!(recorded.entry.fills_qty, qty("1"));
    assert_eq!(
        leg_qtys(&gateway, accepted_there.id).await,
        vec![qty("0.5"), qty("0.5")]
    );

    // The API recorded the fill and claimed its legs first: the gateway's
    // write from the read ahead claims nothing, and nothing is claimed twice.
    let filled_there = new_entry(&api, account.id).await;
    assert!(
        gateway
            .learn_announced(account.id, filled_there.id)
            .await
            .unwrap()
    );
    let fill = filled(564, &[(1401, "1")], "1");
    let first = fill_first(&api, account.id, filled_there.id, &fill).await;
    assert_eq!(first.won, vec![true, true]);
    let plan = split_planner(filled_there.id);
    let second = gateway
        .record_fill_and_claim(account.id, filled_there.id, &fill, &plan)
        .await
        .unwrap()
        .unwrap();
    assert!(second.won.iter().all(|won| !won), "{second:?}");
    assert_eq!(gateway.hint_stats().stale, 2);
    assert_eq!(gateway.hint_stats().used, 0);
    let stored = gateway.entry(filled_there.id).await.unwrap();
    assert_eq!(stored.fills_qty, qty("1"), "the fill stored once");
    assert_eq!(
        leg_qtys(&gateway, filled_there.id).await,
        vec![qty("0.5"), qty("0.5")],
        "two legs, claimed once"
    );
}

/// In one process serving the API and the gateway (`ocoguard run`), the
/// API's own write of an acceptance drops the hint read ahead of it, which
/// no longer matches: the fill then reads without a write that matches
/// nothing first.
#[tokio::test]
async fn an_acceptance_written_by_the_api_drops_the_read_ahead_in_the_same_process() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "one-process-key").await;
    store.following(account.id);
    let entry = new_entry(&store, account.id).await;
    assert!(store.learn_announced(account.id, entry.id).await.unwrap());
    assert_eq!(store.hinted_entries(), 1);
    // As the API records it: no owner.
    store
        .record_evidence(entry.id, &accepted(568))
        .await
        .unwrap();
    assert_eq!(store.hinted_entries(), 0);
    let recorded = fill_first(
        &store,
        account.id,
        entry.id,
        &filled(568, &[(1501, "1")], "1"),
    )
    .await;
    assert_eq!(recorded.won, vec![true, true]);
    assert_eq!(store.hint_stats(), store_pg::HintStats::default());
}

/// `create_entry` announces every new entry, and the learner task reads
/// those of the accounts followed as they come: the fill after it skips the
/// read.
#[tokio::test]
async fn new_entries_are_read_as_they_are_announced() {
    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let account = new_account(&*store, "announced-key").await;
    let other = new_account(&*store, "unfollowed-key").await;
    store.following(account.id);
    let learner = store_pg::learn_announced_entries(store.clone());
    let listening = learner.listening();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::sync::atomic::AtomicBool::load(&listening, std::sync::atomic::Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the learner never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    new_entry(&*store, other.id).await;
    let entry = new_entry(&*store, account.id).await;
    while store.hinted_entries() == 0 {
        assert!(Instant::now() < deadline, "the entry was never read ahead");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Of the two announced, only the followed account's entry and keys are kept.
    assert_eq!(store.hinted_entries(), 1);
    assert_eq!(store.hinted_accounts(), 1);
    fill_first(
        &store,
        account.id,
        entry.id,
        &filled(562, &[(1201, "1")], "1"),
    )
    .await;
    assert_eq!(store.hint_stats().used, 1);
    drop(learner);
}

/// Only an account followed (`Store::following`, until `unfollowed`) is
/// learnt: an acceptance written for an account let go (a task of an old
/// lease finishing its write) keeps neither its keys nor the entry.
#[tokio::test]
async fn nothing_is_learnt_of_an_account_not_followed() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let account = new_account(&store, "let-go-key").await;
    accepted_entry(&store, account.id, 565).await;
    assert_eq!((store.hinted_entries(), store.hinted_accounts()), (0, 0));
    store.following(account.id);
    accepted_entry(&store, account.id, 566).await;
    assert_eq!((store.hinted_entries(), store.hinted_accounts()), (1, 1));
    store.unfollowed(account.id);
    assert_eq!((store.hinted_entries(), store.hinted_accounts()), (0, 0));
    accepted_entry(&store, account.id, 567).await;
    assert_eq!(
        (store.hinted_entries(), store.hinted_accounts()),
        (0, 0),
        "let go: nothing kept again"
    );
}

/// A hint names its account: another account's stream reporting the id
/// neither uses it nor writes anything.
#[tokio::test]
async fn a_hint_serves_only_its_own_account() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let owner = new_account(&store, "own-key").await;
    let other = new_account(&store, "other-key").await;
    store.following(owner.id);
    store.following(other.id);
    let entry = accepted_entry(&store, owner.id, 559).await;
    // The other account's keys and settings are known too.
    let decoy = new_entry(&store, other.id).await;
    store
        .record_evidence_of(other.id, decoy.id, &accepted(560))
        .await
        .unwrap();
    let plan = split_planner(entry.id);
    let foreign = store
        .record_fill_and_claim(other.id, entry.id, &filled(559, &[(991, "1")], "1"), &plan)
        .await
        .unwrap();
    assert!(foreign.is_none(), "{foreign:?}");
    assert_eq!(store.hint_stats().used, 0);
    assert!(store.legs(entry.id).await.unwrap().is_empty());
    assert_eq!(store.entry(entry.id).await.unwrap().fills_qty, Qty::ZERO);
    // The owner's hint is still there for the owner's fill.
    store
        .record_fill_and_claim(owner.id, entry.id, &filled(559, &[(992, "1")], "1"), &plan)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.hint_stats().used, 1);
    assert_eq!(store.legs(entry.id).await.unwrap().len(), 2);
}

/// Fills another writer stored under the entry while its compare-and-set
/// failed leave the row as the acceptance wrote it: the write from the hint
/// must not take them for absent (it would size the legs from its own trades
/// alone). So too a leg stored for the entry.
#[tokio::test]
async fn a_hinted_write_sees_fills_and_legs_stored_beside_the_row() {
    let db = TestDb::new().await;
    let store = store(&db).await;
    let mut raw = raw(&db).await;
    let account = new_account(&store, "beside-key").await;
    store.following(account.id);

    let entry = accepted_entry(&store, account.id, 561).await;
    fill_beside(&mut raw, account.id, entry.id, 971).await;
    let recorded = fill_first(
        &store,
        account.id,
        entry.id,
        &filled(561, &[(972, "0.6")], "1"),
    )
    .await;
    assert_eq!(
        store.hint_stats(),
        store_pg::HintStats { used: 0, stale: 1 }
    );
    assert_eq!(recorded.entry.fills_qty, qty("1"), "both trades count");
    assert_eq!(
        leg_qtys(&store, entry.id).await,
        vec![qty("0.5"), qty("0.5")]
    );

    let entry = accepted_entry(&store, account.id, 562).await;
    diesel::sql_query(format!(
        "INSERT INTO protection_legs (entry_id, leg, generation, list_client_id, \
         take_profit_client_id, stop_loss_client_id, symbol, qty, take_profit_price, \
         stop_price, state, source, claimed_at, updated_at) VALUES ({0}, 1, 0, 'x-L-{0}', \
         'x-T-{0}', 'x-S-{0}', 'BTCUSDT', 1, 101, 99, 'claimed', 'sync', now(), now())",
        entry.id
    ))
    .execute(&mut raw)
    .await
    .unwrap();
    let recorded = fill_first(
        &store,
        account.id,
        entry.id,
        &filled(562, &[(981, "1")], "1"),
    )
    .await;
    assert_eq!(
        store.hint_stats(),
        store_pg::HintStats { used: 0, stale: 2 }
    );
    assert_eq!(recorded.context.legs.len(), 1, "the leg stored is read");
    assert!(recorded.claims.is_empty(), "nothing claimed beside it");
    assert_eq!(store.legs(entry.id).await.unwrap().len(), 1);
}

/// Hints are kept by the store that follows the account's stream, whoever
/// wrote the acceptance first: the API recording it from its own response
/// (no owner) keeps none, and the gateway arriving second still learns it.
#[tokio::test]
async fn an_acceptance_recorded_elsewhere_first_is_still_learnt_by_the_follower() {
    let db = TestDb::new().await;
    let config = db.config(8);
    let gateway = PgStore::connect(config.clone()).await.unwrap();
    let api = PgStore::connect(config).await.unwrap();
    let account = new_account(&api, "follower-key").await;
    gateway.following(account.id);
    let entry = new_entry(&api, account.id).await;
    api.record_evidence(entry.id, &accepted(563)).await.unwrap();
    let later = gateway
        .record_evidence_of(account.id, entry.id, &accepted(563))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(later.status, EntryStatus::New);
    let recorded = fill_first(
        &gateway,
        account.id,
        entry.id,
        &filled(563, &[(991, "1")], "1"),
    )
    .await;
    assert_eq!(
        gateway.hint_stats(),
        store_pg::HintStats { used: 1, stale: 0 }
    );
    assert_eq!(recorded.won, vec![true, true]);
    assert_eq!(recorded.context.credentials.api_key, "follower-key");

    // The API's store kept nothing: its fill of another entry is read.
    let entry = new_entry(&api, account.id).await;
    api.record_evidence(entry.id, &accepted(564)).await.unwrap();
    fill_first(&api, account.id, entry.id, &filled(564, &[(995, "1")], "1")).await;
    assert_eq!(api.hint_stats(), store_pg::HintStats::default());
}

/// Another writer stores a fill under the entry and loses its own
/// compare-and-set, so the row is left as it was: between this write's read
/// and its write, that fill lands. The write must not apply amounts short of
/// it: its compare-and-set counts the stored fills, fails, and the retry
/// plans from every fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_stored_beside_an_unchanged_row_makes_the_write_read_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let db = TestDb::new().await;
    let store = store(&db).await;
    let raw = std::sync::Mutex::new(raw(&db).await);
    let account = new_account(&store, "beside-read-key").await;
    let entry = new_entry(&store, account.id).await;
    let calls = AtomicUsize::new(0);
    let split = split_planner(entry.id);
    let plan = |merged: &Entry, context: &oco_core::ports::FillContext| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::task::block_in_place(|| {
                let mut conn = raw.lock().unwrap();
                tokio::runtime::Handle::current()
                    .block_on(fill_beside(&mut conn, account.id, entry.id, 1101));
            });
        }
        split(merged, context)
    };
    let recorded = store
        .record_fill_and_claim(
            account.id,
            entry.id,
            &filled(565, &[(1102, "0.6")], "1"),
            &plan,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        AtomicUsize::load(&calls, Ordering::SeqCst),
        2,
        "the lost compare-and-set plans again"
    );
    assert_eq!(recorded.entry.fills_qty, qty("1"), "both fills count");
    assert_eq!(store.entry(entry.id).await.unwrap().fills_qty, qty("1"));
    assert_eq!(
        leg_qtys(&store, entry.id).await,
        vec![qty("0.5"), qty("0.5")],
        "planned from both fills"
    );
}

/// Sync replaces an entry's legs for its second fill while the gateway
/// records the third. `PgStore` reads the gateway's legs with the entry's
/// snapshot, before its write: they show sync's claim in flight. The write is
/// held (a row lock on the entry) until sync has placed and read the entry
/// back without the third fill. The third fill must still get its stop.
#[tokio::test]
async fn a_fill_written_behind_a_replacement_gets_its_stop() {
    use diesel_async::SimpleAsyncConnection as _;
    use oco_core::ids::IdScheme;
    use oco_core::protect::{Idle, ProtectOutcome, Protector, ProtectorConfig};
    use oco_core::testing::{FakeExchange, btcusdt_rules};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    let db = TestDb::new().await;
    let store = Arc::new(store(&db).await);
    let exchange = Arc::new(FakeExchange::new());
    exchange.add_symbol(btcusdt_rules(), price("100"));
    let account = new_account(store.as_ref(), "k-race").await;
    let entry = new_entry(store.as_ref(), account.id).await.id;
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        Arc::new(oco_core::ports::SystemClock),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    ));
    let open_qty = || -> Decimal {
        exchange
            .open_lists()
            .iter()
            .map(|l| l.request.qty.get())
            .sum()
    };
    exchange.set_free("k-race", "BTC", dec!(0.4));
    let first = filled(7, &[(1, "0.4")], "0.4");
    protector
        .protect(entry, Some(&first), Source::Websocket)
        .await
        .unwrap();
    assert_eq!(open_qty(), dec!(0.4));

    exchange.set_free("k-race", "BTC", dec!(0.6));
    let locker = Arc::new(tokio::sync::Mutex::new(raw(&db).await));
    let gateway = Arc::new(std::sync::Mutex::new(None));
    let (hook_locker, hook_gateway, hook_protector) =
        (locker.clone(), gateway.clone(), protector.clone());
    let third = filled(7, &[(1, "0.4"), (2, "0.3"), (3, "0.3")], "1");
    let account_id = account.id;
    // Runs when sync sends its new generation: its claim is in the store.
    exchange.before_next_oco(move || {
        Box::pin(async move {
            let mut conn = hook_locker.lock().await;
            conn.batch_execute(&format!(
                "BEGIN; SELECT 1 FROM entries WHERE id = {entry} FOR NO KEY UPDATE"
            ))
            .await
            .unwrap();
            let task = tokio::spawn(async move {
                hook_protector
                    .protect_seen(account_id, entry, "BTCUSDT", &third, Source::Websocket)
                    .await
            });
            *hook_gateway.lock().unwrap() = Some(task);
            // The gateway has read the entry and its legs, and waits to write.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let waiting: Count = diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .get_result(&mut *conn)
                .await
                .unwrap();
                if waiting.n > 0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the gateway never reached its write"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    });
    let second = filled(7, &[(1, "0.4"), (2, "0.3")], "0.7");
    let sync = protector
        .protect(entry, Some(&second), Source::Sync)
        .await
        .unwrap();
    assert!(
        matches!(sync.outcome, ProtectOutcome::Placed { .. }),
        "{sync:?}"
    );
    locker.lock().await.batch_execute("COMMIT").await.unwrap();
    let task = gateway.lock().unwrap().take().unwrap();
    let gateway = task.await.unwrap().unwrap().unwrap();

    assert_ne!(
        gateway.outcome,
        ProtectOutcome::Nothing(Idle::InFlight),
        "the claim the gateway read was done before its write"
    );
    assert_eq!(open_qty(), dec!(1), "every filled coin has its stop");
    assert_eq!(store.entry(entry).await.unwrap().fills_qty, qty("1"));
}
