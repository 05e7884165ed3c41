//! The schema's migrations, embedded in the binary and applied at startup.

use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::migration::Migration;
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};
use oco_core::StoreError;
use tracing::warn;

/// The workspace's `migrations/` folder, embedded at compile time.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Session advisory lock held while migrating ("ocoguard" in ASCII), so that
/// processes starting together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6f63_6f67_7561_7264;

/// How long connecting to migrate may take before the attempt fails.
const MIGRATE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a start waits for another process's migrations before the
/// attempt fails (and `connect_patiently` tries again within its patience).
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(30);

/// How often a start waiting for another process's migrations asks for the
/// lock again.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(100);

/// The migration connection, as diesel_migrations (synchronous) drives it.
type Conn = AsyncConnectionWrapper<AsyncPgConnection>;

/// Applies every pending migration to the database at `url` and returns the
/// versions it applied (empty when the schema was current). Safe to call
/// from several processes at once: they queue on an advisory lock, and the
/// later ones find nothing left to do.
///
/// # Errors
/// `Unavailable` when the database cannot be reached or a migration fails
/// (each migration runs in its own transaction, so a failed one leaves no
/// trace; one that runs outside a transaction is a single statement that
/// the next run repeats, see [`run_one`]).
pub async fn migrate(url: &str) -> Result<Vec<String>, StoreError> {
    with_lock(url, |conn| {
        let mut applied = Vec::new();
        for migration in conn.pending_migrations(MIGRATIONS).map_err(failed)? {
            applied.push(run_one(conn, &*migration)?);
        }
        Ok(applied)
    })
    .await
}

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("applying migrations: {e}"))
}

/// Runs one migration and records it; its version.
///
/// A migration that runs outside a transaction (`metadata.toml`:
/// `run_in_transaction = false`) builds or drops an index `CONCURRENTLY`,
/// in a single statement: PostgreSQL runs a string of several as one
/// implicit transaction, where `CONCURRENTLY` is refused. A concurrent
/// build that failed (a cancel, a lost connection, a crash) leaves an
/// INVALID index under its name, which `IF NOT EXISTS` would take for built
/// and which `ON CONFLICT` cannot use; so every INVALID index of the schema
/// is dropped before such a migration runs. Only a failed concurrent build
/// leaves one: the builds are these migrations, one at a time under the
/// lock held here, so none is in progress.
fn run_one(conn: &mut Conn, migration: &dyn Migration<Pg>) -> Result<String, StoreError> {
    if !migration.metadata().run_in_transaction() {
        drop_invalid_indexes(conn)?;
    }
    conn.run_migration(migration)
        .map(|version| version.to_string())
        .map_err(failed)
}

/// The indexes the migrations build `CONCURRENTLY` (outside a transaction):
/// the only ones a failed build of ours can leave INVALID.
const CONCURRENT_INDEXES: &[&str] = &["entries_idempotency_key_unique"];

