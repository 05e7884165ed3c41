//! `exchange-sim` as a process (`--faults`, so the admin and fault API are
//! on) and a client of its admin API.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bins::binary;
use crate::process::{ChildGuard, guarded_command, open_log};

/// The simulator process. Drop kills it.
#[derive(Debug)]
pub struct SimProc {
    // Dropping the guard kills the simulator.
    _child: ChildGuard,
    addr: String,
    admin: SimAdmin,
}

impl SimProc {
    /// Starts `exchange-sim --faults` with `accounts` (`KEY:SECRET:USDT=…`),
    /// logging into `dir/exchange-sim.log`, and waits for its address line.
    ///
    /// # Errors
    /// A missing binary, or a simulator that does not print its address.
    pub fn start(accounts: &[String], extra: &[&str], dir: &Path) -> anyhow::Result<SimProc> {
        let log = open_log(&dir.join("exchange-sim.log"))?;
        let mut cmd = guarded_command(&binary("exchange-sim")?, None)?;
        cmd.args(["--listen", "127.0.0.1:0", "--faults"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for a in accounts {
            cmd.args(["--account", a]);
        }
        let mut child = ChildGuard::spawn(&mut cmd).context("starting exchange-sim")?;
        let stdout = child.child().stdout.take().context("exchange-sim stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so that the simulator never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if !line.trim().is_empty() => line,
            _ => bail!("exchange-sim printed no address within 20 s"),
        };
        let addr = line.trim().to_owned();
        Ok(SimProc {
            _child: child,
            admin: SimAdmin::new(&format!("http://{addr}")),
            addr,
        })
    }

    /// REST base URL (`http://127.0.0.1:PORT`).
    pub fn rest_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// WebSocket API URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws-api/v3", self.addr)
    }

    /// The admin client.
    pub fn admin(&self) -> &SimAdmin {
        &self.admin
    }
}

/// An order as the simulator's admin API shows it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimOrder {
    /// Owner's API key.
    pub api_key: String,
    /// Symbol.
    pub symbol: String,
    /// Exchange order id.
    pub order_id: u64,
    /// Its list, -1 when none.
    pub order_list_id: i64,
    /// Client order id.
    pub client_order_id: String,
    /// `BUY` / `SELL`.
    pub side: String,
    /// Binance order type.
    pub order_type: String,
    /// Binance status.
    pub status: String,
    /// Ordered quantity.
    pub orig_qty: Decimal,
    /// Filled quantity.
    pub executed_qty: Decimal,
    /// Created (µs).
    pub created_us: u64,
}

/// An order list as the simulator shows it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimList {
    /// Owner's API key.
    pub api_key: String,
    /// Symbol.
    pub symbol: String,
    /// Exchange list id.
    pub order_list_id: i64,
    /// `listClientOrderId`.
    pub list_client_order_id: String,
    /// `EXECUTING` / `ALL_DONE`.
    pub list_order_status: String,
    /// Leg order ids.
    pub order_ids: Vec<u64>,
    /// Accepted (µs).
    pub created_us: u64,
}

/// A fill.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimTrade {
    /// Owner's API key.
    pub api_key: String,
    /// Order filled.
    pub order_id: u64,
    /// Quantity.
    pub qty: Decimal,
    /// Commission.
    pub commission: Decimal,
    /// Its asset.
    pub commission_asset: String,
    /// Buyer side.
    pub is_buyer: bool,
    /// Fill time (µs).
    pub time_us: u64,
}

/// One request the simulator received.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimRequest {
    /// HTTP method (or WebSocket method name).
    pub method: String,
    /// Path.
    pub path: String,
    /// API key, when signed.
    pub api_key: Option<String>,
    /// Client ids named in the request.
    pub client_ids: Vec<String>,
    /// Answer status.
    pub status: u16,
}

/// Client of the simulator's `/admin/…` API.
#[derive(Debug, Clone)]
pub struct SimAdmin {
    base: String,
    http: reqwest::Client,
}

impl SimAdmin {
    /// A client of the simulator at `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: &str) -> SimAdmin {
        SimAdmin {
            base: base.to_owned(),
            http: crate::http_client(Duration::from_secs(10)),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let reply = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = reply.status();
        let text = reply.text().await?;
        if !status.is_success() {
            bail!("GET {path}: {status} {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {path}: {text}"))
    }

