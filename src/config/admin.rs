//! The `[admin]` section: where /healthz, /readyz, /routes and /metrics listen, and the Unix
//! socket a `routemesh run --upgrade` takes the running daemon's sockets over from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::{resolve, socket_addr, span};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
/// Where the running daemon hands its sockets over (`routemesh run --upgrade`).
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/routemesh/upgrade.sock";
/// The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
const MAX_UNIX_PATH: usize = 107;

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
    pub upgrade_socket: Option<S<String>>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The hand-over socket (mode 0600) served by the running daemon; `None` when set to ""
    /// (upgrades off). Used by app.rs (serves it) and cli (`run --upgrade` connects to it).
    pub upgrade_socket: Option<PathBuf>,
}

/// Validates `[admin]`; a relative `upgrade_socket` is relative to the config file.
pub(super) fn validate(issues: &mut Issues, raw: &RawAdmin, config: &Path) -> AdminConfig {
    let listen = raw
        .listen
        .as_ref()
        .and_then(|v| socket_addr(issues, v, "admin.listen"))
        .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid literal"));
    let upgrade_socket = match &raw.upgrade_socket {
        None => Some(PathBuf::from(DEFAULT_UPGRADE_SOCKET)),
        Some(v) if v.get_ref().trim().is_empty() => None,
        Some(v) => {
            let path = resolve(config, v.get_ref().trim());
            let len = path.as_os_str().len();
            if len > MAX_UNIX_PATH {
                issues.at(
                    span(v),
                    format!(
                        "`admin.upgrade_socket`: {} is {len} bytes long, a Unix socket path holds at most {MAX_UNIX_PATH}; pick a shorter path, e.g. \"{DEFAULT_UPGRADE_SOCKET}\"",
                        path.display()
                    ),
                );
                Some(PathBuf::from(DEFAULT_UPGRADE_SOCKET))
            } else if path.file_name().is_none() || v.get_ref().trim().ends_with('/') {
                issues.at(
                    span(v),
                    format!(
                        "`admin.upgrade_socket` = {:?} names a directory; write the socket's file path, e.g. \"{DEFAULT_UPGRADE_SOCKET}\" (or \"\" to turn upgrades off)",
                        v.get_ref()
                    ),
                );
                Some(PathBuf::from(DEFAULT_UPGRADE_SOCKET))
            } else {
                Some(path)
            }
        }
    };
    AdminConfig {
        listen,
        upgrade_socket,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::testing::{err, parse, parse_etc};

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(
            c.admin.upgrade_socket.as_deref(),
            Some(Path::new(DEFAULT_UPGRADE_SOCKET))
        );
        assert_eq!(c.node.upgrade_drain_timeout, Duration::from_secs(600));
    }

    #[test]
    fn empty_turns_upgrades_off_and_relative_is_beside_the_file() {
        let c = parse("[admin]\nupgrade_socket = \"\"\n").unwrap();
        assert_eq!(c.admin.upgrade_socket, None);
        let c = parse_etc(
            "[admin]\nupgrade_socket = \"run/up.sock\"\n[node]\nupgrade_drain_timeout = \"90s\"\n",
        )
        .unwrap();
        assert_eq!(
            c.admin.upgrade_socket.as_deref(),
            Some(Path::new("/etc/routemesh/run/up.sock"))
        );
        assert_eq!(c.node.upgrade_drain_timeout, Duration::from_secs(90));
    }

    #[test]
    fn bad_values_are_positioned() {
        let long = "x".repeat(120);
        let e = err(&format!(
            "[admin]\nupgrade_socket = \"/{long}\"\n[node]\nupgrade_drain_timeout = \"soon\"\n"
        ));
        assert!(e.contains("t.toml:2:18"), "{e}");
        assert!(e.contains("at most 107"), "{e}");
        assert!(e.contains("t.toml:4:25"), "{e}");
        assert!(e.contains("node.upgrade_drain_timeout"), "{e}");
        let e = err("[admin]\nupgrade_socket = \"/run/routemesh/\"\n");
        assert!(e.contains("names a directory"), "{e}");
    }
}
