//! WebSocket API at `/ws-api/v3`: request/response envelope, user-data subscriptions,
//! server pings, connection age limit and the stream faults.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::control::RequestRecord;
use crate::engine::{ConnMsg, Subscriber};
use crate::error::ApiError;
use crate::params::{parse_decimal, parse_u64};
use crate::state::{ConnHandle, STREAM_ATTEMPTS_KEPT, Shared, lock};
use crate::util::{now_ms, now_us, verify_hmac};

/// Upgrades `/ws-api/v3` unless the refuse-streams or throttle-streams fault is on.
pub(crate) async fn upgrade(
    State(sh): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    {
        let mut attempts = lock(&sh.stream_attempts);
        if attempts.len() >= STREAM_ATTEMPTS_KEPT {
            attempts.pop_front();
        }
        attempts.push_back(now_us());
    }
    if sh.faults.refuse_streams.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "").into_response();
    }
    if let Some(secs) = sh.faults.take_stream_throttle() {
        let e = ApiError::new(
            429,
            -1003,
            "Too many requests; current limit of connections is 300 per 5 MINUTE.",
        );
        let mut resp = (StatusCode::TOO_MANY_REQUESTS, e.body()).into_response();
        if let Ok(v) = secs.to_string().parse() {
            resp.headers_mut().insert("retry-after", v);
        }
        return resp;
    }
    if let Err(e) = sh.limiter.request(peer.ip(), 2, now_ms()) {
        let mut resp = (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            e.body(),
        )
            .into_response();
        if let Some(s) = e.retry_after
            && let Ok(v) = s.to_string().parse()
        {
            resp.headers_mut().insert("retry-after", v);
        }
        return resp;
    }
    // Small buffers keep 10,000 idle connections cheap.
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| connection(sh, socket, peer))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WsRateLimit {
    rate_limit_type: &'static str,
    interval: &'static str,
    interval_num: u32,
    limit: u32,
    count: u32,
}

#[derive(Serialize)]
struct WsError {
    code: i64,
    msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

#[derive(Serialize)]
struct WsResponse<'a> {
    id: &'a Value,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<WsError>,
    #[serde(rename = "rateLimits", skip_serializing_if = "Option::is_none")]
    rate_limits: Option<Vec<WsRateLimit>>,
}

struct Sub {
    id: u64,
    api_key: String,
    via_logon: bool,
}

struct Session {
    conn_id: u64,
    peer: SocketAddr,
    tx: mpsc::UnboundedSender<ConnMsg>,
    connected_ms: u64,
    logon: Option<(String, u64)>,
    subs: Vec<Sub>,
    next_sub: u64,
}

