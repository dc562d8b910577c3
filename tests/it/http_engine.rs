//! One HTTP/1.1 engine whatever the client's transport: the rules that drifted apart while
//! plain TCP and TLS took different paths, pinned on every transport (plain HTTP/1.1,
//! HTTP/1.1 over TLS, h2c, h2 over TLS): local descriptor exhaustion ejects no task,
//! obs-text in X-Forwarded-For is kept, one retry rule, 413 closes at once, and TLS clients
//! offering only ALPN http/1.0 (or a protocol nobody knows) are served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::support::backend::raw_backend;
use crate::support::http::read_request;
use crate::support::net::tcp_listener;
use crate::support::nginx::Nginx;
use crate::support::pki::Pki;
use crate::support::tls::TlsConn;
use crate::support::{Daemon, eventually, free_addr};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const NAME: &str = "a.example.com";

// ---------------------------------------------------------------------------------------------
// helpers

/// A static daemon with a plain http listener and a TLS one (certificate for NAME), both
/// with default service `web`, plus `extra` (routes of both listeners, services, tasks).
fn daemon(plain: SocketAddr, tls: SocketAddr, pki: &Pki, routes: &str, extra: &str) -> Daemon {
    let d = pki.dir().display();
    let mut daemon = Daemon::start(&format!(
        r#"
[discovery]
backend = "static"

[[listener]]
name = "plain"
listen = "{plain}"
protocol = "http"
service = "web"
{routes}

[[listener]]
name = "tls"
listen = "{tls}"
protocol = "http"
service = "web"
tls = {{ cert = "{d}/a.pem", key = "{d}/a-key.pem" }}
{routes}

{extra}
"#
    ));
    daemon.wait_ready();
    daemon
}

fn pki() -> Pki {
    let pki = Pki::new();
    pki.issue("a", NAME, &[&format!("DNS:{NAME}")]);
    pki
}

fn task(service: &str, id: &str, addr: SocketAddr) -> String {
    format!("[[task]]\nservice = \"{service}\"\nid = \"{id}\"\naddr = \"{addr}\"\n\n")
}

use crate::support::http::read_to_end_lenient;

/// One response with a Content-Length body from a keep-alive connection, raw.
fn read_one_response(s: &mut dyn Read) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut b = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("response head");
        raw.push(b[0]);
    }
    let (_, body) = status_body(&raw);
    assert!(body.is_empty());
    let head = text(&raw).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("response body");
    raw.extend_from_slice(&body);
    raw
}

/// Status and raw body of the first response in `raw` (Content-Length or until the end).
fn status_body(raw: &[u8]) -> (u16, Vec<u8>) {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, raw.to_vec());
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = &raw[end + 4..];
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(body.len())
        .min(body.len());
    (status, body[..len].to_vec())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A rustls client trusting `ca`, offering `alpn`.
fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    Arc::new(crate::support::tls::client_config(ca, alpn))
}

/// A TLS connection to `addr` (handshake done) and the protocol ALPN selected.
fn tls_connect(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> (TlsConn, Option<Vec<u8>>) {
    let s = crate::support::tls::tls_connect(addr, NAME, cfg);
    s.sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let alpn = s.conn.alpn_protocol().map(<[u8]>::to_vec);
    (s, alpn)
}

/// Writes `raw` on a fresh plain connection and reads until the proxy closes.
fn plain_exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(raw).unwrap();
    read_to_end_lenient(&mut s)
}

/// The same over TLS (ALPN http/1.1).
fn tls_exchange(addr: SocketAddr, ca: &Path, raw: &[u8]) -> Vec<u8> {
    let (mut s, _) = tls_connect(addr, &client_config(ca, &[b"http/1.1"]));
    s.write_all(raw).unwrap();
    s.flush().unwrap();
    read_to_end_lenient(&mut s)
}

