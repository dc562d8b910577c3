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
//! touching open connections. With `tls.acme` the listener's ACME certificate is read from
//! the routing snapshot at each handshake (matched by SNI before the file certificates, and
//! the default when there are none), so a certificate issued or renewed anywhere in the
//! cluster is served by the next handshake; a ClientHello offering only ALPN `acme-tls/1`
//! gets the tls-alpn-01 challenge certificate for its SNI and is closed after the
//! handshake. A handshake that fails or does not finish within
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
use crate::acme::served::ACME_TLS_ALPN;
use crate::config::certs::{LoadedCerts, tls_provider};
use crate::protocol::client_hello::{self, Hello};
use crate::snapshot::SharedSnapshot;

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
    acme: Option<AcmeCerts>,
}

/// The ACME certificate of a listener with `tls.acme`, found in the routing snapshot.
#[derive(Clone)]
pub struct AcmeCerts {
    pub snapshot: SharedSnapshot,
    /// The certificate's name (its first domain).
    pub name: String,
    pub domains: Vec<String>,
}

impl std::fmt::Debug for AcmeCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AcmeCerts({})", self.name)
    }
}

impl AcmeCerts {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.snapshot.load().acme.key_of(&self.name)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let name = hello
            .server_name()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        if let (Some(acme), Some(n)) = (&self.acme, &name)
            && acme.domains.iter().any(|d| d == n)
            && let Some(k) = acme.current()
        {
            return Some(k);
        }
        let by_file = name
            .and_then(|n| {
                certs
                    .iter()
                    .find(|(p, _)| p.as_deref().is_some_and(|p| host_matches(p, &n)))
            })
            .or(certs.first())
            .map(|(_, k)| k.clone());
        by_file.or_else(|| self.acme.as_ref().and_then(AcmeCerts::current))
    }
}

/// tls-alpn-01: the challenge certificate of the SNI name, from the snapshot.
#[derive(Debug)]
struct AlpnChallenge {
    snapshot: SharedSnapshot,
}

impl ResolvesServerCert for AlpnChallenge {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        self.snapshot.load().acme.alpn.get(&name).cloned()
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
    /// With `tls.acme`: answers tls-alpn-01 validation handshakes.
    acme_challenge: Option<Arc<ServerConfig>>,
    store: Arc<CertStore>,
}

impl Terminator {
    pub fn new(certs: LoadedCerts, acme: Option<AcmeCerts>) -> Arc<Terminator> {
        let challenge_snapshot = acme.as_ref().map(|a| a.snapshot.clone());
        let store = Arc::new(CertStore {
            certs: ArcSwap::from_pointee(certs),
            acme,
        });
        let builder = || {
            ServerConfig::builder_with_provider(tls_provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("the ring provider has TLS 1.2 and 1.3 suites")
                .with_no_client_auth()
        };
        let config = || builder().with_cert_resolver(store.clone());
        let mut alpn = config();
        alpn.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let acme_challenge = challenge_snapshot.map(|snapshot| {
            let mut c = builder().with_cert_resolver(Arc::new(AlpnChallenge { snapshot }));
            c.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            Arc::new(c)
        });
        Arc::new(Terminator {
            alpn: Arc::new(alpn),
            no_alpn: Arc::new(config()),
            acme_challenge,
            store,
        })
    }

    /// The config for a ClientHello: with ALPN when the client offers none or one of ours,
    /// else without (served HTTP/1.1, no protocol selected); the tls-alpn-01 one for a
    /// client offering `acme-tls/1` (a CA validating).
    fn config_for(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        if let Some(c) = &self.acme_challenge
            && hello
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN))
        {
            return c.clone();
        }
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
    let local = ctx.local_of(&client, peer);
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client).await?;
        let config = term.config_for(&start.client_hello());
        start.into_stream(config).await
    };
    let bounded = tokio::select! {
        r = tokio::time::timeout(ctx.edge.handshake_timeout, handshake) => r,
        // Draining: no request has started on this connection yet; one accepted just before
        // the drain began gets a grace for its handshake.
        _ = ctx.drain_grace_over() => return,
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
    if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // tls-alpn-01: the handshake was the answer.
        tracing::debug!(listener = %ctx.name, client = %peer, "answered a tls-alpn-01 validation");
        let mut stream = stream;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        return;
    }
    super::http::handle_tls(ctx, stream, peer, local).await
}
