//! The status page's Events: state changes this node saw (tasks up/down/ejected, nodes
//! Ready/Down and drained, discovery up/down/stale, config reloads, admin actions), derived
//! by comparing two [`View`]s of its state a few hundred milliseconds apart, kept in a
//! [`Journal`] of the last [`CAPACITY`]. Pure: the feed (`feed.rs`) brings the clock and the
//! snapshot; nothing here touches the data path.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use serde::Serialize;

use crate::config::{NodeName, ServiceName, TaskId};
use crate::discovery::keys::Availability;
use crate::snapshot::{Snapshot, TaskStatus};

/// How many events the journal keeps.
pub const CAPACITY: usize = 200;

/// Longest message kept (longer ones, e.g. a backend's error text, are cut).
const MESSAGE_MAX: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Task,
    Node,
    Discovery,
    Reload,
    Action,
}

/// One state change, as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unix milliseconds when this node noticed it.
    pub at_ms: u64,
    pub kind: EventKind,
    /// What changed: `SERVICE/TASK`, a node name, `discovery`, `config` or the action's target.
    pub subject: String,
    /// Its state afterwards (a task state, Ready/Down, drain/active, up/down/stale, ok/error…).
    pub state: String,
    /// The change in words, with the reason when there is one.
    pub message: String,
}

impl Event {
    pub fn new(
        at_ms: u64,
        kind: EventKind,
        subject: impl Into<String>,
        state: impl Into<String>,
        message: impl Into<String>,
    ) -> Event {
        let mut message: String = message.into();
        if message.len() > MESSAGE_MAX {
            let mut cut = MESSAGE_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        Event {
            at_ms,
            kind,
            subject: subject.into(),
            state: state.into(),
            message,
        }
    }
}

/// The last [`CAPACITY`] events, oldest first inside; listed newest first.
#[derive(Debug, Default)]
pub struct Journal {
    events: VecDeque<Event>,
}

impl Journal {
    pub fn push(&mut self, e: Event) {
        if self.events.len() == CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    pub fn extend(&mut self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            self.push(e);
        }
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().rev()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// A task as one look saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSeen {
    pub status: TaskStatus,
    pub addr: SocketAddr,
    pub node: Option<NodeName>,
    pub weight: u32,
    pub error: Option<String>,
    /// Unix ms since which it has been in `status` (as far as this node knows).
    pub since_ms: u64,
}

/// A node as one look saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSeen {
    pub ready: bool,
    pub availability: Availability,
}

/// Discovery as one look saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscoverySeen {
    pub synced: bool,
    pub up: bool,
    pub stale: bool,
    pub revision: i64,
    /// Static routing table (no etcd): never down nor stale.
    pub is_static: bool,
}

/// Everything the events are derived from, at one moment.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub discovery: DiscoverySeen,
    pub tasks: BTreeMap<(ServiceName, TaskId), TaskSeen>,
    pub nodes: BTreeMap<NodeName, NodeSeen>,
    /// `routemesh_config_reloads_total` by result: (success, error).
    pub reloads: (u64, u64),
}

impl View {
    /// Looks at `snap`; `now` is [`crate::util::clock::now_ms`] (ejection deadlines),
    /// `unix_ms` the wall clock stamped on changes; `prev` carries the `since` of tasks
    /// whose state did not change.
    pub fn observe(
        snap: &Snapshot,
        discovery: DiscoverySeen,
        reloads: (u64, u64),
        now: u64,
        unix_ms: u64,
        prev: &View,
    ) -> View {
        let mut tasks = BTreeMap::new();
        for svc in snap.services.values() {
            for t in &svc.tasks {
                let key = (svc.name.clone(), t.id.clone());
                let status = t.status(now);
                let since_ms = match prev.tasks.get(&key) {
                    Some(p) if p.status == status => p.since_ms,
                    _ => unix_ms,
                };
                tasks.insert(
                    key,
                    TaskSeen {
                        status,
                        addr: t.addr,
                        node: t.node.clone(),
                        weight: t.weight,
                        error: t.state.last_error(),
                        since_ms,
                    },
                );
            }
        }
        let nodes = snap
            .nodes
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    NodeSeen {
                        ready: e.is_ready(),
                        availability: e.availability,
                    },
                )
            })
            .collect();
        View {
            discovery,
            tasks,
            nodes,
            reloads,
        }
    }
}

fn ready_word(ready: bool) -> &'static str {
    if ready { "Ready" } else { "Down" }
}

/// Why a task is in `t.status`, in words (also the page's REASON column).
pub fn task_reason(t: &TaskSeen, nodes: &BTreeMap<NodeName, NodeSeen>) -> Option<String> {
    let node = t.node.as_ref().map(|n| n.as_str()).unwrap_or("?");
    match t.status {
        TaskStatus::Healthy => None,
        TaskStatus::Unhealthy | TaskStatus::Ejected => Some(
            t.error
                .clone()
                .unwrap_or_else(|| "failed checks or connects".into()),
        ),
        TaskStatus::NodeDown => Some(format!("node {node} is Down")),
        TaskStatus::Drained if t.weight == 0 => Some("weight 0".into()),
        TaskStatus::Drained => match t.node.as_ref().and_then(|n| nodes.get(n)) {
            Some(n) if n.availability == Availability::Drain => {
                Some(format!("node {node} drained"))
            }
            _ => Some("drained".into()),
        },
    }
}

