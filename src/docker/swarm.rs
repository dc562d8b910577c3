//! Pure mapping for swarm mode (`[docker] swarm = true`): from what a manager's engine says
//! about services and their tasks to tasks of this node, or the reason each is not one. No
//! IO, no clock: `swarm_source.rs` feeds it `GET /services` and `GET /tasks` answers and
//! engine events.
//!
//! Rules (also in the README, "Swarm mode"):
//! - a service is considered only when its **service** labels (`docker service create
//!   --label`, not `--container-label`) carry `routemesh.service`; it must also carry
//!   `routemesh.port` (1-65535); `routemesh.weight` (0-1000) is optional, default 1 — the
//!   same label rules as for containers ([`super::container::labels_of`]);
//! - a task counts while both its desired state and its state are `running` (swarm reports
//!   a task with a HEALTHCHECK as running only once it is healthy);
//! - task id = the task's container name, `SERVICE.SLOT.TASKID` (global services:
//!   `SERVICE.NODEID.TASKID`), unique across the cluster and the same on every manager;
//!   `node` = this node (the manager whose lease carries it);
//! - its address: its IP on the overlay network named by `[docker] network`, else on its
//!   only network other than `ingress` (the `/24` of `NetworksAttachments[].Addresses` is
//!   dropped).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use bollard::models::{EventMessage, EventMessageTypeEnum, LocalNodeState, Service, SystemInfo};
use serde::{Deserialize, Deserializer};

use super::container::{
    EventEffect, LABEL_SERVICE, Skip, effect_of as container_effect, labels_of,
};

use crate::config::{PublishSpec, ServiceName, TaskConfig, TaskId};

/// The container label the engine puts on a swarm task's container.
pub const LABEL_TASK_ID: &str = "com.docker.swarm.task.id";

/// The parts of a swarm service discovery looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwarmService {
    pub id: String,
    pub name: String,
    /// The service spec's labels (not the container labels of its tasks).
    pub labels: BTreeMap<String, String>,
}

impl SwarmService {
    /// Reads a `GET /services` entry; None without an id.
    pub fn from_api(s: &Service) -> Option<SwarmService> {
        let id = s.id.clone().filter(|i| !i.is_empty())?;
        let spec = s.spec.as_ref();
        Some(SwarmService {
            name: spec
                .and_then(|s| s.name.clone())
                .unwrap_or_else(|| id.clone()),
            labels: spec
                .and_then(|s| s.labels.as_ref())
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            id,
        })
    }
}

/// What a labelled service maps to: the routemesh service its tasks join, their port and
/// weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    pub service: ServiceName,
    pub port: u16,
    pub weight: u32,
    pub publish: Vec<PublishSpec>,
}

/// The labels of a swarm service, or why it is not one of ours.
pub fn service_of(s: &SwarmService) -> Result<ServiceLabels, Skip> {
    if !s.labels.contains_key(LABEL_SERVICE) {
        return Err(Skip::NotLabelled);
    }
    let l = labels_of(&s.labels)?;
    Ok(ServiceLabels {
        service: l.service,
        port: l.port,
        weight: l.weight,
        publish: l.publish,
    })
}

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A `GET /tasks` entry, read directly from the engine's JSON: bollard's `Task` model has
/// no `NetworksAttachments` (the engine's swagger omits it), and that is where the overlay
/// IPs are. Absent or null fields read as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SwarmTask {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(rename = "ServiceID", default, deserialize_with = "nullable")]
    pub service_id: String,
    /// 0 for global services (no slot).
    #[serde(rename = "Slot", default, deserialize_with = "nullable")]
    pub slot: u64,
    #[serde(rename = "NodeID", default, deserialize_with = "nullable")]
    pub node_id: String,
    #[serde(rename = "Status", default, deserialize_with = "nullable")]
    pub status: TaskStatus,
    #[serde(rename = "DesiredState", default, deserialize_with = "nullable")]
    pub desired_state: String,
    #[serde(rename = "NetworksAttachments", default, deserialize_with = "nullable")]
    pub networks: Vec<Attachment>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TaskStatus {
    #[serde(rename = "State", default, deserialize_with = "nullable")]
    pub state: String,
}

