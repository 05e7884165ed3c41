//! Every failure the API reports, and the one place where each maps to an
//! HTTP status and a JSON problem body `{code, message, field?, binanceCode?,
//! entryId?, openEntries?, entryIds?}`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oco_core::ports::{ExchangeError, StoreError};
use oco_core::protect::ProtectError;

use crate::dto::Problem;

/// What went wrong, classified by what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No token, or a token no user has: 401 `unauthorized`.
    #[error("{0}")]
    Unauthorized(String),
    /// The record does not exist or belongs to someone else: 404 `not_found`.
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of record.
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// No such route or method: 404 `no_route` / 405 `method_not_allowed`.
    #[error("{message}")]
    NoRoute {
        /// 404 or 405.
        status: StatusCode,
        /// What was asked.
        message: String,
    },
    /// The body is not JSON: 400 `malformed_json` (serde's message).
    #[error("{0}")]
    MalformedJson(String),
    /// The JSON does not have the expected shape (missing field, wrong
    /// type, unknown variant): 400 `invalid_body` (serde's message).
    #[error("{message}")]
    InvalidBody {
        /// Serde's message.
        message: String,
        /// The value's path in the body (`tp[1]`, `protection.slPct`),
        /// when serde stopped inside the body.
        field: Option<String>,
    },
    /// The body is not declared as JSON: 415 `unsupported_media_type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A field's value breaks a rule: 400 `invalid_field`.
    #[error("{field}: {message}")]
    InvalidField {
        /// The field, e.g. `tp[0]`.
        field: String,
        /// What is wrong with it, with the numbers.
        message: String,
    },
    /// The exchange does not list the symbol: 400 `unknown_symbol`.
    #[error("unknown symbol {0}")]
    UnknownSymbol(String),
    /// Well-formed but cannot be done as asked: 422 with `code`
    /// (`symbol_not_trading`, `unprotectable`, `account_inactive`,
    /// `exchange_auth`).
    #[error("{message}")]
    Unprocessable {
        /// Machine code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// Clashes with what exists: 409 with `code` (`conflict`, `not_cancelable`).
    #[error("{message}")]
    Conflict {
        /// Machine code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// The request's `Idempotency-Key` was used by the account for an entry
    /// that differs from this request: 409 `idempotency_key_reused`, with
    /// that entry. Nothing was stored or sent.
    #[error("{message}")]
    IdempotencyKeyReused {
        /// The key, the entry, and each difference.
        message: String,
        /// The entry stored under the key.
        entry: i64,
    },
    /// The account still has entries that need following, so it cannot be
    /// disabled: 409 `account_has_open_entries`, with their count and the
    /// first few ids.
    #[error("{message}")]
    OpenEntries {
        /// Why, and what to do about each kind of entry.
        message: String,
        /// How many entries are open.
        count: usize,
        /// Up to five of them, lowest id first.
        ids: Vec<i64>,
    },
    /// The exchange refused: 422 `exchange_rejected` with Binance's code and
    /// message, and the entry that recorded the refusal.
    #[error("rejected by the exchange: {code} {msg}")]
    ExchangeRejected {
        /// Exchange code, e.g. -2010.
        code: i32,
        /// Exchange message, word for word.
        msg: String,
        /// The entry that recorded it, if one was stored.
        entry: Option<i64>,
    },
    /// Too many requests to the exchange: 429 `rate_limited` with `Retry-After`.
    #[error("the exchange rate limit is reached; retry after {} s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// How long to wait.
        retry_after: Duration,
        /// The entry that was stored and not sent, if any.
        entry: Option<i64>,
    },
    /// The exchange cannot be reached: 503 `exchange_unavailable`.
    #[error("exchange unavailable: {message}")]
    ExchangeUnavailable {
        /// Why.
        message: String,
        /// The entry concerned, if any.
        entry: Option<i64>,
    },
    /// The store cannot be reached: 503 `store_unavailable`.
    #[error("store unavailable: {message}")]
    StoreUnavailable {
        /// Why.
        message: String,
        /// The entry concerned, if one was already placed.
        entry: Option<i64>,
    },
    /// A bug or corrupt data; never caused by input: 500 `internal`.
    #[error("internal error: {0}")]
    Internal(String),
    /// The task placing an entry ended without an answer (it panicked, or
    /// the runtime is shutting down) before the entry was stored, so before
    /// anything was sent: 500 `internal`. Once it is stored the answer is a
    /// `202` with the entry instead, never this.
    #[error("internal error: {0}")]
    PlacementAborted(String),
    /// Disabling the account raced an entry, and enabling it again failed:
    /// the account is disabled with open entries, which are neither streamed
    /// nor reconciled until it is enabled. 500 `account_left_disabled`, with
    /// the entries when known; the caller must enable it
    /// (`PATCH {"active": true}`).
    #[error("{message}")]
    AccountLeftDisabled {
        /// What happened and what to do.
        message: String,
        /// How many entries are open, when known.
        count: Option<usize>,
        /// Up to five of them, lowest id first.
        ids: Vec<i64>,
    },
}

