//! `[[task]]` tables: the tasks this node hosts (etcd backend, written under its lease) or
//! the whole routing table (static backend).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde::Deserialize;

use super::discovery::DiscoveryBackend;
use super::error::Issues;
use super::file::S;
use super::names::{NodeName, ServiceName, TaskId};
use super::values::{int_in, name, socket_addr, span};

#[derive(Debug, Default, Deserialize)]
pub struct RawTask {
    pub service: Option<S<String>>,
    pub addr: Option<S<String>>,
    pub id: Option<S<String>>,
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    pub service: ServiceName,
    pub addr: SocketAddr,
    pub id: TaskId,
    pub weight: u32,
    /// Ports this task asks every node to publish for its service (Docker's
    /// `routemesh.publish` label).
    pub publish: Vec<super::PublishSpec>,
}

/// A task of service `web` for unit tests (weight 1, nothing published).
#[cfg(test)]
impl TaskConfig {
    pub fn web(id: &str, addr: &str) -> TaskConfig {
        TaskConfig {
            service: ServiceName::new("web").unwrap(),
            addr: addr.parse().unwrap(),
            id: TaskId::new(id).unwrap(),
            weight: 1,
            publish: vec![],
        }
    }
}

/// Validates the `[[task]]` tables. A task without `id` gets one derived from its address
/// (and, with the etcd backend, from this node's name, since it is registered under its lease).
pub(super) fn validate(
    issues: &mut Issues,
    raw: &[S<RawTask>],
    backend: DiscoveryBackend,
    node_name: &NodeName,
) -> Vec<TaskConfig> {
    let mut tasks: Vec<TaskConfig> = Vec::new();
    let mut seen_tasks = BTreeSet::new();
    for t in raw {
        let t_span = span(t);
        let t = t.get_ref();
        let service = match &t.service {
            Some(v) => name(issues, v, "task.service", ServiceName::new),
            None => {
                issues.at(
                    t_span.clone(),
                    "[[task]] needs `service`: the service this task serves",
                );
                None
            }
        };
        let addr = match &t.addr {
            Some(v) => socket_addr(issues, v, "task.addr"),
            None => {
                issues.at(
                    t_span.clone(),
                    "[[task]] needs `addr`, the task's IP:PORT, e.g. addr = \"10.0.0.2:1884\"",
                );
                None
            }
        };
        let weight = int_in(issues, &t.weight, 1, 0..=1000, "task.weight") as u32;
        let id =
            t.id.as_ref()
                .and_then(|v| name(issues, v, "task.id", TaskId::new));
        let (Some(service), Some(addr)) = (service, addr) else {
            continue;
        };
        let node_for_id = (backend == DiscoveryBackend::Etcd).then_some(node_name);
        let id = id.unwrap_or_else(|| TaskId::derived(node_for_id, addr));
        if !seen_tasks.insert((service.clone(), id.clone())) {
            issues.at(
                t.id.as_ref().map(span).unwrap_or(t_span),
                format!(
                    "task {id} of service {service} is defined twice: give each a distinct `id`"
                ),
            );
        }
        tasks.push(TaskConfig {
            service,
            addr,
            id,
            weight,
            publish: Vec::new(),
        });
    }
    tasks
}
