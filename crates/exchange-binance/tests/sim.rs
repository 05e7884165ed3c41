//! Every `Exchange` method and the user-data stream against `exchange-sim`
//! over real HTTP and WebSocket, including the fault cases.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use exchange_binance::{BinanceConfig, BinanceExchange, BinanceUserStream};
use exchange_sim::{
    AccountSpec, FaultOutcome, FaultWhen, RateLimits, RequestFault, Sim, SimConfig,
};
use oco_core::model::OrderSize;
use oco_core::ports::{
    CancelOutcome, Exchange, ListCancelOutcome, OcoRequest, OrderRequest, Side, StreamEvent,
    UserStream, UserStreamSession,
};
use oco_core::state::LegSold;
use oco_core::{
    ApiCredentials, ClientOrderId, EntryStatus, ExchangeError, OcoClientIds, Price, Qty,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;

const KEY: &str = "binance-test-key";
const SECRET: &str = "binance-test-secret-0123456789";
const SYMBOL: &str = "BTCUSDT";

fn sim_config() -> SimConfig {
    SimConfig::new("127.0.0.1:0".parse().unwrap())
        .with_faults(true)
        .with_account(AccountSpec::new(
            KEY,
            SECRET,
            vec![("USDT".into(), dec!(100000)), ("BTC".into(), dec!(1))],
        ))
}

fn creds() -> ApiCredentials {
    ApiCredentials {
        api_key: KEY.into(),
        secret: SecretString::from(SECRET),
    }
}

fn adapter_config(sim: &Sim) -> BinanceConfig {
    let mut c = BinanceConfig::custom(sim.base_url(), sim.ws_api_url());
    c.request_timeout = Duration::from_millis(800);
    c.stream.backoff_initial = Duration::from_millis(50);
    c.stream.backoff_max = Duration::from_millis(400);
    c.stream.connect_timeout = Duration::from_secs(2);
    c
}

async fn start() -> (Sim, BinanceExchange) {
    let sim = Sim::start(sim_config()).await.unwrap();
    let ex = BinanceExchange::new(adapter_config(&sim)).unwrap();
    (sim, ex)
}

fn id(s: &str) -> ClientOrderId {
    ClientOrderId::new(s).unwrap()
}

fn p(d: Decimal) -> Price {
    Price::new(d).unwrap()
}

fn q(d: Decimal) -> Qty {
    Qty::new(d).unwrap()
}

fn oco(n: u32, qty: Decimal, tp: Decimal, stop: Decimal, limit: Option<Decimal>) -> OcoRequest {
    OcoRequest {
        symbol: SYMBOL.into(),
        qty: q(qty),
        take_profit: p(tp),
        stop: p(stop),
        stop_limit: limit.map(p),
        ids: OcoClientIds {
            list: id(&format!("t-L-{n}")),
            take_profit: id(&format!("t-T-{n}")),
            stop_loss: id(&format!("t-S-{n}")),
        },
    }
}

fn market_buy(cid: &str, qty: Decimal) -> OrderRequest {
    OrderRequest {
        symbol: SYMBOL.into(),
        side: Side::Buy,
        limit: None,
        size: OrderSize::Base(q(qty)),
        client_id: id(cid),
    }
}

fn count_requests(sim: &Sim, path: &str) -> usize {
    sim.control()
        .requests()
        .iter()
        .filter(|r| r.path == path)
        .count()
}

#[tokio::test]
async fn every_exchange_method_against_the_sim() {
    let (sim, ex) = start().await;
    let c = creds();

    let rules = ex.symbol_rules(SYMBOL).await.unwrap();
    assert_eq!(
        (rules.tick.get(), rules.step.get()),
        (dec!(0.01), dec!(0.00001))
    );
    assert!(rules.trading && rules.oco_allowed);
    assert!(
        !rules.order_types.stop_loss && rules.order_types.stop_loss_limit,
        "BTCUSDT takes no market stop"
    );
    ex.symbol_rules(SYMBOL).await.unwrap();
    assert_eq!(
        count_requests(&sim, "/api/v3/exchangeInfo"),
        1,
        "rules are cached"
    );

    assert_eq!(ex.last_price(SYMBOL).await.unwrap().get(), dec!(60000));
    let usdt = ex
        .balances(&c)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.asset == "USDT")
        .unwrap();
    assert_eq!(usdt.free.get(), dec!(100000));

    // Entry: MARKET BUY, FULL answer with fills.
    let entry = ex
        .place_order(&c, &market_buy("t-E-1", dec!(0.01)))
        .await
        .unwrap();
    assert_eq!(
        (entry.status, entry.executed_qty.get()),
        (EntryStatus::Filled, dec!(0.01))
    );
    assert_eq!(entry.client_id, "t-E-1");
    assert!(!entry.fills.is_empty());
    let queried = ex.query_order(&c, SYMBOL, "t-E-1").await.unwrap();
    assert_eq!(
        (queried.order_id, queried.status),
        (entry.order_id, EntryStatus::Filled)
    );
    let trades = ex.order_trades(&c, SYMBOL, entry.order_id).await.unwrap();
    assert_eq!(
        trades.iter().map(|f| f.qty.get()).sum::<Decimal>(),
        dec!(0.01)
    );

    // Protection: a SELL OCO, legs identified by our ids.
    let ack = ex
        .place_oco(
            &c,
            &oco(1, dec!(0.009), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap();
    assert_ne!(ack.take_profit_order_id, ack.stop_order_id);
    let list = ex.order_list(&c, SYMBOL, "t-L-1").await.unwrap().unwrap();
    assert_eq!(list.list_id, ack.list_id);
    assert!(list.executing);
    assert_eq!(list.take_profit.as_ref().unwrap().client_id, "t-T-1");
    assert_eq!(list.stop_loss.as_ref().unwrap().client_id, "t-S-1");
    assert_eq!(list.stop_loss.unwrap().status, EntryStatus::New);
    let tp = ex.query_order(&c, SYMBOL, "t-T-1").await.unwrap();
    assert_eq!(tp.order_id, ack.take_profit_order_id);
    let open = ex.open_order_lists(&c).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].list_client_id, "t-L-1");

    // A market stop (STOP_LOSS) when there is no stop limit: BTCUSDT refuses it.
    let market_stop = ex
        .place_oco(&c, &oco(2, dec!(0.0005), dec!(61000), dec!(59000), None))
        .await
        .unwrap_err();
    assert!(market_stop.is_stop_type_unsupported(), "{market_stop:?}");
    assert_eq!(
        market_stop,
        ExchangeError::Rejected {
            code: -2010,
            msg: "Stop loss orders are not supported for this symbol.".into()
        }
    );
    assert_eq!(ex.open_order_lists(&c).await.unwrap().len(), 1);

    // Cancels: once, answering that nothing had sold, then not open.
    assert_eq!(
        ex.cancel_order_list(&c, SYMBOL, "t-L-1").await.unwrap(),
        ListCancelOutcome::Canceled(Some(LegSold::default()))
    );
    assert_eq!(
        ex.cancel_order_list(&c, SYMBOL, "t-L-1").await.unwrap(),
        ListCancelOutcome::NotOpen
    );
    let done = ex.order_list(&c, SYMBOL, "t-L-1").await.unwrap().unwrap();
    assert!(!done.executing);
    assert_eq!(done.take_profit.unwrap().status, EntryStatus::Canceled);

    let resting = OrderRequest {
        symbol: SYMBOL.into(),
        side: Side::Buy,
        limit: Some(p(dec!(50000))),
        size: OrderSize::Base(q(dec!(0.001))),
        client_id: id("t-E-2"),
    };
    assert_eq!(
        ex.place_order(&c, &resting).await.unwrap().status,
        EntryStatus::New
    );
    assert_eq!(
        ex.cancel_order(&c, SYMBOL, "t-E-2").await.unwrap(),
        CancelOutcome::Canceled
    );
    assert_eq!(
        ex.cancel_order(&c, SYMBOL, "t-E-2").await.unwrap(),
        CancelOutcome::NotOpen
    );

    // Spending a quote amount.
    let by_quote = OrderRequest {
        size: OrderSize::Quote(dec!(100)),
        ..market_buy("t-E-3", dec!(1))
    };
    let o = ex.place_order(&c, &by_quote).await.unwrap();
    assert!(o.executed_qty.get() > Decimal::ZERO);

    // Absent things.
    assert_eq!(
        ex.query_order(&c, SYMBOL, "nope").await.unwrap_err(),
        ExchangeError::NotFound
    );
    assert_eq!(ex.order_list(&c, SYMBOL, "nope").await.unwrap(), None);

    // Rejections keep Binance's words.
    let late = ex
        .place_oco(
            &c,
            &oco(3, dec!(0.001), dec!(59500), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap_err();
    assert!(late.is_bad_prices(), "{late:?}");
    let too_big = ex
        .place_order(&c, &market_buy("t-E-4", dec!(50)))
        .await
        .unwrap_err();
    assert!(
        too_big.is_insufficient_balance() || matches!(too_big, ExchangeError::Rejected { .. }),
        "{too_big:?}"
    );

    assert!(ex.used_weight() > 0);
    assert!(ex.pacing(KEY).order_count_10s > 0);
}

/// ETHBTC, the simulator's symbol that lists every order type, takes the
/// market stop that BTCUSDT refuses; the rules say which does.
#[tokio::test]
async fn a_market_stop_goes_out_where_the_rules_allow_it() {
    let (sim, ex) = start().await;
    let c = creds();
    let rules = ex.symbol_rules("ETHBTC").await.unwrap();
    assert!(rules.order_types.stop_loss && rules.order_types.stop_loss_limit);
    sim.control().deposit(KEY, "ETH", dec!(1)).unwrap();
    sim.control().set_price("ETHBTC", dec!(0.05)).unwrap();
    let request = OcoRequest {
        symbol: "ETHBTC".into(),
        ..oco(1, dec!(0.5), dec!(0.052), dec!(0.048), None)
    };
    ex.place_oco(&c, &request).await.unwrap();
    let stop = sim
        .control()
        .orders(Some(KEY))
        .into_iter()
        .find(|o| o.client_order_id == "t-S-1")
        .unwrap();
    assert_eq!(stop.order_type, "STOP_LOSS");
}

#[tokio::test]
async fn a_filter_failure_drops_the_cached_rules() {
    let (sim, ex) = start().await;
    let c = creds();
    assert!(
        ex.cached_symbol_rules(SYMBOL).is_none(),
        "nothing is cached before the first read"
    );
    let rules = ex.symbol_rules(SYMBOL).await.unwrap();
    assert_eq!(
        ex.cached_symbol_rules(SYMBOL),
        Some(rules),
        "a read fills the cache that costs no request"
    );
    let off_tick = OrderRequest {
        symbol: SYMBOL.into(),
        side: Side::Buy,
        limit: Some(p(dec!(50000.005))),
        size: OrderSize::Base(q(dec!(0.001))),
        client_id: id("t-E-9"),
    };
    let err = ex.place_order(&c, &off_tick).await.unwrap_err();
    assert!(
        matches!(err, ExchangeError::Rejected { code: -1013, .. }),
        "{err:?}"
    );
    assert!(
        ex.cached_symbol_rules(SYMBOL).is_none(),
        "a filter failure empties the cache"
    );
    ex.symbol_rules(SYMBOL).await.unwrap();
    assert_eq!(
        count_requests(&sim, "/api/v3/exchangeInfo"),
        2,
        "reloaded after -1013"
    );
}

fn fault(path: &str, when: FaultWhen, outcome: FaultOutcome) -> RequestFault {
    RequestFault {
        method: Some("POST".into()),
        path_prefix: path.into(),
        count: 1,
        when,
        outcome,
    }
}

#[tokio::test]
async fn server_error_after_apply_is_unknown_then_resolved_by_client_id() {
    let (sim, ex) = start().await;
    let c = creds();
    ex.place_order(&c, &market_buy("t-E-1", dec!(0.01)))
        .await
        .unwrap();

    sim.control().fail_requests(fault(
        "/api/v3/orderList/oco",
        FaultWhen::After,
        FaultOutcome::Status(503),
    ));
    let err = ex
        .place_oco(
            &c,
            &oco(1, dec!(0.009), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::UnknownOutcome(_)), "{err:?}");
    let found = ex.order_list(&c, SYMBOL, "t-L-1").await.unwrap();
    assert!(found.is_some_and(|l| l.executing), "the list was placed");

    sim.control().fail_requests(fault(
        "/api/v3/orderList/oco",
        FaultWhen::Before,
        FaultOutcome::Status(500),
    ));
    let err = ex
        .place_oco(
            &c,
            &oco(2, dec!(0.0009), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::UnknownOutcome(_)), "{err:?}");
    assert_eq!(
        ex.order_list(&c, SYMBOL, "t-L-2").await.unwrap(),
        None,
        "nothing placed"
    );

    sim.control().fail_requests(fault(
        "/api/v3/order",
        FaultWhen::After,
        FaultOutcome::Status(502),
    ));
    let err = ex
        .place_order(&c, &market_buy("t-E-2", dec!(0.001)))
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::UnknownOutcome(_)), "{err:?}");
    assert_eq!(
        ex.query_order(&c, SYMBOL, "t-E-2").await.unwrap().status,
        EntryStatus::Filled
    );
}

