//! This node's listeners: the TOML ones and the cluster's published ones (etcd), kept in step
//! with both by one reconcile. Owned by `app::run`'s loop (no locks): it reconciles at start,
//! on every config reload, whenever discovery publishes a snapshot whose published listeners
//! changed, and every 5 s while a published listener failed to bind.
//!
//! Rules (README "Cluster-wide publishing"):
//! - what to bind is [`node_plan`]: TOML listeners always, published ones unless shadowed, in
//!   conflict, or refused by `[discovery] published_ports`;
//! - an unchanged listener is left alone; a changed one gets a new accept loop on the same
//!   socket (open connections untouched); a removed one stops accepting at once and its open
//!   connections run on for up to `drain_timeout`;
//! - a TOML listener that cannot be bound fails the start or refuses the reload whole; a
//!   published one that cannot be bound (address in use, permission) is `failed: REASON`
//!   and is tried again every 5 s — it never stops the daemon.
//!
//! [`Listeners::states`] is what the node reports for each listener (its `alive` record,
//! `/routes`): `bound`, `shadowed`, `conflict`, `failed: …`, `refused: …`.
//!
//! Listeners are kept by (address, transport): a udp and a tcp listener may share a port
//! number. A udp listener that is removed or changed stops at once and its sessions end
//! (there are no connections to drain; clients' next datagrams open new sessions).
//!
//! Upgrades: a process started with `run --upgrade` is seeded with the old process's
//! sockets by address and transport ([`Listeners::inherit`]); every rule above stays, only "bind" takes an
//! inherited socket of that address when there is one. What is left once the process is
//! ready is closed ([`Listeners::close_inherited`]). [`Listeners::sockets`] lists the sockets
//! to hand to the next one.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::AppError;
use crate::config::certs::{LoadedCerts, load_certs};
use crate::config::{Config, HttpLimits, ListenerConfig, Protocol, ServiceName, Transport};
use crate::discovery::keys::PublishedListener;
use crate::discovery::published::{Decision, NodeDecision, Published, Source, node_plan, overlaps};
use crate::metrics::Metrics;
use crate::proxy::admission::Admission;
use crate::proxy::listener::{self, Connections};
use crate::proxy::{self, ListenerCtx};
use crate::snapshot::SharedSnapshot;
use crate::upgrade::Kind;
use crate::util::net;

/// How often a published listener that could not be bound is tried again.
pub const RETRY_FAILED: Duration = Duration::from_secs(5);

/// What a listener is kept by: a udp and a tcp listener may share an address.
type Key = (SocketAddr, Transport);

fn key_of(l: &ListenerConfig) -> Key {
    (l.listen, l.protocol.transport())
}

/// A bound listener socket.
#[derive(Clone)]
enum Bound {
    Tcp(Arc<TcpListener>),
    Udp(Arc<UdpSocket>),
}

impl Bound {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Bound::Tcp(s) => s.as_fd(),
            Bound::Udp(s) => s.as_fd(),
        }
    }
}

/// A running accept loop (or udp loop); a changed listener restarts it on the same socket,
/// so it keeps its port without a rebind gap.
struct RunningListener {
    config: ListenerConfig,
    /// `None` for TOML listeners.
    source: Option<Source>,
    stop: CancellationToken,
    /// Shared with the accept loop (and described to an upgrade).
    socket: Bound,
    handle: JoinHandle<()>,
    /// http listeners with `tls`: its certificates are replaced on every reconcile.
    tls: Option<Arc<proxy::tls::Terminator>>,
    /// This listener's connections: children of the daemon-wide tokens, so the listener can
    /// be drained alone when it is removed.
    conns: Connections,
}