fn terminated(sub_id: u64) -> String {
    format!(
        "{{\"subscriptionId\":{sub_id},\"event\":{{\"e\":\"eventStreamTerminated\",\"E\":{}}}}}",
        now_ms()
    )
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Session {
    /// Verifies a signed WebSocket API request; returns its API key.
    fn verify(
        &self,
        sh: &Shared,
        params: &serde_json::Map<String, Value>,
    ) -> Result<String, ApiError> {
        let key = params
            .get("apiKey")
            .map(value_text)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::mandatory("apiKey"))?;
        let secret = {
            let eng = sh.engine();
            match eng.accounts.get(&key) {
                Some(a) if !a.revoked => a.secret.clone(),
                _ => return Err(ApiError::bad_key()),
            }
        };
        let ts = params
            .get("timestamp")
            .map(value_text)
            .ok_or_else(|| ApiError::mandatory("timestamp"))?;
        let mut ts = parse_u64("timestamp", &ts)?;
        if ts > 100_000_000_000_000 {
            ts /= 1000;
        }
        let recv = match params.get("recvWindow") {
            Some(v) => parse_decimal("recvWindow", &value_text(v))?,
            None => Decimal::from(5000),
        };
        let sig = params
            .get("signature")
            .map(value_text)
            .ok_or_else(|| ApiError::mandatory("signature"))?;
        let mut names: Vec<&String> = params.keys().filter(|k| *k != "signature").collect();
        names.sort();
        let raw: Vec<String> = names
            .iter()
            .map(|k| format!("{k}={}", params.get(*k).map(value_text).unwrap_or_default()))
            .collect();
        let raw = raw.join("&");
        let encoded: Vec<String> = names
            .iter()
            .map(|k| {
                format!(
                    "{k}={}",
                    percent_encode(&params.get(*k).map(value_text).unwrap_or_default())
                )
            })
            .collect();
        let encoded = encoded.join("&");
        if !verify_hmac(&secret, raw.as_bytes(), &sig)
            && !verify_hmac(&secret, encoded.as_bytes(), &sig)
        {
            return Err(ApiError::signature());
        }
        if sh.faults.take_1021() {
            return Err(ApiError::recv_window());
        }
        let now = now_ms();
        if ts >= now + 1000 {
            return Err(ApiError::ahead());
        }
        if Decimal::from(now.saturating_sub(ts)) > recv {
            return Err(ApiError::recv_window());
        }
        Ok(key)
    }

    fn subscribe(&mut self, sh: &Shared, key: &str, via_logon: bool) -> Result<Value, ApiError> {
        if self.subs.iter().any(|s| s.api_key == key) {
            return Err(ApiError::bad(
                -2035,
                "User Data Stream subscription already active.",
            ));
        }
        if self.next_sub > 65_535 {
            return Err(ApiError::bad(
                -2042,
                "Maximum subscription ID reached for this connection.",
            ));
        }
        let id = self.next_sub;
        self.next_sub += 1;
        sh.engine()
            .subs
            .entry(key.to_string())
            .or_default()
            .push(Subscriber {
                conn_id: self.conn_id,
                sub_id: id,
                tx: self.tx.clone(),
            });
        self.subs.push(Sub {
            id,
            api_key: key.to_string(),
            via_logon,
        });
        Ok(serde_json::json!({ "subscriptionId": id }))
    }

    /// Removes one subscription locally and from the engine.
    fn remove_sub(&mut self, sh: &Shared, sub_id: u64) -> bool {
        let Some(pos) = self.subs.iter().position(|s| s.id == sub_id) else {
            return false;
        };
        let sub = self.subs.remove(pos);
        let mut eng = sh.engine();
        if let Some(v) = eng.subs.get_mut(&sub.api_key) {
            v.retain(|s| !(s.conn_id == self.conn_id && s.sub_id == sub_id));
            if v.is_empty() {
                eng.subs.remove(&sub.api_key);
            }
        }
        true
    }

    fn session_result(&self, sh: &Shared) -> Value {
        let has_logon_sub = self.subs.iter().any(|s| s.via_logon);
        let _ = sh;
        serde_json::json!({
            "apiKey": self.logon.as_ref().map(|(k, _)| k.clone()),
            "authorizedSince": self.logon.as_ref().map(|(_, t)| *t),
            "connectedSince": self.connected_ms,
            "returnRateLimits": false,
            "serverTime": now_ms(),
            "userDataStream": if self.logon.is_some() { Value::Bool(has_logon_sub) } else { Value::Null },
        })
    }

    /// Handles one text frame; returns the frames to send back, in order.
    fn handle(&mut self, sh: &Shared, text: &str) -> Vec<String> {
        let received_us = now_us();
        let null = Value::Null;
        let req: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let e = ApiError::bad(-1135, "Invalid JSON Request");
                return vec![render(&null, Err(e), None)];
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let method = req
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let empty = serde_json::Map::new();
        let params = req
            .get("params")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let weight = match method.as_str() {
            "ping" | "time" => 1,
            "exchangeInfo" => 20,
            _ => 2,
        };
        let mut extra = Vec::new();
        let result: Result<Value, ApiError> =
            match sh.limiter.request(self.peer.ip(), weight, now_ms()) {
                Err(e) => Err(e),
                Ok(_) => self.dispatch(sh, &method, params, &mut extra),
            };
        let count = sh.limiter.used(self.peer.ip(), now_ms());
        let limit = lock(&sh.limiter.cfg).request_weight_per_minute;
        let status = match &result {
            Ok(_) => 200,
            Err(e) => e.status,
        };
        let code = result.as_ref().err().map(|e| e.code);
        let api_key = params
            .get("apiKey")
            .map(value_text)
            .or_else(|| self.logon.as_ref().map(|(k, _)| k.clone()));
        sh.record(RequestRecord {
            seq: 0,
            transport: "ws".into(),
            method: method.clone(),
            path: "/ws-api/v3".into(),
            api_key,
            client_ids: Vec::new(),
            received_us,
            responded_us: now_us(),
            status,
            code,
        });
        let mut out = vec![render(
            &id,
            result,
            Some(vec![WsRateLimit {
                rate_limit_type: "REQUEST_WEIGHT",
                interval: "MINUTE",
                interval_num: 1,
                limit,
                count,
            }]),
        )];
        out.extend(extra);
        out
    }

    fn dispatch(
        &mut self,
        sh: &Shared,
        method: &str,
        params: &serde_json::Map<String, Value>,
        extra: &mut Vec<String>,
    ) -> Result<Value, ApiError> {
        match method {
            "ping" => Ok(serde_json::json!({})),
            "time" => Ok(serde_json::json!({ "serverTime": now_ms() })),
            "session.logon" => {
                let key = self.verify(sh, params)?;
                self.logon = Some((key, now_ms()));
                Ok(self.session_result(sh))
            }
            "session.status" => Ok(self.session_result(sh)),
            "session.logout" => {
                let ids: Vec<u64> = self
                    .subs
                    .iter()
                    .filter(|s| s.via_logon)
                    .map(|s| s.id)
                    .collect();
                for id in ids {
                    self.remove_sub(sh, id);
                    extra.push(terminated(id));
                }
                self.logon = None;
                Ok(self.session_result(sh))
            }
            "userDataStream.subscribe" => {
                let Some((key, _)) = self.logon.clone() else {
                    return Err(ApiError::new(
                        401,
                        -2015,
                        "Invalid API-key, IP, or permissions for action.",
                    ));
                };
                let revoked = sh.engine().accounts.get(&key).is_none_or(|a| a.revoked);
                if revoked {
                    return Err(ApiError::bad_key());
                }
                self.subscribe(sh, &key, true)
            }
            "userDataStream.subscribe.signature" => {
                let key = self.verify(sh, params)?;
                self.subscribe(sh, &key, false)
            }
            "userDataStream.unsubscribe" => {
                let ids: Vec<u64> = match params.get("subscriptionId") {
                    Some(v) => {
                        let id = parse_u64("subscriptionId", &value_text(v))?;
                        if !self.subs.iter().any(|s| s.id == id) {
                            return Err(ApiError::bad(
                                -2036,
                                "User Data Stream subscription not active.",
                            ));
                        }
                        vec![id]
                    }
                    None => self.subs.iter().map(|s| s.id).collect(),
                };
                for id in ids {
                    self.remove_sub(sh, id);
                    extra.push(terminated(id));
                }
                Ok(serde_json::json!({}))
            }
            "session.subscriptions" => Ok(Value::Array(
                self.subs
                    .iter()
                    .map(|s| serde_json::json!({ "subscriptionId": s.id }))
                    .collect(),
            )),
            "" => Err(ApiError::mandatory("method")),
            _ => Err(ApiError::bad(-1020, "This operation is not supported.")),
        }
    }
}

