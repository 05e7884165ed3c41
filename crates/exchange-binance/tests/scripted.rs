//! The user-data stream against a scripted WebSocket API server, for the
//! answers `exchange-sim` never gives: requests left unanswered, refusals
//! repeated, rate limits on a skewed clock or met by another connection, a
//! peer that stops reading, connections that drop before answering.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use exchange_binance::{BinanceConfig, BinanceUserStream};
use futures_util::{SinkExt, StreamExt};
use oco_core::ports::{StreamEvent, UserStream, UserStreamSession};
use oco_core::{ApiCredentials, ExchangeError};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Session = Box<dyn UserStreamSession>;

// ------------------------------------------------------------------ scripted server

/// Requests the server has seen, over all its connections.
#[derive(Debug, Default)]
struct Seen {
    connections: AtomicUsize,
    /// When each subscribe arrived.
    subscribes: Mutex<Vec<Instant>>,
}

impl Seen {
    fn subscribes(&self) -> Vec<Instant> {
        self.subscribes.lock().unwrap().clone()
    }
}

/// One accepted connection: `conn` counts them from 0.
struct Peer {
    conn: usize,
    ws: WebSocketStream<TcpStream>,
    seen: Arc<Seen>,
    /// Subscription ids handed out on this connection.
    next_sub: i64,
}

impl Peer {
    /// The next request; `None` once the client is gone. Pings are answered
    /// while reading, as Binance does.
    async fn request(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(text)) => {
                    let v: Value = serde_json::from_str(text.as_str()).unwrap();
                    if v["method"] == "userDataStream.subscribe.signature" {
                        self.seen.subscribes.lock().unwrap().push(Instant::now());
                    }
                    return Some(v);
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn send(&mut self, v: Value) -> bool {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .is_ok()
    }

    /// Answers `request` as Binance does when all is well.
    async fn answer(&mut self, request: &Value) -> bool {
        let result = if request["method"] == "userDataStream.subscribe.signature" {
            self.next_sub += 1;
            json!({"subscriptionId": self.next_sub - 1})
        } else {
            json!({})
        };
        self.send(json!({"id": request["id"], "status": 200, "result": result}))
            .await
    }

    async fn refuse(&mut self, request: &Value, status: u16, error: Value) -> bool {
        self.send(json!({"id": request["id"], "status": status, "error": error}))
            .await
    }

    /// Ends subscription `sub` as Binance does when it drops one alone.
    async fn terminate(&mut self, sub: i64) -> bool {
        self.send(
            json!({"subscriptionId": sub, "event": {"e": "eventStreamTerminated", "E": now_ms()}}),
        )
        .await
    }

    /// Answers every request as all is well, until the client leaves.
    async fn serve(mut self) {
        while let Some(request) = self.request().await {
            if !self.answer(&request).await {
                return;
            }
        }
    }
}

/// Starts a server on `127.0.0.1:0` running `script` on each connection;
/// returns its WebSocket API URL. The listener's receive buffer is as small
/// as the kernel allows, so a peer that stops reading soon pushes back.
async fn scripted<F, Fut>(script: F) -> (String, Arc<Seen>)
where
    F: Fn(Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let url = format!("ws://{}/ws-api/v3", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let conn = counts.connections.fetch_add(1, Ordering::SeqCst);
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            tokio::spawn(script(Peer {
                conn,
                ws,
                seen: counts.clone(),
                next_sub: 0,
            }));
        }
    });
    (url, seen)
}

// ------------------------------------------------------------------ client side

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn config(url: &str) -> BinanceConfig {
    let mut c = BinanceConfig::custom("http://127.0.0.1:1", url);
    c.stream.stall_timeout = Duration::from_secs(1);
    c.stream.ping_interval = Duration::from_millis(300);
    c.stream.connect_timeout = Duration::from_secs(2);
    c.stream.backoff_initial = Duration::from_millis(50);
    c.stream.backoff_max = Duration::from_millis(400);
    c
}

