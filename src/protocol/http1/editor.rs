//! The one header editor, for requests going to a task and responses going to a client,
//! whatever the protocols on either side.
//!
//! Hop-by-hop fields (RFC 9110 §7.6.1, the classic RFC 2616 list, `Proxy-Connection`,
//! `Proxy-Authorization`) and every field a `Connection` field names are dropped *before*
//! the proxy adds its own, so a client cannot make the proxy drop `X-Forwarded-For` by
//! naming it. Then, for requests: `X-Forwarded-For` (every earlier value joined into one
//! field, the peer appended), `X-Forwarded-Proto` and `X-Forwarded-Host` (the client's
//! values replaced), RFC 7239 `Forwarded` (appended), `Via` (appended). `Host` is kept as
//! the client sent it (or set from the target's authority). Values are bytes: obs-text
//! passes unchanged.
//!
//! Fields go to a [`HeaderSink`]: HTTP/1.1 wire bytes (`Vec<u8>`) or a `HeaderMap` (for
//! hyper, HTTP/2).

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::{is_tchar, list_items};

/// Hop-by-hop fields, lower case: they describe one connection, never the message.
pub const HOP_BY_HOP: [&str; 9] = [
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

pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.len() == name.len() && h.as_bytes().eq_ignore_ascii_case(name))
}

/// Where edited fields go.
pub trait HeaderSink {
    fn field(&mut self, name: &[u8], value: &[u8]);

    /// One list field: the `earlier` values (trimmed, empty ones left out), then `ours`
    /// (concatenated), joined by ", ".
    fn list_field(&mut self, name: &[u8], earlier: &[&[u8]], ours: &[&[u8]]) {
        let mut joined = Vec::new();
        put_list(&mut joined, earlier, ours);
        self.field(name, &joined);
    }
}

/// Writes a list value (see [`HeaderSink::list_field`]).
fn put_list(out: &mut Vec<u8>, earlier: &[&[u8]], ours: &[&[u8]]) {
    for v in earlier {
        let v = super::trim_ows(v);
        if !v.is_empty() {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
    }
    for p in ours {
        out.extend_from_slice(p);
    }
}

/// HTTP/1.1 wire format: `name: value\r\n`.
impl HeaderSink for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
    }

    fn list_field(&mut self, name: &[u8], earlier: &[&[u8]], ours: &[&[u8]]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        put_list(self, earlier, ours);
        self.extend_from_slice(b"\r\n");
    }
}

/// For hyper: fields that are no valid `HeaderName`/`HeaderValue` are left out.
impl HeaderSink for HeaderMap {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            self.append(n, v);
        }
    }
}

/// What the proxy knows about the client hop of a request.
pub struct Forwarding<'a> {
    /// The client's address as `X-Forwarded-For` writes it (see [`client_ip`]).
    pub xff: &'a [u8],
    /// `for=<node>` of RFC 7239 for the client (see [`forwarded_for`]).
    pub forwarded_for: &'a [u8],
    /// `http` or `https`.
    pub proto: &'static [u8],
    /// The host the client asked for (Host, or the target's authority), as sent.
    pub host: Option<&'a [u8]>,
    /// Write `Host: <host>` in place of the client's Host fields (absolute-form targets,
    /// HTTP/2's `:authority`, towards HTTP/1.1); `false` keeps them (or, for HTTP/2 towards
    /// a task, the caller drops them).
    pub set_host: bool,
    /// The client's protocol version as `Via` writes it: `1.0`, `1.1` or `2`.
    pub via: &'static [u8],
    /// A protocol switch to pass on: `Connection: upgrade` and `Upgrade: <value>`.
    pub upgrade: Option<&'a [u8]>,
}

/// A `HeaderMap`'s fields as the editor takes them.
pub fn map_fields(h: &HeaderMap) -> Vec<(&[u8], &[u8])> {
    h.iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect()
}

/// The `Connection` tokens of a message, to drop the fields they name.
fn connection_tokens<'h>(fields: impl Iterator<Item = (&'h [u8], &'h [u8])>) -> Vec<&'h [u8]> {
    fields
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| list_items(v))
        .collect()
}

