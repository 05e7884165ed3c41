//! End-to-end harness of ocoguard: starts `exchange-sim`, `api`, `ws-gateway`
//! and `sync` as real processes (the binaries `cargo build --workspace --bins`
//! leaves in the target dir) on a real PostgreSQL, and drives them from
//! outside: HTTP to the API, the simulator's admin API for prices and faults,
//! `kill -9` for crashes, `pg_ctl` for a private PostgreSQL cluster that can be
//! restarted.
//!
//! Not here: any rule of the product. The suites are in `tests/tests/`.

pub mod api;
pub mod bins;
pub mod metrics;
pub mod pg;
pub mod process;
pub mod sim;
pub mod stack;
pub mod wait;

pub use api::ApiClient;
pub use bins::binary;
pub use pg::PrivatePg;
pub use process::{Proc, Spec};
pub use sim::{SimAdmin, SimProc};
pub use stack::{LayerSettings, Layers, MARGIN, scratch_dir};
pub use wait::wait_for;

/// A reqwest client with a timeout. reqwest is built without a default TLS
/// provider and asks for one even for plain HTTP: ring is installed first,
/// as the adapter does.
pub fn http_client(timeout: std::time::Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .unwrap_or_default()
}
