//! Engine discovery (`[docker]`): this node's running containers labelled
//! `routemesh.service` / `routemesh.port` become tasks registered under the node's lease,
//! beside its `[[task]]`s.
//!
//! One task owns the local engine connection: it lists the labelled containers, follows the
//! engine's event stream, and re-lists every `reconcile_interval` to repair anything a gap in
//! the stream missed. `die`, `stop`, `kill` (with a stopping signal), `pause`, `destroy` and
//! `oom` take a task out at once without asking the engine anything more; `start`,
//! `unpause` and `health_status` inspect the container and map it again
//! ([`container::task_of`]). The current set is published on a watch channel; [`spawn`]
//! merges it with the config's registration for the lease keeper (`discovery::node`), so the
//! same one-txn write and delete path serves both.
//!
//! Engine unreachable: the daemon keeps proxying, `routemesh_docker_up` is 0, one warning is
//! logged per backoff step, and the last known container tasks stay registered (the engine
//! API being down does not mean the containers are; health checks and passive ejection
//! cover those that are). The first list after the engine returns replaces the set.
//!
//! With `swarm = true`, [`swarm_source`] runs beside it on its own connection: on a swarm
//! manager, the running tasks of services labelled `routemesh.service` join the set
//! ([`swarm`] has the mapping).
//!
//! Does not own: the etcd writes (the lease keeper), routing, or health checking.

pub mod container;
pub mod swarm;
pub mod swarm_source;
pub mod tracker;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DockerConfig, NodeName, TaskConfig};
use crate::discovery::node::Registration;
use crate::metrics::Metrics;
use crate::util::backoff::Backoff;
use container::{Container, EventEffect, Selection, effect_of};
use tracker::{Notice, Tracker, merged};

/// Longest wait between attempts to reach the engine.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Bound on each engine request that is not the event stream.
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// Why a session with the engine ended (the task then backs off and connects again).
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker engine at {socket}: {source}")]
    Engine {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker engine at {0}: the event stream ended")]
    StreamEnded(String),
}

/// Starts engine discovery and the merge of its tasks into `registration` (the config's
/// registration, as app.rs sends it at start and on reload). Returns the merged
/// registration for the lease keeper and the background tasks, which end at `shutdown`.
/// `listed` fires after the engine's first listing (an upgrade then knows this node's
/// container tasks and may delete the old process's others).
pub fn spawn(
    config: &Config,
    registration: watch::Receiver<Arc<Registration>>,
    metrics: Arc<Metrics>,
    listed: CancellationToken,
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Registration>>, Vec<JoinHandle<()>>) {
    let (tasks_tx, tasks_rx) = watch::channel(Arc::new(Vec::new()));
    let (swarm_tx, swarm_rx) = watch::channel(Arc::new(Vec::new()));
    // The engine's first listing has been sent on `tasks_tx`; `listed` itself fires only once
    // the merge has published a registration with those tasks, so a keeper woken by it never
    // reads a registration without them.
    let engine_listed = CancellationToken::new();
    let mut handles = vec![tokio::spawn(run(
        config.docker.clone(),
        config.node.name.clone(),
        config.node.advertise,
        tasks_tx,
        metrics,
        engine_listed.clone(),
        shutdown.clone(),
    ))];
    if config.docker.swarm {
        handles.push(tokio::spawn(swarm_source::run(
            config.docker.clone(),
            swarm_tx,
            shutdown.clone(),
        )));
    }
    let (merged_rx, merge) = merge(
        registration,
        tasks_rx,
        swarm_rx,
        (engine_listed, listed),
        shutdown,
    );
    handles.push(merge);
    (merged_rx, handles)
}

