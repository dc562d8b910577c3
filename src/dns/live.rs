//! Which nodes the answers may name, and the per-source rate limit. Pure: no sockets, times
//! are passed in, so the rules are unit-tested.
//!
//! A node is live when its lease-bound `alive` record exists (Ready), it is not drained, it
//! has an `advertise` address, and this node's own reachability probe does not see it as
//! unreachable. Only the listeners it reports as bound are named (SRV). When that
//! leaves nobody, the last non-empty set is served instead of nothing: a node cut off from
//! etcd or from its peers should not blank the whole name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use super::answer::LiveNode;
use crate::config::NodeName;
use crate::discovery::table::NodeEntry;
use crate::health::Streak;
use crate::snapshot::Health;

/// Consecutive failed probes that make a node unreachable.
pub const UNREACHABLE_AFTER: u32 = 2;
/// Consecutive passed probes that bring it back.
pub const REACHABLE_AFTER: u32 = 1;

/// Ready, undrained nodes with an advertise address, minus those in `unreachable`, in name
/// order, each with its bound listeners.
pub fn live_nodes(
    nodes: &BTreeMap<NodeName, NodeEntry>,
    unreachable: &BTreeSet<NodeName>,
) -> Vec<LiveNode> {
    nodes
        .iter()
        .filter(|(name, e)| !unreachable.contains(*name) && !e.is_drained())
        .filter_map(|(name, e)| {
            let rec = e.alive.as_ref()?;
            Some(LiveNode {
                name: name.to_string(),
                addr: rec.advertise?,
                listeners: rec
                    .listeners
                    .iter()
                    .filter(|l| l.is_bound())
                    .cloned()
                    .collect(),
            })
        })
        .collect()
}

/// Where the probe checks a Ready node: its advertise address and the port of a published
/// listener, preferring an http one (a connect-and-close there reaches no backend; on a tcp
/// listener it opens an upstream connection). None when it publishes no address or no
/// listener (not probed, so never taken out by the probe). This node itself is never probed.
pub fn probe_targets(
    nodes: &BTreeMap<NodeName, NodeEntry>,
    self_node: &NodeName,
) -> Vec<(NodeName, SocketAddr)> {
    nodes
        .iter()
        .filter(|(name, _)| *name != self_node)
        .filter_map(|(name, e)| {
            let rec = e.alive.as_ref()?;
            let bound = || rec.listeners.iter().filter(|l| l.is_bound());
            let port = bound()
                .find(|l| l.protocol == "http")
                .or(bound().next())?
                .port;
            Some((name.clone(), SocketAddr::new(rec.advertise?, port)))
        })
        .collect()
}

/// Keeps the last non-empty live set.
#[derive(Debug, Default)]
pub struct LastKnown {
    last: Vec<LiveNode>,
}

impl LastKnown {
    /// `current` when someone is live, else the last set that had someone.
    pub fn resolve(&mut self, current: Vec<LiveNode>) -> Vec<LiveNode> {
        if current.is_empty() {
            return self.last.clone();
        }
        if current != self.last {
            self.last = current.clone();
        }
        current
    }
}

/// Probe hysteresis per node.
#[derive(Debug, Default)]
pub struct Reachability {
    streaks: HashMap<NodeName, Streak>,
    unreachable: BTreeSet<NodeName>,
}

impl Reachability {
    /// Records one probe result; returns true when the unreachable set changed.
    pub fn observe(&mut self, node: &NodeName, ok: bool) -> bool {
        // The same hysteresis as the tasks' health checks.
        let current = if self.unreachable.contains(node) {
            Health::Unhealthy
        } else {
            Health::Unknown
        };
        let streak = self.streaks.entry(node.clone()).or_default();
        match streak.step(ok, current, UNREACHABLE_AFTER, REACHABLE_AFTER) {
            Some(Health::Unhealthy) => self.unreachable.insert(node.clone()),
            Some(_) => self.unreachable.remove(node),
            None => false,
        }
    }

    /// Forgets nodes no longer probed (gone or not Ready); true when the set changed.
    pub fn retain(&mut self, probed: &BTreeSet<NodeName>) -> bool {
        self.streaks.retain(|n, _| probed.contains(n));
        let before = self.unreachable.len();
        self.unreachable.retain(|n| probed.contains(n));
        before != self.unreachable.len()
    }

    pub fn unreachable(&self) -> &BTreeSet<NodeName> {
        &self.unreachable
    }
}

/// Queries per second each source address may send, and the burst it may save up.
pub const RATE_PER_SEC: u32 = 200;
pub const RATE_BURST: u32 = 400;
/// Sources tracked at most; past that, idle ones are forgotten.
const MAX_SOURCES: usize = 10_000;

