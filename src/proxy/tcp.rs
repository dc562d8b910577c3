//! The L4 proxy: connect the client to a live task, then copy bytes both ways until both sides
//! have closed. Half-close is preserved (EOF from one side becomes a write shutdown towards the
//! other); an abort (reset) on one side resets the other. Buffers are allocated only once a
//! side has data, so idle connections cost little memory.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;

use prometheus::IntCounter;
use tokio::net::TcpStream;

use super::ListenerCtx;
use super::upstream::{self, ConnectError};
use crate::ratelimit::LogLimiter;

const BUF_SIZE: usize = 16 * 1024;

static NO_TASK_LOG: LogLimiter = LogLimiter::new(1000);

/// Handles one downstream connection on a tcp listener.
pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    upstream::set_keepalive(&client);
    let labels = [ctx.name.as_str(), ctx.service.as_str()];
    ctx.metrics
        .connections_total
        .with_label_values(&labels)
        .inc();
    let active = ctx.metrics.active_connections.with_label_values(&labels);
    active.inc();
    let _active = scopeguard(move || active.dec());

    // Load the snapshot, keep only the service, drop the guard before any await.
    let service = ctx.snapshot.load().service(&ctx.service);
    let up = match service {
        Some(svc) => upstream::connect(&svc, &ctx.metrics, None).await,
        None => {
            ctx.metrics
                .no_live_task_total
                .with_label_values(&[ctx.service.as_str()])
                .inc();
            Err(ConnectError::NoLiveTask {
                service: ctx.service.to_string(),
            })
        }
    };
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            if let Some(suppressed) = NO_TASK_LOG.allow() {
                tracing::warn!(listener = %ctx.name, client = %peer, error = %e, suppressed, "closing client: no live task");
            }
            return; // dropping the client closes it at once
        }
    };
    tracing::debug!(listener = %ctx.name, client = %peer, task = %up.task.id, "connected");
    let rx =
        ctx.metrics
            .bytes_total
            .with_label_values(&[ctx.name.as_str(), ctx.service.as_str(), "rx"]);
    let tx =
        ctx.metrics
            .bytes_total
            .with_label_values(&[ctx.name.as_str(), ctx.service.as_str(), "tx"]);
    splice_streams(&client, &up.stream, &rx, &tx).await;
}

/// Runs `f` on drop.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    G(Some(f))
}

/// Copies both ways until both directions reach EOF; on an error in either direction, resets
/// both connections (SO_LINGER 0) so the abort propagates.
pub async fn splice_streams(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &IntCounter,
    b_to_a: &IntCounter,
) {
    let ab = pipe(a, b, a_to_b);
    let ba = pipe(b, a, b_to_a);
    tokio::pin!(ab, ba);
    let (mut ab_done, mut ba_done) = (false, false);
    while !(ab_done && ba_done) {
        let r = tokio::select! {
            r = &mut ab, if !ab_done => { ab_done = true; r }
            r = &mut ba, if !ba_done => { ba_done = true; r }
        };
        if r.is_err() {
            reset_on_close(a);
            reset_on_close(b);
            return;
        }
    }
}

/// SO_LINGER 0: closing sends RST instead of FIN (non-blocking with a zero timeout).
pub fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write side.
async fn pipe(from: &TcpStream, to: &TcpStream, counter: &IntCounter) -> io::Result<()> {
    let mut buf: Option<Box<[u8]>> = None;
    loop {
        from.readable().await?;
        let b = buf.get_or_insert_with(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        let n = match from.try_read(b) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(());
        }
        write_all(to, &b[..n]).await?;
        counter.inc_by(n as u64);
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
