//! The schema's migrations, embedded in the binary and applied at startup.

use diesel::connection::SimpleConnection as _;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};
use oco_core::StoreError;

/// The workspace's `migrations/` folder, embedded at compile time.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Session advisory lock held while migrating ("ocoguard" in ASCII), so that
/// processes starting together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6f63_6f67_7561_7264;

/// How long connecting to migrate may take before the attempt fails.
const MIGRATE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a start waits for another process's migrations before the
/// attempt fails (and `connect_patiently` tries again within its patience).
const MIGRATION_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Applies every pending migration to the database at `url` and returns the
/// versions it applied (empty when the schema was current). Safe to call
/// from several processes at once: they queue on an advisory lock, and the
/// later ones find nothing left to do.
///
/// # Errors
/// `Unavailable` when the database cannot be reached or a migration fails
/// (each migration runs in its own transaction, so a failed one leaves no trace).
pub async fn migrate(url: &str) -> Result<Vec<String>, StoreError> {
    with_lock(url, |conn| {
        conn.run_pending_migrations(MIGRATIONS)
            .map(|applied| applied.iter().map(ToString::to_string).collect())
            .map_err(|e| StoreError::Unavailable(format!("applying migrations: {e}")))
    })
    .await
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
        let failed = |e| StoreError::Unavailable(format!("applying migrations: {e}"));
        let mut applied = Vec::new();
        for migration in conn.pending_migrations(MIGRATIONS).map_err(failed)? {
            let version = migration.name().version().to_string();
            if version > last {
                break;
            }
            conn.run_migration(&*migration).map_err(failed)?;
            applied.push(version);
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
    F: FnOnce(&mut AsyncConnectionWrapper<AsyncPgConnection>) -> Result<T, StoreError>
        + Send
        + 'static,
{
    // Bounded: a server that accepts the connection and never answers (or
    // an address that swallows packets) must fail this attempt, so that a
    // caller's patience is kept rather than waited past.
    let conn = tokio::time::timeout(MIGRATE_CONNECT_TIMEOUT, AsyncPgConnection::establish(url))
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "connecting to migrate: no answer within {MIGRATE_CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| StoreError::Unavailable(format!("connecting to migrate: {e}")))?;
    tokio::task::spawn_blocking(move || {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        // Another process migrating holds the lock: waiting is right, for a
        // while; a process stuck while holding it must not hold every start
        // for ever. The wait is bounded, then lifted for the migrations.
        conn.batch_execute(&format!(
            "SET lock_timeout = '{}ms'; SELECT pg_advisory_lock({MIGRATION_LOCK}); SET lock_timeout = 0",
            MIGRATION_LOCK_WAIT.as_millis()
        ))
        .map_err(|e| StoreError::Unavailable(format!("taking the migration lock: {e}")))?;
        let result = work(&mut conn);
        // Closing the session releases the lock too; unlock early when we can.
        let _ = conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"));
        result
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("migration task failed: {e}")))?
}
