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
const TABLES: i64 = 11;

/// The idempotency keys' index as `CREATE INDEX` would build it again: the
/// columns and predicate `create_entry`'s `ON CONFLICT` names.
const KEY_INDEX: &str = "CREATE UNIQUE INDEX entries_idempotency_key_unique ON public.entries \
     USING btree (account_id, idempotency_key) WHERE (idempotency_key IS NOT NULL)";

/// The idempotency keys' index (`2026-12-05-000017`) as the catalogue has
/// it: its definition and whether it is valid, one row per index of that
/// name (none before it is built).
async fn key_index(db: &TestDb) -> Vec<String> {
    db.texts(
        "SELECT pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid \
         THEN '' ELSE ' (INVALID)' END AS s FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = 'entries_idempotency_key_unique'",
    )
    .await
}

#[tokio::test]
async fn up_down_up_on_an_empty_database() {
    let db = TestDb::empty().await;
    assert_eq!(user_tables(db.url()).await, 0);
    let applied = store_pg::migrate(db.url()).await.unwrap();
    assert_eq!(applied.len(), store_pg_migration_count());
    assert_eq!(user_tables(db.url()).await, TABLES);
    assert_eq!(key_index(&db).await, [KEY_INDEX], "built and valid");
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
    assert_eq!(key_index(&db).await, [KEY_INDEX], "built again after down");
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
    // Built outside a transaction while the others waited for the lock.
    assert_eq!(key_index(&db).await, [KEY_INDEX], "built and valid");
}

/// `2026-12-05-000016` adds the key column alone; `000017` builds its unique
/// index CONCURRENTLY, outside a transaction. A concurrent build that failed
/// before (here on duplicate keys) left an INVALID index under that name,
/// which `IF NOT EXISTS` would take for built and which `ON CONFLICT` cannot
/// use: the next migration drops it and builds the index anew.
/// Before a migration that builds an index concurrently, only an index of
/// ours that a failed build left INVALID is dropped: an operator's own
/// INVALID index (a concurrent build of theirs that failed, or one still
/// running) and a partitioned index created `ON ONLY` (INVALID until every
/// partition has one, and not droppable `CONCURRENTLY`) are left alone, and
/// the migration goes through.
#[tokio::test]
async fn invalid_indexes_that_are_not_ours_are_left_alone() {
    use diesel_async::SimpleAsyncConnection as _;
    let db = TestDb::empty().await;
    db.migrate_through("20261205000016").await.unwrap();
    db.run_sql(
        "CREATE TABLE operator_notes (k int); INSERT INTO operator_notes VALUES (1), (1); \
         CREATE TABLE operator_parts (a int) PARTITION BY RANGE (a); \
         CREATE TABLE operator_parts_1 PARTITION OF operator_parts FOR VALUES FROM (0) TO (10); \
         CREATE INDEX operator_parts_a ON ONLY operator_parts (a)",
    )
    .await;
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    let failed = conn
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY operator_notes_k ON operator_notes (k)")
        .await;
    assert!(failed.is_err(), "duplicates fail the operator's build");
    let theirs = || {
        db.texts(
            "SELECT c.relname AS s FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE NOT i.indisvalid ORDER BY 1",
        )
    };
    assert_eq!(theirs().await, ["operator_notes_k", "operator_parts_a"]);

    let applied = store_pg::migrate(db.url()).await.unwrap();
    assert_eq!(
        <[String]>::first(&applied).map(String::as_str),
        Some("20261205000017")
    );
    assert_eq!(
        theirs().await,
        ["operator_notes_k", "operator_parts_a"],
        "the operator's indexes are theirs to drop"
    );
    assert_eq!(key_index(&db).await, [KEY_INDEX], "ours is built, valid");
}

