//! One reconciliation pass over many open entries against `exchange-sim`
//! (real HTTP, the Binance adapter), side by side with a baseline that asks
//! the exchange about each entry and each leg, in the same run.
//!
//! `BENCH_ACCOUNTS` (default 1000) and `BENCH_ENTRIES` per account (default
//! 10; one in ten is a LIMIT still resting) size it. The store is `MemStore`,
//! so that the figures are the exchange-side cost (see BENCH.md).
#![allow(clippy::unwrap_used, missing_docs)] // a bench that cannot unwrap has failed

use std::sync::Arc;
use std::time::{Duration, Instant};

use exchange_binance::{BinanceConfig, BinanceExchange};
use exchange_sim::{AccountSpec, Sim, SimConfig, SimControl};
use futures_util::stream::{self, StreamExt};
use oco_core::ids::IdScheme;
use oco_core::levels::EntryLevels;
use oco_core::mem::MemStore;
use oco_core::model::{
    EntryKind, EntryTags, Evidence, NewEntry, OrderSize, ProtectionConfig, Source,
};
use oco_core::ports::{ApiCredentials, Clock, Exchange, NewAccount, OrderRequest, Side, Store};
use oco_core::protect::Protector;
use oco_core::{AccountId, LegState, Price, ProtectOutcome, ProtectorConfig, Qty, SystemClock};
use rust_decimal_macros::dec;
use secrecy::SecretString;
use sync::{MeteredExchange, Reconciler, SyncConfig, WeightMeter};

const CONCURRENCY: usize = 16;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct World {
    ctl: SimControl,
    _sim: Sim,
    exchange: Arc<BinanceExchange>,
    store: Arc<MemStore>,
    ids: IdScheme,
    accounts: Vec<(AccountId, ApiCredentials)>,
}

async fn setup(n_accounts: usize, per_account: usize) -> World {
    let sim =
        Sim::start(SimConfig::new("127.0.0.1:0".parse().unwrap()).with_request_log_capacity(10))
            .await
            .unwrap();
    let ctl = sim.control();
    ctl.set_price("BTCUSDT", dec!(60000)).unwrap();
    let mut config = BinanceConfig::custom(sim.base_url(), sim.ws_api_url());
    // The sim does not limit; neither does the adapter here, so both sides of
    // the comparison run at full speed and only their weight differs.
    config.pacing.weight_per_minute = u32::MAX / 2;
    config.pacing.orders_per_10s = u32::MAX / 2;
    config.pacing.orders_per_day = u32::MAX / 2;
    let exchange = Arc::new(BinanceExchange::new(config).unwrap());
    let store = Arc::new(MemStore::new());
    let ids = IdScheme::new("og").unwrap();
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(ids.clone()),
    ));
    let mut accounts = Vec::new();
    for i in 0..n_accounts {
        let key = format!("bench{i}");
        ctl.add_account(AccountSpec::new(
            key.clone(),
            "secret",
            vec![("USDT".into(), dec!(1000000))],
        ));
        let creds = ApiCredentials {
            api_key: key.clone(),
            secret: SecretString::from("secret"),
        };
        let account = store
            .create_account(NewAccount {
                owner: key,
                exchange: "binance".into(),
                credentials: creds.clone(),
                protection: ProtectionConfig {
                    split: rust_decimal::Decimal::ONE,
                    ..ProtectionConfig::DEFAULT
                },
            })
            .await
            .unwrap();
        accounts.push((account.id, creds));
    }
    // Binance allows 5 stop orders per symbol and account: spread the
    // entries over three symbols, one leg each (split 1).
    let mut symbols = Vec::new();
    for (name, qty) in [
        ("BTCUSDT", dec!(0.001)),
        ("ETHUSDT", dec!(0.01)),
        ("BNBUSDT", dec!(0.1)),
    ] {
        symbols.push((
            exchange.symbol_rules(name).await.unwrap().symbol,
            Qty::new(qty).unwrap(),
        ));
    }
    // Each entry is sent, and filled ones protected by Layer 3 (the FULL answer).
    stream::iter(accounts.clone())
        .for_each_concurrent(CONCURRENCY, |(account, creds)| {
            let (store, exchange, protector, ids, symbols) = (
                store.clone(),
                exchange.clone(),
                protector.clone(),
                ids.clone(),
                symbols.clone(),
            );
            async move {
                for j in 0..per_account {
                    let limit = (j % 10 == 9).then(|| Price::new(dec!(50000)).unwrap());
                    let kind = limit.map_or(EntryKind::Market, |price| EntryKind::Limit { price });
                    let (symbol, qty) = if limit.is_some() {
                        symbols[0].clone()
                    } else {
                        symbols[j % 3].clone()
                    };
                    let ids2 = ids.clone();
                    let entry = store
                        .create_entry(
                            NewEntry {
                                account,
                                symbol: symbol.clone(),
                                kind,
                                size: OrderSize::Base(qty),
                                levels: EntryLevels::default(),
                                tags: EntryTags::default(),
                                idempotency_key: None,
                            },
                            &move |id| ids2.entry(id).unwrap(),
                            SystemClock.now(),
                        )
                        .await
                        .unwrap();
                    let snap = exchange
                        .place_order(
                            &creds,
                            &OrderRequest {
                                symbol: symbol.name.clone(),
                                side: Side::Buy,
                                limit,
                                size: OrderSize::Base(qty),
                                client_id: entry.client_id.clone(),
                            },
                        )
                        .await
                        .unwrap();
                    let ev = Evidence {
                        order_id: Some(snap.order_id),
                        status: snap.status,
                        executed_qty: snap.executed_qty,
                        cumulative_quote: snap.cumulative_quote,
                        fills: snap.fills.clone(),
                        holding: None,
                        observed_at: SystemClock.now(),
                    };
                    let r = protector
                        .protect(entry.id, Some(&ev), Source::Direct)
                        .await
                        .unwrap();
                    assert!(
                        matches!(
                            r.outcome,
                            ProtectOutcome::Placed { .. } | ProtectOutcome::Nothing(_)
                        ),
                        "{r:?}"
                    );
                }
            }
        })
        .await;
    World {
        ctl,
        _sim: sim,
        exchange,
        store,
        ids,
        accounts,
    }
}

