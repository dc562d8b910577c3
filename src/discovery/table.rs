//! The routing table: the plain, mutable state that discovery's one writer keeps in step with
//! etcd (or the static config). Pure: updates take bytes, never sockets or clocks, so they are
//! unit-tested. Snapshots for the data path are built from it (`snapshot.rs`).

use std::collections::BTreeMap;

use super::keys::{Availability, Key, NodeRecord, TaskRecord};
use crate::config::{ListenerConfig, NodeName, ServiceName, TaskId, listener};

/// One change, as read from etcd.
#[derive(Debug, Clone)]
pub enum Update {
    /// A full listing at `revision`: replaces everything.
    Reset {
        revision: i64,
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// The revision a watch response brought (applied after its events).
    Revision(i64),
}

/// A key skipped because its key or value does not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

/// Liveness of a node as the records tell it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeEntry {
    /// The lease-bound record: present while the node heartbeats.
    pub alive: Option<NodeRecord>,
    /// The permanent record: lets a node that stopped heartbeating be shown as Down.
    pub info: Option<NodeRecord>,
    /// `nodes/{node}/availability` (absent = active).
    pub availability: Availability,
}

impl NodeEntry {
    pub fn is_ready(&self) -> bool {
        self.alive.is_some()
    }
    pub fn is_drained(&self) -> bool {
        self.availability == Availability::Drain
    }
    /// No record and no availability: nothing left to show.
    fn is_empty(&self) -> bool {
        self.alive.is_none() && self.info.is_none() && self.availability == Availability::Active
    }
    /// The freshest record we have.
    pub fn record(&self) -> Option<&NodeRecord> {
        self.alive.as_ref().or(self.info.as_ref())
    }
}

#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    prefix: String,
    pub revision: i64,
    pub tasks: BTreeMap<ServiceName, BTreeMap<TaskId, TaskRecord>>,
    pub nodes: BTreeMap<NodeName, NodeEntry>,
    /// Listeners published for the whole cluster (`listeners/{name}`), validated.
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// This node's config file: relative certificate paths of published listeners are
    /// resolved against its directory.
    pub config_path: std::path::PathBuf,
    /// Keys currently skipped, with why (shown by /routes).
    pub invalid: BTreeMap<String, String>,
    /// ACME records (`{prefix}/acme/...`), parsed; unsealed when the snapshot is built.
    pub acme: crate::acme::store::AcmeTable,
}

