//! The gateway process as `main` wires it, over a fresh PostgreSQL database
//! and an `exchange-sim` with one account, for the process tests.
#![allow(clippy::unwrap_used, dead_code)] // each test binary uses its own part

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ids::IdScheme;
use oco_core::levels::EntryLevels;
use oco_core::model::{EntryKind, EntryTags, NewEntry, OrderSize, ProtectionConfig};
use oco_core::ports::{ApiCredentials, Clock, Exchange, NewAccount, OrderRequest, Side, Store};
use oco_core::{Account, Entry, Price, Qty, SystemClock};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;
use store_pg::testing::TestDb;
use store_pg::{PgStore, SecretKey};
use tokio::sync::oneshot;
use tracing::Instrument as _;

/// A simulator, a database with one account `k1` whose API secret is
/// `secret`, and the gateway's command line over both.
pub struct Wired {
    pub sim: Sim,
    pub db: TestDb,
    pub store: Arc<PgStore>,
    pub creds: ApiCredentials,
    pub account: Account,
    /// `OCO_SECRET_KEY`, as hex.
    pub key_hex: String,
    pub config: ws_gateway_bin::Config,
    /// Where the process serves its metrics.
    pub metrics_addr: String,
    /// The client entries are sent with (as the API's), rules cached.
    pub placer: BinanceExchange,
}

impl Wired {
    pub async fn new(secret: &str) -> Wired {
        let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
            AccountSpec::new("k1", secret, vec![("USDT".into(), dec!(100000))]),
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
            secret: SecretString::from(secret.to_owned()),
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
        // A free port for the exporter, so that a test can scrape it.
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let (rest, ws) = (sim.base_url(), sim.ws_api_url());
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
            // Leases that outlast a machine loaded by parallel builds and
            // tests: a renewal seconds late must not let the account go (its
            // hints would go with it), and shutdown releases them anyway.
            "--lease-ttl-secs",
            "30",
            "--lease-renew-secs",
            "1",
            "--metrics-listen",
            &metrics_addr,
        ])
        .unwrap();
        let placer =
            BinanceExchange::new(BinanceConfig::custom(sim.base_url(), sim.ws_api_url())).unwrap();
        Wired {
            placer,
            sim,
            db,
            store,
            creds,
            account,
            key_hex,
            config,
            metrics_addr,
        }
    }

    /// Starts the process and waits for its stream; the sender stops it.
    pub async fn start(
        &self,
    ) -> (
        oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.config.clone();
        let process = tokio::spawn(async move {
            ws_gateway_bin::run(&config, async {
                let _ = stopped.await;
            })
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sim.control().subscription_count() != 1 {
            assert!(Instant::now() < deadline, "the gateway never subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (stop, process)
    }

    /// Stores a MARKET entry and sends it as the API does (inside its order
    /// span), without protecting it: only the gateway can.
    pub async fn market_entry(&self) -> Entry {
        self.entry(None).await
    }

    /// As [`Wired::market_entry`], a LIMIT BUY at `limit`: below the market,
    /// it rests until the price comes down to it.
    pub async fn limit_entry(&self, limit: Decimal) -> Entry {
        self.entry(Some(Price::new(limit).unwrap())).await
    }

    async fn entry(&self, limit: Option<Price>) -> Entry {
        let exchange = &self.placer;
        let ids = IdScheme::new("og").unwrap();
        let entry = self
            .store
            .create_entry(
                NewEntry {
                    account: self.account.id,
                    symbol: exchange.symbol_rules("BTCUSDT").await.unwrap().symbol,
                    kind: limit.map_or(EntryKind::Market, |price| EntryKind::Limit { price }),
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
        let span = tracing::info_span!(
            "order",
            account = %self.account.id,
            entry = %entry.id,
            client_id = %entry.client_id
        );
        exchange
            .place_order(
                &self.creds,
                &OrderRequest {
                    symbol: "BTCUSDT".into(),
                    side: Side::Buy,
                    limit,
                    size: OrderSize::Base(Qty::new(dec!(0.01)).unwrap()),
                    client_id: entry.client_id.clone(),
                },
            )
            .instrument(span)
            .await
            .unwrap();
        entry
    }

    /// Waits until `entry` is protected; by which layer.
    pub async fn protected(&self, entry: &Entry) -> oco_core::model::Source {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = self.store.entry(entry.id).await.unwrap();
            if let oco_core::model::Protection::Protected { by, .. } = e.protection {
                return by;
            }
            assert!(
                Instant::now() < deadline,
                "not protected: {:?}",
                e.protection
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
