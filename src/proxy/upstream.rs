//! Connecting to a task: pick, connect with the service's timeout, and on failure eject that
//! task on this node and try another, up to `retries` more, so the client is served by a live
//! task whenever one exists. Shared by the TCP and HTTP proxies.

use std::io;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;
use crate::snapshot::{InFlight, Service, Task};
use crate::util::clock::now_ms;
use crate::util::net::{dial, is_resource_exhaustion};

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no live task for service {service}")]
    NoLiveTask { service: String },
    #[error("all {attempts} connect attempts to service {service} failed; last: {last}")]
    AllFailed {
        service: String,
        attempts: usize,
        #[source]
        last: io::Error,
    },
}

/// A connected task, counted as in flight until dropped.
pub struct Upstream {
    pub stream: TcpStream,
    pub task: Arc<Task>,
    pub in_flight: InFlight,
    /// Attempts it took (1 = first try).
    pub attempts: usize,
}

static CONNECT_FAILED_LOG: LogLimiter = LogLimiter::new(1000);

/// A connect to `task` of `service` failed: eject the task on this node (passive health),
/// count it, and log it (rate-limited). Shared by the TCP and both HTTP paths.
pub fn connect_failed(metrics: &Metrics, service: &str, task: &Task, e: &io::Error) {
    task.state.eject(now_ms(), format!("connect: {e}"));
    metrics
        .upstream_connect_errors_total
        .with_label_values(&[service, task.id.as_str()])
        .inc();
    if let Some(suppressed) = CONNECT_FAILED_LOG.allow() {
        tracing::warn!(service, task = %task.id, addr = %task.addr, error = %e, suppressed, "upstream connect failed; trying another task");
    }
}

/// Connects to a task of `svc`, failing over to other tasks. `hash` is the key hash for
/// consistent-hashing services (`None` otherwise).
pub async fn connect(
    svc: &Service,
    metrics: &Metrics,
    hash: Option<u64>,
) -> Result<Upstream, ConnectError> {
    let max_attempts = 1 + svc.settings.retries as usize;
    let mut tried: Vec<usize> = Vec::new();
    let mut last: Option<io::Error> = None;
    while tried.len() < max_attempts {
        let Some(i) = svc.pick(&tried, now_ms(), hash) else {
            break;
        };
        if !tried.is_empty() {
            metrics
                .retries_total
                .with_label_values(&[svc.name.as_str()])
                .inc();
        }
        tried.push(i);
        let task = svc.tasks[i].clone();
        let in_flight = task.state.begin();
        match dial(task.addr, svc.settings.connect_timeout).await {
            Ok(stream) => {
                task.state.succeed();
                return Ok(Upstream {
                    stream,
                    task,
                    in_flight,
                    attempts: tried.len(),
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of descriptors here: not the task's fault, so no ejection, no retry.
                drop(in_flight);
                last = Some(e);
                break;
            }
            Err(e) => {
                drop(in_flight);
                connect_failed(metrics, svc.name.as_str(), &task, &e);
                last = Some(e);
            }
        }
    }
    metrics
        .no_live_task_total
        .with_label_values(&[svc.name.as_str()])
        .inc();
    match last {
        None => Err(ConnectError::NoLiveTask {
            service: svc.name.to_string(),
        }),
        Some(last) => Err(ConnectError::AllFailed {
            service: svc.name.to_string(),
            attempts: tried.len(),
            last,
        }),
    }
}
