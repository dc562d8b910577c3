//! The admin listener: read-only endpoints for operators and orchestrators.
//!
//! `GET /healthz` 200 while the process runs; `GET /readyz` 200 once listeners are bound and
//! discovery has synced once (else 503); `GET /routes` the current snapshot as JSON;
//! `GET /metrics` Prometheus text. Nothing here changes state.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::NodeName;
use crate::discovery::DiscoveryStatus;
use crate::metrics::Metrics;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::util::clock::now_ms;

/// What the admin endpoints read.
pub struct AdminState {
    pub node: NodeName,
    pub snapshot: SharedSnapshot,
    pub discovery: Arc<DiscoveryStatus>,
    pub metrics: Arc<Metrics>,
    /// Set once every configured listener is bound.
    pub listeners_bound: AtomicBool,
    /// Set when shutdown starts: /readyz turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
}

impl AdminState {
    pub fn ready(&self) -> bool {
        self.listeners_bound.load(Ordering::Acquire)
            && self.discovery.synced()
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>, ctype: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin API is read-only\n",
            "text/plain",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => {
            if state.ready() {
                text(StatusCode::OK, "ready\n", "text/plain")
            } else {
                let why = if state.draining.load(Ordering::Relaxed) {
                    "draining"
                } else if !state.listeners_bound.load(Ordering::Acquire) {
                    "listeners not bound yet"
                } else {
                    "discovery has not synced yet"
                };
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                    "text/plain",
                )
            }
        }
        "/routes" => {
            let snap = state.snapshot.load();
            let body = routes_json(&state.node, &snap, &state.discovery);
            text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
                "application/json",
            )
        }
        "/metrics" => {
            let snap = state.snapshot.load_full();
            text(
                StatusCode::OK,
                state.metrics.render(&snap, &state.discovery),
                "text/plain; version=0.0.4",
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz /readyz /routes /metrics\n",
            "text/plain",
        ),
    }
}

/// The snapshot as this node sees it (also the shape `service ps` reads).
pub fn routes_json(
    node: &NodeName,
    snap: &Snapshot,
    discovery: &DiscoveryStatus,
) -> serde_json::Value {
    let now = now_ms();
    let mut services: Vec<_> = snap.services.values().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let services: Vec<_> = services
        .iter()
        .map(|svc| {
            let tasks: Vec<_> = svc
                .tasks
                .iter()
                .map(|t| {
                    let status = t.status(now);
                    json!({
                        "id": t.id.as_str(),
                        "addr": t.addr.to_string(),
                        "node": t.node.as_ref().map(|n| n.as_str()),
                        "weight": t.weight,
                        "state": status.as_str(),
                        "routable": status == crate::snapshot::TaskStatus::Healthy,
                        "in_flight": t.state.in_flight(),
                        "last_error": t.state.last_error(),
                    })
                })
                .collect();
            json!({
                "name": svc.name.as_str(),
                "balance": svc.settings.balance,
                "live": svc.live_count(now),
                "tasks": tasks,
            })
        })
        .collect();
    let nodes: Vec<_> = snap
        .nodes
        .iter()
        .map(|(name, e)| {
            json!({
                "name": name.as_str(),
                "status": if e.is_ready() { "Ready" } else { "Down" },
                "advertise": e.record().and_then(|r| r.advertise).map(|a| a.to_string()),
                "version": e.record().map(|r| r.version.clone()),
            })
        })
        .collect();
    json!({
        "node": node.as_str(),
        "revision": snap.revision,
        "synced": discovery.synced(),
        "discovery_up": discovery.up(),
        "last_sync_age_seconds": discovery.last_sync_age_secs(),
        "services": services,
        "nodes": nodes,
        "invalid": snap.invalid,
    })
}