pub struct Listeners {
    running: BTreeMap<Key, RunningListener>,
    /// Published listeners that could not be bound, by name, with why.
    failed: BTreeMap<String, String>,
    /// What the node reports for each listener, in name order.
    states: Vec<PublishedListener>,
    /// Task-requested ports already warned about (held by another explicit listener).
    warned: BTreeSet<(String, String)>,
    /// Sockets handed over by the process this one upgrades, not taken yet, by address.
    inherited: BTreeMap<SocketAddr, std::net::TcpListener>,
    /// The same for udp listeners.
    inherited_udp: BTreeMap<SocketAddr, std::net::UdpSocket>,
    /// Accept loops wait for it: nothing is accepted before this process can route (a
    /// process taking over: once it is ready; the static backend: once its table is out).
    accepting: CancellationToken,
    /// Services with a `[service.NAME.health]` section (udp listeners' services are checked
    /// only then), as of the last reconcile.
    health_configured: BTreeSet<ServiceName>,
    /// The `[http]` limits and access-log flag the running contexts were built with.
    http: HttpLimits,
    access_log: bool,
    /// The daemon-wide connections (shutdown drains and stops them all).
    pub conns: Connections,
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
}

/// A listener to bind in this reconcile.
struct Fresh {
    config: ListenerConfig,
    source: Option<Source>,
    socket: Bound,
    certs: Option<LoadedCerts>,
}

impl Listeners {
    /// Accept loops start accepting once `accepting` fires.
    pub fn new(
        config: &Config,
        snapshot: SharedSnapshot,
        metrics: Arc<Metrics>,
        accepting: CancellationToken,
    ) -> Listeners {
        Listeners {
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            states: Vec::new(),
            warned: BTreeSet::new(),
            inherited: BTreeMap::new(),
            inherited_udp: BTreeMap::new(),
            health_configured: BTreeSet::new(),
            accepting,
            http: config.http.clone(),
            access_log: config.log.access,
            conns: Connections::default(),
            snapshot,
            metrics,
        }
    }

    /// Seeds the sockets of the process this one upgrades: binding an address takes its
    /// socket instead while there is one.
    pub fn inherit(
        &mut self,
        tcp: BTreeMap<SocketAddr, std::net::TcpListener>,
        udp: BTreeMap<SocketAddr, std::net::UdpSocket>,
    ) {
        self.inherited = tcp;
        self.inherited_udp = udp;
    }

    /// Closes the inherited sockets no listener took (no longer configured); returns their
    /// addresses.
    pub fn close_inherited(&mut self) -> Vec<String> {
        let tcp = std::mem::take(&mut self.inherited).into_keys();
        let udp = std::mem::take(&mut self.inherited_udp).into_keys();
        tcp.map(|a| a.to_string())
            .chain(udp.map(|a| format!("{a}/udp")))
            .collect()
    }

    /// Every bound listener's name, address, kind and socket (for an upgrade).
    pub fn sockets(&self) -> Vec<(&str, SocketAddr, Kind, BorrowedFd<'_>)> {
        self.running
            .iter()
            .map(|((addr, transport), r)| {
                let kind = match transport {
                    Transport::Tcp => Kind::Listener,
                    Transport::Udp => Kind::Udp,
                };
                (r.config.name.as_str(), *addr, kind, r.socket.as_fd())
            })
            .collect()
    }

    /// The inherited socket of `key`, or a freshly bound one.
    fn open(&mut self, key: Key) -> std::io::Result<Bound> {
        let (addr, transport) = key;
        match transport {
            Transport::Tcp => match self.inherited.remove(&addr) {
                Some(s) => {
                    s.set_nonblocking(true)?;
                    tracing::debug!(%addr, "listener socket taken over from the previous process");
                    TcpListener::from_std(s).map(|s| Bound::Tcp(Arc::new(s)))
                }
                None => net::bind(addr).map(|s| Bound::Tcp(Arc::new(s))),
            },
            Transport::Udp => {
                let s = match self.inherited_udp.remove(&addr) {
                    Some(s) => {
                        s.set_nonblocking(true)?;
                        tracing::debug!(%addr, "udp listener socket taken over from the previous process");
                        s
                    }
                    None => net::bind_udp(addr)?,
                };
                UdpSocket::from_std(s).map(|s| Bound::Udp(Arc::new(s)))
            }
        }
    }

    /// What the node reports for each listener (TOML and published), in name order.
    pub fn states(&self) -> &[PublishedListener] {
        &self.states
    }

