//! The admin listener: the status page and the endpoints for operators and orchestrators.
//!
//! `GET /` the status page (`page.rs`), updated from `GET /events` (server-sent events of the
//! state document, `feed.rs` and `status.rs`); `GET /healthz` 200 while the process runs;
//! `GET /readyz` 200 once listeners are bound and discovery has synced once, and while this
//! node is not drained nor shutting down (else 503 with the reason); `GET /routes` the current
//! snapshot and this node's listeners as JSON (`routes.rs`); `GET /metrics` Prometheus text;
//! `POST /actions/…` the page's write actions, off unless `[admin] token_file` is set
//! (`actions.rs`). Nothing here takes a lock the data path takes: the snapshot is an
//! `ArcSwap` load, task state is atomics.

pub mod actions;
pub mod events;
pub mod feed;
pub mod page;
pub mod rates;
pub mod routes;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use routes::routes_json;

use crate::config::{Config, DiscoveryBackend, NodeName};
use crate::discovery::DiscoveryStatus;
use crate::discovery::keys::PublishedListener;
use crate::metrics::Metrics;
use crate::snapshot::SharedSnapshot;

/// A connection that serves no event stream is closed after this.
const CONN_MAX: Duration = Duration::from_secs(60);

/// What the admin endpoints read.
pub struct AdminState {
    pub node: NodeName,
    pub snapshot: SharedSnapshot,
    pub discovery: Arc<DiscoveryStatus>,
    pub metrics: Arc<Metrics>,
    /// Set once the config file's listeners are bound (before discovery has synced).
    pub config_listeners_bound: AtomicBool,
    /// Set once every listener is bound: the config file's and, after the first sync, the
    /// ones published in etcd.
    pub listeners_bound: AtomicBool,
    /// Set when shutdown starts: /readyz turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// Set once this process has handed its sockets to an upgrade (`run --upgrade`): its
    /// /readyz (on connections still open to it) answers 503.
    pub handed_over: AtomicBool,
    /// Set (for good) once the snapshot holds this node's own lease-bound `alive` record, so
    /// /readyz does not say 200 before the node's own `[[task]]`s are routable (etcd backend).
    seen_own_registration: AtomicBool,
    /// Every listener this node serves or was asked to (TOML and cluster-published), with its
    /// state: what the node's `alive` record reports. Written by the app's listener manager;
    /// [`AdminState::new`] starts it with the config's listeners.
    pub listeners: ArcSwap<Vec<PublishedListener>>,
    /// What the status page shows besides the snapshot.
    pub page: status::PageInfo,
    /// The write actions; None without `[admin] token_file` (read-only).
    pub actions: Option<actions::Actions>,
    /// The status page's events and state documents.
    pub feed: feed::Feed,
}

impl AdminState {
    /// The state for `config`'s node, reading the given snapshot, discovery status and
    /// metrics.
    pub fn new(
        config: &Config,
        snapshot: SharedSnapshot,
        discovery: Arc<DiscoveryStatus>,
        metrics: Arc<Metrics>,
    ) -> AdminState {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let listeners = config
            .listeners
            .iter()
            .map(PublishedListener::from_config)
            .collect();
        let actions = actions::Actions::of(config);
        AdminState {
            node: config.node.name.clone(),
            snapshot,
            discovery,
            metrics,
            config_listeners_bound: Default::default(),
            listeners_bound: Default::default(),
            draining: Default::default(),
            handed_over: Default::default(),
            seen_own_registration: AtomicBool::new(
                config.discovery.backend == DiscoveryBackend::Static,
            ),
            listeners: ArcSwap::from_pointee(listeners),
            page: status::PageInfo {
                node: config.node.name.clone(),
                version: env!("CARGO_PKG_VERSION"),
                started,
                backend: config.discovery.backend,
                stale_after: config.discovery.resync_interval * 3,
                actions: actions.is_some(),
            },
            actions,
            feed: feed::Feed::default(),
        }
    }

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
        } else if !self.config_listeners_bound.load(Ordering::Acquire) {
            Some("listeners not bound yet")
        } else if !self.discovery.synced() {
            Some("discovery has not synced yet")
        } else if !self.listeners_bound.load(Ordering::Acquire) {
            Some("published listeners not bound yet")
        } else if !self.own_registration_seen() {
            Some("this node's registration is not in the routing snapshot yet")
        } else if drained() {
            Some("node drained (routemesh node update --availability active NODE)")
        } else {
            None
        }
    }

    /// Whether the watch has shown this node's own `alive` record (sticky once true: a later
    /// lease loss is the lease keeper's to repair, not a reason to leave load balancers).
    fn own_registration_seen(&self) -> bool {
        if self.seen_own_registration.load(Ordering::Acquire) {
            return true;
        }
        let seen = self
            .snapshot
            .load()
            .nodes
            .get(&self.node)
            .is_some_and(|n| n.is_ready());
        if seen {
            self.seen_own_registration.store(true, Ordering::Release);
        }
        seen
    }

    pub fn ready(&self) -> bool {
        self.not_ready().is_none()
    }
}