/// One network a task is attached to, and its addresses there (CIDR strings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "Network", default, deserialize_with = "nullable")]
    pub network: AttachedNetwork,
    #[serde(rename = "Addresses", default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AttachedNetwork {
    #[serde(rename = "Spec", default, deserialize_with = "nullable")]
    pub spec: NetworkSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NetworkSpec {
    #[serde(rename = "Name", default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(rename = "Ingress", default, deserialize_with = "nullable")]
    pub ingress: bool,
}

impl Attachment {
    fn is_ingress(&self) -> bool {
        self.network.spec.ingress || self.network.spec.name == "ingress"
    }

    /// The first address, without its prefix length.
    fn ip(&self) -> Option<IpAddr> {
        self.addresses.iter().find_map(|a| {
            let ip = a.split('/').next()?.trim().parse::<IpAddr>().ok()?;
            (!ip.is_unspecified()).then_some(ip)
        })
    }
}

/// The task's name as `docker service ps` shows it with its id: its container's name.
pub fn task_name(svc: &SwarmService, t: &SwarmTask) -> String {
    if t.slot > 0 {
        format!("{}.{}.{}", svc.name, t.slot, t.id)
    } else {
        format!("{}.{}.{}", svc.name, t.node_id, t.id)
    }
}

/// Maps one task of a labelled service to a task of this node, or the reason it is none.
/// `network` is `[docker] network`.
pub fn task_of(
    svc: &SwarmService,
    labels: &ServiceLabels,
    t: &SwarmTask,
    network: Option<&str>,
) -> Result<TaskConfig, Skip> {
    if t.desired_state != "running" || t.status.state != "running" {
        return Err(Skip::NotRunning);
    }
    let id = TaskId::new(&task_name(svc, t))
        .or_else(|_| TaskId::new(&t.id))
        .map_err(|e| Skip::BadLabel(format!("the task id {:?} is not usable ({e})", t.id)))?;
    let ip = address(t, network)?;
    Ok(TaskConfig {
        service: labels.service.clone(),
        addr: SocketAddr::new(ip, labels.port),
        id,
        weight: labels.weight,
        publish: labels.publish.clone(),
    })
}

fn address(t: &SwarmTask, network: Option<&str>) -> Result<IpAddr, Skip> {
    let names = || {
        let n: Vec<&str> = t
            .networks
            .iter()
            .map(|a| a.network.spec.name.as_str())
            .collect();
        if n.is_empty() {
            "none".to_string()
        } else {
            n.join(", ")
        }
    };
    let pick = |a: &Attachment| {
        a.ip().ok_or_else(|| {
            Skip::NoAddress(format!(
                "it has no address on network {:?}",
                a.network.spec.name
            ))
        })
    };
    if let Some(net) = network {
        return match t.networks.iter().find(|a| a.network.spec.name == net) {
            Some(a) => pick(a),
            None => Err(Skip::NoAddress(format!(
                "it is not attached to network {net:?} ([docker] network); attached: {}",
                names()
            ))),
        };
    }
    let overlays: Vec<&Attachment> = t.networks.iter().filter(|a| !a.is_ingress()).collect();
    match overlays.as_slice() {
        [a] => pick(a),
        [] => Err(Skip::NoAddress(format!(
            "it is attached to no network besides ingress (attached: {}): attach the service to an overlay network (--network NAME)",
            names()
        ))),
        _ => Err(Skip::NoAddress(format!(
            "it is attached to several networks ({}): name one in [docker] network",
            names()
        ))),
    }
}

/// What the local engine is in the swarm, from `GET /info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An active manager: its API answers for the whole swarm.
    Manager,
    /// An active worker: only managers list services and tasks.
    Worker,
    /// Not in an active swarm; the engine's `LocalNodeState` (`inactive`, `pending`,
    /// `locked`, `error`...).
    Outside(String),
}

