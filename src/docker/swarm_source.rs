//! Swarm mode source (`[docker] swarm = true`): on a swarm manager, the running tasks of
//! services labelled `routemesh.service` become tasks of this node, registered under its
//! lease beside its `[[task]]`s and container tasks (`mod.rs` merges them).
//!
//! One task owns its own engine connection. Each session asks `GET /info` whether the engine
//! is an active manager; if not, the set is emptied and the question is asked again every
//! `reconcile_interval`. On a manager it lists the labelled services and their tasks
//! (`GET /tasks` read as raw JSON, see [`super::swarm::SwarmTask`]), then follows the event
//! stream: a `service remove` takes that service's tasks out at once; a stop/kill/die of a
//! task container on this node takes that task out at once; any service or node event, or a
//! local task container starting, re-lists every [`HOT_INTERVAL`] for [`HOT_WINDOW`] (swarm
//! has no task events: tasks scheduled, started or failed on other nodes are only seen by
//! listing). A full re-list also runs every `reconcile_interval`.
//!
//! The tasks are lease-bound to this manager: if it dies they vanish with its lease. Every
//! manager running routemesh with `swarm = true` registers the same tasks under the same
//! ids (writes are idempotent), but a key belongs to the lease of its last writer: when
//! that manager dies the others write it again only on their next change (the lease keeper,
//! `discovery::node`, writes on change). Engine unreachable: the last known set stays (as
//! for containers).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::query_parameters::{EventsOptions, ListServicesOptions};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::container::LABEL_SERVICE;
use super::swarm::{
    Role, SwarmEffect, SwarmNotice, SwarmService, SwarmTask, SwarmTracker, effect_of, role_of,
};
use super::{MAX_BACKOFF, REQUEST_TIMEOUT_SECS, connect};
use crate::config::{DockerConfig, TaskConfig};
use crate::util::backoff::Backoff;

/// How often the services and tasks are re-listed after a swarm event...
pub const HOT_INTERVAL: Duration = Duration::from_secs(1);
/// ...and for how long after the last one (image pulls and scheduling on other nodes take
/// a while; the periodic reconcile catches anything slower).
pub const HOT_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("docker engine at {socket}: {source}")]
    Engine {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker engine at {socket}: GET {path}: {message}")]
    Raw {
        socket: String,
        path: String,
        message: String,
    },
    #[error("docker engine at {0}: the event stream ended")]
    StreamEnded(String),
}

/// Why a session ended.
enum Ended {
    /// The engine is not (or no longer) a swarm manager: ask again later, no backoff.
    NotManager,
    Failed(SwarmError),
}

impl From<SwarmError> for Ended {
    fn from(e: SwarmError) -> Ended {
        Ended::Failed(e)
    }
}

/// Runs the swarm source until `shutdown`, publishing its tasks on `out`.
pub async fn run(
    cfg: DockerConfig,
    out: watch::Sender<Arc<Vec<TaskConfig>>>,
    shutdown: CancellationToken,
) {
    let mut tracker = SwarmTracker::new(cfg.network.clone());
    let mut backoff = Backoff::with_max(MAX_BACKOFF);
    let mut role: Option<Role> = None;
    tracing::info!(
        socket = %cfg.socket.display(),
        network = cfg.network.as_deref().unwrap_or(""),
        "docker swarm source starting"
    );
    loop {
        let ended = tokio::select! {
            e = session(&cfg, &mut tracker, &out, &mut backoff, &mut role) => e,
            _ = shutdown.cancelled() => break,
        };
        let delay = match ended {
            Ended::NotManager => cfg.reconcile_interval,
            Ended::Failed(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in = ?delay, tasks_kept = out.borrow().len(), "docker swarm source: engine unreachable; keeping the last known swarm tasks");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}

async fn session(
    cfg: &DockerConfig,
    tracker: &mut SwarmTracker,
    out: &watch::Sender<Arc<Vec<TaskConfig>>>,
    backoff: &mut Backoff,
    role: &mut Option<Role>,
) -> Ended {
    match session_inner(cfg, tracker, out, backoff, role).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

async fn session_inner(
    cfg: &DockerConfig,
    tracker: &mut SwarmTracker,
    out: &watch::Sender<Arc<Vec<TaskConfig>>>,
    backoff: &mut Backoff,
    role: &mut Option<Role>,
) -> Result<Never, Ended> {
    let socket = cfg.socket.display().to_string();
    let err = |source| SwarmError::Engine {
        socket: socket.clone(),
        source,
    };
    let docker = connect(&cfg.socket).await.map_err(err)?;
    check_role(&docker, &socket, tracker, out, role).await?;
    backoff.reset();
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(1));
    relist(&docker, &cfg.socket, tracker, out).await?;
    let mut events = docker.events(Some(EventsOptions {
        since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
        until: None,
        filters: Some(HashMap::from([(
            "type".to_string(),
            vec![
                "service".to_string(),
                "node".to_string(),
                "container".to_string(),
            ],
        )])),
    }));
    tracing::info!(
        tasks = out.borrow().len(),
        "docker swarm manager: following labelled services"
    );
    let mut tick = tokio::time::interval_at(
        Instant::now() + cfg.reconcile_interval,
        cfg.reconcile_interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While Some: re-list at `.0`, until `.1`.
    let mut hot: Option<(Instant, Instant)> = None;
    loop {
        use futures_util::StreamExt;
        let next_poll = hot.map(|(at, _)| at).unwrap_or_else(Instant::now);
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(e)) => {
                    let effect = effect_of(&e);
                    match &effect {
                        SwarmEffect::Ignore => continue,
                        SwarmEffect::Relist => {}
                        SwarmEffect::RemoveService { id } => {
                            tracker.remove_service(id).iter().for_each(log);
                        }
                        SwarmEffect::RemoveTask { id } => {
                            let action = e.action.as_deref().unwrap_or_default();
                            if let Some(n) = tracker.remove_task(id, &format!("container {action} event")) {
                                log(&n);
                            }
                        }
                    }
                    publish(tracker, out);
                    let now = Instant::now();
                    let at = hot.map(|(at, _)| at).unwrap_or(now + HOT_INTERVAL / 2);
                    hot = Some((at, now + HOT_WINDOW));
                }
                Some(Err(e)) => return Err(err(e).into()),
                None => return Err(SwarmError::StreamEnded(socket.clone()).into()),
            },
            _ = tokio::time::sleep_until(next_poll), if hot.is_some() => {
                relist(&docker, &cfg.socket, tracker, out).await?;
                let now = Instant::now();
                hot = hot
                    .filter(|(_, until)| now < *until)
                    .map(|(_, until)| (now + HOT_INTERVAL, until));
            }
            _ = tick.tick() => {
                check_role(&docker, &socket, tracker, out, role).await?;
                relist(&docker, &cfg.socket, tracker, out).await?;
            }
        }
    }
}

