//! The `[admin]` section: where the status page, /healthz, /readyz, /routes and /metrics
//! listen, the optional token file that enables the page's write actions, and the Unix socket
//! a `routemesh run --upgrade` takes the running daemon's sockets over from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::discovery::DiscoveryBackend;
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
    pub token_file: Option<S<String>>,
    pub upgrade_socket: Option<S<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `token_file`, resolved against the config file's directory: with it the status page
    /// offers write actions (node drain/activate, task weight) to requests carrying
    /// `Authorization: Bearer <its contents>`. Read again at each action, so a rotated file
    /// takes effect without a restart. None: read-only (the action endpoints answer 403).
    pub token_file: Option<PathBuf>,
    /// The hand-over socket (mode 0600) served by the running daemon; `None` when set to ""
    /// (upgrades off). Used by app.rs (serves it) and cli (`run --upgrade` connects to it).
    pub upgrade_socket: Option<PathBuf>,
}

/// The token in `path`: its contents without surrounding whitespace (a trailing newline is
/// not part of the token). Errors name what is wrong in words a user can act on.
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if token.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "{} holds spaces or control characters inside the token: write one line of printable characters",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// Validates `[admin]`; `config_path` resolves a relative `token_file` and `upgrade_socket`.
pub(super) fn validate(
    issues: &mut Issues,
    config_path: &Path,
    raw: &RawAdmin,
    backend: DiscoveryBackend,
) -> AdminConfig {
    let listen = raw
        .listen
        .as_ref()
        .and_then(|v| socket_addr(issues, v, "admin.listen"))
        .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid literal"));
    let token_file = raw.token_file.as_ref().and_then(|v| {
        let path = resolve(config_path, v.get_ref());
        if let Err(why) = read_token(&path) {
            issues.at(
                span(v),
                format!(
                    "`admin.token_file`: {why}; put a long random token in it (e.g. `openssl rand -hex 32 > FILE; chmod 600 FILE`) or remove the key to keep the status page read-only"
                ),
            );
            return None;
        }
        if backend == DiscoveryBackend::Static {
            issues.at(
                span(v),
                "`admin.token_file` enables write actions, which change etcd keys: it needs `discovery.backend = \"etcd\"` (remove it with the static backend)",
            );
            return None;
        }
        Some(path)
    });
    let upgrade_socket = match &raw.upgrade_socket {
        None => Some(PathBuf::from(DEFAULT_UPGRADE_SOCKET)),
        Some(v) if v.get_ref().trim().is_empty() => None,
        Some(v) => {
            let path = resolve(config_path, v.get_ref().trim());
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
        token_file,
        upgrade_socket,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::testing::{err, parse, parse_etc, parse_in};

    #[test]
    fn token_file_is_resolved_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret-token\n").unwrap();
        let c = parse_in(dir.path(), "[admin]\ntoken_file = \"token\"\n").unwrap();
        let path = c.admin.token_file.unwrap();
        assert_eq!(path, dir.path().join("token"));
        assert_eq!(super::read_token(&path).unwrap(), "s3cret-token");
        // Without the key: read-only.
        assert!(parse_in(dir.path(), "").unwrap().admin.token_file.is_none());
    }

    #[test]
    fn bad_token_files_are_errors_at_their_position() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.toml");
        let text = parse_in(dir.path(), "[admin]\ntoken_file = \"missing\"\n").unwrap_err();
        assert!(
            text.starts_with(&format!(
                "{}:2:14: `admin.token_file`: cannot read ",
                t.display()
            )),
            "{text}"
        );
        assert!(text.contains("openssl rand"), "{text}");
        std::fs::write(dir.path().join("empty"), " \n").unwrap();
        let text = parse_in(dir.path(), "[admin]\ntoken_file = \"empty\"\n").unwrap_err();
        assert!(
            text.contains(":2:14:") && text.contains("is empty"),
            "{text}"
        );
        std::fs::write(dir.path().join("two"), "a b\n").unwrap();
        let text = parse_in(dir.path(), "[admin]\ntoken_file = \"two\"\n").unwrap_err();
        assert!(text.contains("spaces or control characters"), "{text}");
        std::fs::write(dir.path().join("ok"), "tok\n").unwrap();
        let text = parse_in(
            dir.path(),
            "[discovery]\nbackend = \"static\"\n[admin]\ntoken_file = \"ok\"\n",
        )
        .unwrap_err();
        assert!(
            text.contains(":4:14:") && text.contains("needs `discovery.backend = \"etcd\"`"),
            "{text}"
        );
    }

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