#[tokio::test]
async fn a_timeout_on_a_placement_is_unknown() {
    let (sim, ex) = start().await;
    let c = creds();
    sim.control().fail_requests(fault(
        "/api/v3/order",
        FaultWhen::After,
        FaultOutcome::Hang(Duration::from_secs(3)),
    ));
    let err = ex
        .place_order(&c, &market_buy("t-E-1", dec!(0.001)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExchangeError::UnknownOutcome(ref m) if m.contains("timeout")),
        "{err:?}"
    );
    assert!(
        ex.query_order(&c, SYMBOL, "t-E-1").await.is_ok(),
        "it was applied"
    );
}

/// Asks for the list until it is found with both legs, within 5 s.
async fn list_with_both_legs(
    ex: &BinanceExchange,
    c: &ApiCredentials,
    list: &str,
) -> Option<oco_core::ports::OrderListSnapshot> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = ex.order_list(c, SYMBOL, list).await.unwrap();
        let whole = found
            .as_ref()
            .is_some_and(|l| l.take_profit.is_some() && l.stop_loss.is_some());
        if whole || Instant::now() > deadline {
            return found.filter(|_| whole);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Binance reads `GET orderList` (and, by field reports, `GET order`) from a
/// database that a list placed a moment ago may not have reached, while
/// `GET openOrderList` reads memory first. A list missing from the first is
/// looked for among the open lists: found there it is answered (its legs'
/// states unknown while their lookups lag too), never "no such list", which
/// the caller would take, past its claim timeout, as never placed and place
/// a second set. Once the lag has passed it is found with both legs.
#[tokio::test]
async fn a_list_placed_moments_ago_is_found_among_the_open_lists() {
    let (sim, ex) = start().await;
    let c = creds();
    let lag = Duration::from_millis(500);
    sim.control().set_lookup_lag(lag, Some(KEY));
    ex.place_order(&c, &market_buy("t-E-1", dec!(0.01)))
        .await
        .unwrap();

    // Acknowledged, then looked up at once.
    let placed_at = Instant::now();
    let ack = ex
        .place_oco(
            &c,
            &oco(1, dec!(0.004), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap();
    let found = ex
        .order_list(&c, SYMBOL, "t-L-1")
        .await
        .unwrap()
        .expect("an acknowledged list is found among the open lists");
    assert_eq!(
        (
            found.list_id,
            found.list_client_id.as_str(),
            found.executing
        ),
        (ack.list_id, "t-L-1", true)
    );
    assert_eq!(
        (found.take_profit, found.stop_loss),
        (None, None),
        "its legs' lookups lag too: no leg states rather than a part"
    );
    assert_eq!(
        ex.query_order(&c, SYMBOL, "t-S-1").await.unwrap_err(),
        ExchangeError::NotFound
    );

    // Its answer lost after it was applied: found all the same.
    sim.control().fail_requests(fault(
        "/api/v3/orderList/oco",
        FaultWhen::After,
        FaultOutcome::Status(503),
    ));
    let err = ex
        .place_oco(
            &c,
            &oco(2, dec!(0.004), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::UnknownOutcome(_)), "{err:?}");
    let found = ex.order_list(&c, SYMBOL, "t-L-2").await.unwrap();
    assert!(
        found.is_some_and(|l| l.executing && l.list_client_id == "t-L-2"),
        "a list whose answer was lost is not read as never placed"
    );
    // One never placed is absent from both.
    assert_eq!(ex.order_list(&c, SYMBOL, "t-L-9").await.unwrap(), None);

    for n in 1..=2 {
        let list = list_with_both_legs(&ex, &c, &format!("t-L-{n}"))
            .await
            .unwrap_or_else(|| panic!("t-L-{n} never found with both legs"));
        assert!(list.executing);
        let (tp, sl) = (list.take_profit.unwrap(), list.stop_loss.unwrap());
        assert_eq!(
            (tp.client_id.as_str(), sl.client_id.as_str()),
            (format!("t-T-{n}").as_str(), format!("t-S-{n}").as_str())
        );
    }
    assert!(
        placed_at.elapsed() >= lag,
        "legs read before the lag passed"
    );
    assert_eq!(
        sim.control().order_lists(Some(KEY)).len(),
        2,
        "one list each"
    );
}

#[tokio::test]
async fn a_429_is_waited_out_and_the_request_succeeds() {
    let (sim, ex) = start().await;
    sim.control().throttle_requests(1, 1);
    let t0 = Instant::now();
    assert_eq!(ex.last_price(SYMBOL).await.unwrap().get(), dec!(60000));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "waited Retry-After"
    );

    // A Retry-After beyond the adapter's own patience comes back to the caller.
    sim.control().throttle_requests(1, 60);
    let err = ex.last_price(SYMBOL).await.unwrap_err();
    assert_eq!(
        err,
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(60)
        }
    );
    let err = ex.last_price(SYMBOL).await.unwrap_err();
    assert!(
        matches!(err, ExchangeError::RateLimited { .. }),
        "held back without asking: {err:?}"
    );
}

/// Binance counts unfilled orders per account (`-1015`), request weight per
/// IP: one account over its order count holds back its own placements only,
/// never another account's stops, nor its own reads and cancels.
#[tokio::test]
async fn an_order_count_refusal_holds_back_only_that_account() {
    let (sim, ex) = start().await;
    let a = creds();
    let b = ApiCredentials {
        api_key: "binance-test-key-b".into(),
        secret: SecretString::from("binance-test-secret-b-0123456789"),
    };
    sim.control().add_account(AccountSpec::new(
        b.api_key.clone(),
        "binance-test-secret-b-0123456789",
        vec![("USDT".into(), dec!(100000)), ("BTC".into(), dec!(1))],
    ));
    // Two orders a day: one OCO. The Retry-After of the daily count runs to
    // the next UTC midnight, far past the adapter's own patience.
    sim.control().set_rate_limits(RateLimits {
        orders_per_day: 2,
        ..RateLimits::binance()
    });
    ex.place_oco(
        &a,
        &oco(1, dec!(0.01), dec!(61000), dec!(59000), Some(dec!(58900))),
    )
    .await
    .unwrap();
    assert_eq!(ex.placements_held(&a, 2), None, "nothing refused yet");
    let err = ex
        .place_oco(
            &a,
            &oco(2, dec!(0.01), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::RateLimited { .. }), "{err:?}");
    // Told without a request, so that a replacement cancels nothing it
    // cannot replace.
    let held = ex.placements_held(&a, 1);
    assert!(
        held.is_some_and(|wait| wait > Duration::from_secs(10)),
        "{held:?}"
    );
    assert_eq!(ex.placements_held(&b, 1), None, "another account's go");

    let ack = ex
        .place_oco(
            &b,
            &oco(3, dec!(0.01), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await;
    assert!(ack.is_ok(), "another account is not held back: {ack:?}");

    let sent = count_requests(&sim, "/api/v3/orderList/oco");
    let err = ex
        .place_oco(
            &a,
            &oco(4, dec!(0.01), dec!(61000), dec!(59000), Some(dec!(58900))),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExchangeError::RateLimited { retry_after } if retry_after > Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(
        count_requests(&sim, "/api/v3/orderList/oco"),
        sent,
        "the held placement never left"
    );
    // The held account still reads and cancels.
    let list = ex.order_list(&a, SYMBOL, "t-L-1").await.unwrap();
    assert!(list.is_some_and(|l| l.executing));
    assert!(matches!(
        ex.cancel_order_list(&a, SYMBOL, "t-L-1").await.unwrap(),
        ListCancelOutcome::Canceled(_)
    ));
}

/// An order write leaves within `pacing.max_wait` of the call or not at all:
/// its legs were claimed before it, and a claim without an outcome is taken
/// over after the claim timeout. Waits that each fit the limit but together
/// pass it refuse the order, unsent; a read still waits them out.
#[tokio::test]
async fn an_order_write_is_not_sent_past_its_waiting_limit() {
    let sim = Sim::start(sim_config()).await.unwrap();
    let mut config = adapter_config(&sim);
    config.pacing.max_wait = Duration::from_secs(2);
    let ex = BinanceExchange::new(config).unwrap();
    let c = creds();
    // Two 429s of 1 s each: the second wait would end past 2 s from the call.
    sim.control().throttle_requests(2, 1);
    let t0 = Instant::now();
    let err = ex
        .place_order(&c, &market_buy("t-E-9", dec!(0.01)))
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::RateLimited { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let placed = sim.control().orders(None);
    assert!(placed.is_empty(), "nothing placed: {placed:?}");
    // A read is not bound by it: it waits each 429 out and succeeds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sim.control().throttle_requests(2, 1);
    let t0 = Instant::now();
    assert_eq!(ex.last_price(SYMBOL).await.unwrap().get(), dec!(60000));
    assert!(t0.elapsed() >= Duration::from_millis(1900));
}

/// The bound holds across a -1021 re-sync too: a clock read that takes
/// the rest of the time leaves the order unsent, not signed again and sent
/// late.
#[tokio::test]
async fn an_order_write_is_not_sent_late_after_a_slow_resync() {
    let sim = Sim::start(sim_config()).await.unwrap();
    let mut config = adapter_config(&sim);
    config.pacing.max_wait = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(5);
    let ex = BinanceExchange::new(config).unwrap();
    let c = creds();
    sim.control().force_timestamp_errors(1);
    sim.control()
        .set_response_delay(Duration::from_millis(1200), Some("/api/v3/time".into()));
    let err = ex
        .place_order(&c, &market_buy("t-E-8", dec!(0.01)))
        .await
        .unwrap_err();
    assert!(matches!(err, ExchangeError::RateLimited { .. }), "{err:?}");
    let placed = sim.control().orders(None);
    assert!(placed.is_empty(), "nothing placed: {placed:?}");
    assert_eq!(count_requests(&sim, "/api/v3/time"), 1, "re-synced once");
}

#[tokio::test]
async fn a_1021_resyncs_the_clock_and_succeeds() {
    let (sim, ex) = start().await;
    let c = creds();
    sim.control().force_timestamp_errors(1);
    assert!(!ex.balances(&c).await.unwrap().is_empty());
    assert_eq!(
        count_requests(&sim, "/api/v3/time"),
        1,
        "time re-synced once"
    );

    sim.control().force_timestamp_errors(2);
    let err = ex.balances(&c).await.unwrap_err();
    assert!(
        matches!(err, ExchangeError::Transient(ref m) if m.contains("-1021")),
        "{err:?}"
    );
}

#[tokio::test]
async fn requests_are_paced_before_the_exchange_refuses_them() {
    let sim = Sim::start(sim_config()).await.unwrap();
    let mut config = adapter_config(&sim);
    config.pacing.weight_per_minute = 10;
    config.pacing.max_wait = Duration::ZERO;
    let ex = BinanceExchange::new(config).unwrap();
    let mut refused = None;
    for n in 0..10 {
        match ex.last_price(SYMBOL).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some((n, e));
                break;
            }
        }
    }
    let (n, err) = refused.unwrap();
    assert!(matches!(err, ExchangeError::RateLimited { .. }), "{err:?}");
    assert!(n <= 5, "weight 2 each, budget 10: refused after {n}");
    assert_eq!(
        count_requests(&sim, "/api/v3/ticker/price"),
        n,
        "the refused one never left"
    );
    assert!(ex.used_weight() >= 10 - 1);
}

#[tokio::test]
async fn errors_and_debug_output_hold_no_secret() {
    let mut config = BinanceConfig::custom("http://127.0.0.1:9", "ws://127.0.0.1:9/ws-api/v3");
    config.request_timeout = Duration::from_millis(500);
    let ex = BinanceExchange::new(config).unwrap();
    let c = creds();
    let err = ex.balances(&c).await.unwrap_err();
    let text = format!("{err} {err:?} {ex:?} {c:?}");
    assert!(matches!(err, ExchangeError::Transient(_)), "{err:?}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(!text.contains("signature"), "{text}");
    assert!(!text.contains("timestamp="), "{text}");
}

// ------------------------------------------------------------------ stream

async fn next(session: &mut Box<dyn UserStreamSession>) -> StreamEvent {
    tokio::time::timeout(Duration::from_secs(10), session.next_event())
        .await
        .expect("no stream event within 10 s")
        .unwrap()
}

/// Skips events until one matches.
async fn wait_for(
    session: &mut Box<dyn UserStreamSession>,
    what: &str,
    f: impl Fn(&StreamEvent) -> bool,
) -> StreamEvent {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no {what} within 10 s");
        let ev = next(session).await;
        if f(&ev) {
            return ev;
        }
    }
}

async fn open(sim: &Sim, tweak: impl FnOnce(&mut BinanceConfig)) -> Box<dyn UserStreamSession> {
    let mut config = adapter_config(sim);
    tweak(&mut config);
    let stream = BinanceUserStream::new(config).unwrap();
    let mut session = stream.open(&creds()).await.unwrap();
    assert_eq!(next(&mut session).await, StreamEvent::Connected);
    session
}

async fn assert_reconnects_with_gap(session: &mut Box<dyn UserStreamSession>) {
    wait_for(session, "Connected", |e| *e == StreamEvent::Connected).await;
    match next(session).await {
        StreamEvent::Gap { from, to } => assert!(from <= to, "{from} > {to}"),
        other => panic!("expected a gap, got {other:?}"),
    }
}

#[tokio::test]
async fn open_order_ids_show_a_list_that_lost_its_stop() {
    let (sim, ex) = start().await;
    let c = creds();
    ex.place_order(&c, &market_buy("t-E-1", dec!(0.01)))
        .await
        .unwrap();
    ex.place_oco(
        &c,
        &oco(1, dec!(0.009), dec!(61000), dec!(59000), Some(dec!(58900))),
    )
    .await
    .unwrap();
    let mut ids = ex.open_order_ids(&c, SYMBOL).await.unwrap().unwrap();
    ids.sort();
    assert_eq!(ids, vec!["t-S-1".to_owned(), "t-T-1".to_owned()]);
    // The take-profit fills in part: the stop goes, the list executes on.
    sim.control().partial_fill_next(SYMBOL, dec!(0.4)).unwrap();
    sim.control().set_price(SYMBOL, dec!(61000)).unwrap();
    assert_eq!(
        ex.open_order_ids(&c, SYMBOL).await.unwrap().unwrap(),
        vec!["t-T-1".to_owned()]
    );
    assert_eq!(ex.open_order_lists(&c).await.unwrap().len(), 1);
}

/// A list whose take-profit filled in part keeps executing; canceling it
/// (to replace it) answers what the take-profit had sold, the stop's
/// nothing, as Binance's `orderReports` do.
#[tokio::test]
async fn a_list_canceled_after_a_partial_take_profit_reports_what_it_sold() {
    let (sim, ex) = start().await;
    let c = creds();
    ex.place_order(&c, &market_buy("t-E-1", dec!(0.01)))
        .await
        .unwrap();
    ex.place_oco(
        &c,
        &oco(1, dec!(0.009), dec!(61000), dec!(59000), Some(dec!(58900))),
    )
    .await
    .unwrap();
    sim.control().partial_fill_next(SYMBOL, dec!(0.4)).unwrap();
    sim.control().set_price(SYMBOL, dec!(61000)).unwrap();
    assert_eq!(ex.open_order_lists(&c).await.unwrap().len(), 1);
    let outcome = ex.cancel_order_list(&c, SYMBOL, "t-L-1").await.unwrap();
    let ListCancelOutcome::Canceled(Some(sold)) = outcome else {
        panic!("expected the sale in the answer, got {outcome:?}");
    };
    assert_eq!(
        (
            sold.take_profit.get(),
            sold.take_profit_quote,
            sold.stop_loss.get(),
            sold.stop_loss_quote
        ),
        (dec!(0.0036), dec!(219.6), dec!(0), dec!(0))
    );
    assert_eq!(
        ex.cancel_order_list(&c, SYMBOL, "t-L-1").await.unwrap(),
        ListCancelOutcome::NotOpen
    );
}

#[tokio::test]
async fn stream_delivers_fills_lists_and_balances() {
    let (sim, ex) = start().await;
    let mut s = open(&sim, |_| {}).await;
    ex.place_order(&creds(), &market_buy("t-E-1", dec!(0.01)))
        .await
        .unwrap();
    let fill = wait_for(
        &mut s,
        "a fill",
        |e| matches!(e, StreamEvent::Execution(u) if u.fill.is_some()),
    )
    .await;
    let StreamEvent::Execution(u) = fill else {
        unreachable!()
    };
    assert_eq!((u.client_id.as_str(), u.side), ("t-E-1", Side::Buy));
    assert!(u.fill.unwrap().commission >= Decimal::ZERO);
    wait_for(&mut s, "balances", |e| {
        matches!(e, StreamEvent::Balances(_))
    })
    .await;
    ex.place_oco(
        &creds(),
        &oco(1, dec!(0.009), dec!(61000), dec!(59000), Some(dec!(58900))),
    )
    .await
    .unwrap();
    let list = wait_for(&mut s, "a list", |e| matches!(e, StreamEvent::List(_))).await;
    let StreamEvent::List(l) = list else {
        unreachable!()
    };
    assert_eq!((l.list_client_id.as_str(), l.executing), ("t-L-1", true));
}

#[tokio::test]
async fn stream_drop_reconnects_and_reports_a_gap() {
    let (sim, ex) = start().await;
    let mut s = open(&sim, |_| {}).await;
    assert!(sim.control().drop_streams(Some(KEY)) >= 1);
    assert_reconnects_with_gap(&mut s).await;
    ex.place_order(&creds(), &market_buy("t-E-1", dec!(0.001)))
        .await
        .unwrap();
    wait_for(&mut s, "a fill after the reconnect", |e| {
        matches!(e, StreamEvent::Execution(_))
    })
    .await;
}

#[tokio::test]
async fn stream_stall_is_detected_and_reconnected() {
    let sim = Sim::start(sim_config().with_ping_interval(Duration::from_millis(100)))
        .await
        .unwrap();
    let mut s = open(&sim, |c| {
        c.stream.stall_timeout = Duration::from_millis(700);
        c.stream.ping_interval = Duration::from_millis(200);
    })
    .await;
    // Let the server's pings show that this server pings.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.control().set_streams_stalled(true);
    let t0 = Instant::now();
    // While stalled, new connections stall too: let the adapter notice, then heal.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sim.control().set_streams_stalled(false);
    assert_reconnects_with_gap(&mut s).await;
    assert!(t0.elapsed() >= Duration::from_millis(700));
}

#[tokio::test]
async fn stream_server_shutdown_and_termination_reconnect() {
    let (sim, _ex) = start().await;
    let mut s = open(&sim, |_| {}).await;
    assert!(sim.control().server_shutdown(Some(KEY)) >= 1);
    assert_reconnects_with_gap(&mut s).await;
    assert!(sim.control().terminate_subscriptions(KEY) >= 1);
    assert_reconnects_with_gap(&mut s).await;
}

#[tokio::test]
async fn stream_reconnects_before_the_age_limit() {
    let (sim, _ex) = start().await;
    let mut s = open(&sim, |c| {
        c.stream.max_connection_age = Duration::from_millis(500)
    })
    .await;
    assert_reconnects_with_gap(&mut s).await;
}

#[tokio::test]
async fn stream_retries_while_refused_then_recovers() {
    let (sim, _ex) = start().await;
    let mut s = open(&sim, |_| {}).await;
    sim.control().set_refuse_streams(true);
    sim.control().drop_streams(None);
    tokio::time::sleep(Duration::from_millis(600)).await;
    sim.control().set_refuse_streams(false);
    assert_reconnects_with_gap(&mut s).await;
}

#[tokio::test]
async fn stream_ends_with_auth_when_the_key_is_revoked() {
    let (sim, _ex) = start().await;
    let mut s = open(&sim, |_| {}).await;
    sim.control().revoke_key(KEY);
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = s.next_event().await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(err, ExchangeError::Auth(_)), "{err:?}");
    assert!(
        matches!(s.next_event().await, Err(ExchangeError::Auth(_))),
        "stays ended"
    );
}

#[tokio::test]
async fn stream_open_with_a_wrong_secret_is_auth() {
    let sim = Sim::start(sim_config()).await.unwrap();
    let stream = BinanceUserStream::new(adapter_config(&sim)).unwrap();
    let bad = ApiCredentials {
        api_key: KEY.into(),
        secret: SecretString::from("wrong"),
    };
    let err = stream.open(&bad).await.err().unwrap();
    assert!(matches!(err, ExchangeError::Auth(_)), "{err:?}");
}
