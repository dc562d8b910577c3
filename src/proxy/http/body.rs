//! Bodies on the hyper side (HTTP/2 clients, h2c tasks); they stream frame by frame and are
//! never buffered whole:
//! - [`TaskBody`]: an HTTP/1.1 task's response body, read from its connection through the
//!   codec's framing and handed to an HTTP/2 client as data frames; a connection whose body
//!   was read to its end goes back to the pool;
//! - [`ChannelBody`]: an HTTP/1.1 client's request body, pumped by its connection's loop,
//!   going to an h2c task;
//! - [`Counted`]: a hyper body passed on with its bytes counted, `max_body_bytes` applied,
//!   and guards held until its end.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Frame, SizeHint};
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::pool::Pool;
use crate::protocol::http1::{BodyReader, Framing};
use crate::proxy::buffers;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy gives hyper.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete, in-memory body (proxy answers, held request bodies).
pub fn full(b: Bytes) -> Body {
    http_body_util::Full::new(b)
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BodyFailed(String);

fn failed(why: impl Into<String>) -> BoxError {
    Box::new(BodyFailed(why.into()))
}

/// An HTTP/1.1 task's response body for an HTTP/2 client.
pub struct TaskBody {
    stream: Option<TcpStream>,
    addr: SocketAddr,
    /// Bytes read from the task, not yet handed on (the head's tail first).
    buf: BytesMut,
    reader: BodyReader,
    chunked: bool,
    /// The connection may go back to the pool once the body ended.
    reusable: bool,
    tx: IntCounter,
    /// Dropped with the body: the task's in-flight count.
    _guards: Box<dyn Send>,
}

impl TaskBody {
    pub fn new(
        stream: TcpStream,
        addr: SocketAddr,
        buf: BytesMut,
        framing: Framing,
        reusable: bool,
        tx: IntCounter,
        guards: Box<dyn Send>,
    ) -> TaskBody {
        TaskBody {
            stream: Some(stream),
            addr,
            buf,
            reader: BodyReader::new(framing),
            chunked: framing == Framing::Chunked,
            reusable,
            tx,
            _guards: guards,
        }
    }

    fn end(&mut self, pool: bool) {
        if let Some(s) = self.stream.take()
            && pool
            && self.reusable
            && self.buf.is_empty()
        {
            Pool::global().checkin_h1(self.addr, s);
        }
        // The read buffer goes back to the worker's pool (unless a frame still shares it).
        buffers::give_read(&mut self.buf);
    }
}

/// Body bytes up to this size are copied into their frame, so the pooled read buffer stays
/// unshared and goes back to the pool at the end; larger runs are split off without a copy.
const COPY_MAX: usize = 8 * 1024;

impl hyper::body::Body for TaskBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.reader.is_done() {
                this.end(true);
                return Poll::Ready(None);
            }
            if !this.buf.is_empty() {
                let data = if this.chunked {
                    let mut data = BytesMut::new();
                    let n = match this
                        .reader
                        .advance(&this.buf, |d| data.extend_from_slice(d))
                    {
                        Ok(n) => n,
                        Err(e) => {
                            this.end(false);
                            return Poll::Ready(Some(Err(failed(e.to_string()))));
                        }
                    };
                    this.buf.advance(n);
                    data.freeze()
                } else {
                    let n = this.reader.relay(&this.buf).unwrap_or(0);
                    if n <= COPY_MAX {
                        let data = Bytes::copy_from_slice(&this.buf[..n]);
                        this.buf.advance(n);
                        data
                    } else {
                        this.buf.split_to(n).freeze()
                    }
                };
                if !data.is_empty() {
                    this.tx.inc_by(data.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if this.reader.is_done() {
                    continue;
                }
            }
            let Some(stream) = this.stream.as_ref() else {
                return Poll::Ready(Some(Err(failed("task connection gone"))));
            };
            if let Err(e) = ready!(stream.poll_read_ready(cx)) {
                this.end(false);
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            if this.buf.capacity() - this.buf.len() < 4096 {
                this.buf.reserve(32 * 1024);
            }
            match stream.try_read_buf(&mut this.buf) {
                Ok(0) if this.reader.until_close() => {
                    this.end(false);
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.end(false);
                    return Poll::Ready(Some(Err(failed("task closed mid-body"))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.end(false);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for TaskBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, 304) are never polled.
        if self.reader.is_done() {
            self.end(true);
        }
        buffers::give_read(&mut self.buf);
    }
}

/// What a channel body carries: data, or the reason the client's body broke.
pub type ChannelItem = Result<Bytes, BoxError>;

/// A request body fed through a channel by the client connection's loop.
pub struct ChannelBody {
    rx: mpsc::Receiver<ChannelItem>,
    done: bool,
}

impl ChannelBody {
    pub fn new(rx: mpsc::Receiver<ChannelItem>) -> ChannelBody {
        ChannelBody { rx, done: false }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(self.rx.poll_recv(cx)) {
            Some(Ok(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                self.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Set when a client's request body broke or went over `max_body_bytes` while a task
/// was reading it.
#[derive(Debug, Default)]
pub struct BodyFlags {
    pub too_large: AtomicBool,
    pub broken: AtomicBool,
}

/// A hyper body passed on: bytes counted, `limit` applied (0 = none), `guards` held until
/// the body is dropped.
pub struct Counted<B> {
    inner: B,
    limit: u64,
    seen: u64,
    counter: IntCounter,
    flags: Option<Arc<BodyFlags>>,
    _guards: Box<dyn Send>,
}

impl<B> Counted<B> {
    pub fn new(
        inner: B,
        counter: IntCounter,
        limit: u64,
        flags: Option<Arc<BodyFlags>>,
        guards: Box<dyn Send>,
    ) -> Counted<B> {
        Counted {
            inner,
            limit,
            seen: 0,
            counter,
            flags,
            _guards: guards,
        }
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    this.counter.inc_by(d.len() as u64);
                    if this.limit > 0 && this.seen > this.limit {
                        if let Some(f) = &this.flags {
                            f.too_large.store(true, Ordering::Relaxed);
                        }
                        return Poll::Ready(Some(Err(failed(format!(
                            "request body larger than {} bytes",
                            this.limit
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                if let Some(f) = &this.flags {
                    f.broken.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
