//! The status page's state: one JSON document, pushed by `GET /events` and read by the page.
//! It is `/routes` (same top-level fields, the same task, node and published-listener
//! objects, built by `routes.rs`) with fields added for the page; README's "Status page"
//! section documents every field. Pure: built from what the feed observed.

use std::time::Duration;

use serde_json::{Value, json};

use super::events::{Journal, View, task_reason};
use super::rates::{Counter, Window, round3};
use super::routes::{node_json, published_json, service_json, sorted_services, task_json};
use crate::config::{DiscoveryBackend, NodeName};
use crate::discovery::DiscoveryStatus;
use crate::discovery::keys::PublishedListener;
use crate::snapshot::Snapshot;

/// Facts about this daemon that do not come from the snapshot.
#[derive(Debug, Clone)]
pub struct PageInfo {
    pub node: NodeName,
    pub version: &'static str,
    /// Unix seconds when this daemon started.
    pub started: u64,
    pub backend: DiscoveryBackend,
    /// Last sync older than this: the snapshot is stale (three re-list intervals, as
    /// deploy/prometheus/alerts.yml's RoutemeshDiscoveryStale).
    pub stale_after: Duration,
    /// Whether write actions are enabled (`[admin] token_file`).
    pub actions: bool,
}

impl PageInfo {
    /// Whether the snapshot is stale (never with the static backend).
    pub fn is_stale(&self, discovery: &DiscoveryStatus) -> bool {
        self.backend == DiscoveryBackend::Etcd
            && discovery
                .last_sync_age_secs()
                .is_some_and(|age| age > self.stale_after.as_secs_f64())
    }
}

/// What one state document is built from.
pub struct Inputs<'a> {
    pub info: &'a PageInfo,
    pub snap: &'a Snapshot,
    pub discovery: &'a DiscoveryStatus,
    /// This node's listeners with their state (`AdminState::listeners`).
    pub listeners: &'a [PublishedListener],
    /// The feed's latest look (task `since` and reasons).
    pub view: &'a View,
    pub rates: &'a Window,
    pub events: &'a Journal,
    /// [`crate::util::clock::now_ms`].
    pub now: u64,
}

fn rate(w: &Window, c: Counter) -> Option<f64> {
    w.rate(&c).map(round3)
}

/// The state without the fields that change by themselves as time passes (`generated_ms`,
/// `last_sync_age_seconds`): the feed pushes it only when this part changed.
pub fn state_json(i: &Inputs) -> Value {
    let info = i.info;
    let services: Vec<Value> = sorted_services(i.snap)
        .into_iter()
        .map(|svc| {
            let mut s = service_json(svc, i.now);
            s["tasks"] = svc
                .tasks
                .iter()
                .map(|t| {
                    let mut v = task_json(t, i.now);
                    let key = (svc.name.clone(), t.id.clone());
                    let seen = i.view.tasks.get(&key);
                    v["since_ms"] = json!(seen.map(|s| s.since_ms));
                    v["reason"] = json!(seen.and_then(|s| task_reason(s, &i.view.nodes)));
                    let (svc_name, id) = key;
                    let attempts =
                        rate(i.rates, Counter::TaskAttempts(svc_name.clone(), id.clone()));
                    let failures = rate(i.rates, Counter::TaskFailures(svc_name, id));
                    v["attempts_per_s"] = json!(attempts);
                    v["failures_per_s"] = json!(failures);
                    v["error_ratio"] = json!(match (attempts, failures) {
                        (Some(a), Some(f)) if a > 0.0 => Some(round3((f / a).min(1.0))),
                        (Some(_), Some(_)) => Some(0.0),
                        _ => None,
                    });
                    let latency = t.state.latency_ewma_us();
                    v["latency_ms"] = json!((latency > 0).then(|| round3(latency as f64 / 1000.0)));
                    v
                })
                .collect();
            s
        })
        .collect();
    let ready_nodes = i.snap.nodes.values().filter(|e| e.is_ready()).count();
    let nodes: Vec<Value> = i
        .snap
        .nodes
        .iter()
        .map(|(name, e)| {
            let mut v = node_json(name, e);
            let hosted: Vec<_> = i
                .view
                .tasks
                .values()
                .filter(|t| t.node.as_ref() == Some(name))
                .collect();
            v["started"] = json!(e.record().map(|r| r.started).filter(|&s| s > 0));
            v["tasks"] = json!(hosted.len());
            v["tasks_healthy"] = json!(
                hosted
                    .iter()
                    .filter(|t| t.status == crate::snapshot::TaskStatus::Healthy)
                    .count()
            );
            v["self"] = json!(name == &info.node);
            v
        })
        .collect();
    let published: Vec<Value> = i
        .snap
        .published
        .iter()
        .map(|p| {
            let mut v = published_json(p);
            let bound = i
                .snap
                .nodes
                .values()
                .filter(|e| e.is_ready())
                .filter(|e| {
                    e.alive.as_ref().is_some_and(|r| {
                        r.listeners
                            .iter()
                            .any(|l| l.name == p.config.name && l.is_bound())
                    })
                })
                .count();
            v["bound_nodes"] = json!(bound);
            v["ready_nodes"] = json!(ready_nodes);
            v
        })
        .collect();
    let listeners: Vec<Value> = i
        .listeners
        .iter()
        .map(|l| {
            let mut v = serde_json::to_value(l).unwrap_or_default();
            let name = l.name.clone();
            v["active_connections"] = json!(i.rates.active(&name));
            v["connections_per_s"] =
                json!(rate(i.rates, Counter::ListenerConnections(name.clone())));
            v["bytes_in_per_s"] = json!(rate(i.rates, Counter::ListenerBytesIn(name.clone())));
            v["bytes_out_per_s"] = json!(rate(i.rates, Counter::ListenerBytesOut(name)));
            v
        })
        .collect();
    let events: Vec<&super::events::Event> = i.events.newest_first().collect();
    let d = i.discovery;
    json!({
        "node": info.node.as_str(),
        "revision": i.snap.revision,
        "synced": d.synced(),
        "discovery_up": d.up(),
        "services": services,
        "nodes": nodes,
        "published": published,
        "invalid": i.snap.invalid,
        "certificates": i.snap.acme.rows_json(crate::discovery::unix_ms() / 1000),
        "listeners": listeners,
        "version": info.version,
        "started": info.started,
        "actions": info.actions,
        "discovery": {
            "backend": match info.backend {
                DiscoveryBackend::Etcd => "etcd",
                DiscoveryBackend::Static => "static",
            },
            "up": d.up(),
            "synced": d.synced(),
            "revision": d.revision(),
            "last_sync_ms": d.last_sync_unix_ms(),
            "stale": info.is_stale(d),
            "stale_after_seconds": info.stale_after.as_secs(),
        },
        "events": events,
    })
}

/// Adds the fields that change with time alone: `generated_ms` (unix ms; the page computes
/// ages from it, whatever its own clock says) and `last_sync_age_seconds` (as in /routes).
pub fn stamp(v: &mut Value, unix_ms: u64, discovery: &DiscoveryStatus) {
    v["generated_ms"] = json!(unix_ms);
    v["last_sync_age_seconds"] = json!(discovery.last_sync_age_secs());
}
