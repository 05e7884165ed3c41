//! `ocoguard migrate` and `ocoguard run` on PostgreSQL against the simulator.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::{Duration, Instant};

use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ports::Users;
use ocoguard::config::{ExchangeKind, Settings};
use ocoguard::run::{migrate, run_all};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use store_pg::testing::TestDb;
use store_pg::{PgConfig, PgStore, SecretKey};

#[tokio::test]
async fn migrate_applies_every_migration_once() {
    let db = TestDb::empty().await;
    let applied = migrate(db.url()).await.unwrap();
    assert!(applied.len() >= 5, "{applied:?}");
    assert!(
        migrate(db.url()).await.unwrap().is_empty(),
        "a second run applies nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_protects_an_entry_placed_through_its_api() {
    let db = TestDb::new().await;
    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new(
            "run-key",
            "run-secret",
            vec![("USDT".into(), Decimal::from(100_000))],
        ),
    ))
    .await
    .unwrap();
    // The run command takes the key as text, as the environment gives it.
    let text_key = "11".repeat(32);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The settings as `ocoguard run` reads them: a file, the environment over it.
    let dir = std::env::temp_dir().join(format!("ocoguard-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ocoguard.toml");
    std::fs::write(
        &file,
        format!(
            "id_namespace = \"run\"\n[database]\nurl = \"{}\"\npool_size = 4\n\
             [exchange]\nkind = \"sim\"\nrest_url = \"{}\"\nws_url = \"{}\"\n\
             [gateway]\nid = \"run-test\"\n[sync]\ninterval_secs = 60\nstartup_delay_secs = 60\n",
            db.url(),
            sim.base_url(),
            sim.ws_api_url()
        ),
    )
    .unwrap();
    let (key_env, listen) = (text_key.clone(), format!("127.0.0.1:{port}"));
    let env = move |name: &str| match name {
        "OCO_SECRET_KEY" => Some(key_env.clone()),
        "OCO_API_LISTEN" => Some(listen.clone()),
        _ => None,
    };
    let args = Settings::load(Some(&file), &env).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(args.exchange, ExchangeKind::Sim);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        run_all(&args, async move {
            let _ = stopped.await;
        })
        .await
    });

    // A user, created the way `api users add` does, on the same database and key.
    let store = PgStore::connect(PgConfig {
        url: db.url().to_owned(),
        pool_size: 1,
        secret_key: SecretKey::parse(&text_key).unwrap(),
    })
    .await
    .unwrap();
    let token = api::auth::new_token();
    store
        .create_user("runner", &api::auth::hash_token(&token))
        .await
        .unwrap();

    // reqwest is built without a default TLS provider; the adapter installs ring the same way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/v1");
    let deadline = Instant::now() + Duration::from_secs(20);
    let account: Value = loop {
        let sent = http
            .post(format!("{base}/accounts"))
            .bearer_auth(&token)
            .json(&json!({"exchange": "binance", "apiKey": "run-key", "apiSecret": "run-secret"}))
            .send()
            .await;
        if let Ok(reply) = sent {
            assert!(reply.status().is_success(), "{:?}", reply.text().await);
            break reply.json().await.unwrap();
        }
        assert!(Instant::now() < deadline, "the API never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reply = http
        .post(format!("{base}/entries"))
        .bearer_auth(&token)
        .json(
            &json!({"account": account["id"], "symbol": "BTCUSDT", "type": "MARKET",
                      "quantity": "0.01", "tp": ["61000"]}),
        )
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "{:?}", reply.text().await);
    assert_eq!(
        sim.control().order_lists(Some("run-key")).len(),
        2,
        "both legs exist when the request returns"
    );

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
