//! `oco-core`'s [`Store`](oco_core::Store) port on PostgreSQL: diesel +
//! diesel-async over a deadpool pool of `tokio-postgres` connections (no
//! libpq), the schema's migrations (embedded from the workspace's
//! `migrations/` and applied under an advisory lock), API secrets encrypted
//! at rest, account leases for sharding gateways (on connections of their
//! own, so that fills never delay a renewal), and reconcile flags taken
//! with `FOR UPDATE SKIP LOCKED` and announced with `NOTIFY`.
//!
//! Not here: any domain rule (merging evidence and status moves are
//! `oco-core`'s, called under row locks), reading the environment, TLS to the
//! database, or logging of secrets.
//!
//! Conventions: money is `NUMERIC` ↔ `Decimal`, converted digit by digit
//! (never float, never rounded; see `convert`); times are `TIMESTAMPTZ` ↔
//! `Millis` (milliseconds, exact); lease expiry uses the database clock.

mod cached;
mod config;
mod convert;
mod coverage;
mod crypto;
mod error;
mod hints;
mod leases;
mod listen;
mod migrate;
mod rows;
pub mod schema;
mod store;
#[cfg(feature = "test-support")]
pub mod testing;
mod users;

pub use config::{KeyError, PgConfig, SecretKey};
pub use hints::HintStats;
pub use listen::{
    ENTRY_CHANNEL, EntryLearner, EntryListener, FlagRinger, RECONCILE_CHANNEL, ReconcileListener,
    learn_announced_entries, ring_on_flags,
};
pub use migrate::{MIGRATIONS, migrate};
pub use store::{LEASE_CONNECTIONS, PgStore, STARTUP_PATIENCE};
