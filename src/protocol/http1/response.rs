//! Response heads from a task: parsed by httparse and rewritten for the client in the same
//! pass: how the body is delimited, whether the task's connection can be kept and the
//! client's must close, the status line and the fields the [`editor`](super::editor)
//! keeps, `Via`, and `Connection` for the client hop.
//!
//! A chunked body goes to an HTTP/1.1 client as it is; to an HTTP/1.0 client it is decoded
//! and delimited by closing. A 101 is accepted only for a request that asked to upgrade.

use hyper::header::HeaderMap;

use super::body::Framing;
use super::editor::{self, HeaderSink, ResponseFraming};
use super::{list_items, trim_ows};

/// Response header fields parsed at most.
pub const MAX_FIELDS: usize = 128;

/// What the request decided about its response.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseRules {
    /// A HEAD request: no body whatever the fields say.
    pub head_request: bool,
    /// The client connection closes after this exchange.
    pub client_close: bool,
    /// The client speaks HTTP/1.0.
    pub client_http10: bool,
    /// The request asked to switch protocols: a 101 may come.
    pub upgrade: bool,
}

/// What the proxy needs from a task's response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head.
    pub len: usize,
    pub code: u16,
    /// How the task delimits the body.
    pub framing: Framing,
    /// The task's connection can carry another request after this body.
    pub reusable: bool,
    /// The client's connection closes after this response.
    pub close: bool,
    /// The body goes to the client decoded (chunked towards HTTP/1.0).
    pub decode: bool,
    /// 101 to an upgrade request: bytes go both ways unframed after the head.
    pub switching: bool,
}

impl ResponseHead {
    /// 1xx other than 101: skipped, the final head follows.
    pub fn informational(&self) -> bool {
        (100..200).contains(&self.code) && self.code != 101
    }
}

/// Where a rewritten response head goes: wire bytes for an HTTP/1.x client, or a
/// `HeaderMap` (status kept by the caller) for hyper.
pub trait ResponseSink: HeaderSink {
    /// Forgets what an earlier attempt wrote.
    fn clear(&mut self);
    fn status_line(&mut self, code: u16, reason: &[u8]);
    /// `Connection` for the client hop (HTTP/1.x only).
    fn connection(&mut self, value: &[u8]);
    fn end(&mut self);
}

impl ResponseSink for Vec<u8> {
    fn clear(&mut self) {
        Vec::clear(self);
    }

    fn status_line(&mut self, code: u16, reason: &[u8]) {
        self.extend_from_slice(b"HTTP/1.1 ");
        for d in [code / 100 % 10, code / 10 % 10, code % 10] {
            self.push(b'0' + d as u8);
        }
        self.push(b' ');
        self.extend_from_slice(reason);
        self.extend_from_slice(b"\r\n");
    }

    fn connection(&mut self, value: &[u8]) {
        self.field(b"connection", value);
    }

    fn end(&mut self) {
        self.extend_from_slice(b"\r\n");
    }
}

impl ResponseSink for HeaderMap {
    fn clear(&mut self) {
        HeaderMap::clear(self);
    }

    fn status_line(&mut self, _: u16, _: &[u8]) {}
    fn connection(&mut self, _: &[u8]) {}
    fn end(&mut self) {}
}