/// The baseline: every open entry's order looked up, and every placed leg's
/// list, one request each.
async fn baseline(w: &World) -> (Duration, u64, usize) {
    let meter = Arc::new(WeightMeter::new(u32::MAX));
    let exchange = Arc::new(MeteredExchange::new(w.exchange.clone(), meter.clone()));
    let started = Instant::now();
    let lists_open = stream::iter(w.accounts.clone())
        .map(|(account, creds)| {
            let (store, exchange) = (w.store.clone(), exchange.clone());
            async move {
                let mut open = 0;
                for entry in store.open_entries(account).await.unwrap() {
                    exchange
                        .query_order(&creds, &entry.symbol.name, entry.client_id.as_str())
                        .await
                        .unwrap();
                    for leg in store.legs(entry.id).await.unwrap() {
                        if matches!(leg.state, LegState::Placed { .. }) {
                            let list = exchange
                                .order_list(&creds, &leg.symbol, leg.ids.list.as_str())
                                .await
                                .unwrap();
                            open += usize::from(list.is_some_and(|l| l.executing));
                        }
                    }
                }
                open
            }
        })
        .buffer_unordered(CONCURRENCY)
        .fold(0, |a, b| async move { a + b })
        .await;
    (started.elapsed(), meter.total(), lists_open)
}

#[tokio::main]
async fn main() {
    let n_accounts = env("BENCH_ACCOUNTS", 1000);
    let per_account = env("BENCH_ENTRIES", 10);
    let t0 = Instant::now();
    let w = setup(n_accounts, per_account).await;
    let mut open_entries = 0;
    for (account, _) in &w.accounts {
        open_entries += w.store.open_entries(*account).await.unwrap().len();
    }
    let open_lists = w
        .ctl
        .order_lists(None)
        .iter()
        .filter(|l| l.list_order_status == "EXECUTING")
        .count();
    println!(
        "setup: {n_accounts} accounts, {open_entries} open entries, {open_lists} open lists in {:.1?}",
        t0.elapsed()
    );

    let mut config = SyncConfig::standard();
    config.concurrency = CONCURRENCY;
    config.weight_budget_per_minute = u32::MAX / 2;
    config.order_budget_per_10s = u32::MAX / 2;
    let sync = Reconciler::wired(
        w.exchange.clone(),
        w.store.clone(),
        Arc::new(SystemClock),
        ProtectorConfig::new(w.ids.clone()),
        config,
    );
    let report = sync.pass().await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    let placed = report.outcomes().get("placed").copied().unwrap_or(0);
    assert_eq!(placed, 0, "nothing was missing");
    let (sync_time, sync_weight) = (report.elapsed, report.weight_used);

    let (base_time, base_weight, base_open) = baseline(&w).await;
    assert_eq!(base_open, open_lists, "the baseline saw every open list");

    println!("| method | wall time | request weight | weight per entry |");
    println!("|---|---|---|---|");
    let per = |w: u64| w as f64 / open_entries.max(1) as f64;
    println!(
        "| sync pass (one open-list read per account) | {:.2?} | {sync_weight} | {:.2} |",
        sync_time,
        per(sync_weight)
    );
    println!(
        "| baseline (one query per entry and per leg) | {:.2?} | {base_weight} | {:.2} |",
        base_time,
        per(base_weight)
    );
    println!(
        "| ratio baseline / sync | {:.1}x | {:.1}x | |",
        base_time.as_secs_f64() / sync_time.as_secs_f64().max(1e-9),
        base_weight as f64 / (sync_weight.max(1)) as f64
    );
    println!(
        "at Binance's 6000 weight/min per IP: sync pass {:.1} min, baseline {:.1} min of the node's whole budget",
        sync_weight as f64 / 6000.0,
        base_weight as f64 / 6000.0
    );
}