    /// Whether some published listener waits for a retry.
    pub fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The services the bound listeners route to (default and HTTP/SNI routes): the ones
    /// whose tasks this node health-checks. A service of a udp listener is checked only when
    /// its `[service.NAME.health]` is written (no default TCP probe for datagram services),
    /// unless a tcp listener routes to it too.
    pub fn served(&self) -> BTreeSet<ServiceName> {
        self.running
            .values()
            .filter(|r| {
                r.config.protocol != Protocol::Udp
                    || r.config
                        .service
                        .as_ref()
                        .is_some_and(|s| self.health_configured.contains(s))
            })
            .flat_map(|r| {
                let l = &r.config;
                l.service
                    .iter()
                    .cloned()
                    .chain(l.routes.iter().map(|r| r.service.clone()))
                    .chain(l.edge.sni_routes.iter().map(|r| r.service.clone()))
            })
            .collect()
    }

    /// Makes the running set match `config`'s listeners and the cluster's `published` ones.
    /// Fails, changing nothing, when a TOML listener cannot be bound or its certificates
    /// loaded; published listeners never fail it.
    pub async fn reconcile(
        &mut self,
        config: &Config,
        published: &[Published],
    ) -> Result<(), AppError> {
        let plan = node_plan(
            &config.listeners,
            published,
            &config.discovery.published_ports,
        );
        self.warn_held_task_ports(published);
        let mut failed = BTreeMap::new();
        // Certificates are read again every time, changed or not, so a reload picks up
        // rotated files.
        let mut certs = BTreeMap::new();
        let mut wanted: BTreeMap<Key, (&ListenerConfig, Option<Source>)> = BTreeMap::new();
        for p in plan.iter().filter(|p| p.decision == NodeDecision::Bind) {
            let l = &p.config;
            if l.protocol == Protocol::Http && (!l.edge.tls.is_empty() || !l.edge.acme.is_empty()) {
                match load_certs(&l.edge.tls) {
                    Ok(loaded) => {
                        certs.insert(l.listen, loaded);
                    }
                    Err(source) if p.source.is_none() => {
                        return Err(AppError::Tls {
                            listener: l.name.clone(),
                            source,
                        });
                    }
                    Err(e) => {
                        failed.insert(l.name.clone(), format!("certificates: {e}"));
                        continue;
                    }
                }
            }
            wanted.insert(key_of(l), (l, p.source));
        }
        // Which running listeners stay as they are, restart on their socket, or go.
        let restart_all = self.needs_restart(config);
        let unchanged = |addr: &Key, r: &RunningListener| {
            wanted
                .get(addr)
                .is_some_and(|(w, source)| **w == r.config && *source == r.source && !restart_all)
        };
        let going: Vec<Key> = self
            .running
            .iter()
            .filter(|(addr, _)| !wanted.contains_key(*addr))
            .map(|(addr, _)| *addr)
            .collect();
        // New sockets first, so a reload whose TOML listener cannot be bound changes nothing.
        // One that overlaps a listener about to go is bound once that one has stopped.
        let mut fresh = Vec::new();
        let mut after_stop = Vec::new();
        for (addr, (l, source)) in &wanted {
            if self.running.contains_key(addr) {
                continue;
            }
            if going.iter().any(|g| g.1 == addr.1 && overlaps(g.0, addr.0)) {
                after_stop.push(((*l).clone(), *source));
                continue;
            }
            match self.open(*addr) {
                Ok(socket) => fresh.push(Fresh {
                    config: (*l).clone(),
                    source: *source,
                    socket,
                    certs: certs.remove(&addr.0),
                }),
                Err(e) if source.is_none() => {
                    return Err(AppError::Bind {
                        what: format!("listener {}", l.name),
                        addr: addr.0,
                        source: e,
                    });
                }
                Err(e) => {
                    failed.insert(l.name.clone(), bind_reason(&e));
                }
            }
        }
        let addrs: Vec<Key> = self.running.keys().copied().collect();
        for addr in addrs {
            if unchanged(&addr, &self.running[&addr]) {
                if let (Some(term), Some(loaded)) =
                    (&self.running[&addr].tls, certs.remove(&addr.0))
                {
                    term.replace(loaded);
                    tracing::info!(listener = %self.running[&addr].config.name, "TLS certificates reloaded");
                }
                continue;
            }
            let r = self.running.remove(&addr).expect("key from the map");
            r.stop.cancel();
            let ended = r.handle.await;
            match (wanted.get(&addr), ended) {
                (Some((w, source)), Ok(())) => {
                    let certs = certs.remove(&addr.0);
                    self.spawn(
                        (*w).clone(),
                        *source,
                        r.socket,
                        config,
                        certs,
                        Some(r.conns),
                    );
                }
                (Some((w, _)), Err(_)) => {
                    failed.insert(w.name.clone(), "accept loop ended".into());
                }
                (None, _) => self.retire(r.config, r.conns, config.node.drain_timeout),
            }
        }
        for (l, source) in after_stop {
            match self.open(key_of(&l)) {
                Ok(socket) => {
                    let certs = certs.remove(&l.listen);
                    self.spawn(l, source, socket, config, certs, None);
                }
                Err(e) => {
                    // Too late to refuse a reload: everything else has been applied.
                    tracing::error!(listener = %l.name, addr = %l.listen, error = %e, "cannot bind listener");
                    failed.insert(l.name.clone(), bind_reason(&e));
                }
            }
        }
        for f in fresh {
            self.spawn(f.config, f.source, f.socket, config, f.certs, None);
        }
        for (name, why) in &failed {
            if self.failed.get(name) != Some(why) {
                tracing::warn!(listener = %name, reason = %why, retry_in = ?RETRY_FAILED, "published listener not bound");
            }
        }
        self.failed = failed;
        self.health_configured = config
            .services
            .iter()
            .filter(|(_, s)| s.health_configured)
            .map(|(n, _)| n.clone())
            .collect();
        self.http = config.http.clone();
        self.access_log = config.log.access;
        self.states = plan
            .iter()
            .map(|p| {
                let state = match &p.decision {
                    NodeDecision::Bind => match self.failed.get(&p.config.name) {
                        Some(why) => format!("failed: {why}"),
                        None => "bound".into(),
                    },
                    other => other.state(),
                };
                record_of(&p.config, p.source, state)
            })
            .collect();
        self.states.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(())
    }

