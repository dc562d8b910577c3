//! Wiring: discovery, node registration, listeners and the admin endpoint; reload and drain.
//!
//! `run` is what `routemesh run` calls once the config is valid. It binds every port before
//! reporting ready, follows reload requests (SIGHUP in main.rs) by swapping only what changed,
//! and on shutdown revokes the node lease, stops accepting and drains connections up to
//! `drain_timeout`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::certs::{CertError, LoadedCerts, load_certs};
use crate::config::{
    Config, DiscoveryBackend, ListenerConfig, Protocol, ServiceName, ServiceSettings,
};
use crate::discovery::keys::{NodeRecord, PublishedListener};
use crate::discovery::node::{LeaseSettings, Registration};
use crate::discovery::{self, DiscoveryStatus, Publisher};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::admission::Admission;
use crate::proxy::listener::{self, Connections};
use crate::proxy::{self, ListenerCtx};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::util::net;

/// Start-up failures (the daemon exits non-zero with this message).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A metric family could not be registered (a bad definition in src/metrics.rs).
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A certificate of a TLS-terminating listener could not be loaded (it changed on disk
    /// after the config was validated).
    #[error("listener {listener}: {source}")]
    Tls {
        listener: String,
        #[source]
        source: CertError,
    },
}

/// Requests from main.rs to the running app.
#[derive(Debug)]
pub enum Control {
    /// Re-read the config file (SIGHUP).
    Reload,
}

/// A running accept loop; stopping it hands the socket back so a changed listener keeps its
/// port without a rebind gap.
struct RunningListener {
    config: ListenerConfig,
    stop: CancellationToken,
    handle: JoinHandle<TcpListener>,
    /// http listeners with `tls`: its certificates are replaced on every reload.
    tls: Option<Arc<proxy::tls::Terminator>>,
}

struct Listeners {
    running: BTreeMap<SocketAddr, RunningListener>,
    /// The `[http]` limits and access-log flag the running contexts were built with.
    http: crate::config::HttpLimits,
    access_log: bool,
    conns: Connections,
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
}

