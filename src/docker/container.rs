//! Pure mapping from what the engine says about a container to a task of this node, or the
//! reason it is not one. No IO, no clock: `mod.rs` feeds it inspect responses and events.
//!
//! Rules (the contract of `[docker]`, also in docs/docker.md):
//! - a container is considered only when it carries `routemesh.service`; it must also carry
//!   `routemesh.port` (1-65535); `routemesh.weight` (0-1000) is optional, default 1;
//!   `routemesh.publish=80/http[,1883/tcp…]` is optional: ports every node publishes for the
//!   service while the task is registered;
//! - it must be running and not paused;
//! - task id = the container's name, `node` = this node;
//! - its address: with `[docker] network = "NAME"` its IP on that network; otherwise the
//!   host address that publishes `routemesh.port/tcp` if it publishes it, else (host
//!   network mode) the node's address, else its IP on its only network;
//! - a container with a HEALTHCHECK is routable only while Docker says `healthy`: while
//!   `starting` or `unhealthy` it stays registered with weight 0, so `service ls` counts it
//!   as registered but not routable and `service ps` shows its weight 0 (state `drained`
//!   in a node's `/routes`). That keeps it visible without a new field in the key schema.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};

use crate::config::{PublishSpec, ServiceName, TaskConfig, TaskId};

pub const LABEL_SERVICE: &str = "routemesh.service";
pub const LABEL_PORT: &str = "routemesh.port";
pub const LABEL_WEIGHT: &str = "routemesh.weight";
pub const LABEL_PUBLISH: &str = "routemesh.publish";

/// The parts of `docker inspect` discovery looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without the leading `/` the engine puts there.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    pub paused: bool,
    /// None when the container has no HEALTHCHECK.
    pub health: Option<Health>,
    /// `HostConfig.NetworkMode` (`host`, `bridge`, a network name, `container:ID`, ...).
    pub network_mode: String,
    /// Each attached network and the container's IPv4 (or IPv6) address on it.
    pub networks: BTreeMap<String, Option<IpAddr>>,
    /// Host bindings of container ports: (container port, protocol, host IP, host port).
    pub published: Vec<Published>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub container_port: u16,
    pub protocol: String,
    /// None for an unspecified host IP (`0.0.0.0`, `::` or empty).
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// What address selection needs to know about this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// `[docker] network`; None = automatic.
    pub network: Option<String>,
    /// `[node] advertise`: the address of ports published on all interfaces.
    pub advertise: Option<IpAddr>,
}

/// A container that maps to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerTask {
    pub task: TaskConfig,
    /// The health Docker reports (None: no HEALTHCHECK).
    pub health: Option<Health>,
    /// The weight from the label, before health zeroed it.
    pub label_weight: u32,
}

/// Why a container is not a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// Not labelled for routemesh: not our business, not worth a log line.
    #[error("no {LABEL_SERVICE} label")]
    NotLabelled,
    #[error("not running")]
    NotRunning,
    #[error("paused")]
    Paused,
    /// A label the user must fix: logged as a warning naming the container.
    #[error("{0}")]
    BadLabel(String),
    /// No address other nodes could reach: logged as a warning.
    #[error("{0}")]
    NoAddress(String),
}

impl Skip {
    /// Whether the user should hear about it (bad labels, no usable address).
    pub fn is_warning(&self) -> bool {
        matches!(self, Skip::BadLabel(_) | Skip::NoAddress(_))
    }
}