pub fn role_of(info: &SystemInfo) -> Role {
    let Some(sw) = info.swarm.as_ref() else {
        return Role::Outside("inactive".into());
    };
    match sw.local_node_state {
        Some(LocalNodeState::ACTIVE) if sw.control_available == Some(true) => Role::Manager,
        Some(LocalNodeState::ACTIVE) => Role::Worker,
        Some(s) if s != LocalNodeState::EMPTY => Role::Outside(s.to_string()),
        _ => Role::Outside("inactive".into()),
    }
}

/// What an engine event means for the swarm task set. Every effect but `Ignore` also asks
/// for prompt re-lists: swarm reports no task events, so the state that follows a service
/// change (tasks scheduled, started, stopped on any node) is polled for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmEffect {
    /// A service changed, a node changed, or a local task container started: re-list.
    Relist,
    /// A service was removed: its tasks leave at once.
    RemoveService {
        id: String,
    },
    /// A task's container on this node is stopping or gone: the task leaves at once.
    RemoveTask {
        id: String,
    },
    Ignore,
}

/// Classifies one engine event (types `service`, `node`, and `container` for containers of
/// swarm tasks; a local container's stop/kill is classified as for plain containers).
pub fn effect_of(e: &EventMessage) -> SwarmEffect {
    let action = e.action.as_deref().unwrap_or_default();
    let actor_id = e
        .actor
        .as_ref()
        .and_then(|a| a.id.clone())
        .filter(|i| !i.is_empty());
    match e.typ {
        Some(EventMessageTypeEnum::SERVICE) => match (action, actor_id) {
            ("remove", Some(id)) => SwarmEffect::RemoveService { id },
            _ => SwarmEffect::Relist,
        },
        Some(EventMessageTypeEnum::NODE) => SwarmEffect::Relist,
        Some(EventMessageTypeEnum::CONTAINER) => {
            let Some(task) = e
                .actor
                .as_ref()
                .and_then(|a| a.attributes.as_ref())
                .and_then(|a| a.get(LABEL_TASK_ID))
                .filter(|t| !t.is_empty())
                .cloned()
            else {
                return SwarmEffect::Ignore;
            };
            match container_effect(e) {
                EventEffect::Remove { .. } => SwarmEffect::RemoveTask { id: task },
                EventEffect::Refresh { .. } => SwarmEffect::Relist,
                EventEffect::Ignore => SwarmEffect::Ignore,
            }
        }
        _ => SwarmEffect::Ignore,
    }
}

/// Something worth a log line, each once per task (or service) and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmNotice {
    Registered {
        task: String,
        config: TaskConfig,
    },
    Removed {
        task: String,
        why: String,
    },
    /// A labelled service or one of its running tasks that cannot be registered.
    Skipped {
        what: String,
        why: String,
    },
}

#[derive(Debug, Clone)]
struct Tracked {
    service_id: String,
    name: String,
    mapped: Result<TaskConfig, Skip>,
}

/// The swarm task set this manager registers. Pure: fed listings and removals, says what
/// the user should be told.
#[derive(Debug, Default)]
pub struct SwarmTracker {
    network: Option<String>,
    /// Service id → its name and labels (or why it is skipped), as last listed.
    services: BTreeMap<String, (String, Result<ServiceLabels, Skip>)>,
    /// Swarm task id → what it maps to.
    tasks: BTreeMap<String, Tracked>,
    /// Tasks taken out by an event that a listing may still show as running for a moment
    /// (swarm learns of a stopped container after the engine reports it): kept out until a
    /// listing no longer has them.
    gone: BTreeSet<String>,
}

impl SwarmTracker {
    pub fn new(network: Option<String>) -> SwarmTracker {
        SwarmTracker {
            network,
            ..Default::default()
        }
    }