/// One HTTP/2 request (h2c prior knowledge, or TLS with ALPN h2 trusting `ca`): status and
/// body. Each call is its own connection.
fn h2_request(
    addr: SocketAddr,
    ca: Option<&Path>,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls = ca.map(|ca| client_config(ca, &[b"h2"]));
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("https://{NAME}{path}"));
    for (n, v) in headers {
        req = req.header(*n, hyper::header::HeaderValue::from_bytes(v).unwrap());
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_vec())))
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let run = async {
            let resp = match tls {
                Some(cfg) => {
                    let tls = tokio_rustls::TlsConnector::from(cfg)
                        .connect(ServerName::try_from(NAME.to_string()).unwrap(), tcp)
                        .await
                        .unwrap();
                    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                    let (mut send, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(tls),
                    )
                    .await
                    .unwrap();
                    tokio::spawn(conn);
                    send.send_request(req).await.unwrap()
                }
                None => {
                    let (mut send, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(tcp),
                    )
                    .await
                    .unwrap();
                    tokio::spawn(conn);
                    send.send_request(req).await.unwrap()
                }
            };
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body.to_vec())
        };
        tokio::time::timeout(IO_TIMEOUT, run)
            .await
            .expect("h2 request in time")
    })
}

/// The four client transports.
#[derive(Debug, Clone, Copy)]
enum Transport {
    Plain,
    Tls,
    H2c,
    H2Tls,
}

const TRANSPORTS: [Transport; 4] = [
    Transport::Plain,
    Transport::Tls,
    Transport::H2c,
    Transport::H2Tls,
];

