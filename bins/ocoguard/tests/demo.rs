//! The demo end to end: in-process simulator, all three layers, on the
//! in-memory store and on PostgreSQL (a fresh `TestDb`).
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use oco_core::model::Protection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_on_postgres_protects_every_fill_through_each_layer() {
    let db = store_pg::testing::TestDb::new().await;
    let mut out = Vec::new();
    let report = ocoguard::demo::run_on_postgres(
        db.url().to_owned(),
        store_pg::SecretKey::generate(),
        &mut out,
    )
    .await
    .unwrap();
    check(&report, String::from_utf8(out).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_in_memory_protects_every_fill_through_each_layer() {
    let mut out = Vec::new();
    let report = ocoguard::demo::run_in_memory(&mut out).await.unwrap();
    check(&report, String::from_utf8(out).unwrap());
}

fn check(report: &ocoguard::demo::DemoReport, text: String) {
    assert!(report.all_filled_protected(), "{text}");
    let outage = report.row("LIMIT, fills during a stream outage").unwrap();
    assert_eq!(
        outage.legs_by_layer.get("sync"),
        Some(&2),
        "sync protected the outage fill: {text}"
    );
    assert_eq!(
        outage.protection,
        Protection::Closed,
        "its stop filled: {text}"
    );
    let restart = report.row("LIMIT, fills after a gateway restart").unwrap();
    assert_eq!(restart.legs_by_layer.get("websocket"), Some(&2), "{text}");
    let market = report.row("MARKET, one target, default stop").unwrap();
    // The API protects it from its own response unless the stream's copy of
    // the fill, or sync's start-up pass, gets there first: one set, by one layer.
    let market_legs: Vec<_> = market.legs_by_layer.values().collect();
    assert_eq!(market_legs, vec![&2], "{text}");
    let resting = report.row("LIMIT, resting").unwrap();
    assert!(
        resting.legs_by_layer.is_empty() && resting.executed.is_zero(),
        "{text}"
    );
    assert!(text.contains("every filled entry protected: yes"), "{text}");
    for row in report.rows.iter().filter(|r| !r.executed.is_zero()) {
        let ms = row
            .latency_ms
            .unwrap_or_else(|| panic!("{}: no latency: {text}", row.label));
        assert!(
            (0..30_000).contains(&ms),
            "{}: fill → protected {ms} ms: {text}",
            row.label
        );
    }
    assert!(
        report.elapsed < std::time::Duration::from_secs(60),
        "the demo takes under a minute: {:?}",
        report.elapsed
    );
}

/// The README's first command as a newcomer runs it: the binary, its exit
/// status and what it prints, on the in-memory store.
#[test]
fn the_demo_binary_exits_zero_and_reports_every_fill_protected() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ocoguard"))
        .arg("demo")
        .env_remove("DATABASE_URL")
        .env_remove("OCO_SECRET_KEY")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{text}\n{err}", out.status);
    assert!(text.contains("store: in-memory"), "{text}");
    assert!(text.contains("every filled entry protected: yes"), "{text}");
    // The demo's own progress reads well: no log lines in between.
    assert!(
        !err.contains(" INFO ") && !err.contains("\"level\""),
        "{err}"
    );
}
