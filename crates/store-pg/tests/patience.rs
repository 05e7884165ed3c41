//! A store started before its database waits for it (`connect_patiently`),
//! through a relay that starts listening late; and gives up after its
//! patience when the database never comes.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use store_pg::PgStore;
use store_pg::testing::TestDb;

/// The server of a database URL (`host:port`), and the same URL through
/// `127.0.0.1:relay` instead.
fn via_relay(url: &str, relay: u16) -> (String, String) {
    let mut parsed = url::Url::parse(url).unwrap();
    let server = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port().unwrap_or(5432)
    );
    parsed.set_host(Some("127.0.0.1")).unwrap();
    parsed.set_port(Some(relay)).unwrap();
    (server, parsed.to_string())
}

/// A TCP relay to the test database that starts listening only after
/// `delay`, as a database still booting would.
async fn late_relay(server: String, port: u16, delay: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        while let Ok((mut client, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(server).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_started_before_its_database_waits_for_it() {
    let db = TestDb::new().await;
    let port = free_port();
    let (server, relayed) = via_relay(db.url(), port);
    let relay = late_relay(server, port, Duration::from_millis(800)).await;
    let mut config = db.config(2);
    config.url = relayed;
    assert_ne!(config.url, db.url(), "the relay is in the path");
    let started = std::time::Instant::now();
    let store = PgStore::connect_patiently(config, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "it waited for the database: {:?}",
        started.elapsed()
    );
    // A working store: the schema is there and answers.
    assert!(store.migrate().await.unwrap().is_empty());
    relay.abort();
}

#[tokio::test]
async fn a_database_that_never_comes_is_given_up_after_the_patience() {
    let db = TestDb::new().await;
    let mut config = db.config(2);
    config.url = via_relay(db.url(), free_port()).1;
    let started = std::time::Instant::now();
    let err = PgStore::connect_patiently(config, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, oco_core::StoreError::Unavailable(_)), "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "retried for about the patience: {took:?}"
    );
}

#[tokio::test]
async fn a_malformed_url_is_refused_at_once() {
    let db = TestDb::new().await;
    let mut config = db.config(2);
    config.url = "postgres://127.0.0.1:notaport/x".to_owned();
    let started = std::time::Instant::now();
    let err = PgStore::connect_patiently(config, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a PostgreSQL URL"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "no waiting");
}

#[tokio::test]
async fn a_server_that_accepts_and_never_answers_is_given_up() {
    let db = TestDb::new().await;
    let mut config = db.config(2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts every connection and holds it, saying nothing.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    config.url = via_relay(db.url(), port).1;
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(40),
        PgStore::connect_patiently(config, Duration::from_secs(1)),
    )
    .await;
    let took = started.elapsed();
    silent.abort();
    let err = outcome
        .expect("an attempt that never ends keeps the patience waiting for ever")
        .unwrap_err();
    assert!(matches!(err, oco_core::StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("no answer"), "{err}");
    assert!(took < Duration::from_secs(20), "given up after {took:?}");
}
