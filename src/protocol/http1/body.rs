//! Body framing, both ways: Content-Length, chunked and close-delimited.
//!
//! A [`BodyReader`] follows one body through the bytes that arrive, in pieces of any size:
//! it says how many bytes at the front of a buffer belong to the body and hands out the
//! data bytes among them (chunk framing removed), so a caller can relay the bytes as they
//! are (HTTP/1.1 to HTTP/1.1) or pass on the data only (to HTTP/2, to an HTTP/1.0 client).
//! Chunk-size lines are read by `httparse::parse_chunk_size`, the trailer section by
//! `httparse::parse_headers`; what either lets through that a backend could read another
//! way (a size without digits, bare LF or controls in an extension, a bare-LF trailer) is
//! refused. A size line or trailer section is taken whole or not at all: until it has
//! arrived, fewer bytes than offered are taken and the caller offers them again with more.
//!
//! Encoding: [`encode_chunk`] and [`LAST_CHUNK`].

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (also: responses to HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

/// Why a body cannot be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("invalid trailer section")]
    Trailers,
    #[error("chunk size line or trailer section too long")]
    TooLong,
}

/// Longest chunk-size line (digits and extensions) accepted.
const MAX_SIZE_LINE: usize = 4096;
/// Longest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;
/// Trailer fields parsed at most.
const MAX_TRAILER_FIELDS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    /// At a chunk-size line.
    Size,
    /// In a chunk's data; bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then the blank line.
    Trailers,
    Close,
    Done,
}

/// Follows one body; see the module doc.
#[derive(Debug, Clone)]
pub struct BodyReader {
    state: State,
    /// Data bytes handed out so far.
    data: u64,
}

impl BodyReader {
    pub fn new(framing: Framing) -> BodyReader {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
            Framing::Close => State::Close,
        };
        BodyReader { state, data: 0 }
    }

    /// The body has ended (a close-delimited one ends only with the connection).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Close-delimited: ends when the connection does.
    pub fn until_close(&self) -> bool {
        self.state == State::Close
    }

    /// Data bytes handed out so far (the decoded length).
    pub fn data_len(&self) -> u64 {
        self.data
    }

    /// Bytes still expected of a Content-Length body (`None` for other framings).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Takes body bytes from the front of `buf`: returns how many belong to the body (all
    /// of them, unless the body ended inside `buf` or a size line or trailer section is
    /// still incomplete), calling `on_data` with each run of data bytes among them.
    pub fn advance(
        &mut self,
        buf: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, BodyError> {
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            match self.state {
                State::Done => break,
                State::Close => {
                    self.data += rest.len() as u64;
                    on_data(rest);
                    at = buf.len();
                }
                State::Length(n) | State::Data(n) => {
                    let take = (n.min(rest.len() as u64)) as usize;
                    self.data += take as u64;
                    on_data(&rest[..take]);
                    at += take;
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::DataEnd,
                        (_, l) => State::Data(l),
                    };
                }
                State::DataEnd => {
                    match rest {
                        [b'\r', b'\n', ..] => {}
                        [b'\r'] => break, // LF still to come
                        _ => return Err(BodyError::ChunkEnd),
                    }
                    at += 2;
                    self.state = State::Size;
                }
                State::Size => {
                    let Some((len, size)) = size_line(rest)? else {
                        break;
                    };
                    at += len;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Trailers => {
                    let Some(len) = trailers(rest)? else {
                        break;
                    };
                    at += len;
                    self.state = State::Done;
                }
            }
        }
        Ok(at)
    }

    /// [`advance`](Self::advance) without looking at the data: how many bytes to relay.
    pub fn relay(&mut self, buf: &[u8]) -> Result<usize, BodyError> {
        self.advance(buf, |_| {})
    }
}

/// One chunk-size line at the start of `buf`: `(line length, size)`, `None` until whole.
fn size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, BodyError> {
    // parse_chunk_size takes an empty size as 0: at least one digit.
    match buf.first() {
        None => return Ok(None),
        Some(b) if !b.is_ascii_hexdigit() => return Err(BodyError::ChunkSize),
        _ => {}
    }
    match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete((len, size))) => {
            // Extensions are taken as any bytes up to CRLF: no LF or controls in them.
            let line = &buf[..len - 2];
            if line.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
                return Err(BodyError::ChunkSize);
            }
            Ok(Some((len, size)))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_SIZE_LINE => Err(BodyError::TooLong),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(BodyError::ChunkSize),
    }
}

