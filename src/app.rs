//! Wiring: discovery, node registration, listeners and the admin endpoint; reload and drain.
//!
//! `run` is what `routemesh run` calls once the config is valid. It binds every port before
//! reporting ready, follows reload requests (SIGHUP in main.rs) by swapping only what changed,
//! and on shutdown revokes the node lease, stops accepting and drains connections up to
//! `drain_timeout`.
//!
//! Upgrades (`handover.rs`, src/upgrade/): it serves `[admin] upgrade_socket`. Started with
//! `run --upgrade`, it takes the old process's sockets instead of binding them and its lease,
//! and tells the old one to stop once it is ready. Asked by a new process, it offers its
//! sockets and lease; once the new one is ready it stops accepting at once, leaves the lease
//! alive, and drains its connections for up to `upgrade_drain_timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::certs::CertError;
use crate::config::{Config, DiscoveryBackend, ServiceName, ServiceSettings};
use crate::discovery::keys::{NodeRecord, PublishedListener};
use crate::discovery::node::{Adopt, LeaseHandle, LeaseSettings, Registration};
use crate::discovery::published::Published;
use crate::discovery::{self, DiscoveryStatus, Publisher};
use crate::metrics::{Metrics, MetricsError};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::upgrade::{self, Done, Gate, Inherited, Kind, Takeover, UpgradeError};
use crate::util::notify;

mod handover;
mod listeners;
use handover::{Held, READY_WITHIN, dup};
use listeners::{Listeners, RETRY_FAILED};

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
    /// `run --upgrade` could not take over (the old process keeps serving).
    #[error("upgrade failed: {0}")]
    Upgrade(#[from] UpgradeError),
}

/// A `run --upgrade` in progress: the connection to the old process and what it handed over.
pub struct Upgrade {
    pub takeover: Takeover,
    pub inherited: Inherited,
}

/// Requests from main.rs to the running app.
#[derive(Debug)]
pub enum Control {
    /// Re-read the config file (SIGHUP).
    Reload,
}

fn node_record(config: &Config, started: u64, listeners: &[PublishedListener]) -> NodeRecord {
    NodeRecord {
        advertise: config.node.advertise,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started,
        listeners: listeners.to_vec(),
    }
}

fn registration(
    config: &Config,
    started: u64,
    listeners: &[PublishedListener],
) -> Arc<Registration> {
    Arc::new(Registration {
        node: config.node.name.clone(),
        record: node_record(config, started, listeners),
        tasks: config.tasks.clone(),
    })
}

/// Tells the rest of the daemon what the listeners are now: the admin endpoints, the node
/// registration (its `alive` record lists every listener with its state) and the health
/// checker (the services the bound listeners route to).
struct Report<'a> {
    admin: &'a AdminState,
    registration: &'a watch::Sender<Arc<Registration>>,
    served: &'a watch::Sender<Arc<BTreeSet<ServiceName>>>,
    started: u64,
}

impl Report<'_> {
    /// `always`: send the registration even when the listeners did not change (a reload may
    /// have changed the tasks).
    fn send(&self, config: &Config, listeners: &Listeners, always: bool) {
        let states = listeners.states();
        let changed = **self.admin.listeners.load() != states;
        if changed {
            self.admin.listeners.store(Arc::new(states.to_vec()));
        }
        if changed || always {
            let _ = self
                .registration
                .send(registration(config, self.started, states));
        }
        let served = listeners.served();
        self.served.send_if_modified(|s| {
            let differs = **s != served;
            if differs {
                *s = Arc::new(served.clone());
            }
            differs
        });
    }
}

/// Runs `serve` once `serving` fires (unless `stop` comes first).
async fn once_serving(
    serving: CancellationToken,
    stop: CancellationToken,
    serve: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        _ = serving.cancelled() => serve.await,
        _ = stop.cancelled() => {}
    }
}