impl RoutingTable {
    pub fn new(prefix: &str) -> RoutingTable {
        RoutingTable {
            prefix: prefix.to_string(),
            ..Default::default()
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Applies one update; returns the keys newly found invalid (to be logged and counted).
    pub fn apply(&mut self, update: Update) -> Vec<Invalid> {
        let mut found = Vec::new();
        match update {
            Update::Reset { revision, kvs } => {
                let mut fresh = RoutingTable::new(&self.prefix);
                fresh.config_path = self.config_path.clone();
                let previous = std::mem::replace(self, fresh);
                for (key, value) in kvs {
                    self.put(&key, &value, Some(&previous), &mut found);
                }
                self.revision = revision;
            }
            Update::Put { key, value } => self.put(&key, &value, None, &mut found),
            Update::Delete { key } => self.delete(&key),
            Update::Revision(r) => self.revision = self.revision.max(r),
        }
        found
    }

    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        previous: Option<&RoutingTable>,
        found: &mut Vec<Invalid>,
    ) {
        let key_text = String::from_utf8_lossy(key).into_owned();
        let parsed = match Key::parse(&self.prefix, key) {
            None => return,
            Some(Err(e)) => {
                self.invalid.insert(key_text.clone(), e.to_string());
                found.push(Invalid {
                    key: key_text,
                    reason: e.to_string(),
                });
                return;
            }
            Some(Ok(k)) => k,
        };
        // A bad value keeps the last valid record of that key, if there was one: a typo in an
        // update must not take a working task out of routing.
        let mut invalid = |reason: String| {
            found.push(Invalid {
                key: key_text.clone(),
                reason: reason.clone(),
            });
            reason
        };
        match parsed {
            Key::Task(service, id) => match TaskRecord::parse(value) {
                Ok(record) => {
                    self.invalid.remove(&key_text);
                    self.tasks.entry(service).or_default().insert(id, record);
                }
                Err(e) => {
                    let reason = invalid(e.to_string());
                    self.invalid.insert(key_text.clone(), reason);
                    if let Some(prev) = previous
                        .and_then(|p| p.tasks.get(&service))
                        .and_then(|s| s.get(&id))
                    {
                        self.tasks
                            .entry(service)
                            .or_default()
                            .insert(id, prev.clone());
                    }
                }
            },
            Key::NodeAvailability(node) => {
                let availability = match Availability::parse(value) {
                    Ok(a) => {
                        self.invalid.remove(&key_text);
                        a
                    }
                    Err(e) => {
                        let reason = invalid(e.to_string());
                        self.invalid.insert(key_text.clone(), reason);
                        previous
                            .and_then(|p| p.nodes.get(&node))
                            .map(|n| n.availability)
                            .unwrap_or_default()
                    }
                };
                self.nodes.entry(node).or_default().availability = availability;
            }
            Key::Listener(name) => match listener::from_json(&key_text, value, &self.config_path) {
                Ok(listener) => {
                    self.invalid.remove(&key_text);
                    self.listeners.insert(name, listener);
                }
                Err(e) => {
                    let reason = invalid(e.problems.join("; "));
                    self.invalid.insert(key_text.clone(), reason);
                    if let Some(prev) = previous.and_then(|p| p.listeners.get(&name)) {
                        self.listeners.insert(name, prev.clone());
                    }
                }
            },
            Key::Acme(k) => match self.acme.put(k.clone(), value) {
                Ok(()) => {
                    self.invalid.remove(&key_text);
                }
                Err(e) => {
                    let reason = invalid(e);
                    self.invalid.insert(key_text.clone(), reason);
                    // A full listing keeps the last good record of that key.
                    if let Some(p) = previous {
                        self.acme.restore_from(&p.acme, &k);
                    }
                }
            },
            Key::NodeAlive(node) | Key::NodeInfo(node) => {
                let alive = matches!(Key::parse(&self.prefix, key), Some(Ok(Key::NodeAlive(_))));
                let record = match NodeRecord::parse(value) {
                    Ok(r) => {
                        self.invalid.remove(&key_text);
                        Some(r)
                    }
                    Err(e) => {
                        let reason = invalid(e.to_string());
                        self.invalid.insert(key_text.clone(), reason);
                        // Liveness is the key's existence: keep it, with the last good
                        // record or an empty one.
                        let prev = previous.and_then(|p| p.nodes.get(&node)).and_then(|n| {
                            if alive {
                                n.alive.clone()
                            } else {
                                n.info.clone()
                            }
                        });
                        Some(prev.unwrap_or_default())
                    }
                };
                let entry = self.nodes.entry(node).or_default();
                if alive {
                    entry.alive = record;
                } else {
                    entry.info = record;
                }
            }
        }
    }

    fn delete(&mut self, key: &[u8]) {
        let key_text = String::from_utf8_lossy(key).into_owned();
        self.invalid.remove(&key_text);
        match Key::parse(&self.prefix, key) {
            Some(Ok(Key::Task(service, id))) => {
                if let Some(tasks) = self.tasks.get_mut(&service) {
                    tasks.remove(&id);
                    if tasks.is_empty() {
                        self.tasks.remove(&service);
                    }
                }
            }
            Some(Ok(Key::NodeAlive(node))) => self.edit_node(&node, |n| n.alive = None),
            Some(Ok(Key::NodeInfo(node))) => self.edit_node(&node, |n| n.info = None),
            Some(Ok(Key::NodeAvailability(node))) => {
                self.edit_node(&node, |n| n.availability = Availability::Active)
            }
            Some(Ok(Key::Listener(name))) => {
                self.listeners.remove(&name);
            }
            Some(Ok(Key::Acme(k))) => self.acme.delete(k),
            _ => {}
        }
    }

    /// Whether tasks hosted on `node` may be routed to: a node we know of (it has records)
    /// must be Ready; a node name we have never seen (an orchestrator's label for a host
    /// that runs no daemon) does not take its tasks out.
    pub fn node_allows(&self, node: Option<&NodeName>) -> bool {
        match node {
            None => true,
            Some(n) => self.nodes.get(n).is_none_or(|e| e.is_ready()),
        }
    }

    /// Whether the task's node is drained (no new connections for its tasks).
    pub fn node_drained(&self, node: Option<&NodeName>) -> bool {
        node.and_then(|n| self.nodes.get(n))
            .is_some_and(NodeEntry::is_drained)
    }

    fn edit_node(&mut self, node: &NodeName, f: impl FnOnce(&mut NodeEntry)) {
        if let Some(n) = self.nodes.get_mut(node) {
            f(n);
            if n.is_empty() {
                self.nodes.remove(node);
            }
        }
    }
}

/// Test tables: what a full read under `/rm` gives, from `(key, value)` text pairs.
#[cfg(test)]
impl RoutingTable {
    pub fn of_entries(revision: i64, entries: &[(&str, &str)]) -> Self {
        let mut t = RoutingTable::new("/rm");
        t.apply(Update::Reset {
            revision,
            kvs: entries
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        });
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/rm";

    fn put(t: &mut RoutingTable, k: &str, v: &str) -> Vec<Invalid> {
        t.apply(Update::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        })
    }

