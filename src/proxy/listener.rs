//! The accept loop shared by every listener kind (its sockets come from `util::net::bind`). The loop survives resource exhaustion: when the process runs out of
//! file descriptors it backs off and recovers instead of spinning or stopping.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ratelimit::LogLimiter;
use crate::util::net::is_resource_exhaustion;

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
