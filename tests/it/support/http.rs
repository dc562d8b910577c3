//! The one HTTP/1.x test client: a blocking request with `Connection: close` whose whole
//! exchange is bounded by one deadline, and the one response reader (head parsed by
//! `httparse`; `Content-Length`, chunked and close-delimited bodies) that also reads a
//! response off a keep-alive connection or out of a byte buffer.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Bound of the whole exchange of [`get`], [`try_get`] and [`request`].
const TIMEOUT: Duration = Duration::from_secs(10);
/// Most header fields a response may have.
const MAX_HEADERS: usize = 64;
/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A response: version, status, head fields, body (chunked bodies decoded).
#[derive(Debug, Clone)]
pub struct Response {
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` (`Connection: close`, ≤ 10 s); status and body. Panics on I/O or parse errors.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"))
}

/// Like [`get`] but returns I/O and parse errors instead of panicking.
pub fn try_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    request(addr, "GET", path, &[], None, TIMEOUT).map(|r| (r.status, r.text()))
}

/// `GET path` bounded by `timeout` as a whole; status and body, or why not.
pub fn get_within(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    request(addr, "GET", path, &[], None, timeout)
        .map(|r| (r.status, r.text()))
        .map_err(|e| e.to_string())
}

/// One request with `Host: <addr>` and `Connection: close` (plus `Content-Length` for a
/// body); the connect, the writes and every read share one deadline, `timeout` from now.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Response> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let mut conn = Deadline {
        stream: &stream,
        deadline,
    };
    conn.write_all(&bytes)?;
    read_response(&mut BufReader::new(conn))
}

/// Reads one whole response from `r`, never past its end (so a keep-alive connection can be
/// read again); a body without length runs to EOF.
pub fn read_response<R: Read>(r: &mut R) -> io::Result<Response> {
    let Head {
        version,
        status,
        headers,
    } = read_head(r)?;
    let field = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let body =
        if field("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            read_chunked(r)?
        } else if let Some(len) = field("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).map_err(|e| {
                io::Error::new(e.kind(), format!("body cut short (of {len} bytes): {e}"))
            })?;
            body
        } else {
            read_to_close(r)?
        };
    Ok(Response {
        version,
        status,
        headers,
        body,
    })
}

/// Reads one response off a keep-alive connection that must be `HTTP/1.1 200`; its body.
pub fn read_ok<R: Read>(r: &mut R) -> String {
    let resp = read_response(r).expect("a response on the open connection");
    assert_eq!(
        (resp.version, resp.status),
        (1, 200),
        "HTTP/1.1 200: {}",
        resp.text()
    );
    resp.text()
}

/// Parses a complete response held in `raw` (e.g. all a connection sent before it closed).
pub fn parse_response(raw: &[u8]) -> io::Result<Response> {
    read_response(&mut &raw[..])
}

/// A parsed response head.
pub struct Head {
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// Reads a response head byte by byte (nothing past its blank line) and parses it.
pub fn read_head<R: Read>(r: &mut R) -> io::Result<Head> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} bytes of response head: {:?}",
                        head.len(),
                        String::from_utf8_lossy(&head)
                    ),
                ));
            }
            Ok(_) => head.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if head.len() > MAX_HEAD {
            return Err(bad(format!("response head over {MAX_HEAD} bytes")));
        }
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    parsed
        .parse(&head)
        .map_err(|e| bad(format!("{e} in {:?}", String::from_utf8_lossy(&head))))?;
    let status = parsed.code.ok_or_else(|| bad("no status code"))?;
    let version = parsed.version.ok_or_else(|| bad("no version"))?;
    let headers = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(Head {
        version,
        status,
        headers,
    })
}

fn read_chunked<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = read_line(r)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| bad(format!("chunked: bad size line {line:?}")))?;
        if size == 0 {
            // Trailer fields, up to the blank line.
            while !read_line(r)?.is_empty() {}
            return Ok(out);
        }
        let start = out.len();
        out.resize(start + size, 0);
        r.read_exact(&mut out[start..])?;
        if !read_line(r)?.is_empty() {
            return Err(bad("chunked: no CRLF after a chunk"));
        }
    }
}

/// One CRLF-terminated line, without the CRLF.
fn read_line<R: Read>(r: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        line.push(b[0]);
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// The rest of the stream; a reset after some bytes ends a close-delimited body too.
fn read_to_close<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if !out.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(out);
            }
            Err(e) => return Err(e),
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A connection whose every read and write must end by `deadline`.
struct Deadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "HTTP exchange timed out"))
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.stream).flush()
    }
}

/// Everything `s` sends until EOF or an error (what was read before the error counts).
pub fn read_to_end_lenient(s: &mut (impl Read + ?Sized)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    out
}

/// Reads one request head from `s`, byte by byte (nothing past it); `None` at EOF.
pub fn read_request_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The value of header `name` in a request head ("" when absent).
pub fn header_value(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Reads one request head and its Content-Length body from `s`; `None` at EOF.
pub fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let head = read_request_head(s)?;
    let len = header_value(&head, "content-length").parse().unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((head, body))
}
