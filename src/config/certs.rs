//! Certificate files of TLS-terminating listeners: where they are ([`CertConfig`]), reading a
//! PEM chain and its private key and checking that they match ([`load_cert_pair`]), a
//! listener's whole list ([`load_certs`]) and the rustls crypto provider.
//!
//! The one exception to "config reads no files": validation loads every pair so that
//! `routemesh check` and a reload refuse a bad file with its position; app.rs and
//! `proxy::tls` load them through the same functions at start and on every reload, so a
//! rotated file is picked up. Opens no socket.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::error::Issues;
use super::file::S;
use super::values::{resolve, server_name, span};

/// `[[listener]] tls = { cert, key }` or `[[listener.tls.cert]]` tables.
#[derive(Debug, Default, Deserialize)]
pub struct RawListenerTls {
    /// A path (with `key`), or an array of `{ sni, cert, key }` tables.
    pub cert: Option<S<toml::Value>>,
    pub key: Option<S<String>>,
    /// `acme = ["www.example.com", ...]`: one certificate for these names from `[acme]`.
    pub acme: Option<S<Vec<S<String>>>>,
}

/// One `[[listener.tls.cert]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertEntry {
    pub sni: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// One certificate of a TLS-terminating listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertConfig {
    /// Exact name or `*.suffix`, lower-cased; `None` only for the single-cert form.
    pub sni: Option<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate pair cannot be used, and which of the two files is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate {path}: {why}")]
    Cert { path: String, why: String },
    #[error("private key {path}: {why}")]
    Key { path: String, why: String },
}

/// The crypto provider of TLS termination: rustls' `ring` (also what etcd-client uses).
pub fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or
/// SEC1) and checks that the key belongs to the leaf certificate.
pub fn load_cert_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
    let cert_err = |why: String| CertError::Cert {
        path: cert.display().to_string(),
        why,
    };
    let key_err = |why: String| CertError::Key {
        path: key.display().to_string(),
        why,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| cert_err(format!("cannot read it: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err(
            "no \"-----BEGIN CERTIFICATE-----\" block found".into(),
        ));
    }
    let key_pem = std::fs::read(key).map_err(|e| key_err(format!("cannot read it: {e}")))?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => key_err(
            "no \"-----BEGIN PRIVATE KEY-----\" (or RSA / EC PRIVATE KEY) block found".into(),
        ),
        e => key_err(format!("invalid PEM: {e}")),
    })?;
    CertifiedKey::from_der(chain, der, &tls_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_err(format!(
            "does not match the certificate {} (its public key differs)",
            cert.display()
        )),
        rustls::Error::General(why) => key_err(format!("unusable key: {why}")),
        e => cert_err(format!("unusable: {e}")),
    })
}

/// Certificates loaded from `[[listener.tls.cert]]` (or `tls = { cert, key }`), in config
/// order: the SNI pattern (`None` for the single-cert form) and the key pair.
pub type LoadedCerts = Vec<(Option<String>, Arc<CertifiedKey>)>;

/// Reads every certificate pair of a listener; all or nothing.
pub fn load_certs(certs: &[CertConfig]) -> Result<LoadedCerts, CertError> {
    certs
        .iter()
        .map(|c| Ok((c.sni.clone(), Arc::new(load_cert_pair(&c.cert, &c.key)?))))
        .collect()
}

/// Reports why a certificate pair cannot be loaded, at the position of the file at fault.
fn check_pair(
    issues: &mut Issues,
    c: &CertConfig,
    cert_at: Range<usize>,
    key_at: Range<usize>,
    which: &str,
) {
    match load_cert_pair(&c.cert, &c.key) {
        Ok(_) => {}
        Err(e @ CertError::Cert { .. }) => issues.at(
            cert_at,
            format!("{which}: {e}; give a PEM certificate chain, leaf first"),
        ),
        Err(e @ CertError::Key { .. }) => issues.at(
            key_at,
            format!("{which}: {e}; give the PEM private key of the certificate"),
        ),
    }
}

