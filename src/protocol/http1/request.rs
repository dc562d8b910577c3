//! Request heads: httparse reads the head, and the same call checks it by our strict rules,
//! so anything a proxy and a backend could read two ways is refused before any task sees
//! it. On top of httparse (which refuses bad tokens, controls and NUL in values, obs-fold,
//! whitespace before the colon): bare LF line endings (httparse accepts them), targets
//! with non-ASCII bytes or that are no URI, versions other than 1.0 and 1.1, CONNECT, a
//! missing (HTTP/1.1) or repeated Host, an invalid Host, repeated or non-decimal
//! Content-Length, Transfer-Encoding other than exactly one `chunked`, Transfer-Encoding in
//! HTTP/1.0, and Content-Length with Transfer-Encoding. The limits (`max_header_bytes`,
//! `max_headers`) are checked in the same call.
//!
//! A refused head says why in words a client can act on; the slower diagnosis that finds
//! those words runs only on refusal.

use std::mem::MaybeUninit;

use hyper::http::Uri;
use hyper::http::uri::Authority;

use super::body::Framing;
use super::{list_items, offset_in, trim_ows};

/// Why a head is refused; the proxy answers 400, 405 or 431.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("CONNECT is not supported by this proxy")]
    Connect,
}

/// The `[http]` limits on a head.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    /// As `Via` writes it.
    pub fn via(self) -> &'static [u8] {
        match self {
            Version::Http10 => b"1.0",
            Version::Http11 => b"1.1",
        }
    }
}

/// A checked request head, borrowing the bytes it was parsed from.
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    /// Bytes of the head, through the blank line (leading empty lines included).
    pub len: usize,
    pub method: &'b str,
    pub target: &'b str,
    pub version: Version,
    pub headers: &'h [httparse::Header<'b>],
    /// `Empty`, `Length` or `Chunked` (a request body is never close-delimited).
    pub framing: Framing,
    /// The Host field's value, trimmed (`None` without one, HTTP/1.0 only).
    pub host: Option<&'b [u8]>,
    /// The client keeps the connection after this exchange: HTTP/1.1 without
    /// `Connection: close`, HTTP/1.0 with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// The `Upgrade` value when `Connection` names `upgrade` (a protocol switch asked for).
    pub upgrade: Option<&'b [u8]>,
    /// `Expect: 100-continue`: the client waits for a 100 before it sends the body.
    pub expect_continue: bool,
}

impl RequestHead<'_, '_> {
    /// Name and value of every field, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        self.headers.iter().map(|h| (h.name.as_bytes(), h.value))
    }

    /// The path of the target (no query), for routing and logs; `/` for `*`.
    pub fn path(&self) -> &str {
        let t = self.target;
        let t = if t.starts_with('/') {
            t
        } else {
            // absolute-form: after the authority
            t.split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("/")
        };
        t.split('?').next().unwrap_or(t)
    }

    /// The authority of an absolute-form target: the host asked for (RFC 9112 §3.2.2).
    pub fn target_authority(&self) -> Option<&str> {
        let rest = self.target.split_once("://")?.1;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        Some(&rest[..end]).filter(|a| !a.is_empty())
    }

    /// The target as the task gets it: origin-form (absolute-form loses its authority,
    /// which becomes Host).
    pub fn origin_target(&self) -> &str {
        if self.target.starts_with('/') || self.target == "*" {
            return self.target;
        }
        match self.target.split_once("://") {
            Some((_, rest)) => match rest.find(['/', '?']) {
                Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
                // "http://a?q" has an empty path: "/" is implied, the query is lost here,
                // as RFC 9112 §3.2.1 says the path must not be empty.
                _ => "/",
            },
            None => self.target,
        }
    }

    /// GET, HEAD, OPTIONS, PUT, DELETE, TRACE: may be sent twice (RFC 9110 §9.2.2).
    pub fn idempotent(&self) -> bool {
        is_idempotent(self.method.as_bytes())
    }
}

