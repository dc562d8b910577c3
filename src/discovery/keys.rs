//! The etcd key schema (a contract: orchestrators and scripts write these keys directly).
//!
//! ```text
//! {prefix}/tasks/{service}/{task_id}  {"addr":"IP:PORT","node":"NAME","weight":1}   any writer
//! {prefix}/nodes/{node}/alive         {"advertise":..,"version":..,"started":..}      node lease
//! {prefix}/nodes/{node}/info          {"advertise":..,"version":..,"listeners":[..]}  permanent
//! {prefix}/nodes/{node}/availability  active | drain                                  permanent
//! {prefix}/listeners/{name}           {"listen":"0.0.0.0:80","protocol":"http",..}   any writer
//! {prefix}/acme/...                   ACME account, certificates, challenges, locks   see acme::store
//! ```
//! A node is Ready while its `alive` key exists and Down when only `info` remains; a drained
//! node's tasks get no new connections. A published listener has the keys of a TOML
//! `[[listener]]` (validated by the same code, in `config`); every node binds it. Pure: no
//! IO, no clock.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::config::{NodeName, PublishSpec, ServiceName, TaskId};

/// What a key under the prefix names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Task(ServiceName, TaskId),
    NodeAlive(NodeName),
    NodeInfo(NodeName),
    NodeAvailability(NodeName),
    /// `{prefix}/listeners/{name}`: a listener published for the whole cluster.
    Listener(String),
    /// `{prefix}/acme/...`: ACME account, certificates, status, challenges, locks
    /// (`crate::acme::store`).
    Acme(crate::acme::store::AcmeKey),
}

/// A key under the prefix that does not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid UTF-8")]
    NotUtf8,
    #[error(
        "unrecognised key layout (expected tasks/SERVICE/ID, nodes/NAME/alive|info|availability or listeners/NAME)"
    )]
    Layout,
    #[error("listener name {0:?} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    ListenerName(String),
    #[error("{0}")]
    Name(#[from] crate::config::NameError),
    #[error("{0}")]
    Acme(String),
}

/// A value that does not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("value is not valid JSON for this key: {0}")]
    Json(String),
    #[error("`addr` {0:?} is not an IP:PORT address")]
    Addr(String),
    #[error("`node`: {0}")]
    Node(crate::config::NameError),
    #[error("`weight` {0} is out of range 0..=1000")]
    Weight(u64),
    #[error("`publish`: {0}")]
    Publish(String),
    #[error("availability {0:?}: use active or drain")]
    Availability(String),
    #[error("{0}")]
    Listener(String),
}

pub fn tasks_prefix(prefix: &str) -> String {
    format!("{prefix}/tasks/")
}

pub fn service_prefix(prefix: &str, service: &ServiceName) -> String {
    format!("{prefix}/tasks/{service}/")
}

pub fn task_key(prefix: &str, service: &ServiceName, id: &TaskId) -> String {
    format!("{prefix}/tasks/{service}/{id}")
}

pub fn node_alive_key(prefix: &str, node: &NodeName) -> String {
    format!("{prefix}/nodes/{node}/alive")
}

pub fn node_info_key(prefix: &str, node: &NodeName) -> String {
    format!("{prefix}/nodes/{node}/info")
}

pub fn node_availability_key(prefix: &str, node: &NodeName) -> String {
    format!("{prefix}/nodes/{node}/availability")
}

pub fn listeners_prefix(prefix: &str) -> String {
    format!("{prefix}/listeners/")
}

pub fn listener_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/listeners/{name}")
}

/// A listener name as TOML allows it (`listener.name`): 1-64 characters from
/// `[A-Za-z0-9._-]`.
pub fn valid_listener_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Everything discovery watches.
pub fn watch_prefix(prefix: &str) -> String {
    format!("{prefix}/")
}

