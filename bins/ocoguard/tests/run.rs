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

/// `ocoguard run` on its own database and simulator, started from a config
/// file with the environment over it, with a user and the simulator's
/// account registered through its entry API.
struct Running {
    db: TestDb,
    sim: Sim,
    /// The process's database, opened beside it with the same key.
    store: PgStore,
    http: reqwest::Client,
    /// The entry API's base URL, `http://127.0.0.1:PORT/v1`.
    base: String,
    port: u16,
    metrics_port: u16,
    token: String,
    account: Value,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(name: &str) -> Running {
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
    sim.control()
        .set_price("BTCUSDT", Decimal::from(60_000))
        .unwrap();
    sim.control()
        .set_price("ETHUSDT", Decimal::from(3_000))
        .unwrap();
    // The run command takes the key as text, as the environment gives it.
    let text_key = "11".repeat(32);
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, metrics_port) = (free_port(), free_port());
    // The settings as `ocoguard run` reads them: a file, the environment over it.
    let dir = std::env::temp_dir().join(format!("ocoguard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ocoguard.toml");
    std::fs::write(
        &file,
        format!(
            "id_namespace = \"run\"\n[database]\nurl = \"{}\"\npool_size = 4\n\
             [exchange]\nkind = \"sim\"\nrest_url = \"{}\"\nws_url = \"{}\"\n\
             [gateway]\nid = \"run-test\"\nlease_ttl_secs = 3\nlease_renew_secs = 1\n\
             [sync]\ninterval_secs = 60\nstartup_delay_secs = 60\n",
            db.url(),
            sim.base_url(),
            sim.ws_api_url()
        ),
    )
    .unwrap();
    let (key_env, listen) = (text_key.clone(), format!("127.0.0.1:{port}"));
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let env = move |name: &str| match name {
        "OCO_SECRET_KEY" => Some(key_env.clone()),
        "OCO_API_LISTEN" => Some(listen.clone()),
        "OCO_METRICS_LISTEN" => Some(metrics_listen.clone()),
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
    Running {
        db,
        sim,
        store,
        http,
        base,
        port,
        metrics_port,
        token,
        account,
        stop,
        task,
    }
}

impl Running {
    /// Places an entry of the account through the API; returns its id.
    async fn entry(&self, mut body: Value) -> oco_core::EntryId {
        body["account"] = self.account["id"].clone();
        let reply = self
            .http
            .post(format!("{}/entries", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(reply.status().is_success(), "{:?}", reply.text().await);
        let entry: Value = reply.json().await.unwrap();
        oco_core::EntryId(entry["id"].as_i64().unwrap())
    }

    /// Stops the process as SIGTERM would, and checks it stopped cleanly.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_protects_an_entry_placed_through_its_api() {
    let Running {
        db,
        sim,
        store,
        http,
        base,
        port,
        metrics_port,
        token,
        account,
        stop,
        task,
    } = start("run").await;
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

    // Both endpoints export the same registry; the API protected directly.
    for url in [
        format!("http://127.0.0.1:{metrics_port}/metrics"),
        format!("http://127.0.0.1:{port}/metrics"),
    ] {
        let text = http.get(&url).send().await.unwrap().text().await.unwrap();
        assert_eq!(
            metric(&text, "oco_placements_total{source=\"direct\"}"),
            Some(2.0),
            "{url}: {text}"
        );
        assert_eq!(
            metric(&text, "oco_placements_total{source=\"sync\"}"),
            Some(0.0)
        );
        assert_eq!(
            metric(
                &text,
                "oco_fill_to_protected_seconds_count{source=\"direct\"}"
            ),
            Some(1.0),
            "one first protection measured: {text}"
        );
        assert_eq!(
            metric(
                &text,
                "oco_protect_calls_total{source=\"direct\",outcome=\"placed\"}"
            ),
            Some(1.0)
        );
        assert!(metric(&text, "oco_coverage_ratio").is_some(), "{text}");
        assert_eq!(
            metric(&text, "oco_flag_listener_up{channel=\"oco_reconcile\"}"),
            Some(1.0),
            "sync listens for flags: {text}"
        );
        assert_eq!(
            metric(&text, "oco_entry_listener_up{channel=\"oco_entry\"}"),
            Some(1.0),
            "the gateway reads new entries ahead: {text}"
        );
        for file in ["ops/prometheus/alerts.yml", "ops/grafana/ocoguard.json"] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../").to_owned() + file;
            let body = std::fs::read_to_string(&path).unwrap();
            if file.ends_with(".json") {
                let dashboard: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
                let panels = dashboard["panels"].as_array().unwrap();
                assert!(panels.len() >= 10, "{file}: {} panels", panels.len());
                for p in panels {
                    assert!(
                        p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                        "{file}: panel {} queries nothing",
                        p["title"]
                    );
                }
            }
            let named = metric_names(&body);
            assert!(named.len() >= 5, "{file} names the metrics: {named:?}");
            let exported = exported_names(&text);
            for name in named {
                assert!(
                    exported.contains(&name),
                    "{file} uses {name}, which the process does not export"
                );
            }
        }
        assert!(!text.contains("run-secret") && !text.contains(&token));
    }

    // The gateway inside `run` streams the account (picked up at its next
    // lease renewal) and protects a LIMIT that fills later, from the stream.
    let ctl = sim.control();
    wait(Duration::from_secs(30), "the gateway to subscribe", || {
        ctl.subscription_count() == 1
    })
    .await;
    // A symbol holds at most 5 stops of an account (MAX_NUM_ALGO_ORDERS): the
    // outage entry goes to another symbol than the first two.
    let limit = |symbol: &str, qty: &str, price: &str, tp: &str| {
        http.post(format!("{base}/entries"))
            .bearer_auth(&token)
            .json(
                &json!({"account": account["id"], "symbol": symbol, "type": "LIMIT",
                          "quantity": qty, "price": price, "tp": [tp]}),
            )
            .send()
    };
    let entry_id = |v: &Value| oco_core::EntryId(v["id"].as_i64().unwrap());
    let later: Value = limit("BTCUSDT", "0.01", "59900", "61000")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let later = entry_id(&later);
    ctl.set_price("BTCUSDT", Decimal::from(59_850)).unwrap();
    wait_protected(&store, later, oco_core::Source::Websocket).await;

    // A stream outage while another LIMIT fills: nobody sees it until the
    // stream is back; the gateway then flags the account and sync, inside the
    // same process, protects it (its periodic pass is a minute away).
    ctl.set_refuse_streams(true);
    ctl.drop_streams(None);
    wait(Duration::from_secs(10), "the stream to drop", || {
        ctl.subscription_count() == 0
    })
    .await;
    let outage: Value = limit("ETHUSDT", "0.1", "2990", "3100")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let outage = entry_id(&outage);
    ctl.set_price("ETHUSDT", Decimal::from(2_985)).unwrap();
    ctl.set_refuse_streams(false);
    wait_protected(&store, outage, oco_core::Source::Sync).await;
    assert_eq!(
        ctl.order_lists(Some("run-key")).len(),
        6,
        "two lists for each of the three entries, once"
    );
    // The gateway's flags reach sync through their notification.
    assert_eq!(
        db.listeners(store_pg::RECONCILE_CHANNEL).await.len(),
        1,
        "the process listens for reconcile flags"
    );

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// Retry-After of the refusal in the test below, seconds.
const HOLD_SECS: u64 = 3;

/// The three layers of `run` spend one request budget, as Binance counts it
/// (per IP): a 429 met by one layer's request holds back the requests of the
/// others until its `Retry-After` has passed, instead of letting them go on
/// hitting the limit (repeated 429s get the IP banned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_met_by_one_layer_holds_back_the_others() {
    let run = start("hold").await;
    let ctl = run.sim.control();
    wait(Duration::from_secs(30), "the gateway to subscribe", || {
        ctl.subscription_count() == 1
    })
    .await;
    // A LIMIT that rests; the gateway protects it when it fills.
    let resting = run
        .entry(
            json!({"symbol": "BTCUSDT", "type": "LIMIT", "quantity": "0.01",
                      "price": "59900", "tp": ["61000"]}),
        )
        .await;
    // The next REST request, whoever sends it, is refused: 429, Retry-After.
    let seen = ctl.requests().last().map_or(0, |r| r.seq);
    ctl.throttle_requests(1, HOLD_SECS);
    ctl.set_price("BTCUSDT", Decimal::from(59_850)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let found = ctl
            .requests()
            .into_iter()
            .find(|r| r.seq > seen && r.status == 429);
        if let Some(r) = found {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway sent nothing for the fill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let hold_us = HOLD_SECS * 1_000_000;
    // Meanwhile an entry comes to the API, whose own requests met no
    // refusal: they wait for the hold another layer met.
    let sent_us = now_us();
    assert!(
        sent_us < refused.responded_us + hold_us / 2,
        "the entry is placed during the hold"
    );
    let direct = run
        .entry(
            json!({"symbol": "ETHUSDT", "type": "MARKET", "quantity": "0.1",
                      "tp": ["3100"]}),
        )
        .await;
    // The API's order (no other layer sends one here). Only the API's
    // requests are sure to have left after the refusal: the gateway's other
    // leg went out beside the refused one and may arrive after it.
    let orders: Vec<_> = ctl
        .requests()
        .into_iter()
        .filter(|r| r.received_us > sent_us && r.method == "POST" && r.path == "/api/v3/order")
        .collect();
    let [order] = orders.as_slice() else {
        panic!("the API's order reaches the exchange once: {orders:?}");
    };
    // The client waits from the moment it read the refusal: a little margin
    // for the server-time offset it measured.
    let margin_us = 250_000;
    assert!(
        order.received_us + margin_us >= refused.responded_us + hold_us,
        "the API's order arrived {} ms into a {HOLD_SECS} s hold met by {} {}",
        order.received_us.saturating_sub(refused.responded_us) / 1000,
        refused.method,
        refused.path
    );
    // Both are protected once the hold has passed: the market entry by the
    // API or by the gateway, which hears of its fill while the API waits.
    use oco_core::Source;
    wait_protected_by(&run.store, direct, &[Source::Direct, Source::Websocket]).await;
    wait_protected(&run.store, resting, Source::Websocket).await;
    run.stop().await;
}

fn now_us() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_micros()).unwrap()
}

async fn wait(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `entry` is protected and checks by which layer.
async fn wait_protected(store: &PgStore, entry: oco_core::EntryId, by: oco_core::Source) {
    wait_protected_by(store, entry, &[by]).await;
}

/// Waits until `entry` is protected and checks that one of `layers` did it.
async fn wait_protected_by(store: &PgStore, entry: oco_core::EntryId, layers: &[oco_core::Source]) {
    use oco_core::Store as _;
    use oco_core::model::Protection;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = store.entry(entry).await.unwrap();
        if let Protection::Protected { by: layer, .. } = e.protection {
            assert!(
                layers.contains(&layer),
                "entry {entry} protected by {layer}, not by {layers:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "entry {entry} not protected: {:?} (status {:?})",
            e.protection,
            e.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample named exactly `series` (name and labels) in a
/// Prometheus text answer.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Every `oco_*` metric name mentioned in a rules or dashboard file.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("oco_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The series names a scrape can hold, from its `# TYPE` lines (families with
/// no sample yet included): counters end in `_total`, histograms have
/// `_bucket`, `_sum` and `_count`.
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(decl) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = decl.split(' ');
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}
