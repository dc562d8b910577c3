//! The HTTP listener end to end: the real daemon in front of real nginx backends (and small
//! in-test servers where a test needs a misbehaving one). Routing, forwarded headers, proxy
//! answers, retries, pooling, balancing, streaming, upgrades, h2c and every hardening case
//! of the HTTP issue, each with raw bytes on a TCP socket.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::backend::raw_backend;
use crate::support::http::{
    header_value, parse_response, read_head, read_ok, read_request, read_request_head,
};
use crate::support::net::tcp_listener;
use crate::support::nginx::{Nginx, NginxProtocol};
use crate::support::{
    Config, Daemon, Etcd, Etcdctl, Listener, Task, dead_addr, eventually, free_addr,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// Tasks `{service}-0`, `{service}-1`, … of `service` at `addrs`.
fn tasks(service: &str, addrs: &[SocketAddr]) -> Vec<Task> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Task::new(service, *a).id(&format!("{service}-{i}")))
        .collect()
}

/// Static discovery, an http listener on `listen` whose default service is `web`, and the
/// tasks of `web` at `addrs`.
fn web_proxy(listen: SocketAddr, addrs: &[SocketAddr]) -> Config {
    with_listener(Listener::http(listen, "web")).tasks(tasks("web", addrs))
}

/// Static discovery and `listener`.
fn with_listener(listener: Listener) -> Config {
    Config::static_tasks().listener(listener)
}

/// Starts the daemon of `config`; ready on return.
fn proxy(config: Config) -> Daemon {
    let mut d = config.start();
    d.wait_ready();
    d
}

/// Writes `bytes` (from another thread, so a server answering early cannot deadlock us),
/// then reads until EOF, reset or timeout; returns what was read.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = bytes.to_vec();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let out = read_to_end_lenient(&mut s);
    let _ = writer.join();
    out
}

use crate::support::http::read_to_end_lenient;

/// Status and body of the first response in `raw`.
fn status_body(raw: &[u8]) -> (u16, String) {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n");
    if head_end.is_none() {
        return (0, String::from_utf8_lossy(raw).into_owned());
    }
    parse_response(raw)
        .map(|r| (r.status, r.text()))
        .unwrap_or_else(|e| {
            panic!(
                "unparsable response ({e}): {:?}",
                String::from_utf8_lossy(raw)
            )
        })
}

/// GET with an explicit Host and extra header lines; `Connection: close`.
fn get(addr: SocketAddr, host: &str, path: &str, extra: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    status_body(&exchange(addr, req.as_bytes()))
}

/// The `key=value` line of an echo body from the nginx harness.
fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in body {body:?}"))
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// A raw backend that records every byte it receives and answers each head it sees with
/// `200 ok` (naively: it is only a witness of what reached it).
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start() -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let addr = raw_backend(move |mut s| {
            let mut buf = [0u8; 65536];
            let mut pending = Vec::new();
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                seen2.lock().unwrap().extend_from_slice(&buf[..n]);
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    pending.drain(..i + 4);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            }
        });
        Recorder { addr, seen }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
}

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Answers the first request of a connection, then closes it when the second arrives.
    CloseOnSecondRequest,
    /// Answers each request (keep-alive headers) and closes right after.
    CloseAfterResponse,
    /// Accepts and never answers.
    Silent,
    /// Reads a request head, then resets the connection (a task dying mid-request).
    ResetOnRequest,
}

/// A raw backend that misbehaves on purpose; records each request line it received.
fn misbehaving(kind: Misbehaviour) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let lines2 = lines.clone();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            if let Misbehaviour::Silent = kind {
                held.push(s);
                continue;
            }
            let lines = lines2.clone();
            thread::spawn(move || {
                let mut n = 0;
                while let Some((head, _)) = read_request(&mut s) {
                    n += 1;
                    lines
                        .lock()
                        .unwrap()
                        .push(head.lines().next().unwrap_or("").to_string());
                    if matches!(kind, Misbehaviour::CloseOnSecondRequest) && n == 2 {
                        return;
                    }
                    if matches!(kind, Misbehaviour::ResetOnRequest) {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    let body = format!("answer {n}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                    if matches!(kind, Misbehaviour::CloseAfterResponse) {
                        let _ = s.shutdown(Shutdown::Both);
                        return;
                    }
                }
            });
        }
    });
    (addr, lines)
}

