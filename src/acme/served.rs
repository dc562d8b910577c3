//! What every node serves from the routing snapshot: ACME certificates (unsealed with this
//! node's key), http-01 answers by token and tls-alpn-01 certificates by name. Built by
//! discovery's one writer from the table's records, reusing what did not change; read
//! lock-free by the TLS resolver and the HTTP engine. No IO.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::seal::{self, SealKey};
use super::store::{AcmeTable, CertRecord, ChallengeRecord, StatusRecord, cert_key};
use crate::config::certs::tls_provider;

/// The ALPN protocol of tls-alpn-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// One stored certificate as this node serves it.
#[derive(Debug)]
pub struct ServedCert {
    pub record: CertRecord,
    /// The key pair, or why this node cannot serve it (wrong key_file, bad PEM).
    pub key: Result<Arc<CertifiedKey>, String>,
}

/// The ACME part of a snapshot.
#[derive(Debug, Default)]
pub struct AcmeSnapshot {
    pub certs: BTreeMap<String, Arc<ServedCert>>,
    pub status: BTreeMap<String, StatusRecord>,
    pub locks: BTreeMap<String, String>,
    /// http-01: token → key authorization.
    pub http01: HashMap<String, String>,
    /// tls-alpn-01: domain → the challenge certificate.
    pub alpn: HashMap<String, Arc<CertifiedKey>>,
    /// The table this was built from (for /routes).
    pub table: AcmeTable,
    /// The challenge records the maps above were built from (reused when unchanged).
    challenges: BTreeMap<String, (ChallengeRecord, Option<Arc<CertifiedKey>>)>,
}

impl AcmeSnapshot {
    /// The key pair of certificate `name`, if this node can serve it.
    pub fn key_of(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.certs
            .get(name)
            .and_then(|c| c.key.as_ref().ok().cloned())
    }

    /// The certificates as /routes lists them: the cluster's rows, with this node's own
    /// error when it cannot serve one (e.g. another key_file), and `serving`.
    pub fn rows_json(&self, now: u64) -> Vec<serde_json::Value> {
        super::store::cert_rows(&self.table, now)
            .into_iter()
            .map(|row| {
                let own = self
                    .certs
                    .get(&row.name)
                    .map(|c| c.key.as_ref().err().cloned());
                let serving = matches!(own, Some(None));
                let mut v = serde_json::to_value(&row).unwrap_or_default();
                if let Some(Some(e)) = own {
                    v["last_error"] = serde_json::Value::String(e);
                }
                v["serving"] = serde_json::Value::Bool(serving);
                v
            })
            .collect()
    }

    /// Whether a challenge with this token is being answered.
    pub fn has_challenge(&self, token: &str) -> bool {
        self.challenges.contains_key(token)
    }
}

/// Unseals and parses a stored certificate. `key` is None on a node without `[acme]`.
pub fn unseal(
    prefix: &str,
    name: &str,
    record: &CertRecord,
    key: Option<&SealKey>,
) -> Result<Arc<CertifiedKey>, String> {
    let etcd_key = cert_key(prefix, name);
    let Some(key) = key else {
        return Err(format!(
            "the private key in {etcd_key} is sealed and this node has no [acme] key_file"
        ));
    };
    let chain = CertificateDer::pem_slice_iter(record.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{etcd_key}: certificate chain: invalid PEM: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "{etcd_key}: certificate chain holds no certificate"
        ));
    }
    let pem = seal::open(key, &etcd_key, &record.key)
        .map_err(|e| format!("private key in {etcd_key}: {e}"))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("private key in {etcd_key}: invalid PEM: {e}"))?;
    CertifiedKey::from_der(chain, der, &tls_provider())
        .map(Arc::new)
        .map_err(|e| format!("{etcd_key}: unusable key pair: {e}"))
}

/// The self-signed certificate a tls-alpn-01 challenge is answered with (RFC 8737 §3):
/// the domain as its only name and the SHA-256 of the key authorization in acmeIdentifier.
pub fn alpn_certificate(
    domain: &str,
    key_authorization: &str,
) -> Result<Arc<CertifiedKey>, String> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let pair = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&pair).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()));
    // Not `from_der`: its consistency check parses the certificate with webpki, which
    // refuses the critical acmeIdentifier extension the CA needs.
    let signing = tls_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Builds the ACME part of the next snapshot, reusing `prev`'s unsealed certificates and
