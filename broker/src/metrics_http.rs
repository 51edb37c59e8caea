//! `broker run --metrics-listen ADDR`: Prometheus text on `GET /metrics` (plain HTTP: put it on a
//! loopback or management address, never on the internet-facing one).
//!
//! Gateway counters come from [`Metrics`], the core's from [`crate::telemetry::CoreStats`], and
//! job, alarm and queue counts from a read transaction of the store, taken on a blocking thread
//! so a scrape never waits on (or holds up) the core's writes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::core::Core;
use crate::metrics::Metrics;

#[derive(Clone)]
struct Sources {
    gateway: Arc<Metrics>,
    core: Arc<Core>,
}

/// What one scraper may hold of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A request's headers must have arrived this long after the connection opened (or after
    /// the previous response on it).
    pub header_timeout: std::time::Duration,
    /// Connections held at once.
    pub max_connections: usize,
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    _limits: HttpLimits,
    gateway: Arc<Metrics>,
    core: Arc<Core>,
    stop: CancellationToken,
) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/",
            get(|| async { "chukei broker: metrics at /metrics\n" }),
        )
        .with_state(Sources { gateway, core });
    info!(%addr, "metrics endpoint ready");
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "metrics endpoint stopped");
    }
}

async fn metrics(State(src): State<Sources>) -> impl IntoResponse {
    let core = src.core.clone();
    let store = tokio::task::spawn_blocking(move || core.store().stats()).await;
    let store = match store {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            warn!(error = %e, "metrics: cannot read the store");
            None
        }
        Err(e) => {
            warn!(error = %e, "metrics: store reader panicked");
            None
        }
    };
    let mut body = crate::telemetry::render(&src.gateway, src.core.telemetry(), store.as_ref());
    body.push_str(&src.gateway.render_limits());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
