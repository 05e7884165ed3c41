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

/// The schema's checks on entries and protection legs, each rule broken once
/// by a raw write, and rows that keep them (a NULL stop limit, a placed leg)
/// accepted. The checks are function calls since migration
/// `2026-12-04-000009`: this pins that they refuse what the expressions they
/// replaced refused.
#[tokio::test]
async fn the_checks_refuse_each_broken_rule_by_name() {
    let db = TestDb::new().await;
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    for setup in [
        "INSERT INTO accounts (id, owner, exchange, api_key, secret_ciphertext, split, stop_kind, \
         late_policy) OVERRIDING SYSTEM VALUE VALUES (1, 'o', 'binance', 'k', '\\x00', 0.5, \
         'market', 'exit_at_market')",
        "INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, client_order_id, \
         order_type, status, requested_qty, created_at) VALUES (1, 1, 'BTCUSDT', 'BTC', 'USDT', \
         'og-E-1', 'market', 'new', 0.001, now())",
    ] {
        diesel::sql_query(setup).execute(&mut conn).await.unwrap();
    }
    let entry = |set: &str| format!("UPDATE entries SET {set} WHERE id = 1");
    let leg = |n: i32, overrides: &[(&str, &str)]| {
        let mut cols = vec![
            ("entry_id", "1".to_owned()),
            ("leg", "1".to_owned()),
            ("generation", n.to_string()),
            ("list_client_id", format!("'og-L-1-1-{n}'")),
            ("take_profit_client_id", "'t'".to_owned()),
            ("stop_loss_client_id", "'s'".to_owned()),
            ("symbol", "'BTCUSDT'".to_owned()),
            ("qty", "0.0005".to_owned()),
            ("take_profit_price", "61000".to_owned()),
            ("stop_price", "59000".to_owned()),
            ("stop_limit_price", "58900".to_owned()),
            ("state", "'claimed'".to_owned()),
            ("order_list_id", "NULL".to_owned()),
            ("not_placed_code", "NULL".to_owned()),
            ("state_reason", "NULL".to_owned()),
            ("external_end", "NULL".to_owned()),
            ("source", "'websocket'".to_owned()),
            ("claimed_at", "now()".to_owned()),
            ("updated_at", "now()".to_owned()),
        ];
        for (k, v) in overrides {
            cols.iter_mut().find(|(c, _)| c == k).unwrap().1 = (*v).to_owned();
        }
        let (names, values): (Vec<_>, Vec<_>) = cols.into_iter().unzip();
        format!(
            "INSERT INTO protection_legs ({}) VALUES ({})",
            names.join(", "),
            values.join(", ")
        )
    };
    let refused = [
        (entry("status = 'bogus'"), "entries_state"),
        (entry("protection = 'protected'"), "entries_state"),
        (
            entry("protection = 'exited', protection_reason = NULL"),
            "entries_state",
        ),
        (entry("protected_by = 'bogus'"), "entries_state"),
        (entry("executed_qty = -1"), "entries_values"),
        (entry("fills_qty = -0.1"), "entries_values"),
        (entry("order_type = 'limit'"), "entries_values"),
        (entry("limit_price = 1"), "entries_values"),
        (entry("requested_quote = 10"), "entries_values"),
        (leg(1, &[("leg", "3")]), "protection_legs_values"),
        (leg(2, &[("generation", "-1")]), "protection_legs_values"),
        (leg(3, &[("qty", "-1")]), "protection_legs_values"),
        (
            leg(4, &[("take_profit_price", "0")]),
            "protection_legs_values",
        ),
        (leg(5, &[("stop_price", "0")]), "protection_legs_values"),
        (
            leg(6, &[("stop_limit_price", "0")]),
            "protection_legs_values",
        ),
        (leg(7, &[("source", "'manual'")]), "protection_legs_values"),
        (leg(8, &[("state", "'bogus'")]), "protection_legs_state"),
        (leg(9, &[("state", "'placed'")]), "protection_legs_state"),
        (
            leg(10, &[("state", "'claimed'"), ("state_reason", "'why'")]),
            "protection_legs_state",
        ),
        (
            leg(11, &[("state", "'not_placed'")]),
            "protection_legs_state",
        ),
        (
            leg(
                12,
                &[
                    ("state", "'canceled_externally'"),
                    ("external_end", "'gone'"),
                ],
            ),
            "protection_legs_state",
        ),
    ];
    for (sql, constraint) in &refused {
        let err = diesel::sql_query(sql.as_str())
            .execute(&mut conn)
            .await
            .expect_err(sql);
        assert!(
            err.to_string().contains(constraint),
            "{sql}: refused by {err}, not by {constraint}"
        );
    }
    let kept = [
        entry("protection = 'protected', protected_at = now(), protected_by = 'sync'"),
        entry("protection = 'exited', protection_reason = 'late'"),
        entry("order_type = 'limit', limit_price = 59000"),
        leg(20, &[("stop_limit_price", "NULL")]),
        leg(21, &[("state", "'placed'"), ("order_list_id", "7")]),
        leg(
            22,
            &[
                ("state", "'not_placed'"),
                ("state_reason", "'rejected'"),
                ("not_placed_code", "-2010"),
            ],
        ),
        leg(
            23,
            &[
                ("state", "'canceled_externally'"),
                ("external_end", "'stop_expired'"),
            ],
        ),
    ];
    for sql in &kept {
        diesel::sql_query(sql.as_str())
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}
