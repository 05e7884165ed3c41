//! What stops a reconciliation.

use std::time::Duration;

use oco_core::protect::ProtectError;
use oco_core::{AccountId, ExchangeError, StoreError};

/// Why an account (or a pass) was not reconciled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The account's circuit breaker is open: skipped until it may be tried again.
    #[error("account {account} skipped: circuit breaker open for {retry_in:?} more ({reason})")]
    BreakerOpen {
        /// The account.
        account: AccountId,
        /// Time until the trial pass.
        retry_in: Duration,
        /// Why it opened.
        reason: String,
    },
    /// Another task of this process is reconciling the account right now.
    #[error("account {account} is being reconciled by another task")]
    InProgress {
        /// The account.
        account: AccountId,
    },
    /// The store failed: nothing unsafe happened, the next pass goes on.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A read from the exchange failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// `protect` stopped before it could decide.
    #[error(transparent)]
    Protect(#[from] ProtectError),
}

impl SyncError {
    /// The exchange's error inside, if that is what failed.
    pub fn exchange_error(&self) -> Option<&ExchangeError> {
        match self {
            Self::Exchange(e) | Self::Protect(ProtectError::Exchange(e)) => Some(e),
            _ => None,
        }
    }

    /// The store's error inside, if that is what failed.
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(e) | Self::Protect(ProtectError::Store(e)) => Some(e),
            _ => None,
        }
    }

    /// True when the exchange refused the account's keys.
    pub fn is_auth(&self) -> bool {
        matches!(self.exchange_error(), Some(ExchangeError::Auth(_)))
    }
}