/// The trailer section at the start of `buf` (fields, then the blank line): its length,
/// `None` until whole.
fn trailers(buf: &[u8]) -> Result<Option<usize>, BodyError> {
    match buf {
        [b'\r', b'\n', ..] => return Ok(Some(2)),
        [b'\r'] | [] => return Ok(None),
        _ => {}
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((len, _))) => {
            let section = &buf[..len];
            let bare_lf = section
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\n' && (i == 0 || section[i - 1] != b'\r'));
            if bare_lf {
                return Err(BodyError::Trailers);
            }
            Ok(Some(len))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => Err(BodyError::TooLong),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(BodyError::Trailers),
    }
}

/// The last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends `data` as one chunk (nothing for empty data, which would end the body).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    chunk_header(data.len(), out);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The size line of a chunk of `len` bytes.
pub fn chunk_header(len: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (bytes taken, data, done) after feeding all of `body` at once.
    fn feed(framing: Framing, body: &[u8]) -> Result<(usize, Vec<u8>, bool), BodyError> {
        let mut r = BodyReader::new(framing);
        let mut data = Vec::new();
        let n = r.advance(body, |d| data.extend_from_slice(d))?;
        Ok((n, data, r.is_done()))
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n0\r\n\r\nGET /next";
        assert_eq!(
            feed(Framing::Chunked, body),
            Ok((15, b"hello".to_vec(), true))
        );
        let body = b"5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(
            feed(Framing::Chunked, body),
            Ok((body.len(), b"hello0123456789".to_vec(), true))
        );
        // Byte by byte, offering what was not taken again: the same answer.
        let mut r = BodyReader::new(Framing::Chunked);
        let mut pending = Vec::new();
        let mut taken = 0;
        for b in body {
            pending.push(*b);
            let n = r.relay(&pending).unwrap();
            taken += n;
            pending.drain(..n);
        }
        assert!(r.is_done() && pending.is_empty() && taken == body.len());
        assert_eq!(r.relay(b"x"), Ok(0));
        assert_eq!(
            feed(Framing::Chunked, b"5\r\nhel"),
            Ok((6, b"hel".to_vec(), false))
        );
    }

    #[test]
    fn bad_chunks_are_refused() {
        for bad in [
            &b"Z\r\n"[..],
            b"\r\n",
            b"fffffffffffffffff\r\n",
            b"5\nhello",
            b"5\r\nhelloX",
            b"5 x\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"5;a\nb\r\nhello\r\n",
            b"5;a\0\r\nhello\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\nX 1\r\n\r\n",
        ] {
            assert!(feed(Framing::Chunked, bad).is_err(), "{bad:?}");
        }
        let long = format!("5;{}", "e".repeat(MAX_SIZE_LINE));
        assert_eq!(
            feed(Framing::Chunked, long.as_bytes()),
            Err(BodyError::TooLong)
        );
    }

    #[test]
    fn lengths_and_close() {
        assert_eq!(
            feed(Framing::Length(3), b"abcdef"),
            Ok((3, b"abc".to_vec(), true))
        );
        assert_eq!(
            feed(Framing::Length(9), b"abc"),
            Ok((3, b"abc".to_vec(), false))
        );
        assert_eq!(feed(Framing::Empty, b"abc"), Ok((0, vec![], true)));
        let (n, d, done) = feed(Framing::Close, b"abc").unwrap();
        assert_eq!((n, d.as_slice(), done), (3, &b"abc"[..], false));
    }

    #[test]
    fn chunks_encode() {
        let mut out = Vec::new();
        encode_chunk(b"hello", &mut out);
        encode_chunk(&[b'x'; 26], &mut out);
        encode_chunk(b"", &mut out);
        out.extend_from_slice(LAST_CHUNK);
        assert!(out.starts_with(b"5\r\nhello\r\n1a\r\nxxx"));
        let (n, data, done) = feed(Framing::Chunked, &out).unwrap();
        assert!(done && n == out.len() && data.len() == 31);
    }
}