    /// A task (a labelled container) that asks for a port an explicit listener of another
    /// service or protocol holds gets one warning naming it; nothing fails.
    fn warn_held_task_ports(&mut self, published: &[Published]) {
        let mut now = BTreeSet::new();
        for p in published.iter().filter(|p| p.source == Source::Tasks) {
            let Decision::Shadowed { by } = &p.decision else {
                continue;
            };
            let Some(holder) = published.iter().find(|h| &h.config.name == by) else {
                continue;
            };
            if holder.config.service == p.config.service
                && holder.config.protocol == p.config.protocol
            {
                continue;
            }
            let key = (p.config.name.clone(), by.clone());
            if !self.warned.contains(&key) {
                let tasks: Vec<&str> = p.requested_by.iter().map(|t| t.as_str()).collect();
                tracing::warn!(
                    tasks = %tasks.join(","),
                    port = p.config.listen.port(),
                    listener = %by,
                    "task (container) {} asks to publish {}/{} for service {}, but published listener {by} holds that port; the request is ignored",
                    tasks.join(", "),
                    p.config.listen.port(),
                    p.config.protocol.as_str(),
                    p.config.service.as_ref().map(|s| s.as_str()).unwrap_or("-"),
                );
            }
            now.insert(key);
        }
        self.warned = now;
    }

    /// Listener-wide settings that live in the listener context.
    fn needs_restart(&self, config: &Config) -> bool {
        self.http != config.http || self.access_log != config.log.access
    }

