//! What the registry exports for what it is told.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use oco_core::ids::{LegIndex, LegKey};
use oco_core::ports::{CoverageReport, UnprotectedEntry};
use oco_core::protect::{Idle, ProtectObserver, ProtectOutcome, ProtectReport};
use oco_core::{AccountId, EntryId, ExchangeError, Millis, Source};
use telemetry::{Metrics, error_code};

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn placed(entry: i64, source: Source, generation: u32, filled: i64, done: i64) -> ProtectReport {
    let key = |leg| LegKey {
        entry: EntryId(entry),
        leg,
        generation,
    };
    ProtectReport {
        entry: EntryId(entry),
        source,
        outcome: ProtectOutcome::Placed {
            legs: vec![key(LegIndex::First), key(LegIndex::Second)],
            replaced: 0,
            degraded: None,
        },
        filled_at: Some(Millis(filled)),
        finished_at: Millis(done),
    }
}

#[test]
fn placements_and_first_protection_latency_by_source() {
    let m = Metrics::new();
    m.protected(&placed(1, Source::Websocket, 0, 1_000, 1_040));
    m.protected(&placed(2, Source::Sync, 0, 1_000, 31_000));
    // A later generation counts as placements but not as fill→protected.
    m.protected(&placed(1, Source::Websocket, 1, 1_000, 90_000));
    m.protected(&ProtectReport {
        entry: EntryId(3),
        source: Source::Direct,
        outcome: ProtectOutcome::Nothing(Idle::Covered),
        filled_at: Some(Millis(1)),
        finished_at: Millis(2),
    });
    let text = m.encode();
    let s = |series: &str| sample(&text, series);
    assert_eq!(s("oco_placements_total{source=\"websocket\"}"), Some(4.0));
    assert_eq!(s("oco_placements_total{source=\"sync\"}"), Some(2.0));
    assert_eq!(s("oco_placements_total{source=\"direct\"}"), Some(0.0));
    assert_eq!(
        s("oco_fill_to_protected_seconds_count{source=\"websocket\"}"),
        Some(1.0)
    );
    assert_eq!(
        s("oco_fill_to_protected_seconds_bucket{le=\"0.05\",source=\"websocket\"}"),
        Some(1.0),
        "40 ms falls in the 50 ms bucket: {text}"
    );
    assert_eq!(
        s("oco_fill_to_protected_seconds_bucket{le=\"10.0\",source=\"sync\"}"),
        Some(0.0)
    );
    assert_eq!(
        s("oco_fill_to_protected_seconds_bucket{le=\"60.0\",source=\"sync\"}"),
        Some(1.0)
    );
    assert_eq!(
        s("oco_protect_calls_total{source=\"direct\",outcome=\"covered\"}"),
        Some(1.0)
    );
}

#[test]
fn coverage_gauges_from_a_report() {
    let m = Metrics::new();
    assert_eq!(sample(&m.encode(), "oco_coverage_ratio"), Some(1.0));
    m.set_coverage(
        &CoverageReport {
            filled: 4,
            protected: 3,
            unprotected_count: 1,
            unprotected: vec![UnprotectedEntry {
                entry: EntryId(9),
                account: AccountId(1),
                client_id: "og-E-9".into(),
                symbol: "BTCUSDT".into(),
                filled_at: Millis(10_000),
                state: "unprotected",
            }],
            placements: vec![],
        },
        Millis(70_500),
    );
    let text = m.encode();
    assert_eq!(sample(&text, "oco_coverage_ratio"), Some(0.75));
    assert_eq!(sample(&text, "oco_filled_entries"), Some(4.0));
    assert_eq!(sample(&text, "oco_unprotected_entries"), Some(1.0));
    assert_eq!(
        sample(&text, "oco_unprotected_oldest_age_seconds"),
        Some(60.5)
    );
    assert!(
        !text.contains("og-E-9") && !text.contains("entry=\"9\""),
        "no entry or client id becomes a label: {text}"
    );
}

#[test]
fn hint_counts_follow_the_store_and_never_go_back() {
    let m = Metrics::new();
    let text = m.encode();
    assert_eq!(sample(&text, "oco_hinted_first_fills_total"), Some(0.0));
    m.set_hint_counts(7, 1);
    m.set_hint_counts(9, 1);
    let text = m.encode();
    assert_eq!(sample(&text, "oco_hinted_first_fills_total"), Some(9.0));
    assert_eq!(sample(&text, "oco_stale_hints_total"), Some(1.0));
    // A store's counts only grow; a lower reading lowers nothing.
    m.set_hint_counts(3, 0);
    let text = m.encode();
    assert_eq!(sample(&text, "oco_hinted_first_fills_total"), Some(9.0));
}

