//! The L4 proxy: connect the client to a live task, then copy bytes both ways until both sides
//! have closed. Half-close is preserved (EOF from one side becomes a write shutdown towards the
//! other), bounded by the service's `half_close_timeout` ([`HalfClose`]); an abort (reset) on
//! one side resets the other. A read buffer is taken from the worker's pool only once a side
//! has data and given back when it is drained; both directions of the copy are one future
//! polled by hand ([`Relay`], a few dozen bytes a direction), and every other phase's state
//! (routing, connect, a bulk flow's splice) is boxed only while it runs, so an idle
//! connection holds its sockets and a small future, nothing more.
//!
//! A service with `balance = "maglev"` is routed by a key hash: the peer IP, or for
//! `hash_key = "mqtt_client_id"` the client id of the MQTT CONNECT, read (not forwarded) before
//! any upstream is opened, then sent on ahead of the splice. There is no idle timeout here, so
//! an idle MQTT connection is never cut; one added later must be ≥ 1.5 × the CONNECT keep-alive.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::buffers;
use super::socket::{try_read_some, try_read_with, write_all};
use super::splice;
use super::upstream::{self, ConnectError};
use super::{ListenerCtx, OpenConnection};
use crate::balance::{ip_hash, key_hash};
use crate::config::{Balance, HashKey, ServiceName};
use crate::metrics::Metrics;
use crate::protocol::mqtt::{self, Parse};
use crate::ratelimit::LogLimiter;
use crate::snapshot::Service;

/// Buffer per direction of a TLS tunnel (a TLS record is at most 16 KiB of plaintext).
const TLS_BUF_SIZE: usize = 16 * 1024;
/// Bytes a direction copies through the buffer before switching to splice(2).
const SPLICE_AFTER: usize = 64 * 1024;
/// The first read of a CONNECT that routes the connection (`mqtt_client_id`).
const FIRST_READ: usize = 256;

static NO_TASK_LOG: LogLimiter = LogLimiter::new(1000);
static BAD_CONNECT_LOG: LogLimiter = LogLimiter::new(1000);

/// Handles one downstream connection on a tcp listener.
pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    // tcp listeners always have a service (config); tls listeners hand over routed names only.
    let Some(name) = ctx.service.clone() else {
        return;
    };
    let _open = OpenConnection::count(&ctx.metrics, &ctx.name, name.as_str());

    // Load the snapshot, keep only the service, drop the guard before any await.
    let service = ctx.snapshot.load().service(&name);
    let send_proxy = service.as_ref().and_then(|s| s.settings.send_proxy);
    let half_close_timeout = service
        .as_ref()
        .map_or(Duration::from_secs(60), |s| s.settings.half_close_timeout);
    let mut first = Vec::new();
    // In a block of its own, so that the connect's result does not keep a second slot in the
    // connection's future beside the upstream taken out of it.
    let mut up = {
        let connected = match service {
            Some(svc) => {
                // Boxed in a statement of its own (a temporary lives to the end of its
                // statement, across the await, in the connection's future).
                let routing = Box::pin(route_hash(&ctx, &svc, &client, peer, &mut first));
                let routed = routing.await;
                let Some(hash) = routed else {
                    return; // bad or missing first packet: counted; no upstream was opened
                };
                // Boxed: the connect's state lives only while connecting, not in every
                // connection's future for its whole life.
                let connecting = Box::pin(upstream::connect(
                    &svc,
                    &ctx.metrics,
                    hash,
                    paced(&svc, &first),
                ));
                connecting.await
            }
            None => {
                ctx.metrics
                    .no_live_task_total
                    .with_label_values(&[name.as_str()])
                    .inc();
                Err(ConnectError::NoLiveTask {
                    service: name.to_string(),
                })
            }
        };
        match connected {
            Ok(up) => up,
            Err(e) => {
                if let Some(suppressed) = NO_TASK_LOG.allow() {
                    tracing::warn!(listener = %ctx.name, client = %peer, error = %e, suppressed, "closing client: no live task");
                }
                return; // dropping the client closes it at once
            }
        }
    };
    tracing::debug!(listener = %ctx.name, client = %peer, task = %up.task.id, "connected");
    let (rx, tx) = crate::metrics::rx_tx(&ctx.metrics.bytes_total, &ctx.name, name.as_str());
    if let Some(version) = send_proxy {
        // `peer` is the client (from an accepted PROXY header too); the destination is the
        // address the client reached on this node.
        let local = ctx.local_of(&client, peer);
        let header = crate::protocol::proxy_protocol::encode(version, peer, local);
        first.splice(0..0, header);
    }
    if !first.is_empty() {
        if write_all(&up.stream, &first).await.is_err() {
            reset_on_close(&client);
            return;
        }
        rx.inc_by(first.len() as u64);
    }
    drop(first); // the CONNECT's bytes are gone: keep no buffer while the connection idles
    if let Some(place) = up.unanswered.take() {
        // Paced (`max_pending_connects`): the place frees up when the broker answers the
        // CONNECT (or closes), or after connect_timeout, whichever comes first.
        // Boxed in a statement of its own: the timer lives only while paced, not in every
        // connection's future.
        let answered = Box::pin(tokio::time::timeout(
            answer_wait(&ctx, &name),
            up.stream.readable(),
        ));
        let _ = answered.await;
        drop(place);
    }
    let hc = HalfClose {
        timeout: half_close_timeout,
        metrics: &ctx.metrics,
        listener: &ctx.name,
        service: name.as_str(),
    };
    splice_streams(&client, &up.stream, &rx, &tx, &hc).await;
}

