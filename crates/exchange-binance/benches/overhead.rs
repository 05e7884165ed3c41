//! Adapter overhead per signed request (build and percent-encode the query,
//! HMAC-sign it, parse the answer), next to the bare HTTP round trip to
//! `exchange-sim` and the adapter's full round trip, in one run.
//!
//! `cargo bench -p exchange-binance --bench overhead`
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use exchange_binance::sign::{Query, rest_signature};
use exchange_binance::wire::{OrderListWire, from_json};
use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ports::Exchange;
use oco_core::{ApiCredentials, Qty};
use rust_decimal_macros::dec;
use secrecy::SecretString;

const KEY: &str = "bench-key";
const SECRET: &str = "bench-secret-NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjIn";

const OCO_ANSWER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/binance/fixtures/oco_orderlist_oco_response.json"
));

fn per_op(total: Duration, n: u32) -> f64 {
    total.as_secs_f64() * 1e6 / f64::from(n)
}

/// The CPU work the adapter adds to one OCO placement: query, signature, URL,
/// answer parsing and mapping.
fn sign_serialise_parse(secret: &SecretString, ts: i64) -> usize {
    let mut q = Query::new();
    for (k, v) in [
        ("symbol", "BTCUSDT"),
        ("side", "SELL"),
        ("quantity", "0.00950000"),
        ("listClientOrderId", "og-L-1042-1-0"),
        ("aboveType", "LIMIT_MAKER"),
        ("abovePrice", "61000.5"),
        ("aboveClientOrderId", "og-T-1042-1-0"),
        ("belowClientOrderId", "og-S-1042-1-0"),
        ("belowStopPrice", "59000"),
        ("belowType", "STOP_LOSS_LIMIT"),
        ("belowPrice", "58900"),
        ("belowTimeInForce", "GTC"),
        ("newOrderRespType", "RESULT"),
        ("recvWindow", "5000"),
    ] {
        q.push(k, v);
    }
    q.push("timestamp", &ts.to_string());
    let sig = rest_signature(secret, q.as_str());
    q.push("signature", &sig);
    let url = format!("http://127.0.0.1:1/api/v3/orderList/oco?{}", q.as_str());
    let list: OrderListWire = from_json(OCO_ANSWER).unwrap();
    let ack = list
        .to_ack("NuMp0nVYnciDiFmVqfpBqK", "44nZvqpemY7sVYgPYbvPih")
        .unwrap();
    url.len() + usize::try_from(ack.list_id).unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let secret = SecretString::from(SECRET);

    // 1. Adapter overhead alone.
    let n_cpu = 20_000;
    for i in 0..1_000 {
        black_box(sign_serialise_parse(&secret, 1_700_000_000_000 + i));
    }
    let t = Instant::now();
    for i in 0..n_cpu {
        black_box(sign_serialise_parse(
            &secret,
            1_700_000_000_000 + i64::from(i),
        ));
    }
    let overhead = per_op(t.elapsed(), n_cpu);

    // 2. Round trips to exchange-sim.
    let sim = Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_account(
        AccountSpec::new(KEY, SECRET, vec![("USDT".into(), dec!(1000000))]),
    ))
    .await
    .unwrap();
    let mut config = BinanceConfig::custom(sim.base_url(), sim.ws_api_url());
    config.pacing.weight_per_minute = u32::MAX;
    let ex = BinanceExchange::new(config).unwrap();
    let creds = ApiCredentials {
        api_key: KEY.into(),
        secret: secret.clone(),
    };
    let order = oco_core::ports::OrderRequest {
        symbol: "BTCUSDT".into(),
        side: oco_core::ports::Side::Buy,
        limit: Some("50000".parse().unwrap()),
        size: oco_core::model::OrderSize::Base(Qty::new(dec!(0.001)).unwrap()),
        client_id: oco_core::ClientOrderId::new("bench-1").unwrap(),
    };
    ex.place_order(&creds, &order).await.unwrap();

    // Bare: one pre-signed GET /api/v3/order, sent again and again with a
    // plain reqwest client (no signing, no parsing beyond reading the body).
    let bare = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let mut q = Query::new();
    q.push("symbol", "BTCUSDT")
        .push("origClientOrderId", "bench-1");
    q.push("recvWindow", "60000");
    let n_rt: u32 = 2_000;
    let mut bare_total = Duration::ZERO;
    let mut adapter_total = Duration::ZERO;
    for round in 0..2 {
        // Re-signed once per batch, so the timestamp stays inside recvWindow.
        let mut signed = q.clone();
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        signed.push("timestamp", &now.to_string());
        let sig = rest_signature(&secret, signed.as_str());
        signed.push("signature", &sig);
        let url = format!("{}/api/v3/order?{}", sim.base_url(), signed.as_str());
        let t = Instant::now();
        for _ in 0..n_rt {
            let body = bare
                .get(&url)
                .header("X-MBX-APIKEY", KEY)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            black_box(body.len());
        }
        let bare_elapsed = t.elapsed();
        let t = Instant::now();
        for _ in 0..n_rt {
            black_box(ex.query_order(&creds, "BTCUSDT", "bench-1").await.unwrap());
        }
        let adapter_elapsed = t.elapsed();
        if round == 1 {
            // Round 0 warms connections and caches.
            bare_total = bare_elapsed;
            adapter_total = adapter_elapsed;
        }
    }
    let bare_rt = per_op(bare_total, n_rt);
    let adapter_rt = per_op(adapter_total, n_rt);

    println!("exchange-binance overhead bench ({n_cpu} CPU iterations, {n_rt} round trips each)");
    println!(
        "  adapter overhead (sign + serialise + parse, OCO placement): {overhead:8.2} µs/request"
    );
    println!("  bare round trip to exchange-sim (pre-signed GET /api/v3/order): {bare_rt:8.2} µs");
    println!(
        "  adapter round trip (query_order: pace, sign, send, parse):     {adapter_rt:8.2} µs"
    );
    println!(
        "  adapter / bare: {:.3}x, difference {:.2} µs",
        adapter_rt / bare_rt,
        adapter_rt - bare_rt
    );
    println!(
        "  budget 50 µs: {}",
        if overhead < 50.0 { "met" } else { "MISSED" }
    );
    sim.shutdown().await;
}