// ---------------------------------------------------------------- routing and headers

#[test]
fn routes_by_host_and_path_and_tells_the_backend_who_the_client_is() {
    let web = Nginx::start("web");
    let api = Nginx::start("api");
    let apiv1 = Nginx::start("api-v1");
    let wild = Nginx::start("wild");
    let listen = free_addr();
    let listener = Listener::http(listen, "web")
        .route(&[
            ("host", "api.example.com"),
            ("path_prefix", "/v1"),
            ("service", "apiv1"),
        ])
        .route(&[("host", "api.example.com"), ("service", "api")])
        .route(&[("host", "*.example.com"), ("service", "wild")]);
    let _d = proxy(
        with_listener(listener)
            .tasks(tasks("web", &[web.addr()]))
            .tasks(tasks("api", &[api.addr()]))
            .tasks(tasks("apiv1", &[apiv1.addr()]))
            .tasks(tasks("wild", &[wild.addr()])),
    );
    for (host, path, want) in [
        ("api.example.com", "/v1/users", "api-v1"),
        ("API.Example.COM:8080", "/v1", "api-v1"),
        ("api.example.com", "/v2", "api"),
        ("x.example.com", "/v1", "wild"),
        ("example.com", "/", "web"),
        ("unknown.org", "/v1", "web"),
    ] {
        let (status, body) = get(listen, host, path, "");
        assert_eq!(status, 200, "{host}{path}: {body}");
        assert_eq!(field(&body, "name"), want, "{host}{path}");
        assert_eq!(
            field(&body, "host"),
            host,
            "Host is kept as the client sent it"
        );
        assert_eq!(field(&body, "uri"), path);
    }

    // Absolute-form: the target's authority routes and becomes Host.
    let (status, body) = status_body(&exchange(
        listen,
        b"GET http://api.example.com/v1/abs HTTP/1.1\r\nHost: other.org\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&body, "name"), "api-v1");
    assert_eq!(field(&body, "host"), "api.example.com");
    assert_eq!(field(&body, "uri"), "/v1/abs");

    // Forwarding headers: appended, not replaced; the backend's access log shows the client.
    let (status, body) = get(
        listen,
        "a.example.com",
        "/",
        "X-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&body, "xff"), "203.0.113.9, 127.0.0.1");
    assert_eq!(field(&body, "xfp"), "http");
    assert_eq!(field(&body, "xfh"), "a.example.com");
    assert_eq!(
        field(&body, "forwarded"),
        "for=203.0.113.9, for=127.0.0.1;host=a.example.com;proto=http"
    );
    assert_eq!(field(&body, "via"), "1.1 routemesh");
    assert!(
        wild.access_log().contains("xff=\"203.0.113.9, 127.0.0.1\""),
        "{}",
        wild.access_log()
    );
}

#[test]
fn hop_by_hop_headers_are_stripped_before_ours_are_added() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[web.addr()]));
    // The client names X-Forwarded-For (and a private header) in Connection.
    let (status, body) = get(
        listen,
        "h.example",
        "/",
        "Connection: X-Forwarded-For, X-Secret\r\nX-Forwarded-For: 6.6.6.6\r\nX-Secret: s3cret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        field(&body, "xff"),
        "127.0.0.1",
        "ours is set, theirs stripped"
    );
    assert_eq!(
        field(&body, "secret"),
        "",
        "X-Secret was named in Connection"
    );
    assert_eq!(field(&body, "via"), "1.1 routemesh");
}