/// Whether the connect for a connection routed by its MQTT CONNECT (`first`) is paced: the
/// service sets `max_pending_connects`.
fn paced(svc: &Service, first: &[u8]) -> bool {
    svc.settings.max_pending_connects > 0 && !first.is_empty()
}

/// How long a paced connection keeps its place waiting for the task's first answer: the
/// service's `connect_timeout` (read again from the snapshot, so that no connection carries
/// it for its whole life).
fn answer_wait(ctx: &ListenerCtx, name: &ServiceName) -> Duration {
    ctx.snapshot
        .load()
        .service(name)
        .map_or(Duration::from_secs(1), |s| s.settings.connect_timeout)
}

/// The key hash this connection is routed by (`None`: the service does not hash). For
/// `mqtt_client_id`, reads the CONNECT into `first` (bounded by `peek_timeout` and
/// `max_connect_bytes`); on bad input counts the reason and returns `None` from the outer
/// option, so the caller closes the client without connecting anywhere.
async fn route_hash(
    ctx: &ListenerCtx,
    svc: &Service,
    client: &TcpStream,
    peer: SocketAddr,
    first: &mut Vec<u8>,
) -> Option<Option<u64>> {
    let settings = &svc.settings;
    if settings.balance != Balance::Maglev {
        return Some(None);
    }
    if settings.hash_key == HashKey::SourceAddr {
        return Some(Some(crate::balance::addr_hash(peer)));
    }
    if settings.hash_key != HashKey::MqttClientId {
        // source_ip (header keys have no meaning on a tcp listener: the peer IP too).
        return Some(Some(ip_hash(peer.ip())));
    }
    let max = settings.max_connect_bytes;
    let cap = max.saturating_add(mqtt::MAX_FIXED_HEADER);
    let deadline = tokio::time::Instant::now() + settings.peek_timeout;
    let reason = loop {
        match mqtt::parse_connect(first, max) {
            Ok(Parse::Complete(c)) => {
                tracing::debug!(listener = %ctx.name, client = %peer, client_id = c.client_id, keep_alive = c.keep_alive, level = c.protocol_level, "MQTT CONNECT");
                // An empty client id asks the broker to assign one: route by the peer IP.
                return Some(Some(if c.client_id.is_empty() {
                    ip_hash(peer.ip())
                } else {
                    key_hash(c.client_id.as_bytes())
                }));
            }
            Ok(Parse::NeedMore) if first.len() >= cap => break "too_large", // unreachable guard
            Ok(Parse::NeedMore) => {}
            Err(e) => break e.reason(),
        }
        match tokio::time::timeout_at(deadline, read_some(client, first, cap)).await {
            Err(_) => break "timeout",
            Ok(Ok(0)) => break "closed",
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break "read_error",
        }
    };
    ctx.metrics
        .mqtt_connect_errors_total
        .with_label_values(&[svc.name.as_str(), reason])
        .inc();
    if let Some(suppressed) = BAD_CONNECT_LOG.allow() {
        tracing::warn!(listener = %ctx.name, client = %peer, reason, bytes = first.len(), suppressed, "closing client: no routable MQTT CONNECT");
    }
    None
}

