//! The process as `main` builds it, against PostgreSQL and `exchange-sim`.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::Wired;
use oco_core::model::Source;
use oco_core::{EntryStatus, Exchange as _, Store as _};
use rust_decimal_macros::dec;
use store_pg::testing::TestDb;
use ws_gateway::CpuWakeupLatency;

#[tokio::test]
async fn migrate_applies_the_schema_to_an_empty_database() {
    let db = TestDb::empty().await;
    let config = ws_gateway_bin::Config::try_parse_from([
        "ws-gateway",
        "--database-url",
        db.url(),
        "migrate",
    ])
    .unwrap();
    ws_gateway_bin::run(&config, std::future::pending())
        .await
        .unwrap();
    // The schema is there: nothing is left to apply.
    assert!(store_pg::migrate(db.url()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wired_process_protects_a_fill_from_the_stream() {
    let mut w = Wired::new("k1-secret").await;
    assert!(
        !format!("{:?}", w.config).contains(&w.key_hex),
        "Debug redacts the key"
    );
    // Asked for, the wake-up latency is held while the process runs, where
    // the machine lets it (root; `wakeup`'s own tests cover a refusal).
    w.config.cpu_wakeup_latency_us = Some(0);
    let may_hold = std::fs::OpenOptions::new()
        .write(true)
        .open(ws_gateway::wakeup::CPU_LATENCY_DEVICE)
        .is_ok();
    let (stop, process) = w.start().await;
    if may_hold {
        assert_eq!(CpuWakeupLatency::effective().unwrap(), Duration::ZERO);
        assert_eq!(
            ws_gateway::wakeup::open_requests(),
            1,
            "held by the process"
        );
    }
    let entry = w.market_entry().await;
    assert_eq!(w.protected(&entry).await, Source::Websocket);
    assert_eq!(
        w.sim.control().order_lists(Some("k1")).len(),
        2,
        "two legs, once"
    );
    // The exporter shows the account's stream up and the layer's placements;
    // the gauges move on the exporter's refresh, so poll for them.
    let stream_up = format!("oco_stream_up{{account=\"{}\"}} 1", w.account.id);
    let wanted = [
        stream_up.as_str(),
        "oco_placements_total{source=\"websocket\"} 2",
        "oco_entry_listener_up{channel=\"oco_entry\"} 1",
    ];
    let text = metrics_showing(&w, &wanted).await;
    assert!(!text.contains("k1-secret") && !text.contains(&w.key_hex));
    stop.send(()).unwrap();
    process.await.unwrap().unwrap();
    // Released at shutdown (another process may hold a request of its own,
    // so the machine's effective value would prove nothing).
    assert_eq!(
        ws_gateway::wakeup::open_requests(),
        0,
        "released at shutdown"
    );
    // Shutdown released the lease and closed the stream.
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.sim.control().subscription_count() != 0 {
        assert!(Instant::now() < deadline, "the stream stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = oco_core::ports::Leases::acquire_leases(
        w.store.as_ref(),
        "other",
        10,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(taken.len(), 1, "the lease was released");
}

/// Resting LIMIT entries, the process's first: their acceptance is written
/// and their symbol's rules fetched then, in the background and once for
/// both (the exchange is slow to answer: the second acceptance comes while
/// the first fetch is out), so each fill is written and claimed with no read
/// first, and `/metrics` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resting_entries_are_protected_without_a_read_at_their_fill() {
    let rules_requests = |w: &Wired| {
        w.sim
            .control()
            .requests()
            .iter()
            .filter(|r| r.path == "/api/v3/exchangeInfo" && r.status == 200)
            .count()
    };
    let w = Wired::new("k1-secret").await;
    let (stop, process) = w.start().await;
    // The placing client holds the rules before the exchange slows down.
    w.placer.symbol_rules("BTCUSDT").await.unwrap();
    let before = rules_requests(&w);
    w.sim.control().set_response_delay(
        Duration::from_millis(400),
        Some("/api/v3/exchangeInfo".to_owned()),
    );
    let first = w.limit_entry(dec!(59000)).await;
    let second = w.limit_entry(dec!(58900)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for entry in [&first, &second] {
        while w.store.entry(entry.id).await.unwrap().status != EntryStatus::New {
            assert!(
                Instant::now() < deadline,
                "the acceptance was never written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while rules_requests(&w) < before + 1 {
        assert!(
            Instant::now() < deadline,
            "the gateway never fetched the rules"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (entry, price) in [(&first, dec!(59000)), (&second, dec!(58900))] {
        w.sim.control().set_price("BTCUSDT", price).unwrap();
        assert_eq!(w.protected(entry).await, Source::Websocket);
    }
    assert_eq!(w.sim.control().order_lists(Some("k1")).len(), 4);
    assert_eq!(
        rules_requests(&w),
        before + 1,
        "the gateway fetched the rules once for both acceptances"
    );
    metrics_showing(
        &w,
        &["oco_hinted_first_fills_total 2", "oco_stale_hints_total 0"],
    )
    .await;
    stop.send(()).unwrap();
    process.await.unwrap().unwrap();
}

/// Polls the process's `/metrics` until it shows every line of `wanted`
/// (gauges move on the exporter's refresh); the text.
async fn metrics_showing(w: &Wired, wanted: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = match reqwest::get(format!("http://{}/metrics", w.metrics_addr)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if wanted.iter().all(|want| text.lines().any(|l| l == *want)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {wanted:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
