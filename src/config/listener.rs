//! Listeners: a published port, its protocol, its default service and routes, and its
//! admission settings (PROXY protocol, connection limits, TLS termination and the
//! ClientHello bound of tls listeners; the session limit of udp listeners).
//!
//! One validator, `validate`, for both sources of listeners: the `[[listener]]` tables of
//! the file (problems at `file:line:col`, through `validate_all`) and listeners published
//! in etcd as JSON objects with the same keys ([`from_json`]: problems named by the etcd
//! key). The checks of listeners against each other are [`clashes`], over any list.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::certs::{self, CertConfig, RawListenerTls};
use super::error::Issues;
use super::file::{self, S};
use super::names::ServiceName;
use super::route::{self, RawRoute, RouteConfig, SniRoute};
use super::values::{name, one_of, socket_addr, span};

#[derive(Debug, Default, Deserialize)]
pub struct RawListener {
    pub name: Option<S<String>>,
    pub listen: Option<S<String>>,
    pub protocol: Option<S<String>>,
    pub service: Option<S<String>>,
    #[serde(default)]
    pub route: Vec<S<RawRoute>>,
    // admission and TLS keys (validated by `edge`)
    pub accept_proxy: Option<S<bool>>,
    pub trusted_proxies: Option<S<Vec<S<String>>>>,
    pub max_connections: Option<S<i64>>,
    pub max_connections_per_ip: Option<S<i64>>,
    pub handshake_timeout: Option<S<String>>,
    pub max_client_hello_bytes: Option<S<i64>>,
    pub tls: Option<S<RawListenerTls>>,
    /// udp listeners: most sessions open at once.
    pub max_sessions: Option<S<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Http,
    /// TLS passthrough routed by the ClientHello's SNI (route.rs).
    Tls,
    /// Datagrams, by client session (src/proxy/udp/).
    Udp,
}

/// The transport a listener binds: a TCP and a UDP listener may share an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Tls => "tls",
            Protocol::Udp => "udp",
        }
    }

    /// What the listener binds: UDP for `udp`, TCP for the others.
    pub fn transport(self) -> Transport {
        match self {
            Protocol::Udp => Transport::Udp,
            _ => Transport::Tcp,
        }
    }

    /// The protocol named `text` (as `listener.protocol` spells it).
    pub fn parse(text: &str) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Http, Protocol::Tls, Protocol::Udp]
            .into_iter()
            .find(|p| p.as_str() == text)
    }

    /// The accepted spellings, for error messages.
    pub const NAMES: &'static str = "tcp, http, tls or udp";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Metric label and log field; default `<protocol>-<port>`.
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// The default route: where connections (tcp), requests no route matches (http) and
    /// names no SNI route matches (tls) go. Required for tcp listeners; without it an http
    /// listener answers 404 and a tls listener closes the connection.
    pub service: Option<ServiceName>,
    /// HTTP routes, first match wins (http listeners only).
    pub routes: Vec<RouteConfig>,
    /// PROXY protocol, connection limits, TLS.
    pub edge: ListenerEdge,
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
    /// http listeners: the names of `tls.acme`, one certificate from `[acme]` kept in etcd
    /// (named by the first); picked by SNI before `tls`, and the default when `tls` is empty.
    pub acme: Vec<String>,
    /// tls listeners: routes by SNI, first match wins; `service` is the default.
    pub sni_routes: Vec<SniRoute>,
    /// tls listeners: the largest ClientHello read before routing.
    pub max_client_hello_bytes: usize,
    /// udp listeners: most sessions open at once; a datagram that would open one more is
    /// dropped (counted).
    pub max_sessions: usize,
}

/// `max_sessions` of a udp listener without the key.
pub const DEFAULT_MAX_SESSIONS: usize = 65536;