#[tokio::test]
async fn a_key_index_left_invalid_by_a_failed_build_is_built_anew() {
    use diesel_async::SimpleAsyncConnection as _;
    let db = TestDb::empty().await;
    db.migrate_through("20261205000016").await.unwrap();
    assert!(key_index(&db).await.is_empty(), "000016 builds no index");
    for setup in CHECKS_SETUP {
        db.run_sql(setup).await;
    }
    db.run_sql(
        "UPDATE entries SET idempotency_key = 'twice' WHERE id = 1; \
         INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, \
         client_order_id, order_type, status, requested_qty, created_at, idempotency_key) \
         VALUES (2, 1, 'BTCUSDT', 'BTC', 'USDT', 'og-E-2', 'market', 'new', 0.001, now(), \
         'twice'); SELECT setval('entry_ids', 100)",
    )
    .await;
    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    let failed = conn
        .batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY entries_idempotency_key_unique \
             ON entries (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL",
        )
        .await;
    assert!(failed.is_err(), "duplicate keys fail the build");
    assert_eq!(
        key_index(&db).await,
        [format!("{KEY_INDEX} (INVALID)")],
        "a failed concurrent build leaves its index behind"
    );
    db.run_sql("UPDATE entries SET idempotency_key = NULL WHERE id = 2")
        .await;

    let applied = store_pg::migrate(db.url()).await.unwrap();
    assert_eq!(
        <[String]>::first(&applied).map(String::as_str),
        Some("20261205000017")
    );
    assert_eq!(key_index(&db).await, [KEY_INDEX], "built anew, valid");
    // The store's insert finds its arbiter: a used key answers with its entry.
    let store = store_pg::PgStore::connect(db.config(2)).await.unwrap();
    let again = oco_core::Store::create_entry(
        &store,
        oco_core::model::NewEntry {
            account: oco_core::AccountId(1),
            symbol: oco_core::Symbol {
                name: "BTCUSDT".into(),
                base: oco_core::Asset("BTC".into()),
                quote: oco_core::Asset("USDT".into()),
            },
            kind: oco_core::model::EntryKind::Market,
            size: oco_core::model::OrderSize::Base("0.001".parse().unwrap()),
            levels: oco_core::levels::EntryLevels::default(),
            tags: oco_core::model::EntryTags::default(),
            idempotency_key: Some(oco_core::IdempotencyKey::new("twice").unwrap()),
        },
        &|id| oco_core::ClientOrderId::new(format!("og-E-{id}")).unwrap(),
        oco_core::Millis(1_700_000_000_000),
    )
    .await;
    assert!(
        matches!(&again, Err(oco_core::StoreError::IdempotencyKeyUsed(e)) if e.id.0 == 1),
        "{again:?}"
    );
}

/// An account and its entry (id 1), for the checks' tests to write beside.
const CHECKS_SETUP: [&str; 2] = [
    "INSERT INTO accounts (id, owner, exchange, api_key, secret_ciphertext, split, stop_kind, \
     late_policy) OVERRIDING SYSTEM VALUE VALUES (1, 'o', 'binance', 'k', '\\x00', 0.5, \
     'market', 'exit_at_market')",
    "INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, client_order_id, \
     order_type, status, requested_qty, created_at) VALUES (1, 1, 'BTCUSDT', 'BTC', 'USDT', \
     'og-E-1', 'market', 'new', 0.001, now())",
];

/// A leg row of entry 1 (generation `n`, so each is new), valid but for
/// `overrides` (column, SQL literal).
fn leg_row(n: usize, overrides: &[(&str, &str)]) -> String {
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
}

/// Entry 1 rewritten whole: valid but for `overrides` (column, SQL literal).
fn entry_row(overrides: &[(&str, &str)]) -> String {
    let mut cols = vec![
        ("status", "'new'"),
        ("protection", "'not_needed'"),
        ("protected_at", "NULL"),
        ("protected_by", "NULL"),
        ("protection_reason", "NULL"),
        ("order_type", "'market'"),
        ("limit_price", "NULL"),
        ("requested_qty", "0.001"),
        ("requested_quote", "NULL"),
        ("executed_qty", "0"),
        ("cumulative_quote", "0"),
        ("base_commission", "0"),
        ("fills_qty", "0"),
    ];
    for (k, v) in overrides {
        cols.iter_mut().find(|(c, _)| c == k).unwrap().1 = v;
    }
    let set: Vec<String> = cols.iter().map(|(c, v)| format!("{c} = {v}")).collect();
    format!("UPDATE entries SET {} WHERE id = 1", set.join(", "))
}

