//! Test support (feature `test-support`): a fresh database per test.
//!
//! [`TestDb::new`] clones `oco_template_<hash of the migrations>`, a database
//! migrated once (per server, and again whenever a migration changes), so a
//! test database costs one `CREATE DATABASE … TEMPLATE`. The server comes from
//! `DATABASE_URL` (default `postgres://127.0.0.1/test`); only its host, port,
//! user and password are used. Drop removes the database (`WITH (FORCE)`).
//!
//! No server is a test failure that names `DATABASE_URL`, never a skip.
// Test support: panicking with a clear message is how it reports failures.
#![allow(clippy::panic, clippy::expect_used)]

use std::time::Duration;

use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore as _;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, SimpleAsyncConnection as _};
use tokio::sync::OnceCell;
use url::Url;

use crate::config::{PgConfig, SecretKey};
use crate::migrate::{migrate, migrate_through, revert_all};

/// The server tests use when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://127.0.0.1/test";

/// Held (on the admin database) while the template is built.
const TEMPLATE_LOCK: i64 = 0x6f63_6f74_6d70_6c74;

// Hash of the migrations' contents, computed by build.rs.
const MIGRATIONS_HASH: &str = env!("OCO_MIGRATIONS_HASH");

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
}

/// `DATABASE_URL` or the default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

fn with_database(base: &str, name: &str) -> String {
    let mut url = Url::parse(base).unwrap_or_else(|e| panic!("DATABASE_URL is not a URL ({e})"));
    url.set_path(&format!("/{name}"));
    url.to_string()
}

// The server's address without credentials, for messages.
fn shown(base: &str) -> String {
    Url::parse(base).map_or_else(
        |_| "?".to_owned(),
        |u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or("?"),
                u.port().unwrap_or(5432)
            )
        },
    )
}

async fn admin(admin_url: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(admin_url).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach PostgreSQL for tests at DATABASE_URL ({}): {e}; start it or set DATABASE_URL",
            shown(admin_url)
        )
    })
}

fn random_suffix() -> String {
    format!("{}_{:016x}", std::process::id(), OsRng.next_u64())
}

async fn template(admin_url: &str) -> String {
    TEMPLATE
        .get_or_init(|| async {
            let name = format!("oco_template_{MIGRATIONS_HASH}");
            let mut conn = admin(admin_url).await;
            // Another test process may be building it: queue on a lock, then look.
            conn.batch_execute(&format!("SELECT pg_advisory_lock({TEMPLATE_LOCK})"))
                .await
                .expect("taking the template lock");
            let exists = database_exists(&mut conn, &name).await;
            if !exists {
                // Built under another name and renamed when complete, so a
                // crash half way never leaves a half-migrated template.
                let building = format!("oco_template_build_{MIGRATIONS_HASH}");
                let build_url = with_database(admin_url, &building);
                conn.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"
                ))
                .await
                .expect("dropping a stale template build");
                conn.batch_execute(&format!("CREATE DATABASE \"{building}\""))
                    .await
                    .expect("creating the template database");
                migrate(&build_url)
                    .await
                    .expect("migrating the template database");
                conn.batch_execute(&format!(
                    "ALTER DATABASE \"{building}\" RENAME TO \"{name}\""
                ))
                .await
                .expect("publishing the template database");
            }
            conn.batch_execute(&format!("SELECT pg_advisory_unlock({TEMPLATE_LOCK})"))
                .await
                .expect("releasing the template lock");
            name
        })
        .await
        .clone()
}

async fn database_exists(conn: &mut AsyncPgConnection, name: &str) -> bool {
    use diesel::sql_types::Text;
    use diesel_async::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let row: Found =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS found")
            .bind::<Text, _>(name)
            .get_result(conn)
            .await
            .expect("looking for the template database");
    row.found
}

impl TestDb {
    /// A fresh database with the current schema.
    pub async fn new() -> TestDb {
        let admin_url = database_url();
        let template = template(&admin_url).await;
        Self::create(admin_url, Some(&template)).await
    }

    /// A fresh database with no schema at all (migration tests).
    pub async fn empty() -> TestDb {
        Self::create(database_url(), None).await
    }

