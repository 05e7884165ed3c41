//! The metric families and how they are fed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use oco_core::ports::CoverageReport;
use oco_core::protect::{Idle, ProtectObserver, ProtectOutcome, ProtectReport};
use oco_core::{AccountId, ExchangeError, Millis, Source};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::exchange::error_code;

/// Bucket bounds (seconds) of the fill→protected histogram: the stream's
/// sub-second path up to sync's passes of several minutes.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

// Labelled families that can be empty: (name, type, help).
const LABELLED: [(&str, &str, &str); 6] = [
    ("oco_protect_calls", "counter", HELP_PROTECT_CALLS),
    ("oco_stream_up", "gauge", HELP_STREAM_UP),
    ("oco_breaker_open", "gauge", HELP_BREAKER_OPEN),
    ("oco_exchange_errors", "counter", HELP_EXCHANGE_ERRORS),
    ("oco_flag_listener_up", "gauge", HELP_FLAG_LISTENER_UP),
    ("oco_entry_listener_up", "gauge", HELP_ENTRY_LISTENER_UP),
];
const HELP_PROTECT_CALLS: &str = "protect calls by layer and outcome";
const HELP_STREAM_UP: &str =
    "1 while the account's user-data stream is subscribed, 0 while it is leased here but down";
const HELP_BREAKER_OPEN: &str = "1 while sync's circuit breaker for the account is open";
const HELP_FLAG_LISTENER_UP: &str = "Whether this process listens for reconcile flags (1), or only polls them until it listens again (0)";
const HELP_ENTRY_LISTENER_UP: &str = "Whether this process listens for new entries to read ahead of their fills (1), or their first fills take a read first until it listens again (0)";
const HELP_EXCHANGE_ERRORS: &str =
    "Exchange errors by code (the exchange's code for refusals, else the kind)";

type Hook = Box<dyn Fn(&Metrics) + Send + Sync>;
type WeightSource = Box<dyn Fn() -> u32 + Send + Sync>;

