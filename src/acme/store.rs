//! The etcd keys of ACME state and their values (part of the key schema,
//! `discovery::keys`). Pure: no IO, no clock.
//!
//! ```text
//! {prefix}/acme/account             {"directory":..,"credentials":SEALED}       permanent
//! {prefix}/acme/certs/{name}        {"domains":[..],"chain_pem":..,"key":SEALED,
//!                                    "not_before":..,"not_after":..,"issuer":..,"node":..}
//! {prefix}/acme/status/{name}       {"state":"failed","last_error":..,"failures":N,
//!                                    "retry_at":UNIX,"node":..,"at":UNIX}           permanent
//! {prefix}/acme/challenges/{token}  {"name":..,"domain":..,"kind":"http-01",
//!                                    "key_authorization":..}                     orderer's lease
//! {prefix}/acme/locks/{name}        NODE                                         orderer's lease
//! ```
//! `{name}` is the certificate's first domain. SEALED values are `seal.rs` envelopes whose
//! associated data is the etcd key itself.

use serde::{Deserialize, Serialize};

/// What a key under `{prefix}/acme/` names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AcmeKey {
    Account,
    Cert(String),
    Status(String),
    Challenge(String),
    Lock(String),
}

pub fn acme_prefix(prefix: &str) -> String {
    format!("{prefix}/acme/")
}
pub fn account_key(prefix: &str) -> String {
    format!("{prefix}/acme/account")
}
pub fn cert_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/acme/certs/{name}")
}
pub fn status_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/acme/status/{name}")
}
pub fn challenge_key(prefix: &str, token: &str) -> String {
    format!("{prefix}/acme/challenges/{token}")
}
pub fn lock_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/acme/locks/{name}")
}
pub fn certs_prefix(prefix: &str) -> String {
    format!("{prefix}/acme/certs/")
}
pub fn status_prefix(prefix: &str) -> String {
    format!("{prefix}/acme/status/")
}

/// A certificate name: a lower-case host name.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
}

/// An ACME token: base64url characters.
fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

impl AcmeKey {
    /// Classifies the part of a key after `{prefix}/acme/`; `Err` names the layout.
    pub fn parse(rest: &str) -> Result<AcmeKey, String> {
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["account"] => Ok(AcmeKey::Account),
            ["certs", n] if valid_name(n) => Ok(AcmeKey::Cert(n.to_string())),
            ["status", n] if valid_name(n) => Ok(AcmeKey::Status(n.to_string())),
            ["locks", n] if valid_name(n) => Ok(AcmeKey::Lock(n.to_string())),
            // An etcd lock made by other tools puts its holders under the lock's name.
            ["locks", n, _] if valid_name(n) => Ok(AcmeKey::Lock(n.to_string())),
            ["challenges", t] if valid_token(t) => Ok(AcmeKey::Challenge(t.to_string())),
            _ => Err(
                "unrecognised acme key (expected acme/account, acme/certs/NAME, acme/status/NAME, acme/challenges/TOKEN or acme/locks/NAME)"
                    .into(),
            ),
        }
    }
}

/// `acme/account`: the account shared by every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub directory: String,
    /// The account's credentials (instant-acme's JSON, with its private key), sealed.
    pub credentials: String,
}

/// `acme/certs/{name}`: an issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub domains: Vec<String>,
    /// PEM, leaf first.
    pub chain_pem: String,
    /// The PEM private key, sealed.
    pub key: String,
    /// Unix seconds of the leaf's validity.
    pub not_before: u64,
    pub not_after: u64,
    /// The leaf's issuer (distinguished name).
    #[serde(default)]
    pub issuer: String,
    /// The node that ordered it.
    #[serde(default)]
    pub node: String,
}

/// `acme/status/{name}`: how the last order of a certificate went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// `valid` (last order succeeded) | `failed`.
    pub state: String,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Failed orders in a row (0 after a success).
    #[serde(default)]
    pub failures: u32,
    /// Unix seconds before which no node orders again (backoff after failures).
    #[serde(default)]
    pub retry_at: u64,
    #[serde(default)]
    pub node: String,
    /// Unix seconds of the attempt.
    #[serde(default)]
    pub at: u64,
}

