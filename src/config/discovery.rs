//! The `[discovery]` section: the routing table's backend (etcd or static), the etcd members,
//! key prefix, lease TTL and timings, and how the daemon and the CLI authenticate to etcd
//! (TLS, user and password). Paths are kept as given (relative ones resolved against the
//! config file's directory) and read at each connect, so rotated files are picked up.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::{one_of, positive_duration, resolve, span};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_PREFIX: &str = "/routemesh";

#[derive(Debug, Default, Deserialize)]
pub struct RawDiscovery {
    pub backend: Option<S<String>>,
    pub endpoints: Option<S<Vec<S<String>>>>,
    pub prefix: Option<S<String>>,
    pub node_ttl: Option<S<String>>,
    pub resync_interval: Option<S<String>>,
    pub dial_timeout: Option<S<String>>,
    pub published_ports: Option<S<Vec<S<String>>>>,
    // etcd security (validated by `etcd_security`)
    pub tls: Option<S<RawEtcdTls>>,
    pub username: Option<S<String>>,
    pub password: Option<S<String>>,
    pub password_file: Option<S<String>>,
}

/// `[discovery] tls = { ca, cert, key }`.
#[derive(Debug, Default, Deserialize)]
pub struct RawEtcdTls {
    pub ca: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryBackend {
    Etcd,
    Static,
}

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub backend: DiscoveryBackend,
    /// All etcd members; the client fails over between them.
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash, e.g. `/routemesh`.
    pub prefix: String,
    /// Lease TTL for this node and the tasks it hosts.
    pub node_ttl: Duration,
    /// A full re-list every so often, guarding against lost watch events.
    pub resync_interval: Duration,
    /// Bound on connecting to etcd and on each request.
    pub dial_timeout: Duration,
    /// TLS and user/password for etcd.
    pub security: EtcdSecurity,
    /// The ports this node binds for the cluster's published listeners (empty = all).
    pub published_ports: super::PortRanges,
}

/// Where the etcd password comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    Inline(String),
    /// Read at each connect, so a rotated file is picked up.
    File(PathBuf),
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Password::Inline(_) => f.write_str("Inline(<redacted>)"),
            Password::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl Password {
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Password::Inline(s) => Ok(s.clone()),
            Password::File(p) => Ok(std::fs::read_to_string(p)?
                .trim_end_matches(['\r', '\n'])
                .to_string()),
        }
    }
}

/// `[discovery] tls`: the CA that signed etcd's certificates, and our client pair for mTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `[discovery] username` with `password` or `password_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub username: String,
    pub password: Password,
}

/// How the daemon and the CLI authenticate to etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
}

/// Validates `[discovery]`, its etcd security keys included.
pub(super) fn validate(
    issues: &mut Issues,
    config_path: &Path,
    d: &RawDiscovery,
) -> DiscoveryConfig {
    let backend = one_of(
        issues,
        &d.backend,
        DiscoveryBackend::Etcd,
        &[
            ("etcd", DiscoveryBackend::Etcd),
            ("static", DiscoveryBackend::Static),
        ],
        "discovery.backend",
    );
    let endpoints = endpoints(issues, d.endpoints.as_ref());
    let prefix = prefix(issues, d.prefix.as_ref());
    let node_ttl = positive_duration(
        issues,
        &d.node_ttl,
        Duration::from_secs(3),
        "discovery.node_ttl",
    );
    if let Some(v) = &d.node_ttl
        && (node_ttl.subsec_nanos() != 0 || node_ttl > Duration::from_secs(3600))
    {
        issues.at(
            span(v),
            "`discovery.node_ttl` must be a whole number of seconds from 1s to 1h (etcd leases count seconds; etcd raises TTLs below 2s to 2s)",
        );
    }
    let resync_interval = positive_duration(
        issues,
        &d.resync_interval,
        Duration::from_secs(300),
        "discovery.resync_interval",
    );
    let dial_timeout = positive_duration(
        issues,
        &d.dial_timeout,
        Duration::from_secs(2),
        "discovery.dial_timeout",
    );
    let security = etcd_security(issues, config_path, d, &endpoints);
    let published_ports = published_ports(issues, d.published_ports.as_ref());
    DiscoveryConfig {
        backend,
        endpoints,
        prefix,
        node_ttl,
        resync_interval,
        dial_timeout,
        security,
        published_ports,
    }
}

/// `published_ports = ["80", "443", "30000-32767"]`: ports or ranges this node accepts from
/// etcd (absent = all; an empty list = none).
fn published_ports(issues: &mut Issues, raw: Option<&S<Vec<S<String>>>>) -> super::PortRanges {
    let Some(list) = raw else {
        return super::PortRanges::all();
    };
    let mut ranges = Vec::new();
    for item in list.get_ref() {
        match super::PortRanges::parse_item(item.get_ref().trim()) {
            Ok(r) => ranges.push(r),
            Err(e) => issues.at(
                span(item),
                format!("`discovery.published_ports`: {e}; write e.g. [\"80\", \"30000-32767\"]"),
            ),
        }
    }
    if list.get_ref().is_empty() {
        super::PortRanges::none()
    } else {
        super::PortRanges::new(ranges)
    }
}

