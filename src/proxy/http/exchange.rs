//! The steps of one exchange that every HTTP client path shares (HTTP/1.x on any transport,
//! HTTP/2 through hyper): route the request to a service, hash it for Maglev, send it to an
//! HTTP/1.1 task ([`to_h1_task`]: pick, connect or reuse, write the head and body, read the
//! response head, by the retry rules of `proxy::upstream::Attempts`, the same for every
//! listener), open the shared h2c connection of a task, and count and log the request.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::client::Client;
use super::errors::ProxyError;
use super::meters::ServiceMeters;
use super::pool::{H2Sender, Pool, still_open};
use super::route;
use crate::config::{Balance, HashKey, ServiceSettings};
use crate::protocol::http1::body::{LAST_CHUNK, chunk_header};
use crate::protocol::http1::editor::{client_ip, forwarded_for};
use crate::protocol::http1::response::{self, ResponseHead, ResponseRules, ResponseSink};
use crate::protocol::http1::{BodyReader, Forwarding, Version};
use crate::proxy::socket::{read_some, write_all};
use crate::proxy::upstream::{Attempts, ClosedEarly, Connect, Connected};
use crate::proxy::{ListenerCtx, upstream};
use crate::snapshot::{InFlight, Service, Task};

/// Response heads larger than this from a task fail the exchange (502).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer growth for task connections.
pub const READ_CHUNK: usize = 32 * 1024;

/// Who the client is, as the forwarding fields and PROXY headers say it.
pub struct ClientHop {
    pub peer: SocketAddr,
    /// The address the client reached on this node; `None` until asked for (a system call
    /// on a wildcard bind, made only for a request that needs it: see [`ClientHop::resolve_local`]).
    local: Option<SocketAddr>,
    /// Arrived over TLS terminated here: `https`.
    pub tls: bool,
    xff: Vec<u8>,
    forwarded_for: Vec<u8>,
}

impl ClientHop {
    pub fn new(peer: SocketAddr, local: Option<SocketAddr>, tls: bool) -> ClientHop {
        let ip = client_ip(peer);
        ClientHop {
            peer,
            local,
            tls,
            xff: ip.to_string().into_bytes(),
            forwarded_for: forwarded_for(ip),
        }
    }

    /// The forwarding facts of a request of this client.
    pub fn forwarding<'a>(
        &'a self,
        host: Option<&'a [u8]>,
        set_host: bool,
        via: &'static [u8],
        upgrade: Option<&'a [u8]>,
    ) -> Forwarding<'a> {
        Forwarding {
            xff: &self.xff,
            forwarded_for: &self.forwarded_for,
            proto: if self.tls { b"https" } else { b"http" },
            host,
            set_host,
            via,
            upgrade,
        }
    }

    /// Learns the address the client reached, from `ask` (the client's socket), unless it is
    /// known. Called before anything that needs it: a Host for a request without one, a
    /// PROXY header for a task.
    pub fn resolve_local(&mut self, ask: impl FnOnce() -> Option<SocketAddr>) {
        if self.local.is_none() {
            self.local = ask();
        }
    }

    /// The address the client reached ([`ClientHop::resolve_local`] first; the client's own
    /// address if it could not be had).
    pub fn local(&self) -> SocketAddr {
        debug_assert!(self.local.is_some(), "resolve_local before local");
        self.local.unwrap_or(self.peer)
    }

    /// The PROXY header of `send_proxy` for this client's task connections.
    pub fn proxy_header(&self, settings: &ServiceSettings) -> Option<Vec<u8>> {
        settings
            .send_proxy
            .map(|v| crate::protocol::proxy_protocol::encode(v, self.peer, self.local()))
    }
}

/// The Via token of a client's protocol.
pub fn via_of(v: Version) -> &'static [u8] {
    v.via()
}

