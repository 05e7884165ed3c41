//! REST API under `/api/v3/…`: routing, signing, faults, rate limits and the handlers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::control::{FaultOutcome, FaultWhen, RequestRecord};
use crate::engine::{Engine, LegSpec, NewOco, NewOrder, OType, RespType, Side, Tif};
use crate::error::ApiError;
use crate::params::{Params, parse_u64, signed_payload};
use crate::state::Shared;
use crate::symbols::{ExchangeInfoView, FilterInput, RateLimitView};
use crate::util::{fmt8, now_ms, now_us, verify_hmac};
use crate::views::{ListView, ReportView};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ep {
    Ping,
    Time,
    ExchangeInfo,
    TickerPrice,
    BookTicker,
    AvgPrice,
    Account,
    OrderNew,
    OrderTest,
    OrderGet,
    OrderCancel,
    OpenOrders,
    OpenOrdersCancel,
    AllOrders,
    MyTrades,
    OcoNew,
    OcoLegacy,
    ListGet,
    ListCancel,
    OpenLists,
    AllLists,
    RateLimitOrder,
}

impl Ep {
    fn route(method: &Method, path: &str) -> Option<Self> {
        let m = method.as_str();
        Some(match (m, path) {
            ("GET", "/api/v3/ping") => Self::Ping,
            ("GET", "/api/v3/time") => Self::Time,
            ("GET", "/api/v3/exchangeInfo") => Self::ExchangeInfo,
            ("GET", "/api/v3/ticker/price") => Self::TickerPrice,
            ("GET", "/api/v3/ticker/bookTicker") => Self::BookTicker,
            ("GET", "/api/v3/avgPrice") => Self::AvgPrice,
            ("GET", "/api/v3/account") => Self::Account,
            ("POST", "/api/v3/order") => Self::OrderNew,
            ("POST", "/api/v3/order/test") => Self::OrderTest,
            ("GET", "/api/v3/order") => Self::OrderGet,
            ("DELETE", "/api/v3/order") => Self::OrderCancel,
            ("GET", "/api/v3/openOrders") => Self::OpenOrders,
            ("DELETE", "/api/v3/openOrders") => Self::OpenOrdersCancel,
            ("GET", "/api/v3/allOrders") => Self::AllOrders,
            ("GET", "/api/v3/myTrades") => Self::MyTrades,
            ("POST", "/api/v3/orderList/oco") => Self::OcoNew,
            ("POST", "/api/v3/order/oco") => Self::OcoLegacy,
            ("GET", "/api/v3/orderList") => Self::ListGet,
            ("DELETE", "/api/v3/orderList") => Self::ListCancel,
            ("GET", "/api/v3/openOrderList") => Self::OpenLists,
            ("GET", "/api/v3/allOrderList") => Self::AllLists,
            ("GET", "/api/v3/rateLimit/order") => Self::RateLimitOrder,
            _ => return None,
        })
    }

    fn signed(self) -> bool {
        !matches!(
            self,
            Self::Ping
                | Self::Time
                | Self::ExchangeInfo
                | Self::TickerPrice
                | Self::BookTicker
                | Self::AvgPrice
        )
    }

    /// Successful placements and cancels cost 0 weight since 2026-04-02.
    fn free_on_success(self) -> bool {
        matches!(
            self,
            Self::OrderNew | Self::OrderCancel | Self::OcoNew | Self::OcoLegacy | Self::ListCancel
        )
    }

    fn places(self) -> u32 {
        match self {
            Self::OrderNew => 1,
            Self::OcoNew | Self::OcoLegacy => 2,
            _ => 0,
        }
    }

    fn weight(self, p: &Params) -> u32 {
        match self {
            Self::Ping | Self::Time => 1,
            Self::ExchangeInfo | Self::Account | Self::AllOrders | Self::AllLists => 20,
            Self::TickerPrice | Self::BookTicker => {
                if p.has("symbol") {
                    2
                } else {
                    4
                }
            }
            Self::AvgPrice => 2,
            Self::OrderNew
            | Self::OrderTest
            | Self::OrderCancel
            | Self::OcoNew
            | Self::OcoLegacy
            | Self::ListCancel => 1,
            Self::OpenOrdersCancel => 1,
            Self::OrderGet | Self::ListGet => 4,
            Self::OpenOrders => {
                if p.has("symbol") {
                    6
                } else {
                    80
                }
            }
            Self::MyTrades => {
                if p.has("orderId") {
                    5
                } else {
                    20
                }
            }
            Self::OpenLists => 6,
            Self::RateLimitOrder => 40,
        }
    }
}