/// Whether a method may be sent twice (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &[u8]) -> bool {
    matches!(
        m,
        b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE" | b"TRACE"
    )
}

/// Parses and checks the request head at the start of `buf`: `Ok(None)` until it is whole
/// (and within `max_header_bytes`). `storage` holds the parsed fields; its length is
/// `max_headers`.
pub fn parse<'h, 'b>(
    buf: &'b [u8],
    limits: &Limits,
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<RequestHead<'h, 'b>>, HeadError> {
    use HeadError::Malformed;
    let storage_len = storage.len();
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if let Some(why) = diagnose(buf) {
                return Err(Malformed(why));
            }
            if buf.len() > limits.max_header_bytes {
                return Err(HeadError::TooLarge(limits.max_header_bytes));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooManyHeaders(storage_len));
        }
        Err(e) => return Err(Malformed(diagnose(buf).unwrap_or_else(|| describe(e)))),
    };
    if len > limits.max_header_bytes {
        return Err(HeadError::TooLarge(limits.max_header_bytes));
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Malformed("incomplete request line"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;

    // Line endings httparse lets through: bare LF before the request line, after it, after
    // each field, and as the blank line.
    let start = offset_in(buf, method.as_bytes());
    if !buf[..start].chunks(2).all(|p| p == b"\r\n") {
        return Err(Malformed("bare LF in request head"));
    }
    let line_end = offset_in(buf, target.as_bytes()) + target.len() + " HTTP/1.1".len();
    if buf.get(line_end) != Some(&b'\r') || !buf[..len].ends_with(b"\r\n\r\n") {
        return Err(Malformed("bare LF in request head"));
    }
    for h in headers {
        let after = if h.value.is_empty() {
            offset_in(buf, h.name.as_bytes()) + h.name.len() + 1
        } else {
            offset_in(buf, h.value) + h.value.len()
        };
        let rest = &buf[after..len];
        let ws = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t'))
            .unwrap_or(rest.len());
        if rest.get(ws) != Some(&b'\r') {
            return Err(Malformed("bare LF in request head"));
        }
    }

    if method == "CONNECT" {
        return Err(HeadError::Connect);
    }
    if !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) || Uri::try_from(target).is_err() {
        return Err(Malformed("invalid request target"));
    }
    let version = match minor {
        1 => Version::Http11,
        0 => Version::Http10,
        _ => return Err(Malformed("unsupported HTTP version")),
    };

    let mut host: Option<&'b [u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut te_fields = 0usize;
    let mut chunked = false;
    let mut upgrade_value: Option<&'b [u8]> = None;
    let (mut conn_close, mut conn_keep_alive, mut conn_upgrade) = (false, false, false);
    let mut expect_continue = false;
    for h in headers {
        let name = h.name.as_bytes();
        // Sorted by length first: most fields are none of these.
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                if host.is_some() {
                    return Err(Malformed("more than one Host header"));
                }
                let v = trim_ows(h.value);
                if !v.is_empty() && Authority::try_from(v).is_err() {
                    return Err(Malformed("invalid Host header"));
                }
                host = Some(v);
            }
            6 if name.eq_ignore_ascii_case(b"expect") => {
                expect_continue |= trim_ows(h.value).eq_ignore_ascii_case(b"100-continue");
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade_value = Some(h.value),
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for t in list_items(h.value) {
                    conn_close |= t.eq_ignore_ascii_case(b"close");
                    conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                    conn_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
                }
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                if content_length.is_some() {
                    return Err(Malformed("more than one Content-Length"));
                }
                let v = trim_ows(h.value);
                if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                    return Err(Malformed("invalid Content-Length"));
                }
                // At most 18 digits: always fits.
                content_length = Some(v.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64));
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                te_fields += 1;
                chunked = trim_ows(h.value).eq_ignore_ascii_case(b"chunked");
            }
            _ => {}
        }
    }
    if version == Version::Http11 && host.is_none() {
        return Err(Malformed("missing Host header"));
    }
    let framing = match (te_fields, content_length) {
        (0, None) | (0, Some(0)) => Framing::Empty,
        (0, Some(n)) => Framing::Length(n),
        (_, Some(_)) => return Err(Malformed("both Content-Length and Transfer-Encoding")),
        (_, None) if version == Version::Http10 => {
            return Err(Malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        (1, None) if chunked => Framing::Chunked,
        _ => return Err(Malformed("Transfer-Encoding other than exactly `chunked`")),
    };
    let keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };
    Ok(Some(RequestHead {
        len,
        method,
        target,
        version,
        headers,
        framing,
        host,
        keep_alive,
        upgrade: upgrade_value.filter(|_| conn_upgrade && version == Version::Http11),
        expect_continue: expect_continue && version == Version::Http11,
    }))
}