/// The service a request goes to: its name (the metric label) and its current state.
/// `Err`: the answer (404 without a route, 503 without a service in the snapshot).
pub fn route_request(
    ctx: &ListenerCtx,
    host: Option<&str>,
    path: &str,
) -> Result<Arc<Service>, (ProxyError, String)> {
    // Without host or path routes every request goes to the default service: the host is
    // not looked at (nor normalised, which allocates) unless no service takes it.
    let normalized = (!ctx.routes.is_empty())
        .then(|| host.and_then(route::normalize_host))
        .flatten();
    let Some(name) = route::route(
        &ctx.routes,
        ctx.service.as_ref(),
        normalized.as_deref(),
        path,
    ) else {
        return Err((
            ProxyError::NoRoute {
                host: normalized
                    .or_else(|| host.and_then(route::normalize_host))
                    .unwrap_or_default(),
            },
            String::new(),
        ));
    };
    // Clone the service and drop the snapshot guard before any await.
    match ctx.snapshot.load().service(name) {
        Some(s) => Ok(s),
        None => {
            ctx.metrics
                .no_live_task_total
                .with_label_values(&[name.as_str()])
                .inc();
            Err((ProxyError::NoLiveTask, name.to_string()))
        }
    }
}

/// The Maglev key hash of a request (`None` for other balancers): the named header's
/// value, or the client's IP.
pub fn hash_of<'h>(
    settings: &ServiceSettings,
    mut header: impl FnMut(&str) -> Option<&'h [u8]>,
    peer: SocketAddr,
) -> Option<u64> {
    match (&settings.balance, &settings.hash_key) {
        (Balance::Maglev, HashKey::Header(h)) => Some(
            header(h.as_str())
                .map(crate::balance::key_hash)
                .unwrap_or_else(|| crate::balance::ip_hash(peer.ip())),
        ),
        (Balance::Maglev, HashKey::SourceAddr) => Some(crate::balance::addr_hash(peer)),
        (Balance::Maglev, _) => Some(crate::balance::ip_hash(peer.ip())),
        _ => None,
    }
}

/// A new HTTP/1.1 connection to `addr`, with the PROXY header first when there is one.
pub async fn dial_h1(
    addr: SocketAddr,
    connect_timeout: Duration,
    proxy_header: Option<&[u8]>,
) -> io::Result<TcpStream> {
    let stream = crate::util::net::dial(addr, connect_timeout).await?;
    if let Some(h) = proxy_header {
        write_all(&stream, h).await.map_err(|(_, e)| e)?;
    }
    Ok(stream)
}

/// The task connection of an HTTP/1.x client's last request, kept for its next one.
pub struct Held {
    pub addr: SocketAddr,
    pub stream: TcpStream,
    /// May go to the pool (no PROXY header on it).
    pub poolable: bool,
}

impl Held {
    /// Back to the pool when the client leaves.
    pub fn release(self) {
        if self.poolable {
            Pool::global().checkin_h1(self.addr, self.stream);
        }
    }
}

/// An HTTP/1.1 connection for a request to `task`: the client's kept one, an idle pooled
/// one (unless `fresh_only`, or the connection will carry a PROXY header), else a new one.
/// `Ok((stream, reused))`; `Err(None)`: `deadline` passed.
pub async fn h1_connection(
    task: &Task,
    settings: &ServiceSettings,
    proxy_header: Option<&[u8]>,
    fresh_only: bool,
    deadline: Instant,
    held: &mut Option<Held>,
) -> Result<(TcpStream, bool), Option<io::Error>> {
    if let Some(h) = held.take() {
        if h.addr == task.addr && !fresh_only && still_open(&h.stream) {
            return Ok((h.stream, true));
        }
        if h.addr != task.addr {
            h.release();
        }
    }
    if !fresh_only
        && proxy_header.is_none()
        && let Some(s) = Pool::global().checkout_h1(task.addr)
    {
        return Ok((s, true));
    }
    match tokio::time::timeout_at(
        deadline,
        dial_h1(task.addr, settings.connect_timeout, proxy_header),
    )
    .await
    {
        Err(_) => Err(None),
        Ok(Ok(s)) => Ok((s, false)),
        Ok(Err(e)) => Err(Some(e)),
    }
}

