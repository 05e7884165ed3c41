//! Sessions multiplexed onto shared user-data connections, against
//! `exchange-sim` over real WebSocket: sharing, isolation of a slow consumer,
//! per-connection and per-subscription interruptions, unsubscribing, and the
//! pacing of connection attempts.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use exchange_binance::{BinanceConfig, BinanceUserStream};
use exchange_sim::{AccountSpec, Sim, SimConfig};
use oco_core::ports::{StreamEvent, UserStream, UserStreamSession};
use oco_core::{ApiCredentials, ExchangeError};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;

type Session = Box<dyn UserStreamSession>;

fn key(i: usize) -> String {
    format!("mux-key-{i}")
}

fn creds(i: usize) -> ApiCredentials {
    ApiCredentials {
        api_key: key(i),
        secret: SecretString::from(format!("mux-secret-{i}")),
    }
}

/// USDT each account starts with.
const START: Decimal = dec!(1000);

async fn sim(accounts: usize) -> Sim {
    let mut config = SimConfig::new("127.0.0.1:0".parse().unwrap()).with_faults(true);
    for i in 0..accounts {
        config = config.with_account(AccountSpec::new(
            key(i),
            format!("mux-secret-{i}"),
            vec![("USDT".into(), START)],
        ));
    }
    Sim::start(config).await.unwrap()
}

fn config(sim: &Sim, tweak: impl FnOnce(&mut BinanceConfig)) -> BinanceConfig {
    let mut c = BinanceConfig::custom(sim.base_url(), sim.ws_api_url());
    c.stream.backoff_initial = Duration::from_millis(50);
    c.stream.backoff_max = Duration::from_millis(400);
    c.stream.connect_timeout = Duration::from_secs(2);
    tweak(&mut c);
    c
}

async fn next(s: &mut Session) -> Result<StreamEvent, ExchangeError> {
    tokio::time::timeout(Duration::from_secs(10), s.next_event())
        .await
        .expect("no stream event within 10 s")
}

async fn open(stream: &BinanceUserStream, i: usize) -> Session {
    let mut s = stream.open(&creds(i)).await.unwrap();
    assert_eq!(next(&mut s).await.unwrap(), StreamEvent::Connected);
    s
}

async fn open_all(stream: &BinanceUserStream, n: usize) -> Vec<Session> {
    futures_util::future::join_all((0..n).map(|i| open(stream, i))).await
}

async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Free USDT of a `Balances` event, if it is one.
fn usdt(ev: &StreamEvent) -> Option<Decimal> {
    match ev {
        StreamEvent::Balances(b) => b.iter().find(|b| b.asset == "USDT").map(|b| b.free.get()),
        _ => None,
    }
}

/// Deposits `amount` USDT to account `i`: its session sees the new balance.
fn deposit(sim: &Sim, i: usize, amount: Decimal) {
    sim.control().deposit(&key(i), "USDT", amount).unwrap();
}

/// Reads `s` until its balance is `expected`; any other balance, or a gap,
/// fails the test.
async fn expect_balance(s: &mut Session, expected: Decimal) {
    loop {
        let ev = next(s).await.unwrap();
        match usdt(&ev) {
            Some(free) if free == expected => return,
            Some(free) => {
                panic!("balance {free} seen, expected {expected}: another account's event")
            }
            None => assert!(
                !matches!(ev, StreamEvent::Gap { .. } | StreamEvent::Connected),
                "unexpected {ev:?} while waiting for balance {expected}"
            ),
        }
    }
}