impl Listeners {
    /// `certs`: the loaded certificates of an http listener with `tls`.
    fn spawn(
        &mut self,
        cfg: ListenerConfig,
        socket: TcpListener,
        config: &Config,
        certs: Option<LoadedCerts>,
    ) {
        let stop = CancellationToken::new();
        let tls = certs.map(proxy::tls::Terminator::new);
        let ctx = Arc::new(ListenerCtx {
            name: cfg.name.clone(),
            service: cfg.service.clone(),
            snapshot: self.snapshot.clone(),
            metrics: self.metrics.clone(),
            routes: cfg.routes.clone(),
            http: config.http.clone(),
            access_log: config.log.access,
            edge: cfg.edge.clone(),
            drain: self.conns.drain.clone(),
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
            conns: self.conns.clone(),
            admission,
        };
        let protocol = cfg.protocol;
        let terminator = tls.clone();
        let handle = tokio::spawn(async move {
            match (protocol, terminator) {
                (Protocol::Tcp, _) => {
                    accept
                        .run(&socket, move |s, peer| {
                            proxy::tcp::handle(ctx.clone(), s, peer)
                        })
                        .await
                }
                (Protocol::Http, Some(term)) => {
                    accept
                        .run(&socket, move |s, peer| {
                            proxy::tls::terminate(ctx.clone(), term.clone(), s, peer)
                        })
                        .await
                }
                (Protocol::Http, None) => {
                    accept
                        .run(&socket, move |s, peer| {
                            proxy::http::handle(ctx.clone(), s, peer)
                        })
                        .await
                }
                (Protocol::Tls, _) => {
                    let router = proxy::tls::SniRouter::new(ctx);
                    accept
                        .run(&socket, move |s, peer| {
                            proxy::tls::passthrough(router.clone(), s, peer)
                        })
                        .await
                }
            }
            socket
        });
        tracing::info!(listener = %cfg.name, addr = %cfg.listen, protocol = cfg.protocol.as_str(), service = cfg.service.as_ref().map(|s| s.as_str()).unwrap_or("-"), "listening");
        self.running.insert(
            cfg.listen,
            RunningListener {
                config: cfg,
                stop,
                handle,
                tls,
            },
        );
    }

    /// Makes the running set match `config`: unchanged listeners are left alone, changed ones
    /// get a new accept loop on the same socket, removed ones stop accepting (their open
    /// connections run on), new ones are bound. The certificates of TLS-terminating listeners
    /// are read again every time, changed or not, so a reload picks up rotated files. Fails
    /// without changing anything when a new port cannot be bound or a certificate loaded.
    async fn apply(&mut self, config: &Config) -> Result<(), AppError> {
        let mut certs = BTreeMap::new();
        for l in &config.listeners {
            if l.protocol == Protocol::Http && !l.edge.tls.is_empty() {
                let loaded = load_certs(&l.edge.tls).map_err(|source| AppError::Tls {
                    listener: l.name.clone(),
                    source,
                })?;
                certs.insert(l.listen, loaded);
            }
        }
        let mut fresh = Vec::new();
        for l in &config.listeners {
            if !self.running.contains_key(&l.listen) {
                let socket = net::bind(l.listen).map_err(|source| AppError::Bind {
                    what: format!("listener {}", l.name),
                    addr: l.listen,
                    source,
                })?;
                fresh.push((l.clone(), socket));
            }
        }
        let wanted: BTreeMap<SocketAddr, &ListenerConfig> =
            config.listeners.iter().map(|l| (l.listen, l)).collect();
        let addrs: Vec<SocketAddr> = self.running.keys().copied().collect();
        for addr in addrs {
            let changed = match wanted.get(&addr) {
                None => true,
                Some(w) => **w != self.running[&addr].config || self.needs_restart(config),
            };
            if !changed {
                if let (Some(term), Some(loaded)) = (&self.running[&addr].tls, certs.remove(&addr))
                {
                    term.replace(loaded);
                    tracing::info!(listener = %self.running[&addr].config.name, "TLS certificates reloaded");
                }
                continue;
            }
            let r = self.running.remove(&addr).expect("key from the map");
            r.stop.cancel();
            let socket = match r.handle.await {
                Ok(s) => s,
                Err(_) => continue,
            };
            match wanted.get(&addr) {
                Some(w) => self.spawn((*w).clone(), socket, config, certs.remove(&addr)),
                None => tracing::info!(listener = %r.config.name, addr = %addr, "listener removed"),
            }
        }
        for (l, socket) in fresh {
            let loaded = certs.remove(&l.listen);
            self.spawn(l, socket, config, loaded);
        }
        self.http = config.http.clone();
        self.access_log = config.log.access;
        Ok(())
    }

    /// Listener-wide settings that live in the listener context.
    fn needs_restart(&self, config: &Config) -> bool {
        self.http != config.http || self.access_log != config.log.access
    }

    async fn stop_all(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.stop.cancel();
            let _ = r.handle.await;
        }
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
                if let Some((s, peer, _permit)) = admission.admit(s, peer).await {
                    handler(s, peer).await
                }
            }
        })
        .await
    }
}

fn node_record(config: &Config, started: u64) -> NodeRecord {
    NodeRecord {
        advertise: config.node.advertise,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started,
        listeners: config
            .listeners
            .iter()
            .map(PublishedListener::from_config)
            .collect(),
    }
}

fn registration(config: &Config, started: u64) -> Arc<Registration> {
    Arc::new(Registration {
        node: config.node.name.clone(),
        record: node_record(config, started),
        tasks: config.tasks.clone(),
    })
}