/// Maps a container to a task of this node, or the reason it is none.
pub fn task_of(c: &Container, sel: &Selection) -> Result<DockerTask, Skip> {
    if !c.labels.contains_key(LABEL_SERVICE) {
        return Err(Skip::NotLabelled);
    }
    if !c.running {
        return Err(Skip::NotRunning);
    }
    if c.paused {
        return Err(Skip::Paused);
    }
    let Labels {
        service,
        port,
        weight: label_weight,
        publish,
    } = labels_of(&c.labels)?;
    let id = TaskId::new(&c.name).map_err(|e| {
        Skip::BadLabel(format!(
            "the container name is not a valid task id ({e}); rename the container"
        ))
    })?;
    let addr = address(c, port, sel)?;
    let weight = match c.health {
        None | Some(Health::Healthy) => label_weight,
        Some(Health::Starting | Health::Unhealthy) => 0,
    };
    Ok(DockerTask {
        task: TaskConfig {
            service,
            addr,
            id,
            weight,
            publish,
        },
        health: c.health,
        label_weight,
    })
}

/// What the routemesh labels of a container (or a swarm service) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub service: ServiceName,
    /// The port the container serves on.
    pub port: u16,
    pub weight: u32,
    /// `routemesh.publish`: ports every node publishes for the service.
    pub publish: Vec<PublishSpec>,
}

/// Reads `routemesh.service`, `routemesh.port`, `routemesh.weight` and `routemesh.publish`
/// (also the labels of swarm services, `swarm.rs`). The caller has checked that
/// `routemesh.service` is there.
pub fn labels_of(labels: &BTreeMap<String, String>) -> Result<Labels, Skip> {
    let service = labels
        .get(LABEL_SERVICE)
        .map(String::as_str)
        .unwrap_or_default();
    let service = ServiceName::new(service.trim())
        .map_err(|e| Skip::BadLabel(format!("label {LABEL_SERVICE}: {e}")))?;
    let port = match labels.get(LABEL_PORT) {
        None => {
            return Err(Skip::BadLabel(format!(
                "label {LABEL_PORT} is missing: set it to the port the container serves on"
            )));
        }
        Some(p) => match p.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(Skip::BadLabel(format!(
                    "label {LABEL_PORT}={p:?} is not a port number (1-65535)"
                )));
            }
        },
    };
    let label_weight = match labels.get(LABEL_WEIGHT) {
        None => 1,
        Some(w) => match w.trim().parse::<u32>() {
            Ok(w) if w <= 1000 => w,
            _ => {
                return Err(Skip::BadLabel(format!(
                    "label {LABEL_WEIGHT}={w:?} is not a whole number from 0 to 1000"
                )));
            }
        },
    };
    let mut publish = Vec::new();
    for item in labels
        .get(LABEL_PUBLISH)
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let spec = PublishSpec::parse(item)
            .map_err(|e| Skip::BadLabel(format!("label {LABEL_PUBLISH}: {e}")))?;
        if !publish.contains(&spec) {
            publish.push(spec);
        }
    }
    publish.sort();
    Ok(Labels {
        service,
        port,
        weight: label_weight,
        publish,
    })
}

fn address(c: &Container, port: u16, sel: &Selection) -> Result<SocketAddr, Skip> {
    if let Some(net) = &sel.network {
        return match c.networks.get(net) {
            Some(Some(ip)) => Ok(SocketAddr::new(*ip, port)),
            Some(None) => Err(Skip::NoAddress(format!(
                "it has no IP address on network {net:?}"
            ))),
            None => Err(Skip::NoAddress(format!(
                "it is not attached to network {net:?} ([docker] network); attached: {}",
                names(c)
            ))),
        };
    }
    // A published port is what other nodes can reach: prefer it.
    if let Some(p) = c
        .published
        .iter()
        .find(|p| p.container_port == port && p.protocol == "tcp" && p.host_port > 0)
    {
        return match p.host_ip.or(sel.advertise) {
            Some(ip) => Ok(SocketAddr::new(ip, p.host_port)),
            None => Err(Skip::NoAddress(format!(
                "it publishes port {port} on all host interfaces and [node] advertise is not set: set advertise to this node's address, or name a network in [docker] network"
            ))),
        };
    }
    if c.network_mode == "host" {
        return match sel.advertise {
            Some(ip) => Ok(SocketAddr::new(ip, port)),
            None => Err(Skip::NoAddress(
                "it uses the host network and [node] advertise is not set: set advertise to this node's address".into(),
            )),
        };
    }
    let with_ip: Vec<IpAddr> = c.networks.values().flatten().copied().collect();
    match with_ip.as_slice() {
        [ip] => Ok(SocketAddr::new(*ip, port)),
        [] => Err(Skip::NoAddress(format!(
            "it has no network address (network mode {:?}) and does not publish port {port}",
            c.network_mode
        ))),
        _ => Err(Skip::NoAddress(format!(
            "it is attached to several networks ({}): name one in [docker] network",
            names(c)
        ))),
    }
}