/// challenge certificates whose records did not change. Returns it and the errors that are
/// new (to be logged once).
pub fn build(
    table: &AcmeTable,
    prefix: &str,
    key: Option<&SealKey>,
    prev: &AcmeSnapshot,
) -> (AcmeSnapshot, Vec<String>) {
    let mut new_errors = Vec::new();
    let mut certs = BTreeMap::new();
    for (name, record) in &table.certs {
        let served = match prev.certs.get(name) {
            Some(p) if p.record == *record => p.clone(),
            _ => {
                let key = unseal(prefix, name, record, key);
                if let Err(e) = &key {
                    new_errors.push(format!("certificate {name}: {e}"));
                }
                Arc::new(ServedCert {
                    record: record.clone(),
                    key,
                })
            }
        };
        certs.insert(name.clone(), served);
    }
    let mut challenges = BTreeMap::new();
    let mut http01 = HashMap::new();
    let mut alpn = HashMap::new();
    for (token, rec) in &table.challenges {
        let cert = match prev.challenges.get(token) {
            Some((p, c)) if p == rec => c.clone(),
            _ if rec.kind == "tls-alpn-01" => {
                match alpn_certificate(&rec.domain, &rec.key_authorization) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        new_errors.push(format!("tls-alpn-01 challenge for {}: {e}", rec.domain));
                        None
                    }
                }
            }
            _ => None,
        };
        if rec.kind == "http-01" {
            http01.insert(token.clone(), rec.key_authorization.clone());
        }
        if let Some(c) = &cert {
            alpn.insert(rec.domain.clone(), c.clone());
        }
        challenges.insert(token.clone(), (rec.clone(), cert));
    }
    (
        AcmeSnapshot {
            certs,
            status: table.status.clone(),
            locks: table.locks.clone(),
            http01,
            alpn,
            challenges,
            table: table.clone(),
        },
        new_errors,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::acme::SealKeyBytes;

    /// A self-signed pair for `name`, as PEM (chain, key).
    fn pair(name: &str) -> (String, String) {
        let p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        (c.pem(), k.serialize_pem())
    }

    #[test]
    fn unseals_with_the_right_key_only() {
        let key = SealKey::new(&SealKeyBytes([3; 32]));
        let other = SealKey::new(&SealKeyBytes([4; 32]));
        let (chain, pk) = pair("a.example");
        let record = CertRecord {
            domains: vec!["a.example".into()],
            chain_pem: chain,
            key: seal::seal_random(&key, &cert_key("/rm", "a.example"), pk.as_bytes()).unwrap(),
            not_before: 0,
            not_after: 10,
            issuer: String::new(),
            node: "n1".into(),
        };
        let mut table = AcmeTable::default();
        table.certs.insert("a.example".into(), record.clone());
        table.challenges.insert(
            "tok".into(),
            ChallengeRecord {
                name: "a.example".into(),
                domain: "a.example".into(),
                kind: "http-01".into(),
                key_authorization: "tok.thumb".into(),
            },
        );
        let (snap, errors) = build(&table, "/rm", Some(&key), &AcmeSnapshot::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert!(snap.key_of("a.example").is_some());
        assert_eq!(
            snap.http01.get("tok").map(String::as_str),
            Some("tok.thumb")
        );
        // Unchanged: the same Arc, no new error.
        let (again, errors) = build(&table, "/rm", Some(&key), &snap);
        assert!(errors.is_empty());
        assert!(Arc::ptr_eq(
            &again.certs["a.example"],
            &snap.certs["a.example"]
        ));
        // Another key file: a clear error naming the etcd key and both key ids; no panic.
        let (bad, errors) = build(&table, "/rm", Some(&other), &AcmeSnapshot::default());
        assert!(bad.key_of("a.example").is_none());
        assert_eq!(errors.len(), 1);
        let e = &errors[0];
        assert!(e.contains("/rm/acme/certs/a.example"), "{e}");
        assert!(e.contains(key.id()) && e.contains(other.id()), "{e}");
        let (_, errors) = build(&table, "/rm", None, &AcmeSnapshot::default());
        assert!(errors[0].contains("no [acme] key_file"), "{errors:?}");
    }

    #[test]
    fn alpn_challenge_certificates() {
        let mut table = AcmeTable::default();
        table.challenges.insert(
            "t".into(),
            ChallengeRecord {
                name: "a.example".into(),
                domain: "a.example".into(),
                kind: "tls-alpn-01".into(),
                key_authorization: "t.thumb".into(),
            },
        );
        let (snap, errors) = build(&table, "/rm", None, &AcmeSnapshot::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert!(snap.alpn.contains_key("a.example"));
        assert!(snap.http01.is_empty());
    }
}
