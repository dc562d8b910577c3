//! The lean HTTP/1.1 path for plain-TCP clients: one loop per client connection reads a
//! request head, routes it, writes the rewritten head (and its body, held in memory) to a
//! keep-alive task connection in one write, and copies the response back, without a header
//! map, a task per upstream connection or a channel in between. Every routing, forwarding,
//! retry and answer rule is the hyper path's (`mod.rs`); the strict head check (`head.rs`)
//! runs first, as it does there.
//!
//! What this path does not take it hands over, connection and unread bytes, to the hyper
//! path, which then serves the rest of the connection: a head the check refuses, too large
//! or too slow (hyper's gate answers 400/431/408), HTTP/1.0, upgrades, `Expect`, bodies over
//! [`MAX_HELD_BODY`] or over `max_body_bytes`, and services with h2c or PROXY-header
//! upstreams.
//!
//! Idle task connections are kept per worker thread (a tokio socket belongs to its
//! runtime), newest first, for at most [`IDLE_MAX`]; expired ones of every task are dropped
//! at least every [`IDLE_MAX`] while the thread serves requests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prometheus::{Histogram, IntCounter};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::errors::ProxyError;
use super::head::{Chunked, Framing, check_head, trim_ows as trim};
use super::headers::{HOP_BY_HOP, client_ip, forwarded_for, put_forwarded_value};
use super::{
    ClosedEarly, UPSTREAM_LOG, closed_early, eject_after_early_close, is_idempotent_bytes, route,
};
use crate::config::{Balance, HashKey, UpstreamProtocol};
use crate::proxy::socket::{read_some, write_all};
use crate::proxy::{ListenerCtx, upstream};
use crate::snapshot::{Service, Task};
use crate::util::clock::now_ms;
use crate::util::net::dial;

/// Request bodies up to this size are read whole before the request goes out (so any
/// request can be sent again); larger ones go to the hyper path, which streams them.
pub const MAX_HELD_BODY: u64 = 64 * 1024;
/// Request header fields this path parses; more go to the hyper path.
const MAX_HEADERS: usize = 64;
/// Response header fields and head size accepted from a task.
const MAX_RESPONSE_HEADERS: usize = 128;
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer growth.
const READ_CHUNK: usize = 16 * 1024;
/// Idle task connections older than this are closed, not reused.
const IDLE_MAX: Duration = Duration::from_secs(30);
/// Idle task connections kept per task and worker thread.
const IDLE_PER_ADDR: usize = 256;

/// How the lean path let go of a client connection.
pub enum Outcome {
    /// Served and closed (or to be closed by dropping it).
    Closed,
    /// The hyper path takes over: `buf` holds the unread bytes (a whole or partial request
    /// head first), `head_started` when that head began to arrive.
    Handover {
        buf: BytesMut,
        head_started: Instant,
    },
}

/// Idle task connections of one worker thread.
struct Idle {
    by_addr: HashMap<SocketAddr, Vec<(Instant, TcpStream)>>,
    /// When expired connections of every task were last dropped.
    swept: Instant,
}

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle {
        by_addr: HashMap::new(),
        swept: Instant::now(),
    });
}

/// Whether a kept connection is still open: nothing to read (a FIN or stray bytes mean
/// it is not reusable).
fn still_open(s: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn checkout(addr: SocketAddr) -> Option<TcpStream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.by_addr.get_mut(&addr)?;
        let now = Instant::now();
        while let Some((since, s)) = list.pop() {
            if now.duration_since(since) < IDLE_MAX && still_open(&s) {
                return Some(s);
            }
        }
        None
    })
}

/// Drops connections idle for [`IDLE_MAX`] or more, and tasks left with none.
fn expire<T>(by_addr: &mut HashMap<SocketAddr, Vec<(Instant, T)>>, now: Instant) {
    by_addr.retain(|_, list| {
        list.retain(|(since, _)| now.duration_since(*since) < IDLE_MAX);
        !list.is_empty()
    });
}

