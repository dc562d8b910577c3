//! The routing snapshot: an immutable view of services, tasks and nodes, built by discovery's
//! one writer and published in one `ArcSwap`. Readers (listeners) load it, clone the
//! `Arc<Service>` they need and drop the guard before any await; picking touches atomics only.
//!
//! Per-task runtime state (in-flight count, ejection, health, latency) lives in `TaskState`,
//! which is carried over from one snapshot to the next while the task keeps its address, so
//! counters and health survive rebuilds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use crate::balance::Selector;
use crate::config::{NodeName, ServiceName, ServiceSettings, TaskId};
use crate::discovery::published::{self, Published};
use crate::discovery::table::{NodeEntry, RoutingTable};

/// Where readers find the current snapshot.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Active health as the checker last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not checked yet: routable.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

/// Runtime state of one task, shared across snapshots and by every connection.
#[derive(Debug, Default)]
pub struct TaskState {
    in_flight: AtomicU32,
    /// `now_ms()` until which this node avoids the task after a failure (0 = not ejected).
    ejected_until: AtomicU64,
    /// Consecutive passive failures; grows the ejection time.
    ejections: AtomicU32,
    health: AtomicU8,
    /// Peak-EWMA of response latency in microseconds (0 = no sample yet).
    latency_ewma_us: AtomicU64,
    /// Connections or requests sent to this task since it appeared (the status page derives
    /// a rate from it).
    attempts: AtomicU64,
    /// Passive failures (failed connects, resets before any response) since it appeared.
    failures: AtomicU64,
    /// UDP sessions open on this task now (src/proxy/udp/; /routes shows it).
    udp_sessions: AtomicU32,
    /// Connections opened to this task that it has not answered yet (`max_pending_connects`).
    unanswered: AtomicU32,
    /// Woken when one of those is answered (or given up on).
    answered: tokio::sync::Notify,
    /// Why the last check or connect failed (shown by /routes and the status page). Swapped,
    /// not locked: readers never wait on the data path's writes.
    last_error: ArcSwapOption<String>,
}

/// Decrements the in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<TaskState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection to a task still waiting for the task's first answer; frees its place in
/// the task's `max_pending_connects` when dropped.
#[derive(Debug)]
pub struct Unanswered(Arc<TaskState>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.unanswered.fetch_sub(1, Ordering::AcqRel);
        self.0.answered.notify_one();
    }
}

/// One open UDP session on a task: counted in the task's in-flight count (so `least_conn`
/// balances open sessions) and in its session count for as long as it lives.
#[derive(Debug)]
pub struct UdpSessionCount(InFlight);

impl Drop for UdpSessionCount {
    fn drop(&mut self) {
        (self.0).0.udp_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Base and cap of the passive ejection time; it doubles with each consecutive ejection.
pub const EJECT_BASE: Duration = Duration::from_secs(2);
pub const EJECT_MAX: Duration = Duration::from_secs(30);

impl TaskState {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a connection or request against this task until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.attempts.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A place among the at most `limit` connections to this task that await its first
    /// answer, waiting for one to free up for at most `wait` (then the place is taken
    /// anyway: pacing is a courtesy to the task, never a reason to fail a client).
    pub async fn unanswered_place(self: &Arc<Self>, limit: u32, wait: Duration) -> Unanswered {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.answered.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let now = self.unanswered.load(Ordering::Acquire);
            if now < limit
                && self
                    .unanswered
                    .compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Unanswered(self.clone());
            }
            if now < limit {
                continue; // another connection took it between the load and the exchange
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.unanswered.fetch_add(1, Ordering::AcqRel);
                return Unanswered(self.clone());
            }
        }
    }

    /// Connections to this task waiting for its first answer now.
    pub fn unanswered(&self) -> u32 {
        self.unanswered.load(Ordering::Relaxed)
    }

    /// Counts a UDP session on this task (and in flight) until the guard drops.
    pub fn open_udp_session(self: &Arc<Self>) -> UdpSessionCount {
        self.udp_sessions.fetch_add(1, Ordering::Relaxed);
        UdpSessionCount(self.begin())
    }

