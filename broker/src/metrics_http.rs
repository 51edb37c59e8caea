//! `broker run --metrics-listen ADDR`: Prometheus text on `GET /metrics`, and the health checks
//! of load balancers and supervisors: `GET /healthz` (200 while the process serves) and
//! `GET /readyz` (200 `{"ready":true}` when the relay should be sent clients, else 503
//! `{"ready":false,"reason":"…"}`; [`crate::health`]). Plain HTTP: put it on a loopback or
//! management address, never on the internet-facing one.
//!
//! Gateway counters come from [`Metrics`], the core's from [`crate::telemetry::CoreStats`], and
//! job, alarm and queue counts from a read transaction of the store, taken on a blocking thread
//! so a scrape never waits on (or holds up) the core's writes.
//!
//! Its sockets come out of the same file limit as the relay's clients, so whoever reaches the
//! port may hold only a few ([`HttpLimits::max_connections`]; one more is closed at once) and
//! only briefly: a request's headers must all arrive within [`HttpLimits::header_timeout`] of
//! the connection opening (or of the previous response), else the connection is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::core::Core;
use crate::health::Health;
use crate::log_budget::LogBudget;
use crate::metrics::Metrics;

/// What one scraper may hold of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A request's headers must have arrived this long after the connection opened (or after
    /// the previous response on it).
    pub header_timeout: std::time::Duration,
    /// Connections held at once.
    pub max_connections: usize,
}

#[derive(Clone)]
struct Sources {
    gateway: Arc<Metrics>,
    core: Arc<Core>,
    health: Arc<Health>,
}

/// The endpoint's refusals, each logged within a budget of its own (anyone who reaches the port
/// can cause them at will) and counted.
#[derive(Default)]
struct Refusals {
    full: LogBudget,
    slow: LogBudget,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    limits: HttpLimits,
    gateway: Arc<Metrics>,
    core: Arc<Core>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/",
            get(|| async {
                "chukei broker: metrics at /metrics, health at /healthz and /readyz\n"
            }),
        )
        .with_state(Sources {
            gateway: gateway.clone(),
            core,
            health,
        });
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Refusals::default());
    let tasks = TaskTracker::new();
    info!(%addr, "metrics endpoint ready");
    loop {
        let tcp = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            // Closed at once: a full endpoint costs an accept and a close, and holds no file.
            let total = Metrics::inc(&gateway.metrics_http_refused);
            if let Some(suppressed) = refusals.full.check() {
                warn!(
                    limit = "metrics_max_connections",
                    max = limits.max_connections,
                    suppressed,
                    total,
                    "limit exceeded: metrics endpoint connection closed"
                );
            }
            drop(tcp);
            continue;
        };
        tasks.spawn(serve_connection(
            tcp,
            place,
            app.clone(),
            limits,
            gateway.clone(),
            refusals.clone(),
            stop.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
}

/// One connection, until the client closes it, its headers come too slowly, or the broker stops.
async fn serve_connection(
    tcp: TcpStream,
    _place: OwnedSemaphorePermit,
    app: Router,
    limits: HttpLimits,
    gateway: Arc<Metrics>,
    refusals: Arc<Refusals>,
    stop: CancellationToken,
) {
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            let total = Metrics::inc(&gateway.metrics_http_timed_out);
            if let Some(suppressed) = refusals.slow.check() {
                warn!(
                    limit = "metrics_header_timeout_secs",
                    suppressed,
                    total,
                    "limit exceeded: metrics request headers not received in time, connection closed"
                );
            }
        }
        Err(e) => debug!(error = %e, "metrics endpoint connection ended"),
    }
}

/// The process serves: answering is the whole check.
async fn healthz() -> impl IntoResponse {
    json(StatusCode::OK, serde_json::json!({ "healthy": true }))
}

/// Whether to send the relay clients ([`Health::readiness`]).
async fn readyz(State(src): State<Sources>) -> impl IntoResponse {
    let (health, core) = (src.health.clone(), src.core.clone());
    let verdict = tokio::task::spawn_blocking(move || health.readiness(&core))
        .await
        .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
    match verdict {
        Ok(()) => json(StatusCode::OK, serde_json::json!({ "ready": true })),
        Err(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "ready": false, "reason": reason }),
        ),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> impl IntoResponse {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
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