fn response(status: u16, body: String, headers: &[(&'static str, String)]) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    resp
}

fn error_response(e: &ApiError, headers: &mut Vec<(&'static str, String)>) -> Response {
    if let Some(secs) = e.retry_after {
        headers.push(("retry-after", secs.to_string()));
    }
    response(e.status, e.body(), headers)
}

fn to_json<T: Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string(v).map_err(|e| {
        ApiError::new(
            500,
            -1000,
            format!("An unknown error occurred while processing the request. {e}"),
        )
    })
}

const CLIENT_ID_PARAMS: [&str; 7] = [
    "newClientOrderId",
    "listClientOrderId",
    "aboveClientOrderId",
    "belowClientOrderId",
    "limitClientOrderId",
    "stopClientOrderId",
    "origClientOrderId",
];

/// Entry point of every `/api/v3/…` request.
pub(crate) async fn handle(
    State(sh): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_us = now_us();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let api_key = headers
        .get("x-mbx-apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = String::from_utf8_lossy(&body).into_owned();
    let mut rec = RequestRecord {
        seq: 0,
        transport: "rest".into(),
        method: method.as_str().to_string(),
        path: path.clone(),
        api_key: api_key.clone(),
        client_ids: Vec::new(),
        received_us,
        responded_us: 0,
        status: 0,
        code: None,
    };
    let resp = process(
        &sh,
        peer.ip(),
        &method,
        &path,
        &query,
        &body,
        api_key,
        &mut rec,
    )
    .await;
    rec.status = resp.status().as_u16();
    rec.responded_us = now_us();
    sh.record(rec);
    resp
}

#[allow(clippy::too_many_arguments)]
async fn process(
    sh: &Arc<Shared>,
    ip: IpAddr,
    method: &Method,
    path: &str,
    query: &str,
    body: &str,
    api_key: Option<String>,
    rec: &mut RequestRecord,
) -> Response {
    let mut headers: Vec<(&'static str, String)> = Vec::new();
    let Some(ep) = Ep::route(method, path) else {
        let known = [
            "/api/v3/ping",
            "/api/v3/time",
            "/api/v3/order",
            "/api/v3/openOrders",
            "/api/v3/orderList",
        ];
        let status = if known.contains(&path) { 405 } else { 404 };
        let e = ApiError::new(
            status,
            -1000,
            "An unknown error occurred while processing the request.",
        );
        rec.code = Some(e.code);
        return response(status, e.body(), &[]);
    };
    if let Some(secs) = sh.faults.take_throttle() {
        let e = ApiError::new(
            429,
            -1003,
            "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        )
        .with_retry_after(secs);
        rec.code = Some(e.code);
        return error_response(&e, &mut headers);
    }
    let fault = sh.faults.take_request_rule(method.as_str(), path);
    if let Some((FaultWhen::Before, outcome)) = fault {
        return injected(outcome, rec).await;
    }
    let params = match Params::parse(query, body) {
        Ok(p) => p,
        Err(e) => {
            rec.code = Some(e.code);
            return error_response(&e, &mut headers);
        }
    };
    for name in CLIENT_ID_PARAMS {
        if let Some(v) = params.get(name) {
            rec.client_ids.push(v.to_string());
        }
    }
    let weight = ep.weight(&params);
    let now = now_ms();
    let used = match sh.limiter.request(ip, weight, now) {
        Ok(u) => u,
        Err(e) => {
            rec.code = Some(e.code);
            return error_response(&e, &mut headers);
        }
    };
    let result = dispatch(
        sh,
        ep,
        &params,
        query,
        body,
        api_key.as_deref(),
        &mut headers,
    )
    .await;
    let used = if result.is_ok() && ep.free_on_success() {
        sh.limiter.refund(ip, weight)
    } else {
        used
    };
    headers.push(("x-mbx-used-weight", used.to_string()));
    headers.push(("x-mbx-used-weight-1m", used.to_string()));
    if let Some(delay) = sh.faults.delay_for(path) {
        tokio::time::sleep(delay).await;
    }
    if let Some((FaultWhen::After, outcome)) = fault {
        return injected(outcome, rec).await;
    }
    match result {
        Ok(body) => response(200, body, &headers),
        Err(e) => {
            rec.code = Some(e.code);
            error_response(&e, &mut headers)
        }
    }
}

async fn injected(outcome: FaultOutcome, rec: &mut RequestRecord) -> Response {
    let status = match outcome {
        FaultOutcome::Status(s) => s,
        FaultOutcome::Hang(d) => {
            tokio::time::sleep(d).await;
            503
        }
    };
    let e = ApiError::unknown_outcome();
    rec.code = Some(e.code);
    response(status, e.body(), &[])
}

/// Verifies key, signature and timestamp. Returns the account's API key.
pub(crate) fn authenticate(
    sh: &Shared,
    api_key: Option<&str>,
    params: &Params,
    payload: &str,
    signature: Option<&str>,
) -> Result<String, ApiError> {
    let key = match api_key {
        Some(k) if !k.is_empty() => k,
        _ => return Err(ApiError::key_format()),
    };
    let secret = {
        let eng = sh.engine();
        match eng.accounts.get(key) {
            Some(a) if !a.revoked => a.secret.clone(),
            _ => return Err(ApiError::bad_key()),
        }
    };
    let ts_raw = params.req("timestamp")?;
    let mut ts = parse_u64("timestamp", ts_raw)?;
    if ts > 100_000_000_000_000 {
        ts /= 1000; // microseconds
    }
    let recv = match params.opt("recvWindow")? {
        None => Decimal::from(5000),
        Some(v) => crate::params::parse_decimal("recvWindow", v)?,
    };
    if recv > Decimal::from(60_000) {
        return Err(ApiError::bad(-1131, "recvWindow must be less than 60000"));
    }
    let Some(sig) = signature.filter(|s| !s.is_empty()) else {
        return Err(ApiError::mandatory("signature"));
    };
    if !verify_hmac(&secret, payload.as_bytes(), sig) {
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
    Ok(key.to_string())
}

const TIMING: [&str; 3] = ["recvWindow", "timestamp", "signature"];

fn known(p: &Params, names: &[&str]) -> Result<(), ApiError> {
    let mut all: Vec<&str> = names.to_vec();
    all.extend_from_slice(&TIMING);
    p.check_known(&all)
}

async fn dispatch(
    sh: &Arc<Shared>,
    ep: Ep,
    p: &Params,
    query: &str,
    body: &str,
    api_key: Option<&str>,
    headers: &mut Vec<(&'static str, String)>,
) -> Result<String, ApiError> {
    if !ep.signed() {
        return public(sh, ep, p);
    }
    let (payload, sig) = signed_payload(query, body);
    let acct = authenticate(sh, api_key, p, &payload, sig.as_deref())?;
    let n = ep.places();
    if n > 0 {
        let (c10, cday) = sh.limiter.orders(&acct, n, now_ms())?;
        headers.push(("x-mbx-order-count-10s", c10.to_string()));
        headers.push(("x-mbx-order-count-1d", cday.to_string()));
    }
    signed(sh, ep, p, &acct)
}

fn public(sh: &Shared, ep: Ep, p: &Params) -> Result<String, ApiError> {
    match ep {
        Ep::Ping => {
            p.check_known(&[])?;
            Ok("{}".into())
        }
        Ep::Time => {
            p.check_known(&[])?;
            Ok(format!("{{\"serverTime\":{}}}", now_ms()))
        }
        Ep::ExchangeInfo => {
            p.check_known(&[
                "symbol",
                "symbols",
                "permissions",
                "showPermissionSets",
                "symbolStatus",
            ])?;
            let wanted = symbols_param(p)?;
            let eng = sh.engine();
            let mut symbols = Vec::new();
            match &wanted {
                Some(list) => {
                    for s in list {
                        let st = eng.symbols.get(s).ok_or_else(ApiError::bad_symbol)?;
                        symbols.push(st.info.view());
                    }
                }
                None => symbols.extend(eng.symbols.values().map(|s| s.info.view())),
            }
            let cfg = crate::state::lock(&sh.limiter.cfg).clone();
            let view = ExchangeInfoView {
                timezone: "UTC",
                server_time: now_ms(),
                rate_limits: vec![
                    RateLimitView {
                        rate_limit_type: "REQUEST_WEIGHT",
                        interval: "MINUTE",
                        interval_num: 1,
                        limit: cfg.request_weight_per_minute,
                    },
                    RateLimitView {
                        rate_limit_type: "ORDERS",
                        interval: "SECOND",
                        interval_num: 10,
                        limit: cfg.orders_per_10s,
                    },
                    RateLimitView {
                        rate_limit_type: "ORDERS",
                        interval: "DAY",
                        interval_num: 1,
                        limit: cfg.orders_per_day,
                    },
                    RateLimitView {
                        rate_limit_type: "RAW_REQUESTS",
                        interval: "MINUTE",
                        interval_num: 5,
                        limit: 300_000,
                    },
                ],
                exchange_filters: vec![],
                symbols,
                sors: vec![],
            };
            to_json(&view)
        }
        Ep::TickerPrice | Ep::BookTicker | Ep::AvgPrice => {
            if ep == Ep::AvgPrice {
                p.check_known(&["symbol"])?;
            } else {
                p.check_known(&["symbol", "symbols", "symbolStatus"])?;
            }
            let eng = sh.engine();
            let one = |s: &str| -> Result<String, ApiError> {
                let price = eng.price(s).ok_or_else(ApiError::bad_symbol)?;
                match ep {
                    Ep::TickerPrice => to_json(&TickerView {
                        symbol: s.to_string(),
                        price: fmt8(price),
                    }),
                    Ep::BookTicker => to_json(&BookTickerView {
                        symbol: s.to_string(),
                        bid_price: fmt8(price),
                        bid_qty: fmt8(Decimal::from(10)),
                        ask_price: fmt8(price),
                        ask_qty: fmt8(Decimal::from(10)),
                    }),
                    _ => to_json(&AvgPriceView {
                        mins: 5,
                        price: fmt8(price),
                        close_time: now_ms(),
                    }),
                }
            };
            if let Some(s) = p.opt("symbol")? {
                if p.has("symbols") {
                    return Err(ApiError::bad(
                        -1128,
                        "Combination of optional parameters invalid.",
                    ));
                }
                return one(s);
            }
            if ep == Ep::AvgPrice {
                return Err(ApiError::mandatory("symbol"));
            }
            let names: Vec<String> = match symbols_param(p)? {
                Some(v) => v,
                None => eng.symbols.keys().cloned().collect(),
            };
            let mut out = Vec::new();
            for n in &names {
                out.push(one(n)?);
            }
            Ok(format!("[{}]", out.join(",")))
        }
        _ => Err(ApiError::new(
            500,
            -1000,
            "An unknown error occurred while processing the request.",
        )),
    }
}

fn symbols_param(p: &Params) -> Result<Option<Vec<String>>, ApiError> {
    if let Some(s) = p.opt("symbol")? {
        return Ok(Some(vec![s.to_string()]));
    }
    match p.opt("symbols")? {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Vec<String>>(raw)
            .map(Some)
            .map_err(|_| {
                ApiError::illegal(
                    "symbols",
                    "^\\[(\"[A-Z0-9-_.]{1,20}\"(,\"[A-Z0-9-_.]{1,20}\"){0,}){0,1}\\]$",
                )
            }),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderCountView {
    rate_limit_type: &'static str,
    interval: &'static str,
    interval_num: u32,
    limit: u32,
    count: u32,
}

#[derive(Serialize)]
struct TickerView {
    symbol: String,
    price: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BookTickerView {
    symbol: String,
    bid_price: String,
    bid_qty: String,
    ask_price: String,
    ask_qty: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AvgPriceView {
    mins: u32,
    price: String,
    close_time: u64,
}

const ORDER_PARAMS: [&str; 18] = [
    "symbol",
    "side",
    "type",
    "timeInForce",
    "quantity",
    "quoteOrderQty",
    "price",
    "newClientOrderId",
    "strategyId",
    "strategyType",
    "stopPrice",
    "trailingDelta",
    "icebergQty",
    "newOrderRespType",
    "selfTradePreventionMode",
    "pegPriceType",
    "pegOffsetValue",
    "pegOffsetType",
];

fn parse_side(p: &Params) -> Result<Side, ApiError> {
    Side::parse(p.req("side")?).ok_or_else(|| ApiError::bad(-1117, "Invalid side."))
}

fn parse_tif(v: &str) -> Result<Tif, ApiError> {
    Tif::parse(v).ok_or_else(|| ApiError::bad(-1115, "Invalid timeInForce."))
}

fn parse_resp(p: &Params, default: RespType) -> Result<RespType, ApiError> {
    match p.opt("newOrderRespType")? {
        None => Ok(default),
        Some(v) => RespType::parse(v)
            .ok_or_else(|| ApiError::illegal("newOrderRespType", "ACK, RESULT, FULL")),
    }
}

fn common_unsupported(p: &Params, prefix: &str) -> Result<(), ApiError> {
    if let Some(m) = p.opt("selfTradePreventionMode")?
        && m != "NONE"
    {
        return Err(ApiError::bad(
            -1013,
            "This symbol does not allow the specified self-trade prevention mode.",
        ));
    }
    if p.opt(&format!("{prefix}trailingDelta"))?.is_some()
        || p.opt(&format!("{prefix}TrailingDelta"))?.is_some()
    {
        return Err(ApiError::rejected(
            "Trailing stop orders are not supported for this symbol.",
        ));
    }
    for name in [format!("{prefix}icebergQty"), format!("{prefix}IcebergQty")] {
        if let Some(q) = p.dec(&name)?
            && !q.is_zero()
        {
            return Err(ApiError::rejected(
                "Iceberg orders are not supported for this symbol.",
            ));
        }
    }
    if let Some(t) = p.opt("strategyType")?
        && parse_u64("strategyType", t)? < 1_000_000
    {
        return Err(ApiError::bad(-1134, "strategyType was less than 1000000."));
    }
    Ok(())
}

fn not_sent(p: &Params, name: &str) -> Result<(), ApiError> {
    if p.has(name) {
        return Err(ApiError::not_required(name));
    }
    Ok(())
}

fn parse_new_order(p: &Params) -> Result<(NewOrder, RespType), ApiError> {
    known(p, &ORDER_PARAMS)?;
    let symbol = p.req("symbol")?.to_string();
    let side = parse_side(p)?;
    let otype =
        OType::parse(p.req("type")?).ok_or_else(|| ApiError::bad(-1116, "Invalid orderType."))?;
    let tif = match p.opt("timeInForce")? {
        Some(t) => Some(parse_tif(t)?),
        None => None,
    };
    let cid = p.client_id("newClientOrderId")?.map(str::to_string);
    common_unsupported(p, "")?;
    if p.has("pegPriceType") {
        return Err(ApiError::rejected(
            "Pegged orders are not supported for this symbol.",
        ));
    }
    let mut req = NewOrder {
        symbol,
        side,
        otype,
        tif: tif.unwrap_or(Tif::Gtc),
        qty: None,
        quote_qty: None,
        price: Decimal::ZERO,
        stop: Decimal::ZERO,
        cid,
    };
    if otype == OType::Market {
        req.qty = p.dec("quantity")?;
        req.quote_qty = p.dec("quoteOrderQty")?;
        match (req.qty, req.quote_qty) {
            (None, None) => return Err(ApiError::either("quantity", "quoteOrderQty")),
            (Some(_), Some(_)) => return Err(ApiError::not_required("quoteOrderQty")),
            _ => {}
        }
        not_sent(p, "price")?;
        not_sent(p, "stopPrice")?;
        if tif.is_some() {
            return Err(ApiError::bad(
                -1114,
                "TimeInForce parameter sent when not required.",
            ));
        }
    } else {
        req.qty = Some(p.req_dec("quantity")?);
        not_sent(p, "quoteOrderQty")?;
        if otype.needs_tif() {
            if tif.is_none() {
                return Err(ApiError::mandatory("timeInForce"));
            }
        } else if tif.is_some() {
            return Err(ApiError::bad(
                -1114,
                "TimeInForce parameter sent when not required.",
            ));
        }
        if otype.has_price() {
            req.price = p.req_dec("price")?;
        } else {
            not_sent(p, "price")?;
        }
        if otype.is_algo() {
            req.stop = p.req_dec("stopPrice")?;
        } else {
            not_sent(p, "stopPrice")?;
        }
    }
    let default = if matches!(otype, OType::Market | OType::Limit) {
        RespType::Full
    } else {
        RespType::Ack
    };
    let resp = parse_resp(p, default)?;
    Ok((req, resp))
}

fn check_order_filters(eng: &Engine, req: &NewOrder) -> Result<(), ApiError> {
    let st = eng
        .symbols
        .get(&req.symbol)
        .ok_or_else(ApiError::bad_symbol)?;
    st.info.allows(req.otype)?;
    st.info.check(&FilterInput {
        is_buy: req.side == Side::Buy,
        is_market: req.otype == OType::Market,
        quantity: req.qty,
        price: req.otype.has_price().then_some(req.price),
        stop_price: req.otype.is_algo().then_some(req.stop),
        last_price: st.price,
    })
}

const OCO_LEG_FIELDS: [&str; 12] = [
    "Type",
    "ClientOrderId",
    "IcebergQty",
    "Price",
    "StopPrice",
    "TrailingDelta",
    "TimeInForce",
    "StrategyId",
    "StrategyType",
    "PegPriceType",
    "PegOffsetType",
    "PegOffsetValue",
];

fn parse_leg(p: &Params, prefix: &str) -> Result<LegSpec, ApiError> {
    let name = |f: &str| format!("{prefix}{f}");
    let otype = OType::parse(p.req(&name("Type"))?)
        .ok_or_else(|| ApiError::bad(-1116, "Invalid orderType."))?;
    if matches!(otype, OType::Market | OType::Limit) {
        return Err(ApiError::bad(-1158, "Order type not supported in OCO."));
    }
    let price = if otype.has_price() {
        p.req_dec(&name("Price"))?
    } else {
        not_sent(p, &name("Price"))?;
        Decimal::ZERO
    };
    let stop = if otype.is_algo() {
        p.req_dec(&name("StopPrice"))?
    } else {
        not_sent(p, &name("StopPrice"))?;
        Decimal::ZERO
    };
    let tif = if otype.needs_tif() {
        parse_tif(p.req(&name("TimeInForce"))?)?
    } else {
        not_sent(p, &name("TimeInForce"))?;
        Tif::Gtc
    };
    if p.has(&name("PegPriceType")) {
        return Err(ApiError::rejected(
            "Pegged orders are not supported for this symbol.",
        ));
    }
    let cid = p.client_id(&name("ClientOrderId"))?.map(str::to_string);
    Ok(LegSpec {
        otype,
        price,
        stop,
        tif,
        cid,
    })
}

fn check_oco_structure(side: Side, above: &LegSpec, below: &LegSpec) -> Result<(), ApiError> {
    if !above.otype.is_algo() && !below.otype.is_algo() {
        return Err(ApiError::bad(
            -1168,
            "At least one OCO order must be contingent.",
        ));
    }
    match side {
        Side::Sell => {
            if above.otype.is_stop() {
                return Err(ApiError::bad(
                    -1197,
                    "A stop loss order in a sell OCO must be below.",
                ));
            }
            if below.otype == OType::LimitMaker {
                return Err(ApiError::bad(
                    -1166,
                    "A limit order in a sell OCO must be above.",
                ));
            }
            if below.otype.is_tp() {
                return Err(ApiError::bad(
                    -1199,
                    "A take profit order in a sell OCO must be above.",
                ));
            }
        }
        Side::Buy => {
            if above.otype == OType::LimitMaker {
                return Err(ApiError::bad(
                    -1165,
                    "A limit order in a buy OCO must be below.",
                ));
            }
            if above.otype.is_tp() {
                return Err(ApiError::bad(
                    -1198,
                    "A take profit order in a buy OCO must be below.",
                ));
            }
            if below.otype.is_stop() {
                return Err(ApiError::bad(
                    -1196,
                    "A stop loss order in a buy OCO must be above.",
                ));
            }
        }
    }
    Ok(())
}

fn parse_oco(p: &Params) -> Result<(NewOco, RespType), ApiError> {
    let mut names: Vec<String> = [
        "symbol",
        "listClientOrderId",
        "side",
        "quantity",
        "newOrderRespType",
        "selfTradePreventionMode",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for prefix in ["above", "below"] {
        for f in OCO_LEG_FIELDS {
            names.push(format!("{prefix}{f}"));
        }
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    known(p, &refs)?;
    let symbol = p.req("symbol")?.to_string();
    let side = parse_side(p)?;
    let qty = p.req_dec("quantity")?;
    let list_cid = p.client_id("listClientOrderId")?.map(str::to_string);
    common_unsupported(p, "above")?;
    common_unsupported(p, "below")?;
    let above = parse_leg(p, "above")?;
    let below = parse_leg(p, "below")?;
    check_oco_structure(side, &above, &below)?;
    let resp = parse_resp(p, RespType::Result)?;
    Ok((
        NewOco {
            symbol,
            side,
            qty,
            list_cid,
            above,
            below,
        },
        resp,
    ))
}

const LEGACY_OCO_PARAMS: [&str; 18] = [
    "symbol",
    "listClientOrderId",
    "side",
    "quantity",
    "limitClientOrderId",
    "price",
    "limitStrategyId",
    "limitStrategyType",
    "limitIcebergQty",
    "trailingDelta",
    "stopClientOrderId",
    "stopPrice",
    "stopStrategyId",
    "stopStrategyType",
    "stopLimitPrice",
    "stopIcebergQty",
    "stopLimitTimeInForce",
    "newOrderRespType",
];

fn parse_legacy_oco(p: &Params) -> Result<(NewOco, RespType), ApiError> {
    let mut names: Vec<&str> = LEGACY_OCO_PARAMS.to_vec();
    names.push("selfTradePreventionMode");
    known(p, &names)?;
    let symbol = p.req("symbol")?.to_string();
    let side = parse_side(p)?;
    let qty = p.req_dec("quantity")?;
    let list_cid = p.client_id("listClientOrderId")?.map(str::to_string);
    common_unsupported(p, "")?;
    common_unsupported(p, "limit")?;
    common_unsupported(p, "stop")?;
    let limit = LegSpec {
        otype: OType::LimitMaker,
        price: p.req_dec("price")?,
        stop: Decimal::ZERO,
        tif: Tif::Gtc,
        cid: p.client_id("limitClientOrderId")?.map(str::to_string),
    };
    let stop_limit = p.dec("stopLimitPrice")?;
    let stop = LegSpec {
        otype: if stop_limit.is_some() {
            OType::StopLossLimit
        } else {
            OType::StopLoss
        },
        price: stop_limit.unwrap_or_default(),
        stop: p.req_dec("stopPrice")?,
        tif: match (stop_limit, p.opt("stopLimitTimeInForce")?) {
            (Some(_), Some(t)) => parse_tif(t)?,
            (Some(_), None) => return Err(ApiError::mandatory("stopLimitTimeInForce")),
            (None, Some(_)) => return Err(ApiError::not_required("stopLimitTimeInForce")),
            (None, None) => Tif::Gtc,
        },
        cid: p.client_id("stopClientOrderId")?.map(str::to_string),
    };
    let (above, below) = match side {
        Side::Sell => (limit, stop),
        Side::Buy => (stop, limit),
    };
    let resp = parse_resp(p, RespType::Result)?;
    Ok((
        NewOco {
            symbol,
            side,
            qty,
            list_cid,
            above,
            below,
        },
        resp,
    ))
}

fn check_oco_filters(eng: &Engine, req: &NewOco) -> Result<(), ApiError> {
    let st = eng
        .symbols
        .get(&req.symbol)
        .ok_or_else(ApiError::bad_symbol)?;
    st.info.allows_oco()?;
    for leg in [&req.below, &req.above] {
        st.info.allows(leg.otype)?;
    }
    for leg in [&req.below, &req.above] {
        st.info.check(&FilterInput {
            is_buy: req.side == Side::Buy,
            is_market: false,
            quantity: Some(req.qty),
            price: leg.otype.has_price().then_some(leg.price),
            stop_price: leg.otype.is_algo().then_some(leg.stop),
            last_price: st.price,
        })?;
    }
    Ok(())
}

/// Places a parsed OCO and renders the answer (shared with the WebSocket API).
pub(crate) fn oco_answer(
    eng: &mut Engine,
    acct: &str,
    req: NewOco,
    resp: RespType,
) -> Result<ListView, ApiError> {
    check_oco_filters(eng, &req)?;
    let now = now_us();
    let list_id = eng.place_oco(acct, req, now);
    eng.flush(now);
    let list_id = list_id?;
    let l = eng
        .lists
        .get(&list_id)
        .cloned()
        .ok_or_else(ApiError::no_list)?;
    let ms = now / 1000;
    let reports: Vec<ReportView> = l
        .legs
        .iter()
        .filter_map(|id| eng.orders.get(id))
        .map(|o| match resp {
            RespType::Ack => ReportView::Ack(o.ack_view(ms)),
            RespType::Result => ReportView::Result(o.result_view(ms, None)),
            RespType::Full => ReportView::Result(o.result_view(ms, Some(Vec::new()))),
        })
        .collect();
    Ok(eng.list_view(&l, Some(reports), ms))
}

fn list_range<T: Clone>(items: Vec<T>, limit: Option<u64>) -> Result<Vec<T>, ApiError> {
    let limit = limit.unwrap_or(500);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad(
            -1130,
            "Data sent for parameter 'limit' is not valid.",
        ));
    }
    let n = usize::try_from(limit).unwrap_or(1000);
    Ok(items.into_iter().take(n).collect())
}

fn signed(sh: &Shared, ep: Ep, p: &Params, acct: &str) -> Result<String, ApiError> {
    match ep {
        Ep::Account => {
            known(p, &["omitZeroBalances"])?;
            let omit = p.opt("omitZeroBalances")? == Some("true");
            let eng = sh.engine();
            let v = eng.account_view(acct, omit).ok_or_else(ApiError::bad_key)?;
            to_json(&v)
        }
        Ep::OrderNew | Ep::OrderTest => {
            let (req, resp) = parse_new_order(p)?;
            let mut eng = sh.engine();
            check_order_filters(&eng, &req)?;
            if ep == Ep::OrderTest {
                return Ok("{}".into());
            }
            let now = now_us();
            let placed = eng.place(acct, req, now);
            eng.flush(now);
            let (id, fills) = placed?;
            let o = eng.orders.get(&id).ok_or_else(ApiError::no_order)?;
            let ms = now / 1000;
            match resp {
                RespType::Ack => to_json(&o.ack_view(ms)),
                RespType::Result => to_json(&o.result_view(ms, None)),
                RespType::Full => to_json(&o.result_view(ms, Some(fills))),
            }
        }
        Ep::OrderGet => {
            known(p, &["symbol", "orderId", "origClientOrderId"])?;
            let symbol = p.req("symbol")?;
            let id = p.u64("orderId")?;
            let cid = p.opt("origClientOrderId")?;
            let eng = sh.engine();
            if !eng.symbols.contains_key(symbol) {
                return Err(ApiError::bad_symbol());
            }
            let oid = eng.find_stored_order(acct, symbol, id, cid, now_us())?;
            let o = eng.orders.get(&oid).ok_or_else(ApiError::no_order)?;
            to_json(&o.query_view())
        }
        Ep::OrderCancel => {
            known(
                p,
                &[
                    "symbol",
                    "orderId",
                    "origClientOrderId",
                    "newClientOrderId",
                    "cancelRestrictions",
                ],
            )?;
            let symbol = p.req("symbol")?;
            let id = p.u64("orderId")?;
            let cid = p.opt("origClientOrderId")?;
            let new_cid = p.client_id("newClientOrderId")?.map(str::to_string);
            let restriction = p.opt("cancelRestrictions")?;
            if let Some(r) = restriction
                && r != "ONLY_NEW"
                && r != "ONLY_PARTIALLY_FILLED"
            {
                return Err(ApiError::bad(
                    -1145,
                    "cancelRestrictions has to be either ONLY_NEW or ONLY_PARTIALLY_FILLED.",
                ));
            }
            let mut eng = sh.engine();
            if !eng.symbols.contains_key(symbol) {
                return Err(ApiError::bad_symbol());
            }
            let now = now_us();
            let r = eng.cancel(acct, symbol, id, cid, new_cid, restriction, now);
            eng.flush(now);
            to_json(&r?)
        }
        Ep::OpenOrders => {
            known(p, &["symbol"])?;
            let symbol = p.opt("symbol")?;
            let eng = sh.engine();
            if let Some(s) = symbol
                && !eng.symbols.contains_key(s)
            {
                return Err(ApiError::bad_symbol());
            }
            let a = eng.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
            let mut ids: Vec<u64> = a.open_cids.values().copied().collect();
            ids.sort_unstable();
            let v: Vec<_> = ids
                .iter()
                .filter_map(|id| eng.orders.get(id))
                .filter(|o| o.is_open() && symbol.is_none_or(|s| o.symbol == s))
                .map(|o| o.open_view())
                .collect();
            to_json(&v)
        }
        Ep::OpenOrdersCancel => {
            known(p, &["symbol"])?;
            let symbol = p.req("symbol")?;
            let mut eng = sh.engine();
            if !eng.symbols.contains_key(symbol) {
                return Err(ApiError::bad_symbol());
            }
            let a = eng.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
            let mut ids: Vec<u64> = a.open_cids.values().copied().collect();
            ids.sort_unstable();
            let now = now_us();
            let mut out: Vec<String> = Vec::new();
            let mut seen_lists = Vec::new();
            for id in ids {
                let Some(o) = eng.orders.get(&id) else {
                    continue;
                };
                if !o.is_open() || o.symbol != symbol {
                    continue;
                }
                if o.list_id >= 0 {
                    let lid = o.list_id;
                    if seen_lists.contains(&lid) {
                        continue;
                    }
                    seen_lists.push(lid);
                    let v = eng.cancel_list(acct, symbol, Some(lid), None, None, now)?;
                    out.push(to_json(&v)?);
                } else {
                    let v = eng.cancel(acct, symbol, Some(id), None, None, None, now)?;
                    out.push(to_json(&v)?);
                }
            }
            eng.flush(now);
            if out.is_empty() {
                return Err(ApiError::unknown_cancel());
            }
            Ok(format!("[{}]", out.join(",")))
        }
        Ep::AllOrders => {
            known(p, &["symbol", "orderId", "startTime", "endTime", "limit"])?;
            let symbol = p.req("symbol")?;
            let from = p.u64("orderId")?;
            let start = p.u64("startTime")?;
            let end = p.u64("endTime")?;
            let limit = p.u64("limit")?;
            let eng = sh.engine();
            if !eng.symbols.contains_key(symbol) {
                return Err(ApiError::bad_symbol());
            }
            let a = eng.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
            let now = now_us();
            let mut v: Vec<_> = a
                .orders
                .iter()
                .filter_map(|id| eng.orders.get(id))
                .filter(|o| o.symbol == symbol)
                .filter(|o| o.stored_us <= now)
                .filter(|o| from.is_none_or(|f| o.id >= f))
                .filter(|o| start.is_none_or(|s| o.time_us / 1000 >= s))
                .filter(|o| end.is_none_or(|e| o.time_us / 1000 <= e))
                .collect();
            if from.is_none() && start.is_none() {
                // Without a starting point Binance returns the most recent orders.
                let n = usize::try_from(limit.unwrap_or(500).min(1000)).unwrap_or(500);
                let skip = v.len().saturating_sub(n);
                v.drain(..skip);
            }
            let v: Vec<_> = v.into_iter().map(|o| o.open_view()).collect();
            to_json(&list_range(v, limit)?)
        }
        Ep::MyTrades => {
            known(
                p,
                &[
                    "symbol",
                    "orderId",
                    "startTime",
                    "endTime",
                    "fromId",
                    "limit",
                ],
            )?;
            let symbol = p.req("symbol")?;
            let order_id = p.u64("orderId")?;
            let start = p.u64("startTime")?;
            let end = p.u64("endTime")?;
            let from = p.u64("fromId")?;
            let limit = p.u64("limit")?;
            let eng = sh.engine();
            if !eng.symbols.contains_key(symbol) {
                return Err(ApiError::bad_symbol());
            }
            let a = eng.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
            let mut v: Vec<_> = a
                .trades
                .iter()
                .filter_map(|i| eng.trades.get(*i))
                .filter(|t| t.symbol == symbol)
                .filter(|t| order_id.is_none_or(|o| t.order_id == o))
                .filter(|t| from.is_none_or(|f| t.id >= f))
                .filter(|t| start.is_none_or(|s| t.time_us / 1000 >= s))
                .filter(|t| end.is_none_or(|e| t.time_us / 1000 <= e))
                .collect();
            if from.is_none() && start.is_none() {
                let n = usize::try_from(limit.unwrap_or(500).min(1000)).unwrap_or(500);
                let skip = v.len().saturating_sub(n);
                v.drain(..skip);
            }
            let v: Vec<_> = v.into_iter().map(|t| t.view()).collect();
            to_json(&list_range(v, limit)?)
        }
        Ep::OcoNew | Ep::OcoLegacy => {
            let (req, resp) = if ep == Ep::OcoNew {
                parse_oco(p)?
            } else {
                parse_legacy_oco(p)?
            };
            let mut eng = sh.engine();
            let v = oco_answer(&mut eng, acct, req, resp)?;
            to_json(&v)
        }
        Ep::ListGet => {
            known(p, &["orderListId", "origClientOrderId"])?;
            let id = p.i64("orderListId")?;
            let cid = p.opt("origClientOrderId")?;
            if id.is_none() && cid.is_none() {
                return Err(ApiError::either("orderListId", "origClientOrderId"));
            }
            let eng = sh.engine();
            let lid = eng.find_stored_list(acct, id, cid, now_us())?;
            let l = eng.lists.get(&lid).ok_or_else(ApiError::no_list)?;
            to_json(&eng.list_view(l, None, l.time_us / 1000))
        }
        Ep::ListCancel => {
            known(
                p,
                &[
                    "symbol",
                    "orderListId",
                    "listClientOrderId",
                    "newClientOrderId",
                ],
            )?;
            let symbol = p.req("symbol")?;
            let id = p.i64("orderListId")?;
            let cid = p.opt("listClientOrderId")?;
            let new_cid = p.client_id("newClientOrderId")?.map(str::to_string);
            let mut eng = sh.engine();
            if !eng.symbols.contains_key(symbol) {
                return Err(ApiError::bad_symbol());
            }
            let now = now_us();
            let r = eng.cancel_list(acct, symbol, id, cid, new_cid, now);
            eng.flush(now);
            to_json(&r?)
        }
        Ep::OpenLists | Ep::AllLists => {
            if ep == Ep::OpenLists {
                known(p, &[])?;
            } else {
                known(p, &["fromId", "startTime", "endTime", "limit"])?;
            }
            let from = p.i64("fromId")?;
            let start = p.u64("startTime")?;
            let end = p.u64("endTime")?;
            let limit = p.u64("limit")?;
            let eng = sh.engine();
            let a = eng.accounts.get(acct).ok_or_else(ApiError::bad_key)?;
            let now = now_us();
            let mut lists: Vec<_> = a
                .lists
                .iter()
                .filter_map(|id| eng.lists.get(id))
                // The open lists are read from memory first; the history from
                // the database alone, which a fresh list may not have reached.
                .filter(|l| {
                    if ep == Ep::AllLists {
                        l.stored_us <= now
                    } else {
                        !l.done
                    }
                })
                .filter(|l| from.is_none_or(|f| l.id >= f))
                .filter(|l| start.is_none_or(|s| l.time_us / 1000 >= s))
                .filter(|l| end.is_none_or(|e| l.time_us / 1000 <= e))
                .collect();
            if ep == Ep::AllLists && from.is_none() && start.is_none() {
                // Newest first, as in Binance's sample.
                lists.reverse();
            }
            let v: Vec<ListView> = lists
                .into_iter()
                .map(|l| eng.list_view(l, None, l.time_us / 1000))
                .collect();
            if ep == Ep::AllLists {
                to_json(&list_range(v, limit)?)
            } else {
                to_json(&v)
            }
        }
        Ep::RateLimitOrder => {
            known(p, &[])?;
            let (c10, cday) = sh.limiter.order_counts(acct, now_ms());
            let cfg = crate::state::lock(&sh.limiter.cfg).clone();
            to_json(&[
                OrderCountView {
                    rate_limit_type: "ORDERS",
                    interval: "SECOND",
                    interval_num: 10,
                    limit: cfg.orders_per_10s,
                    count: c10,
                },
                OrderCountView {
                    rate_limit_type: "ORDERS",
                    interval: "DAY",
                    interval_num: 1,
                    limit: cfg.orders_per_day,
                    count: cday,
                },
            ])
        }
        _ => Err(ApiError::new(
            500,
            -1000,
            "An unknown error occurred while processing the request.",
        )),
    }
}