    /// Replaces everything with a fresh listing: the labelled services and the tasks listed
    /// for them.
    pub fn reset(&mut self, services: &[SwarmService], tasks: &[SwarmTask]) -> Vec<SwarmNotice> {
        let mut notices = Vec::new();
        let mut svc_now = BTreeMap::new();
        for s in services {
            let mapped = service_of(s);
            let old = self.services.get(&s.id).map(|(_, m)| m);
            if let Err(skip) = &mapped
                && skip.is_warning()
                && old != Some(&mapped)
            {
                notices.push(SwarmNotice::Skipped {
                    what: format!("service {}", s.name),
                    why: skip.to_string(),
                });
            }
            svc_now.insert(s.id.clone(), (s, mapped));
        }
        let listed: BTreeSet<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
        self.gone.retain(|id| listed.contains(id.as_str()));
        let mut next = BTreeMap::new();
        for t in tasks {
            let Some((svc, Ok(labels))) = svc_now.get(&t.service_id) else {
                continue;
            };
            if self.gone.contains(&t.id) {
                continue;
            }
            let mapped = task_of(svc, labels, t, self.network.as_deref());
            if matches!(mapped, Err(Skip::NotRunning)) {
                continue;
            }
            next.insert(
                t.id.clone(),
                Tracked {
                    service_id: t.service_id.clone(),
                    name: task_name(svc, t),
                    mapped,
                },
            );
        }
        for (id, old) in &self.tasks {
            if old.mapped.is_ok() && next.get(id).is_none_or(|n| n.mapped.is_err()) {
                notices.push(SwarmNotice::Removed {
                    task: old.name.clone(),
                    why: "no longer running".into(),
                });
            }
        }
        for (id, new) in &next {
            let old = self.tasks.get(id).map(|o| &o.mapped);
            if old == Some(&new.mapped) {
                continue;
            }
            match &new.mapped {
                Ok(c) => notices.push(SwarmNotice::Registered {
                    task: new.name.clone(),
                    config: c.clone(),
                }),
                Err(skip) if skip.is_warning() => notices.push(SwarmNotice::Skipped {
                    what: format!("task {}", new.name),
                    why: skip.to_string(),
                }),
                Err(_) => {}
            }
        }
        self.services = svc_now
            .into_iter()
            .map(|(id, (s, m))| (id, (s.name.clone(), m)))
            .collect();
        self.tasks = next;
        notices
    }

    /// A removed service: all its tasks leave.
    pub fn remove_service(&mut self, service_id: &str) -> Vec<SwarmNotice> {
        let name = self.services.remove(service_id).map(|(n, _)| n);
        let ids: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.service_id == service_id)
            .map(|(id, _)| id.clone())
            .collect();
        let why = format!("service {} removed", name.as_deref().unwrap_or(service_id));
        ids.iter().filter_map(|id| self.take(id, &why)).collect()
    }

    /// A task whose container stopped here: it leaves, and stays out while listings still
    /// show it.
    pub fn remove_task(&mut self, task_id: &str, why: &str) -> Option<SwarmNotice> {
        self.gone.insert(task_id.to_string());
        self.take(task_id, why)
    }

    /// Everything leaves (the engine is no longer a manager).
    pub fn clear(&mut self, why: &str) -> Vec<SwarmNotice> {
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        let out = ids.iter().filter_map(|id| self.take(id, why)).collect();
        self.services.clear();
        self.gone.clear();
        out
    }

    fn take(&mut self, id: &str, why: &str) -> Option<SwarmNotice> {
        let t = self.tasks.remove(id)?;
        t.mapped.ok().map(|_| SwarmNotice::Removed {
            task: t.name,
            why: why.to_string(),
        })
    }

    /// The ids of the labelled services last listed (for the task listing's filter).
    pub fn service_ids(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// The tasks to register, ordered by service and id.
    pub fn tasks(&self) -> Vec<TaskConfig> {
        let mut out: Vec<TaskConfig> = self
            .tasks
            .values()
            .filter_map(|t| t.mapped.as_ref().ok().cloned())
            .collect();
        out.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        out
    }
}