/// A token bucket per source address (UDP only: over TCP the source is not spoofable).
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    burst: u32,
    /// Tokens scaled by 1000 and the `now_ms` they were counted at.
    buckets: HashMap<IpAddr, (u64, u64)>,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Whether `src` may be answered at `now_ms`.
    pub fn allow(&mut self, src: IpAddr, now_ms: u64) -> bool {
        let full = self.burst as u64 * 1000;
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&src) {
            // Forget sources whose bucket has refilled: they are idle.
            let per_sec = self.per_sec as u64;
            self.buckets
                .retain(|_, (tokens, at)| *tokens + now_ms.saturating_sub(*at) * per_sec < full);
        }
        let (tokens, at) = self.buckets.entry(src).or_insert((full, now_ms));
        let refill = now_ms.saturating_sub(*at) * self.per_sec as u64;
        *tokens = (*tokens + refill).min(full);
        *at = now_ms;
        if *tokens >= 1000 {
            *tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::keys::{NodeRecord, PublishedListener};

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn rec(ip: Option<&str>, port: Option<u16>) -> NodeRecord {
        NodeRecord {
            advertise: ip.map(|i| i.parse().unwrap()),
            version: "x".into(),
            started: 0,
            listeners: port
                .map(|p| PublishedListener {
                    name: "l".into(),
                    port: p,
                    protocol: "tcp".into(),
                    service: "s".into(),
                    state: "bound".into(),
                    source: "config".into(),
                })
                .into_iter()
                .collect(),
        }
    }

    fn table() -> BTreeMap<NodeName, NodeEntry> {
        let mut t = BTreeMap::new();
        let alive = |ip, port| NodeEntry {
            alive: Some(rec(ip, port)),
            info: Some(rec(ip, port)),
            availability: Default::default(),
        };
        t.insert(n("a"), alive(Some("10.0.0.1"), Some(80)));
        t.insert(n("b"), alive(Some("10.0.0.2"), None));
        t.insert(n("c"), alive(None, Some(80)));
        t.insert(
            n("d"),
            NodeEntry {
                alive: None,
                info: Some(rec(Some("10.0.0.4"), Some(80))),
                availability: Default::default(),
            },
        );
        t
    }

    #[test]
    fn drained_nodes_and_unbound_listeners_are_left_out() {
        let mut t = table();
        t.get_mut(&n("b")).unwrap().availability = crate::discovery::keys::Availability::Drain;
        let mut a = t[&n("a")].clone();
        if let Some(r) = a.alive.as_mut() {
            r.listeners[0].state = "failed: address in use".into();
        }
        t.insert(n("a"), a);
        let live = live_nodes(&t, &BTreeSet::new());
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].name, "a");
        assert!(
            live[0].listeners.is_empty(),
            "a failed listener is not named"
        );
        assert!(probe_targets(&t, &n("z")).is_empty());
    }

    #[test]
    fn only_ready_nodes_with_an_address_that_are_reachable() {
        let t = table();
        let names = |v: Vec<LiveNode>| v.into_iter().map(|l| l.name).collect::<Vec<_>>();
        assert_eq!(names(live_nodes(&t, &BTreeSet::new())), ["a", "b"]);
        assert_eq!(names(live_nodes(&t, &[n("a")].into())), ["b"]);
    }

    #[test]
    fn probe_targets_skip_self_and_unprobeable_nodes() {
        let t = table();
        assert_eq!(
            probe_targets(&t, &n("b")),
            [(n("a"), "10.0.0.1:80".parse().unwrap())]
        );
        assert!(probe_targets(&t, &n("a")).is_empty());
    }

    #[test]
    fn last_known_set_when_everyone_looks_down() {
        let t = table();
        let mut lk = LastKnown::default();
        assert!(lk.resolve(Vec::new()).is_empty());
        let live = live_nodes(&t, &BTreeSet::new());
        assert_eq!(lk.resolve(live.clone()), live);
        assert_eq!(lk.resolve(Vec::new()), live);
        let fewer = live_nodes(&t, &[n("a")].into());
        assert_eq!(lk.resolve(fewer.clone()), fewer);
        assert_eq!(lk.resolve(Vec::new()), fewer);
    }

    #[test]
    fn reachability_has_hysteresis() {
        let mut r = Reachability::default();
        let a = n("a");
        assert!(!r.observe(&a, false));
        assert!(r.unreachable().is_empty());
        assert!(!r.observe(&a, true));
        assert!(!r.observe(&a, false));
        assert!(r.observe(&a, false));
        assert!(r.unreachable().contains(&a));
        assert!(!r.observe(&a, false));
        assert!(r.observe(&a, true));
        assert!(r.unreachable().is_empty());
        r.observe(&a, false);
        r.observe(&a, false);
        assert!(r.retain(&BTreeSet::new()));
        assert!(r.unreachable().is_empty());
    }

    #[test]
    fn rate_limit_per_source_with_refill() {
        let mut rl = RateLimiter::new(10, 20);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let allowed = (0..30).filter(|_| rl.allow(a, 1000)).count();
        assert_eq!(allowed, 20);
        assert!(rl.allow(b, 1000), "other sources are not affected");
        assert!(!rl.allow(a, 1050));
        assert!(rl.allow(a, 1100), "10/s refills one token per 100 ms");
        assert!(!rl.allow(a, 1100));
        let allowed = (0..30).filter(|_| rl.allow(a, 10_000)).count();
        assert_eq!(allowed, 20, "refill is capped at the burst");
    }
}
