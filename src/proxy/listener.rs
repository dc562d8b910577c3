//! Binding published ports (socket2: SO_REUSEADDR, a deep backlog) and the accept loop shared
//! by every listener kind. The loop survives resource exhaustion: when the process runs out of
//! file descriptors it backs off and recovers instead of spinning or stopping.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ratelimit::LogLimiter;

/// Binds a TCP listener for a published port. TCP_NODELAY and keepalive are set on the
/// listening socket: Linux copies them to every accepted connection, which saves five
/// system calls per connection.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&super::upstream::keepalive())?;
    if addr.is_ipv6() {
        // "[::]:80" serves IPv4 too unless the system says otherwise.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Where connections run: tracked for draining, and stopped hard when the drain ends.
#[derive(Clone, Default)]
pub struct Connections {
    pub tracker: TaskTracker,
    /// Cancelled when shutdown starts: HTTP connections finish their in-flight requests and
    /// close instead of waiting for the next one.
    pub drain: CancellationToken,
    /// Cancelled when the drain timeout is over: every connection closes.
    pub hard_stop: CancellationToken,
}

static ACCEPT_ERROR_LOG: LogLimiter = LogLimiter::new(1000);

pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == libc::EMFILE || code == libc::ENFILE || code == libc::ENOBUFS || code == libc::ENOMEM
    )
}

/// Accepts until `stop` fires, running `handle` for each connection under `conns`.
pub async fn accept_loop<F, Fut>(
    name: String,
    listener: &TcpListener,
    stop: CancellationToken,
    conns: Connections,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let fut = handle(stream, peer);
                let hard_stop = conns.hard_stop.clone();
                conns.tracker.spawn(async move {
                    tokio::select! {
                        _ = fut => {}
                        _ = hard_stop.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                // Per-connection errors (the peer reset before accept) need no pause;
                // running out of descriptors or memory does, or the loop would spin.
                let pause = if is_resource_exhaustion(&e) {
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    backoff
                } else {
                    Duration::from_millis(1)
                };
                if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
                    tracing::warn!(listener = %name, error = %e, suppressed, retry_in = ?pause, "accept failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    tracing::info!(listener = %name, "stopped accepting");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(s.nodelay().unwrap());
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 6);
    }
}
