//! Wiring: discovery, node registration, listeners and the admin endpoint; reload and drain.
//!
//! `run` is what `routemesh run` calls once the config is valid. It binds every port before
//! reporting ready, follows reload requests (SIGHUP in main.rs) by swapping only what changed,
//! and on shutdown revokes the node lease, stops accepting and drains connections up to
//! `drain_timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
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
use crate::discovery::node::{LeaseSettings, Registration};
use crate::discovery::published::Published;
use crate::discovery::{self, DiscoveryStatus, Publisher};
use crate::metrics::{Metrics, MetricsError};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::util::net;

mod listeners;
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
    .with_notify(changed_tx);
    if config.discovery.backend == DiscoveryBackend::Static {
        discovery::static_::publish_tasks(&mut publisher, &config.discovery.prefix, &config.tasks);
        tracing::info!(tasks = config.tasks.len(), "static routing table published");
    }

    // TOML listeners first: a port that cannot be bound fails the start. Published ones
    // follow the first synced snapshot, before /readyz says ready.
    let mut listeners = Listeners::new(&config, snapshot.clone(), metrics.clone());
    listeners.reconcile(&config, &[]).await?;
    let (served_tx, served_rx) = watch::channel(Arc::new(listeners.served()));
    let (settings_tx, settings_rx) = watch::channel(settings_of(&config));
    let (registration_tx, registration_rx) =
        watch::channel(registration(&config, started, listeners.states()));
    admin_state
        .listeners
        .store(Arc::new(listeners.states().to_vec()));
    let discovery_stop = CancellationToken::new();
    let lease_stop = CancellationToken::new();
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    let mut lease_task: Option<JoinHandle<()>> = None;
    let mut static_publisher = None;
    match config.discovery.backend {
        DiscoveryBackend::Static => static_publisher = Some(publisher),
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
