//! The `[dns]` section: the raw serde shape and its validation.
//!
//! ```toml
//! [dns]
//! listen = "0.0.0.0:53"       # UDP and TCP
//! zone = "mesh.example.com"   # the name the parent zone delegates to the nodes
//! ttl = "5s"                  # whole seconds
//! ```
//! Owns only the shape and the checks; the responder itself is `crate::dns`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::ListenerConfig;
use super::error::Issues;
use super::file::S;
use super::values::{duration, socket_addr, span};

pub const DEFAULT_DNS_LISTEN: &str = "0.0.0.0:53";
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
pub struct RawDns {
    pub listen: Option<S<String>>,
    pub zone: Option<S<String>>,
    pub ttl: Option<S<String>>,
}

/// A valid `[dns]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Bound for both UDP and TCP.
    pub listen: SocketAddr,
    /// Lower-case, without the trailing dot, e.g. `mesh.example.com`.
    pub zone: String,
    /// TTL of every record served (whole seconds).
    pub ttl: Duration,
}

/// Checks a zone name: 1-63 character labels of letters, digits, `-` and `_`, at most 253
/// characters in all. Returns it lower-cased without the trailing dot.
pub fn normalize_zone(text: &str) -> Result<String, String> {
    let z = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if z.is_empty() {
        return Err("is empty: write the delegated name, e.g. \"mesh.example.com\"".into());
    }
    if z.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    for label in z.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "has an empty or over-long label {label:?}: labels are 1-63 characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "label {label:?} may only hold letters, digits, '-' and '_'"
            ));
        }
    }
    Ok(z)
}

/// Validates `[dns]` (None when the section is absent: no responder runs). `admin` and
/// `listeners` are the TCP addresses already taken, which the DNS TCP socket may not reuse.
pub(super) fn validate(
    issues: &mut Issues,
    raw: Option<&S<RawDns>>,
    admin: SocketAddr,
    listeners: &[ListenerConfig],
) -> Option<DnsConfig> {
    let raw_span = span(raw?);
    let d = raw?.get_ref();
    let listen = match &d.listen {
        Some(v) => socket_addr(issues, v, "dns.listen"),
        None => Some(DEFAULT_DNS_LISTEN.parse().expect("valid literal")),
    };
    if let (Some(addr), Some(v)) = (listen, &d.listen) {
        let clash = if addr == admin {
            Some("the admin listener".to_string())
        } else {
            listeners
                .iter()
                .find(|l| l.listen == addr)
                .map(|l| format!("listener {:?}", l.name))
        };
        if let Some(what) = clash {
            issues.at(
                span(v),
                format!("`dns.listen` {addr} is also bound by {what}: pick another port"),
            );
        }
    }
    let zone = match &d.zone {
        Some(v) => match normalize_zone(v.get_ref()) {
            Ok(z) => Some(z),
            Err(e) => {
                issues.at(span(v), format!("`dns.zone` {:?} {e}", v.get_ref()));
                None
            }
        },
        None => {
            issues.at(
                raw_span,
                "[dns] needs `zone`: the name delegated to the nodes, e.g. zone = \"mesh.example.com\"",
            );
            None
        }
    };
    let ttl = duration(issues, &d.ttl, DEFAULT_DNS_TTL, "dns.ttl");
    if let Some(v) = &d.ttl
        && (ttl.subsec_nanos() != 0 || ttl > Duration::from_secs(86_400))
    {
        issues.at(
            span(v),
            "`dns.ttl` must be a whole number of seconds from 0s to 1d (DNS TTLs count seconds)",
        );
    }
    Some(DnsConfig {
        listen: listen?,
        zone: zone?,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::parse;

    #[test]
    fn absent_section_means_no_responder() {
        assert!(parse("").unwrap().dns.is_none());
    }

    #[test]
    fn contract_parses_with_defaults() {
        let c = parse("[dns]\nzone = \"Mesh.Example.com.\"\n").unwrap();
        let d = c.dns.unwrap();
        assert_eq!(d.zone, "mesh.example.com");
        assert_eq!(d.listen, DEFAULT_DNS_LISTEN.parse().unwrap());
        assert_eq!(d.ttl, DEFAULT_DNS_TTL);
        let c = parse("[dns]\nlisten = \"127.0.0.1:5353\"\nzone = \"m.example\"\nttl = \"30s\"\n")
            .unwrap();
        let d = c.dns.unwrap();
        assert_eq!(d.listen.port(), 5353);
        assert_eq!(d.ttl, Duration::from_secs(30));
    }

    #[test]
    fn every_error_is_positioned() {
        let src = "[dns]\nlisten = \"nowhere\"\nzone = \"bad zone\"\nttl = \"1500ms\"\nbogus = 1\n";
        let err = parse(src).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("t.toml:2:10: `dns.listen`"), "{text}");
        assert!(text.contains("t.toml:3:8: `dns.zone`"), "{text}");
        assert!(text.contains("t.toml:4:7: `dns.ttl`"), "{text}");
        assert!(
            text.contains("t.toml:5:1: unknown key `dns.bogus`"),
            "{text}"
        );
        let err = parse("[dns]\nlisten = \"127.0.0.1:53\"\n").unwrap_err();
        assert!(err.to_string().contains("needs `zone`"), "{err}");
        assert_eq!(err.issues[0].line, 1, "{err}");
    }

    #[test]
    fn clashes_with_tcp_ports_are_errors() {
        let err = parse(
            "[admin]\nlisten = \"127.0.0.1:9000\"\n[dns]\nlisten = \"127.0.0.1:9000\"\nzone = \"z\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("admin listener"), "{err}");
        let err = parse(
            "[[listener]]\nname = \"web\"\nlisten = \"0.0.0.0:8053\"\nservice = \"web\"\n[dns]\nlisten = \"0.0.0.0:8053\"\nzone = \"z\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("listener \"web\""), "{err}");
    }

    #[test]
    fn zone_names() {
        assert_eq!(normalize_zone("a.B.c.").unwrap(), "a.b.c");
        assert!(normalize_zone("").is_err());
        assert!(normalize_zone(".").is_err());
        assert!(normalize_zone("a..b").is_err());
        assert!(normalize_zone(&"x".repeat(64)).is_err());
        assert!(normalize_zone("a b").is_err());
        assert!(normalize_zone(&["abc"; 70].join(".")).is_err());
    }
}
