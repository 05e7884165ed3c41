//! [`BinanceUserStream`]: the user-data stream over the WebSocket API
//! (`userDataStream.subscribe.signature`; the listenKey endpoints are
//! retired). One background task per session owns the connection: it
//! answers pings, pings the server itself, detects a silent stall, reconnects
//! before the 24 h limit and on `serverShutdown` / `eventStreamTerminated`,
//! backs off with jitter, and reports every interruption as a gap.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use oco_core::ports::{StreamEvent, UserStream, UserStreamSession};
use oco_core::{ApiCredentials, ExchangeError, Millis};
use rand::Rng;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::config::{BinanceConfig, StreamConfig};
use crate::error::BinanceError;
use crate::rest::{install_crypto_provider, map_ws_error};
use crate::sign::ws_signature;
use crate::wire::{Decoded, WsFrame, decode_event};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Item = Result<StreamEvent, ExchangeError>;

/// Opens user-data streams on Binance's WebSocket API.
#[derive(Debug, Clone)]
pub struct BinanceUserStream {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    url: String,
    recv_window: Duration,
    cfg: StreamConfig,
    /// Server time minus local time, learnt after a `-1021`.
    offset_ms: AtomicI64,
}

impl BinanceUserStream {
    /// Checks the WebSocket API URL.
    ///
    /// # Errors
    /// [`BinanceError::BadUrl`] when it is not a `ws://` or `wss://` URL.
    pub fn new(config: BinanceConfig) -> Result<Self, BinanceError> {
        let url = url::Url::parse(&config.ws_api_url).map_err(|e| BinanceError::BadUrl {
            what: "websocket api",
            url: config.ws_api_url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "ws" | "wss") {
            return Err(BinanceError::BadUrl {
                what: "websocket api",
                url: config.ws_api_url.clone(),
                reason: "scheme must be ws or wss".into(),
            });
        }
        install_crypto_provider();
        Ok(Self {
            shared: Arc::new(Shared {
                url: config.ws_api_url,
                recv_window: config.recv_window,
                cfg: config.stream,
                offset_ms: AtomicI64::new(0),
            }),
        })
    }
}

#[async_trait]
impl UserStream for BinanceUserStream {
    /// Connects and subscribes once before returning, so refused keys come
    /// back here as [`ExchangeError::Auth`]; later failures reconnect inside.
    async fn open(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Box<dyn UserStreamSession>, ExchangeError> {
        let ws = connect_and_subscribe(&self.shared, creds).await?;
        let (tx, rx) = mpsc::channel(self.shared.cfg.buffer.max(1));
        let task = tokio::spawn(run_session(self.shared.clone(), creds.clone(), ws, tx));
        Ok(Box::new(BinanceStreamSession {
            rx,
            task,
            ended: None,
        }))
    }
}

/// One account's stream; dropping it closes the connection.
#[derive(Debug)]
pub struct BinanceStreamSession {
    rx: mpsc::Receiver<Item>,
    task: tokio::task::JoinHandle<()>,
    ended: Option<ExchangeError>,
}

impl Drop for BinanceStreamSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl UserStreamSession for BinanceStreamSession {
    async fn next_event(&mut self) -> Result<StreamEvent, ExchangeError> {
        if let Some(e) = &self.ended {
            return Err(e.clone());
        }
        match self.rx.recv().await {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => {
                self.ended = Some(e.clone());
                Err(e)
            }
            None => {
                let e = ExchangeError::Transient("user-data stream task ended".into());
                self.ended = Some(e.clone());
                Err(e)
            }
        }
    }