/// The changes from `prev` to `next`, stamped `at_ms`. The first sync is one event (not one
/// per task and node it brought).
pub fn diff(prev: &View, next: &View, at_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let ev = |kind, subject: &str, state: &str, message: String| {
        Event::new(at_ms, kind, subject, state, message)
    };
    out.extend(discovery_changes(prev, next, at_ms));
    let (ok0, err0) = prev.reloads;
    let (ok1, err1) = next.reloads;
    if ok1 > ok0 {
        out.push(ev(
            EventKind::Reload,
            "config",
            "ok",
            "config reloaded".into(),
        ));
    }
    if err1 > err0 {
        out.push(ev(
            EventKind::Reload,
            "config",
            "error",
            "config reload refused, the running config stays (the log says why)".into(),
        ));
    }
    if !prev.discovery.synced {
        return out;
    }
    for (name, n) in &next.nodes {
        let subject = name.as_str();
        match prev.nodes.get(name) {
            None => out.push(ev(
                EventKind::Node,
                subject,
                ready_word(n.ready),
                format!("node {name} joined ({})", ready_word(n.ready)),
            )),
            Some(p) => {
                if p.ready != n.ready {
                    let why = if n.ready {
                        format!("node {name} is Ready again")
                    } else {
                        format!("node {name} is Down: its lease expired or it shut down")
                    };
                    out.push(ev(EventKind::Node, subject, ready_word(n.ready), why));
                }
                if p.availability != n.availability {
                    let why = match n.availability {
                        Availability::Drain => {
                            format!("node {name} drained: its tasks get no new connections")
                        }
                        Availability::Active => format!("node {name} active again"),
                    };
                    out.push(ev(EventKind::Node, subject, n.availability.as_str(), why));
                }
            }
        }
    }
    for name in prev.nodes.keys().filter(|n| !next.nodes.contains_key(*n)) {
        out.push(ev(
            EventKind::Node,
            name.as_str(),
            "removed",
            format!("node {name} removed (no record left)"),
        ));
    }
    for ((svc, id), t) in &next.tasks {
        let subject = format!("{svc}/{id}");
        let reason = task_reason(t, &next.nodes);
        let state = t.status.as_str();
        let Some(p) = prev.tasks.get(&(svc.clone(), id.clone())) else {
            let node = t
                .node
                .as_ref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default();
            out.push(ev(
                EventKind::Task,
                &subject,
                state,
                format!("task {subject} registered: {}{node} ({state})", t.addr),
            ));
            continue;
        };
        let mut changes = Vec::new();
        if p.status != t.status {
            changes.push(match (t.status, reason) {
                (TaskStatus::Healthy, _)
                    if matches!(p.status, TaskStatus::Drained | TaskStatus::NodeDown) =>
                {
                    format!("task {subject} back in rotation")
                }
                (TaskStatus::Healthy, _) => format!("task {subject} healthy again"),
                (s, Some(why)) => format!("task {subject} {}: {why}", s.as_str()),
                (s, None) => format!("task {subject} {}", s.as_str()),
            });
        }
        if p.weight != t.weight {
            changes.push(format!("task {subject} weight {} → {}", p.weight, t.weight));
        }
        if p.addr != t.addr {
            changes.push(format!("task {subject} moved: {} → {}", p.addr, t.addr));
        }
        for message in changes {
            out.push(ev(EventKind::Task, &subject, state, message));
        }
    }
    for (svc, id) in prev.tasks.keys().filter(|k| !next.tasks.contains_key(*k)) {
        let subject = format!("{svc}/{id}");
        out.push(ev(
            EventKind::Task,
            &subject,
            "removed",
            format!("task {subject} removed"),
        ));
    }
    out
}