#[test]
fn proxy_answers_503_502_504_with_reason_and_service() {
    let (silent, _) = misbehaving(Misbehaviour::Silent);
    let listen = free_addr();
    let listener = Listener::http(listen, "web")
        .route(&[("path_prefix", "/dead"), ("service", "dead")])
        .route(&[("path_prefix", "/slow"), ("service", "slow")])
        .route(&[("path_prefix", "/empty"), ("service", "empty")]);
    let d = proxy(
        with_listener(listener)
            .set("service.slow.request_timeout", "1s")
            .set("service.empty.retries", 1)
            .tasks(tasks("dead", &[dead_addr(), dead_addr()]))
            .tasks(tasks("slow", &[silent])),
    );
    let asked = Instant::now();
    let (status, body) = get(listen, "x", "/empty", "");
    assert_eq!(status, 503, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the proxy answers and closes, as `Connection: close` asked"
    );
    assert!(
        body.contains("no live task") && body.contains("service empty"),
        "{body}"
    );

    let (status, body) = get(listen, "x", "/dead", "");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("upstream failed") && body.contains("service dead"),
        "{body}"
    );

    let (status, body) = get(listen, "x", "/slow", "");
    assert_eq!(status, 504, "{body}");
    assert!(
        body.contains("no response from upstream") && body.contains("service slow"),
        "{body}"
    );

    let (_, metrics) = d.admin_get("/metrics");
    for code in ["503", "502", "504"] {
        assert!(
            metrics.contains(&format!("code=\"{code}\"")),
            "no {code} in routemesh_http_requests_total"
        );
    }
    assert!(d.metric_sum("routemesh_upstream_connect_errors_total") >= 2.0);
}

#[test]
fn body_over_the_limit_is_413() {
    let rec = Recorder::start();
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[rec.addr]).set("http.max_body_bytes", 1000));
    let big = "x".repeat(2000);
    let req = format!("POST /declared HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n{big}");
    let (status, body) = status_body(&exchange(listen, req.as_bytes()));
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("larger than 1000 bytes") && body.contains("service web"),
        "{body}"
    );
    assert!(
        !rec.seen().contains("/declared"),
        "refused before reaching the backend"
    );

    // Chunked: the limit trips while streaming.
    let req = format!(
        "POST /streamed HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{big}\r\n0\r\n\r\n"
    );
    let (status, body) = status_body(&exchange(listen, req.as_bytes()));
    assert_eq!(status, 413, "{body}");
    let (status, _) = status_body(&exchange(
        listen,
        b"POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    ));
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------- retries and pooling

#[test]
fn connect_refused_is_retried_on_another_task_whatever_the_method() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let d = proxy(
        web_proxy(listen, &[dead_addr(), web.addr(), dead_addr()]).set("service.web.retries", 2),
    );
    for i in 0..6 {
        let req = format!(
            "POST /p{i} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        );
        let (status, body) = status_body(&exchange(listen, req.as_bytes()));
        assert_eq!(status, 200, "POST {i}: {body}");
        assert_eq!(field(&body, "name"), "web");
    }
    assert_eq!(web.requests(), 6);
    assert!(d.metric_sum("routemesh_upstream_connect_errors_total") >= 1.0);
}

#[test]
fn idempotent_requests_are_retried_once_when_a_pooled_connection_was_closed() {
    let (addr, lines) = misbehaving(Misbehaviour::CloseOnSecondRequest);
    let listen = free_addr();
    let d = proxy(web_proxy(listen, &[addr]));
    // One client connection (so one connection thread and its kept task connection): the
    // 1st GET opens a task connection; the 2nd reuses it, the backend closes it on arrival,
    // the proxy sends the GET again on a fresh connection.
    let mut s = TcpStream::connect_timeout(&listen, IO_TIMEOUT).expect("connect to proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    for i in 0..2 {
        s.write_all(format!("GET /get{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        let body = read_ok(&mut s);
        assert!(body.starts_with("answer"), "GET {i}: {body}");
    }
    assert!(d.metric_sum("routemesh_retries_total") >= 1.0);
    // A POST on the reused connection is lost with it: 502, never sent twice.
    s.write_all(
        b"POST /once HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .unwrap();
    let (status, body) = status_body(&read_to_end_lenient(&mut s));
    assert_eq!(status, 502, "{body}");
    let seen = lines.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("POST /once")).count(),
        1,
        "the POST reached the backend exactly once: {seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("GET /get1")).count(),
        2,
        "{seen:?}"
    );
}

#[test]
fn backend_closing_keepalive_connections_costs_no_failed_request() {
    let (addr, lines) = misbehaving(Misbehaviour::CloseAfterResponse);
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[addr]));
    for i in 0..20 {
        let (status, body) = get(listen, "a", &format!("/k{i}"), "");
        assert_eq!(status, 200, "GET {i}: {body}");
    }
    assert!(lines.lock().unwrap().len() >= 20);
}

#[test]
fn distributes_over_ten_replicas_through_few_pooled_connections() {
    let replicas: Vec<Nginx> = (0..10).map(|i| Nginx::start(&format!("r{i}"))).collect();
    let addrs: Vec<SocketAddr> = replicas.iter().map(|n| n.addr()).collect();
    let listen = free_addr();
    let listener = Listener::http(listen, "web")
        .route(&[("path_prefix", "/lc"), ("service", "lc")])
        .route(&[("path_prefix", "/p2c"), ("service", "p2c")]);
    let _d = proxy(
        with_listener(listener)
            .set("service.web.balance", "round_robin")
            .set("service.lc.balance", "least_conn")
            .set("service.p2c.balance", "p2c")
            .tasks(tasks("web", &addrs))
            .tasks(tasks("lc", &addrs))
            .tasks(tasks("p2c", &addrs)),
    );
    // 100 sequential keep-alive requests on one client connection.
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut names = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..100 {
        let path = match i % 3 {
            0 => "/",
            1 => "/lc",
            _ => "/p2c",
        };
        write!(s, "GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let body = read_ok(&mut s);
        *names.entry(field(&body, "name").to_string()).or_default() += 1;
    }
    assert_eq!(names.len(), 10, "every replica served: {names:?}");
    let rr: Vec<usize> = replicas
        .iter()
        .map(|n| {
            n.access_log()
                .lines()
                .filter(|l| l.contains("\"GET / "))
                .count()
        })
        .collect();
    assert!(
        rr.iter().all(|&c| (2..=5).contains(&c)),
        "round robin spread {rr:?}"
    );
    // Pooling: a sequential load reuses connections instead of opening one per request.
    let total_conns: usize = replicas.iter().map(Nginx::connections_seen).sum();
    assert!(
        total_conns <= 30,
        "{total_conns} upstream connections for 100 requests"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[web.addr()]));
    let raw = exchange(
        listen,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\nGET /4 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET /5 HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&raw);
    let uris: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("uri="))
        .collect();
    assert_eq!(uris, vec!["/1", "/2", "/3"], "{text}");
    let statuses: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect();
    assert_eq!(statuses.len(), 4, "{text}");
    assert!(statuses[3].starts_with("HTTP/1.1 400"), "{text}");
    assert!(
        !web.access_log().contains("/5"),
        "nothing after the bad head is served"
    );
}

