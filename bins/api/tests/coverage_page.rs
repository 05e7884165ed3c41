//! The coverage page in headless Chromium (Debian package `chromium`), served
//! by the binary's wiring over PostgreSQL and `exchange-sim`: entries
//! protected by each layer and one left unprotected; the rendered figures
//! must match the store's. Keeps a screenshot at `target/coverage-page.png`.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::levels::EntryLevels;
use oco_core::model::{EntryKind, EntryTags, Evidence, NewEntry, OrderSize, Source};
use oco_core::ports::{
    ApiCredentials, Clock, Coverage, Exchange, OrderRequest, Side, Store, SystemClock,
};
use oco_core::{AccountId, EntryId, IdScheme, Qty};
use rust_decimal_macros::dec;
use secrecy::SecretString;
use serde_json::{Value, json};
use store_pg::PgStore;
use store_pg::testing::TestDb;
use tokio::net::TcpListener;

const KEY: &str = "page-key";
const SECRET: &str = "page-secret";

fn chromium() -> PathBuf {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!(
        "chromium is not installed: this test renders the coverage page in it. \
         Install it with: apt-get install -y --no-install-recommends chromium \
         (./scripts/test does so when run as root with apt)"
    );
}

/// Runs headless Chromium on `url` with `extra` arguments and a fresh profile.
fn run_chromium(url: &str, extra: &[&str]) -> std::process::Output {
    let profile = std::env::temp_dir().join(format!(
        "ocoguard-chromium-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    // A hung browser must fail the test, not hang the suite.
    let out = Command::new("timeout")
        .args(["--kill-after=5", "120"])
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.display()),
            // Virtual time: the page's 5 s refresh runs twice without waiting 12 s.
            "--virtual-time-budget=12000",
        ])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    out
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The text inside the element with `id` (no nested tags).
fn text_by_id(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let open_end = at + dom[at..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find('<').unwrap();
    dom[open_end..close].trim().to_owned()
}

/// `(entry, age seconds)` of every row of the unprotected table.
fn unprotected_rows(dom: &str) -> Vec<(i64, i64)> {
    let start = dom.find("id=\"unprotected\"").unwrap();
    let end = start + dom[start..].find("</tbody>").unwrap();
    let mut rows = Vec::new();
    for tr in dom[start..end].split("<tr ").skip(1) {
        let attr = |name: &str| -> i64 {
            let at = tr.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            tr[at..at + tr[at..].find('"').unwrap()].parse().unwrap()
        };
        rows.push((attr("data-entry"), attr("data-age-seconds")));
    }
    rows
}

/// Event rows' entry ids, in page order.
fn event_entries(dom: &str) -> Vec<i64> {
    let start = dom.find("id=\"events\"").unwrap();
    let end = start + dom[start..].find("</tbody>").unwrap();
    dom[start..end]
        .split("data-entry=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
        .collect()
}

struct World {
    store: Arc<PgStore>,
    exchange: BinanceExchange,
    protector: Arc<oco_core::Protector>,
    account: AccountId,
    creds: ApiCredentials,
    ids: IdScheme,
}

impl World {
    /// An entry the test places itself, as the API would; its fill is
    /// recorded, and protected by `source` when given.
    async fn filled_entry(&self, symbol: &str, qty: Qty, source: Option<Source>) -> EntryId {
        let rules = self.exchange.symbol_rules(symbol).await.unwrap();
        let ids = self.ids.clone();
        let entry = self
            .store
            .create_entry(
                NewEntry {
                    account: self.account,
                    symbol: rules.symbol,
                    kind: EntryKind::Market,
                    size: OrderSize::Base(qty),
                    levels: EntryLevels::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
                },
                &move |id| ids.entry(id).unwrap(),
                SystemClock.now(),
            )
            .await
            .unwrap();
        let snap = self
            .exchange
            .place_order(
                &self.creds,
                &OrderRequest {
                    symbol: symbol.into(),
                    side: Side::Buy,
                    limit: None,
                    size: OrderSize::Base(qty),
                    client_id: entry.client_id.clone(),
                },
            )
            .await
            .unwrap();
        let evidence = Evidence {
            order_id: Some(snap.order_id),
            status: snap.status,
            executed_qty: snap.executed_qty,
            cumulative_quote: snap.cumulative_quote,
            fills: snap.fills,
            holding: None,
            observed_at: SystemClock.now(),
        };
        match source {
            Some(source) => {
                self.protector
                    .protect(entry.id, Some(&evidence), source)
                    .await
                    .unwrap();
            }
            None => {
                self.store
                    .record_evidence(entry.id, &evidence)
                    .await
                    .unwrap();
            }
        }
        entry.id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coverage_page_shows_the_stores_figures() {
    let chromium = chromium();
    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new(KEY, SECRET, vec![("USDT".into(), dec!(100000))]),
    ))
    .await
    .unwrap();
    sim.control().set_price("BTCUSDT", dec!(60000)).unwrap();
    sim.control().set_price("ETHUSDT", dec!(3000)).unwrap();
    sim.control().set_price("BNBUSDT", dec!(600)).unwrap();
    let db = TestDb::new().await;
    let store = Arc::new(PgStore::connect(db.config(4)).await.unwrap());
    let exchange =
        BinanceExchange::new(BinanceConfig::custom(sim.base_url(), sim.ws_api_url())).unwrap();
    let metrics = telemetry::Metrics::new();
    let state = api_bin::app_state(
        store.clone(),
        api_bin::observed_exchange(exchange.clone(), &metrics),
        Arc::new(SystemClock),
        "og",
    )
    .unwrap();
    let protector = state.protector.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api_bin::serve_observed(
        listener,
        state,
        metrics,
        async move {
            let _ = stopped.await;
        },
    ));
    let token = api_bin::add_user(&*store, "carol").await.unwrap();
    let other = api_bin::add_user(&*store, "dave").await.unwrap();
    let http = reqwest::Client::new();
    let account: Value = http
        .post(format!("{base}/v1/accounts"))
        .bearer_auth(&token)
        .json(&json!({"exchange": "binance", "apiKey": KEY, "apiSecret": SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let account = AccountId(account["id"].as_i64().unwrap());

    // Direct: through the API, filled in its own response.
    let reply = http
        .post(format!("{base}/v1/entries"))
        .bearer_auth(&token)
        .json(&json!({"account": account.0, "symbol": "BTCUSDT", "type": "MARKET", "quantity": "0.01", "tp": ["61000"]}))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "{:?}", reply.text().await);
    let w = World {
        store: store.clone(),
        exchange,
        protector,
        account,
        creds: ApiCredentials {
            api_key: KEY.into(),
            secret: SecretString::from(SECRET),
        },
        ids: IdScheme::new("og").unwrap(),
    };
    // One symbol each: a symbol's stop-order cap would refuse more legs.
    let qty = |q| Qty::new(q).unwrap();
    w.filled_entry("ETHUSDT", qty(dec!(0.1)), Some(Source::Websocket))
        .await;
    w.filled_entry("BNBUSDT", qty(dec!(0.2)), Some(Source::Sync))
        .await;
    let unprotected = w.filled_entry("BTCUSDT", qty(dec!(0.01)), None).await;

    // The truth the page must show.
    let truth = store.coverage(Some("carol"), 100).await.unwrap();
    assert_eq!((truth.filled, truth.protected), (4, 3), "{truth:?}");
    assert_eq!(
        truth.placements,
        vec![
            (Source::Websocket, 2),
            (Source::Sync, 2),
            (Source::Direct, 2)
        ]
    );
    assert_eq!(truth.unprotected.len(), 1);
    assert_eq!(truth.unprotected[0].entry, unprotected);
    let events = store.recent_events("carol", 50).await.unwrap();
    assert!(!events.is_empty());

    let started = SystemClock.now();
    let page = format!("{base}/coverage#token={token}");
    let out = run_chromium(&page, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("id=\"rate\""),
        "{} failed: {}\n{dom}",
        chromium.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let finished = SystemClock.now();
    assert_eq!(text_by_id(&dom, "user"), "— carol");
    assert_eq!(text_by_id(&dom, "rate"), "75.00 %");
    assert_eq!(text_by_id(&dom, "filled"), truth.filled.to_string());
    assert_eq!(text_by_id(&dom, "protected"), truth.protected.to_string());
    assert_eq!(text_by_id(&dom, "unprotected-count"), "1");
    for (source, n) in &truth.placements {
        assert_eq!(
            text_by_id(&dom, &format!("placements-{}", source.name())),
            n.to_string()
        );
    }
    let rows = unprotected_rows(&dom);
    assert_eq!(rows.len(), 1, "{dom}");
    assert_eq!(rows[0].0, unprotected.0);
    // Its age as of the page's load, from the store's first-fill time.
    let filled_at = truth.unprotected[0].filled_at.0;
    let (low, high) = (
        (started.0 - filled_at) / 1000 - 1,
        (finished.0 - filled_at) / 1000 + 1,
    );
    assert!(
        (low..=high).contains(&rows[0].1),
        "age {} s outside {low}..={high}",
        rows[0].1
    );
    let shown = event_entries(&dom);
    assert_eq!(
        shown,
        events.iter().map(|e| e.entry.0).collect::<Vec<_>>(),
        "recent events, newest first, as the store has them"
    );
    let loads: u32 = text_by_id(&dom, "loads").parse().unwrap();
    assert!(loads >= 2, "the page refreshes itself: {loads} loads");
    assert!(
        !dom.contains(&token),
        "the token leaves the URL and the page"
    );

    // Another user sees none of it.
    let theirs: Value = http
        .get(format!("{base}/v1/coverage"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["filled"], 0, "{theirs}");
    assert_eq!(theirs["recentEvents"], json!([]));
    let refused = http
        .get(format!("{base}/v1/coverage"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("coverage-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = run_chromium(
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "no screenshot ({size} bytes): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "coverage page screenshot: {}",
        shot.canonicalize().unwrap().display()
    );
}