/// Follows the inputs and publishes `config tasks ∪ container tasks ∪ swarm tasks` until
/// `shutdown` (the output stays open until then even if an input closes, so the lease
/// keeper never sees a closed channel while it runs). `listed.0` fires once the engine's
/// first listing is on `docker`; `listed.1` is fired once a registration holding it is
/// published.
pub fn merge(
    mut config: watch::Receiver<Arc<Registration>>,
    mut docker: watch::Receiver<Arc<Vec<TaskConfig>>>,
    mut swarm: watch::Receiver<Arc<Vec<TaskConfig>>>,
    listed: (CancellationToken, CancellationToken),
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Registration>>, JoinHandle<()>) {
    let (engine_listed, merged_listed) = listed;
    let combine = |config: &Registration, docker: &[TaskConfig], swarm: &[TaskConfig]| {
        let (m, shadowed) = merged(config, &swarm::union(docker, swarm));
        for t in shadowed {
            tracing::warn!(service = %t.service, task = %t.id, "a container has the service and id of a [[task]] in the config file; the file's task is registered");
        }
        Arc::new(m)
    };
    let first = combine(
        &config.borrow_and_update(),
        &docker.borrow_and_update(),
        &swarm.borrow_and_update(),
    );
    let (tx, rx) = watch::channel(first);
    let handle = tokio::spawn(async move {
        let (mut config_open, mut docker_open, mut swarm_open) = (true, true, true);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = config.changed(), if config_open => config_open = r.is_ok(),
                r = docker.changed(), if docker_open => docker_open = r.is_ok(),
                r = swarm.changed(), if swarm_open => swarm_open = r.is_ok(),
                _ = engine_listed.cancelled(), if !merged_listed.is_cancelled() => {}
            }
            let next = combine(
                &config.borrow_and_update(),
                &docker.borrow_and_update(),
                &swarm.borrow_and_update(),
            );
            tx.send_if_modified(|cur| {
                let changed = **cur != *next;
                if changed {
                    *cur = next;
                }
                changed
            });
            // The listing was sent before `engine_listed` fired: once no docker update is
            // left unread, the registration just published holds it.
            if engine_listed.is_cancelled() && !docker.has_changed().unwrap_or(false) {
                merged_listed.cancel();
            }
        }
    });
    (rx, handle)
}

/// Runs engine discovery until `shutdown`, publishing this node's container tasks on `out`.
pub async fn run(
    cfg: DockerConfig,
    node: NodeName,
    advertise: Option<IpAddr>,
    out: watch::Sender<Arc<Vec<TaskConfig>>>,
    metrics: Arc<Metrics>,
    listed: CancellationToken,
    shutdown: CancellationToken,
) {
    let socket = cfg.socket.display().to_string();
    let mut tracker = Tracker::new(Selection {
        network: cfg.network.clone(),
        advertise,
    });
    let mut backoff = Backoff::with_max(MAX_BACKOFF);
    tracing::info!(%node, socket, network = cfg.network.as_deref().unwrap_or(""), "docker engine discovery starting");
    loop {
        let session = session(&cfg, &mut tracker, &out, &metrics, &mut backoff, &listed);
        let err = tokio::select! {
            e = session => e,
            _ = shutdown.cancelled() => break,
        };
        metrics.docker_up.set(0);
        let delay = backoff.next_delay();
        tracing::warn!(error = %err, retry_in = ?delay, tasks_kept = out.borrow().len(), "docker engine unreachable; keeping the last known container tasks");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    metrics.docker_up.set(0);
}

fn engine_err(cfg: &DockerConfig) -> impl Fn(bollard::errors::Error) -> DockerError + '_ {
    move |source| DockerError::Engine {
        socket: cfg.socket.display().to_string(),
        source,
    }
}

/// One connection to the engine: list, then follow events and reconcile. Returns only on
/// error (the caller races it against shutdown).
async fn session(
    cfg: &DockerConfig,
    tracker: &mut Tracker,
    out: &watch::Sender<Arc<Vec<TaskConfig>>>,
    metrics: &Metrics,
    backoff: &mut Backoff,
    listed: &CancellationToken,
) -> DockerError {
    let err = engine_err(cfg);
    let docker = match connect(&cfg.socket).await {
        Ok(d) => d,
        Err(e) => return err(e),
    };
    // Events are requested from just before the list, so nothing between the two is lost;
    // events the list already reflects are applied again, which changes nothing.
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(1));
    if let Err(e) = reconcile(&docker, tracker, out).await {
        return err(e);
    }
    listed.cancel();
    let mut events = docker.events(Some(EventsOptions {
        since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
        until: None,
        filters: Some(HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "label".to_string(),
                vec![container::LABEL_SERVICE.to_string()],
            ),
        ])),
    }));
    metrics.docker_up.set(1);
    backoff.reset();
    tracing::info!(
        tasks = out.borrow().len(),
        "docker engine connected; following its events"
    );
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.reconcile_interval,
        cfg.reconcile_interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        use futures_util::StreamExt;
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(e)) => {
                    if let Err(e) = apply_event(&docker, tracker, &e).await {
                        return err(e);
                    }
                    publish(tracker, out);
                }
                Some(Err(e)) => return err(e),
                None => return DockerError::StreamEnded(cfg.socket.display().to_string()),
            },
            _ = tick.tick() => {
                if let Err(e) = reconcile(&docker, tracker, out).await {
                    return err(e);
                }
            }
        }
    }
}