fn retry_after_secs(d: Duration) -> u64 {
    // Round up so that a client waiting the advertised time is never early.
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl ApiError {
    /// A rule broken by one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::NoRoute { status, .. } => *status,
            Self::MalformedJson(_)
            | Self::InvalidBody { .. }
            | Self::InvalidField { .. }
            | Self::UnknownSymbol(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable { .. } | Self::ExchangeRejected { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Conflict { .. }
            | Self::IdempotencyKeyReused { .. }
            | Self::OpenEntries { .. } => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ExchangeUnavailable { .. } | Self::StoreUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) | Self::PlacementAborted(_) | Self::AccountLeftDisabled { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The machine code of the problem body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound { .. } => "not_found",
            Self::NoRoute { status, .. } if *status == StatusCode::METHOD_NOT_ALLOWED => {
                "method_not_allowed"
            }
            Self::NoRoute { .. } => "no_route",
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidBody { .. } => "invalid_body",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownSymbol(_) => "unknown_symbol",
            Self::Unprocessable { code, .. } | Self::Conflict { code, .. } => code,
            Self::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            Self::OpenEntries { .. } => "account_has_open_entries",
            Self::ExchangeRejected { .. } => "exchange_rejected",
            Self::RateLimited { .. } => "rate_limited",
            Self::ExchangeUnavailable { .. } => "exchange_unavailable",
            Self::StoreUnavailable { .. } => "store_unavailable",
            Self::Internal(_) | Self::PlacementAborted(_) => "internal",
            Self::AccountLeftDisabled { .. } => "account_left_disabled",
        }
    }

    /// The problem body.
    pub fn problem(&self) -> Problem {
        let message = match self {
            // The field is carried apart; the message says what is wrong with it.
            Self::InvalidField { field, message } => format!("{field}: {message}"),
            Self::ExchangeRejected { msg, .. } => msg.clone(),
            other => other.to_string(),
        };
        let field = match self {
            Self::InvalidField { field, .. } => Some(field.clone()),
            Self::InvalidBody { field, .. } => field.clone(),
            _ => None,
        };
        let entry_id = match self {
            Self::ExchangeRejected { entry, .. }
            | Self::RateLimited { entry, .. }
            | Self::ExchangeUnavailable { entry, .. }
            | Self::StoreUnavailable { entry, .. } => *entry,
            Self::IdempotencyKeyReused { entry, .. } => Some(*entry),
            _ => None,
        };
        let (open_entries, entry_ids) = match self {
            Self::OpenEntries { count, ids, .. } => (Some(*count), Some(ids.clone())),
            Self::AccountLeftDisabled { count, ids, .. } => (*count, Some(ids.clone())),
            _ => (None, None),
        };
        Problem {
            code: self.code().to_owned(),
            message,
            field,
            binance_code: match self {
                Self::ExchangeRejected { code, .. } => Some(*code),
                _ => None,
            },
            entry_id,
            open_entries,
            entry_ids,
        }
    }

    /// Tags an exchange or store failure with the entry it concerns.
    pub fn with_entry(mut self, id: i64) -> ApiError {
        match &mut self {
            Self::ExchangeRejected { entry, .. }
            | Self::RateLimited { entry, .. }
            | Self::ExchangeUnavailable { entry, .. }
            | Self::StoreUnavailable { entry, .. } => *entry = Some(id),
            _ => {}
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.problem())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            Self::RateLimited { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::NotFound { what, id } => ApiError::NotFound { what, id },
            StoreError::Conflict(message) => ApiError::Conflict {
                code: "conflict",
                message,
            },
            err @ StoreError::AccountInactive { .. } => ApiError::Unprocessable {
                code: "account_inactive",
                message: err.to_string(),
            },
            // The entry handler answers a used key itself; anywhere else it
            // is a request that clashes with a stored entry.
            StoreError::IdempotencyKeyUsed(entry) => ApiError::IdempotencyKeyReused {
                message: format!("the idempotency key is already used by entry {}", entry.id),
                entry: entry.id.0,
            },
            StoreError::Unavailable(message) => ApiError::StoreUnavailable {
                message,
                entry: None,
            },
            StoreError::Corrupt(m) => ApiError::Internal(format!("corrupt record: {m}")),
        }
    }
}

impl From<ExchangeError> for ApiError {
    fn from(err: ExchangeError) -> ApiError {
        match err {
            ExchangeError::Rejected { code, msg } => ApiError::ExchangeRejected {
                code,
                msg,
                entry: None,
            },
            ExchangeError::RateLimited { retry_after } => ApiError::RateLimited {
                retry_after,
                entry: None,
            },
            ExchangeError::Auth(m) => ApiError::Unprocessable {
                code: "exchange_auth",
                message: format!("the exchange refused the account's API key: {m}"),
            },
            ExchangeError::UnknownOutcome(message) | ExchangeError::Transient(message) => {
                ApiError::ExchangeUnavailable {
                    message,
                    entry: None,
                }
            }
            ExchangeError::NotFound => ApiError::ExchangeUnavailable {
                message: "the exchange does not know the order".into(),
                entry: None,
            },
        }
    }
}

impl From<ProtectError> for ApiError {
    fn from(err: ProtectError) -> ApiError {
        match err {
            ProtectError::Store(e) => e.into(),
            ProtectError::Exchange(e) => e.into(),
            ProtectError::Id(e) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Fallback for unknown paths.
pub(crate) async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NoRoute {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {}", uri.path()),
    }
}

/// Fallback for known paths asked with another method.
pub(crate) async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NoRoute {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{method} is not allowed on {}", uri.path()),
    }
}