    /// UDP sessions open on this task now.
    pub fn udp_sessions(&self) -> u32 {
        self.udp_sessions.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Passive failure: avoid this task for a time that grows with repeated failures.
    pub fn eject(&self, now: u64, reason: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(4);
        let dur = (EJECT_BASE * 2u32.pow(n)).min(EJECT_MAX);
        self.ejected_until
            .store(now + dur.as_millis() as u64, Ordering::Relaxed);
        self.set_error(Some(reason));
    }

    /// A success (connect or passing check): forget passive failures.
    pub fn succeed(&self) {
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }

    pub fn latency_ewma_us(&self) -> u64 {
        self.latency_ewma_us.load(Ordering::Relaxed)
    }

    /// Peak EWMA: a slower sample takes over at once, faster ones decay it (weight 1/8).
    pub fn observe_latency_us(&self, sample: u64) {
        let cur = self.latency_ewma_us.load(Ordering::Relaxed);
        let next = if cur == 0 || sample > cur {
            sample
        } else {
            cur - cur / 8 + sample / 8
        };
        self.latency_ewma_us.store(next.max(1), Ordering::Relaxed);
    }

    pub fn set_error(&self, e: Option<String>) {
        self.last_error.store(e.map(Arc::new));
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.load_full().map(|e| (*e).clone())
    }

    /// Connections or requests begun (see [`TaskState::begin`]).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Passive failures counted by [`TaskState::eject`].
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// One task as this snapshot sees it.
#[derive(Debug)]
pub struct Task {
    pub id: TaskId,
    pub addr: SocketAddr,
    pub node: Option<NodeName>,
    pub weight: u32,
    /// False when the task's node is Down: out of routing on every node.
    pub node_ready: bool,
    /// True when the task's node is drained: no new connections from any node.
    pub node_drained: bool,
    pub state: Arc<TaskState>,
}

/// Why a task is or is not routable, for /routes, `service ps` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Healthy = 0,
    Unhealthy = 1,
    Ejected = 2,
    NodeDown = 3,
    Drained = 4,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Healthy => "healthy",
            TaskStatus::Unhealthy => "unhealthy",
            TaskStatus::Ejected => "ejected",
            TaskStatus::NodeDown => "node down",
            TaskStatus::Drained => "drained",
        }
    }

    /// The `state` label of `routemesh_tasks` (no spaces).
    pub fn metric_label(self) -> &'static str {
        match self {
            TaskStatus::NodeDown => "node_down",
            other => other.as_str(),
        }
    }
}

impl Task {
    fn same_definition(&self, addr: SocketAddr, node: &Option<NodeName>, weight: u32) -> bool {
        self.addr == addr && &self.node == node && self.weight == weight
    }

    /// Whether new connections may go to it at all (health and ejection aside).
    pub fn is_candidate(&self) -> bool {
        self.node_ready && !self.node_drained && self.weight > 0
    }

    pub fn status(&self, now: u64) -> TaskStatus {
        if !self.node_ready {
            TaskStatus::NodeDown
        } else if self.weight == 0 || self.node_drained {
            TaskStatus::Drained
        } else if self.state.health() == Health::Unhealthy {
            TaskStatus::Unhealthy
        } else if self.state.is_ejected(now) {
            TaskStatus::Ejected
        } else {
            TaskStatus::Healthy
        }
    }
}

/// A service with its tasks and the selector built for them.
#[derive(Debug)]
pub struct Service {
    pub name: ServiceName,
    pub settings: ServiceSettings,
    /// Every task registered, routable or not, ordered by id.
    pub tasks: Vec<Arc<Task>>,
    pub selector: Selector,
}

impl Service {
    pub fn build(name: ServiceName, settings: ServiceSettings, tasks: Vec<Arc<Task>>) -> Service {
        let candidates = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.is_candidate())
            .map(|(i, _)| i)
            .collect();
        let selector = Selector::build(settings.balance, &tasks, candidates);
        Service {
            name,
            settings,
            tasks,
            selector,
        }
    }

    /// Picks a task not in `tried`: first among healthy, non-ejected tasks; when none is
    /// left, among those that are only passively ejected (fail open: passive evidence alone
    /// never takes the last tasks out). Actively unhealthy tasks are never picked.
    /// `hash` is the connection's or request's key hash for consistent hashing.
    pub fn pick(&self, tried: &[usize], now: u64, hash: Option<u64>) -> Option<usize> {
        let base = |i: usize| -> bool {
            !tried.contains(&i) && self.tasks[i].state.health() != Health::Unhealthy
        };
        self.selector
            .pick(&self.tasks, hash, &|i| {
                base(i) && !self.tasks[i].state.is_ejected(now)
            })
            .or_else(|| self.selector.pick(&self.tasks, hash, &base))
    }

    /// Tasks that would be picked now (healthy and not ejected).
    pub fn live_count(&self, now: u64) -> usize {
        self.selector
            .candidates()
            .iter()
            .filter(|&&i| self.tasks[i].status(now) == TaskStatus::Healthy)
            .count()
    }
}