fn checkin(addr: SocketAddr, s: TcpStream) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let now = Instant::now();
        // Now and then drop what expired everywhere, so tasks that went away (and whose
        // connections nobody checks out any more) do not keep descriptors open.
        if now.duration_since(idle.swept) > IDLE_MAX {
            idle.swept = now;
            expire(&mut idle.by_addr, now);
        }
        let list = idle.by_addr.entry(addr).or_default();
        if list.len() >= IDLE_PER_ADDR {
            list.retain(|(since, _)| now.duration_since(*since) < IDLE_MAX);
        }
        if list.len() < IDLE_PER_ADDR {
            list.push((now, s));
        }
    })
}

/// Metric handles of one service, resolved once per connection rather than per request.
struct Meters {
    service: String,
    duration: Histogram,
    rx: IntCounter,
    tx: IntCounter,
    codes: Vec<(u16, IntCounter)>,
}

impl Meters {
    fn get<'a>(slot: &'a mut Option<Meters>, ctx: &ListenerCtx, service: &str) -> &'a mut Meters {
        if slot.as_ref().is_none_or(|m| m.service != service) {
            let m = &ctx.metrics;
            let labels = [ctx.name.as_str(), service];
            *slot = Some(Meters {
                service: service.to_string(),
                duration: m.http_request_duration_seconds.with_label_values(&labels),
                rx: m
                    .bytes_total
                    .with_label_values(&[ctx.name.as_str(), service, "rx"]),
                tx: m
                    .bytes_total
                    .with_label_values(&[ctx.name.as_str(), service, "tx"]),
                codes: Vec::new(),
            });
        }
        slot.as_mut().expect("set above")
    }

    fn count(&mut self, ctx: &ListenerCtx, code: u16) {
        if let Some((_, c)) = self.codes.iter().find(|(k, _)| *k == code) {
            c.inc();
            return;
        }
        let c = ctx.metrics.http_requests_total.with_label_values(&[
            ctx.name.as_str(),
            self.service.as_str(),
            &code.to_string(),
        ]);
        c.inc();
        self.codes.push((code, c));
    }
}

/// Per-connection state that outlives a request.
struct Client<'a> {
    ctx: &'a ListenerCtx,
    stream: &'a TcpStream,
    peer: SocketAddr,
    /// The peer as `X-Forwarded-For` and `Forwarded: for=` write it.
    xff: String,
    forwarded_for: Vec<u8>,
    /// The task connection of the last request, kept for the next one.
    held: Option<(SocketAddr, TcpStream)>,
    out: Vec<u8>,
    rbuf: BytesMut,
    tried: Vec<usize>,
    meters: Option<Meters>,
}

/// A request ready to go: `Client::out` holds its rewritten head and body.
struct Request {
    service: Arc<Service>,
    idempotent: bool,
    head_method: bool,
    /// The client asked to close after this exchange.
    close: bool,
    hash: Option<u64>,
    /// For the access log.
    method: String,
    host: Option<String>,
    path: String,
}

/// What preparing a request decided.
enum Prepared {
    Send(Request),
    /// Answer at once (404, 503); `bool`: the client asked to close.
    Answer(ProxyError, String, AccessInfo, bool),
    Handover,
}

struct AccessInfo {
    method: String,
    host: Option<String>,
    path: String,
}

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the task closes the connection.
    Close,
}

/// Serves requests on `stream` until it closes, or hands it over to the hyper path.
pub async fn serve(
    ctx: &ListenerCtx,
    stream: &TcpStream,
    peer: SocketAddr,
    mut buf: BytesMut,
    accepted: Instant,
) -> Outcome {
    let ip = client_ip(peer);
    let mut client = Client {
        ctx,
        stream,
        peer,
        xff: ip.to_string(),
        forwarded_for: forwarded_for(ip),
        held: None,
        out: Vec::with_capacity(1024),
        rbuf: BytesMut::new(),
        tried: Vec::new(),
        meters: None,
    };
    let outcome = client.run(&mut buf, accepted).await;
    if let Some((addr, s)) = client.held.take() {
        checkin(addr, s);
    }
    match outcome {
        Some(head_started) => Outcome::Handover { buf, head_started },
        None => Outcome::Closed,
    }
}