/// Every metric of one process. Feed it as a `ProtectObserver`, through
/// [`crate::ObservedExchange`], [`crate::refresh_coverage`] and the setters;
/// read it with [`Metrics::encode`] (what `GET /metrics` answers).
pub struct Metrics {
    registry: Registry,
    placements: Family<SourceLabels, Counter>,
    latency: Family<SourceLabels, Histogram, fn() -> Histogram>,
    outcomes: Family<OutcomeLabels, Counter>,
    coverage_ratio: Gauge<f64, AtomicU64>,
    filled_entries: Gauge,
    protected_entries: Gauge,
    unprotected_entries: Gauge,
    unprotected_oldest: Gauge<f64, AtomicU64>,
    coverage_updated: Gauge<f64, AtomicU64>,
    coverage_errors: Counter,
    stream_up: Family<AccountLabels, Gauge>,
    breaker_open: Family<AccountLabels, Gauge>,
    used_weight: Gauge,
    exchange_errors: Family<CodeLabels, Counter>,
    hinted_fills: Counter,
    stale_hints: Counter,
    flag_listener_up: Family<ChannelLabels, Gauge>,
    entry_listener_up: Family<ChannelLabels, Gauge>,
    flags_owed: Gauge,
    flag_write_failures: Counter,
    hooks: Mutex<Vec<Hook>>,
    weight_sources: Mutex<Vec<WeightSource>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every family registered, all at zero. The three sources are present
    /// from the start so that ratios over them are defined.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let placements = Family::<SourceLabels, Counter>::default();
        registry.register(
            "oco_placements",
            "Protective OCO lists acknowledged by the exchange, by the layer that placed them",
            placements.clone(),
        );
        let latency = Family::<SourceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "oco_fill_to_protected_seconds",
            "From an entry's first fill (trade time) to the acknowledgement of its first protective lists, by layer",
            latency.clone(),
        );
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register("oco_protect_calls", HELP_PROTECT_CALLS, outcomes.clone());
        let coverage_ratio = Gauge::<f64, AtomicU64>::default();
        coverage_ratio.set(1.0);
        registry.register(
            "oco_coverage_ratio",
            "Protected filled entries / filled entries, from the store (1 when nothing is filled)",
            coverage_ratio.clone(),
        );
        let filled_entries = Gauge::default();
        registry.register(
            "oco_filled_entries",
            "Entries holding filled coins (protected, unprotected or unprotectable), from the store",
            filled_entries.clone(),
        );
        let protected_entries = Gauge::default();
        registry.register(
            "oco_protected_entries",
            "Filled entries covered by placed lists, from the store",
            protected_entries.clone(),
        );
        let unprotected_entries = Gauge::default();
        registry.register(
            "oco_unprotected_entries",
            "Filled entries without protection, from the store",
            unprotected_entries.clone(),
        );
        let unprotected_oldest = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oco_unprotected_oldest_age_seconds",
            "Age of the oldest unprotected entry since its first fill (0 when none)",
            unprotected_oldest.clone(),
        );
        let coverage_updated = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oco_coverage_updated_timestamp_seconds",
            "When the coverage figures were last read from the store (Unix time)",
            coverage_updated.clone(),
        );
        let coverage_errors = Counter::default();
        registry.register(
            "oco_coverage_refresh_errors",
            "Coverage queries that failed",
            coverage_errors.clone(),
        );
        let stream_up = Family::<AccountLabels, Gauge>::default();
        registry.register("oco_stream_up", HELP_STREAM_UP, stream_up.clone());
        let breaker_open = Family::<AccountLabels, Gauge>::default();
        registry.register("oco_breaker_open", HELP_BREAKER_OPEN, breaker_open.clone());
        let used_weight = Gauge::default();
        registry.register(
            "oco_exchange_used_weight",
            "Request weight used in the current minute, as the exchange reports it (per IP)",
            used_weight.clone(),
        );
        let exchange_errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "oco_exchange_errors",
            HELP_EXCHANGE_ERRORS,
            exchange_errors.clone(),
        );
        let hinted_fills = Counter::default();
        registry.register(
            "oco_hinted_first_fills",
            "First fills written and claimed without a database read first (the store knew the entry from its acceptance)",
            hinted_fills.clone(),
        );
        let stale_hints = Counter::default();
        registry.register(
            "oco_stale_hints",
            "Writes from hints that matched nothing (the entry or its account had changed), after which the fill was read",
            stale_hints.clone(),
        );
        // No series until a process reports a listener: only the processes
        // that reconcile (sync, ocoguard run) listen, and 0 must mean down.
        let flag_listener_up = Family::<ChannelLabels, Gauge>::default();
        registry.register(
            "oco_flag_listener_up",
            HELP_FLAG_LISTENER_UP,
            flag_listener_up.clone(),
        );
        // Likewise only where entries are read ahead (ws-gateway, ocoguard run).
        let entry_listener_up = Family::<ChannelLabels, Gauge>::default();
        registry.register(
            "oco_entry_listener_up",
            HELP_ENTRY_LISTENER_UP,
            entry_listener_up.clone(),
        );
        let flags_owed = Gauge::default();
        registry.register(
            "oco_gateway_flags_owed",
            "Accounts the gateway owes a reconcile flag it could not write yet (retried until the database takes it)",
            flags_owed.clone(),
        );
        let flag_write_failures = Counter::default();
        registry.register(
            "oco_gateway_flag_write_failures",
            "Reconcile flag writes of the gateway that failed (each flag is written again, or given up when its account is gone)",
            flag_write_failures.clone(),
        );
        for source in [Source::Websocket, Source::Sync, Source::Direct] {
            let labels = SourceLabels {
                source: source.name(),
            };
            let _ = placements.get_or_create(&labels);
            let _ = latency.get_or_create(&labels);
        }
        Arc::new(Metrics {
            registry,
            placements,
            latency,
            outcomes,
            coverage_ratio,
            filled_entries,
            protected_entries,
            unprotected_entries,
            unprotected_oldest,
            coverage_updated,
            coverage_errors,
            stream_up,
            breaker_open,
            used_weight,
            exchange_errors,
            hinted_fills,
            stale_hints,
            flag_listener_up,
            entry_listener_up,
            flags_owed,
            flag_write_failures,
            hooks: Mutex::new(Vec::new()),
            weight_sources: Mutex::new(Vec::new()),
        })
    }

    fn hooks(&self) -> MutexGuard<'_, Vec<Hook>> {
        // Only boxed closures inside: a poisoned lock holds a usable list.
        self.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `hook` before every encoding, to copy figures kept elsewhere
    /// (stream states, breakers, the pacer's weight) into the gauges.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks().push(Box::new(hook));
    }

    /// Adds an exchange client's reading of the used request weight; the
    /// gauge shows the highest reading at each scrape (the exchange counts
    /// per IP, so every client of one host reads the same figure, give or
    /// take the requests in flight).
    pub fn watch_weight(&self, source: impl Fn() -> u32 + Send + Sync + 'static) {
        self.weight_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(source));
    }

    /// The OpenMetrics text of every family, after running the scrape hooks.
    pub fn encode(&self) -> String {
        let hooks = self.hooks();
        for hook in hooks.iter() {
            hook(self);
        }
        let weight = self
            .weight_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|source| source())
            .max();
        if let Some(weight) = weight {
            self.set_used_weight(weight);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        // The encoder leaves out labelled families with no series yet (no
        // stream leased, no breaker open, no error seen); declare them anyway
        // so that dashboards and rule checks find every name.
        let mut missing = String::new();
        for (name, kind, help) in LABELLED {
            if !out.contains(&format!("# TYPE {name} {kind}")) {
                missing.push_str(&format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n"));
            }
        }
        if let Some(at) = out.rfind("# EOF") {
            out.insert_str(at, &missing);
        }
        out
    }

    /// Counts an exchange error under its code.
    pub fn exchange_error(&self, err: &ExchangeError) {
        if let Some(code) = error_code(err) {
            self.exchange_errors
                .get_or_create(&CodeLabels { code })
                .inc();
        }
    }

    /// Replaces the stream states: `(account, up)` for every account leased here.
    pub fn set_streams(&self, states: &[(AccountId, bool)]) {
        self.stream_up.clear();
        for (account, up) in states {
            self.stream_up
                .get_or_create(&AccountLabels {
                    account: account.to_string(),
                })
                .set(i64::from(*up));
        }
    }

    /// Replaces the set of accounts whose breaker is open.
    pub fn set_open_breakers(&self, open: &[AccountId]) {
        self.breaker_open.clear();
        for account in open {
            self.breaker_open
                .get_or_create(&AccountLabels {
                    account: account.to_string(),
                })
                .set(1);
        }
    }

    /// Copies the store's running counts of first fills written from hints
    /// and of stale hints (both only grow).
    pub fn set_hint_counts(&self, hinted: u64, stale: u64) {
        for (counter, total) in [(&self.hinted_fills, hinted), (&self.stale_hints, stale)] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Shows `up` (true while the process listens for reconcile flags on
    /// `channel`) as `oco_flag_listener_up` at each scrape.
    pub fn watch_flag_listener(&self, channel: &'static str, up: Arc<AtomicBool>) {
        self.on_scrape(move |m| m.set_flag_listener(channel, up.load(Ordering::Relaxed)));
    }

    /// Shows `up` (true while the process listens for new entries on
    /// `channel` to read them ahead of their fills) as
    /// `oco_entry_listener_up` at each scrape. Down costs speed, not
    /// protection: a fill not read ahead is read when it comes.
    pub fn watch_entry_listener(&self, channel: &'static str, up: Arc<AtomicBool>) {
        self.on_scrape(move |m| {
            m.entry_listener_up
                .get_or_create(&ChannelLabels {
                    channel: channel.to_owned(),
                })
                .set(i64::from(up.load(Ordering::Relaxed)));
        });
    }

    /// Whether the process's listener for reconcile flags on `channel` is
    /// connected now.
    pub fn set_flag_listener(&self, channel: &str, up: bool) {
        self.flag_listener_up
            .get_or_create(&ChannelLabels {
                channel: channel.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Copies the gateway's reconcile flags not written yet, and its running
    /// count of failed flag writes (only grows).
    pub fn set_gateway_flags(&self, owed: u64, write_failures: u64) {
        self.flags_owed.set(i64::try_from(owed).unwrap_or(i64::MAX));
        self.flag_write_failures
            .inc_by(write_failures.saturating_sub(self.flag_write_failures.get()));
    }

    /// The request weight used this minute.
    pub fn set_used_weight(&self, weight: u32) {
        self.used_weight.set(i64::from(weight));
    }

    /// Copies a coverage report read from the store at `now`.
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    pub fn set_coverage(&self, report: &CoverageReport, now: Millis) {
        let ratio = if report.filled == 0 {
            1.0
        } else {
            report.protected as f64 / report.filled as f64
        };
        self.coverage_ratio.set(ratio);
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.filled_entries.set(gauge(report.filled));
        self.protected_entries.set(gauge(report.protected));
        self.unprotected_entries
            .set(gauge(report.unprotected_count));
        let oldest = report
            .unprotected
            .first()
            .map_or(0, |u| now.0.saturating_sub(u.filled_at.0).max(0));
        self.unprotected_oldest.set(oldest as f64 / 1000.0);
        self.coverage_updated.set(now.0 as f64 / 1000.0);
    }

    /// Counts a failed coverage query.
    pub fn coverage_failed(&self) {
        self.coverage_errors.inc();
    }
}

impl ProtectObserver for Metrics {
    #[allow(clippy::cast_precision_loss)] // milliseconds far below 2^52
    fn protected(&self, report: &ProtectReport) {
        let source = report.source.name();
        self.outcomes
            .get_or_create(&OutcomeLabels {
                source,
                outcome: outcome_name(&report.outcome),
            })
            .inc();
        let ProtectOutcome::Placed { legs, .. } = &report.outcome else {
            return;
        };
        let labels = SourceLabels { source };
        self.placements
            .get_or_create(&labels)
            .inc_by(legs.len() as u64);
        // Only the first generation measures fill→protected; later ones
        // replace lists after the position changed.
        if let (Some(filled), true) = (report.filled_at, legs.iter().all(|k| k.generation == 0)) {
            let ms = report.finished_at.0.saturating_sub(filled.0).max(0);
            self.latency
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
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
