//! The one pool of task connections, process-wide (connections belong to a task, not to
//! the listener that happened to route there): idle HTTP/1.1 connections per task address,
//! newest first, and one shared h2c sender per task address.
//!
//! One idle rule for both: a connection unused for [`IDLE_MAX`] is closed, not reused
//! (most servers close idle keep-alive connections after 60–75 s; reusing one they are
//! closing fails the request), and at least every [`IDLE_MAX`] the expired connections of
//! every task are dropped, so tasks that went away keep no descriptors. An HTTP/1.1
//! connection is checked out for one exchange and checked in after a complete one;
//! connections that carry a PROXY header (`send_proxy`) or were upgraded never come here.
//! The pool never picks tasks: the caller picks per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hyper::client::conn::http2;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::Body;

/// Idle connections older than this are closed rather than reused.
pub const IDLE_MAX: Duration = Duration::from_secs(30);
/// Idle HTTP/1.1 connections kept per task.
const IDLE_PER_ADDR: usize = 256;

/// A shared h2c connection to a task.
pub type H2Sender = http2::SendRequest<Body>;

/// Whether a connection idle since `since` may still be used at `now`.
fn fresh(since: Instant, now: Instant) -> bool {
    now.duration_since(since) < IDLE_MAX
}

/// Whether a kept connection is still open: nothing to read (a FIN or stray bytes mean it
/// is not reusable). Costs a system call only when the reactor has seen the socket become
/// readable since it last drained it (which is what a close or stray bytes do); a socket
/// with no such event is taken as open without asking the kernel.
pub fn still_open(s: &TcpStream) -> bool {
    let probe = s.try_io(tokio::io::Interest::READABLE, || {
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        socket2::SockRef::from(s).peek(&mut b)
    });
    matches!(probe, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[derive(Default)]
struct Idle {
    h1: HashMap<SocketAddr, Vec<(Instant, TcpStream)>>,
    h2: HashMap<SocketAddr, (Instant, H2Sender)>,
    /// When expired connections of every task were last dropped.
    swept: Option<Instant>,
}

impl Idle {
    /// Drops what expired everywhere, at most once per [`IDLE_MAX`].
    fn sweep(&mut self, now: Instant) {
        if self.swept.is_some_and(|t| fresh(t, now)) {
            return;
        }
        self.swept = Some(now);
        self.h1.retain(|_, list| {
            list.retain(|(since, _)| fresh(*since, now));
            !list.is_empty()
        });
        self.h2
            .retain(|_, (since, s)| fresh(*since, now) && !s.is_closed());
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Idle>,
}

impl Pool {
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(Pool::default)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle HTTP/1.1 connection to `addr`, most recently used first.
    pub fn checkout_h1(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.lock();
        let now = Instant::now();
        let list = idle.h1.get_mut(&addr)?;
        while let Some((since, s)) = list.pop() {
            if fresh(since, now) && still_open(&s) {
                return Some(s);
            }
        }
        idle.h1.remove(&addr);
        None
    }

    /// Returns an HTTP/1.1 connection after a complete exchange.
    pub fn checkin_h1(&self, addr: SocketAddr, s: TcpStream) {
        let mut idle = self.lock();
        let now = Instant::now();
        idle.sweep(now);
        let list = idle.h1.entry(addr).or_default();
        if list.len() >= IDLE_PER_ADDR {
            list.retain(|(since, _)| fresh(*since, now));
        }
        if list.len() < IDLE_PER_ADDR {
            list.push((now, s));
        }
    }

    /// The shared h2c connection to `addr`, if one is open and in use.
    pub fn checkout_h2(&self, addr: SocketAddr) -> Option<H2Sender> {
        let mut idle = self.lock();
        let now = Instant::now();
        match idle.h2.get_mut(&addr) {
            Some((since, s)) if fresh(*since, now) && !s.is_closed() => {
                *since = now;
                Some(s.clone())
            }
            Some(_) => {
                idle.h2.remove(&addr);
                None
            }
            None => None,
        }
    }

    /// Shares a new h2c connection.
    pub fn checkin_h2(&self, addr: SocketAddr, s: H2Sender) {
        let mut idle = self.lock();
        let now = Instant::now();
        idle.sweep(now);
        if !s.is_closed() {
            idle.h2.insert(addr, (now, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kept_connection_closed_by_the_task_is_not_open() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(still_open(&c));
        drop(s);
        // The FIN reaches the reactor.
        c.readable().await.unwrap();
        assert!(!still_open(&c));
    }

    #[tokio::test]
    async fn expired_connections_of_every_task_are_swept() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let other: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let mut idle = Idle::default();
        let t0 = Instant::now();
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        idle.h1.insert(other, vec![(t0, a)]);
        idle.h1
            .insert(addr, vec![(t0 + Duration::from_secs(20), b)]);
        idle.sweep(t0 + IDLE_MAX + Duration::from_secs(1));
        assert!(
            !idle.h1.contains_key(&other),
            "a task whose connections all expired goes"
        );
        assert_eq!(idle.h1[&addr].len(), 1);
        // At most once per IDLE_MAX.
        idle.sweep(t0 + IDLE_MAX * 2);
        assert_eq!(idle.h1[&addr].len(), 1);
    }
}