    fn ready_event(&mut self) -> Option<Result<StreamEvent, ExchangeError>> {
        if self.ended.is_some() {
            return None;
        }
        match self.rx.try_recv() {
            Ok(Ok(ev)) => Some(Ok(ev)),
            Ok(Err(e)) => {
                self.ended = Some(e.clone());
                Some(Err(e))
            }
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                let e = ExchangeError::Transient("user-data stream task ended".into());
                self.ended = Some(e.clone());
                Some(Err(e))
            }
        }
    }
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The consumer dropped the session.
    ConsumerGone,
    /// Keys refused or revoked: the session ends.
    Fatal(ExchangeError),
    /// Reconnect at once (server asked, or the age limit).
    Planned(&'static str),
    /// Reconnect after a backoff (drop, error, stall).
    Broken(String),
}

async fn run_session(
    shared: Arc<Shared>,
    creds: ApiCredentials,
    first: Ws,
    tx: mpsc::Sender<Item>,
) {
    let cfg = &shared.cfg;
    let mut ws = Some(first);
    // Last moment the stream was known healthy (a frame arrived).
    let mut healthy_at = now_ms();
    let mut backoff = cfg.backoff_initial;
    let mut first_connection = true;
    let mut pending_delay = false;
    loop {
        let conn = match ws.take() {
            Some(c) => c,
            None => {
                if pending_delay {
                    let d = jitter(backoff);
                    debug!(delay = ?d, "user-data stream reconnect backoff");
                    tokio::select! {
                        () = tx.closed() => return,
                        () = sleep(d) => {}
                    }
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
                pending_delay = true;
                let attempt = tokio::select! {
                    () = tx.closed() => return,
                    r = connect_and_subscribe(&shared, &creds) => r,
                };
                match attempt {
                    Ok(c) => c,
                    Err(e @ ExchangeError::Auth(_)) => {
                        warn!(error = %e, "user-data stream refused, ending the session");
                        let _gone = tx.send(Err(e)).await;
                        return;
                    }
                    Err(ExchangeError::RateLimited { retry_after }) => {
                        warn!(?retry_after, "user-data stream rate limited");
                        tokio::select! {
                            () = tx.closed() => return,
                            () = sleep(retry_after) => {}
                        }
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "user-data stream reconnect failed");
                        continue;
                    }
                }
            }
        };
        let subscribed_at = now_ms();
        if tx.send(Ok(StreamEvent::Connected)).await.is_err() {
            return;
        }
        if !first_connection {
            let gap = StreamEvent::Gap {
                from: Millis(healthy_at),
                to: Millis(subscribed_at),
            };
            info!(
                from = healthy_at,
                to = subscribed_at,
                "user-data stream resubscribed after a gap"
            );
            if tx.send(Ok(gap)).await.is_err() {
                return;
            }
        }
        first_connection = false;
        healthy_at = subscribed_at;
        let started = Instant::now();
        let end = run_connection(cfg, conn, &tx, &mut healthy_at).await;
        if started.elapsed() >= cfg.backoff_max {
            // Lived long enough to count as healthy: start the backoff over.
            backoff = cfg.backoff_initial;
        }
        match end {
            End::ConsumerGone => return,
            End::Fatal(e) => {
                warn!(error = %e, "user-data stream revoked, ending the session");
                let _gone = tx.send(Err(e)).await;
                return;
            }
            End::Planned(why) => {
                info!(reason = why, "user-data stream reconnecting");
                pending_delay = false;
            }
            End::Broken(why) => {
                warn!(reason = %why, "user-data stream interrupted, reconnecting");
                pending_delay = true;
            }
        }
    }
}

/// Full jitter in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    let low = ms / 2;
    Duration::from_millis(rand::rng().random_range(low..=ms))
}

async fn run_connection(
    cfg: &StreamConfig,
    ws: Ws,
    tx: &mpsc::Sender<Item>,
    healthy_at: &mut i64,
) -> End {
    let (mut sink, mut stream) = ws.split();
    let opened = Instant::now();
    let age_deadline = opened + cfg.max_connection_age;
    // Liveness. A server that pings (Binance: every 20 s) must keep doing so:
    // our own pings may still be answered by a transport whose event side is
    // stuck. A server that never pings is judged by the pongs to our pings.
    let mut last_server = opened;
    let mut last_pong = opened;
    let mut server_pings = false;
    let mut ping = tokio::time::interval_at(opened + cfg.ping_interval, cfg.ping_interval);
    let end = loop {
        let alive_at = if server_pings {
            last_server
        } else {
            last_server.max(last_pong)
        };
        tokio::select! {
            biased;
            () = tx.closed() => break End::ConsumerGone,
            msg = stream.next() => {
                let msg = match msg {
                    None => break End::Broken("connection closed".into()),
                    Some(Err(e)) => break End::Broken(format!("read failed: {e}")),
                    Some(Ok(m)) => m,
                };
                if let Message::Pong(_) = msg {
                    last_pong = Instant::now();
                    if !server_pings {
                        *healthy_at = now_ms();
                    }
                    continue;
                }
                last_server = Instant::now();
                *healthy_at = now_ms();
                match msg {
                    Message::Text(text) => match handle_text(text.as_str()) {
                        Handled::Event(ev) => {
                            if tx.send(Ok(ev)).await.is_err() {
                                break End::ConsumerGone;
                            }
                        }
                        Handled::Nothing => {}
                        Handled::End(end) => break end,
                    },
                    Message::Ping(payload) => {
                        server_pings = true;
                        if let Err(e) = sink.send(Message::Pong(payload)).await {
                            break End::Broken(format!("pong failed: {e}"));
                        }
                    }
                    Message::Close(frame) => break End::Broken(format!("closed by server: {frame:?}")),
                    Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
                }
            }
            () = sleep_until(alive_at + cfg.stall_timeout) => {
                break End::Broken(format!("stalled: nothing from the server for {:?}", cfg.stall_timeout));
            }
            () = sleep_until(age_deadline) => break End::Planned("connection age limit"),
            _ = ping.tick() => {
                if let Err(e) = sink.send(Message::Ping(Vec::new().into())).await {
                    break End::Broken(format!("ping failed: {e}"));
                }
            }
        }
    };
    // Best effort: tell the server we are leaving.
    let _closing = timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
    end
}

// Short-lived, moved once per frame: boxing would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Handled {
    Event(StreamEvent),
    Nothing,
    End(End),
}

