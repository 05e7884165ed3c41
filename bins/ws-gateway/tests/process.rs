//! The process as `main` builds it, against PostgreSQL and `exchange-sim`.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ids::IdScheme;
use oco_core::levels::EntryLevels;
use oco_core::model::{
    EntryKind, EntryTags, NewEntry, OrderSize, Protection, ProtectionConfig, Source,
};
use oco_core::ports::{ApiCredentials, Clock, Exchange, NewAccount, OrderRequest, Side, Store};
use oco_core::{Qty, SystemClock};
use rust_decimal_macros::dec;
use secrecy::SecretString;
use store_pg::testing::TestDb;
use store_pg::{PgStore, SecretKey};
use tokio::sync::oneshot;

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
    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new("k1", "k1-secret", vec![("USDT".into(), dec!(100000))]),
    ))
    .await
    .unwrap();
    sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let db = TestDb::new().await;
    let key_hex = "07".repeat(32);
    let store = Arc::new(
        PgStore::connect(db.config_with_key(2, SecretKey::parse(&key_hex).unwrap()))
            .await
            .unwrap(),
    );
    let creds = ApiCredentials {
        api_key: "k1".into(),
        secret: SecretString::from("k1-secret"),
    };
    let account = store
        .create_account(NewAccount {
            owner: "alice".into(),
            exchange: "binance".into(),
            credentials: creds.clone(),
            protection: ProtectionConfig::DEFAULT,
        })
        .await
        .unwrap();
    let (rest, ws) = (sim.base_url(), sim.ws_api_url());
    // A free port for the exporter, so that the test can scrape it.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let config = ws_gateway_bin::Config::try_parse_from([
        "ws-gateway",
        "--database-url",
        db.url(),
        "--secret-key",
        &key_hex,
        "--exchange",
        "sim",
        "--binance-rest-url",
        &rest,
        "--binance-ws-url",
        &ws,
        "--gateway-id",
        "gw-test",
        "--lease-ttl-secs",
        "5",
        "--lease-renew-secs",
        "1",
        "--metrics-listen",
        &metrics_addr,
    ])
    .unwrap();
    assert!(
        !format!("{config:?}").contains(&key_hex),
        "Debug redacts the key"
    );

    let (stop, stopped) = oneshot::channel::<()>();
    let process = tokio::spawn(async move {
        ws_gateway_bin::run(&config, async {
            let _ = stopped.await;
        })
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.control().subscription_count() != 1 {
        assert!(Instant::now() < deadline, "the gateway never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An entry as the API sends it; only the gateway protects it.
    let exchange = BinanceExchange::new(BinanceConfig::custom(rest, ws)).unwrap();
    let ids = IdScheme::new("og").unwrap();
    let entry = store
        .create_entry(
            NewEntry {
                account: account.id,
                symbol: exchange.symbol_rules("BTCUSDT").await.unwrap().symbol,
                kind: EntryKind::Market,
                size: OrderSize::Base(Qty::new(dec!(0.01)).unwrap()),
                levels: EntryLevels::default(),
                tags: EntryTags::default(),
            },
            &move |id| ids.entry(id).unwrap(),
            SystemClock.now(),
        )
        .await
        .unwrap();
    exchange
        .place_order(
            &creds,
            &OrderRequest {
                symbol: "BTCUSDT".into(),
                side: Side::Buy,
                limit: None,
                size: OrderSize::Base(Qty::new(dec!(0.01)).unwrap()),
                client_id: entry.client_id.clone(),
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = store.entry(entry.id).await.unwrap();
        if matches!(
            e.protection,
            Protection::Protected {
                by: Source::Websocket,
                ..
            }
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not protected: {:?}",
            e.protection
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sim.control().order_lists(Some("k1")).len(),
        2,
        "two legs, once"
    );
    // The exporter shows the account's stream up and the layer's placements;
    // the gauges move on the exporter's refresh, so poll for them.
    let account_label = format!("oco_stream_up{{account=\"{}\"}} 1", account.id);
    let wanted = [
        account_label.as_str(),
        "oco_placements_total{source=\"websocket\"} 2",
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = match reqwest::get(format!("http://{metrics_addr}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if wanted.iter().all(|w| text.lines().any(|l| l == *w)) {
            assert!(!text.contains("k1-secret") && !text.contains(&key_hex));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {wanted:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).unwrap();
    process.await.unwrap().unwrap();
    // Shutdown released the lease and closed the stream.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.control().subscription_count() != 0 {
        assert!(Instant::now() < deadline, "the stream stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = oco_core::ports::Leases::acquire_leases(
        store.as_ref(),
        "other",
        10,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(taken.len(), 1, "the lease was released");
}