/// The services this node's listeners route to (default routes and HTTP routes): the ones
/// whose tasks it health-checks.
fn served_of(config: &Config) -> Arc<std::collections::BTreeSet<ServiceName>> {
    Arc::new(
        config
            .listeners
            .iter()
            .flat_map(|l| {
                l.service
                    .iter()
                    .cloned()
                    .chain(l.routes.iter().map(|r| r.service.clone()))
                    .chain(l.edge.sni_routes.iter().map(|r| r.service.clone()))
            })
            .collect(),
    )
}

fn settings_of(config: &Config) -> Arc<BTreeMap<ServiceName, ServiceSettings>> {
    Arc::new(config.services.clone())
}

/// Runs the daemon until `shutdown`; `control` carries reload requests.
pub async fn run(
    config: Config,
    mut control: mpsc::Receiver<Control>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let metrics = Metrics::new()?;
    let snapshot: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let status = Arc::new(DiscoveryStatus::default());
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    // Admin first, so /healthz answers while the rest starts.
    let admin_socket = net::bind(config.admin.listen).map_err(|source| AppError::Bind {
        what: "admin listener".into(),
        addr: config.admin.listen,
        source,
    })?;
    let admin_state = Arc::new(AdminState::new(
        &config,
        snapshot.clone(),
        status.clone(),
        metrics.clone(),
    ));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_socket,
        admin_state.clone(),
        admin_stop.clone(),
    ));
    tracing::info!(addr = %config.admin.listen, "admin listening");

    let mut listeners = Listeners {
        running: BTreeMap::new(),
        http: config.http.clone(),
        access_log: config.log.access,
        conns: Connections::default(),
        snapshot: snapshot.clone(),
        metrics: metrics.clone(),
    };
    listeners.apply(&config).await?;
    admin_state.listeners_bound.store(true, Ordering::Release);

    // Discovery: the one writer of the snapshot.
    let (settings_tx, settings_rx) = watch::channel(settings_of(&config));
    let (registration_tx, registration_rx) = watch::channel(registration(&config, started));
    let discovery_stop = CancellationToken::new();
    let lease_stop = CancellationToken::new();
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    let mut lease_task: Option<JoinHandle<()>> = None;
    let mut static_publisher = None;
    let mut publisher = Publisher::new(
        &config.discovery.prefix,
        settings_of(&config),
        snapshot.clone(),
        status.clone(),
    )
    .with_config_path(&config.source);
    match config.discovery.backend {
        DiscoveryBackend::Static => {
            discovery::static_::publish_tasks(
                &mut publisher,
                &config.discovery.prefix,
                &config.tasks,
            );
            tracing::info!(tasks = config.tasks.len(), "static routing table published");
            static_publisher = Some(publisher);
        }
        DiscoveryBackend::Etcd => {
            background.push(tokio::spawn(discovery::etcd::run(
                config.discovery.clone(),
                publisher,
                settings_rx,
                discovery_stop.clone(),
            )));
            // [docker]: the lease keeper registers `[[task]]`s ∪ this node's labelled
            // containers. docker::spawn watches the engine and merges its tasks into every
            // registration sent on `registration_tx` (start and reloads alike); changing
            // [docker] itself needs a restart.
            let registration_rx = if config.docker.enabled {
                let (merged, tasks) = crate::docker::spawn(
                    &config,
                    registration_rx,
                    metrics.clone(),
                    discovery_stop.clone(),
                );
                background.extend(tasks);
                merged
            } else {
                registration_rx
            };
            lease_task = Some(tokio::spawn(discovery::node::run(
                LeaseSettings {
                    endpoints: config.discovery.endpoints.clone(),
                    prefix: config.discovery.prefix.clone(),
                    ttl: config.discovery.node_ttl,
                    dial_timeout: config.discovery.dial_timeout,
                    security: config.discovery.security.clone(),
                },
                registration_rx,
                lease_stop.clone(),
            )));
        }
    }

    let (served_tx, served_rx) = watch::channel(served_of(&config));
    let health_stop = CancellationToken::new();
    background.push(tokio::spawn(crate::health::run(
        snapshot.clone(),
        served_rx,
        metrics.clone(),
        health_stop.clone(),
    )));
    let dns_stop = CancellationToken::new();
    if let Some(dns) = &config.dns {
        let sockets = crate::dns::Sockets::bind(dns.listen).map_err(|source| AppError::Bind {
            what: "dns listener".into(),
            addr: dns.listen,
            source,
        })?;
        background.push(tokio::spawn(crate::dns::run(
            dns.clone(),
            sockets,
            snapshot.clone(),
            config.node.name.clone(),
            metrics.clone(),
            dns_stop.clone(),
        )));
    }

    let mut current = config;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = control.recv() => match msg {
                Some(Control::Reload) => {
                    reload(&mut current, &mut listeners, &settings_tx, &registration_tx, static_publisher.as_mut(), &metrics, started).await;
                    let _ = served_tx.send(served_of(&current));
                }
                None => break,
            },
        }
    }

    // Shutdown: leave the cluster first, then stop accepting, then drain.
    tracing::info!("shutting down: revoking the node lease, then draining");
    admin_state.draining.store(true, Ordering::Relaxed);
    lease_stop.cancel();
    if let Some(t) = lease_task {
        let _ = tokio::time::timeout(current.discovery.dial_timeout * 2, t).await;
    }
    listeners.stop_all().await;
    let conns = listeners.conns.clone();
    conns.drain.cancel();
    conns.tracker.close();
    let open = conns.tracker.len();
    if open > 0 {
        tracing::info!(open, timeout = ?current.node.drain_timeout, "draining open connections");
    }
    if tokio::time::timeout(current.node.drain_timeout, conns.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.tracker.len(),
            "drain timeout reached; closing the remaining connections"
        );
        conns.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), conns.tracker.wait()).await;
    }
    discovery_stop.cancel();
    health_stop.cancel();
    dns_stop.cancel();
    for t in background {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads the config file; an invalid file is refused whole and the old config stays.
async fn reload(
    current: &mut Config,
    listeners: &mut Listeners,
    settings_tx: &watch::Sender<Arc<BTreeMap<ServiceName, ServiceSettings>>>,
    registration_tx: &watch::Sender<Arc<Registration>>,
    static_publisher: Option<&mut Publisher>,
    metrics: &Metrics,
    started: u64,
) {
    let next = match Config::load(&current.source) {
        Ok(c) => c,
        Err(e) => {
            metrics
                .config_reloads_total
                .with_label_values(&["error"])
                .inc();
            tracing::error!("config reload refused, keeping the running config:\n{e}");
            return;
        }
    };
    if next.admin.listen != current.admin.listen
        || next.node.name != current.node.name
        || next.discovery.backend != current.discovery.backend
        || next.discovery.endpoints != current.discovery.endpoints
        || next.discovery.prefix != current.discovery.prefix
        || next.runtime != current.runtime
    {
        tracing::warn!(
            "config reload: [admin], node.name, [discovery] and [runtime] changes need a restart; they are ignored until then"
        );
    }
    if let Err(e) = listeners.apply(&next).await {
        metrics
            .config_reloads_total
            .with_label_values(&["error"])
            .inc();
        tracing::error!(error = %e, "config reload refused, keeping the running config");
        return;
    }
    let _ = settings_tx.send(settings_of(&next));
    let _ = registration_tx.send(registration(&next, started));
    if let Some(p) = static_publisher {
        p.set_settings(settings_of(&next));
        discovery::static_::publish_tasks(p, &current.discovery.prefix, &next.tasks);
    }
    // Keep what needs a restart as it runs.
    let mut next = next;
    next.admin = current.admin.clone();
    next.node.name = current.node.name.clone();
    next.discovery.backend = current.discovery.backend;
    next.discovery.endpoints = current.discovery.endpoints.clone();
    next.discovery.prefix = current.discovery.prefix.clone();
    next.runtime = current.runtime.clone();
    *current = next;
    metrics
        .config_reloads_total
        .with_label_values(&["success"])
        .inc();
    tracing::info!("config reloaded");
}