/// Reads what is available into `buf`, never growing it past `cap`; 0 = EOF. Room is made
/// in `buf` itself once data is there (no chunk on the connection's future), little at first
/// (a CONNECT is a few dozen bytes: a reconnect storm of thousands holds little at once),
/// doubling while a packet is larger.
async fn read_some(from: &TcpStream, buf: &mut Vec<u8>, cap: usize) -> io::Result<usize> {
    let want = buf.len().clamp(FIRST_READ, 4096).min(cap - buf.len());
    loop {
        from.readable().await?;
        buf.reserve(want);
        let mut limited = bytes::BufMut::limit(&mut *buf, want);
        // A short read clears the readiness (the socket is drained), so the relay's first
        // read after the CONNECT waits for epoll instead of learning EAGAIN.
        if let Some(r) = try_read_with(from, want, || from.try_read_buf(&mut limited)) {
            return r;
        }
    }
}

/// What bounds a half-closed connection: once one direction has ended (the FIN was passed
/// on), the other must end, or at least move a byte, within `timeout`, or both sides close
/// and the close is counted in `routemesh_half_close_timeouts_total{listener,service}`.
/// Until a FIN there is no timer at all: an idle connection costs no wake-up.
pub struct HalfClose<'a> {
    /// `[service.NAME] half_close_timeout`.
    pub timeout: Duration,
    pub metrics: &'a Metrics,
    pub listener: &'a str,
    pub service: &'a str,
}

impl HalfClose<'_> {
    fn expired(&self) {
        self.metrics
            .half_close_timeouts_total
            .with_label_values(&[self.listener, self.service])
            .inc();
        tracing::debug!(listener = self.listener, service = self.service, timeout = ?self.timeout, "closing half-closed connection");
    }
}

/// How a two-way copy ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Both directions reached EOF.
    Closed,
    /// A read or write failed in either direction.
    Failed,
    /// One direction ended and the other stayed silent for `half_close_timeout`.
    HalfCloseExpired,
}

/// Runs both directions of a copy until both end, one fails, or the half-close timer runs out.
async fn both_ways<F1, F2>(ab: F1, ba: F2, moved: &AtomicU64, timeout: Duration) -> End
where
    F1: Future<Output = io::Result<()>>,
    F2: Future<Output = io::Result<()>>,
{
    tokio::pin!(ab, ba);
    let (ab_first, r) = tokio::select! {
        r = &mut ab => (true, r),
        r = &mut ba => (false, r),
    };
    if r.is_err() {
        return End::Failed;
    }
    if ab_first {
        half_closed(ba, moved, timeout).await
    } else {
        half_closed(ab, moved, timeout).await
    }
}

/// Waits for the direction still open after the other's EOF, as long as [`HalfCloseTimer`]
/// allows.
async fn half_closed<F>(mut rest: Pin<&mut F>, moved: &AtomicU64, timeout: Duration) -> End
where
    F: Future<Output = io::Result<()>>,
{
    let mut timer = HalfCloseTimer::start(timeout, moved);
    tokio::select! {
        r = rest.as_mut() => if r.is_ok() { End::Closed } else { End::Failed },
        _ = std::future::poll_fn(|cx| timer.poll_expired(cx, moved)) => End::HalfCloseExpired,
    }
}

/// The half-close rule's clock, armed at the first EOF: it runs out once a whole `timeout`
/// passes without a byte moved either way (`moved` unchanged), and re-arms while bytes move.
struct HalfCloseTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    /// `moved` when the timer was last armed.
    seen: u64,
}

impl HalfCloseTimer {
    fn start(timeout: Duration, moved: &AtomicU64) -> HalfCloseTimer {
        HalfCloseTimer {
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            seen: moved.load(Ordering::Relaxed),
        }
    }

