//! Migrations: up, down, up on an empty database, and two processes migrating at once.
// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use store_pg::testing::TestDb;

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn user_tables(url: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    let c: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    c.n
}

async fn user_functions(url: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    let c: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = 'public' AND p.proname NOT LIKE 'diesel%'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    c.n
}

/// Tables the migrations create, `__diesel_schema_migrations` included.
const TABLES: i64 = 10;

#[tokio::test]
async fn up_down_up_on_an_empty_database() {
    let db = TestDb::empty().await;
    assert_eq!(user_tables(db.url()).await, 0);
    let applied = store_pg::migrate(db.url()).await.unwrap();
    assert_eq!(applied.len(), store_pg_migration_count());
    assert_eq!(user_tables(db.url()).await, TABLES);
    assert!(
        store_pg::migrate(db.url()).await.unwrap().is_empty(),
        "a second run applies nothing"
    );
    let reverted = db.revert_all().await.unwrap();
    assert_eq!(reverted.len(), applied.len());
    assert_eq!(
        user_tables(db.url()).await,
        0,
        "every down.sql removes what its up.sql made"
    );
    assert_eq!(
        user_functions(db.url()).await,
        0,
        "every down.sql removes the functions its up.sql made"
    );
    assert_eq!(store_pg::migrate(db.url()).await.unwrap(), applied);
    // The schema matches what schema.rs expects: a store works on it.
    let store = store_pg::PgStore::connect(db.config(2)).await.unwrap();
    oco_core::testing::store_behaviour(&store).await.unwrap();
}

fn store_pg_migration_count() -> usize {
    diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&store_pg::MIGRATIONS)
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_apply_once() {
    let db = TestDb::empty().await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url().to_owned();
            tokio::spawn(async move { store_pg::migrate(&url).await })
        })
        .collect();
    let mut applied = Vec::new();
    for r in runs {
        applied.push(r.await.unwrap().unwrap());
    }
    let total: usize = applied.iter().map(Vec::len).sum();
    assert_eq!(
        total,
        store_pg_migration_count(),
        "each migration applied by exactly one runner: {applied:?}"
    );
    // Several stores connecting at once (migrate + key check) all succeed with the same key.
    let key = store_pg::SecretKey::generate();
    let stores: Vec<_> = (0..3)
        .map(|_| {
            let config = db.config_with_key(1, key.clone());
            tokio::spawn(store_pg::PgStore::connect(config))
        })
        .collect();
    for s in stores {
        s.await.unwrap().unwrap();
    }
    assert_eq!(user_tables(db.url()).await, TABLES);
}
