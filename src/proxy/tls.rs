//! TLS at the edge. `protocol = "tls"` listeners: passthrough routed by SNI. The ClientHello
//! is read with MSG_PEEK (bounded by `handshake_timeout` and `max_client_hello_bytes`),
//! parsed by `client_hello.rs`, and the connection is handed to the TCP proxy with the
//! service its SNI routes to; the bytes go to the task untouched and the task does the
//! handshake. Garbage, a truncated or oversized ClientHello, a name no route matches on a
//! listener without a default `service` (or no name at all there) or a silent client close
//! the connection, counted in `routemesh_rejected_connections_total`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ListenerCtx;
use super::client_hello::{self, Hello};
use super::http::route::host_matches;
use crate::ratelimit::LogLimiter;

static REJECT_LOG: LogLimiter = LogLimiter::new(1000);

/// A tls listener's routes, each with the context its connections run under.
pub struct SniRouter {
    base: Arc<ListenerCtx>,
    routes: Vec<(String, Arc<ListenerCtx>)>,
}

impl SniRouter {
    pub fn new(base: Arc<ListenerCtx>) -> Arc<SniRouter> {
        let routes = base
            .edge
            .sni_routes
            .iter()
            .map(|r| {
                let ctx = ListenerCtx {
                    service: Some(r.service.clone()),
                    ..(*base).clone()
                };
                (r.sni.clone(), Arc::new(ctx))
            })
            .collect();
        Arc::new(SniRouter { base, routes })
    }

    /// The context for `sni`: the first route that matches, else the listener's default;
    /// `None` when nothing matches and there is no default service.
    pub fn route(&self, sni: Option<&str>) -> Option<&Arc<ListenerCtx>> {
        sni.and_then(|name| {
            self.routes
                .iter()
                .find(|(pattern, _)| host_matches(pattern, name))
                .map(|(_, ctx)| ctx)
        })
        .or(self.base.service.as_ref().map(|_| &self.base))
    }

    fn reject(&self, peer: SocketAddr, reason: &'static str) {
        self.base
            .metrics
            .rejected_connections_total
            .with_label_values(&[self.base.name.as_str(), reason])
            .inc();
        if let Some(suppressed) = REJECT_LOG.allow() {
            tracing::warn!(listener = %self.base.name, client = %peer, reason, suppressed, "closing TLS connection before routing");
        }
    }
}

/// Handles one connection of a tls listener.
pub async fn passthrough(router: Arc<SniRouter>, client: TcpStream, peer: SocketAddr) {
    let edge = &router.base.edge;
    let deadline = Instant::now() + edge.handshake_timeout;
    let sni = match peek_client_hello(&client, edge.max_client_hello_bytes, deadline).await {
        Ok(sni) => sni,
        Err(reason) => return router.reject(peer, reason),
    };
    let Some(ctx) = router.route(sni.as_deref()).cloned() else {
        // No route for this name (or no name) and no default service.
        return router.reject(peer, "tls_no_route");
    };
    tracing::debug!(listener = %ctx.name, client = %peer, sni = sni.as_deref().unwrap_or("-"), service = ctx.service_label(), "TLS routed by SNI");
    super::tcp::handle(ctx, client, peer).await
}

/// Peeks until a whole ClientHello is buffered; returns its SNI, or a metric reason.
pub async fn peek_client_hello(
    client: &TcpStream,
    max: usize,
    deadline: Instant,
) -> Result<Option<String>, &'static str> {
    let mut buf = vec![0u8; max];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Err(_) => return Err("tls_timeout"),
            Ok(Err(_)) => return Err("tls_read_error"),
            Ok(Ok(0)) => return Err("tls_closed"),
            Ok(Ok(n)) => n,
        };
        match client_hello::parse(&buf[..n], max) {
            Ok(Hello::Complete { sni }) => return Ok(sni),
            Err(e) => return Err(e.reason()),
            Ok(Hello::NeedMore) if n == seen => {
                // Peek returns at once while old bytes wait: pause for new ones.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = tokio::time::sleep_until(deadline) => return Err("tls_timeout"),
                }
            }
            Ok(Hello::NeedMore) => seen = n,
        }
    }
}