/// Serves the admin endpoints until `shutdown`; runs the status page's feed meanwhile.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let feed = tokio::spawn(feed::run(state.clone(), shutdown.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            // Set when this connection carries an event stream: it may then outlive CONN_MAX
            // (the stream ends by itself after feed::STREAM_MAX).
            let streaming = Arc::new(AtomicBool::new(false));
            let flag = streaming.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (state, flag) = (state.clone(), flag.clone());
                async move { Ok::<_, Infallible>(route(state, req, peer, &flag).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            if tokio::time::timeout(CONN_MAX, &mut conn).await.is_ok() {
                return;
            }
            if streaming.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(feed::STREAM_MAX, conn).await;
            }
        });
    }
    state.feed.close();
    let _ = feed.await;
}

/// Every admin response's body: whole, or the event stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole response with `content-type`.
pub fn full(status: StatusCode, body: impl Into<Bytes>, ctype: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    full(status, body, "text/plain")
}

/// Headers of everything the page loads: never cached, never sniffed, never framed.
fn page_headers(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

async fn route(
    state: Arc<AdminState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    streaming: &AtomicBool,
) -> Response<Body> {
    let path = req.uri().path();
    if path.starts_with("/actions/") {
        return actions::handle(&state, req, peer).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET here; write actions are POST /actions/… (see README, Status page)\n",
        );
    }
    match path {
        "/" | "/index.html" => {
            let page = &*page::PAGE;
            let mut r = full(
                StatusCode::OK,
                page.html.clone(),
                "text/html; charset=utf-8",
            );
            page_headers(&mut r);
            if let Ok(v) = HeaderValue::from_str(&page.csp) {
                r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
            }
            r
        }
        "/events" => {
            let Some(stream) = state.feed.subscribe() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "too many status pages open on this node ({} streams); close some\n",
                        feed::MAX_STREAMS
                    ),
                );
            };
            let body = if req.method() == Method::HEAD {
                Empty::new().boxed()
            } else {
                streaming.store(true, Ordering::Release);
                feed::body(stream).boxed()
            };
            let mut r = Response::new(body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r.headers_mut()
                .insert("x-accel-buffering", HeaderValue::from_static("no"));
            page_headers(&mut r);
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/routes" => {
            let snap = state.snapshot.load();
            let mut body = routes_json(&state.node, &snap, &state.discovery);
            body["listeners"] = serde_json::to_value(&**state.listeners.load()).unwrap_or_default();
            full(
                StatusCode::OK,
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
                "application/json",
            )
        }
        "/metrics" => {
            let snap = state.snapshot.load_full();
            full(
                StatusCode::OK,
                state.metrics.render(&snap, &state.discovery),
                "text/plain; version=0.0.4",
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try / (status page) /events /healthz /readyz /routes /metrics\n",
        ),
    }
}