    async fn create(admin_url: String, template: Option<&str>) -> TestDb {
        let name = format!("oco_test_{}", random_suffix());
        let mut conn = admin(&admin_url).await;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{t}\""),
            None => format!("CREATE DATABASE \"{name}\""),
        };
        conn.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        let url = with_database(&admin_url, &name);
        TestDb {
            name,
            url,
            admin_url,
        }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A store configuration for this database with a fresh random key.
    pub fn config(&self, pool_size: usize) -> PgConfig {
        self.config_with_key(pool_size, SecretKey::generate())
    }

    /// A store configuration for this database with `key`.
    pub fn config_with_key(&self, pool_size: usize, key: SecretKey) -> PgConfig {
        PgConfig {
            url: self.url.clone(),
            pool_size,
            secret_key: key,
        }
    }

    /// `n` round trips of each kind on one connection to `url` (which may
    /// go through a proxy to this database), µs each, sorted: `SELECT 1`,
    /// then a durable commit (a transaction that takes an id, so its commit
    /// waits for the WAL flush, as a claim's does). Baselines for benches.
    ///
    /// # Panics
    /// When the database cannot be reached.
    pub async fn round_trips(url: &str, n: usize) -> (Vec<u64>, Vec<u64>) {
        let mut conn = AsyncPgConnection::establish(url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {} for round trips: {e}", shown(url)));
        let mut timed = async |sql: &str| {
            let mut us = Vec::with_capacity(n);
            for _ in 0..n {
                let t = std::time::Instant::now();
                conn.batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                us.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            us.sort_unstable();
            us
        };
        let select = timed("SELECT 1").await;
        let commit = timed("SELECT txid_current()").await;
        (select, commit)
    }

    /// Runs `sql` on this database as written, on a connection of its own:
    /// what a test does behind the processes' backs (another node's write, an
    /// operator's fix).
    ///
    /// # Panics
    /// When the database cannot be reached or `sql` fails.
    pub async fn run_sql(&self, sql: &str) {
        let mut conn = AsyncPgConnection::establish(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name));
        conn.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The single text column `s` of each row `sql` returns, in order: what a
    /// test reads that no port exposes (a flag's reason, say).
    ///
    /// # Panics
    /// When the database cannot be reached or `sql` fails.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        use diesel_async::RunQueryDsl as _;
        #[derive(diesel::QueryableByName)]
        struct Text {
            #[diesel(sql_type = diesel::sql_types::Text)]
            s: String,
        }
        let mut conn = AsyncPgConnection::establish(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name));
        diesel::sql_query(sql)
            .load::<Text>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .into_iter()
            .map(|t| t.s)
            .collect()
    }

    /// The server processes of this database listening on `channel` now (by
    /// their pid), once their `LISTEN` has run: whether, and which, a process
    /// under test listens.
    ///
    /// # Panics
    /// When the database cannot be reached.
    pub async fn listeners(&self, channel: &str) -> Vec<String> {
        self.texts(&format!(
            "SELECT pid::text AS s FROM pg_stat_activity \
             WHERE datname = current_database() AND query = 'LISTEN {channel}' \
             AND state = 'idle' ORDER BY pid"
        ))
        .await
    }

    /// Reverts every migration of this database (tests of `down.sql`).
    ///
    /// # Errors
    /// As [`crate::migrate`].
    pub async fn revert_all(&self) -> Result<Vec<String>, oco_core::StoreError> {
        revert_all(&self.url).await
    }

    /// Applies the pending migrations up to and including version `last`
    /// (digits only, e.g. `20261204000008`): a schema as it was before a
    /// later migration. Their versions.
    ///
    /// # Errors
    /// As [`crate::migrate`].
    pub async fn migrate_through(&self, last: &str) -> Result<Vec<String>, oco_core::StoreError> {
        migrate_through(&self.url, last).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop is synchronous and may run inside a runtime: use a thread with its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut conn = tokio::time::timeout(
                    Duration::from_secs(30),
                    AsyncPgConnection::establish(&admin_url),
                )
                .await
                .map_err(|_| std::io::Error::other("timed out connecting"))?
                .map_err(std::io::Error::other)?;
                conn.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
                    .map_err(std::io::Error::other)
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: test database {} was not dropped: {e}", self.name),
            Err(_) => eprintln!(
                "warning: test database {} was not dropped (thread panicked)",
                self.name
            ),
        }
    }
}