impl Key {
    /// Classifies `key` (raw bytes from etcd). `None` when it is outside `{prefix}/`.
    pub fn parse(prefix: &str, key: &[u8]) -> Option<Result<Key, KeyError>> {
        let root = watch_prefix(prefix);
        let rest = key.strip_prefix(root.as_bytes())?;
        let Ok(rest) = std::str::from_utf8(rest) else {
            return Some(Err(KeyError::NotUtf8));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        Some(match parts.as_slice() {
            ["tasks", service, id] => ServiceName::new(service)
                .and_then(|s| Ok(Key::Task(s, TaskId::new(id)?)))
                .map_err(KeyError::from),
            ["nodes", node, "alive"] => NodeName::new(node)
                .map(Key::NodeAlive)
                .map_err(KeyError::from),
            ["nodes", node, "info"] => NodeName::new(node)
                .map(Key::NodeInfo)
                .map_err(KeyError::from),
            ["nodes", node, "availability"] => NodeName::new(node)
                .map(Key::NodeAvailability)
                .map_err(KeyError::from),
            ["listeners", name] if valid_listener_name(name) => Ok(Key::Listener(name.to_string())),
            ["listeners", name] => Err(KeyError::ListenerName(name.to_string())),
            ["acme", ..] => crate::acme::store::AcmeKey::parse(&rest["acme/".len()..])
                .map(Key::Acme)
                .map_err(KeyError::Acme),
            _ => Err(KeyError::Layout),
        })
    }
}

/// `{prefix}/tasks/{service}/{id}`: where a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub addr: SocketAddr,
    /// The node that hosts it; when that node is Down the task is out of routing.
    pub node: Option<NodeName>,
    pub weight: u32,
    /// Ports every node publishes for this task's service while a task asks for them.
    pub publish: Vec<PublishSpec>,
}

#[derive(Serialize, Deserialize)]
struct TaskWire {
    addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    publish: Vec<String>,
}

impl TaskRecord {
    pub fn parse(value: &[u8]) -> Result<TaskRecord, ValueError> {
        let wire: TaskWire =
            serde_json::from_slice(value).map_err(|e| ValueError::Json(e.to_string()))?;
        let addr = wire
            .addr
            .trim()
            .parse::<SocketAddr>()
            .map_err(|_| ValueError::Addr(wire.addr.clone()))?;
        let node = match wire.node.as_deref() {
            None | Some("") => None,
            Some(n) => Some(NodeName::new(n).map_err(ValueError::Node)?),
        };
        let weight = match wire.weight {
            None => 1,
            Some(w) if w <= 1000 => w as u32,
            Some(w) => return Err(ValueError::Weight(w)),
        };
        let mut publish = wire
            .publish
            .iter()
            .map(|p| PublishSpec::parse(p).map_err(ValueError::Publish))
            .collect::<Result<Vec<_>, _>>()?;
        publish.sort();
        publish.dedup();
        Ok(TaskRecord {
            addr,
            node,
            weight,
            publish,
        })
    }

    pub fn to_json(&self) -> String {
        let wire = TaskWire {
            addr: self.addr.to_string(),
            node: self.node.as_ref().map(|n| n.to_string()),
            weight: (self.weight != 1).then_some(self.weight as u64),
            publish: self.publish.iter().map(|p| p.to_string()).collect(),
        };
        serde_json::to_string(&wire).expect("plain struct serializes")
    }
}

/// A listener as published in the node's records (for `node ls`, `publish ls|ps` and DNS SRV
/// answers): every listener this node serves, from its TOML file or from the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedListener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub service: String,
    /// `bound` | `shadowed` | `conflict` | `failed: REASON` | `refused: REASON` (absent in
    /// records of older daemons: bound).
    #[serde(default = "bound")]
    pub state: String,
    /// Where the listener comes from: `config` (this node's TOML), `etcd` or `tasks`.
    #[serde(default = "from_config")]
    pub source: String,
}

fn bound() -> String {
    "bound".into()
}
fn is_bound(s: &str) -> bool {
    s == "bound"
}
fn from_config() -> String {
    "config".into()
}

impl PublishedListener {
    /// A listener of this node's TOML, as its records report it once bound.
    pub fn from_config(l: &crate::config::ListenerConfig) -> PublishedListener {
        PublishedListener {
            name: l.name.clone(),
            port: l.listen.port(),
            protocol: l.protocol.as_str().to_string(),
            // The default service; "" for an http/tls listener without one (DNS SRV answers
            // `_SERVICE._tcp` from this field, so such listeners get none).
            service: l
                .service
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            state: bound(),
            source: from_config(),
        }
    }

    pub fn is_bound(&self) -> bool {
        is_bound(&self.state)
    }
}

/// `{prefix}/nodes/{node}/availability`: whether a node takes new connections for its tasks
/// (absent = active). A drained node keeps serving what reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    #[default]
    Active,
    Drain,
}