    /// `Ready` when the timer has run out; `Pending` (woken at the next deadline) otherwise.
    fn poll_expired(&mut self, cx: &mut Context<'_>, moved: &AtomicU64) -> Poll<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = moved.load(Ordering::Relaxed);
            if now == self.seen {
                return Poll::Ready(());
            }
            self.seen = now;
            let next = tokio::time::Instant::now() + self.timeout;
            self.sleep.as_mut().reset(next);
        }
        Poll::Pending
    }
}

/// Copies both ways until both directions reach EOF; on an error in either direction, resets
/// both connections (SO_LINGER 0) so the abort propagates; after one side's FIN, closes both
/// when the other neither ends nor moves a byte within `hc.timeout`. The caller drops
/// (closes) both right after.
pub async fn splice_streams(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &IntCounter,
    b_to_a: &IntCounter,
    hc: &HalfClose<'_>,
) {
    let moved = AtomicU64::new(0);
    let relay = Relay {
        a,
        b,
        a_to_b,
        b_to_a,
        moved: &moved,
        ab: Direction::new(),
        ba: Direction::new(),
        ended: false,
        timeout: hc.timeout,
        half_closed: None,
    };
    match relay.await {
        End::Closed => {}
        End::Failed => {
            reset_on_close(a);
            reset_on_close(b);
        }
        End::HalfCloseExpired => hc.expired(),
    }
}

/// The two-way copy of [`splice_streams`] as one future polled by hand: both directions'
/// state sits in it side by side (a few dozen bytes each), instead of a future per
/// direction, so an idle connection holds no more than its sockets and this.
struct Relay<'a> {
    a: &'a TcpStream,
    b: &'a TcpStream,
    a_to_b: &'a IntCounter,
    b_to_a: &'a IntCounter,
    /// Bytes moved either way: what the half-close timer watches.
    moved: &'a AtomicU64,
    ab: Direction<'a>,
    ba: Direction<'a>,
    /// One direction has passed its EOF on: the last one skips its write shutdown, as both
    /// sockets close right after and close sends the FIN itself (one system call less).
    ended: bool,
    timeout: Duration,
    /// After the first EOF.
    half_closed: Option<HalfCloseTimer>,
}

/// A bulk flow's splice(2) forwarding, boxed: allocated while it flows, not held by every
/// idle connection.
type Splicing<'a> = Pin<Box<dyn Future<Output = io::Result<splice::Forwarded>> + Send + 'a>>;

/// Where one direction of a [`Relay`] is.
enum Stage<'a> {
    /// Through `buf`: a buffer from the worker's pool while bytes are in flight, none while
    /// the source is drained.
    Copy,
    Splice(Splicing<'a>),
    /// EOF passed on.
    Done,
}

/// One direction of a [`Relay`].
struct Direction<'a> {
    stage: Stage<'a>,
    /// Bytes read and not yet all written: `buf[written..]` is still to go.
    buf: BytesMut,
    written: usize,
    /// The last read left the source drained: the buffer goes back once written.
    drained: bool,
    /// Bytes copied through the buffer: past `SPLICE_AFTER` the direction splices.
    copied: usize,
    splice_ok: bool,
}

impl Direction<'_> {
    fn new() -> Self {
        Direction {
            stage: Stage::Copy,
            buf: BytesMut::new(),
            written: 0,
            drained: false,
            copied: 0,
            splice_ok: splice::available(),
        }
    }

    fn done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }
}

impl Drop for Direction<'_> {
    fn drop(&mut self) {
        buffers::give_read(&mut self.buf);
    }
}

