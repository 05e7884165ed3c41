//! Mapping database failures into [`StoreError`], by what the caller must do.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::PoolError as ManagerError;
use diesel_async::pooled_connection::deadpool::PoolError;
use oco_core::StoreError;

/// A record that cannot be read back.
pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

/// No such record.
pub(crate) fn not_found(what: &'static str, id: impl ToString) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// Maps a diesel error raised while doing `doing` (e.g. `claiming leg 3/1/g0`).
///
/// Lost connections and unknown server errors are `Unavailable` (retry later:
/// the transaction rolled back), constraint violations are `Conflict`, and
/// values that cannot be decoded are `Corrupt`. Messages come from the server
/// and the statement's purpose; bound values (where ciphertexts live) never
/// appear in them.
pub(crate) fn db(doing: &str, err: DieselError) -> StoreError {
    match err {
        DieselError::DatabaseError(kind, info) => {
            let msg = format!("{doing}: {}", info.message());
            match kind {
                DatabaseErrorKind::UniqueViolation
                | DatabaseErrorKind::ForeignKeyViolation
                | DatabaseErrorKind::CheckViolation
                | DatabaseErrorKind::NotNullViolation => StoreError::Conflict(msg),
                // Closed connections, serialization failures, admin shutdowns,
                // timeouts: the transaction did not commit, so retrying is safe.
                _ => StoreError::Unavailable(msg),
            }
        }
        DieselError::NotFound => StoreError::NotFound {
            what: "record",
            id: doing.to_owned(),
        },
        DieselError::DeserializationError(e) => corrupt(format!("{doing}: {e}")),
        DieselError::SerializationError(e) => {
            StoreError::Conflict(format!("{doing}: value not storable: {e}"))
        }
        other => StoreError::Unavailable(format!("{doing}: {other}")),
    }
}

/// Maps a pool failure (no connection could be had).
pub(crate) fn pool(err: PoolError) -> StoreError {
    let detail = match err {
        PoolError::Backend(ManagerError::ConnectionError(e)) => format!("cannot connect: {e}"),
        PoolError::Backend(ManagerError::QueryError(e)) => format!("connection check failed: {e}"),
        PoolError::Timeout(kind) => format!("timed out waiting for a connection ({kind:?})"),
        other => other.to_string(),
    };
    StoreError::Unavailable(format!("postgres pool: {detail}"))
}

/// True when a unique or foreign-key violation (not a lost connection) caused it.
pub(crate) fn is_foreign_key(err: &DieselError) -> bool {
    matches!(
        err,
        DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)
    )
}
