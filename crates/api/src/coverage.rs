//! The coverage page: `GET /coverage` (HTML, no data in it) and
//! `GET /v1/coverage` (the authenticated user's figures, from the store):
//! coverage rate, unprotected entries with their age, acknowledged lists by
//! layer, and the latest history lines.

use axum::Json as JsonOut;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use oco_core::model::Source;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// Unprotected entries one answer lists (the oldest).
const MAX_UNPROTECTED: usize = 200;
/// History lines one answer holds.
const MAX_EVENTS: usize = 50;

/// The user's coverage.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CoverageView {
    /// Whose figures these are.
    pub user: String,
    /// Entries holding filled coins.
    pub filled: u64,
    /// Of those, protected.
    pub protected: u64,
    /// Of those, not protected.
    pub unprotected: u64,
    /// `protected / filled` in percent, two decimals ("100.00" when nothing is filled).
    #[serde(with = "rust_decimal::serde::str")]
    pub coverage_percent: Decimal,
    /// The oldest unprotected entries.
    pub unprotected_entries: Vec<UnprotectedView>,
    /// Acknowledged protective lists by layer.
    pub placements: Placements,
    /// Latest history lines, newest first.
    pub recent_events: Vec<RecentEvent>,
    /// When the figures were read (ms since the epoch).
    pub generated_at: i64,
}

/// One unprotected entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnprotectedView {
    /// Entry id.
    pub entry: i64,
    /// Account id.
    pub account: i64,
    /// Client order id.
    pub client_id: String,
    /// Symbol.
    pub symbol: String,
    /// `unprotected` or `unprotectable`.
    pub state: &'static str,
    /// First fill (ms since the epoch).
    pub filled_at: i64,
    /// Seconds since the first fill, at `generatedAt`.
    pub age_seconds: i64,
}

/// Lists by layer.
#[derive(Debug, Serialize)]
pub struct Placements {
    /// From the user-data stream.
    pub websocket: u64,
    /// From reconciliation.
    pub sync: u64,
    /// From the entry's own response.
    pub direct: u64,
}

/// One history line.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentEvent {
    /// Entry id.
    pub entry: i64,
    /// Kind, e.g. `protected`.
    pub kind: String,
    /// Detail.
    pub detail: String,
    /// Layer, when one acted.
    pub source: Option<&'static str>,
    /// When (ms since the epoch).
    pub at: i64,
}

/// The authenticated user's coverage, read from the store.
pub(crate) async fn coverage_json(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<JsonOut<CoverageView>, ApiError> {
    let report = state
        .coverage
        .coverage(Some(&user.0), MAX_UNPROTECTED)
        .await?;
    let events = state.coverage.recent_events(&user.0, MAX_EVENTS).await?;
    let now = state.clock.now();
    let placed = |source: Source| {
        report
            .placements
            .iter()
            .filter(|(s, _)| *s == source)
            .map(|(_, n)| *n)
            .sum()
    };
    let ppm = i64::try_from(report.ratio_ppm()).unwrap_or(i64::MAX);
    Ok(JsonOut(CoverageView {
        user: user.0,
        filled: report.filled,
        protected: report.protected,
        unprotected: report.unprotected_count,
        coverage_percent: Decimal::new(ppm, 4).round_dp(2),
        unprotected_entries: report
            .unprotected
            .iter()
            .map(|u| UnprotectedView {
                entry: u.entry.0,
                account: u.account.0,
                client_id: u.client_id.clone(),
                symbol: u.symbol.clone(),
                state: u.state,
                filled_at: u.filled_at.0,
                age_seconds: now.0.saturating_sub(u.filled_at.0).max(0) / 1000,
            })
            .collect(),
        placements: Placements {
            websocket: placed(Source::Websocket),
            sync: placed(Source::Sync),
            direct: placed(Source::Direct),
        },
        recent_events: events
            .into_iter()
            .map(|e| RecentEvent {
                entry: e.entry.0,
                kind: e.kind,
                detail: e.detail,
                source: e.source.map(Source::name),
                at: e.at.0,
            })
            .collect(),
        generated_at: now.0,
    }))
}

/// The page; it holds no data and fetches `/v1/coverage` with the user's token.
pub(crate) async fn coverage_page() -> Response {
    let mut page = Html(include_str!("coverage.html")).into_response();
    // The token only ever lives in the fragment and sessionStorage; keep the page out of caches.
    page.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    page
}