/// Whether a header name is hop-by-hop (never forwarded as is).
fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// The comma-separated tokens of every `Connection` field.
fn connection_tokens<'h>(headers: &[httparse::Header<'h>]) -> Vec<&'h [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn has_token(tokens: &[&[u8]], t: &[u8]) -> bool {
    tokens.iter().any(|x| x.eq_ignore_ascii_case(t))
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One field joining the earlier values (trimmed, empty ones dropped) and ours.
fn put_list(out: &mut Vec<u8>, name: &[u8], earlier: &[&[u8]], ours: &[&[u8]]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for v in earlier.iter().map(|v| trim(v)).filter(|v| !v.is_empty()) {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    for part in ours {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

impl Client<'_> {
    /// The request loop; `Some(head_started)` hands the connection over.
    async fn run(&mut self, buf: &mut BytesMut, accepted: Instant) -> Option<Instant> {
        let ctx = self.ctx;
        let limits = &ctx.http;
        let mut head_started = Some(accepted);
        let mut scanned = 0usize;
        loop {
            // A whole head.
            let head_len = loop {
                let from = scanned.saturating_sub(3);
                if let Some(i) = memchr::memmem::find(&buf[from..], b"\r\n\r\n") {
                    break from + i + 4;
                }
                scanned = buf.len();
                if buf.len() > limits.max_header_bytes {
                    return Some(head_started.unwrap_or_else(Instant::now));
                }
                let (deadline, partial_answers) = match head_started {
                    Some(t) => (t + limits.header_read_timeout, true),
                    None => (Instant::now() + limits.idle_timeout, false),
                };
                let read = tokio::select! {
                    r = tokio::time::timeout_at(deadline, read_some(self.stream, buf, READ_CHUNK)) => r,
                    _ = self.ctx.drain.cancelled(), if buf.is_empty() => return None,
                };
                match read {
                    // Too slow: the gate answers 408 for a partial head, or closes.
                    Err(_) if partial_answers && !buf.is_empty() => {
                        return Some(head_started.unwrap_or(deadline));
                    }
                    Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(_)) => {
                        if head_started.is_none() {
                            head_started = Some(Instant::now());
                        }
                    }
                }
            };
            scanned = 0;
            let started = head_started.unwrap_or_else(Instant::now);
            if head_len > limits.max_header_bytes {
                return Some(started);
            }
            let Ok(info) = check_head(&buf[..head_len], limits.max_headers) else {
                return Some(started);
            };
            if info.upgrade {
                return Some(started);
            }
            // The body, whole, in `buf`.
            let body_len = match info.framing {
                Framing::Empty => 0,
                Framing::Length(n) => {
                    if n > MAX_HELD_BODY || (limits.max_body_bytes > 0 && n > limits.max_body_bytes)
                    {
                        return Some(started);
                    }
                    n as usize
                }
                Framing::Chunked => {
                    if limits.max_body_bytes > 0 {
                        return Some(started);
                    }
                    let mut chunked = Chunked::default();
                    let mut fed = head_len;
                    loop {
                        match chunked.feed(&buf[fed..]) {
                            Ok(n) => fed += n,
                            Err(_) => return Some(started),
                        }
                        if chunked.is_done() {
                            break fed - head_len;
                        }
                        if (fed - head_len) as u64 > MAX_HELD_BODY {
                            return Some(started);
                        }
                        if !self.read_body_more(buf).await {
                            return None;
                        }
                    }
                }
            };
            while buf.len() < head_len + body_len {
                if !self.read_body_more(buf).await {
                    return None;
                }
            }

            let prepared = self.prepare(&buf[..head_len], &buf[head_len..head_len + body_len]);
            let request = match prepared {
                Prepared::Handover => return Some(started),
                Prepared::Send(r) => r,
                Prepared::Answer(e, service, info, close) => {
                    buf.advance(head_len + body_len);
                    let answer = e.http1(&service, close);
                    let ok = write_all(self.stream, &answer).await.is_ok();
                    self.account(&service, e.status().as_u16(), started, None, &info);
                    if !ok || close || e.closes() || self.ctx.drain.is_cancelled() {
                        return None;
                    }
                    head_started = (!buf.is_empty()).then(Instant::now);
                    continue;
                }
            };
            buf.advance(head_len + body_len);
            let keep = self.exchange(request, started, body_len as u64).await;
            if !keep || self.ctx.drain.is_cancelled() {
                return None;
            }
            head_started = (!buf.is_empty()).then(Instant::now);
        }
    }

    /// Reads more of a request body; `false` when the client went away or idled out.
    async fn read_body_more(&self, buf: &mut BytesMut) -> bool {
        let idle = self.ctx.http.idle_timeout;
        matches!(
            tokio::time::timeout(idle, read_some(self.stream, buf, READ_CHUNK)).await,
            Ok(Ok(n)) if n > 0
        )
    }

    /// Parses a checked head, routes it and writes the task-bound head and body to `out`.
    fn prepare(&mut self, head: &[u8], body: &[u8]) -> Prepared {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
            return Prepared::Handover;
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Prepared::Handover;
        };
        if !target.starts_with('/') {
            return Prepared::Handover; // absolute-form, asterisk-form
        }
        let headers: &[httparse::Header<'_>] = req.headers;
        let mut host_raw: Option<&str> = None;
        for h in headers {
            if h.name.eq_ignore_ascii_case("expect") {
                return Prepared::Handover;
            }
            if h.name.eq_ignore_ascii_case("host") {
                host_raw = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t'));
            }
        }
        let tokens = connection_tokens(headers);
        let close = has_token(&tokens, b"close");
        let path = target.split('?').next().unwrap_or(target);
        let host = host_raw.and_then(route::normalize_host);
        let ctx = self.ctx;
        let access = || AccessInfo {
            method: method.to_string(),
            host: host_raw.map(str::to_string),
            path: path.to_string(),
        };
        let Some(name) = route::route(&ctx.routes, ctx.service.as_ref(), host.as_deref(), path)
        else {
            let e = ProxyError::NoRoute {
                host: host.unwrap_or_default(),
            };
            return Prepared::Answer(e, String::new(), access(), close);
        };
        let Some(service) = ctx.snapshot.load().service(name) else {
            ctx.metrics
                .no_live_task_total
                .with_label_values(&[name.as_str()])
                .inc();
            return Prepared::Answer(ProxyError::NoLiveTask, name.to_string(), access(), close);
        };
        let settings = &service.settings;
        if settings.upstream_protocol != UpstreamProtocol::Http1 || settings.send_proxy.is_some() {
            return Prepared::Handover;
        }
        let hash = match (&settings.balance, &settings.hash_key) {
            (Balance::Maglev, HashKey::Header(h)) => Some(
                headers
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case(h.as_str()))
                    .map(|f| crate::balance::key_hash(f.value))
                    .unwrap_or_else(|| crate::balance::ip_hash(self.peer.ip())),
            ),
            (Balance::Maglev, _) => Some(crate::balance::ip_hash(self.peer.ip())),
            _ => None,
        };

        // The head for the task: hop-by-hop fields and those `Connection` names go first,
        // then the forwarding fields are added (a client cannot make us drop ours).
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut xff: Vec<&[u8]> = Vec::new();
        let mut forwarded: Vec<&[u8]> = Vec::new();
        let mut via: Vec<&[u8]> = Vec::new();
        let mut chunked = false;
        for h in headers {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = true; // exactly `chunked`: the head check refuses anything else
                continue;
            }
            if is_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"x-forwarded-proto")
                || name.eq_ignore_ascii_case(b"x-forwarded-host")
                || (!name.eq_ignore_ascii_case(b"host") && has_token(&tokens, name))
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                xff.push(h.value);
            } else if name.eq_ignore_ascii_case(b"forwarded") {
                forwarded.push(h.value);
            } else if name.eq_ignore_ascii_case(b"via") {
                via.push(h.value);
            } else {
                put_header(out, name, h.value);
            }
        }
        if chunked {
            put_header(out, b"transfer-encoding", b"chunked");
        }
        put_list(out, b"x-forwarded-for", &xff, &[self.xff.as_bytes()]);
        put_header(out, b"x-forwarded-proto", b"http");
        if let Some(h) = host_raw {
            put_header(out, b"x-forwarded-host", h.as_bytes());
        }
        let mut fwd = Vec::with_capacity(64);
        fwd.extend_from_slice(&self.forwarded_for);
        if let Some(h) = host_raw {
            fwd.extend_from_slice(b";host=");
            put_forwarded_value(&mut fwd, h.as_bytes());
        }
        fwd.extend_from_slice(b";proto=http");
        put_list(out, b"forwarded", &forwarded, &[&fwd]);
        put_list(out, b"via", &via, &[b"1.1 routemesh"]);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);

        let access_log = ctx.access_log;
        Prepared::Send(Request {
            idempotent: is_idempotent_bytes(method.as_bytes()),
            head_method: method == "HEAD",
            close,
            hash,
            method: if access_log {
                method.to_string()
            } else {
                String::new()
            },
            host: host_raw.map(str::to_string),
            path: if access_log {
                path.to_string()
            } else {
                String::new()
            },
            service,
        })
    }

    /// Counts a finished request and writes its access-log line.
    fn account(
        &mut self,
        service: &str,
        code: u16,
        started: Instant,
        task: Option<&Task>,
        info: &AccessInfo,
    ) {
        let ctx = self.ctx;
        let elapsed = started.elapsed();
        let m = Meters::get(&mut self.meters, ctx, service);
        m.count(ctx, code);
        m.duration.observe(elapsed.as_secs_f64());
        if ctx.access_log {
            tracing::info!(
                target: "routemesh::access",
                listener = %ctx.name,
                client = %self.peer,
                method = %info.method,
                host = info.host.as_deref().unwrap_or("-"),
                path = %info.path,
                service = %service,
                task = task.map(|t| t.id.as_str()).unwrap_or("-"),
                status = code,
                ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
    }

    /// A connection to `task` for a request: the one kept from the last request, an idle
    /// one, or a new one. `Ok((stream, reused))`.
    async fn connect(
        &mut self,
        task: &Task,
        fresh_only: bool,
        connect_timeout: Duration,
        deadline: Instant,
    ) -> Result<Option<(TcpStream, bool)>, std::io::Error> {
        if let Some((addr, s)) = self.held.take() {
            if addr == task.addr && !fresh_only && still_open(&s) {
                return Ok(Some((s, true)));
            }
            if addr != task.addr {
                checkin(addr, s);
            }
        }
        if !fresh_only && let Some(s) = checkout(task.addr) {
            return Ok(Some((s, true)));
        }
        match tokio::time::timeout_at(deadline, dial(task.addr, connect_timeout)).await {
            Err(_) => Ok(None),
            Ok(Ok(s)) => Ok(Some((s, false))),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Sends the request in `out` with the retry rules and copies the response to the
    /// client. `false`: the client connection must close.
    async fn exchange(&mut self, req: Request, started: Instant, body_len: u64) -> bool {
        let ctx = self.ctx;
        let svc = req.service.clone();
        let name = svc.name.as_str();
        let settings = &svc.settings;
        let deadline = Instant::now() + settings.request_timeout;
        let max_attempts = 1 + settings.retries as usize;
        let info = AccessInfo {
            method: req.method,
            host: req.host,
            path: req.path,
        };
        self.tried.clear();
        let mut last_error: Option<String> = None;
        let mut stale_retry_used = false;
        let mut fresh_only = false;
        let failure = 'attempts: loop {
            if self.tried.len() >= max_attempts {
                break None;
            }
            let Some(i) = svc.pick(&self.tried, now_ms(), req.hash) else {
                break None;
            };
            if !self.tried.is_empty() {
                ctx.metrics.retries_total.with_label_values(&[name]).inc();
            }
            self.tried.push(i);
            let task = svc.tasks[i].clone();
            let in_flight = task.state.begin();
            let (up, reused) = match self
                .connect(&task, fresh_only, settings.connect_timeout, deadline)
                .await
            {
                Ok(Some(c)) => c,
                Ok(None) => break Some(ProxyError::Timeout(settings.request_timeout)),
                Err(e) => {
                    drop(in_flight);
                    upstream::connect_failed(&ctx.metrics, name, &task, &e);
                    last_error = Some(format!("connect to {}: {e}", task.addr));
                    continue;
                }
            };
            if !reused {
                task.state.succeed();
            }
            fresh_only = false;
            let sent_at = Instant::now();
            if let Err((written, e)) = write_all(&up, &self.out).await {
                if written == 0 {
                    // Nothing went out: any method may go again; a stale kept connection
                    // costs no attempt.
                    if reused {
                        self.tried.pop();
                    } else {
                        last_error = Some(format!("{} ({}): {e}", task.id, task.addr));
                    }
                    continue;
                }
                break Some(ProxyError::UpstreamFailed {
                    attempts: self.tried.len(),
                    last: format!("{} ({}): {e}", task.id, task.addr),
                });
            }
            // The response head (informational ones skipped).
            self.rbuf.clear();
            let mut received = false;
            let head = loop {
                if !self.rbuf.is_empty() {
                    let fail = |why: String| ProxyError::UpstreamFailed {
                        attempts: self.tried.len(),
                        last: format!("{} ({}): {why}", task.id, task.addr),
                    };
                    // A final head is rewritten into `out` (the request is sent by then).
                    match parse_response(&self.rbuf, req.head_method, req.close, &mut self.out) {
                        Ok(Some(h)) if h.code == 101 => {
                            break 'attempts Some(fail("101 without an upgrade request".into()));
                        }
                        Ok(Some(h)) if (100..200).contains(&h.code) => {
                            self.rbuf.advance(h.len);
                            continue;
                        }
                        Ok(Some(h)) => break h,
                        Ok(None) if self.rbuf.len() > MAX_RESPONSE_HEAD => {
                            break 'attempts Some(fail("response head too large".into()));
                        }
                        Ok(None) => {}
                        Err(why) => break 'attempts Some(fail(why)),
                    }
                }
                let read =
                    tokio::time::timeout_at(deadline, read_some(&up, &mut self.rbuf, READ_CHUNK))
                        .await;
                let why = match read {
                    Err(_) => break 'attempts Some(ProxyError::Timeout(settings.request_timeout)),
                    Ok(Ok(0)) => "connection closed".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => {
                        received = true;
                        continue;
                    }
                };
                if received {
                    break 'attempts Some(ProxyError::UpstreamFailed {
                        attempts: self.tried.len(),
                        last: format!("{} ({}): response cut short: {why}", task.id, task.addr),
                    });
                }
                // Closed before any response byte.
                let next = closed_early(
                    req.idempotent,
                    reused,
                    stale_retry_used,
                    self.tried.len(),
                    max_attempts,
                );
                if next == ClosedEarly::RetryFresh {
                    stale_retry_used = true;
                    fresh_only = true;
                    self.tried.pop();
                    ctx.metrics.retries_total.with_label_values(&[name]).inc();
                    tracing::debug!(service = %name, task = %task.id, error = %why, "kept connection closed before the response; retrying once");
                    continue 'attempts;
                }
                eject_after_early_close(&task, reused, &why);
                if next == ClosedEarly::RetryElsewhere {
                    last_error = Some(format!("{} ({}): {why}", task.id, task.addr));
                    fresh_only = true;
                    continue 'attempts;
                }
                break 'attempts Some(ProxyError::UpstreamFailed {
                    attempts: self.tried.len(),
                    last: format!("{} ({}): {why}", task.id, task.addr),
                });
            };
            task.state
                .observe_latency_us(sent_at.elapsed().as_micros().max(1) as u64);
            let (reusable, client_ok) = self.relay(&up, &head, name).await;
            drop(in_flight);
            if reusable {
                self.held = Some((task.addr, up));
            }
            let m = Meters::get(&mut self.meters, ctx, name);
            m.rx.inc_by(body_len);
            self.account(name, head.code, started, Some(&task), &info);
            return client_ok && !head.close;
        };
        let e = failure.unwrap_or_else(|| {
            ctx.metrics
                .no_live_task_total
                .with_label_values(&[name])
                .inc();
            match last_error {
                None => ProxyError::NoLiveTask,
                Some(last) => ProxyError::UpstreamFailed {
                    attempts: self.tried.len(),
                    last,
                },
            }
        });
        if matches!(
            e,
            ProxyError::UpstreamFailed { .. } | ProxyError::Timeout(_)
        ) && let Some(suppressed) = UPSTREAM_LOG.allow()
        {
            tracing::warn!(listener = %ctx.name, service = %name, client = %self.peer, error = %e, suppressed, "answering {}", e.status().as_u16());
        }
        let ok = write_all(self.stream, &e.http1(name, req.close))
            .await
            .is_ok();
        self.account(name, e.status().as_u16(), started, None, &info);
        ok && !req.close
    }

    /// Writes the response head (rewritten into `out` by [`parse_response`]) and body to
    /// the client. Returns whether the task connection can be kept and whether the client
    /// connection is still good.
    async fn relay(&mut self, up: &TcpStream, head: &ResponseHead, service: &str) -> (bool, bool) {
        self.rbuf.advance(head.len);
        let mut tx = 0u64;
        let mut chunked = Chunked::default();
        let mut left = match head.framing {
            ResponseFraming::Length(n) => n,
            _ => 0,
        };
        // Takes the body bytes at the front of `rbuf` into `out`; `true` once the body ended.
        let mut take = |rbuf: &mut BytesMut, out: &mut Vec<u8>| -> Result<bool, ()> {
            match head.framing {
                ResponseFraming::Empty => Ok(true),
                ResponseFraming::Length(_) => {
                    let n = left.min(rbuf.len() as u64) as usize;
                    out.extend_from_slice(&rbuf[..n]);
                    rbuf.advance(n);
                    left -= n as u64;
                    tx += n as u64;
                    Ok(left == 0)
                }
                ResponseFraming::Chunked => {
                    let n = chunked.feed(rbuf).map_err(drop)?;
                    out.extend_from_slice(&rbuf[..n]);
                    rbuf.advance(n);
                    tx += n as u64;
                    Ok(chunked.is_done())
                }
                ResponseFraming::Close => {
                    out.extend_from_slice(rbuf);
                    tx += rbuf.len() as u64;
                    rbuf.clear();
                    Ok(false)
                }
            }
        };
        let mut done = match take(&mut self.rbuf, &mut self.out) {
            Ok(d) => d,
            Err(()) => return (false, false),
        };
        let mut client_ok = write_all(self.stream, &self.out).await.is_ok();
        let mut reusable = true;
        while !done && client_ok {
            self.rbuf.clear();
            match read_some(up, &mut self.rbuf, READ_CHUNK).await {
                Ok(n) if n > 0 => {}
                // EOF ends a close-delimited body; anything else was cut short, and the
                // client can only learn that from the connection closing.
                Ok(_) if head.framing == ResponseFraming::Close => {
                    reusable = false;
                    break;
                }
                _ => {
                    reusable = false;
                    client_ok = false;
                    break;
                }
            }
            self.out.clear();
            match take(&mut self.rbuf, &mut self.out) {
                Ok(d) => done = d,
                Err(()) => {
                    reusable = false;
                    client_ok = false;
                }
            }
            if !self.out.is_empty() && write_all(self.stream, &self.out).await.is_err() {
                client_ok = false;
            }
        }
        let m = Meters::get(&mut self.meters, self.ctx, service);
        m.tx.inc_by(tx);
        // Bytes past the end of the body mean the task does not frame as we think.
        let reusable = reusable
            && done
            && client_ok
            && head.keep_alive
            && self.rbuf.is_empty()
            && head.framing != ResponseFraming::Close;
        (reusable, client_ok)
    }
}

