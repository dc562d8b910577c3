//! Body wrappers: bodies stream frame by frame in both directions, never buffered whole. The
//! request wrapper enforces `max_body_bytes` and remembers whether the client's body broke;
//! the response wrapper counts bytes, holds the per-request guards until the last frame, and
//! hands the upstream connection back to the pool when the body has been read to its end.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use prometheus::IntCounter;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends either way.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete, in-memory body (proxy answers).
pub fn full(b: Bytes) -> Body {
    http_body_util::Full::new(b)
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// What went wrong with a client's request body, read after the upstream exchange failed.
#[derive(Debug, Default)]
pub struct BodyFlags {
    pub too_large: AtomicBool,
    pub broken: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
struct TooLarge(u64);

/// The client's body on its way to a task.
pub struct RequestBody {
    inner: Incoming,
    /// 0 = unlimited.
    limit: u64,
    seen: u64,
    flags: Arc<BodyFlags>,
    rx: IntCounter,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, flags: Arc<BodyFlags>, rx: IntCounter) -> Self {
        RequestBody {
            inner,
            limit,
            seen: 0,
            flags,
            rx,
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    this.rx.inc_by(d.len() as u64);
                    if this.limit > 0 && this.seen > this.limit {
                        this.flags.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(TooLarge(this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.flags.broken.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            other => other.map_err(|e| -> BoxError { Box::new(e) }),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Run once when a response body has been read to its end (not when it is abandoned).
pub type OnEnd = Box<dyn FnOnce() + Send>;

/// A task's response on its way to the client.
pub struct ResponseBody {
    inner: Incoming,
    tx: IntCounter,
    on_end: Option<OnEnd>,
    /// Dropped with the body: the task's in-flight count, the connection's busy mark.
    _guards: Box<dyn Send>,
}

impl ResponseBody {
    pub fn new(
        inner: Incoming,
        tx: IntCounter,
        on_end: Option<OnEnd>,
        guards: Box<dyn Send>,
    ) -> Self {
        ResponseBody {
            inner,
            tx,
            on_end,
            _guards: guards,
        }
    }

    fn ended(&mut self) {
        if let Some(f) = self.on_end.take() {
            f()
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.tx.inc_by(d.len() as u64);
                }
                if this.inner.is_end_stream() {
                    this.ended();
                }
            }
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Err(_))) => this.on_end = None,
            Poll::Pending => {}
        }
        r.map_err(|e| -> BoxError { Box::new(e) })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, 304) are never polled.
        if self.inner.is_end_stream() {
            self.ended();
        }
    }
}
