//! The HTTP/1.1 codec every HTTP/1.x exchange of the proxy goes through, whatever the
//! client's transport (plain TCP, TLS, after a PROXY header) and whatever the other side
//! (an HTTP/1.1 task, or an HTTP/2 client or task through hyper).
//!
//! - [`request`]: a request head is parsed by httparse and checked by our strict rules in
//!   the same call (the smuggling set: bare CR/LF, NUL, obs-fold, duplicate Host or
//!   Content-Length, Transfer-Encoding other than exactly `chunked`, both framings…; the
//!   size and field-count limits). Refused heads never reach a task.
//! - [`response`]: a task's response head is parsed and rewritten for the client in one
//!   pass (framing, keep-alive, hop-by-hop fields, `Via`).
//! - [`body`]: body framing both ways: Content-Length, chunked (sizes by
//!   `httparse::parse_chunk_size`, trailers by `httparse::parse_headers`) and
//!   close-delimited; relayed as they are, or decoded to data.
//! - [`editor`]: the one header editor: hop-by-hop fields and those `Connection` names are
//!   dropped before `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
//!   `Forwarded` and `Via` are added.
//!
//! Pure: bytes in, verdicts and bytes out. No sockets, no clock, no hyper types except
//! `HeaderMap` as one sink of the editor.

pub mod body;
pub mod editor;
#[cfg(test)]
mod proptests;
pub mod request;
pub mod response;

pub use body::{BodyError, BodyReader, Framing};
pub use editor::{Forwarding, HeaderSink};
pub use request::{HeadError, Limits, RequestHead, Version};
pub use response::{ResponseHead, ResponseRules};

/// A token character (RFC 9110 §5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value without the optional whitespace around it.
pub fn trim_ows(v: &[u8]) -> &[u8] {
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

/// The comma-separated list elements of a field value, trimmed, empty ones left out.
pub fn list_items(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Whether the `Connection` fields among `headers` name `token` (case-insensitive).
pub fn connection_has<'h>(
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    token: &[u8],
) -> bool {
    headers
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .any(|(_, v)| list_items(v).any(|t| t.eq_ignore_ascii_case(token)))
}

/// Where a slice borrowed from `buf` starts in it.
fn offset_in(buf: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize)
}