fn creds(i: usize) -> ApiCredentials {
    ApiCredentials {
        api_key: format!("scripted-key-{i}"),
        secret: SecretString::from(format!("scripted-secret-{i}")),
    }
}

async fn open(stream: &BinanceUserStream, i: usize) -> Session {
    let mut s = stream.open(&creds(i)).await.unwrap();
    assert_eq!(s.next_event().await.unwrap(), StreamEvent::Connected);
    s
}

/// The session's next outcome within `limit`; a silent session fails.
async fn within(limit: Duration, s: &mut Session) -> Result<StreamEvent, ExchangeError> {
    match tokio::time::timeout(limit, s.next_event()).await {
        Ok(r) => r,
        Err(_) => panic!("the session stayed silent for {limit:?}: no event, no gap, no error"),
    }
}

/// The session was told of its interruption within `limit`: `Connected`
/// then `Gap`, or its end.
async fn told_within(limit: Duration, s: &mut Session) {
    match within(limit, s).await {
        Err(_) => {}
        Ok(StreamEvent::Connected) => {
            let ev = within(limit, s).await.unwrap();
            assert!(matches!(ev, StreamEvent::Gap { .. }), "{ev:?}");
        }
        Ok(other) => panic!("expected Connected then Gap, got {other:?}"),
    }
}

