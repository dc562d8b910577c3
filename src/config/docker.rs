//! The `[docker]` section: the raw serde shape and its validation.
//!
//! ```toml
//! [docker]
//! enabled = true
//! socket = "/var/run/docker.sock"
//! network = ""                 # which container network's IP to register
//! reconcile_interval = "30s"
//! swarm = false                # on a swarm manager: also register labelled services' tasks
//! ```
//! Owns only the shape and the checks; engine discovery itself is `crate::docker`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::DiscoveryBackend;
use super::error::Issues;
use super::file::S;
use super::values::{positive_duration, span};

pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Deserialize)]
pub struct RawDocker {
    pub enabled: Option<S<bool>>,
    pub socket: Option<S<String>>,
    pub network: Option<S<String>>,
    pub reconcile_interval: Option<S<String>>,
    pub swarm: Option<S<bool>>,
}

/// A valid `[docker]` section (all defaults, `enabled = false`, when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// Whether the daemon registers this node's labelled containers (app.rs reads it).
    pub enabled: bool,
    /// The engine's unix socket (a `unix://` prefix is accepted and dropped).
    pub socket: PathBuf,
    /// The container network whose IP is registered; None picks the address as
    /// `crate::docker::container` documents (the published port, the host network with
    /// `[node] advertise`, or the only network; `crate::docker::swarm` for swarm tasks).
    pub network: Option<String>,
    /// A full list of the engine's containers every so often, repairing missed events.
    pub reconcile_interval: Duration,
    /// Swarm mode source (`crate::docker::swarm`): when the engine is a swarm manager, the
    /// running tasks of services labelled `routemesh.service` are registered too.
    pub swarm: bool,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: false,
            socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            network: None,
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            swarm: false,
        }
    }
}

/// Validates `[docker]`. Container tasks are written under the node lease, so the section
/// only makes sense with the etcd backend.
pub(super) fn validate(
    issues: &mut Issues,
    raw: Option<&S<RawDocker>>,
    backend: DiscoveryBackend,
) -> DockerConfig {
    let def = DockerConfig::default();
    let Some(raw) = raw else { return def };
    let d = raw.get_ref();
    let enabled = d.enabled.as_ref().map(|v| *v.get_ref()).unwrap_or(false);
    if enabled && backend != DiscoveryBackend::Etcd {
        let at = d.enabled.as_ref().map(span).unwrap_or_else(|| span(raw));
        issues.at(
            at,
            "`docker.enabled` needs discovery.backend = \"etcd\": container tasks are registered under the node's lease",
        );
    }
    let socket = match &d.socket {
        None => def.socket.clone(),
        Some(v) => {
            let s = v.get_ref().trim();
            let path = s.strip_prefix("unix://").unwrap_or(s);
            if !path.starts_with('/') {
                issues.at(
                    span(v),
                    format!(
                        "`docker.socket` = {:?}: write the absolute path of the engine's unix socket, e.g. \"{DEFAULT_DOCKER_SOCKET}\"",
                        v.get_ref()
                    ),
                );
                def.socket.clone()
            } else {
                PathBuf::from(path)
            }
        }
    };
    let network = match &d.network {
        None => None,
        Some(v) if v.get_ref().trim().is_empty() => None,
        Some(v) => {
            let n = v.get_ref().trim();
            // Docker's own rule for network names.
            let ok = n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                issues.at(
                    span(v),
                    format!(
                        "`docker.network` = {n:?} is not a network name: use the name `docker network ls` shows, or \"\""
                    ),
                );
            }
            Some(n.to_string())
        }
    };
    let reconcile_interval = positive_duration(
        issues,
        &d.reconcile_interval,
        def.reconcile_interval,
        "docker.reconcile_interval",
    );
    let swarm = d.swarm.as_ref().map(|v| *v.get_ref()).unwrap_or(false);
    if swarm && !enabled {
        let at = d.swarm.as_ref().map(span).unwrap_or_else(|| span(raw));
        issues.at(
            at,
            "`docker.swarm` needs docker.enabled = true: swarm tasks are found through the same engine connection settings and registered the same way",
        );
    }
    DockerConfig {
        enabled,
        socket,
        network,
        reconcile_interval,
        swarm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::parse;

    #[test]
    fn absent_section_is_disabled_defaults() {
        assert_eq!(parse("").unwrap().docker, DockerConfig::default());
        assert!(!DockerConfig::default().enabled);
    }

    #[test]
    fn contract_parses() {
        let c = parse(
            "[docker]\nenabled = true\nsocket = \"unix:///run/docker.sock\"\nnetwork = \"\"\nreconcile_interval = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(
            c.docker,
            DockerConfig {
                enabled: true,
                socket: PathBuf::from("/run/docker.sock"),
                network: None,
                reconcile_interval: Duration::from_secs(5),
                swarm: false,
            }
        );
        let c =
            parse("[docker]\nenabled = true\nswarm = true\nnetwork = \"rm-overlay\"\n").unwrap();
        assert!(c.docker.swarm);
        assert_eq!(c.docker.network.as_deref(), Some("rm-overlay"));
        let c = parse("[docker]\nenabled = true\nnetwork = \"backend_net\"\n").unwrap();
        assert_eq!(c.docker.network.as_deref(), Some("backend_net"));
        assert_eq!(c.docker.reconcile_interval, DEFAULT_RECONCILE_INTERVAL);
    }

    #[test]
    fn every_error_is_positioned() {
        let src = "[docker]\nenabled = true\nsocket = \"docker.sock\"\nnetwork = \"a b\"\nreconcile_interval = \"0s\"\nbogus = 1\n";
        let text = parse(src).unwrap_err().to_string();
        assert!(text.contains("t.toml:3:10: `docker.socket`"), "{text}");
        assert!(text.contains("t.toml:4:11: `docker.network`"), "{text}");
        assert!(
            text.contains("t.toml:5:22: `docker.reconcile_interval` must be greater than zero"),
            "{text}"
        );
        assert!(
            text.contains("t.toml:6:1: unknown key `docker.bogus`"),
            "{text}"
        );
        let text = parse("[docker]\nenabled = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(text.contains("t.toml:2:"), "{text}");
    }

    #[test]
    fn swarm_is_checked() {
        let text = parse("[docker]\nenabled = false\nswarm = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("t.toml:3:9: `docker.swarm` needs docker.enabled = true"),
            "{text}"
        );
        let text = parse("[docker]\nenabled = true\nswarm = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(text.contains("t.toml:3:"), "{text}");
        assert!(!parse("[docker]\nenabled = true\n").unwrap().docker.swarm);
    }

    #[test]
    fn needs_the_etcd_backend() {
        let text = parse("[discovery]\nbackend = \"static\"\n[docker]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("t.toml:4:11: `docker.enabled` needs"),
            "{text}"
        );
        // Disabled is fine with any backend.
        parse("[discovery]\nbackend = \"static\"\n[docker]\nenabled = false\n").unwrap();
    }
}
