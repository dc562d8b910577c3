//! The `[acme]` section: certificates for the whole cluster from an ACME CA (src/acme/).
//!
//! ```toml
//! [acme]
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! email = "ops@example.com"
//! ca_file = ""                  # extra CA (PEM) trusted for the directory (test CAs)
//! challenge = "http-01"         # "http-01" (port 80 of every node) | "tls-alpn-01"
//! renew_before = "30d"
//! key_file = "/etc/routemesh/acme.key"   # 32 bytes as 64 hex digits: seals keys in etcd
//! ```
//! Listeners ask for a certificate with `tls = { acme = ["www.example.com", ...] }`
//! (`certs.rs`). Owns only the shape and the checks, and reads `key_file` so that a missing
//! or malformed key is refused with its position; the client is `crate::acme`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::{duration, one_of, resolve, span};

pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Default, Deserialize)]
pub struct RawAcme {
    pub directory: Option<S<String>>,
    pub email: Option<S<String>>,
    pub ca_file: Option<S<String>>,
    pub challenge: Option<S<String>>,
    pub renew_before: Option<S<String>>,
    pub key_file: Option<S<String>>,
}

/// How the CA checks that we control a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChallengeKind {
    /// `GET http://NAME/.well-known/acme-challenge/TOKEN` on port 80 of any node.
    #[default]
    Http01,
    /// A TLS handshake with ALPN `acme-tls/1` on port 443 of any node.
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The key sealing private keys in etcd, as read from `key_file`.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKeyBytes(pub [u8; 32]);

impl std::fmt::Debug for SealKeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKeyBytes(..)")
    }
}

/// A valid `[acme]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The CA's directory URL (https).
    pub directory: String,
    /// Contact of the account (`mailto:` added); empty = none.
    pub email: String,
    /// Extra CA certificate (PEM) trusted for the directory; None = the system roots.
    pub ca_file: Option<PathBuf>,
    pub challenge: ChallengeKind,
    pub renew_before: Duration,
    /// Where the sealing key was read from (named in errors).
    pub key_file: PathBuf,
    pub key: SealKeyBytes,
}

/// Reads a sealing key file: 64 hex digits (e.g. `openssl rand -hex 32 > acme.key`),
/// whitespace around them ignored.
pub fn read_key_file(path: &Path) -> Result<SealKeyBytes, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    parse_key(&text)
}

/// Parses the text of a key file (see [`read_key_file`]).
pub fn parse_key(text: &str) -> Result<SealKeyBytes, String> {
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "holds {} characters; write 32 random bytes as 64 hex digits (`openssl rand -hex 32`)",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex digits");
    }
    Ok(SealKeyBytes(out))
}