/// The `tls` key of an http listener: one pair (`tls = { cert, key }`) or a list of
/// `[[listener.tls.cert]]` tables, the first one the default and every other one with `sni`.
/// With `load`, every pair is read and checked now, so a bad file is refused with its position.
/// Also returns the names of `acme = [...]` (lower-cased, in order; empty without it).
pub(super) fn validate(
    issues: &mut Issues,
    config_path: &Path,
    t: &S<RawListenerTls>,
    load: bool,
) -> (Vec<CertConfig>, Vec<String>) {
    let raw = t.get_ref();
    let mut out = Vec::new();
    let acme = acme_names(issues, raw.acme.as_ref());
    match raw.cert.as_ref().map(|c| (c, c.get_ref())) {
        None if raw.acme.is_some() => {
            if let Some(k) = &raw.key {
                issues.at(span(k), "`listener.tls.key` needs `cert` beside it");
            }
        }
        None => issues.at(
            span(t),
            "`listener.tls` needs `cert` and `key` (PEM files), [[listener.tls.cert]] tables, or `acme = [\"NAME\", ...]`",
        ),
        Some((c, toml::Value::String(cert))) => match &raw.key {
            Some(key) => {
                let entry = CertConfig {
                    sni: None,
                    cert: resolve(config_path, cert),
                    key: resolve(config_path, key.get_ref()),
                };
                if load {
                    check_pair(issues, &entry, span(c), span(key), "`listener.tls`");
                }
                out.push(entry);
            }
            None => issues.at(
                span(t),
                "`listener.tls` needs `key`, the PEM private key of `cert`",
            ),
        },
        Some((c, toml::Value::Array(entries))) => {
            if let Some(k) = &raw.key {
                issues.at(
                    span(k),
                    "with [[listener.tls.cert]] tables, put `key` in each table",
                );
            }
            if entries.is_empty() {
                issues.at(
                    span(c),
                    "[[listener.tls.cert]]: list at least one certificate",
                );
            }
            for (i, e) in entries.iter().enumerate() {
                out.extend(cert_table(issues, config_path, c, i + 1, e, load));
            }
        }
        Some((c, _)) => issues.at(
            span(c),
            "`listener.tls.cert`: write a PEM path (with `key`) or [[listener.tls.cert]] tables",
        ),
    }
    (out, acme)
}

/// `tls.acme`: 1 to 100 host names (no wildcards: http-01 and tls-alpn-01 cannot prove
/// them), lower-cased, without repeats.
fn acme_names(issues: &mut Issues, raw: Option<&S<Vec<S<String>>>>) -> Vec<String> {
    let Some(list) = raw else {
        return Vec::new();
    };
    if list.get_ref().is_empty() || list.get_ref().len() > 100 {
        issues.at(
            span(list),
            "`listener.tls.acme`: list 1 to 100 host names, e.g. acme = [\"www.example.com\"]",
        );
    }
    let mut out: Vec<String> = Vec::new();
    for n in list.get_ref() {
        match server_name(n.get_ref()) {
            Some(name) if !name.starts_with("*.") => {
                if !out.contains(&name) {
                    out.push(name);
                }
            }
            Some(_) => issues.at(
                span(n),
                format!(
                    "`listener.tls.acme`: {:?} is a wildcard, which http-01 and tls-alpn-01 cannot prove; list the names",
                    n.get_ref()
                ),
            ),
            None => issues.at(
                span(n),
                format!(
                    "`listener.tls.acme`: {:?} is not a host name",
                    n.get_ref()
                ),
            ),
        }
    }
    out
}

/// The `n`th `[[listener.tls.cert]]` table, `e`; problems are reported at the `cert` array
/// `c` (the tables' values carry no position of their own), naming the table by number.
fn cert_table(
    issues: &mut Issues,
    config_path: &Path,
    c: &S<toml::Value>,
    n: usize,
    e: &toml::Value,
    load: bool,
) -> Option<CertConfig> {
    let parsed: Result<RawCertEntry, _> = e.clone().try_into();
    let (sni, cert, key) = match parsed {
        Ok(RawCertEntry {
            sni,
            cert: Some(cert),
            key: Some(key),
        }) => (sni, cert, key),
        Ok(_) => {
            issues.at(
                span(c),
                format!("[[listener.tls.cert]] #{n}: needs `cert` and `key`"),
            );
            return None;
        }
        Err(e) => {
            issues.at(
                span(c),
                format!(
                    "[[listener.tls.cert]] #{n}: {} (keys: sni, cert, key)",
                    e.message().trim()
                ),
            );
            return None;
        }
    };
    let sni = match sni.as_deref().map(server_name) {
        None => None,
        Some(Some(name)) => Some(name),
        Some(None) => {
            issues.at(
                span(c),
                format!(
                    "[[listener.tls.cert]] #{n}: `sni` = {sni:?} is not a host name or *.suffix"
                ),
            );
            None
        }
    };
    if sni.is_none() && n > 1 {
        issues.at(
            span(c),
            format!("[[listener.tls.cert]] #{n}: every certificate after the first (the default) needs `sni`"),
        );
    }
    let entry = CertConfig {
        sni,
        cert: resolve(config_path, &cert),
        key: resolve(config_path, &key),
    };
    if load {
        let which = format!("[[listener.tls.cert]] #{n}");
        check_pair(issues, &entry, span(c), span(c), &which);
    }
    Some(entry)
}
