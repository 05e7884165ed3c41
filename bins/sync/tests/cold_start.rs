//! The process as `main` builds it: fills that happened while everything was
//! down are protected by the startup pass.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::Arc;
use std::time::Duration;

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
async fn fills_made_while_everything_was_down_are_protected_at_startup() {
    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new("k1", "k1-secret", vec![("USDT".into(), dec!(100000))]),
    ))
    .await
    .unwrap();
    sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    let db = TestDb::new().await;
    let key_hex = "07".repeat(32);
    let pg = db.config_with_key(2, SecretKey::parse(&key_hex).unwrap());
    let store = PgStore::connect(db.config_with_key(2, SecretKey::parse(&key_hex).unwrap()))
        .await
        .unwrap();
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
    // The API stored and sent two entries, then everything went down.
    let exchange =
        BinanceExchange::new(BinanceConfig::custom(sim.base_url(), sim.ws_api_url())).unwrap();
    let ids = IdScheme::new("og").unwrap();
    let mut entries = Vec::new();
    for _ in 0..2 {
        let ids = ids.clone();
        let entry = store
            .create_entry(
                NewEntry {
                    account: account.id,
                    symbol: exchange.symbol_rules("BTCUSDT").await.unwrap().symbol,
                    kind: EntryKind::Market,
                    size: OrderSize::Base(Qty::new(dec!(0.01)).unwrap()),
                    levels: EntryLevels::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
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
        entries.push(entry.id);
    }

    let args = |key: &str| {
        sync_bin::Config::try_parse_from([
            "sync",
            "--database-url",
            &pg.url,
            "--secret-key",
            key,
            "--exchange",
            "sim",
            "--binance-rest-url",
            &sim.base_url(),
            "--binance-ws-url",
            &sim.ws_api_url(),
            "--startup-delay-secs",
            "0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
    };
    let config = args(&key_hex).unwrap();
    assert!(
        !format!("{config:?}").contains(&key_hex),
        "Debug redacts the key"
    );

    let store = Arc::new(store);
    let (stop, stopped) = oneshot::channel::<()>();
    let process = sync_bin::run(&config, async {
        let _ = stopped.await;
    });
    let check = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut all = true;
            for id in &entries {
                let e = store.entry(*id).await.unwrap();
                all &= matches!(
                    e.protection,
                    Protection::Protected {
                        by: Source::Sync,
                        ..
                    }
                );
            }
            if all || tokio::time::Instant::now() >= deadline {
                // Flags wake the running process through their notification.
                let listening = db.listeners(store_pg::RECONCILE_CHANNEL).await.len();
                let _ = stop.send(());
                return (all, listening);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (ran, (protected, listening)) = tokio::join!(process, check);
    ran.unwrap();
    assert!(protected, "both entries protected by the startup pass");
    assert_eq!(listening, 1, "the process listens for reconcile flags");
    let lists = sim.control().order_lists(Some("k1"));
    assert_eq!(lists.len(), 4, "two legs each, once");
}

#[tokio::test]
async fn a_malformed_secret_key_is_refused_without_echoing_it() {
    let config = sync_bin::Config::try_parse_from([
        "sync",
        "--database-url",
        "postgres://127.0.0.1/none",
        "--secret-key",
        "not-a-key-at-all",
        "--exchange",
        "testnet",
    ])
    .unwrap();
    let err = sync_bin::wire(&config).await.err().unwrap();
    let text = format!("{err:#}");
    assert!(
        text.contains("OCO_SECRET_KEY"),
        "names the variable: {text}"
    );
    assert!(
        !text.contains("not-a-key-at-all"),
        "the key is echoed: {text}"
    );
}
