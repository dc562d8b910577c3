//! The `[admin]` section: where the status page, /healthz, /readyz, /routes and /metrics
//! listen, and the optional token file that enables the page's write actions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::discovery::DiscoveryBackend;
use super::error::Issues;
use super::file::S;
use super::values::{resolve, socket_addr, span};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
    pub token_file: Option<S<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `token_file`, resolved against the config file's directory: with it the status page
    /// offers write actions (node drain/activate, task weight) to requests carrying
    /// `Authorization: Bearer <its contents>`. Read again at each action, so a rotated file
    /// takes effect without a restart. None: read-only (the action endpoints answer 403).
    pub token_file: Option<PathBuf>,
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

/// Validates `[admin]`; `config_path` resolves a relative `token_file`.
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
    AdminConfig { listen, token_file }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse_in(dir: &Path, src: &str) -> Result<Config, String> {
        Config::parse(&dir.join("t.toml"), src).map_err(|e| e.to_string())
    }

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
}