async fn expect_gap(s: &mut Session) {
    assert_eq!(next(s).await.unwrap(), StreamEvent::Connected);
    match next(s).await.unwrap() {
        StreamEvent::Gap { from, to } => assert!(from <= to, "{from} > {to}"),
        other => panic!("expected a gap, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_connections_and_each_gets_only_its_own_events() {
    const N: usize = 250;
    let sim = sim(N).await;
    let stream = BinanceUserStream::new(config(&sim, |c| {
        c.stream.subscriptions_per_connection = 100;
    }))
    .unwrap();
    let mut sessions = open_all(&stream, N).await;
    let ctl = sim.control();
    assert_eq!(ctl.subscription_count(), N);
    assert_eq!(
        ctl.connection_count(),
        N.div_ceil(100),
        "250 sessions on 3 connections"
    );
    assert_eq!(ctl.stream_attempts().len(), 3, "one attempt per connection");
    assert_eq!(stream.connections(), 3);
    // Each account gets a balance no other account has.
    for i in 0..N {
        deposit(&sim, i, Decimal::from(i + 1));
    }
    for (i, s) in sessions.iter_mut().enumerate() {
        expect_balance(s, START + Decimal::from(i + 1)).await;
    }
    for s in &mut sessions {
        assert!(s.ready_event().is_none(), "no event of another account");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_does_not_hold_up_the_others() {
    let sim = sim(2).await;
    let stream = BinanceUserStream::new(config(&sim, |c| c.stream.buffer = 4)).unwrap();
    let mut stuck = stream.open(&creds(0)).await.unwrap();
    let mut reader = open(&stream, 1).await;
    let ctl = sim.control();
    assert_eq!(ctl.connection_count(), 1, "both on one connection");
    // The stuck session's buffer (4, `Connected` in it) overflows long
    // before the last of these; the other session gets each of its events.
    let mut balance = START;
    for _ in 0..10 {
        deposit(&sim, 0, dec!(1));
        balance += dec!(1);
        deposit(&sim, 1, dec!(1));
        expect_balance(&mut reader, balance).await;
    }
    wait_until(
        "the stuck subscription ended",
        Duration::from_secs(5),
        || ctl.subscription_count() == 1,
    )
    .await;
    assert_eq!(
        ctl.connection_count(),
        1,
        "the connection stays for the other"
    );
    // The stuck session gets what fitted, in order, then the end.
    let mut delivered = Vec::new();
    let err = loop {
        match next(&mut stuck).await {
            Ok(ev) => delivered.push(ev),
            Err(e) => break e,
        }
    };
    assert_eq!(delivered.len(), 4, "{delivered:?}");
    assert_eq!(delivered[0], StreamEvent::Connected);
    assert!(
        matches!(err, ExchangeError::Transient(ref m) if m.contains("behind")),
        "{err:?}"
    );
    assert_eq!(next(&mut stuck).await.unwrap_err(), err, "stays ended");
    // The other keeps flowing.
    deposit(&sim, 1, dec!(5));
    expect_balance(&mut reader, balance + dec!(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_gives_each_of_its_sessions_a_gap() {
    let sim = sim(3).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let mut sessions = open_all(&stream, 3).await;
    let ctl = sim.control();
    assert_eq!(ctl.connection_count(), 1);
    assert_eq!(ctl.drop_streams(None), 1);
    for s in &mut sessions {
        expect_gap(s).await;
    }
    assert_eq!(ctl.subscription_count(), 3);
    assert_eq!(ctl.connection_count(), 1, "all moved together");
    for i in 0..3 {
        deposit(&sim, i, dec!(7));
    }
    for s in &mut sessions {
        expect_balance(s, START + dec!(7)).await;
    }
}

/// A connection that cannot come back (every handshake refused) ends its
/// sessions after three connect timeouts, instead of leaving them silent,
/// with neither events nor a gap, for as long as the outage lasts: the
/// consumer then knows its account is not streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stays_down_ends_its_sessions() {
    let sim = sim(2).await;
    let stream = BinanceUserStream::new(config(&sim, |c| {
        c.stream.connect_timeout = Duration::from_millis(500);
    }))
    .unwrap();
    let mut sessions = open_all(&stream, 2).await;
    let ctl = sim.control();
    ctl.set_refuse_streams(true);
    let dropped = Instant::now();
    assert_eq!(ctl.drop_streams(None), 1);
    for s in &mut sessions {
        let ended = next(s).await;
        assert!(
            matches!(ended, Err(ExchangeError::Transient(ref m)) if m.contains("down for")),
            "{ended:?}"
        );
    }
    let waited = dropped.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "ended after {waited:?} (three connect timeouts: 1.5 s)"
    );
    // Back up: a new session opens as usual.
    ctl.set_refuse_streams(false);
    let _again = open(&stream, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_moves_every_subscription_of_the_connection() {
    let sim = sim(3).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let mut sessions = open_all(&stream, 3).await;
    let ctl = sim.control();
    assert_eq!(ctl.server_shutdown(None), 1);
    for s in &mut sessions {
        expect_gap(s).await;
    }
    assert_eq!(
        ctl.stream_attempts().len(),
        2,
        "one reconnect for all three"
    );
    for i in 0..3 {
        deposit(&sim, i, dec!(3));
    }
    for s in &mut sessions {
        expect_balance(s, START + dec!(3)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_subscription_is_resubscribed_alone() {
    let sim = sim(2).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let mut sessions = open_all(&stream, 2).await;
    let ctl = sim.control();
    assert_eq!(ctl.terminate_subscriptions(&key(0)), 1);
    expect_gap(&mut sessions[0]).await;
    assert_eq!(ctl.subscription_count(), 2);
    assert_eq!(ctl.connection_count(), 1);
    assert_eq!(ctl.stream_attempts().len(), 1, "no reconnect");
    // The other session saw nothing of it: its next event is its own balance.
    deposit(&sim, 1, dec!(2));
    expect_balance(&mut sessions[1], START + dec!(2)).await;
    deposit(&sim, 0, dec!(4));
    expect_balance(&mut sessions[0], START + dec!(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_session_unsubscribes_it_and_keeps_the_connection() {
    let sim = sim(2).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let mut sessions = open_all(&stream, 2).await;
    let ctl = sim.control();
    let mut other = sessions.pop().unwrap();
    drop(sessions);
    wait_until(
        "the dropped session unsubscribed",
        Duration::from_secs(5),
        || ctl.subscription_count() == 1,
    )
    .await;
    assert_eq!(
        ctl.connection_count(),
        1,
        "the connection stays for the other"
    );
    deposit(&sim, 1, dec!(1));
    expect_balance(&mut other, START + dec!(1)).await;
    assert!(
        other.ready_event().is_none(),
        "no gap for the one that stayed"
    );
    // The account comes back on the same connection.
    let mut again = open(&stream, 0).await;
    assert_eq!(ctl.connection_count(), 1);
    deposit(&sim, 0, dec!(1));
    expect_balance(&mut again, START + dec!(1)).await;
    drop(again);
    drop(other);
    wait_until(
        "the last session closed the connection",
        Duration::from_secs(5),
        || ctl.connection_count() == 0 && ctl.subscription_count() == 0,
    )
    .await;
    assert_eq!(stream.connections(), 0);
}

/// µs between consecutive attempts `limit` apart: at most `limit` in any window.
fn assert_within_limit(attempts: &[u64], limit: usize, window: Duration) {
    // The sim's clock sees each attempt a little after it was paced.
    let slack = 100_000;
    let window_us = u64::try_from(window.as_micros()).unwrap();
    for w in attempts.windows(limit + 1) {
        assert!(
            w[limit] - w[0] + slack >= window_us,
            "{} attempts within {} ms",
            limit + 1,
            (w[limit] - w[0]) / 1000
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_attempts_are_paced_across_first_opens() {
    let sim = sim(6).await;
    let window = Duration::from_secs(2);
    let stream = BinanceUserStream::new(config(&sim, |c| {
        c.stream.subscriptions_per_connection = 1;
        c.stream.connect_attempts = 3;
        c.stream.connect_window = window;
        c.stream.connect_burst = 3;
        c.stream.connect_timeout = Duration::from_secs(3);
    }))
    .unwrap();
    let t0 = Instant::now();
    let sessions = open_all(&stream, 6).await;
    let ctl = sim.control();
    assert_eq!(ctl.connection_count(), 6);
    let attempts = ctl.stream_attempts();
    assert_eq!(attempts.len(), 6);
    assert_within_limit(&attempts, 3, window);
    assert!(
        t0.elapsed() >= window - Duration::from_millis(100),
        "the last three waited"
    );
    drop(sessions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_beyond_the_pace_is_rate_limited_without_an_attempt() {
    let sim = sim(3).await;
    let stream = BinanceUserStream::new(config(&sim, |c| {
        c.stream.subscriptions_per_connection = 1;
        c.stream.connect_attempts = 2;
        c.stream.connect_window = Duration::from_secs(30);
        c.stream.connect_burst = 2;
    }))
    .unwrap();
    let _sessions = open_all(&stream, 2).await;
    let err = stream.open(&creds(2)).await.err().unwrap();
    assert!(
        matches!(err, ExchangeError::RateLimited { retry_after } if retry_after > Duration::from_secs(20)),
        "{err:?}"
    );
    assert_eq!(sim.control().stream_attempts().len(), 2, "no third attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_refused_with_429_holds_back_every_attempt() {
    let sim = sim(2).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let ctl = sim.control();
    // First open: refused, with the server's Retry-After.
    ctl.throttle_streams(1, 3);
    let err = stream.open(&creds(0)).await.err().unwrap();
    assert_eq!(
        err,
        ExchangeError::RateLimited {
            retry_after: Duration::from_secs(3)
        }
    );
    // Opens meanwhile are answered without a connection attempt.
    let held = loop {
        match stream.open(&creds(1)).await {
            Err(ExchangeError::RateLimited { .. }) => {
                assert_eq!(ctl.stream_attempts().len(), 1, "no attempt while held");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
            Ok(s) => break s,
        }
    };
    let attempts = ctl.stream_attempts();
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts[1] - attempts[0] >= 2_900_000,
        "next attempt {} ms after the 429",
        (attempts[1] - attempts[0]) / 1000
    );
    drop(held);
    wait_until("the connection closed", Duration::from_secs(5), || {
        ctl.connection_count() == 0
    })
    .await;

    // A reconnect refused the same way waits too, then resubscribes.
    let mut s = open(&stream, 0).await;
    let before = ctl.stream_attempts().len();
    ctl.throttle_streams(1, 2);
    assert_eq!(ctl.drop_streams(None), 1);
    expect_gap(&mut s).await;
    let attempts = ctl.stream_attempts();
    assert_eq!(
        attempts.len(),
        before + 2,
        "one refused, one after Retry-After"
    );
    let (refused, next) = (attempts[before], attempts[before + 1]);
    assert!(
        next - refused >= 1_900_000,
        "reconnected {} ms after the 429",
        (next - refused) / 1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_near_its_last_subscription_id_takes_no_new_sessions() {
    let sim = sim(3).await;
    let ctl = sim.control();
    // Ids 59,998 and 59,999: the connection has then handed out 60,000.
    ctl.set_first_subscription_id(59_998);
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let mut first = open_all(&stream, 2).await;
    assert_eq!(ctl.connection_count(), 1);
    ctl.set_first_subscription_id(0);
    let _third = open(&stream, 2).await;
    assert_eq!(
        ctl.connection_count(),
        2,
        "the third went to a new connection"
    );
    // The retired connection keeps resubscribing its own.
    assert_eq!(ctl.terminate_subscriptions(&key(0)), 1);
    expect_gap(&mut first[0]).await;
    assert_eq!(ctl.connection_count(), 2);
    deposit(&sim, 1, dec!(1));
    expect_balance(&mut first[1], START + dec!(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_out_of_subscription_ids_is_renewed() {
    let sim = sim(1).await;
    let ctl = sim.control();
    // The last id a connection may hand out: resubscribing needs another.
    ctl.set_first_subscription_id(65_535);
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let mut s = open(&stream, 0).await;
    assert_eq!(ctl.terminate_subscriptions(&key(0)), 1);
    expect_gap(&mut s).await;
    assert_eq!(ctl.stream_attempts().len(), 2, "a fresh connection");
    deposit(&sim, 0, dec!(1));
    expect_balance(&mut s, START + dec!(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_and_errors_hold_no_secret() {
    let sim = sim(1).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let _session = open(&stream, 0).await;
    let bad = ApiCredentials {
        api_key: key(0),
        secret: SecretString::from("wrong-secret-0123"),
    };
    let err = stream.open(&bad).await.err().unwrap();
    assert!(matches!(err, ExchangeError::Auth(_)), "{err:?}");
    let text = format!("{stream:?} {err} {err:?}");
    assert!(text.contains(&key(0)), "the pool is in the output: {text}");
    for secret in ["mux-secret-0", "wrong-secret-0123", "signature"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_joining_a_held_connection_is_rate_limited() {
    let sim = sim(2).await;
    let stream = BinanceUserStream::new(config(&sim, |_| {})).unwrap();
    let ctl = sim.control();
    let _s = open(&stream, 0).await;
    ctl.throttle_streams(1, 30);
    assert_eq!(ctl.drop_streams(None), 1);
    wait_until("the refused reconnect", Duration::from_secs(5), || {
        ctl.stream_attempts().len() == 2
    })
    .await;
    // The connection has room but waits out the Retry-After: the newcomer
    // is told so within about half a connect timeout (1 s here).
    let t0 = Instant::now();
    let err = stream.open(&creds(1)).await.err().unwrap();
    assert!(
        matches!(err, ExchangeError::RateLimited { retry_after } if retry_after > Duration::from_secs(20)),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(ctl.stream_attempts().len(), 2, "no attempt while held");
    assert_eq!(stream.connections(), 1);
}