fn render(
    id: &Value,
    result: Result<Value, ApiError>,
    rate_limits: Option<Vec<WsRateLimit>>,
) -> String {
    let resp = match result {
        Ok(v) => WsResponse {
            id,
            status: 200,
            result: Some(v),
            error: None,
            rate_limits,
        },
        Err(e) => {
            let data = e.retry_after.map(|secs| {
                serde_json::json!({ "serverTime": now_ms(), "retryAfter": now_ms() + secs * 1000 })
            });
            WsResponse {
                id,
                status: e.status,
                result: None,
                error: Some(WsError {
                    code: e.code,
                    msg: e.msg,
                    data,
                }),
                rate_limits,
            }
        }
    };
    serde_json::to_string(&resp).unwrap_or_default()
}

async fn connection(sh: Arc<Shared>, socket: WebSocket, peer: SocketAddr) {
    let conn_id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&sh.conns).insert(conn_id, ConnHandle { tx: tx.clone() });
    let settings = *lock(&sh.ws);
    let mut session = Session {
        conn_id,
        peer,
        tx,
        connected_ms: now_ms(),
        logon: None,
        subs: Vec::new(),
        next_sub: settings.first_subscription_id,
    };
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval_at(
        Instant::now() + settings.ping_interval,
        settings.ping_interval,
    );
    let age = tokio::time::sleep(settings.max_age);
    tokio::pin!(age);
    let mut pong_deadline: Option<Instant> = None;
    let mut ping_seq: u64 = 0;
    loop {
        let pong_wait = async {
            match pong_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let outs = session.handle(&sh, t.as_str());
                    let mut failed = false;
                    for out in outs {
                        if sink.send(Message::Text(out.into())).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break;
                    }
                }
                Some(Ok(Message::Pong(_))) => pong_deadline = None,
                Some(Ok(Message::Ping(_) | Message::Binary(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
            msg = rx.recv() => match msg {
                Some(ConnMsg::Event(sub_id, text)) => {
                    if sh.faults.stalled.load(Ordering::Relaxed) || !session.subs.iter().any(|s| s.id == sub_id) {
                        continue;
                    }
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(ConnMsg::Drop) | None => break,
                Some(ConnMsg::Shutdown) => {
                    let ev = format!("{{\"event\":{{\"e\":\"serverShutdown\",\"E\":{}}}}}", now_ms());
                    let _ = sink.send(Message::Text(ev.into())).await;
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: 1001, reason: "server shutdown".into() }))).await;
                    break;
                }
                Some(ConnMsg::Revoke) => {
                    let e = ApiError::bad_key();
                    let body = render(&Value::Null, Err(e), None);
                    let _ = sink.send(Message::Text(body.into())).await;
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: 1008, reason: "api key revoked".into() }))).await;
                    break;
                }
                Some(ConnMsg::Terminate(sub_id)) => {
                    if session.remove_sub(&sh, sub_id) && sink.send(Message::Text(terminated(sub_id).into())).await.is_err() {
                        break;
                    }
                }
            },
            _ = ping.tick() => {
                if sh.faults.stalled.load(Ordering::Relaxed) {
                    continue;
                }
                ping_seq += 1;
                if sink.send(Message::Ping(ping_seq.to_string().into_bytes().into())).await.is_err() {
                    break;
                }
                if pong_deadline.is_none() {
                    pong_deadline = Some(Instant::now() + settings.pong_timeout);
                }
            }
            _ = &mut age => {
                let _ = sink.send(Message::Close(Some(CloseFrame { code: 1000, reason: "connection age limit".into() }))).await;
                break;
            }
            _ = pong_wait => break,
        }
    }
    sh.engine().drop_conn_subs(conn_id);
    lock(&sh.conns).remove(&conn_id);
}