/// `acme/challenges/{token}`: what every node answers while an order is being validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeRecord {
    pub name: String,
    pub domain: String,
    /// `http-01` | `tls-alpn-01`.
    pub kind: String,
    pub key_authorization: String,
}

fn json<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| format!("value is not valid JSON for this key: {e}"))
}

impl CertRecord {
    pub fn parse(value: &[u8]) -> Result<CertRecord, String> {
        let r: CertRecord = json(value)?;
        if r.domains.is_empty() {
            return Err("`domains` is empty".into());
        }
        Ok(r)
    }
}

impl StatusRecord {
    pub fn parse(value: &[u8]) -> Result<StatusRecord, String> {
        json(value)
    }
}

impl ChallengeRecord {
    pub fn parse(value: &[u8]) -> Result<ChallengeRecord, String> {
        json(value)
    }
}

impl AccountRecord {
    pub fn parse(value: &[u8]) -> Result<AccountRecord, String> {
        json(value)
    }
}

pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain struct serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let p = "/rm";
        let rest = |k: String| k.strip_prefix(&acme_prefix(p)).unwrap().to_string();
        for (key, want) in [
            (rest(account_key(p)), AcmeKey::Account),
            (
                rest(cert_key(p, "www.example.com")),
                AcmeKey::Cert("www.example.com".into()),
            ),
            (rest(status_key(p, "a.b")), AcmeKey::Status("a.b".into())),
            (
                rest(challenge_key(p, "tok_EN-1")),
                AcmeKey::Challenge("tok_EN-1".into()),
            ),
            (rest(lock_key(p, "a.b")), AcmeKey::Lock("a.b".into())),
            ("locks/a.b/694d7b1a".into(), AcmeKey::Lock("a.b".into())),
        ] {
            assert_eq!(AcmeKey::parse(&key), Ok(want), "{key}");
        }
        assert!(AcmeKey::parse("certs/A B").is_err());
        assert!(AcmeKey::parse("challenges/a.b").is_err());
        assert!(AcmeKey::parse("other").is_err());
    }

    #[test]
    fn values() {
        let c = CertRecord {
            domains: vec!["a.b".into()],
            chain_pem: "PEM".into(),
            key: "v1:x:y".into(),
            not_before: 1,
            not_after: 2,
            issuer: "CN=x".into(),
            node: "n1".into(),
        };
        assert_eq!(CertRecord::parse(to_json(&c).as_bytes()).unwrap(), c);
        assert!(CertRecord::parse(b"{").is_err());
        let mut empty = c.clone();
        empty.domains.clear();
        assert!(CertRecord::parse(to_json(&empty).as_bytes()).is_err());
        let s = StatusRecord::parse(br#"{"state":"failed"}"#).unwrap();
        assert_eq!(s.failures, 0);
        assert!(ChallengeRecord::parse(br#"{"name":"a"}"#).is_err());
    }
}

/// The ACME records as discovery's table keeps them (one writer; parsed, not yet unsealed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmeTable {
    pub certs: std::collections::BTreeMap<String, CertRecord>,
    pub status: std::collections::BTreeMap<String, StatusRecord>,
    pub challenges: std::collections::BTreeMap<String, ChallengeRecord>,
    /// Certificate name → the node holding its order lock.
    pub locks: std::collections::BTreeMap<String, String>,
}

impl AcmeTable {
    /// Applies a put; `Err` says why the value was skipped (the last good one stays).
    pub fn put(&mut self, key: AcmeKey, value: &[u8]) -> Result<(), String> {
        match key {
            AcmeKey::Account => {}
            AcmeKey::Cert(n) => {
                self.certs.insert(n, CertRecord::parse(value)?);
            }
            AcmeKey::Status(n) => {
                self.status.insert(n, StatusRecord::parse(value)?);
            }
            AcmeKey::Challenge(t) => {
                self.challenges.insert(t, ChallengeRecord::parse(value)?);
            }
            AcmeKey::Lock(n) => {
                self.locks
                    .insert(n, String::from_utf8_lossy(value).trim().to_string());
            }
        }
        Ok(())
    }

    /// Puts back `prev`'s record of `key` (after a bad value for it).
    pub fn restore_from(&mut self, prev: &AcmeTable, key: &AcmeKey) {
        match key {
            AcmeKey::Cert(n) => {
                if let Some(r) = prev.certs.get(n) {
                    self.certs.insert(n.clone(), r.clone());
                }
            }
            AcmeKey::Status(n) => {
                if let Some(r) = prev.status.get(n) {
                    self.status.insert(n.clone(), r.clone());
                }
            }
            _ => {}
        }
    }

    pub fn delete(&mut self, key: AcmeKey) {
        match key {
            AcmeKey::Account => {}
            AcmeKey::Cert(n) => {
                self.certs.remove(&n);
            }
            AcmeKey::Status(n) => {
                self.status.remove(&n);
            }
            AcmeKey::Challenge(t) => {
                self.challenges.remove(&t);
            }
            AcmeKey::Lock(n) => {
                self.locks.remove(&n);
            }
        }
    }
}

/// A certificate as `cert ls` and /routes list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertRow {
    pub name: String,
    pub domains: Vec<String>,
    /// Unix seconds (None before the first issuance).
    pub not_after: Option<u64>,
    pub issuer: String,
    /// `valid` | `renewing` | `ordering` | `failed` | `expired` | `pending`.
    pub state: String,
    pub last_error: Option<String>,
    /// The node that ordered the stored certificate.
    pub ordered_by: Option<String>,
    /// The node holding the order lock now.
    pub locked_by: Option<String>,
}

