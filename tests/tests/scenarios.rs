//! The four scenarios and the race, with every layer its own process:
//! `exchange-sim`, `api serve`, `ws-gateway` and `sync` started from the
//! workspace's binaries on a fresh database of the shared PostgreSQL
//! (`DATABASE_URL`), driven over HTTP from outside.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use e2e::metrics::{samples, scrape};
use e2e::sim::SimList;
use e2e::{ApiClient, LayerSettings, Layers, Proc, SimProc, scratch_dir, wait_for};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use store_pg::testing::TestDb;

const KEY: &str = "alice-key";
const SECRET: &str = "alice-secret";

/// One simulator, one database, the layers' command lines, one user with one account.
struct Fx {
    sim: SimProc,
    layers: Layers,
    client: ApiClient,
    account: i64,
    api: Proc,
    running: Vec<Proc>,
    dir: std::path::PathBuf,
    _db: TestDb,
}

impl Drop for Fx {
    fn drop(&mut self) {
        self.api.kill9();
        self.running.iter_mut().for_each(Proc::kill9);
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Fx {
    async fn new(settings: LayerSettings) -> Fx {
        let dir = scratch_dir("scenario").unwrap();
        let db = TestDb::new().await;
        let sim =
            SimProc::start(&[format!("{KEY}:{SECRET}:USDT=100000,BNB=5")], &[], &dir).unwrap();
        let layers = Layers::new(&dir, db.url(), &sim, settings).unwrap();
        let api = layers.start(layers.api_spec()).unwrap();
        let token = layers.add_user("alice").unwrap();
        let client = ApiClient::new(&layers.api_url(), &token);
        client
            .wait_ready(layers.settings.start_deadline())
            .await
            .unwrap();
        let account = client.create_account(KEY, SECRET).await.unwrap();
        Fx {
            sim,
            layers,
            client,
            account,
            api,
            running: Vec::new(),
            dir,
            _db: db,
        }
    }

    async fn start_gateway(&mut self) {
        let gw = self.layers.start(self.layers.gateway_spec(1)).unwrap();
        self.running.push(gw);
        let admin = self.sim.admin().clone();
        wait_for(
            "the gateway's subscription",
            self.layers.settings.stream_deadline(),
            || {
                let admin = admin.clone();
                async move { (admin.subscriptions().await.ok()? == 1).then_some(()) }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    fn start_sync(&mut self) {
        let sync = self.layers.start(self.layers.sync_spec()).unwrap();
        self.running.push(sync);
    }

    fn logs(&self) -> String {
        std::iter::once(&self.api)
            .chain(&self.running)
            .map(|p| p.log_tail(30))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn entry_body(&self, kind: &str, price: Option<&str>) -> Value {
        let mut body = json!({"account": self.account, "symbol": "BTCUSDT", "type": kind,
                              "quantity": "0.01", "tp": ["60600", "61200"], "sl": "59000"});
        if let Some(p) = price {
            body["price"] = json!(p);
            body["tp"] = json!(["60300", "60900"]);
            body["sl"] = json!("58800");
        }
        body
    }

    async fn post(&self, body: Value) -> (u16, i64, Value) {
        let (status, body) = self.client.post_entry(body).await.unwrap();
        assert!(
            (200..300).contains(&status),
            "{status} {body}\n{}",
            self.logs()
        );
        (status, body["id"].as_i64().unwrap(), body)
    }

    /// Waits, at most `deadline` (what the layer expected to act may take),
    /// until the API shows entry `id` protected; the entry as shown.
    async fn protected(&self, id: i64, deadline: Duration) -> Value {
        let client = self.client.clone();
        wait_for(&format!("entry {id} protected"), deadline, || {
            let client = client.clone();
            async move {
                let e = client.entry(id).await.ok()?;
                (e["protection"]["state"] == "protected").then_some(e)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// The simulator's lists of entry `id`.
    async fn lists_of(&self, id: i64) -> Vec<SimList> {
        let prefix = format!("og-L-{id}-");
        self.sim
            .admin()
            .order_lists(KEY)
            .await
            .unwrap()
            .into_iter()
            .filter(|l| l.list_client_order_id.starts_with(&prefix))
            .collect()
    }

    /// Checks that entry `id` has exactly the two planned legs of
    /// generation 0, executing on the exchange, placed by `by`.
    async fn check_one_set(&self, id: i64, shown: &Value, by: &str) {
        assert_eq!(
            shown["protection"]["by"], by,
            "entry {id} protected by {by}: {shown}"
        );
        let legs = shown["legs"].as_array().unwrap();
        assert_eq!(legs.len(), 2, "two legs in the store: {shown}");
        for leg in legs {
            assert_eq!(leg["generation"], 0, "{shown}");
            assert_eq!(leg["state"], "placed", "{shown}");
        }
        let mut lists: Vec<String> = self
            .lists_of(id)
            .await
            .into_iter()
            .inspect(|l| assert_eq!(l.list_order_status, "EXECUTING", "{l:?}"))
            .map(|l| l.list_client_order_id)
            .collect();
        lists.sort();
        assert_eq!(
            lists,
            vec![format!("og-L-{id}-1-0"), format!("og-L-{id}-2-0")],
            "one set of lists on the exchange"
        );
    }

    /// `oco_protect_calls_total` and `oco_placements_total` of every process
    /// of the stack, scraped from the `/metrics` each announced in its log.
    async fn scrape_metrics(&self) -> anyhow::Result<Scraped> {
        let mut scraped = Scraped::default();
        for p in std::iter::once(&self.api).chain(&self.running) {
            let url = p
                .metrics_url()
                .with_context(|| format!("{} has not logged its metrics address", p.name()))?;
            let text = scrape(&url).await?;
            let calls = scraped.calls.entry(p.name().to_owned()).or_default();
            for sample in samples(&text, "oco_protect_calls_total") {
                let key = (
                    sample.label("source").to_owned(),
                    sample.label("outcome").to_owned(),
                );
                *calls.entry(key).or_default() += sample.value as u64;
            }
            scraped.placements += samples(&text, "oco_placements_total")
                .iter()
                .map(|s| s.value as u64)
                .sum::<u64>();
        }
        Ok(scraped)
    }

    async fn set_price(&self, price: &str) {
        self.sim
            .admin()
            .set_price("BTCUSDT", price.parse::<Decimal>().unwrap())
            .await
            .unwrap();
    }
}

/// What the processes' `/metrics` say about `protect`.
#[derive(Debug, Default)]
struct Scraped {
    /// Per process: (source, outcome) → protect calls.
    calls: BTreeMap<String, BTreeMap<(String, String), u64>>,
    /// Lists acknowledged by the exchange, all processes together.
    placements: u64,
}

impl Scraped {
    /// Protect calls per calling layer, all processes together.
    fn by_source(&self) -> BTreeMap<&str, u64> {
        let mut by = BTreeMap::new();
        for ((source, _), n) in self.calls.values().flatten() {
            *by.entry(source.as_str()).or_default() += n;
        }
        by
    }

    /// The layers that called `protect` at least once.
    fn layers_that_called(&self) -> Vec<&str> {
        self.by_source()
            .into_iter()
            .filter_map(|(source, n)| (n > 0).then_some(source))
            .collect()
    }
}

/// Layer 1 alone: the API's answer is lost, sync is not running, and the
/// gateway protects the MARKET fill from the user-data stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_market_fill_is_protected_through_the_stream() {
    let mut fx = Fx::new(LayerSettings::quick()).await;
    fx.start_gateway().await;
    let admin = fx.sim.admin();
    // The order is applied, then its answer fails; the API's one lookup fails too.
    admin
        .fail_requests(Some("POST"), "/api/v3/order", 1, true)
        .await
        .unwrap();
    admin
        .fail_requests(Some("GET"), "/api/v3/order", 5, false)
        .await
        .unwrap();
    let (status, id, body) = fx.post(fx.entry_body("MARKET", None)).await;
    assert_eq!(status, 202, "outcome unknown to the API: {body}");
    // The API protected nothing; the gateway may already have recorded the
    // fill (or more) by the time the API reads the entry back for its answer.
    assert_ne!(body["protection"]["by"], "direct", "{body}");
    let shown = fx.protected(id, fx.layers.settings.stream_deadline()).await;
    assert_eq!(shown["status"], "filled", "{shown}");
    fx.check_one_set(id, &shown, "websocket").await;
}

/// The API's answer is lost but its lookup finds the fill: the legs it places
/// cover the fill net of the base-asset fee, which the lookup alone does not
/// show (the account holds other BNB, so oversized legs would be accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looked_up_fill_is_protected_net_of_its_fee() {
    let fx = Fx::new(LayerSettings::quick()).await;
    fx.sim
        .admin()
        .fail_requests(Some("POST"), "/api/v3/order", 1, true)
        .await
        .unwrap();
    let body = json!({"account": fx.account, "symbol": "BNBUSDT", "type": "MARKET",
                      "quantity": "0.5", "tp": ["606", "612"], "sl": "590"});
    let (status, id, body) = fx.post(body).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["protection"]["by"], "direct", "{body}");
    let legs: Decimal = body["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["qty"].as_str().unwrap().parse::<Decimal>().unwrap())
        .sum();
    // 0.5 bought, 0.0005 BNB commission: 0.4995 received.
    assert!(
        legs <= "0.4995".parse().unwrap(),
        "legs of entry {id} offer {legs} BNB, more than the 0.4995 received: {body}"
    );
    assert_eq!(fx.lists_of(id).await.len(), 2);
}

/// The stream is down (connections dropped and refused) while a LIMIT
/// fills: sync's pass protects it, and the gateway's return adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_while_the_stream_is_down_is_protected_by_sync() {
    let mut fx = Fx::new(LayerSettings::quick()).await;
    fx.start_gateway().await;
    fx.start_sync();
    let (status, id, body) = fx.post(fx.entry_body("LIMIT", Some("59700"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (201, Some("new")),
        "{body}"
    );
    let admin = fx.sim.admin().clone();
    admin.refuse_streams(true).await.unwrap();
    admin.drop_streams().await.unwrap();
    // Dropped connections are seen at once: no interval applies.
    wait_for("the stream to go down", e2e::MARGIN, || {
        let admin = admin.clone();
        async move { (admin.subscriptions().await.ok()? == 0).then_some(()) }
    })
    .await
    .unwrap();
    fx.set_price("59650").await;
    let shown = fx.protected(id, fx.layers.settings.sync_deadline()).await;
    fx.check_one_set(id, &shown, "sync").await;
    // The stream comes back: its fresh subscription changes nothing.
    admin.refuse_streams(false).await.unwrap();
    wait_for(
        "the stream to come back",
        fx.layers.settings.reopen_deadline(),
        || {
            let admin = admin.clone();
            async move { (admin.subscriptions().await.ok()? == 1).then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fx.logs()));
    let shown = fx.client.entry(id).await.unwrap();
    fx.check_one_set(id, &shown, "sync").await;
}

/// A LIMIT entry rests with no legs, then fills when the price comes down:
/// the gateway protects it from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_entry_filling_late_is_protected_from_the_stream() {
    // No sync: its reconciliation of the gateway's subscription flag could
    // meet the fill and protect it first, which is the race scenario's case.
    let mut fx = Fx::new(LayerSettings::quick()).await;
    fx.start_gateway().await;
    let (status, id, body) = fx.post(fx.entry_body("LIMIT", Some("59700"))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "new", "{body}");
    assert_eq!(body["legs"], json!([]), "no legs before a fill: {body}");
    assert!(fx.lists_of(id).await.is_empty());
    fx.set_price("59690").await;
    let shown = fx.protected(id, fx.layers.settings.stream_deadline()).await;
    assert_eq!(shown["status"], "filled", "{shown}");
    fx.check_one_set(id, &shown, "websocket").await;
}

/// Cold start: entries rest, the API is killed (`kill -9`), they fill while
/// no layer runs; gateway and sync start and protect them, and the
/// restarted API shows them protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_made_while_every_layer_was_down_are_protected_at_start() {
    let mut fx = Fx::new(LayerSettings::quick()).await;
    let mut ids = Vec::new();
    for price in ["59700", "59600"] {
        let (status, id, body) = fx.post(fx.entry_body("LIMIT", Some(price))).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (201, Some("new")),
            "{body}"
        );
        ids.push(id);
    }
    fx.api.kill9();
    fx.set_price("59500").await;
    let filled = fx
        .sim
        .admin()
        .orders(KEY)
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.side == "BUY" && o.status == "FILLED")
        .count();
    assert_eq!(filled, 2, "both entries filled while nothing ran");
    fx.start_sync();
    fx.start_gateway().await;
    fx.api.restart().unwrap();
    fx.client
        .wait_ready(fx.layers.settings.start_deadline())
        .await
        .unwrap();
    for id in ids {
        let shown = fx.protected(id, fx.layers.settings.sync_deadline()).await;
        fx.check_one_set(id, &shown, "sync").await;
    }
}

/// The race: the API (FULL answer), the gateway (stream) and sync (a pass
/// every second) all see the same fills, with OCO answers slowed so that
/// they overlap. Each entry gets exactly one set of legs, and each list
/// client id is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layers_seeing_the_same_fill_place_one_set_of_legs() {
    let mut settings = LayerSettings::quick();
    settings.sync_interval_secs = 1;
    let mut fx = Fx::new(settings).await;
    fx.start_gateway().await;
    fx.start_sync();
    fx.sim
        .admin()
        .delay(300, "/api/v3/orderList")
        .await
        .unwrap();
    // Two entries per symbol: four stops stay within MAX_NUM_ALGO_ORDERS (5).
    let bodies: Vec<Value> = [
        ("BTCUSDT", "0.01", ["60600", "61200"], "59000"),
        ("ETHUSDT", "0.1", ["3030", "3060"], "2950"),
        ("BNBUSDT", "0.5", ["606", "612"], "590"),
    ]
    .into_iter()
    .flat_map(|(symbol, qty, tp, sl)| {
        let body = json!({"account": fx.account, "symbol": symbol, "type": "MARKET",
                          "quantity": qty, "tp": tp, "sl": sl});
        [body.clone(), body]
    })
    .collect();
    let posts = bodies.into_iter().map(|b| fx.post(b));
    let placed = futures_util::future::join_all(posts).await;
    let mut by = BTreeMap::<String, usize>::new();
    let mut raced = Vec::new();
    for (status, id, body) in placed {
        assert_eq!(status, 201, "{body}");
        let s = &fx.layers.settings;
        let shown = fx
            .protected(id, s.stream_deadline().max(s.sync_deadline()))
            .await;
        let source = shown["protection"]["by"].as_str().unwrap().to_owned();
        fx.check_one_set(id, &shown, &source).await;
        *by.entry(source.clone()).or_default() += 1;
        raced.push((id, source));
    }
    let sent = fx
        .sim
        .admin()
        .requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/api/v3/orderList"))
        .collect::<Vec<_>>();
    let mut per_list = BTreeMap::<String, usize>::new();
    for r in &sent {
        for id in r.client_ids.iter().filter(|c| c.starts_with("og-L-")) {
            *per_list.entry(id.clone()).or_default() += 1;
        }
    }
    assert_eq!(per_list.len(), 12, "12 lists sent: {per_list:?}");
    assert!(
        per_list.values().all(|n| *n == 1),
        "a list client id was sent twice: {per_list:?}"
    );
    // It was a race: the processes' own counters show that more than one
    // layer called `protect`. The metric has no entry label; this stack's
    // database holds the raced entries only, so every call was for them.
    // A call still running when the last entry showed protected (the
    // gateway's, answered `in_flight` or `covered`) is counted once it ends.
    let fx_ref = &fx;
    let settled = wait_for(
        "protect calls of two layers and 12 placements in /metrics",
        fx.layers.settings.start_deadline(),
        || async move {
            let s = fx_ref.scrape_metrics().await.ok()?;
            (s.layers_that_called().len() >= 2 && s.placements >= 12).then_some(())
        },
    )
    .await;
    let settled = match settled {
        Ok(()) => "settled".to_owned(),
        Err(e) => e.to_string(),
    };
    let scraped = fx
        .scrape_metrics()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", fx.logs()));
    eprintln!(
        "protect calls by process (source, outcome): {:?}; by layer: {:?}",
        scraped.calls,
        scraped.by_source()
    );
    // Each process counts its own layer only: the counts come from three processes.
    for (process, calls) in &scraped.calls {
        let own = match process.as_str() {
            "api" => "direct",
            "sync" => "sync",
            _ => "websocket",
        };
        for ((source, outcome), n) in calls {
            assert!(
                source == own || *n == 0,
                "{process} counted {n} protect calls ({outcome}) as {source}: {scraped:?}"
            );
        }
    }
    let layers = scraped.layers_that_called();
    assert!(
        layers.len() >= 2,
        "only {layers:?} called protect for the raced entries, no race took place: \
         {:?} ({settled})\n{}",
        scraped.by_source(),
        fx.logs()
    );
    assert_eq!(
        scraped.placements, 12,
        "lists acknowledged, all processes together: one set of two per entry: {scraped:?}"
    );
    // And the exchange still holds exactly one set of legs per entry.
    for (id, source) in &raced {
        let shown = fx.client.entry(*id).await.unwrap();
        fx.check_one_set(*id, &shown, source).await;
    }
    eprintln!("protected by: {by:?}");
}
