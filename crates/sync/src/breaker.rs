//! Per-account circuit breaker: stops hammering an account whose keys fail or
//! whose errors persist, and says so once.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use oco_core::AccountId;
use tokio::time::Instant;

use crate::config::BreakerConfig;

/// Why a breaker opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenReason {
    /// The exchange refused the account's keys.
    Auth(String),
    /// This many passes in a row failed; the last error is kept.
    Failures {
        /// Consecutive failed passes.
        count: u32,
        /// The last error.
        last: String,
    },
}

impl std::fmt::Display for OpenReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auth(msg) => write!(f, "keys refused: {msg}"),
            Self::Failures { count, last } => {
                write!(f, "{count} failed passes in a row, last: {last}")
            }
        }
    }
}

/// A breaker's verdict before a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Closed, or open long enough for one trial pass.
    Go,
    /// Open: skip the account.
    Skip {
        /// Time left open.
        retry_in: Duration,
        /// Why it opened.
        reason: OpenReason,
    },
}

/// What a recorded failure did to the breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tripped {
    /// Still closed.
    No,
    /// Just opened (log and report it once).
    Opened(OpenReason),
    /// A trial pass failed: open again.
    Reopened(OpenReason),
}

#[derive(Debug, Default)]
struct AccountBreaker {
    failures: u32,
    open: Option<(Instant, OpenReason)>,
}

/// The breakers of every account this process reconciles.
#[derive(Debug)]
pub struct Breakers {
    config: BreakerConfig,
    accounts: Mutex<HashMap<AccountId, AccountBreaker>>,
}

impl Breakers {
    /// Closed breakers under `config`.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<AccountId, AccountBreaker>> {
        // Each critical section is a few assignments: a poisoned map is consistent.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May the account be reconciled now?
    pub fn admit(&self, account: AccountId) -> Admission {
        let map = self.lock();
        match map.get(&account).and_then(|b| b.open.as_ref()) {
            Some((since, reason)) => {
                let open_for = since.elapsed();
                if open_for >= self.config.open_for {
                    Admission::Go
                } else {
                    Admission::Skip {
                        retry_in: self.config.open_for - open_for,
                        reason: reason.clone(),
                    }
                }
            }
            None => Admission::Go,
        }
    }

    /// A pass of the account went through: close its breaker.
    pub fn success(&self, account: AccountId) -> bool {
        let mut map = self.lock();
        let was_open = map.get(&account).is_some_and(|b| b.open.is_some());
        map.remove(&account);
        was_open
    }

    /// A pass of the account failed; `auth` when the keys were refused.
    pub fn failure(&self, account: AccountId, auth: bool, error: &str) -> Tripped {
        let mut map = self.lock();
        let b = map.entry(account).or_default();
        b.failures = b.failures.saturating_add(1);
        let reason = if auth {
            OpenReason::Auth(error.to_owned())
        } else {
            OpenReason::Failures {
                count: b.failures,
                last: error.to_owned(),
            }
        };
        if b.open.is_some() {
            // The trial pass after `open_for` failed.
            b.open = Some((Instant::now(), reason.clone()));
            return Tripped::Reopened(reason);
        }
        if auth || b.failures >= self.config.failures_to_open {
            b.open = Some((Instant::now(), reason.clone()));
            return Tripped::Opened(reason);
        }
        Tripped::No
    }

    /// Accounts whose breaker is open now, with the reason.
    pub fn open(&self) -> Vec<(AccountId, OpenReason)> {
        let mut open: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(id, b)| b.open.as_ref().map(|(_, r)| (*id, r.clone())))
            .collect();
        open.sort_by_key(|(id, _)| *id);
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(BreakerConfig {
            failures_to_open: 2,
            open_for: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn auth_opens_at_once_and_a_trial_follows_the_open_time() {
        let b = breakers();
        let a = AccountId(1);
        assert!(matches!(
            b.failure(a, true, "revoked"),
            Tripped::Opened(OpenReason::Auth(_))
        ));
        assert!(matches!(b.admit(a), Admission::Skip { .. }));
        assert_eq!(
            b.admit(AccountId(2)),
            Admission::Go,
            "other accounts unaffected"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(b.admit(a), Admission::Go, "one trial pass after open_for");
        assert!(matches!(
            b.failure(a, true, "revoked"),
            Tripped::Reopened(_)
        ));
        assert!(matches!(b.admit(a), Admission::Skip { .. }));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(b.success(a), "a good trial closes it");
        assert_eq!(b.admit(a), Admission::Go);
        assert!(b.open().is_empty());
    }

    #[test]
    fn persistent_errors_open_after_the_threshold_and_success_resets() {
        let b = breakers();
        let a = AccountId(1);
        assert_eq!(b.failure(a, false, "timeout"), Tripped::No);
        assert!(!b.success(a));
        assert_eq!(
            b.failure(a, false, "timeout"),
            Tripped::No,
            "count was reset"
        );
        assert!(matches!(
            b.failure(a, false, "timeout"),
            Tripped::Opened(OpenReason::Failures { count: 2, .. })
        ));
        assert_eq!(b.open().len(), 1);
    }
}