    /// A removed listener: it has stopped accepting; its HTTP connections finish their
    /// requests and close, and every connection left is closed after `drain_timeout`.
    fn retire(&self, config: ListenerConfig, conns: Connections, drain_timeout: Duration) {
        if config.protocol == Protocol::Udp {
            // Its loop has stopped, and its sessions with it.
            tracing::info!(listener = %config.name, addr = %config.listen, "udp listener removed; its sessions ended");
            return;
        }
        tracing::info!(listener = %config.name, addr = %config.listen, "listener removed; draining its connections");
        conns.drain.cancel();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(drain_timeout) => conns.hard_stop.cancel(),
                // Shutdown cancels the parents: nothing left to do.
                _ = conns.hard_stop.cancelled() => {}
            }
        });
    }

    /// `certs`: the loaded certificates of an http listener with `tls`; `conns`: the
    /// listener's connections when it restarts on its socket.
    fn spawn(
        &mut self,
        cfg: ListenerConfig,
        source: Option<Source>,
        socket: Bound,
        config: &Config,
        certs: Option<LoadedCerts>,
        conns: Option<Connections>,
    ) {
        let conns = conns.unwrap_or_else(|| self.conns.child());
        let stop = CancellationToken::new();
        let (handle, tls) = match &socket {
            Bound::Tcp(tcp) => {
                let (handle, tls) = self.start_tcp(&cfg, tcp.clone(), config, certs, &conns, &stop);
                tracing::info!(listener = %cfg.name, addr = %cfg.listen, protocol = cfg.protocol.as_str(), service = cfg.service.as_ref().map(|s| s.as_str()).unwrap_or("-"), source = source.map(Source::as_str).unwrap_or("config"), "listening");
                (handle, tls)
            }
            Bound::Udp(udp) => {
                let Some(handle) = self.start_udp(&cfg, udp.clone(), &conns, &stop) else {
                    return;
                };
                tracing::info!(listener = %cfg.name, addr = %cfg.listen, protocol = "udp", service = cfg.service.as_ref().map(|s| s.as_str()).unwrap_or("-"), max_sessions = cfg.edge.max_sessions, source = source.map(Source::as_str).unwrap_or("config"), "listening");
                (handle, None)
            }
        };
        self.running.insert(
            key_of(&cfg),
            RunningListener {
                config: cfg,
                source,
                stop,
                socket,
                handle,
                tls,
                conns,
            },
        );
    }

    /// A tcp, http or tls listener's accept loop on `tcp`, and its TLS terminator (http
    /// listeners with `tls`).
    fn start_tcp(
        &self,
        cfg: &ListenerConfig,
        tcp: Arc<TcpListener>,
        config: &Config,
        certs: Option<LoadedCerts>,
        conns: &Connections,
        stop: &CancellationToken,
    ) -> (JoinHandle<()>, Option<Arc<proxy::tls::Terminator>>) {
        // `tls.acme`: the certificate comes from the snapshot, read at each handshake.
        let acme = (!cfg.edge.acme.is_empty()).then(|| proxy::tls::AcmeCerts {
            snapshot: self.snapshot.clone(),
            name: cfg.edge.acme[0].clone(),
            domains: cfg.edge.acme.clone(),
        });
        let tls = certs.map(|c| proxy::tls::Terminator::new(c, acme));
        let ctx = Arc::new(ListenerCtx {
            name: cfg.name.clone(),
            service: cfg.service.clone(),
            snapshot: self.snapshot.clone(),
            metrics: self.metrics.clone(),
            routes: cfg.routes.clone(),
            http: config.http.clone(),
            access_log: config.log.access,
            edge: cfg.edge.clone(),
            drain: conns.drain.clone(),
            http_meters: Default::default(),
            bound: tcp.local_addr().ok().filter(|a| !a.ip().is_unspecified()),
        });
        // Limits and PROXY headers are checked before any protocol handler runs.
        let admission = Admission::new(
            &cfg.name,
            &cfg.edge,
            self.metrics.clone(),
            // Over the limit, a plain-text http listener answers 503; a TLS one just closes.
            cfg.protocol == Protocol::Http && tls.is_none(),
        );
        let accept = Accept {
            name: cfg.name.clone(),
            stop: stop.clone(),
            conns: conns.clone(),
            admission,
        };
        let protocol = cfg.protocol;
        let terminator = tls.clone();
        let shared = tcp;
        let accepting = self.accepting.clone();
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            tokio::select! {
                _ = accepting.cancelled() => {}
                _ = stopped.cancelled() => return,
            }
            let socket = &*shared;
            match (protocol, terminator) {
                (Protocol::Tcp, _) => {
                    accept
                        .run(socket, move |s, peer| {
                            proxy::tcp::handle(ctx.clone(), s, peer)
                        })
                        .await
                }
                (Protocol::Http, Some(term)) => {
                    accept
                        .run(socket, move |s, peer| {
                            proxy::tls::terminate(ctx.clone(), term.clone(), s, peer)
                        })
                        .await
                }
                (Protocol::Http, None) => {
                    accept
                        .run(socket, move |s, peer| {
                            proxy::http::handle(ctx.clone(), s, peer)
                        })
                        .await
                }
                (Protocol::Tls, _) => {
                    let router = proxy::tls::SniRouter::new(ctx);
                    accept
                        .run(socket, move |s, peer| {
                            proxy::tls::passthrough(router.clone(), s, peer)
                        })
                        .await
                }
                // udp listeners run in `start_udp`.
                (Protocol::Udp, _) => {}
            }
        });
        (handle, tls)
    }

    /// A udp listener's loop on `udp`; `None` without a service.
    fn start_udp(
        &self,
        cfg: &ListenerConfig,
        udp: Arc<UdpSocket>,
        conns: &Connections,
        stop: &CancellationToken,
    ) -> Option<JoinHandle<()>> {
        let Some(service) = cfg.service.clone() else {
            // Validation requires a service on udp listeners.
            return None;
        };
        let ctx = Arc::new(proxy::udp::UdpCtx {
            name: cfg.name.clone(),
            listen: cfg.listen,
            service,
            snapshot: self.snapshot.clone(),
            metrics: self.metrics.clone(),
            max_sessions: cfg.edge.max_sessions,
        });
        let (accepting, stopped) = (self.accepting.clone(), stop.clone());
        // Shutdown's hard stop ends the sessions too.
        let hard_stop = conns.hard_stop.clone();
        Some(tokio::spawn(async move {
            tokio::select! {
                _ = accepting.cancelled() => {}
                _ = stopped.cancelled() => return,
            }
            tokio::select! {
                _ = proxy::udp::serve(ctx, udp, stopped) => {}
                // Dropping the loop ends its sessions.
                _ = hard_stop.cancelled() => {}
            }
        }))
    }

    /// Stops every accept loop (shutdown); connections are drained by the caller.
    pub async fn stop_all(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.stop.cancel();
            let _ = r.handle.await;
        }
    }
}