/// The immutable routing state every reader sees.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// etcd revision this snapshot reflects (0 for static or before the first sync).
    pub revision: i64,
    /// Whether discovery has synced at least once.
    pub synced: bool,
    pub services: HashMap<ServiceName, Arc<Service>>,
    pub nodes: BTreeMap<NodeName, NodeEntry>,
    /// The cluster's published listeners (etcd and task-requested), in name order, with the
    /// cluster-wide decision about each; every node reconciles its listeners against these.
    pub published: Arc<Vec<Published>>,
    /// Keys skipped as malformed, with why.
    pub invalid: BTreeMap<String, String>,
    /// ACME certificates, challenge answers and order state (`acme::served`); set by
    /// `Publisher::publish` after [`Snapshot::build`].
    pub acme: Arc<crate::acme::served::AcmeSnapshot>,
}

impl Snapshot {
    pub fn service(&self, name: &ServiceName) -> Option<Arc<Service>> {
        self.services.get(name).cloned()
    }

    /// Builds the next snapshot from `table`, reusing the previous one's task states (and
    /// whole services when nothing in them changed).
    pub fn build(
        table: &RoutingTable,
        settings: &BTreeMap<ServiceName, ServiceSettings>,
        prev: &Snapshot,
    ) -> Snapshot {
        let mut services = HashMap::new();
        let names = table.tasks.keys().chain(settings.keys());
        for name in names {
            if services.contains_key(name) {
                continue;
            }
            let svc_settings = settings.get(name).cloned().unwrap_or_default();
            let prev_svc = prev.services.get(name);
            let mut tasks = Vec::new();
            let mut all_same = prev_svc.is_some_and(|p| p.settings == svc_settings);
            let records = table.tasks.get(name);
            for (id, rec) in records.into_iter().flatten() {
                let node_ready = table.node_allows(rec.node.as_ref());
                let node_drained = table.node_drained(rec.node.as_ref());
                let prev_task = prev_svc.and_then(|p| {
                    p.tasks
                        .binary_search_by(|t| t.id.cmp(id))
                        .ok()
                        .map(|i| &p.tasks[i])
                });
                match prev_task {
                    Some(t)
                        if t.same_definition(rec.addr, &rec.node, rec.weight)
                            && t.node_ready == node_ready
                            && t.node_drained == node_drained =>
                    {
                        tasks.push(t.clone())
                    }
                    _ => {
                        all_same = false;
                        let state = prev_task
                            .filter(|t| t.addr == rec.addr)
                            .map(|t| t.state.clone())
                            .unwrap_or_default();
                        tasks.push(Arc::new(Task {
                            id: id.clone(),
                            addr: rec.addr,
                            node: rec.node.clone(),
                            weight: rec.weight,
                            node_ready,
                            node_drained,
                            state,
                        }));
                    }
                }
            }
            let svc = match prev_svc {
                Some(p) if all_same && p.tasks.len() == tasks.len() => p.clone(),
                _ => Arc::new(Service::build(name.clone(), svc_settings, tasks)),
            };
            services.insert(name.clone(), svc);
        }
        // Reuse the previous list when nothing about the published listeners changed, so the
        // app's reconcile can skip work by pointer comparison.
        let next = published::published(table);
        let published = if *prev.published == next {
            prev.published.clone()
        } else {
            Arc::new(next)
        };
        Snapshot {
            revision: table.revision,
            synced: true,
            services,
            nodes: table.nodes.clone(),
            published,
            invalid: table.invalid.clone(),
            acme: prev.acme.clone(),
        }
    }
}

