//! `GET /metrics`.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// The content type of the answer (OpenMetrics text, which Prometheus reads).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, METRICS_CONTENT_TYPE)], metrics.encode())
}

/// A router answering `GET /metrics`, to serve alone or merge into another.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .with_state(metrics)
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A running metrics endpoint and coverage refresher; both stop when it is
/// dropped.
#[derive(Debug)]
pub struct Exporter {
    addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Exporter {
    /// Binds `listen`, serves `GET /metrics` there and refreshes the coverage
    /// gauges from `coverage` every [`crate::COVERAGE_REFRESH`].
    ///
    /// # Errors
    /// When `listen` cannot be bound.
    pub async fn start(
        listen: std::net::SocketAddr,
        metrics: Arc<Metrics>,
        coverage: Arc<dyn oco_core::ports::Coverage>,
        clock: Arc<dyn oco_core::ports::Clock>,
    ) -> std::io::Result<Exporter> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let server = {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                if let Err(err) = serve(listener, metrics, std::future::pending()).await {
                    tracing::error!(error = %err, "metrics endpoint failed");
                }
            })
        };
        Ok(Exporter {
            addr,
            tasks: vec![server, Exporter::refresher(metrics, coverage, clock)],
        })
    }

    /// Only the coverage refresher, for a process that serves `/metrics` on
    /// a router of its own.
    pub fn refresh_only(
        metrics: Arc<Metrics>,
        coverage: Arc<dyn oco_core::ports::Coverage>,
        clock: Arc<dyn oco_core::ports::Clock>,
    ) -> Exporter {
        Exporter {
            addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            tasks: vec![Exporter::refresher(metrics, coverage, clock)],
        }
    }

    fn refresher(
        metrics: Arc<Metrics>,
        coverage: Arc<dyn oco_core::ports::Coverage>,
        clock: Arc<dyn oco_core::ports::Clock>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::refresh_coverage(
            metrics,
            coverage,
            clock,
            crate::COVERAGE_REFRESH,
            std::future::pending(),
        ))
    }

    /// Where `/metrics` is served (`0.0.0.0:0` for [`Exporter::refresh_only`]).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