/// Words for an httparse error the diagnosis did not name.
fn describe(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "control character in header value",
        httparse::Error::NewLine => "bare CR in request head",
        httparse::Error::Token => "invalid method or request target",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "malformed request head",
    }
}

/// Field value bytes: visible ASCII, space, tab and obs-text; no other controls.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Finds the first problem of a (possibly partial) head, in words: what a refusal says.
/// Only complete lines are judged, so a prefix of a valid head has none.
fn diagnose(buf: &[u8]) -> Option<&'static str> {
    let end = memchr::memmem::find(buf, b"\r\n\r\n").map_or(buf.len(), |i| i + 4);
    let head = &buf[..end];
    for (i, &b) in head.iter().enumerate() {
        match b {
            0 => return Some("NUL byte in request head"),
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Some("bare LF in request head"),
            b'\r' if i + 1 < head.len() && head[i + 1] != b'\n' => {
                return Some("bare CR in request head");
            }
            _ => {}
        }
    }
    // Complete lines only (the last piece may still be arriving).
    let mut lines = head.split(|&b| b == b'\n');
    let _partial = head.last() != Some(&b'\n');
    let mut complete: Vec<&[u8]> = Vec::new();
    let mut rest = lines.next();
    for next in lines {
        if let Some(l) = rest {
            complete.push(l.strip_suffix(b"\r").unwrap_or(l));
        }
        rest = Some(next);
    }
    let mut it = complete.into_iter().skip_while(|l| l.is_empty());
    let request_line = it.next()?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some("request line is not `METHOD TARGET VERSION`");
    };
    if method.is_empty() || !method.iter().all(|&b| super::is_tchar(b)) {
        return Some("invalid method");
    }
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Some("invalid request target");
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Some("unsupported HTTP version");
    }
    for line in it {
        if line.is_empty() {
            break;
        }
        if line.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
            return Some("obsolete line folding in header");
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Some("header line without a colon");
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() {
            return Some("empty header name");
        }
        if !name.iter().all(|&b| super::is_tchar(b)) {
            return Some("invalid header name (whitespace before the colon?)");
        }
        if !value.iter().all(|&b| is_value_byte(b)) {
            return Some("control character in header value");
        }
    }
    None
}

