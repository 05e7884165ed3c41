//! Binance-Spot-compatible exchange simulator for ocoguard's tests, demo and benchmarks.
//!
//! It speaks Binance's Spot REST API (`/api/v3/…`, HMAC-signed) and WebSocket API
//! (`/ws-api/v3`, user data stream subscriptions) over real HTTP and WebSocket on one port,
//! matches orders against a per-symbol last price that tests control, and offers an admin
//! HTTP API (`/admin/…`) plus an in-process [`SimControl`] for prices, accounts, inspection
//! and fault injection.
//!
//! Not here: an order book or other traders (fills happen at the controlled price), market
//! data streams, Ed25519/RSA keys, persistence, margin, or anything of ocoguard's own logic.
//! Start one with [`Sim::start`]; see the crate README for the admin API and deviations.

mod admin;
mod config;
mod control;
mod engine;
mod error;
mod params;
mod rest;
mod state;
mod symbols;
mod util;
mod views;
mod ws;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get};
use axum::serve::ListenerExt as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{AccountSpec, Commission, CommissionAsset, RateLimits, SimConfig};
pub use control::{
    BalanceInfo, FaultOutcome, FaultWhen, OrderInfo, OrderListInfo, RequestFault, RequestRecord,
    SimControl, TradeInfo,
};
pub use error::SimError;
pub use util::hmac_sha256_hex;

use engine::{ConnMsg, Engine};
use state::{Faults, Limiter, RequestLog, Shared, WsSettings};

/// A running simulator. Dropping it stops the server too; [`Sim::shutdown`] waits for that.
#[derive(Debug)]
pub struct Sim {
    addr: SocketAddr,
    control: SimControl,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Sim {
    /// Binds `config.listen` (port 0 picks a free port) and serves in a background task.
    ///
    /// # Errors
    /// [`SimError::Bind`] when the address cannot be bound.
    pub async fn start(config: SimConfig) -> Result<Sim, SimError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr()?;
        // Nagle off, as an exchange's servers have it: a stream's events are
        // small frames written one after another, and with Nagle each waits
        // for the ACK of the one before, which a client may delay by 40 ms.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted connection");
            }
        });
        let mut engine = Engine::new(symbols::builtin());
        for a in &config.accounts {
            engine.upsert_account(a, util::now_us());
        }
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            faults: Faults::default(),
            limiter: Limiter::new(config.rate_limits.clone()),
            log: Mutex::new(RequestLog {
                cap: config.request_log_capacity,
                next_seq: 1,
                entries: VecDeque::new(),
            }),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            stream_attempts: Mutex::new(VecDeque::new()),
            ws: Mutex::new(WsSettings {
                ping_interval: config.ping_interval,
                pong_timeout: config.pong_timeout,
                max_age: config.max_connection_age,
                first_subscription_id: 0,
            }),
            admin: config.admin,
            faults_enabled: config.faults,
        });
        let mut app = Router::new().route("/ws-api/v3", get(ws::upgrade));
        if shared.admin {
            app = app.route("/admin/{*rest}", any(admin::handle));
        }
        let app = app.fallback(rest::handle).with_state(shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "exchange-sim server stopped");
            }
        });
        tracing::info!(%addr, "exchange-sim listening");
        Ok(Sim {
            addr,
            control: SimControl { shared },
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, the REST base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://IP:PORT/ws-api/v3`, the WebSocket API URL.
    pub fn ws_api_url(&self) -> String {
        format!("ws://{}/ws-api/v3", self.addr)
    }

    /// A cloneable control handle.
    pub fn control(&self) -> SimControl {
        self.control.clone()
    }

    /// Closes WebSocket connections, stops accepting and waits (at most 5 s) for the server.
    pub async fn shutdown(mut self) {
        self.control.shared.broadcast(None, &ConnMsg::Drop);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            self.control.shared.broadcast(None, &ConnMsg::Drop);
            let _ = stop.send(());
        }
    }
}
