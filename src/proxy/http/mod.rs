//! The L7 HTTP proxy: HTTP/1.1 (keep-alive, pipelining) and HTTP/2 with prior knowledge (h2c)
//! on the same port, routed by Host and path prefix to a service, balanced per request over
//! its tasks through pooled keep-alive connections (HTTP/1.1 or h2c upstream).
//!
//! Per request: route (`route.rs`), rewrite headers (`headers.rs`), pick a task, take a pooled
//! connection or dial one (`pool.rs`), send, retry by the rules below, stream the response
//! back (`body.rs`). HTTP/1 heads are checked by the gate (`gate.rs`, `head.rs`) before hyper
//! parses them. Proxy answers are in `errors.rs`.
//!
//! Retries: a connect that fails (nothing sent) is retried on another task whatever the
//! method, up to the service's `retries`; a request the pool's connection could not even
//! start to send goes out on another connection; an idempotent request without a body is
//! retried once on a fresh connection when a reused connection closed before any response
//! byte. A request that may have reached a task is otherwise never sent twice.
//!
//! Does not own routing state, balancing or config; TLS termination is `../tls.rs`, which
//! hands its decrypted stream to [`serve`].

mod body;
mod errors;
mod gate;
mod h1;
pub mod head;
pub mod headers;
mod pool;
pub mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use self::body::{Body, BodyFlags, RequestBody, ResponseBody};
use self::errors::ProxyError;
use self::gate::{ConnShared, Gate, GateLimits};
use self::headers::Forwarding;
use self::pool::{Pool, SendError, Sender};
use super::{ListenerCtx, OpenConnection, upstream};
use crate::config::{ServiceName, UpstreamProtocol};
use crate::ratelimit::LogLimiter;
use crate::snapshot::Task;
use crate::util::clock::now_ms;

/// The client preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper's default read-buffer ceiling; raised only for larger `max_header_bytes`.
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;

static UPSTREAM_LOG: LogLimiter = LogLimiter::new(1000);

/// One client connection, shared by its requests.
struct Conn {
    ctx: Arc<ListenerCtx>,
    peer: SocketAddr,
    h2: bool,
    /// Arrived over TLS terminated here: forwarded headers say `https`.
    tls: bool,
    /// The address the client reached on this node (the destination of PROXY headers).
    local: Option<SocketAddr>,
    shared: Arc<ConnShared>,
}