/// The h2c connection for a request to `task`: the shared one, or a new one (shared from
/// then on unless it carries a PROXY header). `Ok((sender, reused))`; `Err(None)`:
/// `deadline` passed.
pub async fn h2c_connection(
    task: &Task,
    settings: &ServiceSettings,
    proxy_header: Option<&[u8]>,
    fresh_only: bool,
    deadline: Instant,
) -> Result<(H2Sender, bool), Option<io::Error>> {
    if !fresh_only
        && proxy_header.is_none()
        && let Some(s) = Pool::global().checkout_h2(task.addr)
    {
        return Ok((s, true));
    }
    let addr = task.addr;
    let connect = async {
        let stream = dial_h1(addr, settings.connect_timeout, proxy_header).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream h2c connection ended");
            }
        });
        Ok::<_, io::Error>(send)
    };
    match tokio::time::timeout_at(deadline, connect).await {
        Err(_) => Err(None),
        Ok(Ok(s)) => {
            if proxy_header.is_none() {
                Pool::global().checkin_h2(addr, s.clone());
            }
            Ok((s, false))
        }
        Ok(Err(e)) => Err(Some(e)),
    }
}

/// Why no response head came.
#[derive(Debug)]
pub enum HeadFailure {
    /// Not within `request_timeout`.
    Timeout,
    /// The task closed (or reset) the connection; `received`: after some response bytes.
    Closed { received: bool, error: io::Error },
    /// Not HTTP, or too large.
    Invalid(String),
}

/// Reads a task's response head into `rbuf` (which may hold bytes already), skipping 1xx
/// heads; the final one is rewritten into `sink` by the codec.
pub async fn read_response_head(
    up: &TcpStream,
    rbuf: &mut BytesMut,
    rules: &ResponseRules,
    sink: &mut impl ResponseSink,
    deadline: Instant,
) -> Result<ResponseHead, HeadFailure> {
    let mut received = !rbuf.is_empty();
    loop {
        if !rbuf.is_empty() {
            match response::parse(rbuf, rules, sink) {
                Ok(Some(h)) if h.informational() => {
                    bytes::Buf::advance(rbuf, h.len);
                    continue;
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) if rbuf.len() > MAX_RESPONSE_HEAD => {
                    return Err(HeadFailure::Invalid("response head too large".into()));
                }
                Ok(None) => {}
                Err(why) => return Err(HeadFailure::Invalid(why)),
            }
        }
        match tokio::time::timeout_at(deadline, read_some(up, rbuf, READ_CHUNK)).await {
            Err(_) => return Err(HeadFailure::Timeout),
            Ok(Ok(0)) => {
                return Err(HeadFailure::Closed {
                    received,
                    error: io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"),
                });
            }
            Ok(Ok(_)) => received = true,
            Ok(Err(error)) => return Err(HeadFailure::Closed { received, error }),
        }
    }
}

/// The rest of a request body, after the part the proxy holds.
pub enum Rest<'a> {
    /// The held part is all of it.
    Done,
    /// An HTTP/1.x client's body, relayed as it is framed.
    Client {
        client: &'a mut Client,
        buf: &'a mut BytesMut,
        body: &'a mut BodyReader,
        idle: Duration,
    },
    /// An HTTP/2 client's body: its frames, chunk-encoded unless the length was declared.
    Frames {
        body: Incoming,
        chunked: bool,
        /// Data bytes so far (for `max_body_bytes`).
        seen: u64,
        ended: bool,
    },
}

/// Why a request body could not be read on.
#[derive(Debug)]
pub enum BodyFailure {
    /// 400 or 413 for the client.
    Refused(ProxyError),
    /// The client left (or idled out) mid-body.
    Gone,
}

/// Read buffer growth for client bodies.
const BODY_CHUNK: usize = 64 * 1024;