/// Header storage for [`parse`]: `max_headers` uninitialized slots.
pub fn storage<'b>(max_headers: usize) -> Vec<MaybeUninit<httparse::Header<'b>>> {
    let mut v = Vec::with_capacity(max_headers);
    v.resize_with(max_headers, MaybeUninit::uninit);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 65536,
        max_headers: 100,
    };

    /// (framing, keep_alive, upgrade, expect) of a whole head.
    fn check(head: &str) -> Result<(Framing, bool, bool, bool), HeadError> {
        check_with(head.as_bytes(), &LIMITS)
    }

    fn check_with(head: &[u8], limits: &Limits) -> Result<(Framing, bool, bool, bool), HeadError> {
        let mut s = storage(limits.max_headers);
        match parse(head, limits, &mut s)? {
            Some(h) => {
                assert_eq!(h.len, head.len());
                Ok((
                    h.framing,
                    h.keep_alive,
                    h.upgrade.is_some(),
                    h.expect_continue,
                ))
            }
            None => Err(HeadError::Malformed("partial")),
        }
    }

    fn bad(head: &str) -> String {
        match check(head) {
            Err(e) => e.to_string(),
            Ok(i) => panic!("accepted {head:?} as {i:?}"),
        }
    }

    #[test]
    fn plain_requests_pass() {
        assert_eq!(
            check("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok((Framing::Empty, true, false, false))
        );
        let (f, ..) =
            check("\r\nPOST /x?y=1 HTTP/1.1\r\nhost: a:80\r\ncontent-length: 12\r\n\r\n").unwrap();
        assert_eq!(f, Framing::Length(12));
        let (f, ..) =
            check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(f, Framing::Chunked);
        assert_eq!(
            check("GET / HTTP/1.0\r\n\r\n"),
            Ok((Framing::Empty, false, false, false))
        );
        assert_eq!(
            check("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            Ok((Framing::Empty, true, false, false))
        );
        let (_, _, up, _) = check("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(up);
        let (_, ka, ..) =
            check("GET / HTTP/1.1\r\nHost: a\r\nX-Obs: caf\u{e9}\r\nX-Empty:\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert!(!ka);
        assert!(check("GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n").is_ok());
        let (.., expect) =
            check("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
                .unwrap();
        assert!(expect);
    }

    #[test]
    fn targets_and_paths() {
        let mut s = storage(10);
        let raw = b"GET http://a.example:8080/x/y?q=1 HTTP/1.1\r\nHost: other\r\n\r\n";
        let h = parse(raw, &LIMITS, &mut s).unwrap().unwrap();
        assert_eq!(h.target_authority(), Some("a.example:8080"));
        assert_eq!(h.origin_target(), "/x/y?q=1");
        assert_eq!(h.path(), "/x/y");
        let mut s = storage(10);
        let raw = b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
        let h = parse(raw, &LIMITS, &mut s).unwrap().unwrap();
        assert_eq!(
            (h.origin_target(), h.path(), h.target_authority()),
            ("*", "/", None)
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for (head, why) in [
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                "more than one Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                "exactly `chunked`",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "exactly `chunked`",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
                "exactly `chunked`",
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "HTTP/1.0",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
                "folding",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
                "whitespace before the colon",
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n", "NUL"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", "bare CR"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nc: d\r\n\r\n",
                "bare LF",
            ),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF"),
            ("GET / HTTP/1.1\r\nHost: a\n\n", "bare LF"),
            ("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "bare LF"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
                "empty header name",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
                "without a colon",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "more than one Host",
            ),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\n\r\n", "missing Host"),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", "version"),
            ("GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", "target"),
            ("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n", "target"),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "method"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n", "control"),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
                "control",
            ),
        ] {
            let e = bad(head);
            assert!(e.contains(why), "{head:?}: got {e:?}, want {why:?}");
        }
        assert_eq!(
            check("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(HeadError::Connect)
        );
        let many: String = (0..3).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        let three = Limits {
            max_headers: 3,
            ..LIMITS
        };
        assert_eq!(
            check_with(head.as_bytes(), &three),
            Err(HeadError::TooManyHeaders(3))
        );
        let four = Limits {
            max_headers: 4,
            ..LIMITS
        };
        assert!(check_with(head.as_bytes(), &four).is_ok());
    }

    #[test]
    fn size_limit_applies_to_partial_and_whole_heads() {
        let small = Limits {
            max_header_bytes: 40,
            max_headers: 10,
        };
        let mut s = storage(10);
        let partial = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "a".repeat(50));
        assert_eq!(
            parse(partial.as_bytes(), &small, &mut s).unwrap_err(),
            HeadError::TooLarge(40)
        );
        let mut s = storage(10);
        let whole = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "a".repeat(30));
        assert_eq!(
            parse(whole.as_bytes(), &small, &mut s).unwrap_err(),
            HeadError::TooLarge(40)
        );
        let mut s = storage(10);
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHo", &small, &mut s),
            Ok(None)
        ));
    }
}