/// Validates `[acme]` (None when absent). `config_path` resolves relative paths.
pub(super) fn validate(
    issues: &mut Issues,
    config_path: &Path,
    raw: Option<&S<RawAcme>>,
) -> Option<AcmeConfig> {
    let raw_span = span(raw?);
    let a = raw?.get_ref();
    let directory = match &a.directory {
        Some(v) if v.get_ref().starts_with("https://") || v.get_ref().starts_with("http://") => {
            v.get_ref().trim().to_string()
        }
        Some(v) => {
            issues.at(
                span(v),
                format!(
                    "`acme.directory` {:?} is not a URL: write the CA's directory, e.g. \"https://acme-v02.api.letsencrypt.org/directory\"",
                    v.get_ref()
                ),
            );
            String::new()
        }
        None => {
            issues.at(
                raw_span.clone(),
                "[acme] needs `directory`: the CA's directory URL, e.g. \"https://acme-v02.api.letsencrypt.org/directory\"",
            );
            String::new()
        }
    };
    let email = a
        .email
        .as_ref()
        .map(|v| v.get_ref().trim().to_string())
        .unwrap_or_default();
    if let Some(v) = &a.email
        && !email.is_empty()
        && !email.contains('@')
    {
        issues.at(
            span(v),
            format!("`acme.email` {email:?} is not an e-mail address (or leave it empty for none)"),
        );
    }
    let ca_file = match &a.ca_file {
        Some(v) if !v.get_ref().trim().is_empty() => {
            let p = resolve(config_path, v.get_ref().trim());
            if let Err(e) = std::fs::read(&p) {
                issues.at(
                    span(v),
                    format!(
                        "`acme.ca_file` {}: cannot read it ({e}); give the PEM CA certificate of the directory, or \"\"",
                        p.display()
                    ),
                );
            }
            Some(p)
        }
        _ => None,
    };
    let challenge = one_of(
        issues,
        &a.challenge,
        ChallengeKind::Http01,
        &[
            ("http-01", ChallengeKind::Http01),
            ("tls-alpn-01", ChallengeKind::TlsAlpn01),
        ],
        "acme.challenge",
    );
    let renew_before = duration(
        issues,
        &a.renew_before,
        DEFAULT_RENEW_BEFORE,
        "acme.renew_before",
    );
    if let Some(v) = &a.renew_before
        && renew_before.is_zero()
    {
        issues.at(span(v), "`acme.renew_before` must be greater than zero");
    }
    let (key_file, key) = match &a.key_file {
        Some(v) => {
            let p = resolve(config_path, v.get_ref().trim());
            match read_key_file(&p) {
                Ok(k) => (p, k),
                Err(e) => {
                    issues.at(span(v), format!("`acme.key_file` {}: {e}", p.display()));
                    (p, SealKeyBytes([0; 32]))
                }
            }
        }
        None => {
            issues.at(
                raw_span,
                "[acme] needs `key_file`: a file of 64 hex digits (`openssl rand -hex 32 > /etc/routemesh/acme.key`), the same on every node; it seals private keys in etcd",
            );
            (PathBuf::new(), SealKeyBytes([0; 32]))
        }
    };
    Some(AcmeConfig {
        directory,
        email,
        ca_file,
        challenge,
        renew_before,
        key_file,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::parse_in;

    #[test]
    fn key_text() {
        let k = parse_key(&format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(k.0, [0xab; 32]);
        assert!(parse_key("abcd").unwrap_err().contains("64 hex digits"));
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn section_defaults_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("acme.key"), "01".repeat(32)).unwrap();
        let c = parse_in(
            dir.path(),
            "[acme]\ndirectory = \"https://ca.test/dir\"\nkey_file = \"acme.key\"\n",
        )
        .unwrap();
        let a = c.acme.unwrap();
        assert_eq!(a.challenge, ChallengeKind::Http01);
        assert_eq!(a.renew_before, DEFAULT_RENEW_BEFORE);
        assert_eq!(a.key.0, [1; 32]);
        assert_eq!(a.key_file, dir.path().join("acme.key"));

        std::fs::write(dir.path().join("bad.key"), "short").unwrap();
        let e = parse_in(
            dir.path(),
            "[acme]\ndirectory = \"ca\"\nchallenge = \"dns-01\"\nrenew_before = \"soon\"\nkey_file = \"bad.key\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("t.toml:2:13") && e.contains("is not a URL"),
            "{e}"
        );
        assert!(e.contains("t.toml:3:13") && e.contains("dns-01"), "{e}");
        assert!(
            e.contains("t.toml:4:16") && e.contains("not a duration"),
            "{e}"
        );
        assert!(
            e.contains("t.toml:5:12") && e.contains("64 hex digits"),
            "{e}"
        );

        let e = parse_in(dir.path(), "[acme]\ndirectory = \"https://ca.test/dir\"\n").unwrap_err();
        assert!(e.contains("needs `key_file`"), "{e}");

        let e = parse_in(
            dir.path(),
            "[discovery]\nbackend = \"static\"\n[acme]\ndirectory = \"https://ca.test/dir\"\nkey_file = \"acme.key\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("t.toml:3:1") && e.contains("backend = \"etcd\""),
            "{e}"
        );
    }

    #[test]
    fn listener_acme_needs_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let e = parse_in(
            dir.path(),
            "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"http\"\ntls = { acme = [\"www.example.com\"] }\n",
        )
        .unwrap_err();
        assert!(e.contains("t.toml:4:7") && e.contains("[acme]"), "{e}");
        let e = parse_in(
            dir.path(),
            "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"http\"\ntls = { acme = [\"not a name\"] }\n",
        )
        .unwrap_err();
        assert!(e.contains("not a host name"), "{e}");
        std::fs::write(dir.path().join("acme.key"), "01".repeat(32)).unwrap();
        let c = parse_in(
            dir.path(),
            "[acme]\ndirectory = \"https://ca.test/dir\"\nkey_file = \"acme.key\"\n[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"http\"\ntls = { acme = [\"WWW.example.com\", \"api.example.com\"] }\n",
        )
        .unwrap();
        assert_eq!(
            c.listeners[0].edge.acme,
            vec!["www.example.com".to_string(), "api.example.com".to_string()]
        );
        assert!(c.listeners[0].edge.tls.is_empty());
    }
}