/// One request on `t` (a connection of its own, closed after): status and body.
#[allow(clippy::too_many_arguments)]
fn request(
    t: Transport,
    plain: SocketAddr,
    tls: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let raw = || {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {NAME}\r\n").into_bytes();
        for (n, v) in headers {
            raw.extend_from_slice(n.as_bytes());
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(
            format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        raw.extend_from_slice(body);
        raw
    };
    match t {
        Transport::Plain => status_body(&plain_exchange(plain, &raw())),
        Transport::Tls => status_body(&tls_exchange(tls, ca, &raw())),
        Transport::H2c => h2_request(plain, None, method, path, headers, body),
        Transport::H2Tls => h2_request(tls, Some(ca), method, path, headers, body),
    }
}

// ---------------------------------------------------------------------------------------------
// descriptor exhaustion

/// The lowest descriptor number `pid` does not use: with RLIMIT_NOFILE at it, the next
/// descriptor fails with EMFILE (holes below the highest one would be reused otherwise).
fn lowest_free_fd(pid: u32) -> usize {
    let used: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

fn prlimit_nofile(pid: u32, limit: usize) {
    // The soft limit only: raising a hard limit back needs CAP_SYS_RESOURCE.
    crate::support::process::limit_nofile(pid, &format!("{limit}:"));
}

/// Out of descriptors, a connect to a task fails with EMFILE: the request gets a 502 and
/// the task stays in rotation (the tcp listeners' rule), plain and over TLS.
#[test]
fn out_of_descriptors_on_an_http_listener_ejects_no_task() {
    let pki = pki();
    let web = Nginx::start("web");
    let (plain, tls) = (free_addr(), free_addr());
    let d = daemon(
        plain,
        tls,
        &pki,
        "",
        &format!(
            "[service.web]\nretries = 2\n[service.web.health]\ninterval = \"1h\"\n\n{}",
            task("web", "web-0", web.addr())
        ),
    );
    let pid = d.pid();
    // Client connections accepted (and the TLS one through its handshake) before the limit;
    // no request has gone through yet, so no task connection is pooled.
    let mut p = TcpStream::connect(plain).unwrap();
    p.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut t, _) = tls_connect(tls, &client_config(&pki.ca(), &[b"http/1.1"]));
    eventually(Duration::from_secs(5), "both connections accepted", || {
        ["plain", "tls"].iter().all(|l| {
            let sample =
                format!("routemesh_active_connections{{listener=\"{l}\",service=\"web\"}}");
            d.metric(&sample) == Some(1.0)
        })
    });
    // Not one descriptor more: the limit at the lowest free descriptor, until no
    // descriptor below it frees up (the admin connection of the check above closes).
    eventually(
        Duration::from_secs(5),
        "no free descriptor below the limit",
        || {
            let limit = lowest_free_fd(pid);
            prlimit_nofile(pid, limit);
            thread::sleep(Duration::from_millis(100));
            lowest_free_fd(pid) == limit
        },
    );

    // Keep-alive requests: a connection the proxy closed would free a descriptor.
    let req = format!("GET /x HTTP/1.1\r\nHost: {NAME}\r\n\r\n");
    p.write_all(req.as_bytes()).unwrap();
    t.write_all(req.as_bytes()).unwrap();
    t.flush().unwrap();
    for (name, s) in [("plain", &mut p as &mut dyn Read), ("tls", &mut t)] {
        let (status, body) = status_body(&read_one_response(s));
        assert_eq!(status, 502, "{name}: {}", text(&body));
        assert!(
            text(&body).contains("open files"),
            "{name}: {}",
            text(&body)
        );
    }

    prlimit_nofile(pid, 20_000);
    let routes = d.routes();
    let state = &routes["services"][0]["tasks"][0]["state"];
    assert_eq!(
        state, "healthy",
        "local exhaustion is not the task's fault: {routes}"
    );
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        !metrics.contains("routemesh_upstream_connect_errors_total{"),
        "no connect error is counted against the task: {metrics}"
    );
    // Served at once: nothing to wait out.
    for t in [Transport::Plain, Transport::Tls] {
        let (status, body) = request(t, plain, tls, &pki.ca(), "GET", "/after", &[], b"");
        assert_eq!(status, 200, "{t:?}: {}", text(&body));
    }
}

// ---------------------------------------------------------------------------------------------
// X-Forwarded-For with obs-text

#[test]
fn obs_text_in_x_forwarded_for_is_kept_on_every_transport() {
    let pki = pki();
    let web = Nginx::start("web");
    let (plain, tls) = (free_addr(), free_addr());
    let _d = daemon(plain, tls, &pki, "", &task("web", "web-0", web.addr()));
    let xff: &[u8] = b"203.0.113.9 caf\xe9";
    for t in TRANSPORTS {
        let (status, body) = request(
            t,
            plain,
            tls,
            &pki.ca(),
            "GET",
            "/obs",
            &[("X-Forwarded-For", xff)],
            b"",
        );
        assert_eq!(status, 200, "{t:?}: {}", text(&body));
        let want = b"xff=203.0.113.9 caf\xe9, 127.0.0.1\n";
        assert!(
            body.windows(want.len()).any(|w| w == want),
            "{t:?}: the client's value is kept, ours appended: {}",
            text(&body)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// the address the client reached

#[test]
fn a_request_without_host_gets_the_address_the_client_reached_on_every_bind() {
    let pki = pki();
    let web = Nginx::start("web");
    let (plain, tls) = (free_addr(), free_addr());
    // A wildcard bind asks each connection for its local address; a bind to one IP knows it.
    let wildcard = SocketAddr::from(([0, 0, 0, 0], free_addr().port()));
    // And a service whose task takes a PROXY header (which carries that address too).
    let pp = Nginx::start_with(
        "pp",
        crate::support::nginx::NginxProtocol::ProxyProtocol,
        "",
    );
    let extra = format!(
        "[[listener]]\nname = \"any\"\nlisten = \"{wildcard}\"\nprotocol = \"http\"\nservice = \"web\"\n\
         [[listener.route]]\npath_prefix = \"/pp\"\nservice = \"pp\"\n\n\
         [service.pp]\nsend_proxy = \"v1\"\n\n{}{}",
        task("web", "web-0", web.addr()),
        task("pp", "pp-0", pp.addr())
    );
    let _d = daemon(plain, tls, &pki, "", &extra);
    let reached = SocketAddr::from(([127, 0, 0, 1], wildcard.port()));
    for (connect, want) in [(plain, plain), (reached, reached)] {
        let (status, body) = status_body(&plain_exchange(connect, b"GET / HTTP/1.0\r\n\r\n"));
        assert_eq!(status, 200, "{connect}: {}", text(&body));
        let host = format!("host={want}\n");
        assert!(
            text(&body).contains(&host),
            "{connect}: the task sees {host:?}: {}",
            text(&body)
        );
    }
    let (status, body) = status_body(&plain_exchange(
        reached,
        b"GET /pp HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(status, 200, "{}", text(&body));
    assert!(text(&body).starts_with("127.0.0.1:"), "{}", text(&body));
}

// ---------------------------------------------------------------------------------------------
// response bodies of every size

/// Byte `i` of the test bodies (not a repeating pattern a short run could fake).
fn body_byte(i: usize) -> u8 {
    (i * 31 % 251) as u8
}

/// A keep-alive task answering `GET /N/cl` and `GET /N/chunked` with an N-byte body, with a
/// Content-Length or in chunks of 1,000 bytes.
fn sized_bodies() -> SocketAddr {
    raw_backend(|mut s| {
        while let Some((head, _)) = read_request(&mut s) {
            let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut parts = target.trim_start_matches('/').split('/');
            let n: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let body: Vec<u8> = (0..n).map(body_byte).collect();
            let mut out = Vec::new();
            if parts.next() == Some("chunked") {
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                for c in body.chunks(1000) {
                    out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            } else {
                out.extend_from_slice(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
                );
                out.extend_from_slice(&body);
            }
            if s.write_all(&out).is_err() {
                return;
            }
        }
    })
}

/// The data of a chunked HTTP/1.1 body (no extensions, no trailers).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16)
            .expect("hex chunk size");
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[test]
fn response_bodies_of_every_size_arrive_whole_on_every_transport() {
    let pki = pki();
    let web = sized_bodies();
    let (plain, tls) = (free_addr(), free_addr());
    let _d = daemon(plain, tls, &pki, "", &task("web", "web-0", web));
    // Around the HTTP/2 path's copy limit (8 KiB) and its 32 KiB read buffer, and past both.
    for n in [0, 1, 8191, 8192, 8193, 32_768, 65_537, 300_000] {
        let want: Vec<u8> = (0..n).map(body_byte).collect();
        for framing in ["cl", "chunked"] {
            for t in TRANSPORTS {
                let path = format!("/{n}/{framing}");
                let (status, mut body) = request(t, plain, tls, &pki.ca(), "GET", &path, &[], b"");
                assert_eq!(status, 200, "{t:?} {path}");
                if framing == "chunked" && matches!(t, Transport::Plain | Transport::Tls) {
                    body = dechunk(&body);
                }
                assert!(
                    body == want,
                    "{t:?} {path}: {} bytes, not the task's {n}",
                    body.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// one retry rule

/// A task that answers the first request of each connection and closes the connection
/// when a second one arrives on it (a keep-alive timeout racing a request); records every
/// request line.
fn closes_kept_connections() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let addr = raw_backend(move |mut s| {
        let mut n = 0;
        while let Some((head, _)) = read_request(&mut s) {
            n += 1;
            seen.lock()
                .unwrap()
                .push(head.lines().next().unwrap_or("").to_string());
            if n == 2 {
                return;
            }
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nanswer",
            );
        }
    });
    (addr, lines)
}

/// The same rule whatever the client's transport: a kept task connection closed before the
/// response costs an idempotent request whose body the proxy holds (here a PUT with a
/// body) nothing — it goes again on a fresh connection — while a POST is never sent twice.
#[test]
fn one_retry_rule_on_every_transport() {
    let pki = pki();
    let backends: Vec<_> = TRANSPORTS
        .iter()
        .map(|_| closes_kept_connections())
        .collect();
    let (plain, tls) = (free_addr(), free_addr());
    let mut routes = String::new();
    let mut extra = String::new();
    for (i, (addr, _)) in backends.iter().enumerate() {
        routes +=
            &format!("  [[listener.route]]\n  path_prefix = \"/t{i}/\"\n  service = \"t{i}\"\n");
        extra += &format!("[service.t{i}.health]\ninterval = \"1h\"\n\n");
        extra += &task(&format!("t{i}"), &format!("t{i}-0"), *addr);
    }
    let d = daemon(plain, tls, &pki, &routes, &extra);
    for (i, t) in TRANSPORTS.iter().enumerate() {
        let p = |s: &str| format!("/t{i}/{s}");
        let go = |method: &str, path: &str, body: &[u8]| {
            request(*t, plain, tls, &pki.ca(), method, path, &[], body)
        };
        // 1st: opens a task connection, which is then kept.
        let (status, body) = go("GET", &p("first"), b"");
        assert_eq!((status, text(&body).as_str()), (200, "answer"), "{t:?}");
        // 2nd on the kept connection: the task closes it; the PUT goes again, fresh.
        let (status, body) = go("PUT", &p("put"), b"held body");
        assert_eq!(
            (status, text(&body).as_str()),
            (200, "answer"),
            "{t:?}: PUT replayed"
        );
        // 3rd on the connection kept from the replay: closed again; a POST is lost.
        let (status, body) = go("POST", &p("post"), b"once");
        assert_eq!(status, 502, "{t:?}: {}", text(&body));
        let seen = backends[i].1.lock().unwrap().clone();
        let count = |prefix: &str| seen.iter().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count(&format!("PUT {}", p("put"))), 2, "{t:?}: {seen:?}");
        assert_eq!(
            count(&format!("POST {}", p("post"))),
            1,
            "{t:?}: never twice: {seen:?}"
        );
    }
    let routes = d.routes();
    for svc in routes["services"].as_array().unwrap() {
        assert_ne!(
            svc["tasks"][0]["state"], "ejected",
            "closing kept connections says nothing about a task's health: {routes}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 413

/// Sends `head` (and `partial` body bytes, never the rest) and keeps its side open: the
/// proxy must answer 413 and close at once, not wait for a body it will not forward.
fn refused_at_once(mut s: impl Read + Write, head: &[u8], partial: &[u8]) {
    s.write_all(head).unwrap();
    s.write_all(partial).unwrap();
    s.flush().unwrap();
    let t = Instant::now();
    let raw = read_to_end_lenient(&mut s);
    let (status, body) = status_body(&raw);
    assert_eq!(status, 413, "{}", text(&raw));
    assert!(
        text(&body).contains("larger than 1000 bytes"),
        "{}",
        text(&body)
    );
    assert!(
        text(&raw)
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        text(&raw)
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed {:?} after the answer",
        t.elapsed()
    );
}

#[test]
fn body_over_the_limit_is_413_and_the_connection_closes_at_once() {
    let pki = pki();
    let web = Nginx::start("web");
    let (plain, tls) = (free_addr(), free_addr());
    let _d = daemon(
        plain,
        tls,
        &pki,
        "",
        &format!(
            "[http]\nmax_body_bytes = 1000\n\n{}",
            task("web", "web-0", web.addr())
        ),
    );
    let declared = format!("POST /big HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 5000\r\n\r\n");
    let streamed =
        format!("POST /big HTTP/1.1\r\nHost: {NAME}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = format!("7d0\r\n{}\r\n", "x".repeat(2000));
    for (head, partial) in [(&declared, &b"abc"[..]), (&streamed, chunk.as_bytes())] {
        let s = TcpStream::connect(plain).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        refused_at_once(s, head.as_bytes(), partial);
        let (s, _) = tls_connect(tls, &client_config(&pki.ca(), &[b"http/1.1"]));
        refused_at_once(s, head.as_bytes(), partial);
    }
    // A body within the limit, after: served.
    let (status, body) = request(
        Transport::Plain,
        plain,
        tls,
        &pki.ca(),
        "POST",
        "/ok",
        &[],
        b"hello",
    );
    assert_eq!(status, 200, "{}", text(&body));
}

// ---------------------------------------------------------------------------------------------
// ALPN

fn curl_tls(addr: SocketAddr, ca: &Path, args: &[&str]) -> Result<String, String> {
    crate::support::tls::curl_https(addr, NAME, "/alpn", ca, args)
}

/// Old HTTP/1.0 clients offer ALPN `http/1.0`, others a protocol nobody here speaks: the
/// handshake selects no protocol and the client is served HTTP/1.1, as by nginx and HAProxy.
#[test]
fn tls_clients_offering_only_http10_or_an_unknown_protocol_are_served() {
    let pki = pki();
    let web = Nginx::start("web");
    let (plain, tls) = (free_addr(), free_addr());
    let _d = daemon(plain, tls, &pki, "", &task("web", "web-0", web.addr()));
    for alpn in [
        &[&b"http/1.0"[..]][..],
        &[b"spdy/1"],
        &[b"foo", b"http/1.0"],
    ] {
        let (mut s, chosen) = tls_connect(tls, &client_config(&pki.ca(), alpn));
        assert_eq!(chosen, None, "{alpn:?}: no protocol selected");
        s.write_all(format!("GET /alpn HTTP/1.0\r\nHost: {NAME}\r\n\r\n").as_bytes())
            .unwrap();
        s.flush().unwrap();
        let (status, body) = status_body(&read_to_end_lenient(&mut s));
        assert_eq!(status, 200, "{alpn:?}: {}", text(&body));
        assert!(text(&body).contains("xfp=https"), "{}", text(&body));
    }
    // The client of the report: curl --http1.0 (ALPN http/1.0).
    let body = curl_tls(tls, &pki.ca(), &["--http1.0"]).unwrap();
    assert!(
        body.contains("name=web") && body.contains("proto=HTTP/1.1"),
        "{body}"
    );
    // Who offers ours still gets them.
    let (_, chosen) = tls_connect(tls, &client_config(&pki.ca(), &[b"spdy/1", b"http/1.1"]));
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    let (_, chosen) = tls_connect(tls, &client_config(&pki.ca(), &[b"h2", b"http/1.1"]));
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue and upgrades, on both HTTP/1.x transports

/// Reads until `needle` has arrived (or the connection ends); what was read.
fn read_until(s: &mut dyn Read, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.windows(needle.len()).any(|w| w == needle) {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    got
}

/// The proxy answers `Expect: 100-continue` itself before it reads the body: the client
/// sends its body only after the 100, then gets the task's answer.
#[test]
fn expect_100_continue_is_answered_by_the_proxy_on_both_transports() {
    let pki = pki();
    let web = Nginx::start("web");
    let (plain, tls) = (free_addr(), free_addr());
    let _d = daemon(plain, tls, &pki, "", &task("web", "web-0", web.addr()));
    let head = format!(
        "PUT /upload HTTP/1.1\r\nHost: {NAME}\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    );
    let run = |s: &mut dyn ReadWrite| {
        s.write_all(head.as_bytes()).unwrap();
        s.flush().unwrap();
        let interim = read_until(s, b"\r\n\r\n");
        assert!(
            interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
            "{}",
            text(&interim)
        );
        s.write_all(b"hello").unwrap();
        s.flush().unwrap();
        let (status, body) = status_body(&read_to_end_lenient(s));
        assert_eq!(status, 200, "{}", text(&body));
        assert!(text(&body).contains("method=PUT"), "{}", text(&body));
    };
    let mut p = TcpStream::connect(plain).unwrap();
    p.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    run(&mut p);
    let (mut t, _) = tls_connect(tls, &client_config(&pki.ca(), &[b"http/1.1"]));
    run(&mut t);
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A task that answers an upgrade request with 101 and then echoes every byte.
fn upgrade_echo() -> SocketAddr {
    raw_backend(|mut s| {
        if read_request(&mut s).is_none() {
            return;
        }
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
        );
        if let Ok(mut from) = s.try_clone() {
            let _ = std::io::copy(&mut from, &mut s);
        }
    })
}

#[test]
fn upgrades_switch_then_bytes_go_both_ways_on_both_transports() {
    let pki = pki();
    let (plain, tls) = (free_addr(), free_addr());
    let _d = daemon(plain, tls, &pki, "", &task("web", "web-0", upgrade_echo()));
    let head = format!(
        "GET /chat HTTP/1.1\r\nHost: {NAME}\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
    );
    let run = |s: &mut dyn ReadWrite, name: &str| {
        s.write_all(head.as_bytes()).unwrap();
        s.flush().unwrap();
        let resp = read_until(s, b"\r\n\r\n");
        let lower = text(&resp).to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 101"), "{name}: {lower}");
        assert!(lower.contains("upgrade: echo"), "{name}: {lower}");
        for msg in [&b"ping"[..], b"through the proxy", &[0u8, 255, 13, 10]] {
            s.write_all(msg).unwrap();
            s.flush().unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, msg, "{name}");
        }
    };
    let mut p = TcpStream::connect(plain).unwrap();
    p.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    run(&mut p, "plain");
    let (mut t, _) = tls_connect(tls, &client_config(&pki.ca(), &[b"http/1.1"]));
    run(&mut t, "tls");
}

/// An upgrade task that answers 101, reads until the client's EOF, tells `saw_eof`, and then
/// never closes its side.
fn upgrade_that_never_closes(saw_eof: std::sync::mpsc::Sender<()>) -> SocketAddr {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let mut kept = Vec::new();
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            if read_request(&mut s).is_none() {
                continue;
            }
            let _ = s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
            );
            let mut buf = [0u8; 4096];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            let _ = saw_eof.send(());
            kept.push(s); // held open until the test process ends
        }
    });
    addr
}

#[test]
fn half_closed_upgrade_is_closed_after_half_close_timeout_on_both_transports() {
    let pki = pki();
    let (plain, tls) = (free_addr(), free_addr());
    let (eof_tx, eof_rx) = std::sync::mpsc::channel();
    let extra = format!(
        "{}[service.web]\nhalf_close_timeout = \"1s\"\n",
        task("web", "web-0", upgrade_that_never_closes(eof_tx))
    );
    let d = daemon(plain, tls, &pki, "", &extra);
    let head = format!(
        "GET /chat HTTP/1.1\r\nHost: {NAME}\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
    );
    let timeouts = |listener: &str| {
        d.metric(&format!(
            "routemesh_half_close_timeouts_total{{listener=\"{listener}\",service=\"web\"}}"
        ))
        .unwrap_or(0.0)
    };

    // Plain TCP (splice path): the client's FIN reaches the task, which never closes.
    let mut p = TcpStream::connect(plain).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    p.write_all(head.as_bytes()).unwrap();
    let resp = read_until(&mut p, b"\r\n\r\n");
    assert!(text(&resp).starts_with("HTTP/1.1 101"), "{}", text(&resp));
    p.shutdown(std::net::Shutdown::Write).unwrap();
    eof_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the task sees the client's FIN");
    let mut buf = [0u8; 16];
    assert!(
        matches!(p.read(&mut buf), Ok(0) | Err(_)),
        "the proxy closed the client's side"
    );
    eventually(Duration::from_secs(10), "plain counted", || {
        timeouts("plain") == 1.0
    });

    // TLS terminated (the buffered copy): close_notify, then the FIN.
    let (mut t, _) = tls_connect(tls, &client_config(&pki.ca(), &[b"http/1.1"]));
    t.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    t.write_all(head.as_bytes()).unwrap();
    t.flush().unwrap();
    let resp = read_until(&mut t, b"\r\n\r\n");
    assert!(text(&resp).starts_with("HTTP/1.1 101"), "{}", text(&resp));
    t.conn.send_close_notify();
    t.conn.complete_io(&mut t.sock).unwrap();
    t.sock.shutdown(std::net::Shutdown::Write).unwrap();
    eof_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the task sees the TLS client's end");
    // Its close_notify may come first; then the end.
    let closed = loop {
        match t.sock.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => {
                break !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    };
    assert!(closed, "the proxy closed the TLS client's side");
    eventually(Duration::from_secs(10), "tls counted", || {
        timeouts("tls") == 1.0
    });
}