impl Default for ListenerEdge {
    fn default() -> Self {
        ListenerEdge {
            accept_proxy: false,
            trusted_proxies: Vec::new(),
            max_connections: None,
            max_connections_per_ip: None,
            handshake_timeout: Duration::from_secs(10),
            tls: Vec::new(),
            acme: Vec::new(),
            sni_routes: Vec::new(),
            max_client_hello_bytes: 16 * 1024,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
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

/// Validates one listener: a `[[listener]]` table of the file, or a listener published in
/// etcd (through [`from_json`]). Relative certificate paths are resolved against the
/// directory of `config_path`. `None` when the listener cannot be served; every problem is
/// in `issues`. Checks against other listeners are [`clashes`].
pub(crate) fn validate(
    issues: &mut Issues,
    raw: &S<RawListener>,
    config_path: &Path,
) -> Option<ListenerConfig> {
    let l_span = span(raw);
    let l = raw.get_ref();
    let protocol = one_of(
        issues,
        &l.protocol,
        Protocol::Tcp,
        &[
            ("tcp", Protocol::Tcp),
            ("http", Protocol::Http),
            ("tls", Protocol::Tls),
            ("udp", Protocol::Udp),
        ],
        "listener.protocol",
    );
    let listen = match &l.listen {
        Some(v) => socket_addr(issues, v, "listener.listen"),
        None => {
            issues.at(
                l_span.clone(),
                "[[listener]] needs `listen`, e.g. listen = \"0.0.0.0:80\"",
            );
            None
        }
    };
    // Optional on http and tls listeners (no default route: 404 or close).
    let service = match &l.service {
        Some(v) => name(issues, v, "listener.service", ServiceName::new).map(Some),
        None if matches!(protocol, Protocol::Tcp | Protocol::Udp) => {
            issues.at(
                l_span,
                "[[listener]] needs `service`: the service its connections (or datagrams) go to",
            );
            None
        }
        None => Some(None),
    };
    let routes = route::http_routes(issues, &l.route, protocol);
    let (Some(listen), Some(service)) = (listen, service) else {
        return None;
    };
    let name = match &l.name {
        Some(v) => {
            if !valid_name(v.get_ref()) {
                issues.at(
                    span(v),
                    "`listener.name`: use 1-64 characters from A-Z a-z 0-9 . _ -",
                );
            }
            v.get_ref().clone()
        }
        None => format!("{}-{}", protocol.as_str(), listen.port()),
    };
    Some(ListenerConfig {
        name,
        listen,
        protocol,
        service,
        routes,
        edge: edge(issues, config_path, l, protocol),
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Validates every `[[listener]]` of the file, then checks them against each other.
pub(super) fn validate_all(
    issues: &mut Issues,
    raw: &[S<RawListener>],
    config_path: &Path,
) -> Vec<ListenerConfig> {
    let mut listeners = Vec::new();
    let mut raw_of = Vec::new();
    for r in raw {
        if let Some(l) = validate(issues, r, config_path) {
            listeners.push(l);
            raw_of.push(r);
        }
    }
    for clash in clashes(&listeners) {
        match clash {
            Clash::Address(i) => {
                let r = raw_of[i];
                let at = r.get_ref().listen.as_ref().map(span).unwrap_or(span(r));
                let listen = listeners[i].listen;
                issues.at(
                    at,
                    format!("two listeners bind {listen}: each `listen` address may appear once per transport (tcp, udp)"),
                );
            }
            Clash::Name(i) => {
                let r = raw_of[i];
                let at = r.get_ref().name.as_ref().map(span).unwrap_or(span(r));
                let lname = &listeners[i].name;
                issues.at(
                    at,
                    format!(
                        "two listeners are named {lname:?}: give each [[listener]] a distinct `name`"
                    ),
                );
            }
        }
    }
    listeners
}

/// A listener of a list that repeats an earlier one, by its index in the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clash {
    /// Its `listen` address is already bound by an earlier listener.
    Address(usize),
    /// Its name is already taken by an earlier listener (reported only when its address is
    /// not a clash too).
    Name(usize),
}

/// The checks of listeners against each other, over any list of valid listeners (the file's,
/// or the file's and the published ones): each address may appear once per transport (a
/// tcp and a udp listener may share one), each name once.
pub fn clashes(listeners: &[ListenerConfig]) -> Vec<Clash> {
    let mut seen_names = BTreeSet::new();
    let mut seen_addrs = BTreeSet::new();
    let mut out = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let dup_addr = !seen_addrs.insert((l.listen, l.protocol.transport()));
        if dup_addr {
            out.push(Clash::Address(i));
        }
        if !seen_names.insert(l.name.as_str()) && !dup_addr {
            out.push(Clash::Name(i));
        }
    }
    out
}

/// A listener published in etcd that cannot be served: its key and every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {}", .problems.join("; "))]
pub struct InvalidListener {
    /// The etcd key, `{prefix}/listeners/{name}`.
    pub key: String,
    /// What is wrong and how to fix it, in the order of the keys.
    pub problems: Vec<String>,
}

/// The document a published listener is validated as: its object under `listener`, so that
/// messages name keys as the file does (`listener.max_connections`).
#[derive(Deserialize)]
struct Published {
    listener: S<RawListener>,
}

/// Validates a listener published in etcd: `value` is a JSON object with the keys of a
/// `[[listener]]` table, and its name is the last segment of `key` (a `name` key, if any,
/// must say the same). The object becomes a TOML table that goes through the raw shape and
/// `validate`, so the keys, defaults and checks are exactly the file's; problems are named
/// by `key` instead of a position. Relative certificate paths are resolved against the
/// directory of `config_path` (this node's config file). How a valid one fares against other
/// listeners (shadowed, conflict) is the caller's rule; [`clashes`] finds the collisions.
pub fn from_json(
    key: &str,
    value: &[u8],
    config_path: &Path,
) -> Result<ListenerConfig, InvalidListener> {
    let invalid = |problems: Vec<String>| InvalidListener {
        key: key.to_string(),
        problems,
    };
    let name = key.rsplit('/').next().unwrap_or(key);
    let mut object = match serde_json::from_slice::<serde_json::Value>(value) {
        Ok(serde_json::Value::Object(o)) => o,
        Ok(_) => {
            return Err(invalid(vec![
                "the value is not a JSON object: write e.g. {\"listen\": \"0.0.0.0:80\", \"protocol\": \"http\", \"service\": \"web\"}".into(),
            ]));
        }
        Err(e) => return Err(invalid(vec![format!("invalid JSON: {e}")])),
    };
    match object.get("name") {
        None => {}
        Some(serde_json::Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(invalid(vec![format!(
                "`name` = {other} is not the key's last segment {name:?}: remove `name`, the key names the listener"
            )]));
        }
    }
    if let Some(path) = null_at(&object) {
        return Err(invalid(vec![format!(
            "`{path}` is null: give it a value or remove the key"
        )]));
    }
    object.insert("name".into(), name.into());
    let mut document = toml::Table::new();
    let text = toml::Value::try_from(object)
        .and_then(|table| {
            document.insert("listener".into(), table);
            toml::to_string(&document)
        })
        .map_err(|e| invalid(vec![format!("cannot be read as a listener: {e}")]))?;
    let mut issues = Issues::new(&text);
    let Some(published) = file::deserialize::<Published>(&text, &mut issues) else {
        // A value of the wrong type: its position is in a document the user never saw, so
        // the problem is named by its key.
        let problems = issues
            .into_located()
            .into_iter()
            .map(|(at, message)| match file::key_at(&text, at) {
                Some(k) => format!("`{k}`: {message}"),
                None => message,
            })
            .collect();
        return Err(invalid(problems));
    };
    let listener = validate(&mut issues, &published.listener, config_path);
    let problems: Vec<String> = issues.into_located().into_iter().map(|(_, m)| m).collect();
    match listener {
        Some(l) if problems.is_empty() => Ok(l),
        _ => Err(invalid(problems)),
    }
}

/// The first key holding a JSON null (TOML has no null), as a dotted path.
fn null_at(object: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    use serde_json::Value;
    fn walk(v: &Value, path: String) -> Option<String> {
        match v {
            Value::Null => Some(path),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, format!("{path}.{i}"))),
            Value::Object(o) => o.iter().find_map(|(k, v)| walk(v, format!("{path}.{k}"))),
            _ => None,
        }
    }
    object
        .iter()
        .find_map(|(k, v)| walk(v, format!("listener.{k}")))
}

/// The admission and TLS settings of one listener (its SNI routes included).
fn edge(
    issues: &mut Issues,
    config_path: &Path,
    l: &RawListener,
    protocol: Protocol,
) -> ListenerEdge {
    let def = ListenerEdge::default();
    let (accept_proxy, trusted_proxies) = proxy_header(issues, l);
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
    if let Some(v) = &l.max_client_hello_bytes
        && protocol != Protocol::Tls
    {
        issues.at(
            span(v),
            "`listener.max_client_hello_bytes` is only for protocol = \"tls\" listeners",
        );
    }
    // tls = { cert, key } | [[listener.tls.cert]] | { acme = [..] }
    let mut tls = Vec::new();
    let mut acme = Vec::new();
    if let Some(t) = &l.tls {
        if protocol != Protocol::Http {
            issues.at(
                span(t),
                "`listener.tls` terminates TLS on protocol = \"http\" listeners; for SNI routing without terminating use protocol = \"tls\" and no `tls` key",
            );
        }
        (tls, acme) = certs::validate(issues, config_path, t, protocol == Protocol::Http);
    }
    let max_sessions = match &l.max_sessions {
        None => def.max_sessions,
        Some(v) if protocol != Protocol::Udp => {
            issues.at(
                span(v),
                "`listener.max_sessions` is only for protocol = \"udp\" listeners (tcp listeners: max_connections)",
            );
            def.max_sessions
        }
        Some(v) if (1..=10_000_000).contains(v.get_ref()) => *v.get_ref() as usize,
        Some(v) => {
            issues.at(
                span(v),
                format!(
                    "`listener.max_sessions` = {}: use 1 to 10000000",
                    v.get_ref()
                ),
            );
            def.max_sessions
        }
    };
    if protocol == Protocol::Udp {
        udp_only_keys(issues, l);
    }
    ListenerEdge {
        accept_proxy,
        trusted_proxies,
        max_connections,
        max_connections_per_ip,
        handshake_timeout,
        tls,
        acme,
        sni_routes: route::sni_routes(issues, &l.route, protocol),
        max_client_hello_bytes,
        max_sessions,
    }
}

/// The keys a udp listener cannot have: it has no connections, handshakes or routes.
fn udp_only_keys(issues: &mut Issues, l: &RawListener) {
    let mut refuse = |at: Option<std::ops::Range<usize>>, key: &str| {
        if let Some(at) = at {
            issues.at(
                at,
                format!("`listener.{key}` does not apply to protocol = \"udp\" listeners: remove it (udp listeners take `max_sessions`)"),
            );
        }
    };
    refuse(l.accept_proxy.as_ref().map(span), "accept_proxy");
    refuse(l.max_connections.as_ref().map(span), "max_connections");
    refuse(
        l.max_connections_per_ip.as_ref().map(span),
        "max_connections_per_ip",
    );
    refuse(l.handshake_timeout.as_ref().map(span), "handshake_timeout");
}

/// `accept_proxy` and `trusted_proxies`: the PROXY header is read only from listed sources,
/// so each key needs the other.
fn proxy_header(issues: &mut Issues, l: &RawListener) -> (bool, Vec<Cidr>) {
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
    (accept_proxy, trusted_proxies)
}

/// A connection limit: 0 is no limit.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{errors_hold, parse_etc as parse};
    use crate::config::{Config, Password, ProxyVersion};

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
        for (cidr, addr, inside) in [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("0.0.0.0/0", "1.2.3.4", true),
            ("::/0", "::1", true),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("fd00::/8", "fd12::1", true),
        ] {
            let c = Cidr::parse(cidr).unwrap();
            assert_eq!(c.contains(addr.parse().unwrap()), inside, "{cidr} {addr}");
        }
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
        errors_hold(&[
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\naccept_proxy = true\n",
                &["t.toml:4:16:", "trusted_proxies"],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\naccept_proxy = true\ntrusted_proxies = [\"10.0.0.0/99\"]\n",
                &["t.toml:5:20:"],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
                &["needs accept_proxy = true"],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\nmax_connections = -1\n",
                &["t.toml:4:19:"],
            ),
            (
                "[service.w]\nsend_proxy = \"v3\"\n",
                &["t.toml:2:14:", "\"v1\" or \"v2\""],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\nhandshake_timeout = \"0s\"\n",
                &["t.toml:4:21:"],
            ),
        ]);
    }

