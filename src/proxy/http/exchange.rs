//! The steps of one exchange that every HTTP client path shares (HTTP/1.x on any transport,
//! HTTP/2 through hyper): route the request to a service, hash it for Maglev, open or reuse
//! a task connection (HTTP/1.1, with the PROXY header of `send_proxy`; or the shared h2c
//! one), read the task's response head, and count and log the request. The retry rules
//! are `proxy::upstream::Attempts`, the same for every listener.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::errors::ProxyError;
use super::meters::ServiceMeters;
use super::pool::{H2Sender, Pool};
use super::route;
use crate::config::{Balance, HashKey, ServiceSettings};
use crate::protocol::http1::editor::{client_ip, forwarded_for};
use crate::protocol::http1::response::{self, ResponseHead, ResponseRules, ResponseSink};
use crate::protocol::http1::{Forwarding, Version};
use crate::proxy::socket::{read_some, write_all};
use crate::proxy::{ListenerCtx, upstream};
use crate::snapshot::{Service, Task};

/// Response heads larger than this from a task fail the exchange (502).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer growth for task connections.
pub const READ_CHUNK: usize = 32 * 1024;

/// Who the client is, as the forwarding fields and PROXY headers say it.
pub struct ClientHop {
    pub peer: SocketAddr,
    /// The address the client reached on this node.
    pub local: SocketAddr,
    /// Arrived over TLS terminated here: `https`.
    pub tls: bool,
    xff: Vec<u8>,
    forwarded_for: Vec<u8>,
}

impl ClientHop {
    pub fn new(peer: SocketAddr, local: SocketAddr, tls: bool) -> ClientHop {
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

    /// The PROXY header of `send_proxy` for this client's task connections.
    pub fn proxy_header(&self, settings: &ServiceSettings) -> Option<Vec<u8>> {
        settings
            .send_proxy
            .map(|v| crate::proxy::proxy_protocol::encode(v, self.peer, self.local))
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
    let host = host.and_then(route::normalize_host);
    let Some(name) = route::route(&ctx.routes, ctx.service.as_ref(), host.as_deref(), path) else {
        return Err((
            ProxyError::NoRoute {
                host: host.unwrap_or_default(),
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
    let stream = upstream::dial(addr, connect_timeout).await?;
    if let Some(h) = proxy_header {
        write_all(&stream, h).await.map_err(|(_, e)| e)?;
    }
    Ok(stream)
}

/// An HTTP/1.1 connection for a request to `task`: an idle pooled one (unless
/// `fresh_only`, or the connection will carry a PROXY header), else a new one.
/// `Ok((stream, reused))`; `Err(None)`: `deadline` passed.
pub async fn h1_connection(
    task: &Task,
    settings: &ServiceSettings,
    proxy_header: Option<&[u8]>,
    fresh_only: bool,
    deadline: Instant,
) -> Result<(TcpStream, bool), Option<io::Error>> {
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

/// The answer after every attempt at a service failed: 503 when no task could be picked,
/// 502 with the last failure otherwise.
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
