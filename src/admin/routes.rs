//! `GET /routes`: the snapshot as this node sees it, as JSON (also the shape `service ps`
//! reads). Each item (task, node, published listener) has one builder here, which the status
//! page's state (`status.rs`) extends, so the two shapes agree wherever they overlap.

use serde_json::{Value, json};

use crate::config::NodeName;
use crate::discovery::DiscoveryStatus;
use crate::discovery::published::{Decision, Published};
use crate::discovery::table::NodeEntry;
use crate::snapshot::{Service, Snapshot, Task, TaskStatus};
use crate::util::clock::now_ms;

/// One task: `id`, `addr`, `node`, `weight`, `state`, `routable`, `in_flight`,
/// `udp_sessions` (open UDP sessions on it), `unanswered` (connections awaiting its first
/// answer, paced by `max_pending_connects`), `last_error`.
/// `now` is [`now_ms`] (ejections are deadlines on that clock).
pub fn task_json(t: &Task, now: u64) -> Value {
    let status = t.status(now);
    json!({
        "id": t.id.as_str(),
        "addr": t.addr.to_string(),
        "node": t.node.as_ref().map(|n| n.as_str()),
        "weight": t.weight,
        "state": status.as_str(),
        "routable": status == TaskStatus::Healthy,
        "in_flight": t.state.in_flight(),
        "udp_sessions": t.state.udp_sessions(),
        "unanswered": t.state.unanswered(),
        "last_error": t.state.last_error(),
    })
}

/// One service without its tasks: `name`, `balance`, `live`.
pub fn service_json(svc: &Service, now: u64) -> Value {
    json!({
        "name": svc.name.as_str(),
        "balance": svc.settings.balance,
        "live": svc.live_count(now),
    })
}

/// One node: `name`, `status` (Ready | Down), `availability`, `advertise`, `version`.
pub fn node_json(name: &NodeName, e: &NodeEntry) -> Value {
    json!({
        "name": name.as_str(),
        "status": if e.is_ready() { "Ready" } else { "Down" },
        "availability": e.availability.as_str(),
        "advertise": e.record().and_then(|r| r.advertise).map(|a| a.to_string()),
        "version": e.record().map(|r| r.version.clone()),
    })
}

/// One of the cluster's published listeners: `name`, `listen`, `protocol`, `service`,
/// `source`, `decision` (bind | shadowed | conflict), `held_by`.
pub fn published_json(p: &Published) -> Value {
    let (decision, with) = match &p.decision {
        Decision::Bind => ("bind", None),
        Decision::Shadowed { by } => ("shadowed", Some(by.as_str())),
        Decision::Conflict { with } => ("conflict", Some(with.as_str())),
    };
    json!({
        "name": p.config.name,
        "listen": p.config.listen.to_string(),
        "protocol": p.config.protocol.as_str(),
        "service": p.config.service.as_ref().map(|s| s.as_str()),
        "source": p.source.as_str(),
        "decision": decision,
        "held_by": with,
    })
}

/// Services in name order.
pub fn sorted_services(snap: &Snapshot) -> Vec<&std::sync::Arc<Service>> {
    let mut services: Vec<_> = snap.services.values().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    services
}

/// The snapshot as this node sees it (also the shape `service ps` reads).
pub fn routes_json(node: &NodeName, snap: &Snapshot, discovery: &DiscoveryStatus) -> Value {
    let now = now_ms();
    let services: Vec<_> = sorted_services(snap)
        .into_iter()
        .map(|svc| {
            let mut v = service_json(svc, now);
            v["tasks"] = svc.tasks.iter().map(|t| task_json(t, now)).collect();
            v
        })
        .collect();
    let nodes: Vec<_> = snap.nodes.iter().map(|(n, e)| node_json(n, e)).collect();
    let published: Vec<_> = snap.published.iter().map(published_json).collect();
    json!({
        "node": node.as_str(),
        "revision": snap.revision,
        "synced": discovery.synced(),
        "discovery_up": discovery.up(),
        "last_sync_age_seconds": discovery.last_sync_age_secs(),
        "services": services,
        "nodes": nodes,
        "published": published,
        "certificates": snap.acme.rows_json(crate::discovery::unix_ms() / 1000),
        "invalid": snap.invalid,
    })
}
