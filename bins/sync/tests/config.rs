//! `sync`'s settings as `main` parses them (here through their flags): the
//! exchange is chosen as for every other process, never assumed; the pool
//! size reads `OCO_DB_POOL_SIZE` like the other binaries and still accepts
//! the older `SYNC_DB_POOL`.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use clap::Parser;
use sync_bin::{Config, ExchangeKind};

fn parse(extra: &[&str]) -> Config {
    let mut args = vec![
        "sync",
        "--database-url",
        "postgres://x@db/o",
        "--secret-key",
        "k",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).unwrap()
}

#[test]
fn the_pool_size_takes_the_shared_name_before_the_old_one() {
    assert_eq!(parse(&[]).pool_size().unwrap(), 8);
    assert_eq!(parse(&["--db-pool", "3"]).pool_size().unwrap(), 3);
    assert_eq!(
        parse(&["--db-pool", "3", "--db-pool-size", "5"])
            .pool_size()
            .unwrap(),
        5
    );
}

#[test]
fn zero_settings_are_refused_by_name() {
    // Each used to be bent silently: a pass every second, a sync that never
    // spends weight, one account or one connection at a time.
    for (flag, var) in [
        ("--interval-secs", "SYNC_INTERVAL_SECS"),
        ("--concurrency", "SYNC_CONCURRENCY"),
        ("--weight-budget", "SYNC_WEIGHT_BUDGET"),
    ] {
        let err = parse(&[flag, "0"]).sync_config().unwrap_err().to_string();
        assert_eq!(err, format!("{var}: must be above 0"));
    }
    for (flags, var) in [
        (&["--db-pool-size", "0"][..], "OCO_DB_POOL_SIZE"),
        (&["--db-pool", "0"][..], "SYNC_DB_POOL"),
        (
            &["--db-pool", "3", "--db-pool-size", "0"][..],
            "OCO_DB_POOL_SIZE",
        ),
    ] {
        let err = parse(flags).pool_size().unwrap_err().to_string();
        assert_eq!(err, format!("{var}: must be above 0"));
    }
    let c = parse(&["--startup-delay-secs", "0"]).sync_config().unwrap();
    assert_eq!(
        c.startup_delay,
        std::time::Duration::ZERO,
        "no delay is a choice"
    );
    assert_eq!(c.interval, std::time::Duration::from_secs(300));
}

#[test]
fn the_exchange_is_chosen_as_for_every_other_process() {
    // Without a choice sync used to go to production, even beside a testnet
    // gateway and api sharing its environment.
    let c = parse(&[]);
    assert_eq!(c.exchange, None);
    assert_eq!(
        c.binance_config().unwrap_err().to_string(),
        "OCO_EXCHANGE (or --exchange) is required: production, testnet or sim"
    );
    let c = parse(&["--exchange", "testnet"]);
    assert_eq!(c.exchange, Some(ExchangeKind::Testnet));
    assert!(
        c.binance_config()
            .unwrap()
            .rest_base
            .contains("testnet.binance.vision")
    );
    let c = parse(&["--exchange", "production"]);
    assert_eq!(
        c.binance_config().unwrap().rest_base,
        "https://api.binance.com"
    );
    let c = parse(&[
        "--exchange",
        "sim",
        "--binance-rest-url",
        "http://127.0.0.1:9",
    ]);
    let err = c.binance_config().unwrap_err().to_string();
    assert!(
        err.contains("BINANCE_REST_URL") && err.contains("BINANCE_WS_URL"),
        "{err}"
    );
    let c = parse(&[
        "--exchange",
        "sim",
        "--binance-rest-url",
        "http://127.0.0.1:9",
        "--binance-ws-url",
        "ws://127.0.0.1:9/ws-api/v3",
    ]);
    let b = c.binance_config().unwrap();
    assert_eq!(
        (b.rest_base.as_str(), b.ws_api_url.as_str()),
        ("http://127.0.0.1:9", "ws://127.0.0.1:9/ws-api/v3")
    );
    assert!(Config::try_parse_from(["sync", "--exchange", "mainnet"]).is_err());
}

#[test]
fn debug_shows_no_database_password() {
    let c = Config::try_parse_from([
        "sync",
        "--database-url",
        "postgres://u:hunter2@h/db",
        "--secret-key",
        "k",
    ])
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("database_url: \"[redacted]\""), "{shown}");
    assert!(shown.contains("interval_secs: 300"), "{shown}");
}