#[test]
fn streams_breakers_and_weight_are_replaced_at_each_scrape() {
    let m = Metrics::new();
    m.set_streams(&[(AccountId(1), true), (AccountId(2), false)]);
    m.set_open_breakers(&[AccountId(2)]);
    m.watch_weight(|| 40);
    m.watch_weight(|| 55);
    let text = m.encode();
    assert_eq!(sample(&text, "oco_stream_up{account=\"1\"}"), Some(1.0));
    assert_eq!(sample(&text, "oco_stream_up{account=\"2\"}"), Some(0.0));
    assert_eq!(sample(&text, "oco_breaker_open{account=\"2\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "oco_exchange_used_weight"),
        Some(55.0),
        "the highest reading"
    );
    m.set_streams(&[(AccountId(2), true)]);
    let text = m.encode();
    assert_eq!(
        sample(&text, "oco_stream_up{account=\"1\"}"),
        None,
        "an account no longer leased here disappears"
    );
}

#[test]
fn the_flag_listener_shows_at_each_scrape_and_only_where_there_is_one() {
    let m = Metrics::new();
    let text = m.encode();
    assert!(text.contains("# TYPE oco_flag_listener_up gauge"), "{text}");
    assert!(
        !text.contains("oco_flag_listener_up{"),
        "no series without a listener (api, ws-gateway): {text}"
    );
    let up = Arc::new(AtomicBool::new(false));
    m.watch_flag_listener("oco_reconcile", up.clone());
    let series = "oco_flag_listener_up{channel=\"oco_reconcile\"}";
    assert_eq!(sample(&m.encode(), series), Some(0.0));
    up.store(true, Ordering::Relaxed);
    assert_eq!(sample(&m.encode(), series), Some(1.0));
}

#[test]
fn the_entry_listener_shows_at_each_scrape_and_only_where_there_is_one() {
    let m = Metrics::new();
    let text = m.encode();
    assert!(
        text.contains("# TYPE oco_entry_listener_up gauge"),
        "{text}"
    );
    assert!(
        !text.contains("oco_entry_listener_up{"),
        "no series without a listener (api, sync): {text}"
    );
    let up = Arc::new(AtomicBool::new(false));
    m.watch_entry_listener("oco_entry", up.clone());
    let series = "oco_entry_listener_up{channel=\"oco_entry\"}";
    assert_eq!(sample(&m.encode(), series), Some(0.0));
    up.store(true, Ordering::Relaxed);
    assert_eq!(sample(&m.encode(), series), Some(1.0));
    assert_eq!(
        sample(&m.encode(), "oco_flag_listener_up{channel=\"oco_entry\"}"),
        None,
        "not counted as a flag listener"
    );
}

#[test]
fn exchange_errors_by_bounded_code() {
    let m = Metrics::new();
    for err in [
        ExchangeError::Rejected {
            code: -2010,
            msg: "Account has insufficient balance for requested action.".into(),
        },
        ExchangeError::Rejected {
            code: -2010,
            msg: "other words".into(),
        },
        ExchangeError::Rejected {
            code: 123_456,
            msg: "x".into(),
        },
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(1),
        },
        ExchangeError::UnknownOutcome("timeout".into()),
        ExchangeError::NotFound,
    ] {
        m.exchange_error(&err);
    }
    let text = m.encode();
    assert_eq!(
        sample(&text, "oco_exchange_errors_total{code=\"-2010\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "oco_exchange_errors_total{code=\"other\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "oco_exchange_errors_total{code=\"rate_limited\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "oco_exchange_errors_total{code=\"unknown_outcome\"}"),
        Some(1.0)
    );
    assert_eq!(error_code(&ExchangeError::NotFound), None);
    assert!(!text.contains("insufficient"), "messages are not labels");
}

#[test]
fn families_without_samples_are_still_declared() {
    let text = Metrics::new().encode();
    for decl in [
        "# TYPE oco_stream_up gauge",
        "# TYPE oco_breaker_open gauge",
        "# TYPE oco_exchange_errors counter",
        "# TYPE oco_protect_calls counter",
    ] {
        assert!(text.contains(decl), "{decl} missing: {text}");
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# TYPE oco_placements counter").count(), 1);
}

#[test]
fn the_observed_exchange_hands_the_adapters_cached_rules_through() {
    use oco_core::ports::Exchange as _;
    use oco_core::testing::{FakeExchange, btcusdt_rules};

    let fake = std::sync::Arc::new(FakeExchange::new());
    let observed = telemetry::ObservedExchange::new(fake.clone(), Metrics::new());
    assert_eq!(observed.cached_symbol_rules("BTCUSDT"), None);
    fake.add_symbol(btcusdt_rules(), "100".parse().unwrap());
    assert_eq!(
        observed.cached_symbol_rules("BTCUSDT"),
        Some(btcusdt_rules()),
        "a fill's first write relies on it to claim without a request"
    );
}
