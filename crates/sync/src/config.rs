//! Settings of the reconciler. No `Default`: [`SyncConfig::standard`] names
//! the defaults of the issue, a binary overrides what its flags say.

use std::time::Duration;

/// When an account's circuit breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed passes of an account that open its breaker (an
    /// authentication failure opens it at once).
    pub failures_to_open: u32,
    /// How long an open breaker skips the account before one trial pass.
    pub open_for: Duration,
}

/// Settings of [`crate::Reconciler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Wait after start before the first full pass (the gateway reconnects first).
    pub startup_delay: Duration,
    /// Time between the starts of two full passes.
    pub interval: Duration,
    /// How often flagged accounts are polled, besides whenever the flag bell
    /// rings ([`crate::Reconciler::flag_bell`]); at most 500 ms so that a
    /// flagged account is reconciled within 2 s even when no ring arrives.
    pub flag_poll: Duration,
    /// Accounts reconciled in parallel by each of the flag loop and the
    /// periodic pass; each takes the next account as one is done.
    pub concurrency: usize,
    /// Per-account circuit breaker.
    pub breaker: BreakerConfig,
    /// Request weight this process may use per minute (Binance counts weight
    /// per IP, shared by every account and every process of the node).
    pub weight_budget_per_minute: u32,
    /// Orders this process may send per account per 10 s (an OCO counts 2).
    pub order_budget_per_10s: u32,
    /// An entry still `PendingNew` that the exchange does not know is recorded
    /// as never sent once it is older than this (see the crate README).
    pub not_found_grace: Duration,
    /// Name this process's takes of due accounts carry in the store (shows
    /// which sync process has an account; unique per process by convention).
    pub holder: String,
    /// How long an account taken for a periodic reconciliation stays this
    /// process's: if it is not reconciled by then (the process died or the
    /// account failed) another process takes it. Longer than one account's
    /// reconciliation takes.
    pub pass_lease: Duration,
    /// How often the store is asked for accounts due for their periodic
    /// reconciliation (each is due `interval` after its last one).
    pub due_poll: Duration,
    /// Retries of an account whose pass left work undone (see the crate README).
    pub retry: RetryConfig,
}

/// When an account whose pass left work undone is due again, before its
/// periodic pass: recorded in the store (`Store::defer_reconcile`), taken by
/// whichever sync process polls for it first once the wait has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// First wait after a protection was left incomplete (refused,
    /// unanswered, another claimant in flight); doubles up to `max`.
    pub after_protection: Duration,
    /// First wait after a read failed (an entry's or the account's). Such
    /// failures feed the breaker, which must open on errors that persist, not
    /// on a blip retried fast: keep 3 attempts longer than a blip.
    pub after_errors: Duration,
    /// Longest wait between two retries.
    pub max: Duration,
    /// Retries of one account before it is due only once per `interval`, so
    /// that a refusal that persists is not sent again every `max`; until its
    /// open entries change or a pass completes (the count is this process's).
    pub attempts: u32,
}

impl SyncConfig {
    /// The defaults: first pass 15 s after start, then every 5 min, flags
    /// polled every 250 ms, 8 accounts in parallel, breaker opens after 3
    /// failed passes (or one authentication failure) for 5 min, 3,000 weight
    /// per minute (half of Binance's usual 6,000 per IP, the rest left to the
    /// gateway and the API), 40 orders per account per 10 s (Binance allows
    /// 50 to 100), never-sent grace 2 min; due accounts polled every 5 s and
    /// taken for 2 min, under the holder name `sync-<process id>`; an
    /// incomplete account retried after 1 s (protection) or 20 s (failed
    /// reads), doubling to 60 s, 8 times at most.
    pub fn standard() -> SyncConfig {
        SyncConfig {
            startup_delay: Duration::from_secs(15),
            interval: Duration::from_secs(300),
            flag_poll: Duration::from_millis(250),
            concurrency: 8,
            breaker: BreakerConfig {
                failures_to_open: 3,
                open_for: Duration::from_secs(300),
            },
            weight_budget_per_minute: 3_000,
            order_budget_per_10s: 40,
            not_found_grace: Duration::from_secs(120),
            holder: format!("sync-{}", std::process::id()),
            pass_lease: Duration::from_secs(120),
            due_poll: Duration::from_secs(5),
            retry: RetryConfig {
                after_protection: Duration::from_secs(1),
                after_errors: Duration::from_secs(20),
                max: Duration::from_secs(60),
                attempts: 8,
            },
        }
    }
}