/// Asks the engine what it is in the swarm; logs a change; empties the set and ends the
/// session when it is not an active manager.
async fn check_role(
    docker: &Docker,
    socket: &str,
    tracker: &mut SwarmTracker,
    out: &watch::Sender<Arc<Vec<TaskConfig>>>,
    last: &mut Option<Role>,
) -> Result<(), Ended> {
    let info = docker.info().await.map_err(|source| SwarmError::Engine {
        socket: socket.to_string(),
        source,
    })?;
    let now = role_of(&info);
    if last.as_ref() != Some(&now) {
        match &now {
            Role::Manager => tracing::info!(
                "docker engine is a swarm manager: registering the tasks of services labelled {LABEL_SERVICE}"
            ),
            Role::Worker => tracing::info!(
                "docker engine is a swarm worker: swarm services are registered by the managers' routemesh (swarm = true there); checking again every reconcile_interval"
            ),
            Role::Outside(state) => tracing::warn!(
                state,
                "[docker] swarm = true but the docker engine is not in an active swarm; checking again every reconcile_interval"
            ),
        }
        *last = Some(now.clone());
    }
    if now == Role::Manager {
        return Ok(());
    }
    tracker
        .clear("this engine is no longer a swarm manager")
        .iter()
        .for_each(log);
    publish(tracker, out);
    Err(Ended::NotManager)
}

/// Lists the labelled services and their running tasks, and replaces the set.
async fn relist(
    docker: &Docker,
    socket: &Path,
    tracker: &mut SwarmTracker,
    out: &watch::Sender<Arc<Vec<TaskConfig>>>,
) -> Result<(), SwarmError> {
    let services = docker
        .list_services(Some(ListServicesOptions {
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![LABEL_SERVICE.to_string()],
            )])),
            ..Default::default()
        }))
        .await
        .map_err(|source| SwarmError::Engine {
            socket: socket.display().to_string(),
            source,
        })?;
    let services: Vec<SwarmService> = services.iter().filter_map(SwarmService::from_api).collect();
    let tasks = if services.is_empty() {
        Vec::new()
    } else {
        let filters = serde_json::json!({
            "service": services.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            "desired-state": ["running"],
        });
        let path = format!("/tasks?filters={}", percent_encode(&filters.to_string()));
        let body = get(socket, &path).await?;
        serde_json::from_slice::<Vec<SwarmTask>>(&body).map_err(|e| SwarmError::Raw {
            socket: socket.display().to_string(),
            path: "/tasks".into(),
            message: format!("unreadable answer: {e}"),
        })?
    };
    tracker.reset(&services, &tasks).iter().for_each(log);
    publish(tracker, out);
    Ok(())
}

/// `GET path` on the engine's unix socket; the body of a 2xx answer. (bollard's `Task`
/// model drops the field we need, so this one request is made by hand.)
async fn get(socket: &Path, path: &str) -> Result<Bytes, SwarmError> {
    let fail = |message: String| SwarmError::Raw {
        socket: socket.display().to_string(),
        path: path.split('?').next().unwrap_or(path).to_string(),
        message,
    };
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let answer = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(fail(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            Ok(body)
        }
        .await;
        conn.abort();
        answer
    };
    tokio::time::timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS), exchange)
        .await
        .unwrap_or_else(|_| Err(fail(format!("no answer within {REQUEST_TIMEOUT_SECS}s"))))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn publish(tracker: &SwarmTracker, out: &watch::Sender<Arc<Vec<TaskConfig>>>) {
    super::publish_tasks(tracker.tasks(), out);
}

fn log(n: &SwarmNotice) {
    match n {
        SwarmNotice::Registered { task, config } => tracing::info!(
            task,
            service = %config.service,
            addr = %config.addr,
            weight = config.weight,
            "swarm task registered"
        ),
        SwarmNotice::Removed { task, why } => tracing::info!(task, why, "swarm task removed"),
        SwarmNotice::Skipped { what, why } => {
            tracing::warn!("labelled swarm {what} skipped: {why}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_encoded() {
        assert_eq!(
            percent_encode(r#"{"service":["a b"],"desired-state":["running"]}"#),
            "%7B%22service%22%3A%5B%22a%20b%22%5D%2C%22desired-state%22%3A%5B%22running%22%5D%7D"
        );
    }
}
