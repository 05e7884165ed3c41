//! Admin HTTP API under `/admin/…`: the [`crate::SimControl`] operations as JSON endpoints.
//! Decimals travel as strings. Fault endpoints live under `/admin/faults/…` and answer 404
//! unless faults are enabled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{AccountSpec, Commission, CommissionAsset, RateLimits};
use crate::control::{FaultOutcome, FaultWhen, RequestFault, SimControl};
use crate::state::Shared;

type AdminResult = Result<Value, (u16, String)>;

fn reply(status: u16, v: &Value) -> Response {
    let mut resp = Response::new(Body::from(v.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

fn bad(msg: impl Into<String>) -> (u16, String) {
    (400, msg.into())
}

fn dec(s: &str, what: &str) -> Result<Decimal, (u16, String)> {
    s.trim()
        .parse::<Decimal>()
        .map_err(|_| bad(format!("{what} {s:?} is not a decimal")))
}

fn body<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T, (u16, String)> {
    let raw = if raw.is_empty() {
        b"{}".as_slice()
    } else {
        raw
    };
    serde_json::from_slice(raw).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommissionBody {
    rate: String,
    asset: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountBody {
    api_key: String,
    secret: String,
    #[serde(default)]
    balances: BTreeMap<String, String>,
    commission: Option<CommissionBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PriceBody {
    symbol: String,
    price: Option<String>,
    delta: Option<String>,
    #[serde(default)]
    prices: Vec<String>,
    interval_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyBody {
    api_key: Option<String>,
    on: Option<bool>,
    asset: Option<String>,
    amount: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestFaultBody {
    method: Option<String>,
    #[serde(default)]
    path_prefix: String,
    count: Option<u32>,
    when: Option<String>,
    status: Option<u16>,
    hang_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CountBody {
    count: Option<u32>,
    retry_after: Option<u64>,
    ms: Option<u64>,
    path_prefix: Option<String>,
    symbol: Option<String>,
    parts: Option<u32>,
    ratio: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LagBody {
    ms: u64,
    api_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LimitsBody {
    enabled: bool,
    request_weight_per_minute: Option<u32>,
    orders_per10s: Option<u32>,
    orders_per_day: Option<u32>,
    ban_after_ignored: Option<u32>,
    ban_seconds: Option<u64>,
}

fn sim_err(e: crate::SimError) -> (u16, String) {
    match e {
        crate::SimError::UnknownSymbol(_) | crate::SimError::UnknownAccount(_) => {
            (404, e.to_string())
        }
        other => bad(other.to_string()),
    }
}

/// Entry point of `/admin/…`.
pub(crate) async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    raw: Bytes,
) -> Response {
    let ctl = SimControl { shared: sh.clone() };
    let path = uri.path().trim_end_matches('/').to_string();
    let r = if path.starts_with("/admin/faults") && !sh.faults_enabled {
        Err((
            404,
            "fault injection is disabled (start with --faults / SimConfig::with_faults(true))"
                .into(),
        ))
    } else {
        route(&ctl, &method, &path, &uri, &raw)
    };
    match r {
        Ok(v) => reply(200, &v),
        Err((status, msg)) => reply(status, &json!({ "error": msg })),
    }
}

fn route(ctl: &SimControl, method: &Method, path: &str, uri: &Uri, raw: &[u8]) -> AdminResult {
    let parts: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    let q = query(uri);
    let key_q = q.get("apiKey").map(String::as_str);
    let ok = || Ok(json!({ "ok": true }));
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["accounts"]) => {
            let b: AccountBody = body(raw)?;
            let mut balances = Vec::new();
            for (asset, v) in &b.balances {
                balances.push((asset.clone(), dec(v, "balance")?));
            }
            let commission = match b.commission {
                None => Commission::default(),
                Some(c) => Commission {
                    rate: dec(&c.rate, "rate")?,
                    asset: match c.asset.as_str() {
                        "BASE" | "base" | "Base" => CommissionAsset::Base,
                        "QUOTE" | "quote" | "Quote" => CommissionAsset::Quote,
                        other => CommissionAsset::Other(other.to_string()),
                    },
                },
            };
            ctl.add_account(AccountSpec {
                api_key: b.api_key,
                secret: b.secret,
                balances,
                commission,
            });
            ok()
        }
        ("GET", ["accounts", key, "balances"]) => {
            if ctl.balance(key, "").is_none() {
                return Err((404, format!("unknown api key {key}")));
            }
            Ok(json!(ctl.balances(key)))
        }
        ("POST", ["accounts", key, "deposit"]) => {
            let b: KeyBody = body(raw)?;
            let asset = b.asset.ok_or_else(|| bad("asset missing"))?;
            let amount = dec(&b.amount.unwrap_or_default(), "amount")?;
            ctl.deposit(key, &asset, amount).map_err(sim_err)?;
            ok()
        }
        ("GET", ["prices"]) => {
            let eng = ctl.shared.engine();
            let m: BTreeMap<String, String> = eng
                .symbols
                .iter()
                .map(|(s, st)| (s.clone(), st.price.to_string()))
                .collect();
            Ok(json!(m))
        }
        ("GET", ["price", symbol]) => {
            let p = ctl
                .price(symbol)
                .ok_or_else(|| (404, format!("unknown symbol {symbol}")))?;
            Ok(json!({ "symbol": symbol, "price": p.to_string() }))
        }
        ("POST", ["price"]) => {
            let b: PriceBody = body(raw)?;
            let p = dec(&b.price.unwrap_or_default(), "price")?;
            ctl.set_price(&b.symbol, p).map_err(sim_err)?;
            Ok(json!({ "symbol": b.symbol, "price": p.to_string() }))
        }
        ("POST", ["price", "step"]) => {
            let b: PriceBody = body(raw)?;
            let d = dec(&b.delta.unwrap_or_default(), "delta")?;
            let p = ctl.step_price(&b.symbol, d).map_err(sim_err)?;
            Ok(json!({ "symbol": b.symbol, "price": p.to_string() }))
        }
        ("POST", ["price", "path"]) => {
            let b: PriceBody = body(raw)?;
            let mut prices = Vec::new();
            for p in &b.prices {
                prices.push(dec(p, "price")?);
            }
            let n = prices.len();
            ctl.run_price_path(
                &b.symbol,
                prices,
                Duration::from_millis(b.interval_ms.unwrap_or(100)),
            )
            .map_err(sim_err)?;
            Ok(json!({ "symbol": b.symbol, "steps": n }))
        }
        ("GET", ["orders"]) => {
            let open = q.get("open").is_some_and(|v| v == "true");
            let v = match (key_q, open) {
                (Some(k), true) => ctl.open_orders(k),
                (k, false) => ctl.orders(k),
                (None, true) => ctl
                    .orders(None)
                    .into_iter()
                    .filter(|o| matches!(o.status.as_str(), "NEW" | "PARTIALLY_FILLED"))
                    .collect(),
            };
            Ok(json!(v))
        }
        ("GET", ["orderLists"]) => Ok(json!(ctl.order_lists(key_q))),
        ("GET", ["trades"]) => Ok(json!(ctl.trades(key_q))),
        ("GET", ["requests"]) => {
            let since: u64 = q.get("sinceSeq").and_then(|s| s.parse().ok()).unwrap_or(0);
            let v: Vec<_> = ctl
                .requests()
                .into_iter()
                .filter(|r| r.seq >= since)
                .collect();
            Ok(json!(v))
        }
        ("DELETE", ["requests"]) => {
            ctl.clear_requests();
            ok()
        }
        ("GET", ["streams"]) => Ok(json!({
            "connections": ctl.connection_count(),
            "subscriptions": ctl.subscription_count(),
            "attempts": ctl.stream_attempts().len(),
        })),
        ("GET", ["streams", "attempts"]) => Ok(json!(ctl.stream_attempts())),
        ("POST", ["rate-limits"]) => {
            let b: LimitsBody = body(raw)?;
            let d = RateLimits::binance();
            ctl.set_rate_limits(RateLimits {
                enabled: b.enabled,
                request_weight_per_minute: b
                    .request_weight_per_minute
                    .unwrap_or(d.request_weight_per_minute),
                orders_per_10s: b.orders_per10s.unwrap_or(d.orders_per_10s),
                orders_per_day: b.orders_per_day.unwrap_or(d.orders_per_day),
                ban_after_ignored: b.ban_after_ignored.unwrap_or(d.ban_after_ignored),
                ban_duration: b
                    .ban_seconds
                    .map(Duration::from_secs)
                    .unwrap_or(d.ban_duration),
            });
            ok()
        }
        ("POST", ["rate-limits", "reset"]) => {
            ctl.reset_rate_limits();
            ok()
        }
        ("POST", ["faults", "streams", "drop"]) => {
            let b: KeyBody = body(raw)?;
            Ok(json!({ "connections": ctl.drop_streams(b.api_key.as_deref()) }))
        }
        ("POST", ["faults", "streams", "stall"]) => {
            let b: KeyBody = body(raw)?;
            ctl.set_streams_stalled(b.on.unwrap_or(true));
            ok()
        }
        ("POST", ["faults", "streams", "refuse"]) => {
            let b: KeyBody = body(raw)?;
            ctl.set_refuse_streams(b.on.unwrap_or(true));
            ok()
        }
        ("POST", ["faults", "streams", "shutdown"]) => {
            let b: KeyBody = body(raw)?;
            Ok(json!({ "connections": ctl.server_shutdown(b.api_key.as_deref()) }))
        }
        ("POST", ["faults", "streams", "terminate"]) => {
            let b: KeyBody = body(raw)?;
            let k = b.api_key.ok_or_else(|| bad("apiKey missing"))?;
            Ok(json!({ "subscriptions": ctl.terminate_subscriptions(&k) }))
        }
        ("POST", ["faults", "keys", "revoke"]) => {
            let b: KeyBody = body(raw)?;
            let k = b.api_key.ok_or_else(|| bad("apiKey missing"))?;
            Ok(json!({ "connections": ctl.revoke_key(&k) }))
        }
        ("POST", ["faults", "keys", "restore"]) => {
            let b: KeyBody = body(raw)?;
            let k = b.api_key.ok_or_else(|| bad("apiKey missing"))?;
            ctl.restore_key(&k);
            ok()
        }
        ("POST", ["faults", "delay"]) => {
            let b: CountBody = body(raw)?;
            ctl.set_response_delay(Duration::from_millis(b.ms.unwrap_or(0)), b.path_prefix);
            ok()
        }
        ("POST", ["faults", "requests"]) => {
            let b: RequestFaultBody = body(raw)?;
            let when = match b.when.as_deref().unwrap_or("before") {
                "before" => FaultWhen::Before,
                "after" => FaultWhen::After,
                other => return Err(bad(format!("when {other:?} is not before|after"))),
            };
            let outcome = match b.hang_ms {
                Some(ms) => FaultOutcome::Hang(Duration::from_millis(ms)),
                None => FaultOutcome::Status(b.status.unwrap_or(503)),
            };
            ctl.fail_requests(RequestFault {
                method: b.method,
                path_prefix: b.path_prefix,
                count: b.count.unwrap_or(1),
                when,
                outcome,
            });
            ok()
        }
        ("POST", ["faults", "lookup-lag"]) => {
            let b: LagBody = body(raw)?;
            ctl.set_lookup_lag(Duration::from_millis(b.ms), b.api_key.as_deref());
            ok()
        }
        ("POST", ["faults", "timestamp"]) => {
            let b: CountBody = body(raw)?;
            ctl.force_timestamp_errors(b.count.unwrap_or(1));
            ok()
        }
        ("POST", ["faults", "throttle"]) => {
            let b: CountBody = body(raw)?;
            ctl.throttle_requests(b.count.unwrap_or(1), b.retry_after.unwrap_or(1));
            ok()
        }
        ("POST", ["faults", "streams", "throttle"]) => {
            let b: CountBody = body(raw)?;
            ctl.throttle_streams(b.count.unwrap_or(1), b.retry_after.unwrap_or(1));
            ok()
        }
        ("POST", ["faults", "expire-next-stop"]) => {
            let b: CountBody = body(raw)?;
            ctl.expire_next_stops(b.count.unwrap_or(1));
            ok()
        }
        ("POST", ["faults", "fill-parts"]) => {
            let b: CountBody = body(raw)?;
            let s = b.symbol.ok_or_else(|| bad("symbol missing"))?;
            ctl.set_fill_parts(&s, b.parts.unwrap_or(1))
                .map_err(sim_err)?;
            ok()
        }
        ("POST", ["faults", "partial-fill"]) => {
            let b: CountBody = body(raw)?;
            let s = b.symbol.ok_or_else(|| bad("symbol missing"))?;
            let r = dec(&b.ratio.unwrap_or_default(), "ratio")?;
            ctl.partial_fill_next(&s, r).map_err(sim_err)?;
            ok()
        }
        ("POST", ["faults", "clear"]) => {
            ctl.clear_faults();
            ok()
        }
        _ => Err((404, format!("no admin endpoint {method} {path}"))),
    }
}
