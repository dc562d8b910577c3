//! The HTTP/1 gate: sits between the client socket and hyper and lets a request head reach
//! hyper only once it has arrived whole, in time, within the size limits and past the strict
//! checks of `head.rs`. It follows body framing so it finds every pipelined head.
//!
//! A refused head never reaches hyper. In its place the gate hands hyper a fixed synthetic
//! request and records why, keyed by the head's sequence number; the request handler answers
//! it (400, 405, 408, 431 with a text body, `Connection: close`). Going through hyper keeps the
//! answer in order behind earlier pipelined responses.
//!
//! Timers: the first head must arrive within `header_read_timeout` of accept; a later head
//! within `header_read_timeout` of its first byte; an idle keep-alive connection (no request
//! in progress) is closed after `idle_timeout`. The gate does not parse bodies' content and
//! does not write to the client.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::errors::ProxyError;
use super::head::{Chunked, Framing, HeadError, check_head};
use crate::util::clock::now_ms;

/// What hyper parses in place of a refused head. Its answer closes the connection.
/// Lingering close after a refusal: at most this much, this long.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Bytes read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

const SYNTHETIC: &[u8] = b"GET / HTTP/1.1\r\nhost: routemesh.invalid\r\nconnection: close\r\n\r\n";

/// State shared by a connection's gate and its request handler.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// The refused head's sequence number (1-based, counting every head given to hyper) and
    /// the answer it gets.
    reject: Mutex<Option<(u64, ProxyError)>>,
    /// Requests handed to the handler so far (their sequence numbers).
    requests: AtomicU64,
    /// Requests whose response has not finished: the connection is not idle.
    busy: AtomicUsize,
    /// `now_ms()` when the last response finished.
    last_done_ms: AtomicU64,
}