/// Handles one plain-TCP downstream connection on an http listener: HTTP/1.1 on the lean
/// path (`h1.rs`) for as long as it can, h2c and everything else through hyper.
pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    let _open = OpenConnection::count(&ctx.metrics, &ctx.name, ctx.service_label());
    let mut client = client;
    let accepted = Instant::now();
    let Some((initial, h2)) = preface(&ctx, &mut client, accepted).await else {
        return;
    };
    if h2 {
        let local = client.local_addr().ok();
        return serve_hyper(ctx, client, peer, local, false, initial, true, accepted).await;
    }
    match h1::serve(&ctx, &client, peer, initial, accepted).await {
        h1::Outcome::Closed => {}
        h1::Outcome::Handover { buf, head_started } => {
            let local = client.local_addr().ok();
            serve_hyper(ctx, client, peer, local, false, buf, false, head_started).await
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 (prior knowledge, or ALPN h2 over TLS: both start with the
/// preface) on `client`, a TLS stream after its handshake (`tls`), through hyper.
pub async fn serve<IO>(
    ctx: Arc<ListenerCtx>,
    mut client: IO,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenConnection::count(&ctx.metrics, &ctx.name, ctx.service_label());
    let accepted = Instant::now();
    let Some((initial, h2)) = preface(&ctx, &mut client, accepted).await else {
        return;
    };
    serve_hyper(ctx, client, peer, local, tls, initial, h2, accepted).await
}

/// Reads until the HTTP/2 preface matches or cannot match: the bytes read, and whether the
/// connection speaks HTTP/2. `None`: the client left (or the daemon drains) before a byte.
async fn preface<IO: AsyncRead + Unpin>(
    ctx: &ListenerCtx,
    client: &mut IO,
    accepted: Instant,
) -> Option<(BytesMut, bool)> {
    let deadline = accepted + ctx.http.header_read_timeout;
    let mut initial = BytesMut::with_capacity(4096);
    let h2 = loop {
        if initial.len() >= H2_PREFACE.len() {
            break initial.starts_with(H2_PREFACE);
        }
        if !H2_PREFACE.starts_with(&initial) {
            break false;
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, client.read_buf(&mut initial)) => r,
            // Draining: a connection that has not sent a byte has nothing to finish.
            _ = ctx.drain.cancelled(), if initial.is_empty() => return None,
        };
        match read {
            // Out of time: the gate answers 408, or closes when nothing came.
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
    };
    Some((initial, h2))
}

/// Serves the connection through hyper; `initial` holds bytes already read, the first
/// head having started at `head_started`.
#[allow(clippy::too_many_arguments)]
async fn serve_hyper<IO>(
    ctx: Arc<ListenerCtx>,
    client: IO,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: bool,
    initial: BytesMut,
    h2: bool,
    accepted: Instant,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(ConnShared::default());
    let conn = Arc::new(Conn {
        ctx: ctx.clone(),
        peer,
        h2,
        tls,
        local,
        shared: shared.clone(),
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(proxy(conn, req).await) }
    });
    let limits = &ctx.http;
    let result = if h2 {
        let io = TokioIo::new(Gate::passthrough(client, initial));
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            // Rapid reset (CVE-2023-44487): streams reset before the server accepted them,
            // or reset by the server for errors, end the connection past these counts.
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(256))
            .max_concurrent_streams(Some(256))
            .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
            .keep_alive_interval(Some(limits.idle_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = b.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = ctx.drain.cancelled() => {
                // Draining: GOAWAY, finish the streams in flight, then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let gate_limits = GateLimits {
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let io = TokioIo::new(Gate::new(client, initial, gate_limits, shared, accepted));
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            // The gate enforces head timing; hyper's timer would cut idle keep-alive
            // connections at 30 s regardless of idle_timeout.
            .header_read_timeout(None)
            .max_headers(limits.max_headers.max(1))
            .keep_alive(true);
        if limits.max_header_bytes + 8192 > HYPER_DEFAULT_MAX_BUF {
            b.max_buf_size(limits.max_header_bytes + 8192);
        }
        let conn = b.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = ctx.drain.cancelled() => {
                // Draining: finish the request in flight, then close (idle ones at once).
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = %ctx.name, client = %peer, error = %e, "http connection ended with an error");
    }
}

/// The Host of a request: the URI authority (HTTP/2, absolute-form) or the Host header.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn is_idempotent(m: &Method) -> bool {
    is_idempotent_bytes(m.as_str().as_bytes())
}

/// GET, HEAD, OPTIONS, PUT, DELETE, TRACE: may be sent twice (RFC 9110 §9.2.2).
fn is_idempotent_bytes(m: &[u8]) -> bool {
    matches!(
        m,
        b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE" | b"TRACE"
    )
}

/// Serves one request: the proxy's own answer or the task's response.
async fn proxy(conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
    let ctx = &conn.ctx;
    let start = Instant::now();
    let busy = conn.shared.begin();
    let refused = if conn.h2 {
        None
    } else {
        conn.shared.next_request()
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host_raw = request_host(&req);
    let host = host_raw.as_deref().and_then(route::normalize_host);

    let routed = if refused.is_some() {
        ctx.service.clone()
    } else {
        route::route(&ctx.routes, ctx.service.as_ref(), host.as_deref(), &path).cloned()
    };
    let service_label = routed
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    let outcome = match (refused, routed) {
        (Some(e), _) => Err(e),
        (None, None) => Err(ProxyError::NoRoute {
            host: host.unwrap_or_default(),
        }),
        (None, Some(service)) => forward(&conn, &service, req, host_raw.clone(), busy).await,
    };
    let (resp, task) = match outcome {
        Ok((resp, task)) => (resp, Some(task)),
        Err(e) => {
            if matches!(
                e,
                ProxyError::UpstreamFailed { .. } | ProxyError::Timeout(_)
            ) && let Some(suppressed) = UPSTREAM_LOG.allow()
            {
                tracing::warn!(listener = %ctx.name, service = %service_label, client = %conn.peer, error = %e, suppressed, "answering {}", e.status().as_u16());
            }
            (e.response(&service_label), None)
        }
    };
    let status = resp.status();
    let labels = [ctx.name.as_str(), service_label.as_str()];
    ctx.metrics
        .http_requests_total
        .with_label_values(&[ctx.name.as_str(), service_label.as_str(), status.as_str()])
        .inc();
    let elapsed = start.elapsed();
    ctx.metrics
        .http_request_duration_seconds
        .with_label_values(&labels)
        .observe(elapsed.as_secs_f64());
    if ctx.access_log {
        tracing::info!(
            target: "routemesh::access",
            listener = %ctx.name,
            client = %conn.peer,
            method = %method,
            host = host_raw.as_deref().unwrap_or("-"),
            path = %path,
            service = %service_label,
            task = task.as_ref().map(|t| t.id.as_str()).unwrap_or("-"),
            status = status.as_u16(),
            ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
    resp
}

/// A bodiless idempotent request again, for a retry.
fn replay_request(m: &Method, u: &hyper::Uri, v: Version, h: &hyper::HeaderMap) -> Request<Body> {
    let mut r = Request::new(body::empty());
    *r.method_mut() = m.clone();
    *r.uri_mut() = u.clone();
    *r.version_mut() = v;
    *r.headers_mut() = h.clone();
    r
}

/// What to do after a task's connection closed before any response byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClosedEarly {
    /// A kept connection the task closed while it idled: send again once, to the same
    /// pick, on a fresh connection (costs no attempt).
    RetryFresh,
    /// A fresh connection reset: the task is likely dying (a node losing power resets what
    /// is in flight); give the request to another task, as after a failed connect.
    RetryElsewhere,
    Fail,
}

/// The rule both HTTP paths follow. `replayable`: the request is idempotent and the proxy
/// still holds all of it. Eject the task unless the connection was a kept one (see
/// [`ejects`]).
fn closed_early(
    replayable: bool,
    reused: bool,
    stale_retry_used: bool,
    tried: usize,
    max_attempts: usize,
) -> ClosedEarly {
    if !replayable {
        ClosedEarly::Fail
    } else if reused && !stale_retry_used {
        ClosedEarly::RetryFresh
    } else if tried < max_attempts {
        ClosedEarly::RetryElsewhere
    } else {
        ClosedEarly::Fail
    }
}

/// Ejects `task` after an early close on a fresh connection (`reused` ones are closed by
/// idle timeouts, which says nothing about the task's health).
fn eject_after_early_close(task: &Task, reused: bool, why: &dyn std::fmt::Display) {
    if !reused {
        task.state
            .eject(now_ms(), format!("reset before any response: {why}"));
    }
}

/// Why a send on a reused connection may be retried once: it closed before any response.
fn closed_before_response(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        src = s.source();
    }
    false
}

/// Sends the request to a task of `name` with retries and returns the response to stream.
async fn forward(
    conn: &Conn,
    name: &ServiceName,
    mut req: Request<Incoming>,
    host_raw: Option<String>,
    busy: gate::Busy,
) -> Result<(Response<Body>, Arc<Task>), ProxyError> {
    let ctx = &conn.ctx;
    // Clone the service and drop the snapshot guard before any await.
    let svc = ctx.snapshot.load().service(name);
    let Some(svc) = svc else {
        ctx.metrics
            .no_live_task_total
            .with_label_values(&[name.as_str()])
            .inc();
        return Err(ProxyError::NoLiveTask);
    };
    let settings = &svc.settings;
    let limit = ctx.http.max_body_bytes;
    if limit > 0 {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
    }

    // Consistent hashing: every node sends the same key to the same task.
    let hash = match (&settings.balance, &settings.hash_key) {
        (crate::config::Balance::Maglev, crate::config::HashKey::Header(h)) => Some(
            req.headers()
                .get(h.as_str())
                .map(|v| crate::balance::key_hash(v.as_bytes()))
                .unwrap_or_else(|| crate::balance::ip_hash(conn.peer.ip())),
        ),
        (crate::config::Balance::Maglev, _) => Some(crate::balance::ip_hash(conn.peer.ip())),
        _ => None,
    };
    let wants_upgrade = !conn.h2 && headers::connection_has(req.headers(), "upgrade");
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let downstream_version = match parts.version {
        Version::HTTP_2 => "2",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    let upgrade = headers::strip_hop_by_hop(&mut parts.headers).filter(|_| wants_upgrade);
    if let Some(u) = &upgrade {
        headers::restore_upgrade(&mut parts.headers, u.clone());
    }
    // The proxy answers `Expect: 100-continue` itself when it first reads the body.
    parts.headers.remove(header::EXPECT);
    headers::add_forwarded(
        &mut parts.headers,
        &Forwarding {
            peer: conn.peer,
            proto: if conn.tls { "https" } else { "http" },
            host: host_raw.as_deref(),
            version: downstream_version,
        },
    );
    // The target's authority (absolute-form, or HTTP/2's :authority) is the host asked
    // for; Host must agree with it (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
    if let Some(a) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    // HTTP/2 may split Cookie into several fields; HTTP/1.1 allows one (RFC 9113 §8.2.3).
    if conn.h2
        && parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .nth(1)
            .is_some()
    {
        let joined: Vec<&[u8]> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    let protocol = settings.upstream_protocol;
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match protocol {
        UpstreamProtocol::Http1 => {
            if !parts.headers.contains_key(header::HOST)
                && let Some(h) = host_raw
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h).ok())
            {
                parts.headers.insert(header::HOST, h);
            }
            parts.uri = Uri::from(pq);
            parts.version = Version::HTTP_11;
        }
        UpstreamProtocol::H2c => {
            let authority = host_raw.clone().unwrap_or_else(|| "localhost".to_string());
            let mut b = Uri::builder()
                .scheme(Scheme::HTTP)
                .path_and_query(pq.clone());
            b = b.authority(authority.as_str());
            parts.uri = b.build().unwrap_or_else(|_| Uri::from(pq));
            parts.headers.remove(header::HOST);
            parts.version = Version::HTTP_2;
        }
    }

    let empty_body = body.is_end_stream();
    let flags = Arc::new(BodyFlags::default());
    let counter = |dir: &str| {
        ctx.metrics
            .bytes_total
            .with_label_values(&[ctx.name.as_str(), name.as_str(), dir])
    };
    let body = RequestBody::new(body, limit, flags.clone(), counter("rx")).boxed_unsync();
    // What an idempotent, bodiless request needs to be sent again.
    let replay = (is_idempotent(&parts.method) && empty_body).then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        )
    });
    let mut pending = Request::from_parts(parts, body);

    let proxy_header = settings.send_proxy.map(|v| {
        crate::protocol::proxy_protocol::encode(v, conn.peer, conn.local.unwrap_or(conn.peer))
    });
    let request_timeout = settings.request_timeout;
    let deadline = Instant::now() + request_timeout;
    let max_attempts = 1 + settings.retries as usize;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut stale_retry_used = false;
    let mut fresh_only = upgrade.is_some();
    while tried.len() < max_attempts {
        let Some(i) = svc.pick(&tried, now_ms(), hash) else {
            break;
        };
        if !tried.is_empty() {
            ctx.metrics
                .retries_total
                .with_label_values(&[name.as_str()])
                .inc();
        }
        tried.push(i);
        let task = svc.tasks[i].clone();
        let in_flight = task.state.begin();
        // `send_proxy`: a connection carries one client's PROXY header, so it is opened for
        // this request and never pooled or shared.
        let pooled = if fresh_only || proxy_header.is_some() {
            None
        } else {
            Pool::global().checkout(task.addr, protocol)
        };
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            None => {
                let dial = pool::connect(
                    task.addr,
                    settings.connect_timeout,
                    protocol,
                    upgrade.is_some(),
                    proxy_header.as_deref(),
                );
                match tokio::time::timeout_at(deadline, dial).await {
                    Err(_) => return Err(ProxyError::Timeout(request_timeout)),
                    Ok(Ok(s)) => {
                        task.state.succeed();
                        if let (Sender::H2(h2), None, None) = (&s, &upgrade, &proxy_header) {
                            Pool::global().checkin(task.addr, Sender::H2(h2.clone()));
                        }
                        s
                    }
                    Ok(Err(e)) => {
                        drop(in_flight);
                        upstream::connect_failed(&ctx.metrics, name.as_str(), &task, &e);
                        last_error = Some(format!("connect to {}: {e}", task.addr));
                        continue;
                    }
                }
            }
        };
        fresh_only = upgrade.is_some();
        let sent_at = Instant::now();
        let result = match tokio::time::timeout_at(deadline, sender.send(pending)).await {
            Err(_) => return Err(ProxyError::Timeout(request_timeout)),
            Ok(r) => r,
        };
        match result {
            Ok(mut resp) => {
                task.state
                    .observe_latency_us(sent_at.elapsed().as_micros().max(1) as u64);
                let up_upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| hyper::upgrade::on(&mut resp));
                let (mut rparts, rbody) = resp.into_parts();
                let resp_upgrade = headers::strip_hop_by_hop(&mut rparts.headers);
                rparts.version = Version::HTTP_11;
                headers::add_via(&mut rparts.headers, "1.1");
                let tx = counter("tx");
                match (client_upgrade, up_upgrade, resp_upgrade) {
                    (Some(down), Some(up), Some(proto)) => {
                        headers::restore_upgrade(&mut rparts.headers, proto);
                        let rx = counter("rx");
                        let (tx2, task2) = (tx.clone(), task.clone());
                        tokio::spawn(async move {
                            let _in_flight = in_flight;
                            tunnel(down, up, rx, tx2, &task2).await;
                        });
                        let body = ResponseBody::new(rbody, tx, None, Box::new(busy));
                        return Ok((Response::from_parts(rparts, body.boxed_unsync()), task));
                    }
                    (Some(_), _, _) => {
                        // Refused upgrade: the gate stopped checking this connection's
                        // bytes, so it must close after this response.
                        rparts
                            .headers
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    _ => {}
                }
                let on_end: Option<body::OnEnd> = match sender {
                    Sender::H1(_) if upgrade.is_none() && proxy_header.is_none() => {
                        let addr = task.addr;
                        Some(Box::new(move || Pool::global().checkin(addr, sender)))
                    }
                    _ => None,
                };
                let body = ResponseBody::new(rbody, tx, on_end, Box::new((in_flight, busy)));
                return Ok((Response::from_parts(rparts, body.boxed_unsync()), task));
            }
            Err(SendError::NotSent(req)) => {
                // Nothing went out: try again; a stale pooled connection costs no attempt.
                pending = req;
                if reused {
                    tried.pop();
                } else {
                    last_error = Some("connection closed before the request was sent".into());
                }
            }
            Err(SendError::Failed(e)) => {
                if flags.too_large.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(ProxyError::BodyTooLarge(limit));
                }
                if flags.broken.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(ProxyError::BadRequest(
                        "request body malformed or cut short".into(),
                    ));
                }
                let closed = closed_before_response(&e);
                let next = match &replay {
                    Some(_) if closed => {
                        closed_early(true, reused, stale_retry_used, tried.len(), max_attempts)
                    }
                    _ => ClosedEarly::Fail,
                };
                if closed && next != ClosedEarly::RetryFresh {
                    eject_after_early_close(&task, reused, &e);
                }
                match (next, &replay) {
                    (ClosedEarly::RetryFresh, Some((m, u, v, h))) => {
                        stale_retry_used = true;
                        fresh_only = true;
                        tried.pop();
                        ctx.metrics
                            .retries_total
                            .with_label_values(&[name.as_str()])
                            .inc();
                        pending = replay_request(m, u, *v, h);
                        tracing::debug!(service = %name, task = %task.id, error = %e, "pooled connection closed before the response; retrying once");
                    }
                    // Counted in retries_total when the next task is picked.
                    (ClosedEarly::RetryElsewhere, Some((m, u, v, h))) => {
                        pending = replay_request(m, u, *v, h);
                        fresh_only = true;
                        last_error = Some(format!("{} ({}): {e}", task.id, task.addr));
                        tracing::debug!(service = %name, task = %task.id, error = %e, "reset before the response; retrying on another task");
                    }
                    _ => {
                        return Err(ProxyError::UpstreamFailed {
                            attempts: tried.len(),
                            last: format!("{} ({}): {e}", task.id, task.addr),
                        });
                    }
                }
            }
        }
    }
    ctx.metrics
        .no_live_task_total
        .with_label_values(&[name.as_str()])
        .inc();
    match last_error {
        None => Err(ProxyError::NoLiveTask),
        Some(last) => Err(ProxyError::UpstreamFailed {
            attempts: tried.len(),
            last,
        }),
    }
}