/// A bind error in the words of the `failed: REASON` state.
fn bind_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "address in use".into(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
        }
        std::io::ErrorKind::AddrNotAvailable => "address not available on this node".into(),
        _ => e.to_string(),
    }
}

/// A listener as the node's records report it.
pub fn record_of(l: &ListenerConfig, source: Option<Source>, state: String) -> PublishedListener {
    PublishedListener {
        state,
        source: source.map(Source::as_str).unwrap_or("config").to_string(),
        ..PublishedListener::from_config(l)
    }
}

/// One listener's accept loop: every connection goes through admission (limits, PROXY
/// header) before its protocol handler sees it.
struct Accept {
    name: String,
    stop: CancellationToken,
    conns: Connections,
    admission: Arc<Admission>,
}

impl Accept {
    /// Accepts on `socket` until stopped, running `handler` for each admitted connection.
    async fn run<H, Fut>(self, socket: &TcpListener, handler: H)
    where
        H: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let admission = self.admission;
        listener::accept_loop(self.name, socket, self.stop, self.conns, move |s, peer| {
            let (admission, handler) = (admission.clone(), handler.clone());
            async move {
                // Boxed, and in statements of their own: a temporary awaited inside an
                // `if let` or a larger expression keeps its room in the connection's future
                // for as long as the connection lives.
                let admitting = Box::pin(admission.admit(s, peer));
                let Some((s, peer, _permit)) = admitting.await else {
                    return;
                };
                handler(s, peer).await
            }
        })
        .await
    }
}
