//! The admin listener: read-only endpoints for operators and orchestrators.
//!
//! `GET /healthz` 200 while the process runs; `GET /readyz` 200 once listeners are bound and
//! discovery has synced once, and while this node is not drained nor shutting down (else 503
//! with the reason); `GET /routes` the current snapshot and this node's listeners as JSON;
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

use arc_swap::ArcSwap;

use crate::config::NodeName;
use crate::discovery::DiscoveryStatus;
use crate::discovery::keys::PublishedListener;
use crate::discovery::published::Decision;
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
    /// Set once this process has handed its sockets to an upgrade (`run --upgrade`): its
    /// /readyz (on connections still open to it) answers 503.
    pub handed_over: AtomicBool,
    /// Every listener this node serves or was asked to (TOML and cluster-published), with its
    /// state: what the node's `alive` record reports. Written by the app's listener manager.
    pub listeners: ArcSwap<Vec<PublishedListener>>,
}

impl AdminState {
    /// Why /readyz says 503, or None when ready.
    pub fn not_ready(&self) -> Option<&'static str> {
        let drained = || {
            self.snapshot
                .load()
                .nodes
                .get(&self.node)
                .is_some_and(|n| n.is_drained())
        };
        if self.handed_over.load(Ordering::Acquire) {
            Some("handed over to a new process (upgrade); draining")
        } else if self.draining.load(Ordering::Relaxed) {
            Some("shutting down")
        } else if !self.listeners_bound.load(Ordering::Acquire) {
            Some("listeners not bound yet")
        } else if !self.discovery.synced() {
            Some("discovery has not synced yet")
        } else if drained() {
            Some("node drained (routemesh node update --availability active NODE)")
        } else {
            None
        }
    }

    pub fn ready(&self) -> bool {
        self.not_ready().is_none()
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
        "/readyz" => match state.not_ready() {
            None => text(StatusCode::OK, "ready\n", "text/plain"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
        },
        "/routes" => {
            let snap = state.snapshot.load();
            let mut body = routes_json(&state.node, &snap, &state.discovery);
            body["listeners"] = serde_json::to_value(&**state.listeners.load()).unwrap_or_default();
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
                "availability": e.availability.as_str(),
                "advertise": e.record().and_then(|r| r.advertise).map(|a| a.to_string()),
                "version": e.record().map(|r| r.version.clone()),
            })
        })
        .collect();
    let published: Vec<_> = snap
        .published
        .iter()
        .map(|p| {
            let (decision, with) = match &p.decision {
                Decision::Bind => ("bind", None),
                Decision::Shadowed { by } => ("shadowed", Some(by.as_str())),
                Decision::Conflict { with } => ("conflict", Some(with.as_str())),
            };
            json!({
                "name": p.config.name,
                "listen": p.config.listen.to_string(),
                "protocol": p.config.protocol.as_str(),
                "service": p.config.service.as_ref().map(|s| s.as_str()),
                "source": p.source.as_str(),
                "decision": decision,
                "held_by": with,
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
        "published": published,
        "invalid": snap.invalid,
    })
}