impl Rest<'_> {
    pub fn is_done(&self) -> bool {
        match self {
            Rest::Done => true,
            Rest::Client { body, .. } => body.is_done(),
            Rest::Frames { ended, .. } => *ended,
        }
    }

    /// The next bytes to write to the task (framed for HTTP/1.1); `None` at the end.
    /// Cancel-safe: nothing is lost if the future is dropped.
    pub async fn next(&mut self, limit: u64) -> Result<Option<Bytes>, BodyFailure> {
        match self {
            Rest::Done => Ok(None),
            Rest::Client {
                client,
                buf,
                body,
                idle,
            } => loop {
                if body.is_done() {
                    return Ok(None);
                }
                if !buf.is_empty() {
                    let n = body.relay(buf).map_err(|e| {
                        BodyFailure::Refused(ProxyError::BadRequest(format!("request body: {e}")))
                    })?;
                    if limit > 0 && body.data_len() > limit {
                        return Err(BodyFailure::Refused(ProxyError::BodyTooLarge(limit)));
                    }
                    if n > 0 {
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                }
                match tokio::time::timeout(*idle, client.read_some(buf, BODY_CHUNK)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Err(BodyFailure::Gone),
                }
            },
            Rest::Frames {
                body,
                chunked,
                seen,
                ended,
            } => loop {
                if *ended {
                    return Ok(None);
                }
                let frame = match body.frame().await {
                    None => None,
                    Some(Ok(f)) => Some(f),
                    Some(Err(e)) => {
                        return Err(BodyFailure::Refused(ProxyError::BadRequest(format!(
                            "request body: {e}"
                        ))));
                    }
                };
                let mut piece = Vec::new();
                if let Some(d) = frame.as_ref().and_then(|f| f.data_ref()) {
                    *seen += d.len() as u64;
                    if limit > 0 && *seen > limit {
                        return Err(BodyFailure::Refused(ProxyError::BodyTooLarge(limit)));
                    }
                    if *chunked && !d.is_empty() {
                        chunk_header(d.len(), &mut piece);
                        piece.extend_from_slice(d);
                        piece.extend_from_slice(b"\r\n");
                    } else if !*chunked {
                        piece.extend_from_slice(d);
                    }
                }
                if frame.is_none() || body.is_end_stream() {
                    *ended = true;
                    if *chunked {
                        piece.extend_from_slice(LAST_CHUNK);
                    }
                }
                if !piece.is_empty() {
                    return Ok(Some(Bytes::from(piece)));
                }
            },
        }
    }

    /// Sends what is left to a task that already answered (`pending` first); `false` when
    /// the client or the task went away.
    pub async fn finish(
        &mut self,
        up: &TcpStream,
        pending: Option<Bytes>,
        limit: u64,
        rx: &IntCounter,
    ) -> bool {
        if let Some(p) = pending
            && write_all(up, &p).await.is_err()
        {
            return false;
        }
        loop {
            match self.next(limit).await {
                Ok(Some(b)) => {
                    if write_all(up, &b).await.is_err() {
                        return false;
                    }
                    rx.inc_by(b.len() as u64);
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Writes `data` to the task unless it answers first: `Ok(None)` when all went out,
/// `Ok(Some(written))` when the task had something to say while its buffer was full.
async fn write_or_answer(up: &TcpStream, data: &[u8]) -> io::Result<Option<usize>> {
    let mut done = 0;
    while done < data.len() {
        match up.try_write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    r = up.writable() => r?,
                    r = up.readable() => {
                        r?;
                        if !still_open(up) {
                            return Ok(Some(done));
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// A request for an HTTP/1.1 task.
pub struct H1Request<'a> {
    /// The rewritten head and the held body, as they go out.
    pub out: &'a [u8],
    /// Idempotent, and the proxy holds all of it: may go again.
    pub replayable: bool,
    /// A new connection only (upgrades).
    pub fresh_only: bool,
    pub proxy_header: Option<&'a [u8]>,
    pub rules: ResponseRules,
}

/// A task's answer, its head rewritten into the sink, its bytes after the head in `rbuf`.
pub struct Answered {
    pub task: Arc<Task>,
    pub in_flight: InFlight,
    pub up: TcpStream,
    pub head: ResponseHead,
    /// The task answered before the body's end: what is left of the body goes after the
    /// response (`pending` first).
    pub unfinished: bool,
    pub pending: Option<Bytes>,
}

/// How sending to a task failed.
pub enum Failed {
    /// The proxy's answer (502, 503, 504).
    Answer(ProxyError),
    /// The client's body was refused or cut (nothing relayed yet).
    Body(BodyFailure, Arc<Task>),
}

/// Sends a request to an HTTP/1.1 task of `svc` by the retry rules of [`Attempts`]: the
/// head and held body in one write, then the `rest` of the body as it comes (watching for
/// an early answer), then the response head (1xx skipped), rewritten into `sink`.
#[allow(clippy::too_many_arguments)]
pub async fn to_h1_task(
    svc: &Service,
    metrics: &crate::metrics::Metrics,
    hash: Option<u64>,
    req: &H1Request<'_>,
    rest: &mut Rest<'_>,
    limit: u64,
    rx: &IntCounter,
    held: &mut Option<Held>,
    sink: &mut impl ResponseSink,
    rbuf: &mut BytesMut,
) -> Result<Answered, Failed> {
    let settings = &svc.settings;
    let timeout = settings.request_timeout;
    let mut attempts = Attempts::new(svc, metrics, hash);
    let mut deadline = Instant::now() + timeout;
    let failed = |attempts: &Attempts<'_>, e: io::Error| {
        Failed::Answer(ProxyError::UpstreamFailed {
            attempts: attempts.count(),
            last: e.to_string(),
        })
    };
    loop {
        let Some((task, in_flight)) = attempts.pick() else {
            return Err(Failed::Answer(gave_up(&mut attempts)));
        };
        let fresh = attempts.fresh_only() || req.fresh_only;
        let r = h1_connection(&task, settings, req.proxy_header, fresh, deadline, held).await;
        let Connected {
            task,
            in_flight,
            conn: up,
            reused,
        } = match attempts.settle(task, in_flight, r) {
            Connect::Connected(c) => c,
            Connect::Failed => continue,
            Connect::TimedOut => return Err(Failed::Answer(ProxyError::Timeout(timeout))),
        };
        let sent_at = Instant::now();
        if let Err((written, e)) = write_all(&up, req.out).await {
            if written == 0 {
                // Nothing went out: any method may go again.
                attempts.not_sent(reused, task_error(&task, e));
                continue;
            }
            return Err(failed(&attempts, task_error(&task, e)));
        }
        // The rest of a streaming body; the task may answer before it has all of it.
        let mut unfinished = false;
        let mut pending = None;
        if !rest.is_done() {
            loop {
                let next = tokio::select! {
                    n = rest.next(limit) => n,
                    r = up.readable() => {
                        if let Err(e) = r {
                            return Err(failed(&attempts, task_error(&task, e)));
                        }
                        if still_open(&up) {
                            continue; // stale readiness (now cleared): nothing arrived
                        }
                        unfinished = true;
                        break;
                    }
                };
                let piece = match next {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => return Err(Failed::Body(e, task)),
                };
                match write_or_answer(&up, &piece).await {
                    Ok(None) => rx.inc_by(piece.len() as u64),
                    Ok(Some(written)) => {
                        rx.inc_by(written as u64);
                        pending = Some(piece.slice(written..));
                        unfinished = true;
                        break;
                    }
                    Err(e) => return Err(failed(&attempts, task_error(&task, e))),
                }
            }
            // The response is due within request_timeout of the request's end.
            deadline = Instant::now() + timeout;
        }
        rbuf.clear();
        sink.clear();
        match read_response_head(&up, rbuf, &req.rules, sink, deadline).await {
            Ok(head) => {
                task.state
                    .observe_latency_us(sent_at.elapsed().as_micros().max(1) as u64);
                rbuf.advance(head.len);
                rx.inc_by(req.out.len() as u64);
                return Ok(Answered {
                    task,
                    in_flight,
                    up,
                    head,
                    unfinished,
                    pending,
                });
            }
            Err(HeadFailure::Timeout) => return Err(Failed::Answer(ProxyError::Timeout(timeout))),
            Err(HeadFailure::Invalid(why)) => {
                return Err(failed(&attempts, task_error(&task, why)));
            }
            Err(HeadFailure::Closed {
                received: true,
                error,
            }) => {
                let e = task_error(&task, format!("response cut short: {error}"));
                return Err(failed(&attempts, e));
            }
            Err(HeadFailure::Closed {
                received: false,
                error,
            }) => {
                let e = task_error(&task, error);
                let why = e.to_string();
                drop(in_flight);
                if attempts.closed_early(&task, req.replayable, reused, e) == ClosedEarly::Fail {
                    return Err(Failed::Answer(ProxyError::UpstreamFailed {
                        attempts: attempts.count(),
                        last: why,
                    }));
                }
            }
        }
    }
}

/// The answer after every attempt at a service failed: 503 when no task could be picked,
/// 502 with the last failure otherwise.
/// An h2c connection (pooled or new) for the next attempt: picks tasks and connects until
/// one connects (failed connects counted by [`Attempts::settle`]), the attempts give up, or
/// `deadline` passes.
pub async fn next_h2c(
    attempts: &mut Attempts<'_>,
    settings: &ServiceSettings,
    proxy_header: Option<&[u8]>,
    deadline: Instant,
) -> Result<Connected<H2Sender>, ProxyError> {
    loop {
        let Some((task, in_flight)) = attempts.pick() else {
            return Err(gave_up(attempts));
        };
        let fresh = attempts.fresh_only();
        let r = h2c_connection(&task, settings, proxy_header, fresh, deadline).await;
        match attempts.settle(task, in_flight, r) {
            Connect::Connected(c) => return Ok(c),
            Connect::Failed => continue,
            Connect::TimedOut => return Err(ProxyError::Timeout(settings.request_timeout)),
        }
    }
}

pub fn gave_up(attempts: &mut upstream::Attempts<'_>) -> ProxyError {
    let tried = attempts.count();
    match attempts.give_up() {
        None => ProxyError::NoLiveTask,
        Some(e) => ProxyError::UpstreamFailed {
            attempts: tried,
            last: e.to_string(),
        },
    }
}

/// `task (addr): why` for answers and logs.
pub fn task_error(task: &Task, why: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{} ({}): {why}", task.id, task.addr))
}

/// What the access log says of a request.
#[derive(Default)]
pub struct AccessInfo {
    pub method: String,
    pub host: Option<String>,
    pub path: String,
}

/// Counts a finished request (status, duration) and writes its access-log line.
pub fn account(
    ctx: &ListenerCtx,
    meters: &ServiceMeters,
    peer: SocketAddr,
    code: u16,
    started: Instant,
    task: Option<&Task>,
    info: &AccessInfo,
) {
    let elapsed = started.elapsed();
    meters.count(code);
    meters.duration.observe(elapsed.as_secs_f64());
    if ctx.access_log {
        tracing::info!(
            target: "routemesh::access",
            listener = %ctx.name,
            client = %peer,
            method = %info.method,
            host = info.host.as_deref().unwrap_or("-"),
            path = %info.path,
            service = %meters.service,
            task = task.map(|t| t.id.as_str()).unwrap_or("-"),
            status = code,
            ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

static UPSTREAM_LOG: crate::ratelimit::LogLimiter = crate::ratelimit::LogLimiter::new(1000);

/// Logs (rate-limited) an answer the proxy makes for a task's failure.
pub fn log_answer(ctx: &ListenerCtx, service: &str, peer: SocketAddr, e: &ProxyError) {
    if matches!(
        e,
        ProxyError::UpstreamFailed { .. } | ProxyError::Timeout(_)
    ) && let Some(suppressed) = UPSTREAM_LOG.allow()
    {
        tracing::warn!(listener = %ctx.name, service = %service, client = %peer, error = %e, suppressed, "answering {}", e.status().as_u16());
    }
}
