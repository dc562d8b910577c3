//! The cluster's published listeners: those written under `{prefix}/listeners/` and those the
//! tasks ask for (`publish` in a task's value), with the conflicts between them decided the
//! same way on every node. Pure: a function of the routing table, unit-tested.
//!
//! Rules (a contract, README "Cluster-wide publishing"):
//! - a task's `PORT/PROTOCOL` becomes listener `{service}-{port}-{protocol}` on `0.0.0.0:PORT`
//!   while at least one registered task of the service asks for it;
//! - an explicit listener wins over a task-requested one on the same address (that one is
//!   `shadowed`), and takes its name when both have the same one;
//! - otherwise, of two listeners on one address the one whose name sorts first binds, the
//!   others are `conflict`.
//!
//! Two addresses are "the same" when their ports are equal and their IPs are equal or one of
//! them is a wildcard (the kernel would refuse to bind both), for listeners of one transport:
//! a udp and a tcp listener never clash ([`clash`]). What each node then does
//! (TOML listeners shadow, the `published_ports` allowlist, bind failures) is the app's part.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::Serialize;

use super::table::RoutingTable;
use crate::config::{ListenerConfig, ListenerEdge, ServiceName, TaskId};

/// Where a published listener comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `{prefix}/listeners/{name}`.
    Etcd,
    /// The `publish` list of the service's tasks.
    Tasks,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Etcd => "etcd",
            Source::Tasks => "tasks",
        }
    }
}

/// The cluster-wide decision about one published listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every node binds it (unless its own TOML or allowlist says otherwise).
    Bind,
    /// An explicit listener holds the address.
    Shadowed { by: String },
    /// Another published listener, whose name sorts first, holds the address.
    Conflict { with: String },
}

/// One published listener as every node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub config: ListenerConfig,
    pub source: Source,
    pub decision: Decision,
    /// Task-requested listeners: the tasks that ask for it (Docker tasks are named after
    /// their containers), for warnings.
    pub requested_by: Vec<TaskId>,
}

/// What this node does with one listener, before binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeDecision {
    Bind,
    /// A listener of this node's TOML (or an explicit published one) holds the address.
    Shadowed {
        by: String,
    },
    Conflict {
        with: String,
    },
    /// This node's `[discovery] published_ports` does not allow the port.
    Refused(String),
}

impl NodeDecision {
    /// The state reported in the node's `alive` record when the listener is not bound.
    pub fn state(&self) -> String {
        match self {
            NodeDecision::Bind => "bound".into(),
            NodeDecision::Shadowed { .. } => "shadowed".into(),
            NodeDecision::Conflict { .. } => "conflict".into(),
            NodeDecision::Refused(why) => format!("refused: {why}"),
        }
    }
}

/// One listener this node serves or was asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub config: ListenerConfig,
    /// `None` for this node's TOML listeners.
    pub source: Option<Source>,
    pub decision: NodeDecision,
}

/// This node's listeners: its TOML ones (always bound; they win every clash) and the
/// cluster's published ones, with the cluster's decision, then the `allowed` ports, then the
/// TOML listeners applied. Same inputs, same plan, on every node.
pub fn node_plan(
    toml: &[ListenerConfig],
    published: &[Published],
    allowed: &crate::config::PortRanges,
) -> Vec<Planned> {
    let mut plan: Vec<Planned> = toml
        .iter()
        .map(|c| Planned {
            config: c.clone(),
            source: None,
            decision: NodeDecision::Bind,
        })
        .collect();
    for p in published {
        let decision = match &p.decision {
            Decision::Shadowed { by } => NodeDecision::Shadowed { by: by.clone() },
            Decision::Conflict { with } => NodeDecision::Conflict { with: with.clone() },
            Decision::Bind if !allowed.allows(p.config.listen.port()) => {
                NodeDecision::Refused("port not allowed".into())
            }
            Decision::Bind => match toml
                .iter()
                .find(|t| t.name == p.config.name || clash(t, &p.config))
            {
                Some(t) => NodeDecision::Shadowed { by: t.name.clone() },
                None => NodeDecision::Bind,
            },
        };
        plan.push(Planned {
            config: p.config.clone(),
            source: Some(p.source),
            decision,
        });
    }
    plan
}