/// Drops the INVALID indexes of the current schema that a concurrent build
/// of ours left ([`CONCURRENT_INDEXES`]), each `CONCURRENTLY` (writers of
/// its table go on meanwhile), each in a statement of its own. Nothing
/// else: an operator's index being built concurrently is INVALID until it
/// is done, and a partitioned index created `ON ONLY` until every partition
/// has one; dropping those would destroy work that is not ours (or, for
/// the partitioned one, fail every start).
fn drop_invalid_indexes(conn: &mut Conn) -> Result<(), StoreError> {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Invalid {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let invalid: Vec<Invalid> = diesel::sql_query(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE NOT i.indisvalid AND n.nspname = current_schema() \
         AND c.relkind = 'i' AND c.relname = ANY($1) \
         AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p \
                         WHERE p.index_relid = i.indexrelid)",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(CONCURRENT_INDEXES)
    .load(conn)
    .map_err(|e| failed(format!("looking for invalid indexes: {e}")))?;
    for Invalid { name } in invalid {
        warn!(index = %name, "dropping an invalid index left by a concurrent build that failed");
        conn.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            .map_err(|e| failed(format!("dropping invalid index {name}: {e}")))?;
    }
    Ok(())
}

#[cfg(feature = "test-support")]
/// Reverts every applied migration, newest first (tests of `down.sql`).
///
/// # Errors
/// As [`migrate`].
pub(crate) async fn revert_all(url: &str) -> Result<Vec<String>, StoreError> {
    with_lock(url, |conn| {
        conn.revert_all_migrations(MIGRATIONS)
            .map(|reverted| reverted.iter().map(ToString::to_string).collect())
            .map_err(|e| StoreError::Unavailable(format!("reverting migrations: {e}")))
    })
    .await
}

#[cfg(feature = "test-support")]
/// Applies the pending migrations up to and including version `last`
/// (digits only, as diesel shows them); their versions (a schema as it was
/// before a later migration, to compare with).
///
/// # Errors
/// As [`migrate`].
pub(crate) async fn migrate_through(url: &str, last: &str) -> Result<Vec<String>, StoreError> {
    let last = last.to_owned();
    with_lock(url, move |conn| {
        let mut applied = Vec::new();
        for migration in conn.pending_migrations(MIGRATIONS).map_err(failed)? {
            if migration.name().version().to_string() > last {
                break;
            }
            applied.push(run_one(conn, &*migration)?);
        }
        Ok(applied)
    })
    .await
}

/// Runs `work` on a synchronous wrapper of one connection (diesel_migrations
/// is synchronous), on a blocking thread, holding the migration lock.
async fn with_lock<T, F>(url: &str, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
{
    // Bounded: a server that accepts the connection and never answers (or
    // an address that swallows packets) must fail this attempt, so that a
    // caller's patience is kept rather than waited past.
    let mut conn = tokio::time::timeout(MIGRATE_CONNECT_TIMEOUT, AsyncPgConnection::establish(url))
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "connecting to migrate: no answer within {MIGRATE_CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| StoreError::Unavailable(format!("connecting to migrate: {e}")))?;
    take_lock(&mut conn).await?;
    tokio::task::spawn_blocking(move || {
        let mut conn = Conn::from(conn);
        // Whatever the server's default, a migration's lock waits are
        // bounded only where it says so (`SET LOCAL lock_timeout`).
        let result = conn
            .batch_execute("SET lock_timeout = 0")
            .map_err(|e| StoreError::Unavailable(format!("migrating: {e}")))
            .and_then(|()| work(&mut conn));
        // Closing the session releases the lock too; unlock early when we can.
        let _ = conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"));
        result
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("migration task failed: {e}")))?
}

/// Takes the migration lock, asking again every [`MIGRATION_LOCK_POLL`]
/// while another process holds it, for [`MIGRATION_LOCK_WAIT`] at most (a
/// process stuck while holding it must not hold every start for ever).
///
/// Never by waiting inside `pg_advisory_lock`: a statement that waits holds
/// a snapshot for as long, and `CREATE INDEX CONCURRENTLY` (run by the
/// holder, outside a transaction) waits for every older snapshot of the
/// database to end. The holder would wait for the waiter that waits for
/// it, and PostgreSQL's deadlock detector would cancel one of them: a start
/// failing, or the build, leaving an INVALID index. Between two attempts
/// this session holds no snapshot.
async fn take_lock(conn: &mut AsyncPgConnection) -> Result<(), StoreError> {
    use diesel_async::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Taken {
        #[diesel(sql_type = Bool)]
        taken: bool,
    }
    let deadline = tokio::time::Instant::now() + MIGRATION_LOCK_WAIT;
    loop {
        let Taken { taken } = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS taken")
            .bind::<BigInt, _>(MIGRATION_LOCK)
            .get_result(conn)
            .await
            .map_err(|e| StoreError::Unavailable(format!("taking the migration lock: {e}")))?;
        if taken {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Unavailable(format!(
                "taking the migration lock: another process has held it for {MIGRATION_LOCK_WAIT:?}"
            )));
        }
        tokio::time::sleep(MIGRATION_LOCK_POLL).await;
    }
}
