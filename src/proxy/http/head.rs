//! Strict checks of an HTTP/1.x request head and a tracker of request body framing, so the
//! proxy knows where each pipelined request ends and the next head begins.
//!
//! Anything a server and a backend could read two ways is refused here, before hyper parses
//! the head and long before a task sees it: bare CR or LF, NUL and other controls,
//! obs-fold, whitespace before the colon, empty names, lines without a colon, two Hosts,
//! duplicate or non-decimal Content-Length, Transfer-Encoding other than exactly `chunked`,
//! and Content-Length together with Transfer-Encoding. Pure: bytes in, verdict out.

use hyper::http::Uri;
use hyper::http::uri::Authority;

/// Why a head is refused; mapped to 400, 405 or 431 by the caller.
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

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
}

/// What the proxy needs to know about a valid head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadInfo {
    pub framing: Framing,
    /// `Connection: upgrade` with an `Upgrade` header: bytes after this request may become a
    /// tunnel, so no later head on the connection is parsed.
    pub upgrade: bool,
}

/// Byte length of the complete head at the start of `buf` (through the blank line), if it
/// has arrived. Leading empty lines (RFC 9112 §2.2) count as part of the head.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A token character (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field value bytes: visible ASCII, space, tab and obs-text; no other controls.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

pub(crate) fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Checks a complete head (as delimited by [`head_len`]).
pub fn check_head(head: &[u8], max_headers: usize) -> Result<HeadInfo, HeadError> {
    use HeadError::Malformed;
    // Line endings: every LF after a CR and every CR before an LF; no NUL anywhere.
    for (i, &b) in head.iter().enumerate() {
        match b {
            0 => return Err(Malformed("NUL byte in request head")),
            b'\n' if i == 0 || head[i - 1] != b'\r' => {
                return Err(Malformed("bare LF in request head"));
            }
            b'\r' if head.get(i + 1) != Some(&b'\n') => {
                return Err(Malformed("bare CR in request head"));
            }
            _ => {}
        }
    }
    let body = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or(Malformed("incomplete head"))?;
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut request_line = lines.next().unwrap_or_default();
    while request_line.is_empty() {
        request_line = lines.next().ok_or(Malformed("empty request"))?;
    }

    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed("request line is not `METHOD TARGET VERSION`"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Malformed("invalid method"));
    }
    if method == b"CONNECT" {
        return Err(HeadError::Connect);
    }
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Malformed("invalid request target"));
    }
    if Uri::try_from(target).is_err() {
        return Err(Malformed("invalid request target"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err(Malformed("unsupported HTTP version")),
    };

    let mut count = 0usize;
    let mut hosts = 0usize;
    let mut content_length: Option<u64> = None;
    let mut te_lines = 0usize;
    let mut chunked = false;
    let mut has_upgrade = false;
    let mut connection_upgrade = false;
    for line in lines {
        if line.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
            return Err(Malformed("obsolete line folding in header"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Malformed("header line without a colon"))?;
        let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
        if name.is_empty() {
            return Err(Malformed("empty header name"));
        }
        if !name.iter().all(|&b| is_tchar(b)) {
            return Err(Malformed(
                "invalid header name (whitespace before the colon?)",
            ));
        }
        if !value.iter().all(|&b| is_value_byte(b)) {
            return Err(Malformed("control character in header value"));
        }
        count += 1;
        if count > max_headers {
            return Err(HeadError::TooManyHeaders(max_headers));
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if hosts > 1 {
                return Err(Malformed("more than one Host header"));
            }
            if !value.is_empty() && Authority::try_from(value).is_err() {
                return Err(Malformed("invalid Host header"));
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Err(Malformed("more than one Content-Length"));
            }
            if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                return Err(Malformed("invalid Content-Length"));
            }
            // At most 18 digits: always fits.
            content_length = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_lines += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            has_upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if http11 && hosts == 0 {
        return Err(Malformed("missing Host header"));
    }
    let framing = match (te_lines, content_length) {
        (0, None) => Framing::Empty,
        (0, Some(0)) => Framing::Empty,
        (0, Some(n)) => Framing::Length(n),
        (_, Some(_)) => return Err(Malformed("both Content-Length and Transfer-Encoding")),
        (_, None) if !http11 => return Err(Malformed("Transfer-Encoding in an HTTP/1.0 request")),
        (1, None) if chunked => Framing::Chunked,
        _ => return Err(Malformed("Transfer-Encoding other than exactly `chunked`")),
    };
    Ok(HeadInfo {
        framing,
        upgrade: has_upgrade && connection_upgrade,
    })
}

/// Follows a chunked body byte by byte without decoding it, to find where it ends. Refuses
/// what hyper's decoder would refuse too (bad size, overflow, missing CRLF), so a body the
/// two could split differently never passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// In the size digits; `digits` seen so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the digits: optional whitespace, then `;ext` or CR.
    SizeTail {
        size: u64,
        in_ext: bool,
    },
    /// CR seen, LF expected; then data (size > 0) or trailers.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (an empty one ends the body).
    TrailerStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::Size { size: 0, digits: 0 }
    }
}

impl Chunked {
    /// Consumes body bytes from `data`; returns how many belong to this body (fewer than
    /// `data.len()` only when the body ended).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            *self = match *self {
                Chunked::Done => return Ok(i),
                Chunked::Data(n) => {
                    let take = (n as usize).min(data.len() - i);
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 {
                        Chunked::DataCr
                    } else {
                        Chunked::Data(left)
                    };
                    continue;
                }
                Chunked::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) => {
                        if digits >= 16 {
                            return Err("chunk size overflows");
                        }
                        Chunked::Size {
                            size: size * 16 + d as u64,
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return Err("invalid chunk size"),
                    None => match b {
                        b' ' | b'\t' => Chunked::SizeTail {
                            size,
                            in_ext: false,
                        },
                        b';' => Chunked::SizeTail { size, in_ext: true },
                        b'\r' => Chunked::SizeLf { size },
                        _ => return Err("invalid chunk size"),
                    },
                },
                Chunked::SizeTail { size, in_ext } => match b {
                    b'\r' => Chunked::SizeLf { size },
                    b'\n' | 0 => return Err("invalid chunk extension"),
                    b';' => Chunked::SizeTail { size, in_ext: true },
                    b' ' | b'\t' => Chunked::SizeTail { size, in_ext },
                    _ if in_ext => Chunked::SizeTail { size, in_ext },
                    _ => return Err("invalid chunk size"),
                },
                Chunked::SizeLf { size } => match b {
                    b'\n' if size == 0 => Chunked::TrailerStart,
                    b'\n' => Chunked::Data(size),
                    _ => return Err("chunk size line not ended by CRLF"),
                },
                Chunked::DataCr => match b {
                    b'\r' => Chunked::DataLf,
                    _ => return Err("chunk data not followed by CRLF"),
                },
                Chunked::DataLf => match b {
                    b'\n' => Chunked::default(),
                    _ => return Err("chunk data not followed by CRLF"),
                },
                Chunked::TrailerStart => match b {
                    b'\r' => Chunked::TrailerLf { empty: true },
                    b'\n' | 0 => return Err("invalid trailer"),
                    _ => Chunked::TrailerLine,
                },
                Chunked::TrailerLine => match b {
                    b'\r' => Chunked::TrailerLf { empty: false },
                    b'\n' | 0 => return Err("invalid trailer"),
                    _ => Chunked::TrailerLine,
                },
                Chunked::TrailerLf { empty } => match b {
                    b'\n' if empty => {
                        *self = Chunked::Done;
                        return Ok(i + 1);
                    }
                    b'\n' => Chunked::TrailerStart,
                    _ => return Err("invalid trailer"),
                },
            };
            i += 1;
        }
        Ok(i)
    }

    pub fn is_done(&self) -> bool {
        *self == Chunked::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str) -> Result<HeadInfo, HeadError> {
        check_head(head.as_bytes(), 100)
    }

    fn bad(head: &str) -> String {
        match check(head) {
            Err(e) => e.to_string(),
            Ok(i) => panic!("accepted {head:?} as {i:?}"),
        }
    }

    #[test]
    fn plain_requests_pass() {
        let i = check("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(
            i,
            HeadInfo {
                framing: Framing::Empty,
                upgrade: false
            }
        );
        let i =
            check("\r\nPOST /x?y=1 HTTP/1.1\r\nhost: a:80\r\ncontent-length: 12\r\n\r\n").unwrap();
        assert_eq!(i.framing, Framing::Length(12));
        let i = check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(i.framing, Framing::Chunked);
        let i = check("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(i.framing, Framing::Empty);
        let i = check("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(i.upgrade);
        let i = check("GET / HTTP/1.1\r\nHost: a\r\nX-Obs: caf\u{e9}\r\nX-Empty:\r\n\r\n").unwrap();
        assert_eq!(i.framing, Framing::Empty);
        let i = check("GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n").unwrap();
        assert_eq!(i.framing, Framing::Empty);
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
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
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
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n",
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
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
                "exactly `chunked`",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "exactly `chunked`",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
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
                "invalid header name",
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n", "NUL"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", "bare CR"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nc: d\r\n\r\n",
                "bare LF",
            ),
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
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "method"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n", "control"),
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
        assert_eq!(
            check_head(head.as_bytes(), 3),
            Err(HeadError::TooManyHeaders(3))
        );
        assert!(check_head(head.as_bytes(), 4).is_ok());
    }

    #[test]
    fn head_len_finds_the_blank_line() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"), Some(27));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }

    fn feed_all(body: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut c = Chunked::default();
        let n = c.feed(body)?;
        Ok((n, c.is_done()))
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n0\r\n\r\nGET /next";
        assert_eq!(feed_all(body), Ok((15, true)));
        let body = b"5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(feed_all(body), Ok((body.len(), true)));
        // Byte by byte gives the same answer.
        let mut c = Chunked::default();
        for (i, b) in body.iter().enumerate() {
            assert_eq!(c.feed(&[*b]), Ok(1), "byte {i}");
        }
        assert!(c.is_done());
        assert_eq!(c.feed(b"x"), Ok(0));
        assert_eq!(feed_all(b"5\r\nhel"), Ok((6, false)));
    }

    #[test]
    fn bad_chunks_are_refused() {
        assert!(feed_all(b"Z\r\n").is_err());
        assert!(feed_all(b"\r\n").is_err());
        assert!(feed_all(b"fffffffffffffffff\r\n").is_err());
        assert!(feed_all(b"5\nhello").is_err());
        assert!(feed_all(b"5\r\nhelloX").is_err());
        assert!(feed_all(b"5 x\r\n").is_err());
        assert!(feed_all(b"-5\r\n").is_err());
        assert!(feed_all(b"0\r\nX: 1\n").is_err());
    }
}