impl<'a> Direction<'a> {
    /// Moves bytes `from` → `to` until EOF (then shuts down `to`'s write side, unless the other
    /// direction ended first) or an error; `Pending` while neither side is ready.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &'a TcpStream,
        to: &'a TcpStream,
        counter: &'a IntCounter,
        moved: &'a AtomicU64,
        ended: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.stage {
                Stage::Done => return Poll::Ready(Ok(())),
                Stage::Splice(forwarding) => match ready!(forwarding.as_mut().poll(cx)) {
                    Ok(splice::Forwarded::Eof) => {
                        self.stage = Stage::Done;
                        pass_eof(to, ended);
                    }
                    Ok(splice::Forwarded::NoPipe) => {
                        self.splice_ok = false;
                        self.stage = Stage::Copy;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                },
                Stage::Copy if self.written < self.buf.len() => {
                    match to.try_write(&self.buf[self.written..]) {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => self.written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            ready!(to.poll_write_ready(cx))?;
                            continue;
                        }
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if self.written == self.buf.len() {
                        let n = self.buf.len();
                        counter.inc_by(n as u64);
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                        self.copied += n;
                        self.buf.clear();
                        self.written = 0;
                        if self.drained {
                            // Drained: give the buffer back while the connection waits.
                            buffers::give_read(&mut self.buf);
                        }
                    }
                }
                Stage::Copy if self.splice_ok && self.copied >= SPLICE_AFTER => {
                    buffers::give_read(&mut self.buf);
                    self.stage = Stage::Splice(Box::pin(async move {
                        let on_bytes = |n| {
                            counter.inc_by(n);
                            moved.fetch_add(n, Ordering::Relaxed);
                        };
                        splice::forward(from, to, &on_bytes).await
                    }));
                }
                Stage::Copy => {
                    // Wait for data before taking a buffer from the worker's pool.
                    ready!(from.poll_read_ready(cx))?;
                    if self.buf.capacity() == 0 {
                        buffers::take_read(&mut self.buf);
                    }
                    let offered = self.buf.capacity();
                    match try_read_some(from, &mut self.buf) {
                        // Nothing after all (readiness cleared): wait again.
                        None => buffers::give_read(&mut self.buf),
                        Some(Ok(0)) => {
                            buffers::give_read(&mut self.buf);
                            self.stage = Stage::Done;
                            pass_eof(to, ended);
                        }
                        Some(Ok(n)) => self.drained = n < offered,
                        Some(Err(e)) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
    }
}

impl Future for Relay<'_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let r = self.get_mut();
        if let Poll::Ready(Err(_)) = r.ab.poll(cx, r.a, r.b, r.a_to_b, r.moved, &mut r.ended) {
            return Poll::Ready(End::Failed);
        }
        if let Poll::Ready(Err(_)) = r.ba.poll(cx, r.b, r.a, r.b_to_a, r.moved, &mut r.ended) {
            return Poll::Ready(End::Failed);
        }
        match (r.ab.done(), r.ba.done()) {
            (true, true) => return Poll::Ready(End::Closed),
            (false, false) => return Poll::Pending,
            _ => {}
        }
        // Half-closed: the open direction must end, or move a byte, within each `timeout`.
        let (timeout, moved) = (r.timeout, r.moved);
        let timer = r
            .half_closed
            .get_or_insert_with(|| HalfCloseTimer::start(timeout, moved));
        ready!(timer.poll_expired(cx, moved));
        Poll::Ready(End::HalfCloseExpired)
    }
}

/// Passes an EOF on: shuts down `to`'s write side, unless the other direction has ended too
/// (then closing both, just after, sends the FIN).
fn pass_eof(to: &TcpStream, ended: &mut bool) {
    if !std::mem::replace(ended, true) {
        let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    }
}

/// [`splice_streams`] for streams that are not plain sockets (a TLS-terminated client after
/// an HTTP upgrade): a buffered copy each way, with the same half-close and error rules.
/// Returns bytes moved (a → b, b → a).
pub async fn copy_streams<A, B>(a: &mut A, b: &mut B, hc: &HalfClose<'_>) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let moved = AtomicU64::new(0);
    let (a_to_b, b_to_a) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let ab = copy_one(&mut ar, &mut bw, &a_to_b, &moved);
    let ba = copy_one(&mut br, &mut aw, &b_to_a, &moved);
    let end = both_ways(ab, ba, &moved, hc.timeout).await;
    if end == End::HalfCloseExpired {
        hc.expired();
    }
    (
        a_to_b.load(Ordering::Relaxed),
        b_to_a.load(Ordering::Relaxed),
    )
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write side.
async fn copy_one<R, W>(
    from: &mut R,
    to: &mut W,
    count: &AtomicU64,
    moved: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; TLS_BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// SO_LINGER 0: closing sends RST instead of FIN (non-blocking with a zero timeout).
pub fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}