/// The first connection answers the first subscribe, ends it at once and
/// hands every later request to `resubscribed`; later connections serve.
async fn terminated_then<F, Fut>(resubscribed: F) -> (String, Arc<Seen>)
where
    F: Fn(Peer, Value) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Option<Peer>> + Send + 'static,
{
    scripted(move |mut peer| {
        let resubscribed = resubscribed.clone();
        async move {
            if peer.conn > 0 {
                return peer.serve().await;
            }
            let Some(first) = peer.request().await else {
                return;
            };
            if !peer.answer(&first).await || !peer.terminate(0).await {
                return;
            }
            while let Some(request) = peer.request().await {
                match resubscribed(peer, request).await {
                    Some(p) => peer = p,
                    None => return,
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_unanswered_resubscription_surfaces_as_an_error_or_a_gap() {
    // The connection stays healthy (pongs), the resubscription is never answered.
    let (url, seen) = terminated_then(|peer, _request| async move { Some(peer) }).await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut s = open(&stream, 0).await;
    told_within(Duration::from_secs(6), &mut s).await;
    assert!(seen.subscribes().len() >= 2, "resubscribed");
}

#[tokio::test]
async fn a_retry_after_already_past_by_the_local_clock_does_not_hammer() {
    // The server's clock is 5 s behind ours: its `retryAfter`, 4 s ahead of
    // it, is already past by our clock.
    let (url, seen) = terminated_then(|mut peer, request| async move {
        let server = now_ms() - 5000;
        let error = json!({"code": -1003, "msg": "Too much request weight used",
            "data": {"serverTime": server, "retryAfter": server + 4000}});
        peer.refuse(&request, 429, error).await.then_some(peer)
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let _s = open(&stream, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = seen.subscribes().len();
    assert!(n <= 3, "{n} subscribe requests within 1 s of a 429");
}

#[tokio::test]
async fn a_rate_limited_resubscription_waits_across_a_reconnect() {
    // The 429 asks for 1.5 s, then the connection drops at once.
    let (url, seen) = terminated_then(|mut peer, request| async move {
        let error = json!({"code": -1003, "msg": "Too much request weight used",
            "data": {"serverTime": now_ms(), "retryAfter": now_ms() + 1500}});
        peer.refuse(&request, 429, error).await;
        None
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut s = open(&stream, 0).await;
    told_within(Duration::from_secs(6), &mut s).await;
    let at = seen.subscribes();
    assert_eq!(
        at.len(),
        3,
        "subscribed, refused, resubscribed on the next connection"
    );
    assert!(
        at[2] - at[1] >= Duration::from_millis(1400),
        "resubscribed {:?} after the 429",
        at[2] - at[1]
    );
}

#[tokio::test]
async fn a_resubscription_refused_every_time_ends_the_session() {
    let (url, seen) = terminated_then(|mut peer, request| async move {
        let error = json!({"code": -2035, "msg": "User Data Stream subscription already active."});
        peer.refuse(&request, 400, error).await.then_some(peer)
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut s = open(&stream, 0).await;
    let err = within(Duration::from_secs(3), &mut s).await.unwrap_err();
    assert!(err.to_string().contains("-2035"), "{err:?}");
    assert_eq!(seen.subscribes().len(), 1 + 3, "three tries");
}

#[tokio::test]
async fn a_server_that_never_answers_a_resubscription_ends_the_session() {
    // After the first subscription ends, no connection answers anything.
    let (url, seen) = scripted(|mut peer| async move {
        if peer.conn == 0 {
            let Some(first) = peer.request().await else {
                return;
            };
            if !peer.answer(&first).await || !peer.terminate(0).await {
                return;
            }
        }
        while peer.request().await.is_some() {}
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut s = open(&stream, 0).await;
    // Three deadlines of 2 s, each followed by a reconnect.
    let err = within(Duration::from_secs(10), &mut s).await.unwrap_err();
    assert!(err.to_string().contains("not answered"), "{err:?}");
    assert_eq!(seen.subscribes().len(), 1 + 3, "three tries");
}

#[tokio::test]
async fn a_peer_that_stops_reading_interrupts_its_sessions() {
    // The first connection subscribes two accounts, then floods pings and
    // never reads again: the pongs back up until a send cannot finish.
    let (url, _seen) = scripted(|mut peer| async move {
        if peer.conn > 0 {
            return peer.serve().await;
        }
        for _ in 0..2 {
            let Some(request) = peer.request().await else {
                return;
            };
            if !peer.answer(&request).await {
                return;
            }
        }
        let payload = vec![7_u8; 125];
        while peer
            .ws
            .send(Message::Ping(payload.clone().into()))
            .await
            .is_ok()
        {}
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut sessions = [open(&stream, 0).await, open(&stream, 1).await];
    assert_eq!(stream.connections(), 1);
    for s in &mut sessions {
        told_within(Duration::from_secs(8), s).await;
    }
}

/// Binance names the subscription of every event. An `executionReport`
/// without a `subscriptionId` may be a fill of any account on the
/// connection and cannot be handed to one: the whole connection reconnects
/// and every session on it gets `Connected` then `Gap` (its account goes to
/// reconciliation), rather than the fill being dropped in silence.
#[tokio::test]
async fn an_execution_report_without_a_subscription_gaps_every_session() {
    let report: Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/binance/fixtures/ws_execution_report_new.json"
    )))
    .unwrap();
    // The first connection subscribes two accounts, then sends the report
    // as Binance does (naming subscription 1), then the same without a
    // name; later connections serve.
    let (url, seen) = scripted(move |mut peer| {
        let report = report.clone();
        async move {
            if peer.conn > 0 {
                return peer.serve().await;
            }
            for _ in 0..2 {
                let Some(request) = peer.request().await else {
                    return;
                };
                if !peer.answer(&request).await {
                    return;
                }
            }
            let mut named = report.clone();
            named["subscriptionId"] = json!(1);
            let mut unnamed = report;
            unnamed.as_object_mut().unwrap().remove("subscriptionId");
            if peer.send(named).await && peer.send(unnamed).await {
                peer.serve().await;
            }
        }
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut sessions = [open(&stream, 0).await, open(&stream, 1).await];
    assert_eq!(stream.connections(), 1, "both on one connection");
    // The named report reaches its session alone.
    let ev = within(Duration::from_secs(5), &mut sessions[1])
        .await
        .unwrap();
    assert!(matches!(ev, StreamEvent::Execution(_)), "{ev:?}");
    for (i, s) in sessions.iter_mut().enumerate() {
        let ev = within(Duration::from_secs(5), s).await.unwrap();
        assert_eq!(ev, StreamEvent::Connected, "session {i}");
        let ev = within(Duration::from_secs(5), s).await.unwrap();
        assert!(matches!(ev, StreamEvent::Gap { .. }), "session {i}: {ev:?}");
    }
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        2,
        "the connection was replaced"
    );
    assert_eq!(seen.subscribes().len(), 2 + 2, "both resubscribed");
}

#[test]
fn a_dead_connection_task_does_not_take_later_sessions() {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let server = rt();
    let (url, seen) = server.block_on(scripted(Peer::serve));
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    // The first connection's task dies with the runtime it was spawned on,
    // while its session is still held.
    let first = rt();
    let held = first.block_on(open(&stream, 0));
    drop(first);
    let second = rt();
    second.block_on(async {
        let mut s = tokio::time::timeout(Duration::from_secs(5), stream.open(&creds(1)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.next_event().await.unwrap(), StreamEvent::Connected);
    });
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    drop(held);
}

#[tokio::test]
async fn an_unsubscribe_answered_418_holds_back_every_request() {
    // The ban answers an unsubscribe; the balance event sent after it tells
    // the test that the client has read it.
    let (url, seen) = scripted(|mut peer| async move {
        while let Some(request) = peer.request().await {
            let sent = if request["method"] == "userDataStream.unsubscribe" {
                let error = json!({"code": -1003, "msg": "Way too much request weight used; IP banned",
                    "data": {"serverTime": now_ms(), "retryAfter": now_ms() + 60_000}});
                let balance = json!({"subscriptionId": 0, "event": {"e": "outboundAccountPosition",
                    "E": now_ms(), "u": now_ms(), "B": [{"a": "USDT", "f": "1.00", "l": "0.00"}]}});
                peer.refuse(&request, 418, error).await && peer.send(balance).await
            } else {
                peer.answer(&request).await
            };
            if !sent {
                return;
            }
        }
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut first = open(&stream, 0).await;
    drop(open(&stream, 1).await);
    let ev = within(Duration::from_secs(5), &mut first).await.unwrap();
    assert!(matches!(ev, StreamEvent::Balances(_)), "{ev:?}");
    // The connection has room, but a subscribe sent into the ban would
    // lengthen it: the newcomer is told to wait instead.
    let err = stream.open(&creds(2)).await.err().unwrap();
    assert!(
        matches!(err, ExchangeError::RateLimited { retry_after } if retry_after > Duration::from_secs(50)),
        "{err:?}"
    );
    assert_eq!(seen.subscribes().len(), 2, "no subscribe while banned");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// How a connection after the first goes down before answering anything.
#[derive(Debug, Clone, Copy)]
enum GoesDown {
    /// Reads the resubscription and closes the socket.
    Closes,
    /// Sends a close frame right after the upgrade.
    CloseFrame,
    /// Reads the resubscription and answers with a proxy's error page.
    NotJson,
    /// Reads the resubscription and answers with an error frame of no id.
    ErrorFrame,
}

/// Connection 0 answers the first subscribe and closes; every later
/// connection opens fine and goes down as `how` says, as behind a proxy
/// whose backend is down. Returns the session's end and how long after
/// the first drop it came.
async fn flapping(how: GoesDown) -> (ExchangeError, Duration, usize) {
    let (url, seen) = scripted(move |mut peer| async move {
        if peer.conn > 0
            && let GoesDown::CloseFrame = how
        {
            let _closed = peer.ws.close(None).await;
            return;
        }
        let Some(request) = peer.request().await else {
            return;
        };
        if peer.conn == 0 {
            let _sent = peer.answer(&request).await;
            return;
        }
        match how {
            GoesDown::Closes | GoesDown::CloseFrame => return,
            GoesDown::NotJson => {
                let page = "<html><body>502 Bad Gateway</body></html>";
                let _sent = peer.ws.send(Message::Text(page.into())).await;
            }
            GoesDown::ErrorFrame => {
                let error = json!({"id": null, "status": 502,
                    "error": {"code": -1001, "msg": "Internal error; unable to process your request."}});
                let _sent = peer.send(error).await;
            }
        }
        // Keep reading until the client gives up on the connection.
        while peer.request().await.is_some() {}
    })
    .await;
    let stream = BinanceUserStream::new(config(&url)).unwrap();
    let mut s = open(&stream, 0).await;
    let dropped = Instant::now();
    let ended = within(Duration::from_secs(10), &mut s).await;
    let err = match ended {
        Err(e) => e,
        Ok(ev) => panic!("{how:?}: expected the session's end, got {ev:?}"),
    };
    (
        err,
        dropped.elapsed(),
        seen.connections.load(Ordering::SeqCst),
    )
}

/// Every reconnect opens fine but goes down before the resubscription is
/// answered: the session must not stay silent while the connection flaps,
/// or its account counts as streamed while its fills go unseen.
#[tokio::test]
async fn a_connection_that_keeps_dropping_before_resubscribing_ends_the_session() {
    let (closes, close_frame, not_json, error_frame) = tokio::join!(
        flapping(GoesDown::Closes),
        flapping(GoesDown::CloseFrame),
        flapping(GoesDown::NotJson),
        flapping(GoesDown::ErrorFrame),
    );
    for (how, (err, after, connections)) in [
        (GoesDown::Closes, closes),
        (GoesDown::CloseFrame, close_frame),
        (GoesDown::NotJson, not_json),
        (GoesDown::ErrorFrame, error_frame),
    ] {
        assert!(
            matches!(err, ExchangeError::Transient(ref m) if m.contains("down for")),
            "{how:?}: {err:?}"
        );
        // Three connect timeouts of 2 s, as for a connection that cannot
        // come back at all.
        assert!(
            after >= Duration::from_secs(5) && after < Duration::from_secs(8),
            "{how:?}: ended {after:?} after the drop"
        );
        assert!(connections >= 3, "{how:?}: {connections} connections");
    }
}

/// A resubscription held back by a rate limit another connection met must
/// not wait unseen for the whole hold (a ban's can last hours): held past
/// its deadline, the session is ended with the wait at once.
#[tokio::test]
async fn a_resubscription_held_by_another_connections_rate_limit_ends_the_session() {
    // Connection 0 serves the first session and ends its subscription when
    // told; connection 1 refuses the second session's subscribe with a
    // 429 asking for a minute.
    let terminate = Arc::new(tokio::sync::Notify::new());
    let told = terminate.clone();
    let (url, seen) = scripted(move |mut peer| {
        let told = told.clone();
        async move {
            let Some(first) = peer.request().await else {
                return;
            };
            if peer.conn == 0 {
                if !peer.answer(&first).await {
                    return;
                }
                // Reading answers the client's pings meanwhile.
                tokio::select! {
                    () = told.notified() => {}
                    () = async { while peer.request().await.is_some() {} } => return,
                }
                if !peer.terminate(0).await {
                    return;
                }
            } else {
                let error = json!({"code": -1003, "msg": "Too much request weight used",
                    "data": {"serverTime": now_ms(), "retryAfter": now_ms() + 60_000}});
                if !peer.refuse(&first, 429, error).await {
                    return;
                }
            }
            while peer.request().await.is_some() {}
        }
    })
    .await;
    let mut c = config(&url);
    c.stream.subscriptions_per_connection = 1;
    let stream = BinanceUserStream::new(c).unwrap();
    let mut s = open(&stream, 0).await;
    let err = stream.open(&creds(1)).await.err().unwrap();
    assert!(
        matches!(err, ExchangeError::RateLimited { retry_after } if retry_after > Duration::from_secs(50)),
        "{err:?}"
    );
    terminate.notify_one();
    let terminated = Instant::now();
    let err = within(Duration::from_secs(10), &mut s).await.unwrap_err();
    assert!(
        matches!(err, ExchangeError::RateLimited { retry_after } if retry_after > Duration::from_secs(40)),
        "{err:?}"
    );
    // Three connect timeouts of 2 s at most.
    assert!(
        terminated.elapsed() < Duration::from_secs(7),
        "{:?}",
        terminated.elapsed()
    );
    assert_eq!(
        seen.subscribes().len(),
        2,
        "no subscribe sent into the hold"
    );
}