/// A task for unit tests of the balancers.
#[cfg(test)]
pub(crate) fn test_task(i: usize, weight: u32) -> Arc<Task> {
    Arc::new(Task {
        id: TaskId::new(&format!("t{i}")).unwrap(),
        addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
        node: None,
        weight,
        node_ready: true,
        node_drained: false,
        state: Arc::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::table::Update;
    use crate::util::clock::now_ms;

    fn table(entries: &[(&str, &str)]) -> RoutingTable {
        RoutingTable::of_entries(7, entries)
    }

    fn web() -> ServiceName {
        ServiceName::new("web").unwrap()
    }

    #[test]
    fn unchanged_services_are_reused_and_state_survives() {
        let t1 = table(&[
            ("/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1"}"#),
            ("/rm/tasks/db/x", r#"{"addr":"127.0.0.1:5"}"#),
        ]);
        let s1 = Snapshot::build(&t1, &BTreeMap::new(), &Snapshot::default());
        let web1 = s1.service(&web()).unwrap();
        let _g = web1.tasks[0].state.begin();
        let t2 = table(&[
            ("/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1"}"#),
            ("/rm/tasks/db/x", r#"{"addr":"127.0.0.1:6"}"#),
        ]);
        let s2 = Snapshot::build(&t2, &BTreeMap::new(), &s1);
        assert!(Arc::ptr_eq(&web1, &s2.service(&web()).unwrap()));
        let db = ServiceName::new("db").unwrap();
        assert!(!Arc::ptr_eq(
            &s1.service(&db).unwrap(),
            &s2.service(&db).unwrap()
        ));
        assert_eq!(s2.service(&web()).unwrap().tasks[0].state.in_flight(), 1);
    }

    #[test]
    fn node_down_tasks_are_not_picked() {
        let t = table(&[
            ("/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1","node":"n1"}"#),
            ("/rm/tasks/web/b", r#"{"addr":"127.0.0.1:2","node":"n2"}"#),
            ("/rm/nodes/n1/info", "{}"),
            ("/rm/nodes/n1/alive", "{}"),
            ("/rm/nodes/n2/info", "{}"),
        ]);
        let s = Snapshot::build(&t, &BTreeMap::new(), &Snapshot::default());
        let svc = s.service(&web()).unwrap();
        for _ in 0..10 {
            assert_eq!(svc.pick(&[], now_ms(), None), Some(0));
        }
        assert_eq!(svc.tasks[1].status(now_ms()), TaskStatus::NodeDown);
        assert_eq!(svc.live_count(now_ms()), 1);
    }

    #[test]
    fn tasks_of_a_drained_node_get_nothing_new() {
        let mut entries = vec![
            ("/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1","node":"n1"}"#),
            ("/rm/tasks/web/b", r#"{"addr":"127.0.0.1:2","node":"n2"}"#),
            ("/rm/nodes/n1/alive", "{}"),
            ("/rm/nodes/n2/alive", "{}"),
            ("/rm/nodes/n2/availability", "drain"),
        ];
        let s = Snapshot::build(&table(&entries), &BTreeMap::new(), &Snapshot::default());
        let svc = s.service(&web()).unwrap();
        for _ in 0..10 {
            assert_eq!(svc.pick(&[], now_ms(), None), Some(0));
        }
        assert_eq!(svc.tasks[1].status(now_ms()), TaskStatus::Drained);
        let kept = svc.tasks[1].state.clone();
        // Back to active: routable again, with its runtime state kept.
        entries[4] = ("/rm/nodes/n2/availability", "\"active\"");
        let s2 = Snapshot::build(&table(&entries), &BTreeMap::new(), &s);
        let svc2 = s2.service(&web()).unwrap();
        assert_eq!(svc2.tasks[1].status(now_ms()), TaskStatus::Healthy);
        assert!(Arc::ptr_eq(&kept, &svc2.tasks[1].state));
    }

    #[test]
    fn ejected_tasks_are_avoided_but_fail_open() {
        let t = table(&[
            ("/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1"}"#),
            ("/rm/tasks/web/b", r#"{"addr":"127.0.0.1:2"}"#),
        ]);
        let s = Snapshot::build(&t, &BTreeMap::new(), &Snapshot::default());
        let svc = s.service(&web()).unwrap();
        let now = now_ms();
        svc.tasks[0].state.eject(now, "refused".into());
        for _ in 0..10 {
            assert_eq!(svc.pick(&[], now, None), Some(1));
        }
        // Every other task tried: the ejected one is still offered (fail open).
        assert_eq!(svc.pick(&[1], now, None), Some(0));
        assert_eq!(svc.pick(&[0, 1], now, None), None);
        svc.tasks[1].state.set_health(Health::Unhealthy);
        assert_eq!(svc.pick(&[], now, None), Some(0));
    }

    #[test]
    fn ejection_grows_and_resets() {
        let st = TaskState::default();
        st.eject(1000, "x".into());
        let first = st.ejected_until.load(Ordering::Relaxed) - 1000;
        st.eject(1000, "x".into());
        let second = st.ejected_until.load(Ordering::Relaxed) - 1000;
        assert!(second > first);
        st.succeed();
        assert!(!st.is_ejected(1001));
    }

    #[test]
    fn build_is_fast_enough_for_large_tables() {
        // Functional check only (timing lives in benches/): 1,000 services × 10 tasks build.
        let mut kvs = Vec::new();
        for s in 0..1000 {
            for t in 0..10 {
                kvs.push((
                    format!("/rm/tasks/s{s}/t{t}").into_bytes(),
                    format!(r#"{{"addr":"127.0.0.1:{}"}}"#, 1000 + t).into_bytes(),
                ));
            }
        }
        let mut table = RoutingTable::new("/rm");
        table.apply(Update::Reset { revision: 1, kvs });
        let s = Snapshot::build(&table, &BTreeMap::new(), &Snapshot::default());
        assert_eq!(s.services.len(), 1000);
    }
}