    /// POSTs `body` to `/admin/{path}`.
    ///
    /// # Errors
    /// Transport errors and non-2xx answers.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let reply = self
            .http
            .post(format!("{}/admin/{path}", self.base))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST /admin/{path}"))?;
        let status = reply.status();
        let text = reply.text().await?;
        if !status.is_success() {
            bail!("POST /admin/{path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Sets `symbol`'s last price (runs matching).
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn set_price(&self, symbol: &str, price: Decimal) -> anyhow::Result<()> {
        self.post(
            "price",
            json!({"symbol": symbol, "price": price.to_string()}),
        )
        .await
        .map(drop)
    }

    /// `symbol`'s last price.
    ///
    /// # Errors
    /// Transport errors, unknown symbol.
    pub async fn price(&self, symbol: &str) -> anyhow::Result<Decimal> {
        let v: Value = self.get(&format!("/admin/price/{symbol}")).await?;
        v["price"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("price of {symbol}: {v}"))
    }

    /// Every order of `api_key`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn orders(&self, api_key: &str) -> anyhow::Result<Vec<SimOrder>> {
        self.get(&format!("/admin/orders?apiKey={api_key}")).await
    }

    /// Every order list of `api_key`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn order_lists(&self, api_key: &str) -> anyhow::Result<Vec<SimList>> {
        self.get(&format!("/admin/orderLists?apiKey={api_key}"))
            .await
    }

    /// Every fill of `api_key`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn trades(&self, api_key: &str) -> anyhow::Result<Vec<SimTrade>> {
        self.get(&format!("/admin/trades?apiKey={api_key}")).await
    }

    /// Every request received so far (the log keeps the last 100 000).
    ///
    /// # Errors
    /// Transport errors.
    pub async fn requests(&self) -> anyhow::Result<Vec<SimRequest>> {
        self.get("/admin/requests").await
    }

    /// Open user-data subscriptions.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn subscriptions(&self) -> anyhow::Result<u64> {
        let v: Value = self.get("/admin/streams").await?;
        v["subscriptions"]
            .as_u64()
            .with_context(|| format!("streams: {v}"))
    }

    /// Closes every stream's TCP connection without a close frame.
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn drop_streams(&self) -> anyhow::Result<()> {
        self.post("faults/streams/drop", json!({})).await.map(drop)
    }

    /// Stalls (or resumes) every stream: open, but no events and no pings.
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn stall_streams(&self, on: bool) -> anyhow::Result<()> {
        self.post("faults/streams/stall", json!({"on": on}))
            .await
            .map(drop)
    }

    /// Refuses (or accepts again) new stream connections with HTTP 503.
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn refuse_streams(&self, on: bool) -> anyhow::Result<()> {
        self.post("faults/streams/refuse", json!({"on": on}))
            .await
            .map(drop)
    }

    /// The next `count` requests under `path_prefix` (and `method`, when
    /// given) answer 5xx; `after`: applied first, so the outcome is unknown.
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn fail_requests(
        &self,
        method: Option<&str>,
        path_prefix: &str,
        count: u32,
        after: bool,
    ) -> anyhow::Result<()> {
        let mut body = json!({"pathPrefix": path_prefix, "count": count,
                              "when": if after { "after" } else { "before" }});
        if let Some(m) = method {
            body["method"] = json!(m);
        }
        self.post("faults/requests", body).await.map(drop)
    }

    /// The next `count` requests answer 429 `-1003` with `Retry-After`.
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn throttle(&self, count: u32, retry_after_secs: u32) -> anyhow::Result<()> {
        self.post(
            "faults/throttle",
            json!({"count": count, "retryAfter": retry_after_secs}),
        )
        .await
        .map(drop)
    }

    /// Delays answers under `path_prefix` by `ms` (after applying).
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn delay(&self, ms: u64, path_prefix: &str) -> anyhow::Result<()> {
        self.post("faults/delay", json!({"ms": ms, "pathPrefix": path_prefix}))
            .await
            .map(drop)
    }

    /// Clears every fault.
    ///
    /// # Errors
    /// As [`SimAdmin::post`].
    pub async fn clear_faults(&self) -> anyhow::Result<()> {
        self.post("faults/clear", json!({})).await.map(drop)
    }
}
