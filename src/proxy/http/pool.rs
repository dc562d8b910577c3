//! Upstream connections: dial + handshake (HTTP/1.1 or h2c), and a process-wide pool of idle
//! keep-alive connections per task address, so steady traffic reuses a few connections.
//!
//! HTTP/1.1 connections carry one exchange at a time: a connection is checked out for a
//! request and checked in when its response body has been read to the end (an abandoned
//! body closes it instead). An h2c connection is shared by every request to its task.
//! The pool is process-wide because connections belong to a task, not to the listener
//! that happened to route there. It never picks tasks: the caller picks per request.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::Body;
use crate::config::UpstreamProtocol;
use crate::util::net::dial;

/// Idle connections older than this are closed rather than reused: most servers close idle
/// keep-alive connections after 60–75 s, and reusing one they are closing fails the request.
const IDLE_MAX: Duration = Duration::from_secs(30);
/// Idle HTTP/1.1 connections kept per task.
const IDLE_PER_ADDR: usize = 256;

/// A connection able to send a request.
pub enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// Why a send failed, and whether the request went out.
#[allow(clippy::large_enum_variant)] // returned once per failed send, never stored
pub enum SendError {
    /// The connection was closed before any byte of the request was written: the request
    /// comes back and may go anywhere else, whatever its method.
    NotSent(Request<Body>),
    /// The request was (perhaps partly) written; the task may have acted on it.
    Failed(hyper::Error),
}

impl Sender {
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let r = match self {
            Sender::H1(s) => {
                if s.ready().await.is_err() {
                    return Err(SendError::NotSent(req));
                }
                s.try_send_request(req).await
            }
            Sender::H2(s) => {
                if s.ready().await.is_err() {
                    return Err(SendError::NotSent(req));
                }
                s.try_send_request(req).await
            }
        };
        r.map_err(|mut e| match e.take_message() {
            Some(req) => SendError::NotSent(req),
            None => SendError::Failed(e.into_error()),
        })
    }
}

/// Dials `addr` (bounded by `connect_timeout`) and runs the protocol handshake; the
/// connection is driven by a spawned task that ends when the connection closes.
/// `upgrades`: keep the connection usable for a 101 tunnel (never pooled). `proxy_header`:
/// written before the handshake (`send_proxy`; such connections are never pooled).
pub async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    protocol: UpstreamProtocol,
    upgrades: bool,
    proxy_header: Option<&[u8]>,
) -> io::Result<Sender> {
    let mut stream = dial(addr, connect_timeout).await?;
    if let Some(h) = proxy_header {
        // `send_proxy`: the PROXY header goes first on the connection, before any HTTP.
        tokio::io::AsyncWriteExt::write_all(&mut stream, h).await?;
    }
    let io = TokioIo::new(stream);
    match protocol {
        UpstreamProtocol::Http1 => {
            let (send, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(async move {
                let r = if upgrades {
                    conn.with_upgrades().await
                } else {
                    conn.await
                };
                if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "upstream connection ended");
                }
            });
            Ok(Sender::H1(send))
        }
        UpstreamProtocol::H2c => {
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "upstream h2c connection ended");
                }
            });
            Ok(Sender::H2(send))
        }
    }
}

/// An idle HTTP/1.1 connection and since when.
type Idle = (Instant, http1::SendRequest<Body>);

/// Idle connections by task address.
#[derive(Default)]
pub struct Pool {
    h1: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl Pool {
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(Pool::default)
    }

    /// An open connection to `addr`, if one is idle (HTTP/1.1) or shared (h2c).
    pub fn checkout(&self, addr: SocketAddr, protocol: UpstreamProtocol) -> Option<Sender> {
        match protocol {
            UpstreamProtocol::Http1 => {
                let mut map = self.h1.lock().unwrap_or_else(|p| p.into_inner());
                let idle = map.get_mut(&addr)?;
                let now = Instant::now();
                // Most recently used first: the warmest connection, least likely closed.
                while let Some((since, s)) = idle.pop() {
                    if !s.is_closed() && now.duration_since(since) < IDLE_MAX {
                        return Some(Sender::H1(s));
                    }
                }
                map.remove(&addr);
                None
            }
            UpstreamProtocol::H2c => {
                let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(&addr) {
                    Some(s) if !s.is_closed() => Some(Sender::H2(s.clone())),
                    Some(_) => {
                        map.remove(&addr);
                        None
                    }
                    None => None,
                }
            }
        }
    }

    /// Returns a connection after a complete exchange (HTTP/1.1) or shares a new one (h2c).
    pub fn checkin(&self, addr: SocketAddr, sender: Sender) {
        match sender {
            Sender::H1(s) => {
                if s.is_closed() {
                    return;
                }
                let mut map = self.h1.lock().unwrap_or_else(|p| p.into_inner());
                let idle = map.entry(addr).or_default();
                let now = Instant::now();
                if idle.len() >= IDLE_PER_ADDR {
                    idle.retain(|(since, s)| {
                        !s.is_closed() && now.duration_since(*since) < IDLE_MAX
                    });
                }
                if idle.len() < IDLE_PER_ADDR {
                    idle.push((now, s));
                }
            }
            Sender::H2(s) => {
                if !s.is_closed() {
                    let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                    map.insert(addr, s);
                }
            }
        }
    }
}
