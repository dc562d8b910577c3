//! TLS at the edge.
//!
//! `protocol = "http"` listeners with `tls`: termination with rustls (ring provider, TLS 1.2
//! and 1.3 only, ALPN h2 and http/1.1). A client whose ALPN list has neither (only
//! `http/1.0`, or a protocol we do not know) is served HTTP/1.1 with no protocol selected,
//! as nginx and HAProxy do, instead of failing the handshake (rustls refuses a list it
//! shares nothing with): the ClientHello is read first (`LazyConfigAcceptor`) and such a
//! client gets a config without ALPN. The certificate is picked by SNI from the listener's
//! list (first = default); a [`Terminator`] per listener keeps one rustls config whose
//! certificates app.rs replaces on every reload, so SIGHUP picks up rotated files without
//! touching open connections. A handshake that fails or does not finish within
//! `handshake_timeout` closes the connection, counted in
//! `routemesh_rejected_connections_total` (`tls_handshake_error`, `tls_timeout`); then the
//! HTTP proxy serves the stream as it does plain TCP, with `X-Forwarded-Proto: https`.
//!
//! `protocol = "tls"` listeners: passthrough routed by SNI. The ClientHello
//! is read with MSG_PEEK (bounded by `handshake_timeout` and `max_client_hello_bytes`),
//! parsed by `protocol::client_hello`, and the connection is handed to the TCP proxy with the
//! service its SNI routes to; the bytes go to the task untouched and the task does the
//! handshake. Garbage, a truncated or oversized ClientHello, a name no route matches on a
//! listener without a default `service` (or no name at all there) or a silent client close
//! the connection, counted in `routemesh_rejected_connections_total`.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

use super::ListenerCtx;
use super::admission::count_rejected;
use super::http::route::host_matches;
use super::socket::{PeekReasons, peek_until};
use crate::config::certs::{LoadedCerts, tls_provider};
use crate::protocol::client_hello::{self, Hello};

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
        count_rejected(&self.base.metrics, &self.base.name, peer, reason, None);
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
    const REASONS: PeekReasons = PeekReasons {
        timeout: "tls_timeout",
        read_error: "tls_read_error",
        closed: "tls_closed",
    };
    peek_until(
        client,
        max,
        max,
        deadline,
        &REASONS,
        |bytes| match client_hello::parse(bytes, max) {
            Ok(Hello::Complete { sni }) => Ok(Some(sni)),
            Ok(Hello::NeedMore) => Ok(None),
            Err(e) => Err(e.reason()),
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Termination on http listeners with `tls`

/// Picks the certificate by the ClientHello's SNI: the first entry whose `sni` matches
/// (exact or `*.suffix`), else the first entry (the default). Swapped whole on reload, so a
/// handshake sees either the old set or the new one.
#[derive(Debug)]
struct CertStore {
    certs: ArcSwap<LoadedCerts>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let name = hello
            .server_name()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        name.and_then(|n| {
            certs
                .iter()
                .find(|(p, _)| p.as_deref().is_some_and(|p| host_matches(p, &n)))
        })
        .or(certs.first())
        .map(|(_, k)| k.clone())
    }
}

/// The protocols offered by ALPN.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The TLS side of a terminating http listener: rustls configs (TLS 1.2 and 1.3, ring) whose
/// certificates can be replaced while connections run: one offering ALPN h2 and http/1.1,
/// one without ALPN for clients that offer neither.
pub struct Terminator {
    alpn: Arc<ServerConfig>,
    no_alpn: Arc<ServerConfig>,
    store: Arc<CertStore>,
}

impl Terminator {
    pub fn new(certs: LoadedCerts) -> Arc<Terminator> {
        let store = Arc::new(CertStore {
            certs: ArcSwap::from_pointee(certs),
        });
        let config = || {
            ServerConfig::builder_with_provider(tls_provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("the ring provider has TLS 1.2 and 1.3 suites")
                .with_no_client_auth()
                .with_cert_resolver(store.clone())
        };
        let mut alpn = config();
        alpn.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(Terminator {
            alpn: Arc::new(alpn),
            no_alpn: Arc::new(config()),
            store,
        })
    }

    /// The config for a ClientHello: with ALPN when the client offers none or one of ours,
    /// else without (served HTTP/1.1, no protocol selected).
    fn config_for(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        let shares = match hello.alpn() {
            None => true,
            Some(mut offered) => offered.any(|p| ALPN.contains(&p)),
        };
        if shares {
            self.alpn.clone()
        } else {
            self.no_alpn.clone()
        }
    }

    /// New certificates for new handshakes; open connections keep their session.
    pub fn replace(&self, certs: LoadedCerts) {
        self.store.certs.store(Arc::new(certs));
    }
}

/// Handles one connection of an http listener with `tls`: the handshake within
/// `handshake_timeout`, then HTTP/2 (ALPN h2) or HTTP/1.x over it.
pub async fn terminate(
    ctx: Arc<ListenerCtx>,
    term: Arc<Terminator>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let local = client.local_addr().unwrap_or(peer);
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client).await?;
        let config = term.config_for(&start.client_hello());
        start.into_stream(config).await
    };
    let bounded = tokio::select! {
        r = tokio::time::timeout(ctx.edge.handshake_timeout, handshake) => r,
        // Draining: no request has started on this connection yet.
        _ = ctx.drain.cancelled() => return,
    };
    let stream = match bounded {
        Err(_) => {
            let t = ctx.edge.handshake_timeout;
            let why = format!("no handshake within {t:?}");
            return count_rejected(&ctx.metrics, &ctx.name, peer, "tls_timeout", Some(&why));
        }
        Ok(Err(e)) => {
            return count_rejected(
                &ctx.metrics,
                &ctx.name,
                peer,
                "tls_handshake_error",
                Some(&e),
            );
        }
        Ok(Ok(s)) => s,
    };
    super::http::handle_tls(ctx, stream, peer, local).await
}
