//! The accept loop shared by every listener kind (its sockets come from `util::net::bind`).
//! The loop survives resource exhaustion: when the process runs out of file descriptors it
//! backs off and recovers instead of spinning or stopping.
//!
//! Accepts are batched: one wake-up takes every connection already queued, up to
//! [`ACCEPT_BATCH`], and a full batch yields to the scheduler before the next one, so a storm
//! on one listener never starves the others, nor the connections already open (a
//! current-thread runtime runs them all on one thread).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::task::Poll;
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

impl Connections {
    /// Connections of their own (one listener's) that this set's drain and hard stop reach.
    pub fn child(&self) -> Connections {
        Connections {
            tracker: self.tracker.clone(),
            drain: self.drain.child_token(),
            hard_stop: self.hard_stop.child_token(),
        }
    }
}

static ACCEPT_ERROR_LOG: LogLimiter = LogLimiter::new(1000);

/// Most connections accepted per turn of a listener's loop before it yields.
pub const ACCEPT_BATCH: usize = 64;

/// Logs once per process (at debug) how many bytes a connection's future takes: the bulk
/// of what an idle connection costs.
fn log_future_size(bytes: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tracing::debug!(bytes, "connection future size"));
}

/// One accept that never waits: `None` when the queue is empty (the listener's readiness is
/// cleared and its waker registered, as a pending accept does).
async fn try_accept(listener: &TcpListener) -> Option<io::Result<(TcpStream, SocketAddr)>> {
    std::future::poll_fn(|cx| match listener.poll_accept(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
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
    // How many connections this turn took; a full batch yields before the next accept.
    let mut batch = 0;
    loop {
        let accepted = if batch == 0 {
            tokio::select! {
                r = listener.accept() => r,
                _ = stop.cancelled() => break,
            }
        } else if batch == ACCEPT_BATCH {
            batch = 0;
            tokio::task::yield_now().await;
            continue;
        } else {
            match try_accept(listener).await {
                Some(r) => r,
                None => {
                    batch = 0;
                    continue;
                }
            }
        };
        batch += 1;
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                // Boxed at its exact size: moving it into the task below would otherwise
                // store it twice in the task (a future moved into another is not overlaid).
                let fut = Box::pin(handle(stream, peer));
                log_future_size(std::mem::size_of_val(&*fut));
                let hard_stop = conns.hard_stop.clone();
                conns.tracker.spawn(async move {
                    tokio::select! {
                        _ = fut => {}
                        _ = hard_stop.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                batch = 0;
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