/// Parses the response head at the start of `buf` (`Ok(None)` until whole). A final head
/// (not 1xx, or a 101 that switches) is rewritten into `sink`; 1xx ones are not.
pub fn parse(
    buf: &[u8],
    rules: &ResponseRules,
    sink: &mut impl ResponseSink,
) -> Result<Option<ResponseHead>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let headers: &[httparse::Header<'_>] = resp.headers;
    let fields = || headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let mut conn_close = false;
    let mut length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut upgrade: Option<&[u8]> = None;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let v = trim_ows(h.value);
            if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length in response".into());
            }
            let n = v.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64);
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length in response".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn_close |= list_items(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = Some(h.value);
        }
    }
    if code == 101 && !rules.upgrade {
        return Err("101 without an upgrade request".into());
    }
    let switching = code == 101;
    let informational = (100..200).contains(&code) && !switching;
    let framing = if rules.head_request || (100..200).contains(&code) || code == 204 || code == 304
    {
        Framing::Empty
    } else if let Some(te) = te {
        // The last coding decides (RFC 9112 §6.3); anything but chunked ends with the
        // connection.
        match list_items(te).last() {
            Some(last) if last.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::Close,
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let reusable = resp.version == Some(1) && !conn_close && framing != Framing::Close;
    let decode = framing == Framing::Chunked && rules.client_http10;
    let close = !switching && (rules.client_close || framing == Framing::Close || decode);
    let head = ResponseHead {
        len,
        code,
        framing,
        reusable: reusable && !switching,
        close,
        decode,
        switching,
    };
    if informational {
        return Ok(Some(head));
    }
    let reason = match resp.reason.filter(|r| !r.is_empty()) {
        Some(r) => r.as_bytes(),
        None => hyper::StatusCode::from_u16(code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
            .as_bytes(),
    };
    sink.status_line(code, reason);
    let keep = ResponseFraming {
        keep_te: framing == Framing::Chunked && !decode,
        // HEAD, 304: the length of the body a GET would have had.
        keep_length: matches!(framing, Framing::Length(_))
            || (framing == Framing::Empty && length.is_some() && !switching),
    };
    editor::response_fields(fields(), keep, b"1.1", sink);
    if switching {
        sink.connection(b"upgrade");
        if let Some(u) = upgrade {
            sink.field(b"upgrade", u);
        }
    } else if close {
        sink.connection(b"close");
    } else if rules.client_http10 {
        sink.connection(b"keep-alive");
    }
    sink.end();
    Ok(Some(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with(raw: &[u8], rules: ResponseRules) -> (Option<ResponseHead>, String) {
        let mut out = Vec::new();
        let h = parse(raw, &rules, &mut out).unwrap();
        (h, String::from_utf8(out).unwrap())
    }

    fn head(raw: &[u8], rules: ResponseRules) -> ResponseHead {
        parse_with(raw, rules).0.unwrap()
    }

    #[test]
    fn framing() {
        let r = ResponseRules::default();
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", r);
        assert!(h.framing == Framing::Length(5) && h.reusable && !h.close);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            r,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let h = head(b"HTTP/1.0 200 OK\r\n\r\n", r);
        assert!(h.framing == Framing::Close && !h.reusable && h.close);
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            ResponseRules {
                head_request: true,
                ..r
            },
        );
        assert_eq!(h.framing, Framing::Empty);
        let h = head(b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n", r);
        assert!(h.informational());
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(parse(bad, &r, &mut Vec::new()).is_err(), "{bad:?}");
        }
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n", &r, &mut Vec::new()), Ok(None));
    }

    #[test]
    fn rewrite_strips_hop_by_hop_and_adds_via() {
        let (_, out) = parse_with(
            b"HTTP/1.1 200 OK\r\nConnection: x-secret, keep-alive\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nVia: 1.0 edge\r\nContent-Length: 2\r\nServer: t\r\n\r\n",
            ResponseRules::default(),
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: t\r\nvia: 1.0 edge, 1.1 routemesh\r\n\r\n"
        );
        let (_, out) = parse_with(
            b"HTTP/1.0 200 OK\r\nServer: t\r\n\r\n",
            ResponseRules {
                client_close: true,
                ..Default::default()
            },
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: t\r\nvia: 1.1 routemesh\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn http10_clients_get_decoded_chunks_or_explicit_keep_alive() {
        let ten = ResponseRules {
            client_http10: true,
            ..Default::default()
        };
        let (h, out) = parse_with(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            ten,
        );
        let h = h.unwrap();
        assert!(h.decode && h.close && h.reusable);
        assert!(
            !out.to_ascii_lowercase().contains("transfer-encoding"),
            "{out}"
        );
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        let (h, out) = parse_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", ten);
        assert!(!h.unwrap().close);
        assert!(out.ends_with("connection: keep-alive\r\n\r\n"), "{out}");
    }

    #[test]
    fn switching_protocols_keeps_upgrade() {
        let up = ResponseRules {
            upgrade: true,
            ..Default::default()
        };
        let (h, out) = parse_with(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n",
            up,
        );
        let h = h.unwrap();
        assert!(h.switching && !h.reusable && !h.close);
        assert_eq!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\nvia: 1.1 routemesh\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
    }
}