fn named(tokens: &[&[u8]], name: &[u8]) -> bool {
    tokens.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// Writes a request's fields for the task: the client's minus hop-by-hop ones, those its
/// `Connection` names (never Host), `Expect` (the proxy answers 100-continue itself), the
/// client's `X-Forwarded-Proto`/`-Host`; then the forwarding fields. Framing fields
/// (`Transfer-Encoding`) are the caller's to write; `Content-Length` passes.
pub fn request_fields<'h>(
    fields: impl Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
    fwd: &Forwarding<'_>,
    sink: &mut impl HeaderSink,
) {
    let tokens = connection_tokens(fields.clone());
    let mut xff: Vec<&[u8]> = Vec::new();
    let mut forwarded: Vec<&[u8]> = Vec::new();
    let mut via: Vec<&[u8]> = Vec::new();
    for (name, value) in fields {
        let host = name.eq_ignore_ascii_case(b"host");
        if host {
            if !fwd.set_host {
                sink.field(name, value);
            }
            continue;
        }
        if is_hop_by_hop(name)
            || named(&tokens, name)
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(b"x-forwarded-host")
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            xff.push(value);
        } else if name.eq_ignore_ascii_case(b"forwarded") {
            forwarded.push(value);
        } else if name.eq_ignore_ascii_case(b"via") {
            via.push(value);
        } else {
            sink.field(name, value);
        }
    }
    if fwd.set_host
        && let Some(h) = fwd.host
    {
        sink.field(b"host", h);
    }
    sink.list_field(b"x-forwarded-for", &xff, &[fwd.xff]);
    sink.field(b"x-forwarded-proto", fwd.proto);
    if let Some(h) = fwd.host {
        sink.field(b"x-forwarded-host", h);
    }
    // for=…;host=…;proto=…, the host a token or a quoted string.
    let escaped;
    let host: [&[u8]; 4] = match fwd.host {
        None => [b"", b"", b"", b""],
        Some(h) if !h.is_empty() && h.iter().all(|&b| is_tchar(b)) => [b";host=", b"", h, b""],
        Some(h) if !h.iter().any(|&b| b == b'\\' || b == b'"') => [b";host=", b"\"", h, b"\""],
        Some(h) => {
            let mut v = Vec::with_capacity(h.len() + 8);
            put_forwarded_value(&mut v, h);
            escaped = v;
            [b";host=", b"", &escaped, b""]
        }
    };
    sink.list_field(
        b"forwarded",
        &forwarded,
        &[
            fwd.forwarded_for,
            host[0],
            host[1],
            host[2],
            host[3],
            b";proto=",
            fwd.proto,
        ],
    );
    sink.list_field(b"via", &via, &[fwd.via, b" routemesh"]);
    if let Some(u) = fwd.upgrade {
        sink.field(b"connection", b"upgrade");
        sink.field(b"upgrade", u);
    }
}

/// What to keep of a response's framing fields, decided by the caller's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    /// Pass `Transfer-Encoding` (the chunked body is relayed as it is).
    pub keep_te: bool,
    /// Pass `Content-Length`.
    pub keep_length: bool,
}

/// Writes a response's fields for the client: the task's minus hop-by-hop ones and those
/// its `Connection` names (framing fields as `framing` says), then `Via`. The caller adds
/// `Connection` for the client hop.
pub fn response_fields<'h>(
    fields: impl Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
    framing: ResponseFraming,
    via_version: &'static [u8],
    sink: &mut impl HeaderSink,
) {
    let tokens = connection_tokens(fields.clone());
    let mut via: Vec<&[u8]> = Vec::new();
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if framing.keep_te {
                sink.field(name, value);
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if framing.keep_length {
                sink.field(name, super::trim_ows(value));
            }
            continue;
        }
        if is_hop_by_hop(name) || named(&tokens, name) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"via") {
            via.push(value);
        } else {
            sink.field(name, value);
        }
    }
    sink.list_field(b"via", &via, &[via_version, b" routemesh"]);
}

