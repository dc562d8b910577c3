//! The `[node]` section: this machine's name, the address clients use for it, and how long
//! it drains on shutdown.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::file::S;
use super::names::NodeName;

#[derive(Debug, Default, Deserialize)]
pub struct RawNode {
    pub name: Option<S<String>>,
    pub advertise: Option<S<String>>,
    pub drain_timeout: Option<S<String>>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique per node; the key of its liveness records.
    pub name: NodeName,
    /// Address clients use for this node (shown by `node ls`, used by DNS answers).
    pub advertise: Option<IpAddr>,
    /// How long open connections may run after SIGTERM.
    pub drain_timeout: Duration,
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
