//! Layer 3 of ocoguard: the HTTP API through which users and signal services
//! register exchange accounts and place entries, and the layer that protects
//! an entry which fills in its own (FULL) response, at once, with source
//! `direct`.
//!
//! Every entry is validated against the symbol's rules and the current price,
//! then stored with its TP/SL levels **before** it is sent under its
//! deterministic client id, so that neither a crash nor a lost answer can lose
//! it or place it twice. Each user authenticates with a bearer token (only
//! its SHA-256 is stored) and sees only the accounts they own.
//!
//! Not here: SQL or any one exchange (behind the `Store`, `Users` and
//! `Exchange` ports), the reconciliation of entries whose outcome is unknown
//! (`sync`), the user-data stream (`ws-gateway`), or process wiring, config
//! and the token CLI (`bins/api`).

pub mod auth;
pub mod dto;
pub mod error;
pub mod openapi;

mod accounts;
pub mod coverage;
mod entries;
mod json;
mod validate;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use oco_core::ports::{Clock, Coverage, Exchange, Store, Users};
use oco_core::{IdScheme, Protector};

pub use auth::{AuthUser, hash_token, new_token};
pub use error::ApiError;
pub use openapi::ApiDoc;

/// What every handler needs: the ports, the routine and the id scheme.
///
/// One concrete store usually implements [`Store`], [`Users`] and
/// [`Coverage`]: pass it three times. The `protector` must be wired to the same store and exchange.
#[derive(Clone)]
pub struct AppState {
    /// Accounts, entries, legs, events.
    pub store: Arc<dyn Store>,
    /// Users, their token hashes and what they own.
    pub users: Arc<dyn Users>,
    /// The exchange entries are placed on.
    pub exchange: Arc<dyn Exchange>,
    /// The one routine that places protection.
    pub protector: Arc<Protector>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Deterministic client ids; the same namespace as the protector's.
    pub ids: IdScheme,
    /// Coverage queries for the coverage page (usually the same store again).
    pub coverage: Arc<dyn Coverage>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

/// The API's routes under `/v1`, with JSON problem bodies for unknown routes
/// and methods.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/accounts",
            get(accounts::list_accounts).post(accounts::create_account),
        )
        .route(
            "/v1/accounts/{id}",
            get(accounts::get_account).patch(accounts::update_account),
        )
        .route(
            "/v1/entries",
            get(entries::list_entries).post(entries::create_entry),
        )
        .route(
            "/v1/entries/{id}",
            get(entries::get_entry).delete(entries::cancel_entry),
        )
        .route("/v1/openapi.json", get(openapi::openapi_json))
        .route("/v1/coverage", get(coverage::coverage_json))
        .route("/coverage", get(coverage::coverage_page))
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::no_method)
        .with_state(state)
}