/// One connection whose requests start on the lean HTTP/1.1 path and move to hyper's when a
/// request needs it (a body too large to hold, HTTP/1.0): every request is still answered,
/// in order, with the forwarding headers.
#[test]
fn a_connection_moving_between_the_lean_and_hyper_paths_keeps_order() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[web.addr()]));
    let mut raw = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    raw.extend_from_slice(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n");
    raw.extend_from_slice(&vec![b'x'; 100_000]);
    raw.extend_from_slice(b"GET /3 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n");
    raw.extend_from_slice(b"GET /4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let out = exchange(listen, &raw);
    let text = String::from_utf8_lossy(&out);
    let uris: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("uri="))
        .collect();
    assert_eq!(uris, vec!["/1", "/2", "/3", "/4"], "{text}");
    let ok = text
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 200") || l.starts_with("HTTP/1.0 200"))
        .count();
    assert_eq!(ok, 4, "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("xff=127.0.0.1"))
            .count(),
        4,
        "every request carries X-Forwarded-For: {text}"
    );
}

/// A backend answering by path with framings nginx does not produce here: an informational
/// 103 before a chunked response with a trailer, and an HTTP/1.0 response delimited by close.
fn scripted_framings() -> SocketAddr {
    raw_backend(|mut s| {
        while let Some((head, _)) = read_request(&mut s) {
            if head.starts_with("GET /chunked ") {
                let _ = s.write_all(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                      HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
                      Connection: x-drop\r\nX-Drop: secret\r\n\r\n\
                      5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
                );
            } else {
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil close");
                return; // dropping the stream closes it: the end of the body
            }
        }
    })
}