/// Copies both ways between an upgraded client and task connection until both end.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    rx: prometheus::IntCounter,
    tx: prometheus::IntCounter,
    task: &Task,
) {
    let (down, up) = match tokio::join!(down, up) {
        (Ok(d), Ok(u)) => (d, u),
        (d, u) => {
            tracing::debug!(task = %task.id, down = ?d.err(), up = ?u.err(), "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_task, to_client)) => {
            rx.inc_by(to_task);
            tx.inc_by(to_client);
        }
        Err(e) => tracing::debug!(task = %task.id, error = %e, "tunnel ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_close_rule() {
        use ClosedEarly::*;
        // (replayable, reused, stale retry used, tried, max) → what next
        let cases = [
            ((false, true, false, 1, 3), Fail),
            ((false, false, false, 1, 3), Fail),
            ((true, true, false, 1, 3), RetryFresh),
            ((true, true, true, 1, 3), RetryElsewhere),
            ((true, false, false, 1, 3), RetryElsewhere),
            ((true, false, true, 2, 3), RetryElsewhere),
            ((true, false, false, 3, 3), Fail),
            ((true, true, false, 3, 3), RetryFresh),
        ];
        for ((rp, re, st, t, m), want) in cases {
            assert_eq!(
                closed_early(rp, re, st, t, m),
                want,
                "{rp} {re} {st} {t} {m}"
            );
        }
    }
}