    #[test]
    fn bad_tls_keys() {
        // tls on a tcp listener
        errors_hold(&[
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\ntls = { cert = \"a\", key = \"b\" }\n",
                &["protocol = \"http\""],
            ),
            // missing key
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\ntls = { cert = \"a\" }\n",
                &["needs `key`"],
            ),
            // second cert without sni
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\n[[listener.tls.cert]]\ncert = \"a\"\nkey = \"b\"\n[[listener.tls.cert]]\ncert = \"c\"\nkey = \"d\"\n",
                &["#2", "needs `sni`"],
            ),
            // unknown key in a cert table
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\n[[listener.tls.cert]]\ncert = \"a\"\nkey = \"b\"\nbogus = 1\n",
                &["bogus"],
            ),
            // sni route on an http listener, host route on a tls listener, bad sni
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"w\"\n[[listener.route]]\nsni = \"a.b\"\nservice = \"x\"\n",
                &["t.toml:6:7:", "only for protocol = \"tls\""],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"tls\"\nservice = \"w\"\n[[listener.route]]\nhost = \"a.b\"\nservice = \"x\"\n",
                &["route by `sni`"],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"tls\"\nservice = \"w\"\n[[listener.route]]\nsni = \"a b\"\nservice = \"x\"\n",
                &["t.toml:6:7:"],
            ),
        ]);
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

    const KEY: &str = "/routemesh/listeners/web";

    fn json(value: &str) -> Result<ListenerConfig, InvalidListener> {
        from_json(KEY, value.as_bytes(), Path::new("/etc/routemesh/t.toml"))
    }

    #[test]
    fn published_listener_is_the_same_as_a_toml_one() {
        let l = json(
            r#"{"listen": "0.0.0.0:80", "protocol": "http", "service": "web", "max_connections": 100,
                "route": [{"host": "API.example.com", "path_prefix": "/v1", "service": "api"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.name, "web");
        assert_eq!(l.protocol, Protocol::Http);
        assert_eq!(l.edge.max_connections, Some(100));
        assert_eq!(l.routes[0].host.as_deref(), Some("api.example.com"));
        let c = parse(
            "[[listener]]\nname = \"web\"\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\nservice = \"web\"\nmax_connections = 100\n[[listener.route]]\nhost = \"API.example.com\"\npath_prefix = \"/v1\"\nservice = \"api\"\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0], l);
        // The defaults are the file's; a `name` equal to the key's segment is accepted.
        let l = json(
            r#"{"name": "web", "listen": "0.0.0.0:443", "protocol": "tls", "accept_proxy": true,
                "trusted_proxies": ["10.0.0.0/8"], "route": [{"sni": "*.example.com", "service": "mqtt"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.service, None);
        assert!(l.edge.accept_proxy);
        assert_eq!(l.edge.sni_routes[0].sni, "*.example.com");
        assert_eq!(
            l.edge.handshake_timeout,
            ListenerEdge::default().handshake_timeout
        );
    }

    #[test]
    fn invalid_published_listeners_name_the_key_and_every_problem() {
        let err = json(r#"{"listen": "nowhere", "protocol": "tcp", "bogus": 1}"#).unwrap_err();
        assert_eq!(err.key, KEY);
        assert_eq!(err.problems.len(), 3, "{err}");
        let text = err.to_string();
        assert!(text.starts_with("/routemesh/listeners/web: "), "{text}");
        assert!(
            text.contains("`listener.listen`: \"nowhere\" is not an IP:PORT address"),
            "{text}"
        );
        assert!(text.contains("unknown key `listener.bogus`"), "{text}");
        assert!(text.contains("needs `service`"), "{text}");
        // The admission, TLS and route checks are the file's.
        let text = json(r#"{"listen": "0.0.0.0:80", "service": "w", "accept_proxy": true}"#)
            .unwrap_err()
            .to_string();
        assert!(text.contains("needs `trusted_proxies`"), "{text}");
        let text = json(
            r#"{"listen": "0.0.0.0:80", "protocol": "http", "route": [{"sni": "a.b", "service": "x"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("`route.sni` is only for protocol = \"tls\""),
            "{text}"
        );
        // Wrong types, not an object, not JSON, null, a different name, a bad key segment.
        for (value, needle) in [
            (
                r#"{"listen": 80, "service": "w"}"#,
                "`listener.listen`: invalid type",
            ),
            (r#"["0.0.0.0:80"]"#, "not a JSON object"),
            (r#"{"listen": "0.0.0.0:80""#, "invalid JSON"),
            (
                r#"{"listen": "0.0.0.0:80", "service": null}"#,
                "`listener.service` is null",
            ),
            (
                r#"{"name": "api", "listen": "0.0.0.0:80", "service": "w"}"#,
                "remove `name`",
            ),
        ] {
            let text = json(value).unwrap_err().to_string();
            assert!(text.contains(needle), "{value}: {text}");
        }
        // The name comes from the key, and is checked as a `name` key would be.
        let bad_name = "/routemesh/listeners/bad name";
        let value = br#"{"listen": "0.0.0.0:80", "service": "w"}"#;
        let err = from_json(bad_name, value, Path::new("t.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].starts_with("`listener.name`"), "{err}");
    }

    #[test]
    fn clashes_are_found_across_sources() {
        let file = parse(
            "[[listener]]\nname = \"web\"\nlisten = \"0.0.0.0:80\"\nservice = \"w\"\n[[listener]]\nlisten = \"0.0.0.0:81\"\nservice = \"w\"\n",
        )
        .unwrap();
        let mut all = file.listeners.clone();
        all.push(json(r#"{"listen": "0.0.0.0:80", "service": "w"}"#).unwrap());
        all.push(json(r#"{"listen": "0.0.0.0:82", "service": "w"}"#).unwrap());
        assert_eq!(clashes(&all), vec![Clash::Address(2), Clash::Name(3)]);
        assert_eq!(clashes(&file.listeners), vec![]);
    }

    #[test]
    fn udp_listeners_and_their_limits() {
        let c = parse(
            "[[listener]]\nlisten = \"0.0.0.0:5683\"\nprotocol = \"udp\"\nservice = \"coap\"\nmax_sessions = 100\n\
             [[listener]]\nlisten = \"0.0.0.0:5683\"\nservice = \"coap\"\n\
             [[listener]]\nlisten = \"0.0.0.0:53\"\nprotocol = \"udp\"\nservice = \"dns\"\n\
             [service.coap]\nbalance = \"maglev\"\nhash_key = \"source_addr\"\nudp_idle_timeout = \"5s\"\n\
             [service.dns]\nudp_responses = 1\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // A udp and a tcp listener share 0.0.0.0:5683; names default to PROTOCOL-PORT.
        assert_eq!(c.listeners[0].protocol, Protocol::Udp);
        assert_eq!(c.listeners[0].name, "udp-5683");
        assert_eq!(c.listeners[0].edge.max_sessions, 100);
        assert_eq!(c.listeners[1].name, "tcp-5683");
        assert_eq!(c.listeners[2].edge.max_sessions, DEFAULT_MAX_SESSIONS);
        let coap = c.service_settings(&ServiceName::new("coap").unwrap());
        assert_eq!(coap.hash_key, crate::config::HashKey::SourceAddr);
        assert_eq!(coap.udp_idle_timeout, Duration::from_secs(5));
        assert!(!coap.health_configured);
        let dns = c.service_settings(&ServiceName::new("dns").unwrap());
        assert_eq!(dns.udp_responses, 1);
        assert_eq!(dns.udp_idle_timeout, Duration::from_secs(60));
        // Two udp listeners on one address clash; udp needs a service; tcp keys are refused.
        errors_hold(&[
            (
                "[[listener]]\nlisten = \"0.0.0.0:53\"\nprotocol = \"udp\"\nservice = \"a\"\n[[listener]]\nname = \"b\"\nlisten = \"0.0.0.0:53\"\nprotocol = \"udp\"\nservice = \"b\"\n",
                &["t.toml:7:10:", "two listeners bind"],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:53\"\nprotocol = \"udp\"\n",
                &["needs `service`"],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:53\"\nprotocol = \"udp\"\nservice = \"a\"\nmax_connections = 5\n",
                &["t.toml:5:19:", "does not apply to protocol = \"udp\""],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:80\"\nservice = \"a\"\nmax_sessions = 5\n",
                &["only for protocol = \"udp\""],
            ),
            (
                "[[listener]]\nlisten = \"0.0.0.0:53\"\nprotocol = \"udp\"\nservice = \"a\"\nmax_sessions = 0\n",
                &["t.toml:5:16:", "1 to 10000000"],
            ),
            (
                "[service.a]\nudp_idle_timeout = \"0s\"\nudp_responses = -1\n",
                &["t.toml:2:20:", "t.toml:3:17:"],
            ),
        ]);
        // Published as JSON, the same.
        let l = json(r#"{"listen": "0.0.0.0:5683", "protocol": "udp", "service": "coap", "max_sessions": 10}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.protocol, l.edge.max_sessions), (Protocol::Udp, 10));
    }
}
