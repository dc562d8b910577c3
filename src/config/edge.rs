//! Edge and security keys: PROXY protocol, connection limits, TLS (termination on http
//! listeners, SNI passthrough on tls listeners) and etcd TLS/auth. The raw serde shapes and
//! their validation live here; `file.rs` and `mod.rs` only hold one field and one call each.
//!
//! Paths are kept as given (relative ones resolved against the config file's directory) and
//! read again by their users, so a reload or a reconnect picks up rotated files. The one
//! exception to "config reads no files": the certificates of TLS-terminating listeners are
//! loaded and checked (PEM, key matching the certificate) at validation by
//! [`load_cert_pair`], so `routemesh check` and a reload refuse a bad file with its position;
//! the proxy loads them through the same function. Opens no socket.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::error::Issues;
use super::file::{RawDiscovery, RawListener, S};
use super::{Protocol, ServiceName};

// ---------------------------------------------------------------------------------------------
// Raw shapes

/// `[[listener]] tls = { cert, key }` or `[[listener.tls.cert]]` tables.
#[derive(Debug, Default, Deserialize)]
pub struct RawListenerTls {
    /// A path (with `key`), or an array of `{ sni, cert, key }` tables.
    pub cert: Option<S<toml::Value>>,
    pub key: Option<S<String>>,
}

/// One `[[listener.tls.cert]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertEntry {
    pub sni: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// `[discovery] tls = { ca, cert, key }`.
#[derive(Debug, Default, Deserialize)]
pub struct RawEtcdTls {
    pub ca: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
}

// ---------------------------------------------------------------------------------------------
// Validated values

/// Which PROXY protocol header a service's upstream connections start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// An IP network such as `10.0.0.0/8` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr: ip, prefix })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
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

/// A `[[listener.route]]` of a `protocol = "tls"` listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// Exact name or `*.suffix`, lower-cased.
    pub sni: String,
    pub service: ServiceName,
}

/// Edge settings of one listener, read by the admission step and the TLS code in `proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerEdge {
    /// Read a PROXY protocol header (v1 or v2) first; required from `trusted_proxies`.
    pub accept_proxy: bool,
    /// Sources allowed to send a PROXY header; connections from anyone else are closed.
    pub trusted_proxies: Vec<Cidr>,
    /// Most connections open at once on this listener (`None` = no limit).
    pub max_connections: Option<usize>,
    /// Most connections open at once from one client IP (`None` = no limit).
    pub max_connections_per_ip: Option<usize>,
    /// Bound on reading a PROXY header, a ClientHello, and a TLS handshake.
    pub handshake_timeout: Duration,
    /// http listeners: terminate TLS with these certificates (first = default).
    pub tls: Vec<CertConfig>,
    /// tls listeners: routes by SNI, first match wins; `service` is the default.
    pub sni_routes: Vec<SniRoute>,
    /// tls listeners: the largest ClientHello read before routing.
    pub max_client_hello_bytes: usize,
}

