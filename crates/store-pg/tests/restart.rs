//! PostgreSQL restarted under a running store: calls fail as `Unavailable`
//! while it is down, then the pool recovers by itself and nothing that was
//! acknowledged is lost. Alone in its binary, so no other test runs while the
//! server restarts.
// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use oco_core::model::{EntryKind, EntryTags, LegClaim, NewEntry, OrderSize};
use oco_core::ports::NewAccount;
use oco_core::{
    ApiCredentials, Asset, ClientOrderId, LegIndex, LegKey, Millis, OcoClientIds, ProtectionConfig,
    Source, Store, StoreError, Symbol,
};
use secrecy::SecretString;
use store_pg::PgStore;
use store_pg::testing::TestDb;

fn restart_postgres() {
    let versions = std::fs::read_dir("/etc/postgresql")
        .expect("a local PostgreSQL cluster under /etc/postgresql");
    let version = versions
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a PostgreSQL version directory");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .expect("running pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart failed: {status}");
}

fn claim(entry: oco_core::EntryId, generation: u32) -> LegClaim {
    let id = |k: &str| ClientOrderId::new(format!("r-{k}-{entry}-1-{generation}")).unwrap();
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
        qty: "0.5".parse().unwrap(),
        take_profit: "101".parse().unwrap(),
        stop: "99".parse().unwrap(),
        stop_limit: None,
        source: Source::Websocket,
        at: Millis(5),
    }
}

async fn postmaster_start(store: &PgStore) -> String {
    use diesel_async::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Started {
        #[diesel(sql_type = diesel::sql_types::Text)]
        at: String,
    }
    let mut conn = store.pool().get().await.unwrap();
    let row: Started = diesel::sql_query("SELECT pg_postmaster_start_time()::text AS at")
        .get_result(&mut conn)
        .await
        .unwrap();
    row.at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_when_postgres_restarts() {
    let db = TestDb::new().await;
    let store = PgStore::connect(db.config(4)).await.unwrap();
    let account = store
        .create_account(NewAccount {
            owner: "o".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: "k".into(),
                secret: SecretString::from("s"),
            },
            protection: ProtectionConfig::DEFAULT,
        })
        .await
        .unwrap();
    let entry = store
        .create_entry(
            NewEntry {
                account: account.id,
                symbol: Symbol {
                    name: "BTCUSDT".into(),
                    base: Asset("BTC".into()),
                    quote: Asset("USDT".into()),
                },
                kind: EntryKind::Market,
                size: OrderSize::Base("1".parse().unwrap()),
                levels: Default::default(),
                tags: EntryTags::default(),
                idempotency_key: None,
            },
            &|id| ClientOrderId::new(format!("r-E-{id}")).unwrap(),
            Millis(1),
        )
        .await
        .unwrap();
    // Fill the pool with open connections, all of which the restart will kill.
    let warm = futures_util::future::join_all((0..8).map(|_| store.active_accounts())).await;
    assert!(warm.iter().all(Result::is_ok));
    assert!(store.claim_leg(&claim(entry.id, 0)).await.unwrap());

    let started_before = postmaster_start(&store).await;
    restart_postgres();

    // Poll with a deadline: each call either fails as Unavailable or works.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut generation = 1;
    let mut failures = 0;
    loop {
        match store.claim_leg(&claim(entry.id, generation)).await {
            Ok(true) => break,
            Ok(false) => panic!("generation {generation} was never claimed before"),
            Err(StoreError::Unavailable(_)) => failures += 1,
            Err(other) => panic!("unexpected error while recovering: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the store did not recover within 60 s ({failures} failures)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        generation += 1;
    }
    // Recovered: every pooled connection works again, and what was acknowledged is there.
    let after = futures_util::future::join_all((0..8).map(|_| store.active_accounts())).await;
    assert!(after.iter().all(Result::is_ok), "{after:?}");
    assert_ne!(
        postmaster_start(&store).await,
        started_before,
        "the server really restarted"
    );
    let legs = store.legs(entry.id).await.unwrap();
    assert!(
        legs.iter().any(|l| l.key.generation == 0),
        "the claim made before the restart survived"
    );
    assert!(legs.iter().any(|l| l.key.generation == generation));
    eprintln!("recovered after {failures} failed calls");
}
