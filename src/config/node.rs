//! The `[node]` section: this machine's name, the address clients use for it, and how long
//! it drains on shutdown and after handing its sockets to an upgrade.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::names::NodeName;
use super::values::{duration, name, span};

#[derive(Debug, Default, Deserialize)]
pub struct RawNode {
    pub name: Option<S<String>>,
    pub advertise: Option<S<String>>,
    pub drain_timeout: Option<S<String>>,
    pub upgrade_drain_timeout: Option<S<String>>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique per node; the key of its liveness records.
    pub name: NodeName,
    /// Address clients use for this node (shown by `node ls`, used by DNS answers).
    pub advertise: Option<IpAddr>,
    /// How long open connections may run after SIGTERM.
    pub drain_timeout: Duration,
    /// How long open connections may run in the old process after it handed its sockets to
    /// `routemesh run --upgrade` (app.rs).
    pub upgrade_drain_timeout: Duration,
}

/// This machine's host name, the default node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Validates `[node]` (all defaults when absent: the host name, no advertise, 10 s drain,
/// 10 min drain after an upgrade).
pub(super) fn validate(issues: &mut Issues, raw: &RawNode) -> NodeConfig {
    let node_name = match &raw.name {
        Some(v) => name(issues, v, "node.name", NodeName::new),
        None => {
            let host = hostname();
            let cleaned: String = host
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .take(128)
                .collect();
            NodeName::new(&cleaned).ok()
        }
    }
    .unwrap_or_else(|| NodeName::new("node").expect("valid literal"));
    let advertise = raw
        .advertise
        .as_ref()
        .and_then(|v| match v.get_ref().trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                issues.at(
                    span(v),
                    format!(
                        "`node.advertise`: {:?} is not an IP address; write the address clients use for this node, e.g. \"10.0.0.1\"",
                        v.get_ref()
                    ),
                );
                None
            }
        });
    let drain_timeout = duration(
        issues,
        &raw.drain_timeout,
        Duration::from_secs(10),
        "node.drain_timeout",
    );
    let upgrade_drain_timeout = duration(
        issues,
        &raw.upgrade_drain_timeout,
        Duration::from_secs(600),
        "node.upgrade_drain_timeout",
    );
    NodeConfig {
        name: node_name,
        advertise,
        drain_timeout,
        upgrade_drain_timeout,
    }
}