/// Container tasks ∪ swarm tasks. A swarm task with the service and id of a container task
/// is left out (the same task reached both ways, e.g. through `--container-label`).
pub fn union(containers: &[TaskConfig], swarm: &[TaskConfig]) -> Vec<TaskConfig> {
    let mut out = containers.to_vec();
    for t in swarm {
        if !containers
            .iter()
            .any(|c| c.service == t.service && c.id == t.id)
        {
            out.push(t.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::container::{LABEL_PORT, LABEL_PUBLISH, LABEL_WEIGHT};

    /// Trimmed from a real `GET /tasks` of Docker 20.10 (a service on an attachable overlay
    /// that also publishes a port through the ingress network).
    const TASKS: &str = r#"[
      {"ID": "rrs2t42fbrt8iqj3t67u3o5ge", "Version": {"Index": 40}, "Labels": {},
       "ServiceID": "oe5v9266up8tf9djwjyc0r1hs", "Slot": 3, "NodeID": "w03adnq89fyegf6gbmmu2th3i",
       "Status": {"Timestamp": "2026-11-27T21:52:41.626520965Z", "State": "running", "Message": "started",
                  "ContainerStatus": {"ContainerID": "599e77", "PID": 21497, "ExitCode": 0}, "PortStatus": {}},
       "DesiredState": "running",
       "NetworksAttachments": [
         {"Network": {"ID": "np89qllqs4o1ff2wm8l6vw0hm",
                      "Spec": {"Name": "ingress", "Labels": {}, "DriverConfiguration": {}, "Ingress": true, "Scope": "swarm"}},
          "Addresses": ["10.0.0.4/24"]},
         {"Network": {"ID": "9wy7yzdaj74unbfoktgb2clzf",
                      "Spec": {"Name": "rmcap-net", "Labels": {}, "DriverConfiguration": {"Name": "overlay"}, "Attachable": true, "Scope": "swarm"},
                      "IPAMOptions": {"Configs": [{"Subnet": "10.0.1.0/24", "Gateway": "10.0.1.1"}]}},
          "Addresses": ["10.0.1.7/24"]}
       ]},
      {"ID": "t4obxgd13qy66qnvxos0vvrpy", "ServiceID": "oe5v9266up8tf9djwjyc0r1hs", "Slot": 1,
       "NodeID": "w03adnq89fyegf6gbmmu2th3i", "Status": {"State": "preparing"}, "DesiredState": "running",
       "NetworksAttachments": null}
    ]"#;

    fn svc() -> SwarmService {
        SwarmService {
            id: "oe5v9266up8tf9djwjyc0r1hs".into(),
            name: "rmcap".into(),
            labels: [
                (LABEL_SERVICE.to_string(), "web".to_string()),
                (LABEL_PORT.to_string(), "8080".to_string()),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn tasks() -> Vec<SwarmTask> {
        serde_json::from_str(TASKS).unwrap()
    }

    fn running(id: &str, slot: u64, nets: &[(&str, &str)]) -> SwarmTask {
        SwarmTask {
            id: id.into(),
            service_id: svc().id,
            slot,
            node_id: "n1".into(),
            status: TaskStatus {
                state: "running".into(),
            },
            desired_state: "running".into(),
            networks: nets
                .iter()
                .map(|(name, addr)| Attachment {
                    network: AttachedNetwork {
                        spec: NetworkSpec {
                            name: name.to_string(),
                            ingress: *name == "ingress",
                        },
                    },
                    addresses: vec![addr.to_string()],
                })
                .collect(),
        }
    }

    #[test]
    fn reads_the_engine_task_json() {
        let t = tasks();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].id, "rrs2t42fbrt8iqj3t67u3o5ge");
        assert_eq!(t[0].slot, 3);
        assert_eq!(t[0].status.state, "running");
        assert_eq!(t[0].networks.len(), 2);
        assert!(t[0].networks[0].is_ingress());
        assert_eq!(t[0].networks[1].network.spec.name, "rmcap-net");
        assert_eq!(t[0].networks[1].addresses, ["10.0.1.7/24"]);
        assert!(t[1].networks.is_empty());
    }

    #[test]
    fn reads_a_service() {
        let json = r#"{"ID": "oe5v", "Spec": {"Name": "rmcap",
            "Labels": {"routemesh.port": "8080", "routemesh.service": "web"},
            "Mode": {"Replicated": {"Replicas": 2}}, "EndpointSpec": {"Mode": "vip"}}}"#;
        let s: Service = serde_json::from_str(json).unwrap();
        let s = SwarmService::from_api(&s).unwrap();
        assert_eq!(s.name, "rmcap");
        assert_eq!(s.labels.get(LABEL_PORT).map(String::as_str), Some("8080"));
        assert!(SwarmService::from_api(&Service::default()).is_none());
    }

    #[test]
    fn a_running_task_on_the_only_overlay_is_a_task() {
        let s = svc();
        let l = service_of(&s).unwrap();
        let t = task_of(&s, &l, &tasks()[0], None).unwrap();
        assert_eq!(t.service.as_str(), "web");
        assert_eq!(t.addr, "10.0.1.7:8080".parse().unwrap());
        assert_eq!(t.id.as_str(), "rmcap.3.rrs2t42fbrt8iqj3t67u3o5ge");
        assert_eq!(t.weight, 1);
        // Named network: the same; ingress when asked for (odd, but what was asked).
        let t = task_of(&s, &l, &tasks()[0], Some("rmcap-net")).unwrap();
        assert_eq!(t.addr, "10.0.1.7:8080".parse().unwrap());
        let t = task_of(&s, &l, &tasks()[0], Some("ingress")).unwrap();
        assert_eq!(t.addr, "10.0.0.4:8080".parse().unwrap());
        let err = task_of(&s, &l, &tasks()[0], Some("other")).unwrap_err();
        assert!(
            matches!(&err, Skip::NoAddress(m) if m.contains("ingress, rmcap-net")),
            "{err}"
        );
    }

    #[test]
    fn only_running_tasks_count() {
        let s = svc();
        let l = service_of(&s).unwrap();
        assert_eq!(task_of(&s, &l, &tasks()[1], None), Err(Skip::NotRunning));
        let mut t = running("a", 1, &[("net", "10.0.1.2/24")]);
        t.desired_state = "shutdown".into();
        assert_eq!(task_of(&s, &l, &t, None), Err(Skip::NotRunning));
        assert!(!Skip::NotRunning.is_warning());
    }

    #[test]
    fn address_choice() {
        let s = svc();
        let l = service_of(&s).unwrap();
        let only_ingress = running("a", 1, &[("ingress", "10.0.0.9/24")]);
        let err = task_of(&s, &l, &only_ingress, None).unwrap_err();
        assert!(
            matches!(&err, Skip::NoAddress(m) if m.contains("--network")),
            "{err}"
        );
        let two = running("a", 1, &[("n1", "10.0.1.2/24"), ("n2", "10.0.2.2/24")]);
        let err = task_of(&s, &l, &two, None).unwrap_err();
        assert!(
            matches!(&err, Skip::NoAddress(m) if m.contains("[docker] network")),
            "{err}"
        );
        assert_eq!(
            task_of(&s, &l, &two, Some("n2")).unwrap().addr,
            "10.0.2.2:8080".parse().unwrap()
        );
        let none = running("a", 1, &[("n1", "")]);
        assert!(matches!(
            task_of(&s, &l, &none, None),
            Err(Skip::NoAddress(_))
        ));
        let v6 = running("a", 1, &[("n1", "fd00::5/64")]);
        assert_eq!(
            task_of(&s, &l, &v6, None).unwrap().addr,
            "[fd00::5]:8080".parse().unwrap()
        );
    }

    #[test]
    fn global_tasks_are_named_by_node() {
        let s = svc();
        let l = service_of(&s).unwrap();
        let t = running("tid", 0, &[("n1", "10.0.1.2/24")]);
        assert_eq!(
            task_of(&s, &l, &t, None).unwrap().id.as_str(),
            "rmcap.n1.tid"
        );
    }

    #[test]
    fn service_labels() {
        let mut s = svc();
        s.labels.insert(LABEL_WEIGHT.into(), "4".into());
        assert_eq!(service_of(&s).unwrap().weight, 4);
        // routemesh.publish on a swarm service: its tasks ask every node to publish the ports.
        s.labels
            .insert(LABEL_PUBLISH.into(), "1883, 80/http".into());
        let l = service_of(&s).unwrap();
        let specs: Vec<String> = l.publish.iter().map(|p| p.to_string()).collect();
        assert_eq!(specs, ["80/http", "1883/tcp"]);
        let t = task_of(&s, &l, &tasks()[0], None).unwrap();
        assert_eq!(t.publish, l.publish);
        for (k, v) in [
            (LABEL_PORT, "x"),
            (LABEL_WEIGHT, "2000"),
            (LABEL_SERVICE, "a/b"),
            (LABEL_PUBLISH, "80/sctp"),
        ] {
            let mut s = svc();
            s.labels.insert(k.into(), v.into());
            assert!(matches!(service_of(&s), Err(Skip::BadLabel(_))), "{k}={v}");
        }
        let mut s = svc();
        s.labels.remove(LABEL_PORT);
        assert!(matches!(service_of(&s), Err(Skip::BadLabel(m)) if m.contains("missing")));
        s.labels.clear();
        assert_eq!(service_of(&s), Err(Skip::NotLabelled));
    }

    fn event(typ: EventMessageTypeEnum, action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        crate::docker::container::tests::event_message(typ, "obj", action, attrs)
    }

    #[test]
    fn events_map_to_effects() {
        use EventMessageTypeEnum as T;
        assert_eq!(
            effect_of(&event(T::SERVICE, "remove", &[("name", "web")])),
            SwarmEffect::RemoveService { id: "obj".into() }
        );
        for a in ["create", "update"] {
            assert_eq!(effect_of(&event(T::SERVICE, a, &[])), SwarmEffect::Relist);
        }
        assert_eq!(
            effect_of(&event(T::NODE, "update", &[])),
            SwarmEffect::Relist
        );
        let task = [(LABEL_TASK_ID, "tid"), ("signal", "15")];
        for a in ["kill", "die", "stop", "destroy", "oom"] {
            assert_eq!(
                effect_of(&event(T::CONTAINER, a, &task)),
                SwarmEffect::RemoveTask { id: "tid".into() },
                "{a}"
            );
        }
        assert_eq!(
            effect_of(&event(
                T::CONTAINER,
                "kill",
                &[(LABEL_TASK_ID, "tid"), ("signal", "1")]
            )),
            SwarmEffect::Ignore
        );
        assert_eq!(
            effect_of(&event(T::CONTAINER, "start", &task)),
            SwarmEffect::Relist
        );
        assert_eq!(
            effect_of(&event(T::CONTAINER, "exec_start: sh", &task)),
            SwarmEffect::Ignore
        );
        // A plain container (no task label) is the container source's business.
        assert_eq!(
            effect_of(&event(T::CONTAINER, "die", &[])),
            SwarmEffect::Ignore
        );
        assert_eq!(
            effect_of(&event(T::NETWORK, "connect", &[])),
            SwarmEffect::Ignore
        );
    }

    #[test]
    fn roles() {
        let info = |json: &str| -> SystemInfo { serde_json::from_str(json).unwrap() };
        assert_eq!(
            role_of(&info(
                r#"{"Swarm": {"LocalNodeState": "active", "ControlAvailable": true}}"#
            )),
            Role::Manager
        );
        assert_eq!(
            role_of(&info(
                r#"{"Swarm": {"LocalNodeState": "active", "ControlAvailable": false}}"#
            )),
            Role::Worker
        );
        assert_eq!(
            role_of(&info(
                r#"{"Swarm": {"LocalNodeState": "inactive", "ControlAvailable": false}}"#
            )),
            Role::Outside("inactive".into())
        );
        assert_eq!(
            role_of(&info(r#"{"Swarm": {"LocalNodeState": "locked"}}"#)),
            Role::Outside("locked".into())
        );
        assert_eq!(role_of(&info("{}")), Role::Outside("inactive".into()));
    }

    fn ids(t: &SwarmTracker) -> Vec<String> {
        t.tasks().iter().map(|t| t.id.to_string()).collect()
    }

    #[test]
    fn tracker_follows_listings_and_events() {
        let s = svc();
        let ss = std::slice::from_ref(&s);
        let mut tr = SwarmTracker::new(None);
        let a = running("a", 1, &[("net", "10.0.1.2/24")]);
        let b = running("b", 2, &[("net", "10.0.1.3/24")]);
        let n = tr.reset(ss, &[a.clone(), b.clone()]);
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!(ids(&tr), ["rmcap.1.a", "rmcap.2.b"]);
        assert_eq!(tr.service_ids(), std::slice::from_ref(&s.id));
        // The same listing again says nothing.
        assert!(tr.reset(ss, &[a.clone(), b.clone()]).is_empty());
        // Scale up.
        let c = running("c", 3, &[("net", "10.0.1.4/24")]);
        let n = tr.reset(ss, &[a.clone(), b.clone(), c.clone()]);
        assert!(matches!(&n[..], [SwarmNotice::Registered { task, .. }] if task == "rmcap.3.c"));
        // A local container stops: out at once, and out while swarm still lists it.
        assert!(tr.remove_task("c", "kill event").is_some());
        assert!(tr.reset(ss, &[a.clone(), b.clone(), c.clone()]).is_empty());
        assert_eq!(ids(&tr), ["rmcap.1.a", "rmcap.2.b"]);
        // Gone from the listing: forgotten.
        tr.reset(ss, &[a.clone(), b.clone()]);
        assert!(tr.gone.is_empty());
        // A task that is no longer listed leaves.
        let n = tr.reset(ss, std::slice::from_ref(&a));
        assert!(matches!(&n[..], [SwarmNotice::Removed { task, .. }] if task == "rmcap.2.b"));
        // The service is removed.
        let n = tr.remove_service(&s.id);
        assert_eq!(n.len(), 1);
        assert!(tr.tasks().is_empty());
    }

    #[test]
    fn tracker_warns_once() {
        let mut bad = svc();
        bad.labels.insert(LABEL_PORT.into(), "http".into());
        let a = running("a", 1, &[("ingress", "10.0.0.2/24")]);
        let mut tr = SwarmTracker::new(None);
        let n = tr.reset(std::slice::from_ref(&bad), std::slice::from_ref(&a));
        assert!(matches!(&n[..], [SwarmNotice::Skipped { what, .. }] if what == "service rmcap"));
        assert!(tr.reset(&[bad], std::slice::from_ref(&a)).is_empty());
        // A good service whose task has no usable network: one warning for the task.
        let n = tr.reset(&[svc()], std::slice::from_ref(&a));
        assert!(matches!(&n[..], [SwarmNotice::Skipped { what, .. }] if what == "task rmcap.1.a"));
        assert!(tr.reset(&[svc()], &[a]).is_empty());
        assert!(tr.tasks().is_empty());
        assert!(tr.clear("not a manager").is_empty());
    }

    #[test]
    fn union_prefers_container_tasks() {
        let t = TaskConfig::web;
        let u = union(
            &[t("web.1.a", "10.0.0.1:80")],
            &[t("web.1.a", "10.0.1.1:80"), t("web.2.b", "10.0.1.2:80")],
        );
        assert_eq!(
            u,
            vec![t("web.1.a", "10.0.0.1:80"), t("web.2.b", "10.0.1.2:80")]
        );
    }
}