fn names(c: &Container) -> String {
    if c.networks.is_empty() {
        "none".into()
    } else {
        c.networks.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn parse_ip(s: Option<&String>) -> Option<IpAddr> {
    let ip = s?.trim().parse::<IpAddr>().ok()?;
    (!ip.is_unspecified()).then_some(ip)
}

impl Container {
    /// Reads the fields discovery needs from an inspect response; absent fields read as
    /// empty / not running.
    pub fn from_inspect(r: &ContainerInspectResponse) -> Container {
        let state = r.state.as_ref();
        let health = state
            .and_then(|s| s.health.as_ref())
            .and_then(|h| h.status)
            .and_then(|s| match s {
                HealthStatusEnum::STARTING => Some(Health::Starting),
                HealthStatusEnum::HEALTHY => Some(Health::Healthy),
                HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
                HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
            });
        let ns = r.network_settings.as_ref();
        let networks = ns
            .and_then(|n| n.networks.as_ref())
            .map(|m| {
                m.iter()
                    .map(|(name, ep)| {
                        let ip = parse_ip(ep.ip_address.as_ref())
                            .or_else(|| parse_ip(ep.global_ipv6_address.as_ref()));
                        (name.clone(), ip)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut published = Vec::new();
        for (key, bindings) in ns.and_then(|n| n.ports.as_ref()).into_iter().flatten() {
            let (port, proto) = key.split_once('/').unwrap_or((key.as_str(), "tcp"));
            let Ok(container_port) = port.parse::<u16>() else {
                continue;
            };
            for b in bindings.iter().flatten() {
                let Some(host_port) = b.host_port.as_ref().and_then(|p| p.parse::<u16>().ok())
                else {
                    continue;
                };
                published.push(Published {
                    container_port,
                    protocol: proto.to_string(),
                    host_ip: parse_ip(b.host_ip.as_ref()),
                    host_port,
                });
            }
        }
        published.sort_by(|a, b| {
            (
                a.container_port,
                &a.protocol,
                a.host_ip.is_none(),
                a.host_port,
            )
                .cmp(&(
                    b.container_port,
                    &b.protocol,
                    b.host_ip.is_none(),
                    b.host_port,
                ))
        });
        Container {
            id: r.id.clone().unwrap_or_default(),
            name: r
                .name
                .as_deref()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            labels: r
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            running: state.and_then(|s| s.running).unwrap_or(false),
            paused: state.and_then(|s| s.paused).unwrap_or(false),
            health,
            network_mode: r
                .host_config
                .as_ref()
                .and_then(|h| h.network_mode.clone())
                .unwrap_or_default(),
            networks,
            published,
        }
    }
}

/// What a container event means for the task set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventEffect {
    /// Take the container's task out at once (no inspect: the engine may still be busy
    /// stopping it, and a stopping container must leave rotation before it exits).
    Remove { id: String },
    /// Inspect the container and map it again (start, unpause, health change, rename...).
    Refresh { id: String },
    /// Nothing to do.
    Ignore,
}

/// Signals that do not stop a process (reload, log reopen, window change): a `kill` event
/// with one of these leaves the task in.
const HARMLESS_SIGNALS: &[&str] = &[
    "1", "10", "12", "28", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "HUP", "USR1", "USR2",
    "WINCH",
];

/// Classifies one engine event. `kill` is acted on because `docker stop` sends the stop
/// signal (and emits `kill`) well before `die`: the task leaves rotation while the process
/// still drains.
pub fn effect_of(e: &EventMessage) -> EventEffect {
    use bollard::models::EventMessageTypeEnum as T;
    if e.typ != Some(T::CONTAINER) {
        return EventEffect::Ignore;
    }
    let Some(actor) = &e.actor else {
        return EventEffect::Ignore;
    };
    let Some(id) = actor.id.clone().filter(|i| !i.is_empty()) else {
        return EventEffect::Ignore;
    };
    let action = e.action.as_deref().unwrap_or_default();
    // `health_status: healthy` carries the status after a colon; `exec_*` likewise.
    let verb = action.split(':').next().unwrap_or_default().trim();
    match verb {
        "die" | "stop" | "pause" | "destroy" | "oom" => EventEffect::Remove { id },
        "kill" => {
            let signal = actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("signal"))
                .map(|s| s.trim().to_ascii_uppercase());
            match signal {
                Some(s) if HARMLESS_SIGNALS.contains(&s.as_str()) => EventEffect::Ignore,
                _ => EventEffect::Remove { id },
            }
        }
        "start" | "unpause" | "restart" | "health_status" | "rename" | "update" => {
            EventEffect::Refresh { id }
        }
        _ => EventEffect::Ignore,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use bollard::models::{EventActor, EventMessageTypeEnum};

    use super::*;

    /// A running container labelled for service `web` on `port`, with one network and its IP.
    pub(crate) fn labelled(id: &str, name: &str, port: &str, network: &str, ip: &str) -> Container {
        Container {
            id: id.into(),
            name: name.into(),
            labels: [
                (LABEL_SERVICE.to_string(), "web".to_string()),
                (LABEL_PORT.to_string(), port.to_string()),
            ]
            .into_iter()
            .collect(),
            running: true,
            network_mode: network.into(),
            networks: [(network.to_string(), Some(ip.parse().unwrap()))]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn web(name: &str) -> Container {
        labelled(&format!("id-{name}"), name, "8080", "app-net", "172.20.0.5")
    }

    /// Where `c` is registered by a node that advertises 192.0.2.1.
    fn addr_on_advertising_node(c: &Container) -> std::net::SocketAddr {
        let sel = Selection {
            network: None,
            advertise: Some("192.0.2.1".parse().unwrap()),
        };
        task_of(c, &sel).unwrap().task.addr
    }

    fn auto() -> Selection {
        Selection::default()
    }

    #[test]
    fn labelled_running_container_is_a_task() {
        let t = task_of(&web("web-1"), &auto()).unwrap();
        assert_eq!(t.task.service.as_str(), "web");
        assert_eq!(t.task.id.as_str(), "web-1");
        assert_eq!(t.task.addr, "172.20.0.5:8080".parse().unwrap());
        assert_eq!(t.task.weight, 1);
    }

    #[test]
    fn weight_label() {
        let mut c = web("w");
        c.labels.insert(LABEL_WEIGHT.into(), "7".into());
        assert_eq!(task_of(&c, &auto()).unwrap().task.weight, 7);
        c.labels.insert(LABEL_WEIGHT.into(), "0".into());
        assert_eq!(task_of(&c, &auto()).unwrap().task.weight, 0);
        for bad in ["1001", "-1", "x", ""] {
            c.labels.insert(LABEL_WEIGHT.into(), bad.into());
            assert!(
                matches!(task_of(&c, &auto()), Err(Skip::BadLabel(m)) if m.contains(LABEL_WEIGHT)),
                "{bad}"
            );
        }
    }

    #[test]
    fn skips_unlabelled_stopped_and_paused_quietly() {
        let mut c = web("w");
        c.labels.remove(LABEL_SERVICE);
        assert_eq!(task_of(&c, &auto()), Err(Skip::NotLabelled));
        let mut c = web("w");
        c.running = false;
        assert_eq!(task_of(&c, &auto()), Err(Skip::NotRunning));
        let mut c = web("w");
        c.paused = true;
        assert_eq!(task_of(&c, &auto()), Err(Skip::Paused));
        assert!(!Skip::Paused.is_warning());
    }

    #[test]
    fn bad_labels_are_warnings() {
        for (k, v) in [
            (LABEL_SERVICE, ""),
            (LABEL_SERVICE, "a/b"),
            (LABEL_PORT, "http"),
            (LABEL_PORT, "0"),
            (LABEL_PORT, "70000"),
        ] {
            let mut c = web("w");
            c.labels.insert(k.into(), v.into());
            let err = task_of(&c, &auto()).unwrap_err();
            assert!(matches!(err, Skip::BadLabel(_)), "{k}={v}: {err:?}");
            assert!(err.is_warning());
        }
        let mut c = web("w");
        c.labels.remove(LABEL_PORT);
        assert!(matches!(task_of(&c, &auto()), Err(Skip::BadLabel(m)) if m.contains("missing")));
    }

    #[test]
    fn health_gates_routability_but_keeps_the_task_visible() {
        let mut c = web("w");
        c.labels.insert(LABEL_WEIGHT.into(), "5".into());
        for (h, w) in [
            (Health::Starting, 0),
            (Health::Unhealthy, 0),
            (Health::Healthy, 5),
        ] {
            c.health = Some(h);
            let t = task_of(&c, &auto()).unwrap();
            assert_eq!(t.task.weight, w, "{h:?}");
            assert_eq!(t.label_weight, 5);
            assert_eq!(t.health, Some(h));
        }
    }

    #[test]
    fn configured_network_wins() {
        let mut c = web("w");
        c.networks
            .insert("other".into(), Some("10.9.0.3".parse().unwrap()));
        let sel = Selection {
            network: Some("other".into()),
            advertise: None,
        };
        assert_eq!(
            task_of(&c, &sel).unwrap().task.addr,
            "10.9.0.3:8080".parse().unwrap()
        );
        let sel = Selection {
            network: Some("missing".into()),
            advertise: None,
        };
        assert!(
            matches!(task_of(&c, &sel), Err(Skip::NoAddress(m)) if m.contains("app-net, other"))
        );
    }

    #[test]
    fn several_networks_need_a_choice() {
        let mut c = web("w");
        c.networks
            .insert("other".into(), Some("10.9.0.3".parse().unwrap()));
        let err = task_of(&c, &auto()).unwrap_err();
        assert!(
            matches!(&err, Skip::NoAddress(m) if m.contains("[docker] network")),
            "{err}"
        );
    }

    #[test]
    fn published_port_is_preferred() {
        let mut c = web("w");
        c.published = vec![
            Published {
                container_port: 9000,
                protocol: "tcp".into(),
                host_ip: Some("127.0.0.1".parse().unwrap()),
                host_port: 19000,
            },
            Published {
                container_port: 8080,
                protocol: "tcp".into(),
                host_ip: Some("192.0.2.10".parse().unwrap()),
                host_port: 18080,
            },
        ];
        assert_eq!(
            task_of(&c, &auto()).unwrap().task.addr,
            "192.0.2.10:18080".parse().unwrap()
        );
        // On all interfaces: the node's advertised address, or a clear skip.
        c.published[1].host_ip = None;
        let err = task_of(&c, &auto()).unwrap_err();
        assert!(
            matches!(&err, Skip::NoAddress(m) if m.contains("advertise")),
            "{err}"
        );
        assert_eq!(
            addr_on_advertising_node(&c),
            "192.0.2.1:18080".parse().unwrap()
        );
    }

    /// `web("w")` in network mode `mode` (which is also its one network, without an address).
    fn in_mode(mode: &str) -> Container {
        let mut c = web("w");
        c.network_mode = mode.into();
        c.networks = [(mode.to_string(), None)].into_iter().collect();
        c
    }

    #[test]
    fn host_network_uses_the_node_address() {
        let c = in_mode("host");
        assert!(matches!(task_of(&c, &auto()), Err(Skip::NoAddress(_))));
        assert_eq!(
            addr_on_advertising_node(&c),
            "192.0.2.1:8080".parse().unwrap()
        );
    }

    #[test]
    fn no_network_no_task() {
        let c = in_mode("none");
        assert!(matches!(task_of(&c, &auto()), Err(Skip::NoAddress(_))));
    }

    #[test]
    fn reads_an_engine_inspect_response() {
        // Trimmed from a real `GET /containers/{id}/json` of Docker 20.10.
        let json = r#"{
          "Id": "4f1c0e",
          "Name": "/web-1",
          "State": {"Status": "running", "Running": true, "Paused": false,
                    "Health": {"Status": "starting", "FailingStreak": 0, "Log": []}},
          "HostConfig": {"NetworkMode": "rm-net"},
          "Config": {"Labels": {"routemesh.service": "web", "routemesh.port": "8080"}},
          "NetworkSettings": {
            "Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "18080"}], "9/udp": null},
            "Networks": {"rm-net": {"IPAddress": "172.28.0.2", "GlobalIPv6Address": ""}}
          }
        }"#;
        let r: ContainerInspectResponse = serde_json::from_str(json).unwrap();
        let c = Container::from_inspect(&r);
        assert_eq!(c.name, "web-1");
        assert!(c.running && !c.paused);
        assert_eq!(c.health, Some(Health::Starting));
        assert_eq!(c.network_mode, "rm-net");
        assert_eq!(
            c.networks.get("rm-net"),
            Some(&Some("172.28.0.2".parse().unwrap()))
        );
        assert_eq!(
            c.published,
            vec![Published {
                container_port: 8080,
                protocol: "tcp".into(),
                host_ip: None,
                host_port: 18080
            }]
        );
        assert_eq!(c.labels.get(LABEL_PORT).map(String::as_str), Some("8080"));
    }

    /// An engine event about object `id` (container and swarm tests).
    pub(crate) fn event_message(
        typ: EventMessageTypeEnum,
        id: &str,
        action: &str,
        attrs: &[(&str, &str)],
    ) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<HashMap<_, _>>(),
                ),
            }),
            ..Default::default()
        }
    }

    fn event(action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        event_message(EventMessageTypeEnum::CONTAINER, "abc", action, attrs)
    }

    #[test]
    fn events_map_to_effects() {
        let rm = EventEffect::Remove { id: "abc".into() };
        let re = EventEffect::Refresh { id: "abc".into() };
        for a in ["die", "stop", "pause", "destroy", "oom"] {
            assert_eq!(effect_of(&event(a, &[])), rm, "{a}");
        }
        assert_eq!(effect_of(&event("kill", &[("signal", "15")])), rm);
        assert_eq!(effect_of(&event("kill", &[("signal", "3")])), rm);
        assert_eq!(effect_of(&event("kill", &[("signal", "9")])), rm);
        assert_eq!(effect_of(&event("kill", &[])), rm);
        assert_eq!(
            effect_of(&event("kill", &[("signal", "1")])),
            EventEffect::Ignore
        );
        assert_eq!(
            effect_of(&event("kill", &[("signal", "SIGHUP")])),
            EventEffect::Ignore
        );
        for a in [
            "start",
            "unpause",
            "health_status: healthy",
            "health_status: unhealthy",
        ] {
            assert_eq!(effect_of(&event(a, &[])), re, "{a}");
        }
        for a in [
            "exec_start: sh -c true",
            "exec_create: x",
            "attach",
            "create",
            "top",
        ] {
            assert_eq!(effect_of(&event(a, &[])), EventEffect::Ignore, "{a}");
        }
        let mut net = event("connect", &[]);
        net.typ = Some(EventMessageTypeEnum::NETWORK);
        assert_eq!(effect_of(&net), EventEffect::Ignore);
    }
}
