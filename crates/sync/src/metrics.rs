//! Counters of the reconciler, read as a plain snapshot (exported as
//! Prometheus metrics by whoever serves them).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use oco_core::ProtectOutcome;
use oco_core::protect::Idle;

/// A copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Full passes finished.
    pub passes: u64,
    /// Account passes that went through.
    pub accounts_reconciled: u64,
    /// Account passes that failed.
    pub account_failures: u64,
    /// Account passes skipped by an open breaker.
    pub accounts_skipped: u64,
    /// Errors of single entries (a lookup or a trade list unread, a
    /// `protect` that stopped), as reported in `AccountReport::entry_errors`:
    /// each is retried with its account.
    pub entry_errors: u64,
    /// Flagged accounts taken.
    pub flagged_taken: u64,
    /// `protect` calls by outcome (`placed`, `covered`, `exited`, …).
    pub protections: BTreeMap<&'static str, u64>,
    /// Lists found ended on the exchange by how they ended.
    pub lists_ended: BTreeMap<&'static str, u64>,
    /// Legs whose placement the store had lost, adopted from the open lists.
    pub legs_adopted: u64,
    /// Stray lists seen: open lists of ours whose leg is not live, reported
    /// only. Counted once per list per account pass, so a stray left open
    /// over three passes counts three.
    pub stray_lists: u64,
    /// Entries recorded as never sent.
    pub entries_never_sent: u64,
    /// Request weight charged to the meter.
    pub weight_used: u64,
    /// Rate-limit answers (429/418) seen.
    pub rate_limited: u64,
    /// Times a breaker opened (or reopened after a failed trial).
    pub breaker_opens: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub struct Metrics {
    passes: AtomicU64,
    accounts_reconciled: AtomicU64,
    account_failures: AtomicU64,
    accounts_skipped: AtomicU64,
    entry_errors: AtomicU64,
    flagged_taken: AtomicU64,
    legs_adopted: AtomicU64,
    stray_lists: AtomicU64,
    entries_never_sent: AtomicU64,
    breaker_opens: AtomicU64,
    labelled: Mutex<Labelled>,
}

#[derive(Debug, Default)]
struct Labelled {
    protections: BTreeMap<&'static str, u64>,
    lists_ended: BTreeMap<&'static str, u64>,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    fn labelled(&self) -> MutexGuard<'_, Labelled> {
        // Only counters inside: a poisoned lock holds consistent data.
        self.labelled.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn pass(&self) {
        bump(&self.passes, 1);
    }
    pub(crate) fn reconciled(&self) {
        bump(&self.accounts_reconciled, 1);
    }
    pub(crate) fn failed(&self) {
        bump(&self.account_failures, 1);
    }
    pub(crate) fn skipped(&self) {
        bump(&self.accounts_skipped, 1);
    }
    pub(crate) fn entry_errors(&self, n: usize) {
        bump(&self.entry_errors, n as u64);
    }
    pub(crate) fn flagged(&self, n: usize) {
        bump(&self.flagged_taken, n as u64);
    }
    pub(crate) fn adopted(&self) {
        bump(&self.legs_adopted, 1);
    }
    pub(crate) fn strays(&self, n: usize) {
        bump(&self.stray_lists, n as u64);
    }
    pub(crate) fn never_sent(&self) {
        bump(&self.entries_never_sent, 1);
    }
    pub(crate) fn breaker_opened(&self) {
        bump(&self.breaker_opens, 1);
    }
    pub(crate) fn protection(&self, outcome: &ProtectOutcome) {
        *self
            .labelled()
            .protections
            .entry(outcome_name(outcome))
            .or_default() += 1;
    }
    pub(crate) fn list_ended(&self, how: &'static str) {
        *self.labelled().lists_ended.entry(how).or_default() += 1;
    }

    /// The counters now; `weight_used` and `rate_limited` come from the meter.
    pub(crate) fn snapshot(&self, weight_used: u64, rate_limited: u64) -> MetricsSnapshot {
        let l = self.labelled();
        MetricsSnapshot {
            passes: self.passes.load(Ordering::Relaxed),
            accounts_reconciled: self.accounts_reconciled.load(Ordering::Relaxed),
            account_failures: self.account_failures.load(Ordering::Relaxed),
            accounts_skipped: self.accounts_skipped.load(Ordering::Relaxed),
            entry_errors: self.entry_errors.load(Ordering::Relaxed),
            flagged_taken: self.flagged_taken.load(Ordering::Relaxed),
            protections: l.protections.clone(),
            lists_ended: l.lists_ended.clone(),
            legs_adopted: self.legs_adopted.load(Ordering::Relaxed),
            stray_lists: self.stray_lists.load(Ordering::Relaxed),
            entries_never_sent: self.entries_never_sent.load(Ordering::Relaxed),
            weight_used,
            rate_limited,
            breaker_opens: self.breaker_opens.load(Ordering::Relaxed),
        }
    }
}

/// The metric label of a `protect` outcome.
pub fn outcome_name(outcome: &ProtectOutcome) -> &'static str {
    match outcome {
        ProtectOutcome::Nothing(Idle::NoFill) => "no_fill",
        ProtectOutcome::Nothing(Idle::Covered) => "covered",
        ProtectOutcome::Nothing(Idle::InFlight) => "in_flight",
        ProtectOutcome::Nothing(Idle::Settled) => "settled",
        ProtectOutcome::Nothing(Idle::Busy) => "busy",
        ProtectOutcome::Placed { .. } => "placed",
        ProtectOutcome::Pending { .. } => "pending",
        ProtectOutcome::Failed { .. } => "failed",
        ProtectOutcome::Unprotectable { .. } => "unprotectable",
        ProtectOutcome::Exited { .. } => "exited",
    }
}