async fn connect(socket: &Path) -> Result<Docker, bollard::errors::Error> {
    let docker = Docker::connect_with_unix(
        &socket.display().to_string(),
        REQUEST_TIMEOUT_SECS,
        bollard::API_DEFAULT_VERSION,
    )?;
    // Speak the engine's API version when it is older than the client's.
    docker.negotiate_version().await
}

/// Lists the running labelled containers, inspects each, and replaces the set.
async fn reconcile(
    docker: &Docker,
    tracker: &mut Tracker,
    out: &watch::Sender<Arc<Vec<TaskConfig>>>,
) -> Result<(), bollard::errors::Error> {
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![container::LABEL_SERVICE.to_string()],
            )])),
            ..Default::default()
        }))
        .await?;
    let mut containers = Vec::with_capacity(list.len());
    for summary in list {
        let Some(id) = summary.id else { continue };
        match inspect(docker, &id).await? {
            Some(c) => containers.push(c),
            None => continue, // removed since the list
        }
    }
    for n in tracker.reset(&containers) {
        log(&n);
    }
    publish(tracker, out);
    Ok(())
}

/// Inspects one container; None when it no longer exists.
async fn inspect(docker: &Docker, id: &str) -> Result<Option<Container>, bollard::errors::Error> {
    match docker.inspect_container(id, None).await {
        Ok(r) => Ok(Some(Container::from_inspect(&r))),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn apply_event(
    docker: &Docker,
    tracker: &mut Tracker,
    e: &bollard::models::EventMessage,
) -> Result<(), bollard::errors::Error> {
    let action = e.action.as_deref().unwrap_or_default();
    match effect_of(e) {
        EventEffect::Ignore => {}
        EventEffect::Remove { id } => {
            if let Some(n) = tracker.remove(&id, &format!("{action} event")) {
                log(&n);
            }
        }
        EventEffect::Refresh { id } => {
            let notice = match inspect(docker, &id).await? {
                Some(c) => tracker.upsert(&c),
                None => tracker.remove(&id, "container gone"),
            };
            if let Some(n) = notice {
                log(&n);
            }
        }
    }
    Ok(())
}

fn publish(tracker: &Tracker, out: &watch::Sender<Arc<Vec<TaskConfig>>>) {
    publish_tasks(tracker.tasks(), out);
}

/// Sends `tasks` to the routing writer, only when they differ from what it has (both the
/// container and the swarm sources publish this way).
pub(crate) fn publish_tasks(tasks: Vec<TaskConfig>, out: &watch::Sender<Arc<Vec<TaskConfig>>>) {
    out.send_if_modified(|cur| {
        let changed = **cur != tasks;
        if changed {
            *cur = Arc::new(tasks);
        }
        changed
    });
}

fn log(n: &Notice) {
    match n {
        Notice::Registered { container, task } => tracing::info!(
            container,
            service = %task.task.service,
            addr = %task.task.addr,
            weight = task.task.weight,
            health = task.health.map(|h| h.as_str()).unwrap_or("none"),
            "container task registered{}",
            if task.task.weight == 0 && task.label_weight > 0 {
                " (not routable until Docker reports it healthy)"
            } else {
                ""
            }
        ),
        Notice::Removed { container, why } => {
            tracing::info!(container, why, "container task removed")
        }
        Notice::Skipped { container, why } => {
            tracing::warn!(container, "labelled container skipped: {why}")
        }
    }
}