fn discovery_changes(prev: &View, next: &View, at_ms: u64) -> Vec<Event> {
    let (p, n) = (prev.discovery, next.discovery);
    let ev = |state: &str, message: String| {
        Event::new(at_ms, EventKind::Discovery, "discovery", state, message)
    };
    let mut out = Vec::new();
    if !p.synced && n.synced {
        let tasks = next.tasks.len();
        let services: std::collections::BTreeSet<_> = next.tasks.keys().map(|(s, _)| s).collect();
        let what = format!(
            "{} service(s), {tasks} task(s), {} node(s)",
            services.len(),
            next.nodes.len()
        );
        out.push(ev(
            "up",
            if n.is_static {
                format!("static routing table loaded: {what}")
            } else {
                format!("synced with etcd at revision {}: {what}", n.revision)
            },
        ));
        return out;
    }
    if n.is_static {
        return out;
    }
    if p.up && !n.up {
        out.push(ev(
            "down",
            "etcd watch lost: serving the last snapshot until etcd answers again".into(),
        ));
    } else if !p.up && n.up && p.synced {
        out.push(ev(
            "up",
            format!("etcd watch restored at revision {}", n.revision),
        ));
    }
    if !p.stale && n.stale {
        out.push(ev(
            "stale",
            "routing snapshot stale: no sync with etcd for three re-list intervals".into(),
        ));
    } else if p.stale && !n.stale {
        out.push(ev("up", "routing snapshot current again".into()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }
    fn id(s: &str) -> TaskId {
        TaskId::new(s).unwrap()
    }
    fn node(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn task(status: TaskStatus) -> TaskSeen {
        TaskSeen {
            status,
            addr: "127.0.0.1:80".parse().unwrap(),
            node: Some(node("n2")),
            weight: 1,
            error: None,
            since_ms: 1,
        }
    }

    fn synced() -> View {
        View {
            discovery: DiscoverySeen {
                synced: true,
                up: true,
                revision: 5,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn first_sync_is_one_event() {
        let mut next = synced();
        next.tasks
            .insert((svc("web"), id("a")), task(TaskStatus::Healthy));
        next.nodes.insert(
            node("n2"),
            NodeSeen {
                ready: true,
                availability: Availability::Active,
            },
        );
        let ev = diff(&View::default(), &next, 10);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].kind, EventKind::Discovery);
        assert_eq!(
            ev[0].message,
            "synced with etcd at revision 5: 1 service(s), 1 task(s), 1 node(s)"
        );
    }

    #[test]
    fn task_node_and_discovery_changes() {
        let mut prev = synced();
        prev.tasks
            .insert((svc("web"), id("a")), task(TaskStatus::Healthy));
        prev.tasks
            .insert((svc("web"), id("gone")), task(TaskStatus::Healthy));
        prev.nodes.insert(
            node("n2"),
            NodeSeen {
                ready: true,
                availability: Availability::Active,
            },
        );
        let mut next = prev.clone();
        next.discovery.up = false;
        next.tasks.remove(&(svc("web"), id("gone")));
        let mut t = task(TaskStatus::Unhealthy);
        t.error = Some("connect: Connection refused".into());
        t.weight = 3;
        next.tasks.insert((svc("web"), id("a")), t);
        next.tasks
            .insert((svc("db"), id("new")), task(TaskStatus::Healthy));
        next.nodes.insert(
            node("n2"),
            NodeSeen {
                ready: false,
                availability: Availability::Drain,
            },
        );
        next.reloads = (1, 0);
        let ev = diff(&prev, &next, 99);
        let lines: Vec<String> = ev
            .iter()
            .map(|e| format!("{:?} {} {} | {}", e.kind, e.subject, e.state, e.message))
            .collect();
        assert_eq!(
            lines,
            [
                "Discovery discovery down | etcd watch lost: serving the last snapshot until etcd answers again",
                "Reload config ok | config reloaded",
                "Node n2 Down | node n2 is Down: its lease expired or it shut down",
                "Node n2 drain | node n2 drained: its tasks get no new connections",
                "Task db/new healthy | task db/new registered: 127.0.0.1:80 on n2 (healthy)",
                "Task web/a unhealthy | task web/a unhealthy: connect: Connection refused",
                "Task web/a unhealthy | task web/a weight 1 → 3",
                "Task web/gone removed | task web/gone removed",
            ]
        );
        assert!(ev.iter().all(|e| e.at_ms == 99));
        // Nothing changed: nothing to report.
        assert!(diff(&next, &next, 100).is_empty());
    }

    #[test]
    fn reasons() {
        let nodes = BTreeMap::from([(
            node("n2"),
            NodeSeen {
                ready: true,
                availability: Availability::Drain,
            },
        )]);
        assert_eq!(task_reason(&task(TaskStatus::Healthy), &nodes), None);
        assert_eq!(
            task_reason(&task(TaskStatus::Drained), &nodes).unwrap(),
            "node n2 drained"
        );
        let mut t = task(TaskStatus::Drained);
        t.weight = 0;
        assert_eq!(task_reason(&t, &nodes).unwrap(), "weight 0");
        assert_eq!(
            task_reason(&task(TaskStatus::NodeDown), &nodes).unwrap(),
            "node n2 is Down"
        );
    }

    #[test]
    fn journal_keeps_the_last_200_newest_first() {
        let mut j = Journal::default();
        for i in 0..250 {
            j.push(Event::new(i, EventKind::Task, "s/t", "healthy", "x"));
        }
        assert_eq!(j.len(), CAPACITY);
        let at: Vec<u64> = j.newest_first().map(|e| e.at_ms).collect();
        assert_eq!(at.first(), Some(&249));
        assert_eq!(at.last(), Some(&50));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let e = Event::new(0, EventKind::Task, "s", "x", "é".repeat(400));
        assert!(e.message.len() <= MESSAGE_MAX + '…'.len_utf8());
        assert!(e.message.ends_with('…'));
    }
}