fn settings_of(config: &Config) -> Arc<BTreeMap<ServiceName, ServiceSettings>> {
    Arc::new(config.services.clone())
}

/// Runs the daemon until `shutdown`; `control` carries reload requests; `upgrade` when
/// started with `run --upgrade`.
pub async fn run(
    config: Config,
    mut control: mpsc::Receiver<Control>,
    shutdown: CancellationToken,
    upgrade: Option<Upgrade>,
) -> Result<(), AppError> {
    let (takeover, mut inherited) = match upgrade {
        Some(u) => (Some(u.takeover), Some(u.inherited)),
        None => (None, None),
    };
    let generation = inherited.as_ref().map_or(1, |i| i.generation);
    // Taking over, nothing is accepted before this process is ready (its routing synced):
    // the old process serves until then, and alone if this one fails.
    let serving = CancellationToken::new();
    if inherited.is_none() {
        serving.cancel();
    }
    let metrics = Metrics::new()?;
    metrics
        .process_generation
        .with_label_values(&[&std::process::id().to_string()])
        .set(generation as i64);
    let snapshot: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let status = Arc::new(DiscoveryStatus::default());
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    // Admin first, so /healthz answers while the rest starts.
    let admin_socket = handover::tcp(
        &mut inherited,
        Kind::Admin,
        config.admin.listen,
        "admin listener",
    )?;
    let mut held = Held {
        admin: dup(admin_socket.as_fd(), "admin").map(|fd| (config.admin.listen, fd)),
        ..Held::default()
    };
    let admin_state = Arc::new(AdminState::new(
        &config,
        snapshot.clone(),
        status.clone(),
        metrics.clone(),
    ));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(once_serving(
        serving.clone(),
        admin_stop.clone(),
        admin::serve(admin_socket, admin_state.clone(), admin_stop.clone()),
    ));
    tracing::info!(addr = %config.admin.listen, "admin listening");

    // The one writer of the snapshot. The static table is published before any listener is
    // bound, so no connection ever meets an empty one.
    let (changed_tx, mut changed_rx) = watch::channel(());
    let mut publisher = Publisher::new(
        &config.discovery.prefix,
        settings_of(&config),
        snapshot.clone(),
        status.clone(),
    )
    .with_config_path(&config.source)
    .with_notify(changed_tx)
    .with_acme_key(
        config
            .acme
            .as_ref()
            .map(|a| crate::acme::seal::SealKey::new(&a.key)),
    );
    if config.discovery.backend == DiscoveryBackend::Static {
        discovery::static_::publish_tasks(&mut publisher, &config.discovery.prefix, &config.tasks);
        tracing::info!(tasks = config.tasks.len(), "static routing table published");
    }

    // TOML listeners first: a port that cannot be bound fails the start. Published ones
    // follow the first synced snapshot, before /readyz says ready.
    // Listeners accept once routing is in place: taking over, once ready; with the static
    // backend, once its table is published; with etcd at once (the routes follow the sync).
    let accepting = match (&inherited, config.discovery.backend) {
        (None, DiscoveryBackend::Static) => CancellationToken::new(),
        _ => serving.clone(),
    };
    let mut listeners = Listeners::new(
        &config,
        snapshot.clone(),
        metrics.clone(),
        accepting.clone(),
    );
    if let Some(i) = inherited.as_mut() {
        listeners.inherit(i.take_listeners(), i.take_udp_listeners());
    }
    listeners.reconcile(&config, &[]).await?;
    admin_state
        .config_listeners_bound
        .store(true, Ordering::Release);
    let (served_tx, served_rx) = watch::channel(Arc::new(listeners.served()));
    let (settings_tx, settings_rx) = watch::channel(settings_of(&config));
    let (registration_tx, registration_rx) =
        watch::channel(registration(&config, started, listeners.states()));
    admin_state
        .listeners
        .store(Arc::new(listeners.states().to_vec()));
    let discovery_stop = CancellationToken::new();
    let lease_stop = CancellationToken::new();
    let lease_handle = Arc::new(LeaseHandle::default());
    // Taking over: the old process's keys once it has stopped writing, and whether this
    // process knows all of its own tasks (with [docker]: after the engine's first listing).
    let (previous_tx, previous_rx) = watch::channel(None);
    let tasks_complete = CancellationToken::new();
    if !config.docker.enabled {
        tasks_complete.cancel();
    }
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    let mut lease_task: Option<JoinHandle<()>> = None;
    let mut static_publisher = None;
    match config.discovery.backend {
        DiscoveryBackend::Static => {
            // The table was published before the listeners were bound.
            static_publisher = Some(publisher);
            if inherited.is_none() {
                accepting.cancel();
            }
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
                    tasks_complete.clone(),
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
                lease_handle.clone(),
                inherited.as_ref().and_then(|i| i.lease).map(|lease| Adopt {
                    lease,
                    previous: previous_rx,
                    complete: tasks_complete.clone(),
                }),
                lease_stop.clone(),
            )));
        }
    }

    // [acme]: every node looks for due certificates; the lock in etcd lets one order each.
    let acme_wanted = crate::acme::wanted(&config.listeners);
    if let (Some(acme), DiscoveryBackend::Etcd) = (&config.acme, config.discovery.backend) {
        background.push(tokio::spawn(crate::acme::run(
            crate::acme::AcmeTask {
                acme: acme.clone(),
                discovery: config.discovery.clone(),
                node: config.node.name.clone(),
                wanted: acme_wanted,
                snapshot: snapshot.clone(),
                lease: lease_handle.clone(),
                metrics: metrics.clone(),
            },
            discovery_stop.clone(),
        )));
    }
    // Memory a connection storm took goes back once it is freed (one process-wide timer).
    tokio::spawn(crate::util::trim::run());
    let health_stop = CancellationToken::new();
    background.push(tokio::spawn(crate::health::run(
        snapshot.clone(),
        served_rx,
        metrics.clone(),
        health_stop.clone(),
    )));
    let dns_stop = CancellationToken::new();
    if let Some(dns) = &config.dns {
        let sockets = handover::dns(&mut inherited, dns.listen)?;
        held.dns = dup(sockets.udp.as_fd(), "dns")
            .zip(dup(sockets.tcp.as_fd(), "dns"))
            .map(|(u, t)| (dns.listen, u, t));
        background.push(tokio::spawn(once_serving(
            serving.clone(),
            dns_stop.clone(),
            crate::dns::run(
                dns.clone(),
                sockets,
                snapshot.clone(),
                config.node.name.clone(),
                metrics.clone(),
                dns_stop.clone(),
            ),
        )));
    }

    // The upgrade socket: served at once on a fresh start; after taking over, once the old
    // process has stopped (until then it answers there).
    let gate = Arc::new(Gate::default());
    let (upgrade_tx, mut upgrade_rx) = mpsc::channel(4);
    let upgrade_stop = CancellationToken::new();
    let old_upgrade_path = inherited
        .as_ref()
        .and_then(|i| i.old_upgrade_path())
        .map(|p| p.to_path_buf());
    let mut upgrade_file = None;
    let mut upgrade_listener = None;
    if let Some((listener, file)) =
        handover::upgrade_socket(&mut inherited, config.admin.upgrade_socket.as_deref())
    {
        held.upgrade = dup(listener.as_fd(), "upgrade").map(|fd| (file.path.clone(), fd));
        upgrade_file = Some(file);
        upgrade_listener = Some(listener);
    }
    let serve_upgrades = |listener| {
        tokio::spawn(upgrade::serve(
            listener,
            gate.clone(),
            upgrade_tx.clone(),
            upgrade_stop.clone(),
        ))
    };
    if takeover.is_none() {
        if let Some(l) = upgrade_listener.take() {
            serve_upgrades(l);
        }
        let admin = admin_state.clone();
        tokio::spawn(async move {
            if handover::wait_ready(&admin, None).await.is_ok() {
                notify::ready();
            }
        });
    }
    let mut taking_over = takeover.map(|t| {
        let admin = admin_state.clone();
        let serving = serving.clone();
        Box::pin(async move {
            if let Err(why) = handover::wait_ready(&admin, Some(READY_WITHIN)).await {
                t.abort(&why).await;
                return Err(UpgradeError::NotReady {
                    within: READY_WITHIN,
                    why,
                });
            }
            // Serve first, then tell the old process to stop.
            serving.cancel();
            t.ready().await
        })
    });
    let mut failed: Option<UpgradeError> = None;
    let mut handed_over = false;
    // Fires once the new process has been told this one stopped (awaited before exiting).
    let mut done_sent = None;

    let mut current = config;
    let report = Report {
        admin: &admin_state,
        registration: &registration_tx,
        served: &served_tx,
        started,
    };
    // The published listeners last reconciled with (the snapshot reuses the list's Arc while
    // it does not change).
    let mut seen: Option<Arc<Vec<Published>>> = None;
    let mut notified = true;
    let mut retry = tokio::time::interval(RETRY_FAILED);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if current.discovery.backend == DiscoveryBackend::Static {
        admin_state.listeners_bound.store(true, Ordering::Release);
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = async { taking_over.as_mut().expect("guarded").await }, if taking_over.is_some() => {
                taking_over = None;
                match r {
                    Ok((done, predecessor)) => {
                        let lease = done.as_ref().and_then(|d| d.lease);
                        let previous = done.map(|d| d.keys).unwrap_or_default();
                        let _ = previous_tx.send(Some(Arc::new(previous)));
                        let mut closed: Vec<String> =
                            listeners.close_inherited().iter().map(|a| a.to_string()).collect();
                        closed.extend(inherited.take().map(|mut i| i.close_rest()).unwrap_or_default());
                        if !closed.is_empty() {
                            tracing::info!(sockets = %closed.join(", "), "closed the old process's sockets that this config no longer has");
                        }
                        if let Some(old) = old_upgrade_path.as_deref().filter(|p| Some(*p) != current.admin.upgrade_socket.as_deref()) {
                            let _ = std::fs::remove_file(old);
                        }
                        let pid = predecessor.pid;
                        gate.close(format!(
                            "the previous process (pid {pid}) is still draining its connections (for up to [node] upgrade_drain_timeout = {}); upgrade again once it has exited, or end its drain with `kill -TERM {pid}`",
                            humantime::format_duration(current.node.upgrade_drain_timeout)
                        ));
                        let g = gate.clone();
                        tokio::spawn(async move {
                            predecessor.exited().await;
                            tracing::info!(pid, "the previous process has exited");
                            g.open();
                        });
                        if let Some(l) = upgrade_listener.take() {
                            serve_upgrades(l);
                        }
                        notify::ready();
                        tracing::info!(previous_pid = pid, lease = ?lease, "upgrade done: serving on the inherited sockets; the previous process drains");
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            Some(req) = upgrade_rx.recv() => match req {
                upgrade::Request::Offer(reply) => {
                    let _ = reply.send(held.offer(&listeners, generation, lease_handle.lease()));
                }
                upgrade::Request::HandOver(h) => {
                    // The new process serves: stop accepting everywhere at once, stop writing
                    // to etcd without revoking, and report what was written.
                    admin_state.handed_over.store(true, Ordering::Release);
                    notify::stopping();
                    upgrade_stop.cancel();
                    listeners.stop_all().await;
                    admin_stop.cancel();
                    dns_stop.cancel();
                    lease_handle.keep_on_stop();
                    lease_stop.cancel();
                    if let Some(t) = lease_task.take() {
                        let _ = tokio::time::timeout(current.discovery.dial_timeout * 2, t).await;
                    }
                    if let Some(f) = upgrade_file.take() {
                        f.keep();
                    }
                    drop(std::mem::take(&mut held));
                    let _ = h.reply.send(Done {
                        lease: lease_handle.lease(),
                        keys: lease_handle.written_keys(),
                    });
                    done_sent = Some(h.sent);
                    handed_over = true;
                    break;
                }
            },
            msg = control.recv() => match msg {
                Some(Control::Reload) => {
                    let published = seen.clone().unwrap_or_default();
                    reload(&mut current, &mut listeners, &published, &settings_tx, static_publisher.as_mut(), &metrics).await;
                    report.send(&current, &listeners, true);
                }
                None => break,
            },
            r = changed_rx.changed(), if notified => {
                if r.is_err() {
                    notified = false;
                    continue;
                }
                let snap = snapshot.load_full();
                if !snap.synced || seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &snap.published)) {
                    continue;
                }
                if let Err(e) = listeners.reconcile(&current, &snap.published).await {
                    tracing::error!(error = %e, "listeners not reconciled with the published ones");
                }
                seen = Some(snap.published.clone());
                report.send(&current, &listeners, false);
                admin_state.listeners_bound.store(true, Ordering::Release);
            }
            _ = retry.tick(), if listeners.has_failed() => {
                let published = seen.clone().unwrap_or_default();
                if let Err(e) = listeners.reconcile(&current, &published).await {
                    tracing::error!(error = %e, "listeners not reconciled with the published ones");
                }
                report.send(&current, &listeners, false);
            }
        }
    }

    // Shutdown: leave the cluster first, then stop accepting, then drain. After a hand-over
    // the new process has the lease and the sockets already; a failed takeover leaves both
    // to the old process (the lease keeper does not revoke a lease it has not adopted).
    let drain_timeout = if handed_over {
        current.node.upgrade_drain_timeout
    } else {
        if failed.is_some() {
            tracing::warn!("not taking over; the running process keeps serving");
        } else {
            tracing::info!("shutting down: revoking the node lease, then draining");
            notify::stopping();
        }
        admin_state.draining.store(true, Ordering::Relaxed);
        lease_stop.cancel();
        if let Some(t) = lease_task {
            let _ = tokio::time::timeout(current.discovery.dial_timeout * 2, t).await;
        }
        listeners.stop_all().await;
        current.node.drain_timeout
    };
    drop(upgrade_file);
    let conns = listeners.conns.clone();
    conns.drain.cancel();
    conns.tracker.close();
    let open = conns.tracker.len();
    if open > 0 {
        tracing::info!(open, timeout = ?drain_timeout, "draining open connections");
    }
    let drained = tokio::select! {
        r = tokio::time::timeout(drain_timeout, conns.tracker.wait()) => r.is_ok(),
        // SIGTERM while draining after a hand-over: the usual shutdown bound applies.
        _ = shutdown.cancelled(), if handed_over => {
            tracing::info!(timeout = ?current.node.drain_timeout, "stop requested while draining after the upgrade");
            tokio::time::timeout(current.node.drain_timeout, conns.tracker.wait()).await.is_ok()
        }
    };
    if !drained {
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
    if let Some(sent) = done_sent {
        let _ = tokio::time::timeout(Duration::from_secs(15), sent).await;
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads the config file; an invalid file is refused whole and the old config stays.
async fn reload(
    current: &mut Config,
    listeners: &mut Listeners,
    published: &[Published],
    settings_tx: &watch::Sender<Arc<BTreeMap<ServiceName, ServiceSettings>>>,
    static_publisher: Option<&mut Publisher>,
    metrics: &Metrics,
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
        || next.admin.upgrade_socket != current.admin.upgrade_socket
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
    if let Err(e) = listeners.reconcile(&next, published).await {
        metrics
            .config_reloads_total
            .with_label_values(&["error"])
            .inc();
        tracing::error!(error = %e, "config reload refused, keeping the running config");
        return;
    }
    let _ = settings_tx.send(settings_of(&next));
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