/// Writes an RFC 7239 value: a token, or a quoted string when it has characters a token
/// cannot hold.
pub fn put_forwarded_value(out: &mut Vec<u8>, s: &[u8]) {
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

/// The client's address as the forwarding fields give it: an IPv4-mapped IPv6 peer (a
/// dual-stack listener) as plain IPv4.
pub fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `for=<node>` of RFC 7239 for a client address (IPv6 bracketed, hence quoted).
pub fn forwarded_for(ip: IpAddr) -> Vec<u8> {
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut out = b"for=".to_vec();
    put_forwarded_value(&mut out, node.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd<'a>(xff: &'a [u8], ff: &'a [u8], host: Option<&'a [u8]>) -> Forwarding<'a> {
        Forwarding {
            xff,
            forwarded_for: ff,
            proto: b"http",
            host,
            set_host: false,
            via: b"1.1",
            upgrade: None,
        }
    }

    fn edit(fields: &[(&str, &[u8])], f: &Forwarding<'_>) -> String {
        let mut out = Vec::new();
        request_fields(fields.iter().map(|(n, v)| (n.as_bytes(), *v)), f, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn hop_by_hop_and_named_fields_go_before_ours_are_added() {
        let ff = forwarded_for("10.1.2.3".parse().unwrap());
        let out = edit(
            &[
                ("Connection", b"keep-alive, X-Secret, host, X-Forwarded-For"),
                ("Keep-Alive", b"timeout=5"),
                ("X-Secret", b"1"),
                ("TE", b"trailers"),
                ("Transfer-Encoding", b"chunked"),
                ("Proxy-Authorization", b"Basic x"),
                ("Host", b"a.example"),
                ("X-Forwarded-For", b"6.6.6.6"),
                ("X-Forwarded-Proto", b"https"),
                ("Expect", b"100-continue"),
                ("X-Keep", b"yes"),
            ],
            &fwd(b"10.1.2.3", &ff, Some(b"a.example")),
        );
        assert_eq!(
            out,
            "Host: a.example\r\nX-Keep: yes\r\nx-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: a.example\r\nforwarded: for=10.1.2.3;host=a.example;proto=http\r\nvia: 1.1 routemesh\r\n"
        );
    }

    #[test]
    fn forwarding_fields_append_to_existing_ones_and_keep_obs_text() {
        let ff = forwarded_for("10.1.2.3".parse().unwrap());
        let out = edit(
            &[
                ("X-Forwarded-For", b"1.1.1.1"),
                ("X-Forwarded-For", b" 2.2.2.2 \xe9"),
                ("Forwarded", b"for=1.1.1.1"),
                ("Via", b"1.0 fred"),
            ],
            &fwd(b"10.1.2.3", &ff, Some(b"a.example:8080")),
        );
        let bytes = out.as_bytes();
        assert!(
            String::from_utf8_lossy(bytes)
                .contains("x-forwarded-for: 1.1.1.1, 2.2.2.2 \u{fffd}, 10.1.2.3\r\n"),
            "{out}"
        );
        assert!(out.contains(
            "forwarded: for=1.1.1.1, for=10.1.2.3;host=\"a.example:8080\";proto=http\r\n"
        ));
        assert!(out.contains("via: 1.0 fred, 1.1 routemesh\r\n"));
        // The HeaderMap sink keeps obs-text too.
        let mut map = HeaderMap::new();
        request_fields(
            [(&b"x-forwarded-for"[..], &b"caf\xe9"[..])].into_iter(),
            &fwd(b"10.1.2.3", &ff, None),
            &mut map,
        );
        assert_eq!(map["x-forwarded-for"].as_bytes(), b"caf\xe9, 10.1.2.3");
        assert!(map.get("x-forwarded-host").is_none());
    }

    #[test]
    fn host_from_the_target_and_upgrades() {
        let ff = forwarded_for("[2001:db8::1]:1".parse::<SocketAddr>().unwrap().ip());
        assert_eq!(ff, b"for=\"[2001:db8::1]\"");
        let mut f = fwd(b"2001:db8::1", &ff, Some(b"api.example"));
        f.set_host = true;
        f.upgrade = Some(b"websocket");
        let out = edit(&[("Host", b"other"), ("Upgrade", b"websocket")], &f);
        assert!(out.starts_with("host: api.example\r\n"), "{out}");
        assert!(
            out.ends_with("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{out}"
        );
        assert!(!out.contains("other"));
    }

    #[test]
    fn response_fields_drop_hop_by_hop_and_add_via() {
        let mut out = Vec::new();
        let fields: [(&[u8], &[u8]); 6] = [
            (b"Connection", b"x-secret, keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Secret", b"1"),
            (b"Via", b"1.0 edge"),
            (b"Content-Length", b"2"),
            (b"Server", b"t"),
        ];
        let keep = ResponseFraming {
            keep_te: false,
            keep_length: true,
        };
        response_fields(fields.iter().copied(), keep, b"1.1", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Content-Length: 2\r\nServer: t\r\nvia: 1.0 edge, 1.1 routemesh\r\n"
        );
    }

    #[test]
    fn mapped_ipv4_peers_are_plain() {
        let p: SocketAddr = "[::ffff:10.0.0.1]:5".parse().unwrap();
        assert_eq!(client_ip(p).to_string(), "10.0.0.1");
    }
}