    fn svc(n: &str) -> ServiceName {
        ServiceName::new(n).unwrap()
    }

    #[test]
    fn put_and_delete_tasks() {
        let mut t = RoutingTable::new(P);
        assert!(put(&mut t, "/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1"}"#).is_empty());
        put(&mut t, "/rm/tasks/web/b", r#"{"addr":"127.0.0.1:2"}"#);
        assert_eq!(t.tasks[&svc("web")].len(), 2);
        t.apply(Update::Delete {
            key: b"/rm/tasks/web/a".to_vec(),
        });
        assert_eq!(t.tasks[&svc("web")].len(), 1);
        t.apply(Update::Delete {
            key: b"/rm/tasks/web/b".to_vec(),
        });
        assert!(!t.tasks.contains_key(&svc("web")));
    }

    #[test]
    fn malformed_values_are_skipped_and_named() {
        let mut t = RoutingTable::new(P);
        put(&mut t, "/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1"}"#);
        let bad = put(&mut t, "/rm/tasks/web/b", "{nope");
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, "/rm/tasks/web/b");
        assert_eq!(t.tasks[&svc("web")].len(), 1, "other tasks stay");
        // A bad update of a good key keeps the last good record, then a good one fixes it.
        let bad = put(&mut t, "/rm/tasks/web/a", r#"{"addr":"x"}"#);
        assert_eq!(bad.len(), 1);
        assert!(t.tasks[&svc("web")].contains_key(&TaskId::new("a").unwrap()));
        assert!(t.invalid.contains_key("/rm/tasks/web/a"));
        put(&mut t, "/rm/tasks/web/a", r#"{"addr":"127.0.0.1:9"}"#);
        assert!(!t.invalid.contains_key("/rm/tasks/web/a"));
        let bad = put(&mut t, "/rm/tasks/only-two-parts", "{}");
        assert_eq!(bad.len(), 1);
    }

    #[test]
    fn reset_replaces_everything_and_keeps_last_good() {
        let mut t = RoutingTable::new(P);
        put(&mut t, "/rm/tasks/web/a", r#"{"addr":"127.0.0.1:1"}"#);
        put(&mut t, "/rm/tasks/old/z", r#"{"addr":"127.0.0.1:3"}"#);
        t.apply(Update::Reset {
            revision: 42,
            kvs: vec![
                (b"/rm/tasks/web/a".to_vec(), b"garbage".to_vec()),
                (
                    b"/rm/tasks/web/c".to_vec(),
                    br#"{"addr":"127.0.0.1:4"}"#.to_vec(),
                ),
            ],
        });
        assert_eq!(t.revision, 42);
        assert!(!t.tasks.contains_key(&svc("old")));
        assert_eq!(t.tasks[&svc("web")].len(), 2);
    }

    #[test]
    fn node_liveness() {
        let mut t = RoutingTable::new(P);
        let n2 = NodeName::new("n2").unwrap();
        assert!(t.node_allows(Some(&n2)), "unknown nodes do not block");
        put(&mut t, "/rm/nodes/n2/info", r#"{"version":"1"}"#);
        assert!(!t.node_allows(Some(&n2)), "info without alive = Down");
        put(&mut t, "/rm/nodes/n2/alive", r#"{"version":"1"}"#);
        assert!(t.node_allows(Some(&n2)));
        t.apply(Update::Delete {
            key: b"/rm/nodes/n2/alive".to_vec(),
        });
        assert!(!t.node_allows(Some(&n2)));
        assert!(!t.nodes[&n2].is_ready());
        // A malformed alive record still means alive.
        put(&mut t, "/rm/nodes/n2/alive", "}}");
        assert!(t.node_allows(Some(&n2)));
    }
}