fn handle_text(text: &str) -> Handled {
    let frame: WsFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "unreadable user-data frame ignored");
            return Handled::Nothing;
        }
    };
    if let Some(err) = frame.error {
        let mapped = map_ws_error(err.code, &err.msg);
        return if matches!(mapped, ExchangeError::Auth(_)) || frame.status == Some(401) {
            Handled::End(End::Fatal(ExchangeError::Auth(format!(
                "{} {}",
                err.code, err.msg
            ))))
        } else {
            warn!(code = err.code, msg = %err.msg, "user-data stream error frame");
            Handled::End(End::Broken(format!("error frame {} {}", err.code, err.msg)))
        };
    }
    let Some(event) = frame.event else {
        debug!("user-data response frame ignored");
        return Handled::Nothing;
    };
    match decode_event(event) {
        Ok(Decoded::Event(ev)) => Handled::Event(ev),
        Ok(Decoded::Reconnect(why)) => Handled::End(End::Planned(why)),
        Ok(Decoded::Ignored(kind)) => {
            debug!(kind = %kind, "user-data event ignored");
            Handled::Nothing
        }
        Err(e) => {
            // A known event we cannot read may be a fill: treat it as a gap
            // so the account is reconciled rather than silently skipping it.
            warn!(error = %e, "malformed user-data event, reconnecting to force reconciliation");
            Handled::End(End::Broken(format!("malformed event: {e}")))
        }
    }
}

/// Connects and subscribes within `connect_timeout`.
async fn connect_and_subscribe(
    shared: &Shared,
    creds: &ApiCredentials,
) -> Result<Ws, ExchangeError> {
    match timeout(shared.cfg.connect_timeout, connect_inner(shared, creds)).await {
        Ok(r) => r,
        Err(_) => Err(ExchangeError::Transient(
            "user-data stream connect timed out".into(),
        )),
    }
}

async fn connect_inner(shared: &Shared, creds: &ApiCredentials) -> Result<Ws, ExchangeError> {
    let (mut ws, _) = tokio_tungstenite::connect_async(shared.url.as_str())
        .await
        .map_err(|e| ExchangeError::Transient(format!("websocket connect failed: {e}")))?;
    let mut resynced = false;
    loop {
        let id = format!("sub-{}", rand::rng().random::<u64>());
        let request = subscribe_request(
            &id,
            creds,
            now_ms() + shared.offset_ms.load(Ordering::Relaxed),
            shared.recv_window,
        );
        ws.send(Message::Text(request.into()))
            .await
            .map_err(|e| ExchangeError::Transient(format!("subscribe send failed: {e}")))?;
        let frame = await_response(&mut ws, &id).await?;
        if let Some(err) = frame.error {
            if err.code == -1021 && !resynced {
                resynced = true;
                let server = server_time(&mut ws).await?;
                shared.offset_ms.store(server - now_ms(), Ordering::Relaxed);
                continue;
            }
            if let Some(until) = err.data.as_ref().and_then(|d| d.retry_after) {
                let wait = u64::try_from(until - now_ms()).unwrap_or(0);
                return Err(ExchangeError::RateLimited {
                    retry_after: Duration::from_millis(wait),
                });
            }
            return Err(map_ws_error(err.code, &err.msg));
        }
        debug!(subscription = ?frame.result, "user-data stream subscribed");
        return Ok(ws);
    }
}