/// Whether two listeners cannot both be bound: same transport, overlapping addresses.
pub fn clash(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.protocol.transport() == b.protocol.transport() && overlaps(a.listen, b.listen)
}

/// Whether two listen addresses cannot both be bound (by one transport).
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The listeners the tasks of `table` ask for, by name, with the tasks that ask.
fn requested(table: &RoutingTable) -> BTreeMap<String, (ListenerConfig, Vec<TaskId>)> {
    let mut out = BTreeMap::new();
    for (service, tasks) in &table.tasks {
        for (id, task) in tasks {
            for spec in &task.publish {
                let name = spec.listener_name(service);
                out.entry(name.clone())
                    .or_insert_with(|| (task_listener(name, service, spec), Vec::new()))
                    .1
                    .push(id.clone());
            }
        }
    }
    out
}

fn task_listener(
    name: String,
    service: &ServiceName,
    spec: &crate::config::PublishSpec,
) -> ListenerConfig {
    ListenerConfig {
        name,
        listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, spec.port)),
        protocol: spec.protocol,
        service: Some(service.clone()),
        routes: Vec::new(),
        edge: ListenerEdge::default(),
    }
}

/// Every published listener of `table`, in name order, with the cluster's decision.
pub fn published(table: &RoutingTable) -> Vec<Published> {
    let mut all: Vec<Published> = table
        .listeners
        .values()
        .map(|c| Published {
            config: c.clone(),
            source: Source::Etcd,
            decision: Decision::Bind,
            requested_by: Vec::new(),
        })
        .collect();
    for (name, (config, requested_by)) in requested(table) {
        if !table.listeners.contains_key(&name) {
            all.push(Published {
                config,
                source: Source::Tasks,
                decision: Decision::Bind,
                requested_by,
            });
        }
    }
    // Explicit ones claim addresses first, then by name.
    all.sort_by(|a, b| {
        (a.source != Source::Etcd, &a.config.name).cmp(&(b.source != Source::Etcd, &b.config.name))
    });
    for i in 0..all.len() {
        let holder = all[..i]
            .iter()
            .find(|h| h.decision == Decision::Bind && clash(&h.config, &all[i].config));
        if let Some(h) = holder {
            let by = h.config.name.clone();
            all[i].decision = if h.source == Source::Etcd && all[i].source == Source::Tasks {
                Decision::Shadowed { by }
            } else {
                Decision::Conflict { with: by }
            };
        }
    }
    all.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &str)]) -> RoutingTable {
        RoutingTable::of_entries(1, entries)
    }

    fn decisions(t: &RoutingTable) -> Vec<(String, Source, Decision)> {
        published(t)
            .into_iter()
            .map(|p| (p.config.name, p.source, p.decision))
            .collect()
    }

    #[test]
    fn tasks_publish_their_ports_while_one_asks() {
        let t = table(&[
            (
                "/rm/tasks/web/a",
                r#"{"addr":"10.0.0.2:8080","publish":["80/http"]}"#,
            ),
            (
                "/rm/tasks/web/b",
                r#"{"addr":"10.0.0.3:8080","publish":["80/http","8443/tls"]}"#,
            ),
            (
                "/rm/tasks/mqtt/m",
                r#"{"addr":"10.0.0.2:1884","publish":["1883"]}"#,
            ),
        ]);
        let d = decisions(&t);
        let names: Vec<&str> = d.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["mqtt-1883-tcp", "web-80-http", "web-8443-tls"]);
        assert!(
            d.iter()
                .all(|(_, s, d)| *s == Source::Tasks && *d == Decision::Bind)
        );
        let p = published(&t);
        assert_eq!(p[1].config.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(p[1].config.service.as_ref().unwrap().as_str(), "web");
    }

    #[test]
    fn explicit_listeners_win_and_names_sort_out_conflicts() {
        let t = table(&[
            (
                "/rm/listeners/zz-web",
                r#"{"listen":"0.0.0.0:80","protocol":"http","service":"web"}"#,
            ),
            (
                "/rm/listeners/aa-other",
                r#"{"listen":"127.0.0.1:80","protocol":"tcp","service":"other"}"#,
            ),
            (
                "/rm/listeners/web-8443-tls",
                r#"{"listen":"0.0.0.0:9443","protocol":"tls","service":"web"}"#,
            ),
            (
                "/rm/tasks/web/a",
                r#"{"addr":"10.0.0.2:8080","publish":["80/http","8443/tls"]}"#,
            ),
            (
                "/rm/tasks/x/a",
                r#"{"addr":"10.0.0.2:1","publish":["9443"]}"#,
            ),
        ]);
        assert_eq!(
            decisions(&t),
            [
                ("aa-other".into(), Source::Etcd, Decision::Bind),
                (
                    "web-80-http".into(),
                    Source::Tasks,
                    Decision::Shadowed {
                        by: "aa-other".into()
                    }
                ),
                // The explicit listener of the same name replaces the requested one.
                ("web-8443-tls".into(), Source::Etcd, Decision::Bind),
                (
                    "x-9443-tcp".into(),
                    Source::Tasks,
                    Decision::Shadowed {
                        by: "web-8443-tls".into()
                    }
                ),
                (
                    "zz-web".into(),
                    Source::Etcd,
                    Decision::Conflict {
                        with: "aa-other".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn the_node_plan_lets_toml_win_and_applies_the_allowlist() {
        let t = table(&[
            (
                "/rm/listeners/web",
                r#"{"listen":"0.0.0.0:80","protocol":"http","service":"web"}"#,
            ),
            (
                "/rm/listeners/mqtt",
                r#"{"listen":"0.0.0.0:1883","service":"mqtt"}"#,
            ),
            (
                "/rm/listeners/api",
                r#"{"listen":"0.0.0.0:8081","service":"api"}"#,
            ),
            (
                "/rm/listeners/dup",
                r#"{"listen":"0.0.0.0:80","service":"x"}"#,
            ),
        ]);
        let toml = crate::config::listener::from_json(
            "local-mqtt",
            br#"{"listen":"127.0.0.1:1883","service":"mqtt"}"#,
            std::path::Path::new(""),
        )
        .unwrap();
        let allowed = crate::config::PortRanges::new(vec![(80, 80), (1883, 1883)]);
        let plan = node_plan(&[toml], &published(&t), &allowed);
        let got: Vec<(&str, Option<Source>, NodeDecision)> = plan
            .iter()
            .map(|p| (p.config.name.as_str(), p.source, p.decision.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("local-mqtt", None, NodeDecision::Bind),
                (
                    "api",
                    Some(Source::Etcd),
                    NodeDecision::Refused("port not allowed".into())
                ),
                ("dup", Some(Source::Etcd), NodeDecision::Bind),
                (
                    "mqtt",
                    Some(Source::Etcd),
                    NodeDecision::Shadowed {
                        by: "local-mqtt".into()
                    }
                ),
                (
                    "web",
                    Some(Source::Etcd),
                    NodeDecision::Conflict { with: "dup".into() }
                ),
            ]
        );
        assert_eq!(plan[1].decision.state(), "refused: port not allowed");
        assert_eq!(plan[3].decision.state(), "shadowed");
    }

    #[test]
    fn different_ips_on_one_port_do_not_overlap() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(overlaps(a, "0.0.0.0:80".parse().unwrap()));
        assert!(overlaps(a, "[::]:80".parse().unwrap()));
        assert!(overlaps(a, a));
        assert!(!overlaps(a, "10.0.0.2:80".parse().unwrap()));
        assert!(!overlaps(a, "10.0.0.1:81".parse().unwrap()));
    }
}