impl ConnShared {
    /// Called by the handler for each request, in order: the refusal for this request, if
    /// the gate replaced its head.
    pub fn next_request(&self) -> Option<ProxyError> {
        let seq = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let mut slot = self.reject.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some((s, e)) if s == seq => Some(e),
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Marks a request in progress until the guard drops (with its response body).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// A request in progress on this connection.
pub struct Busy(Arc<ConnShared>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_done_ms.store(now_ms(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Limits the gate enforces.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug)]
enum State {
    /// Waiting for a whole head.
    Head,
    Length(u64),
    Chunked(Chunked),
    /// After an upgrade request (or for h2): bytes pass unchecked.
    Passthrough,
    /// A synthetic request was handed over; nothing more is read.
    Refused,
    /// A chunked body broke; the connection is failing.
    Broken,
}

/// The client IO as hyper sees it.
pub struct Gate<IO> {
    io: IO,
    /// Read from the client, not yet handed over.
    buf: BytesMut,
    /// Checked bytes for hyper.
    out: Bytes,
    state: State,
    limits: GateLimits,
    shared: Arc<ConnShared>,
    /// Heads handed to hyper (refused ones included).
    heads: u64,
    /// Where the current head's deadline runs from: accept for the first head, its first
    /// byte for later ones.
    head_started: Option<Instant>,
    /// `now_ms()` when the gate last started waiting for a head.
    waiting_since_ms: u64,
    /// Bytes of `buf` already searched for the blank line.
    scanned: usize,
    eof: bool,
    sleep: Pin<Box<Sleep>>,
    /// After a refusal, bytes still to drain before closing (`None`: not closing yet).
    lingering: Option<usize>,
}

impl<IO> Gate<IO> {
    /// A gate for an HTTP/1 connection accepted at `accepted`; `initial` holds bytes already
    /// read from it.
    pub fn new(
        io: IO,
        initial: BytesMut,
        limits: GateLimits,
        shared: Arc<ConnShared>,
        accepted: Instant,
    ) -> Self {
        Gate {
            io,
            buf: initial,
            out: Bytes::new(),
            state: State::Head,
            limits,
            shared,
            heads: 0,
            head_started: Some(accepted),
            waiting_since_ms: now_ms(),
            scanned: 0,
            eof: false,
            sleep: Box::pin(tokio::time::sleep_until(
                accepted + limits.header_read_timeout,
            )),
            lingering: None,
        }
    }

    /// Replays `initial`, then passes everything through (h2c after its preface was read).
    pub fn passthrough(io: IO, initial: BytesMut) -> Self {
        let limits = GateLimits {
            max_header_bytes: 0,
            max_headers: 0,
            header_read_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
        };
        let mut g = Gate::new(io, initial, limits, Default::default(), Instant::now());
        g.state = State::Passthrough;
        g
    }

    fn refuse(&mut self, e: ProxyError) {
        self.heads += 1;
        *self.shared.reject.lock().unwrap_or_else(|p| p.into_inner()) = Some((self.heads, e));
        self.out = Bytes::from_static(SYNTHETIC);
        self.buf = BytesMut::new();
        self.state = State::Refused;
    }

    fn start_waiting(&mut self) {
        self.state = State::Head;
        self.head_started = None;
        self.waiting_since_ms = now_ms();
        self.scanned = 0;
        if !self.buf.is_empty() {
            self.head_started = Some(Instant::now());
        }
    }

    /// One step of the head state: `Some(result)` to return, `None` to go on.
    fn head_step(&mut self) -> Option<io::Result<()>> {
        let from = self.scanned.saturating_sub(3);
        let found = self.buf[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| from + i + 4);
        self.scanned = self.buf.len();
        match found {
            Some(n) if n > self.limits.max_header_bytes => {
                self.refuse(HeadError::TooLarge(self.limits.max_header_bytes).into());
            }
            Some(n) => {
                let head = self.buf.split_to(n).freeze();
                match check_head(&head, self.limits.max_headers) {
                    Ok(info) => {
                        self.heads += 1;
                        self.out = head;
                        if info.upgrade {
                            self.state = State::Passthrough;
                        } else {
                            match info.framing {
                                Framing::Empty => self.start_waiting(),
                                Framing::Length(n) => self.state = State::Length(n),
                                Framing::Chunked => self.state = State::Chunked(Chunked::default()),
                            }
                        }
                    }
                    Err(e) => self.refuse(e.into()),
                }
            }
            None if self.buf.len() > self.limits.max_header_bytes => {
                self.refuse(HeadError::TooLarge(self.limits.max_header_bytes).into());
            }
            None if self.eof => return Some(Ok(())),
            None => {}
        }
        None
    }
}

impl<IO: AsyncRead + Unpin> Gate<IO> {
    /// Reads more client bytes into `buf`.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Read into the buffer's spare capacity (tokio-util handles the uninitialized part,
        // so nothing is zeroed per read).
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => {
                if n == 0 {
                    self.eof = true;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// While waiting for a head and the socket has nothing: the deadline that applies, and
    /// what happens then (`true`: answer 408; `false`: close quietly).
    fn head_deadline(&self) -> (Instant, bool) {
        if let Some(started) = self.head_started {
            return (
                started + self.limits.header_read_timeout,
                !self.buf.is_empty(),
            );
        }
        let now = Instant::now();
        if self.shared.busy.load(Ordering::Relaxed) > 0 {
            return (now + self.limits.idle_timeout, false);
        }
        let since = self
            .waiting_since_ms
            .max(self.shared.last_done_ms.load(Ordering::Relaxed));
        let idle_ms = now_ms().saturating_sub(since);
        let left = self
            .limits
            .idle_timeout
            .saturating_sub(Duration::from_millis(idle_ms));
        (now + left, false)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gate<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(dst.remaining());
                dst.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match &mut this.state {
                State::Refused => return Poll::Pending,
                State::Broken => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed chunked body",
                    )));
                }
                State::Passthrough => {
                    if !this.buf.is_empty() {
                        this.out = this.buf.split().freeze();
                        continue;
                    }
                    return Pin::new(&mut this.io).poll_read(cx, dst);
                }
                // A body state with nothing buffered: read more (EOF ends the body here).
                State::Length(_) | State::Chunked(_) if this.buf.is_empty() => {
                    if this.eof {
                        return Poll::Ready(Ok(()));
                    }
                    match this.fill(cx) {
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                State::Length(left) => {
                    let take = (*left).min(this.buf.len() as u64) as usize;
                    *left -= take as u64;
                    this.out = this.buf.split_to(take).freeze();
                    if *left == 0 {
                        this.start_waiting();
                    }
                }
                State::Chunked(c) => {
                    match c.feed(&this.buf) {
                        Ok(n) => {
                            let done = c.is_done();
                            this.out = this.buf.split_to(n).freeze();
                            if done {
                                this.start_waiting();
                            }
                        }
                        Err(why) => {
                            tracing::debug!(why, "refusing a malformed chunked body");
                            // Hand over nothing of it: the request fails, the task never
                            // sees a body it could frame differently.
                            this.buf.clear();
                            this.state = State::Broken;
                        }
                    }
                }
                State::Head => {
                    if let Some(r) = this.head_step() {
                        return Poll::Ready(r);
                    }
                    if !matches!(this.state, State::Head) || !this.out.is_empty() {
                        continue;
                    }
                    match this.fill(cx) {
                        Poll::Ready(Ok(0)) => continue,
                        Poll::Ready(Ok(_)) => {
                            if this.head_started.is_none() {
                                this.head_started = Some(Instant::now());
                            }
                            continue;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                    let (deadline, answer) = this.head_deadline();
                    if Instant::now() >= deadline {
                        if answer {
                            this.refuse(ProxyError::HeadTimeout(this.limits.header_read_timeout));
                            continue;
                        }
                        // Nothing of a head arrived: close quietly.
                        this.eof = true;
                        this.buf.clear();
                        return Poll::Ready(Ok(()));
                    }
                    if this.sleep.deadline() != deadline {
                        this.sleep.as_mut().reset(deadline);
                    }
                    if this.sleep.as_mut().poll(cx).is_ready() {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Gate<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.lingering.is_none() {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            if !matches!(this.state, State::Refused) {
                return Poll::Ready(Ok(()));
            }
            // Lingering close after a refusal: read and drop what the client still sends,
            // so closing with unread data does not reset the connection and destroy the
            // answer before the client has read it.
            this.lingering = Some(LINGER_BYTES);
            this.sleep.as_mut().reset(Instant::now() + LINGER_TIME);
        }
        let mut scratch = [0u8; 4096];
        while let Some(left) = this.lingering.filter(|l| *l > 0) {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    this.lingering = Some(left.saturating_sub(rb.filled().len()));
                }
                Poll::Ready(_) => break,
                Poll::Pending => {
                    if this.sleep.as_mut().poll(cx).is_ready() {
                        break;
                    }
                    return Poll::Pending;
                }
            }
        }
        this.lingering = Some(0);
        Poll::Ready(Ok(()))
    }
}