/// What the proxy needs from a task's response head.
struct ResponseHead {
    len: usize,
    code: u16,
    framing: ResponseFraming,
    /// HTTP/1.1 without `Connection: close`.
    keep_alive: bool,
    /// The client connection closes after this response (it asked to, or the body ends
    /// with the task's connection).
    close: bool,
}

/// Parses a response head at the start of `buf`: `Ok(None)` until it is complete. A final
/// (not 1xx) head is also rewritten for the client into `out`, in the same pass: status
/// line, the task's fields minus hop-by-hop ones (framing fields kept as the body is
/// relayed), `Via`, and `Connection: close` when closing (`client_close`: the client asked).
fn parse_response(
    buf: &[u8],
    head_request: bool,
    client_close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let tokens = connection_tokens(resp.headers);
    let keep_alive = resp.version == Some(1) && !has_token(&tokens, b"close");
    let mut length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = trim(h.value);
            let n = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("invalid Content-Length in response")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length in response".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(h.value);
        }
    }
    let informational = (100..200).contains(&code);
    let framing = if head_request || informational || code == 204 || code == 304 {
        ResponseFraming::Empty
    } else if let Some(te) = te {
        let last = te.rsplit(|&b| b == b',').next().map(trim).unwrap_or(b"");
        if last.eq_ignore_ascii_case(b"chunked") {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::Close
        }
    } else if let Some(n) = length {
        ResponseFraming::Length(n)
    } else {
        ResponseFraming::Close
    };
    let close = client_close || framing == ResponseFraming::Close;
    if !informational {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        // httparse gives three digits.
        for d in [code / 100, code / 10 % 10, code % 10] {
            out.push(b'0' + d as u8);
        }
        out.push(b' ');
        match resp.reason.filter(|r| !r.is_empty()) {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => out.extend_from_slice(
                hyper::StatusCode::from_u16(code)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("")
                    .as_bytes(),
            ),
        }
        out.extend_from_slice(b"\r\n");
        let mut via: Vec<&[u8]> = Vec::new();
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if framing == ResponseFraming::Chunked {
                    put_header(out, name, h.value);
                }
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-length") && framing != ResponseFraming::Empty {
                if matches!(framing, ResponseFraming::Length(_)) {
                    put_header(out, name, trim(h.value));
                }
                continue;
            }
            if is_hop_by_hop(name) || has_token(&tokens, name) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"via") {
                via.push(h.value);
            } else {
                put_header(out, name, h.value);
            }
        }
        put_list(out, b"via", &via, &[b"1.1 routemesh"]);
        if close {
            put_header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }
    Ok(Some(ResponseHead {
        len,
        code,
        framing,
        keep_alive,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], head_request: bool) -> Result<Option<ResponseHead>, String> {
        parse_response(raw, head_request, false, &mut Vec::new())
    }

    fn rewritten(raw: &[u8], head_request: bool, close: bool) -> String {
        let mut out = Vec::new();
        parse_response(raw, head_request, close, &mut out)
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn expiry_drops_old_connections_and_empty_tasks() {
        let t0 = Instant::now();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let mut m = HashMap::new();
        m.insert(a, vec![(t0, 1)]);
        m.insert(b, vec![(t0, 2), (t0 + Duration::from_secs(20), 3)]);
        expire(&mut m, t0 + IDLE_MAX + Duration::from_secs(1));
        assert!(
            !m.contains_key(&a),
            "a task whose connections all expired goes"
        );
        assert_eq!(m[&b].iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn response_framing() {
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert!(h.framing == ResponseFraming::Length(5) && h.keep_alive);
        let h = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(h.framing == ResponseFraming::Chunked);
        let h = parse(b"HTTP/1.0 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert!(h.framing == ResponseFraming::Close && !h.keep_alive);
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(h.framing == ResponseFraming::Empty);
        assert!(
            parse(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n", false).unwrap().is_none());
    }

    #[test]
    fn response_rewrite_strips_hop_by_hop_and_adds_via() {
        let out = rewritten(
            b"HTTP/1.1 200 OK\r\nConnection: x-secret, keep-alive\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nVia: 1.0 edge\r\nContent-Length: 2\r\nServer: t\r\n\r\n",
            false,
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: t\r\nvia: 1.0 edge, 1.1 routemesh\r\n\r\n"
        );
        let out = rewritten(b"HTTP/1.0 200 OK\r\nServer: t\r\n\r\n", false, true);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: t\r\nvia: 1.1 routemesh\r\nconnection: close\r\n\r\n"
        );
    }
}