/// The rows of every certificate named by a record, status or lock, in name order.
pub fn cert_rows(t: &AcmeTable, now: u64) -> Vec<CertRow> {
    let names: std::collections::BTreeSet<&String> = t
        .certs
        .keys()
        .chain(t.status.keys())
        .chain(t.locks.keys())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let cert = t.certs.get(name);
            let status = t.status.get(name);
            let lock = t.locks.get(name);
            let failed = status.filter(|s| s.state == "failed");
            let state = match (cert, lock, failed) {
                (Some(c), _, _) if c.not_after <= now => "expired",
                (Some(_), Some(_), _) => "renewing",
                (None, Some(_), _) => "ordering",
                (_, None, Some(_)) => "failed",
                (Some(_), None, None) => "valid",
                (None, None, None) => "pending",
            };
            CertRow {
                name: name.clone(),
                domains: cert.map(|c| c.domains.clone()).unwrap_or_default(),
                not_after: cert.map(|c| c.not_after),
                issuer: cert.map(|c| c.issuer.clone()).unwrap_or_default(),
                state: state.to_string(),
                last_error: failed.and_then(|s| s.last_error.clone()),
                ordered_by: cert.map(|c| c.node.clone()),
                locked_by: lock.cloned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod row_tests {
    use super::*;

    #[test]
    fn states() {
        let mut t = AcmeTable::default();
        let cert = CertRecord {
            domains: vec!["a".into()],
            chain_pem: String::new(),
            key: String::new(),
            not_before: 0,
            not_after: 100,
            issuer: "CN=ca".into(),
            node: "n1".into(),
        };
        t.certs.insert("a".into(), cert);
        assert_eq!(cert_rows(&t, 50)[0].state, "valid");
        assert_eq!(cert_rows(&t, 100)[0].state, "expired");
        t.locks.insert("a".into(), "n2".into());
        assert_eq!(cert_rows(&t, 50)[0].state, "renewing");
        t.locks.clear();
        t.status.insert(
            "a".into(),
            StatusRecord {
                state: "failed".into(),
                last_error: Some("CA down".into()),
                failures: 1,
                retry_at: 80,
                node: "n2".into(),
                at: 50,
            },
        );
        let r = &cert_rows(&t, 60)[0];
        assert_eq!(r.state, "failed");
        assert_eq!(r.last_error.as_deref(), Some("CA down"));
        t.certs.clear();
        t.locks.insert("b".into(), "n3".into());
        let rows = cert_rows(&t, 60);
        assert_eq!(rows[1].state, "ordering");
        assert_eq!(rows[1].locked_by.as_deref(), Some("n3"));
    }
}
