//! Test helpers: a plain HTTP/1.1 client, Binance signing, fixture shape checks, a WS client.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use exchange_sim::{AccountSpec, Sim, SimConfig, hmac_sha256_hex};
use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

pub const KEY: &str = "test-key-1";
pub const SECRET: &str = "test-secret-1";

pub fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

pub async fn start_with(cfg: SimConfig) -> Sim {
    Sim::start(cfg).await.unwrap()
}

pub fn config() -> SimConfig {
    SimConfig::new("127.0.0.1:0".parse().unwrap())
        .with_faults(true)
        .with_account(AccountSpec::new(
            KEY,
            SECRET,
            vec![
                ("USDT".into(), d("100000")),
                ("BTC".into(), d("1")),
                ("BNB".into(), d("10")),
            ],
        ))
}

pub async fn start() -> Sim {
    start_with(config()).await
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    /// Asserts a Binance error body with this code and message.
    pub fn assert_error(&self, status: u16, code: i64, msg: &str) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(
            self.header("content-type")
                .map(|c| c.starts_with("application/json")),
            Some(true)
        );
        let v = self.json();
        assert_eq!(v["code"], code, "body: {}", self.body);
        assert_eq!(v["msg"], msg, "body: {}", self.body);
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let body = if headers
        .get("transfer-encoding")
        .map(|v| v == "chunked")
        .unwrap_or(false)
    {
        let mut out = String::new();
        let mut r = rest;
        loop {
            let (len, after) = r.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(len.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            r = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn encode(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap()
}

/// Signed request with every parameter in the query string.
pub async fn signed(addr: SocketAddr, method: &str, path: &str, params: &[(&str, &str)]) -> Resp {
    signed_as(addr, KEY, SECRET, method, path, params).await
}

pub async fn signed_as(
    addr: SocketAddr,
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Resp {
    let ts = now_ms().to_string();
    let mut all: Vec<(&str, &str)> = params.to_vec();
    all.push(("timestamp", &ts));
    let q = encode(&all);
    let sig = hmac_sha256_hex(secret, &q);
    http(
        addr,
        method,
        &format!("{path}?{q}&signature={sig}"),
        &[("X-MBX-APIKEY", key)],
        "",
    )
    .await
}

/// Signed request with every parameter in a form body.
pub async fn signed_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Resp {
    let ts = now_ms().to_string();
    let mut all: Vec<(&str, &str)> = params.to_vec();
    all.push(("timestamp", &ts));
    let b = encode(&all);
    let sig = hmac_sha256_hex(SECRET, &b);
    http(
        addr,
        method,
        path,
        &[
            ("X-MBX-APIKEY", KEY),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &format!("{b}&signature={sig}"),
    )
    .await
}

pub fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../../shared/binance/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "float",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Same keys (modulo the allowed differences) and the same JSON types, recursively.
pub fn assert_shape(actual: &Value, fixture: &Value, may_lack: &[&str], may_add: &[&str]) {
    shape_at("$", actual, fixture, may_lack, may_add);
}

fn shape_at(at: &str, a: &Value, f: &Value, may_lack: &[&str], may_add: &[&str]) {
    // A null in the fixture (e.g. `N`) may be a string once a trade happened, and vice versa.
    if f.is_null() || a.is_null() {
        return;
    }
    assert_eq!(kind(a), kind(f), "type of {at}: actual {a} vs fixture {f}");
    match (a, f) {
        (Value::Object(ao), Value::Object(fo)) => {
            for k in fo.keys() {
                if !ao.contains_key(k) {
                    assert!(
                        may_lack.contains(&k.as_str()),
                        "{at}: missing key {k} in {a}"
                    );
                }
            }
            for k in ao.keys() {
                if !fo.contains_key(k) {
                    assert!(may_add.contains(&k.as_str()), "{at}: extra key {k}");
                }
            }
            for (k, fv) in fo {
                if let Some(av) = ao.get(k) {
                    shape_at(&format!("{at}.{k}"), av, fv, may_lack, may_add);
                }
            }
        }
        (Value::Array(aa), Value::Array(fa))
            // Element i is compared with fixture element i (the last one past its end).
            if !fa.is_empty() => {
                for (i, av) in aa.iter().enumerate() {
                    let fv = &fa[i.min(fa.len() - 1)];
                    shape_at(&format!("{at}[{i}]"), av, fv, may_lack, may_add);
                }
            }
        _ => {}
    }
}

/// Keys in the same order as the fixture (for the keys both have).
pub fn assert_key_order(actual: &Value, fixture: &Value) {
    let (Value::Object(a), Value::Object(f)) = (actual, fixture) else {
        panic!("not objects")
    };
    let a_keys: Vec<&String> = a.keys().filter(|k| f.contains_key(*k)).collect();
    let f_keys: Vec<&String> = f.keys().filter(|k| a.contains_key(*k)).collect();
    assert_eq!(a_keys, f_keys);
}

pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub async fn ws_connect(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// Sends a WS API request and returns the response (events are skipped).
pub async fn ws_call(ws: &mut Ws, req: Value) -> Value {
    ws.send(Message::Text(req.to_string().into()))
        .await
        .unwrap();
    let id = req["id"].clone();
    loop {
        let v = ws_next_json(ws, Duration::from_secs(5))
            .await
            .expect("response");
        if v.get("status").is_some() && v["id"] == id {
            return v;
        }
    }
}

/// Next JSON text frame within `timeout` (answers pings by the library).
pub async fn ws_next_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match m {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

pub fn ws_signature_params(key: &str, secret: &str) -> Value {
    let ts = now_ms();
    let payload = format!("apiKey={key}&timestamp={ts}");
    let sig = hmac_sha256_hex(secret, &payload);
    serde_json::json!({"apiKey": key, "timestamp": ts, "signature": sig})
}

/// Connects and subscribes to the user data stream of `key`.
pub async fn subscribe(url: &str, key: &str, secret: &str) -> Ws {
    let mut ws = ws_connect(url).await;
    let r = ws_call(
        &mut ws,
        serde_json::json!({"id": "sub", "method": "userDataStream.subscribe.signature", "params": ws_signature_params(key, secret)}),
    )
    .await;
    assert_eq!(r["status"], 200, "{r}");
    ws
}

/// Collects events until one matches `pred` (returns all seen, the match last).
pub async fn events_until(ws: &mut Ws, mut pred: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = ws_next_json(ws, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("no matching event; saw {seen:#?}"));
        let done = v.get("event").map(&mut pred).unwrap_or(false);
        seen.push(v);
        if done {
            return seen;
        }
    }
}