/// `userDataStream.subscribe.signature` with an HMAC over the sorted params.
pub(crate) fn subscribe_request(
    id: &str,
    creds: &ApiCredentials,
    timestamp: i64,
    recv_window: Duration,
) -> String {
    let ts = timestamp.to_string();
    let rw = recv_window.as_millis().to_string();
    let signature = ws_signature(
        &creds.secret,
        &[
            ("apiKey", creds.api_key.as_str()),
            ("recvWindow", rw.as_str()),
            ("timestamp", ts.as_str()),
        ],
    );
    json!({
        "id": id,
        "method": "userDataStream.subscribe.signature",
        "params": {
            "apiKey": creds.api_key,
            "recvWindow": u64::try_from(recv_window.as_millis()).unwrap_or(u64::MAX),
            "timestamp": timestamp,
            "signature": signature,
        }
    })
    .to_string()
}

/// Reads until the response to `id`, answering pings on the way.
async fn await_response(ws: &mut Ws, id: &str) -> Result<WsFrame, ExchangeError> {
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| ExchangeError::Transient("closed before the subscribe answer".into()))?
            .map_err(|e| ExchangeError::Transient(format!("read failed: {e}")))?;
        match msg {
            Message::Text(text) => {
                let frame: WsFrame = serde_json::from_str(text.as_str())
                    .map_err(|e| ExchangeError::Transient(format!("unreadable answer: {e}")))?;
                let ours = frame.id.as_ref().and_then(|v| v.as_str()) == Some(id);
                if ours
                    || (frame.id.as_ref().is_none_or(serde_json::Value::is_null)
                        && frame.error.is_some())
                {
                    return Ok(frame);
                }
            }
            Message::Ping(p) => {
                ws.send(Message::Pong(p))
                    .await
                    .map_err(|e| ExchangeError::Transient(format!("pong failed: {e}")))?;
            }
            Message::Close(_) => {
                return Err(ExchangeError::Transient(
                    "closed before the subscribe answer".into(),
                ));
            }
            _ => {}
        }
    }
}

/// WebSocket API `time`, for the clock offset after a `-1021`.
async fn server_time(ws: &mut Ws) -> Result<i64, ExchangeError> {
    let id = format!("time-{}", rand::rng().random::<u64>());
    ws.send(Message::Text(
        json!({"id": id, "method": "time"}).to_string().into(),
    ))
    .await
    .map_err(|e| ExchangeError::Transient(format!("time send failed: {e}")))?;
    let frame = await_response(ws, &id).await?;
    frame
        .result
        .as_ref()
        .and_then(|r| r.get("serverTime"))
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| ExchangeError::Transient("no serverTime in the time answer".into()))
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    #[test]
    fn subscribe_request_is_signed_over_sorted_params() {
        let creds = ApiCredentials {
            api_key: "key".into(),
            secret: SecretString::from(
                "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
            ),
        };
        let text = subscribe_request("1", &creds, 1_747_385_641_636, Duration::from_millis(5000));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["method"], "userDataStream.subscribe.signature");
        assert_eq!(v["params"]["timestamp"], 1_747_385_641_636_i64);
        let expected = crate::sign::hmac_hex(
            b"NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
            b"apiKey=key&recvWindow=5000&timestamp=1747385641636",
        );
        assert_eq!(v["params"]["signature"], expected.as_str());
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn revoked_session_frame_is_fatal() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/binance/fixtures/ws_api_error_-2015_session_revoked.json"
        ));
        assert!(matches!(
            handle_text(text),
            Handled::End(End::Fatal(ExchangeError::Auth(_)))
        ));
    }

    #[test]
    fn shutdown_and_termination_reconnect_at_once() {
        for text in [
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/binance/fixtures/ws_server_shutdown.json"
            )),
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/binance/fixtures/ws_event_stream_terminated.json"
            )),
        ] {
            assert!(matches!(handle_text(text), Handled::End(End::Planned(_))));
        }
    }
}