/// `endpoints`: etcd URLs, `http://HOST:PORT` or `https://HOST:PORT`, trailing `/` dropped.
fn endpoints(issues: &mut Issues, raw: Option<&S<Vec<S<String>>>>) -> Vec<String> {
    let Some(list) = raw else {
        return vec![DEFAULT_ENDPOINT.to_string()];
    };
    if list.get_ref().is_empty() {
        issues.at(
            span(list),
            "`discovery.endpoints` is empty: list every etcd member, e.g. [\"http://10.0.0.1:2379\"]",
        );
    }
    let mut out = Vec::new();
    for ep in list.get_ref() {
        let s = ep.get_ref().trim();
        let rest = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"));
        let valid = rest.is_some_and(|r| {
            let hostport = r.trim_end_matches('/');
            hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        });
        if valid {
            out.push(s.trim_end_matches('/').to_string());
        } else {
            issues.at(
                span(ep),
                format!(
                    "`discovery.endpoints`: {s:?} is not an etcd URL; write \"http://HOST:PORT\" (or https://)"
                ),
            );
        }
    }
    out
}

/// `prefix`: an absolute key prefix, kept without its trailing `/`.
fn prefix(issues: &mut Issues, raw: Option<&S<String>>) -> String {
    let Some(p) = raw else {
        return DEFAULT_PREFIX.to_string();
    };
    let s = p.get_ref().trim_end_matches('/');
    if !p.get_ref().starts_with('/') || s.is_empty() || s.contains("//") {
        issues.at(
            span(p),
            format!(
                "`discovery.prefix` = {:?}: write an absolute key prefix such as \"/routemesh\"",
                p.get_ref()
            ),
        );
        DEFAULT_PREFIX.to_string()
    } else {
        s.to_string()
    }
}

/// `[discovery] tls`, `username`, `password`, `password_file`; `endpoints` are the validated
/// URLs (https:// needs `tls`, `tls` needs https://).
fn etcd_security(
    issues: &mut Issues,
    config_path: &Path,
    d: &RawDiscovery,
    endpoints: &[String],
) -> EtcdSecurity {
    let tls = d.tls.as_ref().map(|t| {
        let raw = t.get_ref();
        let path = |v: &Option<S<String>>| v.as_ref().map(|p| resolve(config_path, p.get_ref()));
        if raw.cert.is_some() != raw.key.is_some() {
            issues.at(
                span(t),
                "`discovery.tls` needs both `cert` and `key` for client certificates (or neither)",
            );
        }
        EtcdTls {
            ca: path(&raw.ca),
            cert: path(&raw.cert),
            key: path(&raw.key),
        }
    });
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if tls.is_some() && https != endpoints.len() {
        let at = d.endpoints.as_ref().map(span).unwrap_or(0..0);
        issues.at(
            at,
            "`discovery.tls` is set: write every endpoint as \"https://HOST:PORT\"",
        );
    }
    if tls.is_none() && https > 0 {
        let at = d.endpoints.as_ref().map(span).unwrap_or(0..0);
        issues.at(
            at,
            "https:// endpoints need `discovery.tls = { ca = \"ca.pem\" }` (and `cert`/`key` for client-certificate auth)",
        );
    }
    let password = match (&d.password, &d.password_file) {
        (Some(p), Some(f)) => {
            issues.at(
                span(f),
                "set `discovery.password` or `discovery.password_file`, not both",
            );
            Some(Password::Inline(p.get_ref().clone()))
        }
        (Some(p), None) => Some(Password::Inline(p.get_ref().clone())),
        (None, Some(f)) => Some(Password::File(resolve(config_path, f.get_ref()))),
        (None, None) => None,
    };
    let auth = match (&d.username, password) {
        (Some(u), Some(password)) => {
            if u.get_ref().is_empty() {
                issues.at(span(u), "`discovery.username` is empty");
            }
            Some(EtcdAuth {
                username: u.get_ref().clone(),
                password,
            })
        }
        (Some(u), None) => {
            issues.at(
                span(u),
                "`discovery.username` needs `password` or `password_file`",
            );
            None
        }
        (None, Some(_)) => {
            let at = d
                .password
                .as_ref()
                .map(span)
                .or(d.password_file.as_ref().map(span))
                .unwrap_or(0..0);
            issues.at(at, "`discovery.password` needs `username`");
            None
        }
        (None, None) => None,
    };
    EtcdSecurity { tls, auth }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::err;

    #[test]
    fn bad_etcd_security() {
        let text = err("[discovery]\nendpoints = [\"https://1.2.3.4:2379\"]\n");
        assert!(text.contains("need `discovery.tls"), "{text}");
        let text = err("[discovery]\ntls = { ca = \"ca.pem\" }\n");
        assert!(text.contains("https://HOST:PORT"), "{text}");
        let text = err(
            "[discovery]\nendpoints = [\"https://1.2.3.4:2379\"]\ntls = { ca = \"ca.pem\", cert = \"c.pem\" }\n",
        );
        assert!(text.contains("both `cert` and `key`"), "{text}");
        let text = err("[discovery]\nusername = \"u\"\n");
        assert!(
            text.contains("t.toml:2:12:") && text.contains("password_file"),
            "{text}"
        );
        let text = err("[discovery]\npassword = \"p\"\n");
        assert!(text.contains("needs `username`"), "{text}");
        let text = err("[discovery]\nusername = \"u\"\npassword = \"p\"\npassword_file = \"f\"\n");
        assert!(text.contains("not both"), "{text}");
    }
}