impl Default for ListenerEdge {
    fn default() -> Self {
        ListenerEdge {
            accept_proxy: false,
            trusted_proxies: Vec::new(),
            max_connections: None,
            max_connections_per_ip: None,
            handshake_timeout: Duration::from_secs(10),
            tls: Vec::new(),
            sni_routes: Vec::new(),
            max_client_hello_bytes: 16 * 1024,
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Validation

fn span<T>(v: &S<T>) -> std::ops::Range<usize> {
    v.span()
}

/// Relative paths are relative to the config file.
fn resolve(config: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }
}

/// Exact host name or `*.suffix`, lower-cased.
fn server_name(s: &str) -> Option<String> {
    let v = s.trim().to_ascii_lowercase();
    let bare = v.strip_prefix("*.").unwrap_or(&v);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && !bare.starts_with('.')
        && !bare.ends_with('.')
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    ok.then_some(v)
}

fn limit(issues: &mut Issues, v: &Option<S<i64>>, key: &str) -> Option<usize> {
    let v = v.as_ref()?;
    match *v.get_ref() {
        0 => None,
        n if (1..=10_000_000).contains(&n) => Some(n as usize),
        n => {
            issues.at(
                span(v),
                format!("`{key}` = {n}: use 1 to 10000000, or 0 for no limit"),
            );
            None
        }
    }
}

/// The edge settings of one `[[listener]]`; also validates its routes' `sni` keys.
pub(crate) fn listener(
    issues: &mut Issues,
    config_path: &Path,
    l: &RawListener,
    protocol: Protocol,
) -> ListenerEdge {
    let def = ListenerEdge::default();
    let accept_proxy = l.accept_proxy.as_ref().is_some_and(|v| *v.get_ref());
    let mut trusted_proxies = Vec::new();
    if let Some(list) = &l.trusted_proxies {
        for p in list.get_ref() {
            match Cidr::parse(p.get_ref().trim()) {
                Some(c) => trusted_proxies.push(c),
                None => issues.at(
                    span(p),
                    format!(
                        "`listener.trusted_proxies`: {:?} is not an address or network; write e.g. \"10.0.0.0/8\" or \"192.168.1.5\"",
                        p.get_ref()
                    ),
                ),
            }
        }
        if !accept_proxy {
            issues.at(
                span(list),
                "`listener.trusted_proxies` needs accept_proxy = true on the same listener",
            );
        }
    }
    if accept_proxy
        && l.trusted_proxies
            .as_ref()
            .is_none_or(|t| t.get_ref().is_empty())
    {
        let at = l.accept_proxy.as_ref().map(span).unwrap_or(0..0);
        issues.at(
            at,
            "`listener.accept_proxy = true` needs `trusted_proxies`, the load balancers allowed to send the header, e.g. [\"10.0.0.0/8\"]",
        );
    }
    let max_connections = limit(issues, &l.max_connections, "listener.max_connections");
    let max_connections_per_ip = limit(
        issues,
        &l.max_connections_per_ip,
        "listener.max_connections_per_ip",
    );
    let handshake_timeout = match &l.handshake_timeout {
        None => def.handshake_timeout,
        Some(v) => match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if !d.is_zero() && d <= Duration::from_secs(3600) => d,
            _ => {
                issues.at(
                    span(v),
                    format!(
                        "`listener.handshake_timeout` = {:?}: write a duration from \"1ms\" to \"1h\", e.g. \"10s\"",
                        v.get_ref()
                    ),
                );
                def.handshake_timeout
            }
        },
    };
    let max_client_hello_bytes = match &l.max_client_hello_bytes {
        None => def.max_client_hello_bytes,
        Some(v) if (512..=65536).contains(v.get_ref()) => *v.get_ref() as usize,
        Some(v) => {
            issues.at(
                span(v),
                "`listener.max_client_hello_bytes`: use 512 to 65536",
            );
            def.max_client_hello_bytes
        }
    };
    if protocol != Protocol::Tls && l.max_client_hello_bytes.is_some() {
        let at = l.max_client_hello_bytes.as_ref().map(span).unwrap_or(0..0);
        issues.at(
            at,
            "`listener.max_client_hello_bytes` is only for protocol = \"tls\" listeners",
        );
    }

    // tls = { cert, key } | [[listener.tls.cert]]
    let mut tls = Vec::new();
    if let Some(t) = &l.tls {
        if protocol != Protocol::Http {
            issues.at(
                span(t),
                "`listener.tls` terminates TLS on protocol = \"http\" listeners; for SNI routing without terminating use protocol = \"tls\" and no `tls` key",
            );
        }
        tls = listener_certs(issues, config_path, t, protocol == Protocol::Http);
    }

    // SNI routes (tls listeners); `sni` anywhere else is an error.
    let mut sni_routes = Vec::new();
    for r in &l.route {
        let rr = r.get_ref();
        if protocol != Protocol::Tls {
            if let Some(s) = &rr.sni {
                issues.at(
                    span(s),
                    "`route.sni` is only for protocol = \"tls\" listeners (http listeners route by `host`)",
                );
            }
            continue;
        }
        if let Some(h) = rr.host.as_ref() {
            issues.at(
                span(h),
                "protocol = \"tls\" listeners route by `sni`, not `host`",
            );
        }
        if let Some(p) = rr.path_prefix.as_ref() {
            issues.at(
                span(p),
                "protocol = \"tls\" listeners cannot see paths: remove `path_prefix`",
            );
        }
        let sni = match &rr.sni {
            None => {
                issues.at(
                    span(r),
                    "[[listener.route]] of a tls listener needs `sni`, e.g. sni = \"mqtt.example.com\" or \"*.example.com\"",
                );
                None
            }
            Some(s) => match server_name(s.get_ref()) {
                Some(n) => Some(n),
                None => {
                    issues.at(
                        span(s),
                        format!(
                            "`route.sni` = {:?}: write a host name (\"mqtt.example.com\") or a wildcard (\"*.example.com\")",
                            s.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let service = match &rr.service {
            None => {
                issues.at(span(r), "[[listener.route]] needs `service`");
                None
            }
            Some(v) => match ServiceName::new(v.get_ref()) {
                Ok(n) => Some(n),
                Err(e) => {
                    issues.at(span(v), format!("`route.service`: {e}"));
                    None
                }
            },
        };
        if let (Some(sni), Some(service)) = (sni, service) {
            sni_routes.push(SniRoute { sni, service });
        }
    }

    ListenerEdge {
        accept_proxy,
        trusted_proxies,
        max_connections,
        max_connections_per_ip,
        handshake_timeout,
        tls,
        sni_routes,
        max_client_hello_bytes,
    }
}

/// Reports why a certificate pair cannot be loaded, at the position of the file at fault.
fn check_pair(
    issues: &mut Issues,
    c: &CertConfig,
    cert_at: std::ops::Range<usize>,
    key_at: std::ops::Range<usize>,
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

fn listener_certs(
    issues: &mut Issues,
    config_path: &Path,
    t: &S<RawListenerTls>,
    load: bool,
) -> Vec<CertConfig> {
    let raw = t.get_ref();
    let mut out = Vec::new();
    match raw.cert.as_ref().map(|c| (c, c.get_ref())) {
        None => issues.at(
            span(t),
            "`listener.tls` needs `cert` and `key` (PEM files), or [[listener.tls.cert]] tables",
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
                let parsed: Result<RawCertEntry, _> = e.clone().try_into();
                match parsed {
                    Ok(RawCertEntry {
                        sni,
                        cert: Some(cert),
                        key: Some(key),
                    }) => {
                        let sni = match sni.as_deref().map(server_name) {
                            None => None,
                            Some(Some(n)) => Some(n),
                            Some(None) => {
                                issues.at(
                                    span(c),
                                    format!("[[listener.tls.cert]] #{}: `sni` = {sni:?} is not a host name or *.suffix", i + 1),
                                );
                                None
                            }
                        };
                        if sni.is_none() && i > 0 {
                            issues.at(
                                span(c),
                                format!("[[listener.tls.cert]] #{}: every certificate after the first (the default) needs `sni`", i + 1),
                            );
                        }
                        let entry = CertConfig {
                            sni,
                            cert: resolve(config_path, &cert),
                            key: resolve(config_path, &key),
                        };
                        if load {
                            let which = format!("[[listener.tls.cert]] #{}", i + 1);
                            check_pair(issues, &entry, span(c), span(c), &which);
                        }
                        out.push(entry);
                    }
                    Ok(_) => issues.at(
                        span(c),
                        format!("[[listener.tls.cert]] #{}: needs `cert` and `key`", i + 1),
                    ),
                    Err(e) => issues.at(
                        span(c),
                        format!(
                            "[[listener.tls.cert]] #{}: {} (keys: sni, cert, key)",
                            i + 1,
                            e.message().trim()
                        ),
                    ),
                }
            }
        }
        Some((c, _)) => issues.at(
            span(c),
            "`listener.tls.cert`: write a PEM path (with `key`) or [[listener.tls.cert]] tables",
        ),
    }
    out
}

/// `send_proxy` of a `[service.NAME]`.
pub(crate) fn send_proxy(issues: &mut Issues, v: &Option<S<String>>) -> Option<ProxyVersion> {
    let v = v.as_ref()?;
    match v.get_ref().as_str() {
        "v1" => Some(ProxyVersion::V1),
        "v2" => Some(ProxyVersion::V2),
        other => {
            issues.at(
                span(v),
                format!(
                    "`service.send_proxy` = {other:?}: use \"v1\" or \"v2\" (or remove the key)"
                ),
            );
            None
        }
    }
}

/// `[discovery] tls`, `username`, `password`, `password_file`; `endpoints` are the validated
/// URLs (https:// needs `tls`, `tls` needs https://).
pub(crate) fn etcd_security(
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
    use super::*;
    use crate::config::Config;

    fn parse(src: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(Path::new("/etc/routemesh/t.toml"), src)
    }

    fn err(src: &str) -> String {
        parse(src).unwrap_err().to_string()
    }

    /// A self-signed EC certificate for test.invalid (valid until 2126) and its key; test
    /// fixtures only, never used outside these tests.
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBnTCCAUSgAwIBAgIUaT72GDKwN2PasKXwP6VOxDnnoCQwCgYIKoZIzj0EAwIw\nFzEVMBMGA1UEAwwMdGVzdC5pbnZhbGlkMCAXDTI2MTEyNzIxNTEwOFoYDzIxMjYx\nMTAzMjE1MTA4WjAXMRUwEwYDVQQDDAx0ZXN0LmludmFsaWQwWTATBgcqhkjOPQIB\nBggqhkjOPQMBBwNCAAQnHVw0H/UVZiREpi2Ypaz5OMXhFq7UEbqPM/7kTC5xGgCs\nVw2mHFyLulpWiN6uTSBPt4V0KQ5UX2PtxAmeIO9wo2wwajAdBgNVHQ4EFgQUb5a+\nr/nA80Ua/RJjfidWmfcpKLYwHwYDVR0jBBgwFoAUb5a+r/nA80Ua/RJjfidWmfcp\nKLYwDwYDVR0TAQH/BAUwAwEB/zAXBgNVHREEEDAOggx0ZXN0LmludmFsaWQwCgYI\nKoZIzj0EAwIDRwAwRAIgTH+rhhMwnfns8OfkcrSin4lNW51i0iSAIFMd8YlCp18C\nICFNNJufZY2kXcfDxlRScgJCYMiId4IdFn4kcGizvWZg\n-----END CERTIFICATE-----\n";
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg7eGo3PXkmG8Pcl6t\n/kOkqqUREQpJb1y+n1EF/Sq1+MGhRANCAAQnHVw0H/UVZiREpi2Ypaz5OMXhFq7U\nEbqPM/7kTC5xGgCsVw2mHFyLulpWiN6uTSBPt4V0KQ5UX2PtxAmeIO9w\n-----END PRIVATE KEY-----\n";
    /// A key of another certificate.
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5jT8i5yeMP+goROM\n5xFbVKzhNWVv9UuoqdK7CyG6nIihRANCAARNd2VdSBZ4wT7BqVP2uAHMoUln3kKW\nmxjvS0w9AJUx2i8CVfPrWPtSsI5yDR3M1OtWLfaA3O0pYY7txQOT2rq0\n-----END PRIVATE KEY-----\n";

    /// A temp dir with `NAME.pem` + `NAME-key.pem` (a matching pair) for each of `names`.
    fn pem_dir(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(dir.path().join(format!("{n}.pem")), TEST_CERT).unwrap();
            std::fs::write(dir.path().join(format!("{n}-key.pem")), TEST_KEY).unwrap();
        }
        dir
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!(
            Cidr::parse("127.0.0.1")
                .unwrap()
                .contains("127.0.0.1".parse().unwrap())
        );
        assert!(
            !Cidr::parse("127.0.0.1")
                .unwrap()
                .contains("127.0.0.2".parse().unwrap())
        );
        assert!(
            Cidr::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("nope"), None);
    }

    #[test]
    fn edge_keys_parse() {
        let dir = pem_dir(&["a", "b", "c"]);
        let c = Config::parse(
            &dir.path().join("t.toml"),
            r#"
[discovery]
endpoints = ["https://10.0.0.1:2379"]
tls = { ca = "ca.pem", cert = "/abs/client.pem", key = "client-key.pem" }
username = "routemesh"
password_file = "etcd-pass"
[[listener]]
listen = "0.0.0.0:443"
protocol = "tls"
service = "web"
accept_proxy = true
trusted_proxies = ["10.0.0.0/8", "192.168.1.5"]
max_connections = 1000
max_connections_per_ip = 0
handshake_timeout = "3s"
[[listener.route]]
sni = "*.Example.com"
service = "mqtt"
[[listener]]
listen = "0.0.0.0:8443"
protocol = "http"
service = "web"
[[listener.tls.cert]]
cert = "a.pem"
key = "a-key.pem"
[[listener.tls.cert]]
sni = "b.example.com"
cert = "b.pem"
key = "b-key.pem"
[[listener]]
listen = "0.0.0.0:9443"
protocol = "http"
service = "web"
tls = { cert = "c.pem", key = "c-key.pem" }
[service.mqtt]
send_proxy = "v2"
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = &c.listeners[0].edge;
        assert!(e.accept_proxy);
        assert_eq!(e.trusted_proxies.len(), 2);
        assert_eq!(e.max_connections, Some(1000));
        assert_eq!(e.max_connections_per_ip, None);
        assert_eq!(e.handshake_timeout, Duration::from_secs(3));
        assert_eq!(e.sni_routes[0].sni, "*.example.com");
        let t = &c.listeners[1].edge.tls;
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].cert, dir.path().join("a.pem"));
        assert_eq!(t[1].sni.as_deref(), Some("b.example.com"));
        assert_eq!(c.listeners[2].edge.tls[0].key, dir.path().join("c-key.pem"));
        let s = c.service_settings(&ServiceName::new("mqtt").unwrap());
        assert_eq!(s.send_proxy, Some(ProxyVersion::V2));
        let sec = &c.discovery.security;
        assert_eq!(
            sec.tls.as_ref().unwrap().cert.as_deref(),
            Some(Path::new("/abs/client.pem"))
        );
        let auth = sec.auth.as_ref().unwrap();
        assert_eq!(auth.password, Password::File(dir.path().join("etcd-pass")));
        assert!(!format!("{:?}", Password::Inline("hunter2".into())).contains("hunter2"));
    }

    #[test]
    fn bad_edge_keys_are_positioned() {
        let text =
            err("[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\naccept_proxy = true\n");
        assert!(
            text.contains("t.toml:4:16:") && text.contains("trusted_proxies"),
            "{text}"
        );
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\naccept_proxy = true\ntrusted_proxies = [\"10.0.0.0/99\"]\n",
        );
        assert!(text.contains("t.toml:5:20:"), "{text}");
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
        );
        assert!(text.contains("needs accept_proxy = true"), "{text}");
        let text =
            err("[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\nmax_connections = -1\n");
        assert!(text.contains("t.toml:4:19:"), "{text}");
        let text = err("[service.w]\nsend_proxy = \"v3\"\n");
        assert!(
            text.contains("t.toml:2:14:") && text.contains("\"v1\" or \"v2\""),
            "{text}"
        );
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\nhandshake_timeout = \"0s\"\n",
        );
        assert!(text.contains("t.toml:4:21:"), "{text}");
    }

    #[test]
    fn bad_tls_keys() {
        // tls on a tcp listener
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\ntls = { cert = \"a\", key = \"b\" }\n",
        );
        assert!(text.contains("protocol = \"http\""), "{text}");
        // missing key
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\ntls = { cert = \"a\" }\n",
        );
        assert!(text.contains("needs `key`"), "{text}");
        // second cert without sni
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\n[[listener.tls.cert]]\ncert = \"a\"\nkey = \"b\"\n[[listener.tls.cert]]\ncert = \"c\"\nkey = \"d\"\n",
        );
        assert!(
            text.contains("#2") && text.contains("needs `sni`"),
            "{text}"
        );
        // unknown key in a cert table
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\n[[listener.tls.cert]]\ncert = \"a\"\nkey = \"b\"\nbogus = 1\n",
        );
        assert!(text.contains("bogus"), "{text}");
        // sni route on an http listener, host route on a tls listener, bad sni
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\n[[listener.route]]\nsni = \"a.b\"\nservice = \"x\"\n",
        );
        assert!(
            text.contains("t.toml:6:7:") && text.contains("only for protocol = \"tls\""),
            "{text}"
        );
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"tls\"\nservice = \"w\"\n[[listener.route]]\nhost = \"a.b\"\nservice = \"x\"\n",
        );
        assert!(text.contains("route by `sni`"), "{text}");
        let text = err(
            "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"tls\"\nservice = \"w\"\n[[listener.route]]\nsni = \"a b\"\nservice = \"x\"\n",
        );
        assert!(text.contains("t.toml:6:7:"), "{text}");
    }

    #[test]
    fn unusable_certificates_are_positioned() {
        let dir = pem_dir(&["good"]);
        let d = dir.path();
        std::fs::write(d.join("other-key.pem"), OTHER_KEY).unwrap();
        std::fs::write(d.join("garbage.pem"), "not a certificate\n").unwrap();
        std::fs::write(
            d.join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let run = |tls: &str| {
            let src = format!(
                "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"http\"\nservice = \"w\"\n{tls}"
            );
            match Config::parse(&d.join("t.toml"), &src) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        assert_eq!(
            run("tls = { cert = \"good.pem\", key = \"good-key.pem\" }\n"),
            ""
        );
        // Missing certificate: at the cert value.
        let text = run("tls = { cert = \"nope.pem\", key = \"good-key.pem\" }\n");
        assert!(
            text.contains("t.toml:5:16:") && text.contains("nope.pem: cannot read it"),
            "{text}"
        );
        // Key of another certificate: at the key value.
        let text = run("tls = { cert = \"good.pem\", key = \"other-key.pem\" }\n");
        assert!(
            text.contains("t.toml:5:34:") && text.contains("does not match the certificate"),
            "{text}"
        );
        // No PEM block; a certificate given as the key; bad base64.
        let text = run("tls = { cert = \"garbage.pem\", key = \"good-key.pem\" }\n");
        assert!(
            text.contains("no \"-----BEGIN CERTIFICATE-----\""),
            "{text}"
        );
        let text = run("tls = { cert = \"good.pem\", key = \"good.pem\" }\n");
        assert!(text.contains("PRIVATE KEY"), "{text}");
        let text = run("tls = { cert = \"broken.pem\", key = \"good-key.pem\" }\n");
        assert!(text.contains("invalid PEM"), "{text}");
        // In [[listener.tls.cert]] tables: named by number.
        let text = run(
            "[[listener.tls.cert]]\ncert = \"good.pem\"\nkey = \"good-key.pem\"\n[[listener.tls.cert]]\nsni = \"b.example.com\"\ncert = \"good.pem\"\nkey = \"missing-key.pem\"\n",
        );
        assert!(
            text.contains("[[listener.tls.cert]] #2: private key")
                && text.contains("missing-key.pem"),
            "{text}"
        );
    }

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