/// Whether `sql` was applied, or the constraint that refused it.
async fn outcome(conn: &mut AsyncPgConnection, sql: &str) -> Result<(), String> {
    match diesel::sql_query(sql).execute(conn).await {
        Ok(_) => Ok(()),
        Err(diesel::result::Error::DatabaseError(_, info)) => {
            Err(info.constraint_name().map_or_else(
                || format!("no constraint: {}", info.message()),
                str::to_owned,
            ))
        }
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Rows that break at most one rule each, over every rule's columns: the
/// legs' state against its five columns in full, each value column alone,
/// the entries' protection against its four columns in full, the rest alone.
fn check_grid() -> Vec<String> {
    let mut rows = Vec::new();
    let mut n = 0;
    let mut leg = |overrides: &[(&str, &str)]| {
        n += 1;
        leg_row(n, overrides)
    };
    let states = [
        "'claimed'",
        "'unknown'",
        "'take_profit_filled'",
        "'stop_loss_filled'",
        "'replaced'",
        "'placed'",
        "'not_placed'",
        "'unprotectable'",
        "'canceled_externally'",
        "'bogus'",
    ];
    let ends = [
        "NULL",
        "'canceled'",
        "'stop_expired'",
        "'take_profit_partial'",
        "'gone'",
    ];
    for state in states {
        for list in ["NULL", "7"] {
            for code in ["NULL", "-2010"] {
                for reason in ["NULL", "'why'"] {
                    for end in ends {
                        rows.push(leg(&[
                            ("state", state),
                            ("order_list_id", list),
                            ("not_placed_code", code),
                            ("state_reason", reason),
                            ("external_end", end),
                        ]));
                    }
                }
            }
        }
    }
    let one_at_a_time: [(&str, &[&str]); 7] = [
        ("leg", &["1", "2", "0", "3", "-1"]),
        ("generation", &["0", "-1"]),
        ("qty", &["0", "1", "-0.0001"]),
        ("take_profit_price", &["1", "0", "-1"]),
        ("stop_price", &["1", "0", "-1"]),
        ("stop_limit_price", &["NULL", "1", "0", "-1"]),
        (
            "source",
            &["'websocket'", "'sync'", "'direct'", "'manual'", "''"],
        ),
    ];
    for (column, values) in one_at_a_time {
        for value in values {
            rows.push(leg(&[(column, value)]));
        }
    }
    let protections = [
        "'not_needed'",
        "'unprotected'",
        "'closed'",
        "'protected'",
        "'unprotectable'",
        "'exited'",
        "'bogus'",
    ];
    for protection in protections {
        for at in ["NULL", "now()"] {
            for by in ["NULL", "'sync'"] {
                for reason in ["NULL", "'late'"] {
                    rows.push(entry_row(&[
                        ("protection", protection),
                        ("protected_at", at),
                        ("protected_by", by),
                        ("protection_reason", reason),
                    ]));
                }
            }
        }
    }
    for by in ["'websocket'", "'sync'", "'direct'", "'bogus'"] {
        rows.push(entry_row(&[
            ("protection", "'protected'"),
            ("protected_at", "now()"),
            ("protected_by", by),
        ]));
    }
    let statuses = [
        "'pending_new'",
        "'new'",
        "'partially_filled'",
        "'filled'",
        "'canceled'",
        "'expired'",
        "'rejected'",
        "'bogus'",
        "''",
    ];
    for status in statuses {
        rows.push(entry_row(&[("status", status)]));
    }
    for order_type in ["'market'", "'limit'", "'bogus'"] {
        for limit in ["NULL", "1", "0", "-1"] {
            rows.push(entry_row(&[
                ("order_type", order_type),
                ("limit_price", limit),
            ]));
        }
    }
    for (qty, quote) in [("1", "NULL"), ("NULL", "10"), ("NULL", "NULL"), ("1", "10")] {
        rows.push(entry_row(&[
            ("requested_qty", qty),
            ("requested_quote", quote),
        ]));
    }
    for column in [
        "executed_qty",
        "cumulative_quote",
        "base_commission",
        "fills_qty",
    ] {
        for value in ["0", "1", "-1"] {
            rows.push(entry_row(&[(column, value)]));
        }
    }
    rows
}

/// Migrations `2026-12-04-000009` and `000010` turned the checks of entries
/// and legs into function calls. Against the schema as it was before them
/// (migrated through `000008` only, so no down.sql is trusted), every row of
/// [`check_grid`] is applied by both or refused by both, under the same
/// constraint name; and a refusal says which value broke the rule.
#[tokio::test]
async fn the_checks_accept_and_refuse_as_before_by_the_same_name() {
    let (new, old) = (TestDb::new().await, TestDb::empty().await);
    let applied = old.migrate_through("20261204000008").await.unwrap();
    assert_eq!(applied.last().map(String::as_str), Some("20261204000008"));
    assert!(
        store_pg_migration_count() > applied.len() + 1,
        "the new schema has 000009 and 000010 on top"
    );
    let mut new_conn = AsyncPgConnection::establish(new.url()).await.unwrap();
    let mut old_conn = AsyncPgConnection::establish(old.url()).await.unwrap();
    for setup in CHECKS_SETUP {
        diesel::sql_query(setup)
            .execute(&mut new_conn)
            .await
            .unwrap();
        diesel::sql_query(setup)
            .execute(&mut old_conn)
            .await
            .unwrap();
    }
    // 000010 ran: the checks hold for the rows stored before them too.
    let validated: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_constraint WHERE convalidated AND conname IN \
         ('entries_state', 'entries_values', 'protection_legs_state', 'protection_legs_values')",
    )
    .get_result(&mut new_conn)
    .await
    .unwrap();
    assert_eq!(validated.n, 4);
    let grid = check_grid();
    let (mut applied, mut refused) = (0, 0);
    for sql in &grid {
        let before = outcome(&mut old_conn, sql).await;
        let now = outcome(&mut new_conn, sql).await;
        assert_eq!(now, before, "{sql}");
        if now.is_ok() {
            applied += 1;
        } else {
            refused += 1;
        }
    }
    // The grid exercises both sides of every rule.
    assert!(
        applied > 50 && refused > 300,
        "{applied} applied, {refused} refused"
    );
    let err = diesel::sql_query(leg_row(10_000, &[("qty", "-0.5")]))
        .execute(&mut new_conn)
        .await
        .unwrap_err();
    let diesel::result::Error::DatabaseError(_, info) = err else {
        panic!("{err}")
    };
    assert_eq!(
        info.message(),
        "new row for relation \"protection_legs\" violates check constraint \"protection_legs_qty_check\""
    );
    assert_eq!(info.details(), Some("qty = '-0.5'"));
}

/// Migration `2026-12-05-000013` adds the fills' commissions to the entry
/// (`entries.fees`) with no backfill under its exclusive lock; `000014`, a
/// transaction of its own, gives entries not settled theirs from the fills
/// already stored; settled ones are left as they closed.
#[tokio::test]
async fn the_commissions_migration_gives_open_entries_their_fills_fees() {
    let db = TestDb::empty().await;
    db.migrate_through("20261205000012").await.unwrap();
    for setup in CHECKS_SETUP {
        db.run_sql(setup).await;
    }
    db.run_sql(
        "INSERT INTO entries (id, account_id, symbol, base_asset, quote_asset, client_order_id, \
         order_type, status, requested_qty, executed_qty, cumulative_quote, protection, \
         realized_quote, created_at) VALUES (2, 1, 'BTCUSDT', 'BTC', 'USDT', 'og-E-2', 'market', \
         'filled', 0.001, 0.001, 60, 'closed', 1, now())",
    )
    .await;
    db.run_sql(&entry_row(&[
        ("status", "'filled'"),
        ("protection", "'unprotected'"),
        ("executed_qty", "0.001"),
        ("cumulative_quote", "60"),
    ]))
    .await;
    db.run_sql(
        "INSERT INTO fills (account_id, symbol, trade_id, entry_id, price, qty, commission, \
         commission_asset, traded_at) VALUES \
         (1, 'BTCUSDT', 1, 1, 60000, 0.0004, 0.0000004, 'BTC', now()), \
         (1, 'BTCUSDT', 2, 1, 60000, 0.0006, 0.00002, 'BNB', now()), \
         (1, 'BTCUSDT', 3, 1, 60000, 0, 0.00001, 'BNB', now()), \
         (1, 'BTCUSDT', 4, 2, 60000, 0.001, 0.00003, 'BNB', now())",
    )
    .await;
    // The columns alone first: no backfill under their exclusive lock.
    db.migrate_through("20261205000013").await.unwrap();
    let fees = db
        .texts("SELECT fees::text || ' ' || fees_complete::text AS s FROM entries ORDER BY id")
        .await;
    assert_eq!(
        fees,
        ["{} false", "{} false"],
        "nothing written under the lock"
    );
    // Then the open entries' fees, in a migration of their own.
    let applied = store_pg::migrate(db.url()).await.unwrap();
    assert_eq!(
        applied.len(),
        store_pg_migration_count() - 13,
        "{applied:?}"
    );
    let fees = db
        .texts("SELECT fees::text AS s FROM entries ORDER BY id")
        .await;
    assert_eq!(
        fees,
        [
            r#"{"BNB": "0.00003", "BTC": "0.0000004"}"#.to_owned(),
            "{}".to_owned()
        ]
    );
    // The store reads them back as the merge would have written them.
    let store = store_pg::PgStore::connect(db.config(2)).await.unwrap();
    let entry = oco_core::Store::entry(&store, oco_core::EntryId(1))
        .await
        .unwrap();
    assert_eq!(
        entry.fees.of(&oco_core::Asset("BNB".into())),
        rust_decimal_macros::dec!(0.00003)
    );
}