#[test]
fn chunked_informational_and_close_delimited_responses_are_relayed() {
    let backend = scripted_framings();
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[backend]));
    let started = Instant::now();
    let raw = exchange(
        listen,
        b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\nGET /old HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(
        started.elapsed() < IO_TIMEOUT,
        "the proxy closes after a close-delimited body: {text}"
    );
    let (first, second) = text
        .split_once("0\r\nX-Trailer: t\r\n\r\n")
        .unwrap_or_else(|| panic!("the chunked body and trailer pass unchanged: {text}"));
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(first.contains("5\r\nhello\r\n6\r\n world\r\n"), "{text}");
    assert!(
        !first.contains("X-Drop") && !first.to_ascii_lowercase().contains("connection: x-drop"),
        "a field the task's Connection names is dropped: {text}"
    );
    assert!(
        first.to_ascii_lowercase().contains("via: 1.1 routemesh"),
        "{text}"
    );
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(second.ends_with("\r\n\r\nuntil close"), "{text}");
}

// ---------------------------------------------------------------- routing changes (etcd)

#[test]
fn routing_follows_task_changes_in_etcd() {
    let etcd = Etcd::start();
    let a = Nginx::start("a");
    let b = Nginx::start("b");
    let listen = free_addr();
    let _d = proxy(
        Config::etcd(&[etcd.endpoint()])
            .node("n1")
            .set("discovery.prefix", "/rmh")
            .set("discovery.node_ttl", "2s")
            .listener(Listener::http(listen, "web")),
    );
    let (status, body) = get(listen, "a", "/", "");
    assert_eq!(status, 503, "{body}");
    etcd.put("/rmh/tasks/web/a", &format!(r#"{{"addr":"{}"}}"#, a.addr()));
    eventually(Duration::from_secs(10), "requests to reach a", || {
        get(listen, "a", "/", "").1.contains("name=a")
    });
    etcd.put("/rmh/tasks/web/b", &format!(r#"{{"addr":"{}"}}"#, b.addr()));
    etcd.del("/rmh/tasks/web/a");
    eventually(Duration::from_secs(10), "requests to move to b", || {
        get(listen, "a", "/", "").1.contains("name=b")
    });
    for _ in 0..5 {
        let (status, body) = get(listen, "a", "/", "");
        assert_eq!((status, field(&body, "name")), (200, "b"));
    }
}

// ---------------------------------------------------------------- streaming, upgrades, h2c

#[test]
fn streams_100_mib_each_way_with_bounded_memory() {
    const SIZE: usize = 100 << 20;
    // Backend: POST /up counts the body; GET /down sends SIZE bytes.
    let backend = raw_backend(|mut s| {
        let mut buf = vec![0u8; 1 << 16];
        while let Some(head) = read_request_head(&mut s) {
            if head.starts_with("POST") {
                let len: usize = header_value(&head, "content-length").parse().unwrap();
                let mut left = len;
                while left > 0 {
                    let n = s.read(&mut buf[..left.min(1 << 16)]).unwrap();
                    assert!(n > 0);
                    left -= n;
                }
                let body = format!("got {len}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            } else {
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
                let chunk = vec![b'z'; 1 << 16];
                for _ in 0..SIZE / chunk.len() {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let listen = free_addr();
    let d = proxy(web_proxy(listen, &[backend]));
    let before = vm_kib(d.pid(), "VmRSS:");

    // Upload.
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'u'; 1 << 16];
    for _ in 0..SIZE / chunk.len() {
        s.write_all(&chunk).unwrap();
    }
    assert_eq!(read_ok(&mut s), format!("got {SIZE}"));

    // Download on the same connection.
    write!(s, "GET /down HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(read_head(&mut s).unwrap().status, 200);
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while got < SIZE {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "download cut at {got}");
        got += n;
    }
    assert_eq!(got, SIZE);
    let hwm = vm_kib(d.pid(), "VmHWM:");
    assert!(
        hwm < before + 40 * 1024,
        "peak RSS {hwm} KiB (started at {before} KiB) for 2×100 MiB streamed"
    );
}

/// A WebSocket echo server: 101, then each (masked, short) client frame comes back unmasked.
fn websocket_echo() -> SocketAddr {
    raw_backend(|mut s| {
        let Some(head) = read_request_head(&mut s) else {
            return;
        };
        if !header_value(&head, "upgrade").eq_ignore_ascii_case("websocket") {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n");
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let len = (h[1] & 0x7f) as usize;
            let mut mask = [0u8; 4];
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut mask).is_err() || s.read_exact(&mut payload).is_err() {
                return;
            }
            for (i, p) in payload.iter_mut().enumerate() {
                *p ^= mask[i % 4];
            }
            let mut frame = vec![h[0], len as u8];
            frame.extend_from_slice(&payload);
            if s.write_all(&frame).is_err() {
                return;
            }
        }
    })
}

#[test]
fn websocket_upgrade_is_tunnelled_both_ways() {
    let ws = websocket_echo();
    let listen = free_addr();
    let _d = proxy(web_proxy(listen, &[ws]));
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let head = read_head(&mut s).unwrap();
    assert_eq!((head.version, head.status), (1, 101), "{:?}", head.headers);
    let upgrade = head
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("upgrade"));
    assert!(
        upgrade.is_some_and(|(_, v)| v.eq_ignore_ascii_case("websocket")),
        "{:?}",
        head.headers
    );
    for msg in ["hello", "through the proxy", "and back"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, c)| c ^ mask[i % 4]));
        s.write_all(&frame).unwrap();
        let mut reply = vec![0u8; 2 + msg.len()];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(reply[0], 0x81);
        assert_eq!(&reply[2..], msg.as_bytes());
    }
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn h2c_downstream_and_upstream() {
    let web = Nginx::start("web");
    let h2 = Nginx::start_with("h2", NginxProtocol::H2c, "");
    let listen = free_addr();
    let listener =
        Listener::http(listen, "web").route(&[("path_prefix", "/h2"), ("service", "h2")]);
    let _d = proxy(
        with_listener(listener)
            .set("service.h2.upstream_protocol", "h2c")
            .tasks(tasks("web", &[web.addr()]))
            .tasks(tasks("h2", &[h2.addr()])),
    );
    // h2c client → HTTP/1.1 task.
    let out = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\nversion=%{http_version}",
        &format!("http://{listen}/x?y=1"),
    ]);
    assert_eq!(field(&out, "version"), "2", "{out}");
    assert_eq!(field(&out, "name"), "web");
    assert_eq!(field(&out, "proto"), "HTTP/1.1");
    assert_eq!(field(&out, "uri"), "/x?y=1");
    assert_eq!(field(&out, "host"), listen.to_string());
    assert_eq!(field(&out, "via"), "2 routemesh");
    assert_eq!(field(&out, "xff"), "127.0.0.1");
    // HTTP/1.1 client → h2c task, and h2c → h2c.
    let out = curl(&[
        "-w",
        "\nversion=%{http_version}",
        &format!("http://{listen}/h2/a"),
    ]);
    assert_eq!(field(&out, "version"), "1.1", "{out}");
    assert_eq!(field(&out, "name"), "h2");
    assert_eq!(field(&out, "proto"), "HTTP/2.0");
    assert_eq!(field(&out, "xff"), "127.0.0.1");
    let out = curl(&["--http2-prior-knowledge", &format!("http://{listen}/h2/b")]);
    assert_eq!(field(&out, "proto"), "HTTP/2.0");
    // Several requests multiplexed on one client connection (a hyper client: curl 7.88's
    // --parallel with prior knowledge trips over its own framing).
    let bodies = h2_concurrent_gets(listen, 20);
    assert_eq!(
        bodies.iter().filter(|b| b.contains("name=web")).count(),
        20,
        "{bodies:?}"
    );
}

/// `n` concurrent GETs on one h2c connection; their bodies.
fn h2_concurrent_gets(addr: SocketAddr, n: usize) -> Vec<String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let reqs = (0..n).map(|i| {
            let mut send = send.clone();
            async move {
                let req = hyper::Request::get(format!("http://{addr}/mux{i}"))
                    .body(Empty::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8_lossy(&body).into_owned()
            }
        });
        let all = async {
            let mut out = Vec::new();
            let handles: Vec<_> = reqs.map(tokio::spawn).collect();
            for h in handles {
                out.push(h.await.unwrap());
            }
            out
        };
        tokio::time::timeout(IO_TIMEOUT, all)
            .await
            .expect("h2 requests in time")
    })
}

// ---------------------------------------------------------------- hardening

/// Sends `raw` and asserts the proxy answered `want` (or, with `want == 0`, closed without
/// an answer) and that the backend never saw "smuggled".
fn refused(listen: SocketAddr, rec: &Recorder, raw: &[u8], want: u16, why: &str) {
    let out = exchange(listen, raw);
    let (status, body) = status_body(&out);
    let shown = String::from_utf8_lossy(raw);
    if want == 0 {
        assert!(
            status == 0 || status == 400,
            "{shown:?}: got {status} {body}"
        );
    } else {
        assert_eq!(status, want, "{shown:?}: {body}");
        assert!(body.contains(why), "{shown:?}: body {body:?} lacks {why:?}");
        assert!(body.contains("service web"), "{body}");
    }
    assert!(
        !rec.seen().contains("smuggled"),
        "{shown:?} reached the backend: {}",
        rec.seen()
    );
}

#[test]
fn ambiguous_requests_never_reach_the_backend() {
    let rec = Recorder::start();
    let listen = free_addr();
    let d = proxy(web_proxy(listen, &[rec.addr]));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 41\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "both Content-Length and Transfer-Encoding",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "both Content-Length and Transfer-Encoding",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n{smuggled}"
            ),
            "more than one Content-Length",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\n{smuggled}"
            ),
            "more than one Content-Length",
        ),
        (
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 37\r\n\r\n{smuggled}"),
            "invalid Content-Length",
        ),
        (
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx{smuggled}"),
            "invalid Content-Length",
        ),
        (
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n{smuggled}"),
            "invalid Content-Length",
        ),
        (
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n{smuggled}"),
            "invalid Content-Length",
        ),
        (
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n{smuggled}"),
            "invalid Content-Length",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "exactly `chunked`",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "exactly `chunked`",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "exactly `chunked`",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "exactly `chunked`",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "whitespace before the colon",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "control character",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "obsolete line folding",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n{smuggled}"),
            "NUL byte",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rContent-Length: 37\r\n\r\n{smuggled}"),
            "bare CR",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nContent-Length: 37\r\n\r\n{smuggled}"),
            "bare LF",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n{smuggled}"),
            "empty header name",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n{smuggled}"),
            "without a colon",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n{smuggled}"),
            "more than one Host",
        ),
        (format!("GET / HTTP/1.1\r\n\r\n{smuggled}"), "missing Host"),
    ];
    for (raw, why) in &cases {
        refused(listen, &rec, raw.as_bytes(), 400, why);
    }
    // Bad chunk sizes: the head went out, but the body is cut before the bad size, so the
    // backend sees an incomplete request, never the smuggled one.
    for size in ["Z", "fffffffffffffffffff", "-1", "0x5"] {
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n{smuggled}"
        );
        refused(listen, &rec, raw.as_bytes(), 0, "");
    }
    assert!(rec.seen().is_empty() || !rec.seen().contains("smuggled"));
    // The proxy is still fine.
    let (status, body) = get(listen, "a", "/after", "");
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(d.log().contains("listening"), "daemon alive");
}