impl Availability {
    /// `active` or `drain`, bare or as a JSON string.
    pub fn parse(value: &[u8]) -> Result<Availability, ValueError> {
        let text = String::from_utf8_lossy(value);
        match text.trim().trim_matches('"').trim() {
            "active" => Ok(Availability::Active),
            "drain" => Ok(Availability::Drain),
            other => Err(ValueError::Availability(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Drain => "drain",
        }
    }
}

/// The node records (`alive` and `info` share one shape).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<IpAddr>,
    #[serde(default)]
    pub version: String,
    /// Unix seconds when the daemon started.
    #[serde(default)]
    pub started: u64,
    #[serde(default)]
    pub listeners: Vec<PublishedListener>,
}

impl NodeRecord {
    pub fn parse(value: &[u8]) -> Result<NodeRecord, ValueError> {
        serde_json::from_slice(value).map_err(|e| ValueError::Json(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain struct serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let s = ServiceName::new("web").unwrap();
        let t = TaskId::new("w-1").unwrap();
        let n = NodeName::new("n1").unwrap();
        let p = "/routemesh";
        assert_eq!(
            Key::parse(p, task_key(p, &s, &t).as_bytes()),
            Some(Ok(Key::Task(s.clone(), t)))
        );
        assert_eq!(
            Key::parse(p, node_alive_key(p, &n).as_bytes()),
            Some(Ok(Key::NodeAlive(n.clone())))
        );
        assert_eq!(
            Key::parse(p, node_info_key(p, &n).as_bytes()),
            Some(Ok(Key::NodeInfo(n)))
        );
        assert_eq!(Key::parse(p, b"/other/tasks/a/b"), None);
        assert_eq!(Key::parse(p, b"/routemeshx/tasks/a/b"), None);
        assert_eq!(
            Key::parse(p, b"/routemesh/tasks/a"),
            Some(Err(KeyError::Layout))
        );
        assert!(matches!(
            Key::parse(p, b"/routemesh/tasks/a b/c"),
            Some(Err(KeyError::Name(_)))
        ));
        assert_eq!(
            Key::parse(p, b"/routemesh/tasks/\xff/c"),
            Some(Err(KeyError::NotUtf8))
        );
    }

    #[test]
    fn task_values() {
        let r = TaskRecord::parse(br#"{"addr":"10.0.0.2:80","node":"n2","weight":3}"#).unwrap();
        assert_eq!(r.addr, "10.0.0.2:80".parse().unwrap());
        assert_eq!(r.node.as_ref().unwrap().as_str(), "n2");
        assert_eq!(r.weight, 3);
        assert_eq!(TaskRecord::parse(r.to_json().as_bytes()).unwrap(), r);
        let r = TaskRecord::parse(br#"{"addr":"[::1]:80"}"#).unwrap();
        assert_eq!(r.weight, 1);
        assert!(r.node.is_none());
        assert!(matches!(
            TaskRecord::parse(b"not json"),
            Err(ValueError::Json(_))
        ));
        assert!(matches!(
            TaskRecord::parse(br#"{"addr":"nowhere"}"#),
            Err(ValueError::Addr(_))
        ));
        assert!(matches!(
            TaskRecord::parse(br#"{"addr":5}"#),
            Err(ValueError::Json(_))
        ));
        assert!(matches!(
            TaskRecord::parse(br#"{"addr":"1.2.3.4:5","weight":-1}"#),
            Err(ValueError::Json(_))
        ));
        assert!(matches!(
            TaskRecord::parse(br#"{"addr":"1.2.3.4:5","weight":5000}"#),
            Err(ValueError::Weight(5000))
        ));
        assert!(matches!(
            TaskRecord::parse(br#"{"addr":"1.2.3.4:5","node":"a/b"}"#),
            Err(ValueError::Node(_))
        ));
    }

    #[test]
    fn node_values() {
        let r = NodeRecord {
            advertise: Some("10.0.0.1".parse().unwrap()),
            version: "0.1.0".into(),
            started: 5,
            listeners: vec![],
        };
        assert_eq!(NodeRecord::parse(r.to_json().as_bytes()).unwrap(), r);
        assert_eq!(NodeRecord::parse(b"{}").unwrap(), NodeRecord::default());
        assert!(NodeRecord::parse(b"[").is_err());
    }
}
