//! Certificate files of TLS-terminating listeners: where they are ([`CertConfig`]), reading a
//! PEM chain and its private key and checking that they match ([`load_cert_pair`]), a
//! listener's whole list ([`load_certs`]) and the rustls crypto provider.
//!
//! The one exception to "config reads no files": validation loads every pair so that
//! `routemesh check` and a reload refuse a bad file with its position; app.rs and
//! `proxy::tls` load them through the same functions at start and on every reload, so a
//! rotated file is picked up. Opens no socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

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