#[test]
fn oversized_heads_get_431_and_slow_heads_get_408() {
    let rec = Recorder::start();
    let listen = free_addr();
    let _d = proxy(
        web_proxy(listen, &[rec.addr])
            .set("http.header_read_timeout", "2s")
            .set("http.max_headers", 20),
    );
    let big = format!(
        "GET /smuggled HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    refused(listen, &rec, big.as_bytes(), 431, "larger than 65536 bytes");
    let many: String = (0..30).map(|i| format!("X-{i}: v\r\n")).collect();
    let raw = format!("GET /smuggled HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    refused(
        listen,
        &rec,
        raw.as_bytes(),
        431,
        "more than 20 header fields",
    );

    // Slowloris: one byte per 300 ms never completes a head within 2 s.
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    let drip = thread::spawn(move || {
        for b in b"GET /smuggled HTTP/1.1\r\nHost: a\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    let started = Instant::now();
    let out = read_to_end_lenient(&mut s);
    let (status, body) = status_body(&out);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("not received within 2s"), "{body}");
    assert!(started.elapsed() < IO_TIMEOUT);
    drop(s);
    let _ = drip.join();
    assert!(!rec.seen().contains("smuggled"));
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn http2_rapid_reset_does_not_starve_other_clients() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let d = proxy(web_proxy(listen, &[web.addr()]));
    let rss_before = vm_kib(d.pid(), "VmRSS:");
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(listen).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                out.extend(h2_frame(0x4, 0, 0, &[]));
                // GET / http, :authority "a" (literal without indexing).
                let hpack = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
                for i in 0..20_000u32 {
                    let id = 2 * i + 1;
                    out.extend(h2_frame(0x1, 0x5, id, &hpack));
                    out.extend(h2_frame(0x3, 0, id, &8u32.to_be_bytes()));
                }
                let mut r = s.try_clone().unwrap();
                let reader = thread::spawn(move || read_to_end_lenient(&mut r));
                let _ = s.write_all(&out);
                let got = reader.join().unwrap();
                // The server ended the connection with GOAWAY (frame type 7).
                let mut i = 0;
                let mut goaway = false;
                while i + 9 <= got.len() {
                    let len = ((got[i] as usize) << 16)
                        | ((got[i + 1] as usize) << 8)
                        | got[i + 2] as usize;
                    goaway |= got[i + 3] == 0x7;
                    i += 9 + len;
                }
                goaway
            })
        })
        .collect();
    // Meanwhile another client is served.
    for i in 0..10 {
        let out = curl(&["--http2-prior-knowledge", &format!("http://{listen}/ok{i}")]);
        assert_eq!(field(&out, "name"), "web");
        let (status, _) = get(listen, "a", "/h1", "");
        assert_eq!(status, 200);
    }
    for f in flooders {
        assert!(f.join().unwrap(), "flooding connection was sent GOAWAY");
    }
    let out = curl(&["--http2-prior-knowledge", &format!("http://{listen}/after")]);
    assert_eq!(field(&out, "name"), "web");
    let rss_after = vm_kib(d.pid(), "VmRSS:");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn maglev_on_a_header_sends_each_key_to_one_task() {
    let backends: Vec<Nginx> = (0..3).map(|i| Nginx::start(&format!("hash-{i}"))).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let listen = free_addr();
    let _d = proxy(
        web_proxy(listen, &addrs)
            .set("service.web.balance", "maglev")
            .set("service.web.hash_key", "header:X-User"),
    );
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..30 {
        let header = format!("X-User: user-{user}\r\n");
        let first = field(&get(listen, "example.com", "/", &header).1, "name").to_string();
        for _ in 0..3 {
            let (code, body) = get(listen, "example.com", "/", &header);
            assert_eq!(code, 200);
            assert_eq!(field(&body, "name"), first, "user-{user} stays on one task");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "keys spread over every task: {seen:?}");
}

#[test]
fn a_reset_before_any_response_ejects_the_task_and_idempotent_requests_go_elsewhere() {
    let (dying, seen) = misbehaving(Misbehaviour::ResetOnRequest);
    let good = Nginx::start("good");
    let listen = free_addr();
    let d =
        proxy(web_proxy(listen, &[dying, good.addr()]).set("service.web.health.interval", "1h"));
    for _ in 0..10 {
        let (code, body) = get(listen, "example.com", "/", "");
        assert_eq!(code, 200, "{body}");
        assert_eq!(field(&body, "name"), "good");
    }
    assert!(!seen.lock().unwrap().is_empty(), "the dying task was tried");
    let routes = d.routes();
    let t = &routes["services"][0]["tasks"][0];
    assert_eq!(t["id"], "web-0");
    assert_eq!(t["state"], "ejected", "{routes}");
    assert!(d.metric_sum("routemesh_retries_total{service=\"web\"}") >= 1.0);
}
