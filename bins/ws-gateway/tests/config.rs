//! The binary's configuration as `main` parses it.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use clap::Parser;
use ws_gateway_bin::{Command, Config, ExchangeKind, LogFormat};

#[tokio::test]
async fn a_malformed_secret_key_is_refused_without_echoing_it() {
    let config = Config::try_parse_from([
        "ws-gateway",
        "--database-url",
        "postgres://127.0.0.1/none",
        "--secret-key",
        "not-a-key-at-all",
        "--exchange",
        "testnet",
    ])
    .unwrap();
    assert!(
        !format!("{config:?}").contains("not-a-key-at-all"),
        "Debug redacts the key"
    );
    let err = ws_gateway_bin::wire(&config).await.err().unwrap();
    let text = format!("{err:#} / {err:?}");
    assert!(
        text.contains("OCO_SECRET_KEY"),
        "names the variable: {text}"
    );
    assert!(
        !text.contains("not-a-key-at-all"),
        "the key is echoed: {text}"
    );
}

#[tokio::test]
async fn a_missing_secret_key_is_named() {
    let config = Config::try_parse_from([
        "ws-gateway",
        "--database-url",
        "postgres://127.0.0.1/none",
        "--exchange",
        "testnet",
    ])
    .unwrap();
    let err = ws_gateway_bin::wire(&config).await.err().unwrap();
    assert!(format!("{err:#}").contains("OCO_SECRET_KEY"));
}

#[test]
fn defaults_and_overrides() {
    let c = Config::try_parse_from(["ws-gateway", "--exchange", "production"]).unwrap();
    assert!(c.command.is_none());
    assert_eq!(c.exchange, Some(ExchangeKind::Production));
    assert_eq!(c.id_namespace, "og");
    assert_eq!(c.db_pool_size, 8);
    assert_eq!(c.log_format, LogFormat::Auto);
    assert_eq!(c.cpu_wakeup_latency_us, None, "not held unless asked for");
    let g = c.gateway_config().unwrap();
    assert_eq!(g.lease_ttl, Duration::from_secs(30));
    assert_eq!(g.renew_every, Duration::from_secs(10));
    assert_eq!(g.max_accounts, 1000);
    assert!(
        g.holder.ends_with(&format!("-{}", std::process::id())),
        "hostname-pid: {}",
        g.holder
    );
    let binance = c.binance_config().unwrap();
    assert_eq!(binance.rest_base, "https://api.binance.com");
    assert_eq!(
        (
            binance.stream.subscriptions_per_connection,
            binance.stream.connect_attempts,
            binance.stream.connect_burst
        ),
        (100, 250, 10)
    );

    let c = Config::try_parse_from([
        "ws-gateway",
        "--exchange",
        "sim",
        "--binance-rest-url",
        "http://127.0.0.1:9400",
        "--binance-ws-url",
        "ws://127.0.0.1:9400/ws-api/v3",
        "--accounts-per-connection",
        "1000",
        "--stream-connect-attempts",
        "4",
    ])
    .unwrap();
    let stream = c.binance_config().unwrap().stream;
    assert_eq!(
        (
            stream.subscriptions_per_connection,
            stream.connect_attempts,
            stream.connect_burst
        ),
        (1000, 4, 4),
        "the sim's streams take the settings too; the burst stays within the attempts"
    );
    stream.validate().unwrap();

    let c = Config::try_parse_from([
        "ws-gateway",
        "--exchange",
        "testnet",
        "--gateway-id",
        "gw-7",
        "--lease-ttl-secs",
        "9",
        "--lease-renew-secs",
        "3",
        "--max-accounts",
        "5",
        "--log-format",
        "json",
        "--cpu-wakeup-latency-us",
        "0",
    ])
    .unwrap();
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.cpu_wakeup_latency_us, Some(0));
    let g = c.gateway_config().unwrap();
    assert_eq!(
        (
            g.holder.as_str(),
            g.lease_ttl,
            g.renew_every,
            g.max_accounts
        ),
        ("gw-7", Duration::from_secs(9), Duration::from_secs(3), 5)
    );
    assert!(c.binance_config().unwrap().rest_base.contains("testnet"));

    let c = Config::try_parse_from(["ws-gateway", "migrate"]).unwrap();
    assert!(matches!(c.command, Some(Command::Migrate)));
}

#[test]
fn stream_settings_out_of_range_are_refused_by_name() {
    for (flag, value) in [
        ("--accounts-per-connection", "0"),
        ("--accounts-per-connection", "1001"),
        ("--stream-connect-attempts", "0"),
    ] {
        let err = Config::try_parse_from(["ws-gateway", flag, value])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: {err}"
        );
    }
}

#[test]
fn bad_settings_are_refused_by_name() {
    let c = Config::try_parse_from(["ws-gateway", "--exchange", "sim"]).unwrap();
    let err = c.binance_config().unwrap_err().to_string();
    assert!(err.contains("BINANCE_REST_URL") && err.contains("BINANCE_WS_URL"));
    let c = Config::try_parse_from([
        "ws-gateway",
        "--lease-ttl-secs",
        "5",
        "--lease-renew-secs",
        "5",
    ])
    .unwrap();
    assert!(
        c.gateway_config()
            .unwrap_err()
            .to_string()
            .contains("OCO_LEASE_RENEW_SECS")
    );
}

#[tokio::test]
async fn the_exchange_is_never_assumed() {
    // Testnet keys sent to production fail every request: the gateway must
    // be told where it is, as every other process is.
    let c = Config::try_parse_from([
        "ws-gateway",
        "--database-url",
        "postgres://127.0.0.1/none",
        "--secret-key",
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    ])
    .unwrap();
    assert_eq!(c.exchange, None);
    let err = c.binance_config().unwrap_err().to_string();
    assert_eq!(
        err,
        "OCO_EXCHANGE (or --exchange) is required: production, testnet or sim"
    );
    let err = ws_gateway_bin::wire(&c).await.err().unwrap();
    assert!(format!("{err:#}").contains("OCO_EXCHANGE"), "{err:#}");
    // Migrations touch no exchange and do not need one.
    let c = Config::try_parse_from(["ws-gateway", "migrate"]).unwrap();
    assert!(matches!(c.command, Some(Command::Migrate)));
}

#[test]
fn debug_shows_no_database_password() {
    let c = Config::try_parse_from([
        "ws-gateway",
        "--database-url",
        "postgres://u:hunter2@h/db",
        "--exchange",
        "testnet",
    ])
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("database_url: Some(\"[redacted]\")"),
        "{shown}"
    );
    assert!(shown.contains("exchange: Some(Testnet)"), "{shown}");
}
