//! Header rewriting between client and task: hop-by-hop headers (and every header the
//! `Connection` header names) are removed *before* the proxy adds its own, so a client cannot
//! make the proxy drop `X-Forwarded-For` by naming it; then `X-Forwarded-For` (peer appended),
//! `X-Forwarded-Proto`, `X-Forwarded-Host`, RFC 7239 `Forwarded` and `Via` are set. `Host` is
//! kept as the client sent it.
//!
//! Pure: works on a `HeaderMap`, no IO. Does not decide routing or framing.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::head::is_tchar;

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the classic RFC 2616 list and
/// `Proxy-Connection`): they describe one connection, never the end-to-end message.
/// `Proxy-Authorization` carries credentials for this hop (RFC 9110 §11.7.2). Lower case;
/// the lean HTTP/1.1 path (`h1.rs`) strips the same list.
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether the `Connection` header lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers and those named in `Connection`. `Host` is never removed
/// (the task must see the name the client asked for). Returns the `Upgrade` value when the
/// message asked for a protocol upgrade (`Connection: upgrade` + `Upgrade`), so the caller
/// can put it back for a tunnel.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let upgrade = if connection_has(headers, "upgrade") {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| *n != header::HOST)
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    upgrade
}

/// Puts `Connection: upgrade` and `Upgrade` back on a message that is being tunnelled.
pub fn restore_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// What the proxy knows about the client hop.
pub struct Forwarding<'a> {
    pub peer: SocketAddr,
    /// "http" (TLS comes with the edge issue).
    pub proto: &'static str,
    /// The Host (or :authority) as the client sent it.
    pub host: Option<&'a str>,
    /// The client's protocol version as Via writes it: "1.0", "1.1" or "2".
    pub version: &'static str,
}

/// Joins every value of `name` and `ours` into one comma-separated value (many backends,
/// nginx's `$http_*` among them, read only the first header line).
fn append_list(headers: &mut HeaderMap, name: HeaderName, ours: &str) {
    let mut joined = String::new();
    for v in headers.get_all(&name) {
        if let Ok(s) = v.to_str() {
            let s = s.trim();
            if !s.is_empty() {
                joined.push_str(s);
                joined.push_str(", ");
            }
        }
    }
    joined.push_str(ours);
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

/// Writes an RFC 7239 value: a token, or a quoted string when it has characters a token
/// cannot hold.
pub(crate) fn put_forwarded_value(out: &mut Vec<u8>, s: &[u8]) {
    if !s.is_empty() && s.iter().all(|&b| is_tchar(b)) {
        out.extend_from_slice(s);
        return;
    }
    out.push(b'"');
    for &b in s {
        if b == b'\\' || b == b'"' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// The client's address as the forwarding headers give it: an IPv4-mapped IPv6 peer (a
/// dual-stack listener) as plain IPv4.
pub(crate) fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `for=<node>` of RFC 7239 for a client address (IPv6 bracketed, hence quoted).
pub(crate) fn forwarded_for(ip: IpAddr) -> Vec<u8> {
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut out = b"for=".to_vec();
    put_forwarded_value(&mut out, node.as_bytes());
    out
}

/// Adds the forwarding headers for a request going to a task. Call after
/// [`strip_hop_by_hop`].
pub fn add_forwarded(headers: &mut HeaderMap, f: &Forwarding<'_>) {
    let ip = client_ip(f.peer);
    append_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &ip.to_string(),
    );
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(f.proto),
    );
    let xfh = HeaderName::from_static("x-forwarded-host");
    match f.host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert(xfh, v);
        }
        None => {
            headers.remove(xfh);
        }
    }
    let mut fwd = forwarded_for(ip);
    if let Some(h) = f.host {
        fwd.extend_from_slice(b";host=");
        put_forwarded_value(&mut fwd, h.as_bytes());
    }
    fwd.extend_from_slice(b";proto=");
    fwd.extend_from_slice(f.proto.as_bytes());
    // Built from &str parts and ASCII only: always UTF-8.
    append_list(headers, header::FORWARDED, &String::from_utf8_lossy(&fwd));
    add_via(headers, f.version);
}

/// Appends `Via: <version> routemesh` (requests and responses).
pub fn add_via(headers: &mut HeaderMap, version: &str) {
    append_list(headers, header::VIA, &format!("{version} routemesh"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn fwd(host: Option<&str>) -> Forwarding<'_> {
        Forwarding {
            peer: "10.1.2.3:5555".parse().unwrap(),
            proto: "http",
            host,
            version: "1.1",
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret, host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("host", "a.example"),
            ("x-keep", "yes"),
        ]);
        assert_eq!(strip_hop_by_hop(&mut h), None);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["host", "x-keep"]);
    }

    #[test]
    fn upgrade_is_reported_and_restorable() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let up = strip_hop_by_hop(&mut h).unwrap();
        assert!(h.is_empty());
        restore_upgrade(&mut h, up);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        let mut h = map(&[("upgrade", "websocket")]);
        assert_eq!(
            strip_hop_by_hop(&mut h),
            None,
            "Upgrade without Connection: upgrade"
        );
    }

    #[test]
    fn connection_naming_xff_cannot_remove_ours() {
        let mut h = map(&[
            ("connection", "X-Forwarded-For, Forwarded, Via"),
            ("x-forwarded-for", "1.1.1.1"),
        ]);
        strip_hop_by_hop(&mut h);
        add_forwarded(&mut h, &fwd(Some("a.example")));
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["forwarded"], "for=10.1.2.3;host=a.example;proto=http");
        assert_eq!(h["via"], "1.1 routemesh");
    }

    #[test]
    fn forwarded_headers_append_to_existing_ones() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed"),
            ("forwarded", "for=1.1.1.1"),
            ("via", "1.0 fred"),
        ]);
        add_forwarded(&mut h, &fwd(Some("a.example:8080")));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.example:8080");
        assert_eq!(
            h["forwarded"],
            "for=1.1.1.1, for=10.1.2.3;host=\"a.example:8080\";proto=http"
        );
        assert_eq!(h["via"], "1.0 fred, 1.1 routemesh");
    }

    #[test]
    fn ipv6_peers_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        let f = Forwarding {
            peer: "[2001:db8::1]:443".parse().unwrap(),
            proto: "http",
            host: None,
            version: "2",
        };
        add_forwarded(&mut h, &f);
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert!(h.get("x-forwarded-host").is_none());
        assert_eq!(h["via"], "2 routemesh");
    }
}
