//! The data path: listeners accept connections, pick a task of the service from the current
//! snapshot, connect (trying other tasks when one is dead) and forward bytes.
//!
//! Reads the snapshot and balancers; never writes routing state (passive failures go to the
//! task's shared atomic state). Owns no config parsing and no discovery.

pub mod admission;
pub mod buffers;
pub mod http;
pub mod listener;
pub mod socket;
pub mod splice;
pub mod tcp;
pub mod tls;
pub mod udp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{HttpLimits, RouteConfig, ServiceName};
use crate::metrics::Metrics;
use crate::snapshot::SharedSnapshot;

/// What a listener's connections need; one per listener, shared by its connections.
#[derive(Clone)]
pub struct ListenerCtx {
    /// Metric label and log field.
    pub name: String,
    /// The default service: every connection of a tcp listener, unrouted requests of an http
    /// listener, unrouted names of a tls listener. `None` (http and tls only): 404 / close.
    pub service: Option<ServiceName>,
    pub snapshot: SharedSnapshot,
    pub metrics: Arc<Metrics>,
    /// HTTP listeners: routes, first match wins (the default route is `service`).
    pub routes: Vec<RouteConfig>,
    /// HTTP listeners: limits from `[http]`.
    pub http: HttpLimits,
    /// HTTP listeners: one log line per request.
    pub access_log: bool,
    /// PROXY protocol, limits, TLS settings and SNI routes (admission.rs, tls.rs).
    pub edge: crate::config::ListenerEdge,
    /// Cancelled when the daemon starts draining (HTTP: graceful connection shutdown).
    pub drain: tokio_util::sync::CancellationToken,
    /// HTTP listeners: metric handles per service, resolved once.
    pub http_meters: Arc<http::ListenerMeters>,
    /// The address every connection of the listener reached when it is bound to one IP;
    /// `None` on a wildcard bind, where each connection is asked (a system call).
    pub bound: Option<SocketAddr>,
}

impl ListenerCtx {
    /// The `service` metric label of the listener's connections: the default service, or
    /// "" when there is none (as for requests no route matched).
    pub fn service_label(&self) -> &str {
        self.service.as_ref().map(|s| s.as_str()).unwrap_or("")
    }

    /// Resolves [`FIRST_BYTES_GRACE`] after the drain began: what a connection that has sent
    /// nothing yet waits on before it closes. One accepted just before the drain most likely
    /// has its first bytes on the way, and closing it with them unread would reset it.
    pub async fn drain_grace_over(&self) {
        self.drain.cancelled().await;
        tokio::time::sleep(FIRST_BYTES_GRACE).await;
    }

    /// The address `client` (from `peer`) reached on this node.
    pub fn local_of(&self, client: &tokio::net::TcpStream, peer: SocketAddr) -> SocketAddr {
        self.bound
            .or_else(|| client.local_addr().ok())
            .unwrap_or(peer)
    }
}

/// How long a draining process still waits for the first bytes (a ClientHello, a request)
/// of a connection that has sent nothing yet.
pub const FIRST_BYTES_GRACE: Duration = Duration::from_millis(500);

/// One open downstream connection: counted in `connections_total` when opened and in
/// `active_connections` for as long as the guard lives.
pub struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    pub fn count(metrics: &Metrics, listener: &str, service: &str) -> OpenConnection {
        let labels = [listener, service];
        metrics.connections_total.with_label_values(&labels).inc();
        let active = metrics.active_connections.with_label_values(&labels);
        active.inc();
        OpenConnection(active)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
