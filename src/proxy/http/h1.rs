//! The exchange pipeline for HTTP/1.x clients, whatever their transport (plain TCP, TLS
//! terminated here, after a PROXY header): one loop per client connection reads a head,
//! checks it with the codec, routes it, picks a task, connects (the retry rules of
//! `upstream::Attempts`), sends the rewritten head and body, relays the response, and keeps
//! or closes the connection. Everything HTTP/1.x is handled here:
//!
//! - heads: refused ones get 400 (405 for CONNECT, 431 over the limits, 408 when not
//!   received within `header_read_timeout`) and the connection closes; pipelined heads are
//!   served one after the other, in order;
//! - bodies of any size stream: one of up to [`MAX_HELD_BODY`] is read whole before the
//!   request goes out (so an idempotent request can be sent again), a larger one streams
//!   and is never replayed; `max_body_bytes` answers 413 (declared, or found while reading)
//!   and closes; `Expect: 100-continue` is answered by the proxy before it reads the body;
//! - HTTP/1.0 clients: keep-alive only when asked for; a chunked response reaches them
//!   decoded and delimited by closing;
//! - upgrades: the 101 is relayed, then bytes go both ways (splice(2) on plain TCP);
//! - h2c tasks: the request goes through hyper's client, the body pumped by this loop.
//!
//! The task connection of the last request is kept for the next one (no pool round trip
//! for steady keep-alive traffic) and goes back to the pool when the client leaves.

use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::{Request, Uri};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::body::{self, ChannelBody, ChannelItem};
use super::client::Client;
use super::errors::ProxyError;
use super::exchange::{
    self, AccessInfo, Answered, BodyFailure, ClientHop, Failed, H1Request, Held, Rest, account,
    hash_of, log_answer, task_error,
};
use super::meters::ServiceMeters;
use crate::config::UpstreamProtocol;
use crate::protocol::http1::body::{LAST_CHUNK, chunk_header};
use crate::protocol::http1::editor::{self, HeaderSink, ResponseFraming};
use crate::protocol::http1::request::{self, Limits};
use crate::protocol::http1::response::ResponseRules;
use crate::protocol::http1::{BodyError, BodyReader, Framing, Version};
use crate::proxy::ListenerCtx;
use crate::proxy::buffers;
use crate::proxy::socket::{read_some, write_all};
use crate::proxy::tcp::HalfClose;
use crate::proxy::upstream::{Attempts, ClosedEarly, Connected};
use crate::snapshot::{Service, Task};

/// Request bodies up to this size are read whole before the request goes out (so an
/// idempotent request can be sent again); larger ones stream and are not replayed.
pub const MAX_HELD_BODY: usize = 64 * 1024;
/// Read buffer growth while reading heads.
const HEAD_CHUNK: usize = 16 * 1024;
/// Read buffer growth while streaming bodies.
const BODY_CHUNK: usize = 64 * 1024;
/// Header storage kept on the stack up to this many fields (`max_headers`).
const STACK_FIELDS: usize = 128;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How a connection goes on after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Keep,
    Close,
    /// Close, reading (and dropping) what the client still sends first.
    Linger,
}

impl Next {
    /// After an answer: `client_ok` the client's side is fine, `close` either side asked to
    /// close, `unfinished` the client has not sent all of its request body.
    fn after(client_ok: bool, close: bool, unfinished: bool) -> Next {
        match (client_ok, close, unfinished) {
            (false, _, _) => Next::Close,
            (true, _, true) => Next::Linger,
            (true, true, false) => Next::Close,
            (true, false, false) => Next::Keep,
        }
    }
}

/// What preparing a head decided; owns everything the exchange needs (the head's bytes
/// are gone from the buffer by then).
struct Req {
    head_len: usize,
    framing: Framing,
    version: Version,
    keep_alive: bool,
    idempotent: bool,
    head_method: bool,
    /// The Upgrade value of a protocol switch.
    upgrade: Option<Vec<u8>>,
    expect_continue: bool,
    svc: Result<Arc<Service>, (ProxyError, String)>,
    hash: Option<u64>,
    info: AccessInfo,
    /// For an h2c task: the request as hyper sends it (the body comes separately).
    h2c: Option<hyper::http::request::Parts>,
    /// An ACME http-01 validation this node answers itself: the key authorization.
    acme_answer: Option<String>,
}

/// A request whose service is chosen and whose body's first bytes are held in `out`:
/// what [`H1::forward_h1`] and [`H1::forward_h2c`] take.
struct Forward<'a> {
    svc: &'a Service,
    meters: &'a ServiceMeters,
    body: BodyReader,
    /// The whole body is held.
    complete: bool,
    started: Instant,
}

/// One client connection.
struct H1<'a> {
    ctx: &'a ListenerCtx,
    client: Client,
    hop: ClientHop,
    /// From the client, not yet used.
    buf: BytesMut,
    /// To the task: the rewritten head and the held body.
    out: Vec<u8>,
    /// To the client: the rewritten response head and body bytes.
    resp: Vec<u8>,
    /// From the task.
    rbuf: BytesMut,
    held: Option<Held>,
    /// The handles of the last service served.
    meters: Option<Arc<ServiceMeters>>,
}

/// Serves HTTP/1.x requests on `client` until it closes; `buf` holds bytes already read,
/// the connection was accepted at `accepted` (the first head is due within
/// `header_read_timeout` of it).
///
/// Not an `async fn`: the connection's state is built first and the future holds it once
/// (an `async fn` would keep its arguments beside the state built from them, for the
/// connection's whole life).
pub fn serve<'a>(
    ctx: &'a ListenerCtx,
    client: Client,
    hop: ClientHop,
    buf: BytesMut,
    accepted: Instant,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    let mut c = H1 {
        ctx,
        client,
        hop,
        buf,
        // Taken from the worker's pool per request (buffers.rs), none while idle.
        out: Vec::new(),
        resp: Vec::new(),
        rbuf: BytesMut::new(),
        held: None,
        meters: None,
    };
    async move {
        let next = c.run(accepted).await;
        if let Some(h) = c.held.take() {
            h.release();
        }
        match next {
            Next::Linger => c.client.linger_close().await,
            _ => c.client.finish().await,
        }
    }
}

/// Whether `buf` holds the end of a head at or after `from` (a blank line, CRLF or bare
/// LF: the codec decides which it accepts).
fn head_end_seen(buf: &[u8], from: usize) -> bool {
    let from = from.saturating_sub(3);
    let tail = &buf[from..];
    memchr::memchr_iter(b'\n', tail).any(|i| match tail.get(i + 1) {
        Some(b'\n') => true,
        Some(b'\r') => tail.get(i + 2) == Some(&b'\n'),
        _ => false,
    })
}

impl H1<'_> {
    fn meters(&mut self, service: &str) -> Arc<ServiceMeters> {
        match &self.meters {
            Some(m) if m.service == service => m.clone(),
            _ => {
                let m = self
                    .ctx
                    .http_meters
                    .get(&self.ctx.metrics, &self.ctx.name, service);
                self.meters = Some(m.clone());
                m
            }
        }
    }

    /// The request loop.
    async fn run(&mut self, accepted: Instant) -> Next {
        let ctx = self.ctx;
        let limits = Limits {
            max_header_bytes: ctx.http.max_header_bytes,
            max_headers: ctx.http.max_headers,
        };
        let mut head_started = Some(accepted);
        let mut scanned = 0usize;
        loop {
            // Bytes until a head may be whole.
            if !head_end_seen(&self.buf, scanned) && self.buf.len() <= limits.max_header_bytes {
                scanned = self.buf.len();
                let (deadline, partial) = match head_started {
                    Some(t) => (t + ctx.http.header_read_timeout, true),
                    None => (Instant::now() + ctx.http.idle_timeout, false),
                };
                let empty = self.buf.is_empty();
                if empty {
                    // Between requests: hold no buffer while the client idles.
                    self.release_buffers();
                }
                let read = tokio::select! {
                    r = tokio::time::timeout_at(deadline, self.client.read_some(&mut self.buf, HEAD_CHUNK)) => r,
                    // Draining: a connection between requests has nothing to finish.
                    _ = ctx.drain.cancelled(), if empty && !partial => return Next::Close,
                    // One waiting for its first request gets a grace (it may be on the way).
                    _ = ctx.drain_grace_over(), if empty && partial => return Next::Close,
                };
                match read {
                    Err(_) if partial && !self.buf.is_empty() => {
                        let e = ProxyError::HeadTimeout(ctx.http.header_read_timeout);
                        return Box::pin(self.refuse(e, head_started.unwrap_or(deadline))).await;
                    }
                    Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return Next::Close,
                    Ok(Ok(_)) => {
                        if head_started.is_none() {
                            head_started = Some(Instant::now());
                        }
                    }
                }
                continue;
            }
            let started = head_started.unwrap_or_else(Instant::now);
            // The head, parsed once: everything the exchange needs is taken from it. In a block
            // of its own, so that the parse's room is not kept in the connection's future
            // while the exchange runs.
            let req = {
                let prepared = {
                    let mut stack =
                        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_FIELDS];
                    let mut heap;
                    let storage: &mut [MaybeUninit<httparse::Header<'_>>] =
                        if limits.max_headers <= STACK_FIELDS {
                            &mut stack[..limits.max_headers]
                        } else {
                            heap = request::storage(limits.max_headers);
                            &mut heap
                        };
                    buffers::take_write(&mut self.out);
                    match request::parse(&self.buf, &limits, storage) {
                        Ok(Some(head)) => {
                            let client = &self.client;
                            if head.host.is_none() && head.target_authority().is_none() {
                                self.hop.resolve_local(|| client.local_addr());
                            }
                            let req = prepare(ctx, &self.hop, &head, &mut self.out);
                            if req
                                .svc
                                .as_ref()
                                .is_ok_and(|s| s.settings.send_proxy.is_some())
                            {
                                self.hop.resolve_local(|| client.local_addr());
                            }
                            Ok(req)
                        }
                        Ok(None) => Err(None),
                        Err(e) => Err(Some(ProxyError::from(e))),
                    }
                };
                match prepared {
                    Ok(r) => r,
                    // A blank line the head does not end at (leading empty lines): read on.
                    Err(None) => {
                        scanned = self.buf.len();
                        continue;
                    }
                    // Boxed: a refusal's state is not held by every connection's future.
                    Err(Some(e)) => return Box::pin(self.refuse(e, started)).await,
                }
            };
            scanned = 0;
            buffers::take_write(&mut self.resp);
            // Boxed: an exchange's state lives while it runs, not in every idle
            // connection's future.
            let next = {
                let exchanging = Box::pin(self.exchange(req, started));
                exchanging.await
            };
            match next {
                Next::Keep if !ctx.drain.is_cancelled() => {}
                Next::Keep => return Next::Close,
                other => return other,
            }
            head_started = (!self.buf.is_empty()).then(Instant::now);
        }
    }

    /// Gives the connection's empty buffers back to the worker's pool.
    fn release_buffers(&mut self) {
        buffers::give_read(&mut self.buf);
        buffers::give_read(&mut self.rbuf);
        buffers::give_write(&mut self.out);
        buffers::give_write(&mut self.resp);
    }

    /// Answers a refused head and closes: the connection's framing is lost.
    async fn refuse(&mut self, e: ProxyError, started: Instant) -> Next {
        let service = self.ctx.service_label().to_string();
        let _ = self.client.write_all(&e.http1(&service, true)).await;
        self.account_answer(&service, &e, started, None, &AccessInfo::default());
        Next::Linger
    }

    /// Counts and logs the proxy's own answer `e` to a request (or a refused head).
    fn account_answer(
        &mut self,
        service: &str,
        e: &ProxyError,
        started: Instant,
        task: Option<&Task>,
        info: &AccessInfo,
    ) {
        let meters = self.meters(service);
        let status = e.status().as_u16();
        account(
            self.ctx,
            &meters,
            self.hop.peer,
            status,
            started,
            task,
            info,
        );
    }

    /// Answers `e` for a request whose head was taken (body perhaps unread): closes when
    /// the client asked to or the body was not read.
    async fn answer(
        &mut self,
        e: ProxyError,
        service: &str,
        req: &Req,
        body_read: bool,
        started: Instant,
        task: Option<&Task>,
    ) -> Next {
        log_answer(self.ctx, service, self.hop.peer, &e);
        let close = !req.keep_alive || !body_read || e.closes() || self.ctx.drain.is_cancelled();
        let ok = self
            .client
            .write_all(&e.http1(service, close))
            .await
            .is_ok();
        self.account_answer(service, &e, started, task, &req.info);
        match (ok, close) {
            (true, false) => Next::Keep,
            (true, true) if !body_read || e.closes() => Next::Linger,
            _ => Next::Close,
        }
    }

    /// One request: its body, the task, the response.
    async fn exchange(&mut self, mut req: Req, started: Instant) -> Next {
        self.buf.advance(req.head_len);
        if let Some(answer) = req.acme_answer.take() {
            return self.answer_acme(&req, &answer, started).await;
        }
        let svc =
            match std::mem::replace(&mut req.svc, Err((ProxyError::NoLiveTask, String::new()))) {
                Ok(s) => s,
                Err((e, label)) => {
                    let body_read = req.framing == Framing::Empty;
                    return self.answer(e, &label, &req, body_read, started, None).await;
                }
            };
        let name = svc.name.as_str();
        let limit = self.ctx.http.max_body_bytes;
        if limit > 0 && matches!(req.framing, Framing::Length(n) if n > limit) {
            return self
                .answer(
                    ProxyError::BodyTooLarge(limit),
                    name,
                    &req,
                    false,
                    started,
                    None,
                )
                .await;
        }
        if req.expect_continue
            && req.framing != Framing::Empty
            && self.client.write_all(CONTINUE).await.is_err()
        {
            return Next::Close;
        }
        let mut body = BodyReader::new(req.framing);
        let complete = match self.hold_body(&mut body, req.framing, limit).await {
            Ok(c) => c,
            Err(Some(e)) => return self.answer(e, name, &req, false, started, None).await,
            Err(None) => return Next::Close,
        };
        let meters = self.meters(name);
        let forward = Forward {
            svc: &svc,
            meters: &meters,
            body,
            complete,
            started,
        };
        match svc.settings.upstream_protocol {
            UpstreamProtocol::Http1 => self.forward_h1(&req, forward).await,
            UpstreamProtocol::H2c => self.forward_h2c(&mut req, forward).await,
        }
    }

    /// Answers an http-01 validation request (GET or HEAD without a body) with the key
    /// authorization of its token, whichever node ordered it.
    async fn answer_acme(&mut self, req: &Req, answer: &str, started: Instant) -> Next {
        let close = !req.keep_alive || self.ctx.drain.is_cancelled();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            answer.len(),
            if close { "connection: close\r\n" } else { "" }
        )
        .into_bytes();
        if !req.head_method {
            out.extend_from_slice(answer.as_bytes());
        }
        let ok = self.client.write_all(&out).await.is_ok();
        tracing::info!(listener = %self.ctx.name, client = %self.hop.peer, "answered an ACME http-01 validation");
        let meters = self.meters("");
        account(
            self.ctx,
            &meters,
            self.hop.peer,
            200,
            started,
            None,
            &req.info,
        );
        if ok && !close {
            Next::Keep
        } else {
            Next::Close
        }
    }

    /// Moves the body's first bytes from the client buffer to `out` (after the head): all
    /// of it when it fits in [`MAX_HELD_BODY`] (returns `true`), else what has arrived.
    /// `Err(Some)`: the answer (413, 400); `Err(None)`: the client left.
    async fn hold_body(
        &mut self,
        body: &mut BodyReader,
        framing: Framing,
        limit: u64,
    ) -> Result<bool, Option<ProxyError>> {
        let hold_all = match framing {
            Framing::Empty | Framing::Close => return Ok(true),
            Framing::Length(n) => n as usize <= MAX_HELD_BODY,
            Framing::Chunked => true,
        };
        let start = self.out.len();
        loop {
            let n = body.relay(&self.buf).map_err(malformed)?;
            self.out.extend_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            if limit > 0 && body.data_len() > limit {
                return Err(Some(ProxyError::BodyTooLarge(limit)));
            }
            if body.is_done() {
                return Ok(true);
            }
            if !hold_all || self.out.len() - start > MAX_HELD_BODY {
                return Ok(false);
            }
            if !self.read_client(BODY_CHUNK).await {
                return Err(None);
            }
        }
    }

    /// Reads more from the client within `idle_timeout`; `false` when it left or idled.
    async fn read_client(&mut self, grow: usize) -> bool {
        let idle = self.ctx.http.idle_timeout;
        matches!(
            tokio::time::timeout(idle, self.client.read_some(&mut self.buf, grow)).await,
            Ok(Ok(n)) if n > 0
        )
    }

    /// Sends the request in `out` (and the rest of a streaming body) to an HTTP/1.1 task,
    /// then relays the response.
    async fn forward_h1(&mut self, req: &Req, forward: Forward<'_>) -> Next {
        let Forward { svc, meters, .. } = forward;
        let (mut body, complete, started) = (forward.body, forward.complete, forward.started);
        let ctx = self.ctx;
        let name = svc.name.as_str();
        let limit = ctx.http.max_body_bytes;
        let proxy_header = self.hop.proxy_header(&svc.settings);
        let request = H1Request {
            out: &self.out,
            replayable: req.idempotent && complete,
            fresh_only: req.upgrade.is_some(),
            proxy_header: proxy_header.as_deref(),
            rules: ResponseRules {
                head_request: req.head_method,
                client_close: !req.keep_alive || ctx.drain.is_cancelled(),
                client_http10: req.version == Version::Http10,
                upgrade: req.upgrade.is_some(),
            },
        };
        let mut rest = if complete {
            Rest::Done
        } else {
            Rest::Client {
                client: &mut self.client,
                buf: &mut self.buf,
                body: &mut body,
                idle: ctx.http.idle_timeout,
            }
        };
        let sent = exchange::to_h1_task(
            svc,
            &ctx.metrics,
            req.hash,
            &request,
            &mut rest,
            limit,
            &meters.rx,
            &mut self.held,
            &mut self.resp,
            &mut self.rbuf,
        )
        .await;
        drop(rest);
        let Answered {
            task,
            in_flight,
            mut up,
            head,
            unfinished,
            pending,
        } = match sent {
            Ok(a) => a,
            Err(Failed::Answer(e)) => {
                return self.answer(e, name, req, complete, started, None).await;
            }
            Err(Failed::Body(BodyFailure::Refused(e), task)) => {
                return self.answer(e, name, req, false, started, Some(&task)).await;
            }
            Err(Failed::Body(BodyFailure::Gone, _)) => return Next::Close,
        };
        if head.switching {
            // 101: the head, what followed it, then bytes both ways.
            self.resp.extend_from_slice(&self.rbuf);
            let ok = self.client.write_all(&self.resp).await.is_ok()
                && write_all(&up, &self.buf).await.is_ok();
            account(
                ctx,
                meters,
                self.hop.peer,
                101,
                started,
                Some(&task),
                &req.info,
            );
            if ok {
                self.buf.clear();
                let hc = HalfClose {
                    timeout: svc.settings.half_close_timeout,
                    metrics: &ctx.metrics,
                    listener: &ctx.name,
                    service: name,
                };
                self.client
                    .tunnel(&mut up, &meters.rx, &meters.tx, &hc)
                    .await;
            }
            drop(in_flight);
            return Next::Close;
        }
        let (mut reusable, client_ok) = self.relay(&up, &head, meters).await;
        let mut unfinished = unfinished;
        if unfinished && client_ok && !head.close {
            // The task answered before the body's end (nginx's `return`, an early 4xx):
            // the rest still goes to it, so both connections stay in step.
            let mut rest = Rest::Client {
                client: &mut self.client,
                buf: &mut self.buf,
                body: &mut body,
                idle: ctx.http.idle_timeout,
            };
            unfinished = !rest.finish(&up, pending, limit, &meters.rx).await;
            reusable &= !unfinished;
        }
        drop(in_flight);
        if reusable && !unfinished {
            self.held = Some(Held {
                addr: task.addr,
                stream: up,
                poolable: proxy_header.is_none(),
            });
        }
        account(
            ctx,
            meters,
            self.hop.peer,
            head.code,
            started,
            Some(&task),
            &req.info,
        );
        Next::after(client_ok, head.close, unfinished)
    }

    /// Relays a response body to the client after its head (rewritten into `resp`; the
    /// bytes after it in `rbuf`).
    /// Returns whether the task connection can be kept and whether the client's is fine.
    async fn relay(
        &mut self,
        up: &TcpStream,
        head: &crate::protocol::http1::ResponseHead,
        meters: &ServiceMeters,
    ) -> (bool, bool) {
        let mut reader = BodyReader::new(head.framing);
        let mut tx = 0u64;
        let mut client_ok = true;
        let mut cut = false;
        loop {
            // Bytes at the front of rbuf that belong to the body, into resp.
            let before = self.resp.len();
            let taken = if head.decode {
                let resp = &mut self.resp;
                reader.advance(&self.rbuf, |d| resp.extend_from_slice(d))
            } else {
                reader.relay(&self.rbuf).inspect(|&n| {
                    self.resp.extend_from_slice(&self.rbuf[..n]);
                })
            };
            let Ok(n) = taken else {
                cut = true;
                break;
            };
            self.rbuf.advance(n);
            tx += (self.resp.len() - before) as u64;
            if !self.resp.is_empty() {
                if self.client.write_all(&self.resp).await.is_err() {
                    client_ok = false;
                    break;
                }
                self.resp.clear();
            }
            if reader.is_done() {
                break;
            }
            match read_some(up, &mut self.rbuf, BODY_CHUNK).await {
                Ok(n) if n > 0 => {}
                // EOF ends a close-delimited body.
                Ok(_) if reader.until_close() => break,
                // Anything else was cut short: the client learns it from the close.
                _ => {
                    cut = true;
                    break;
                }
            }
        }
        meters.tx.inc_by(tx);
        let reusable =
            client_ok && !cut && reader.is_done() && head.reusable && self.rbuf.is_empty();
        (reusable, client_ok && !cut)
    }

    /// Sends the request to an h2c task through hyper (body held, or pumped from the
    /// client as it arrives), then writes the response for this HTTP/1.x client.
    async fn forward_h2c(&mut self, req: &mut Req, forward: Forward<'_>) -> Next {
        let Forward { svc, meters, .. } = forward;
        let (mut body, complete, started) = (forward.body, forward.complete, forward.started);
        let ctx = self.ctx;
        let name = svc.name.as_str();
        let settings = &svc.settings;
        let Some(parts) = req.h2c.take() else {
            return Next::Close;
        };
        // The held bytes as data (a chunked body decoded).
        let mut held = Vec::with_capacity(self.out.len());
        {
            let mut decoder = BodyReader::new(req.framing);
            let _ = decoder.advance(&self.out, |d| held.extend_from_slice(d));
        }
        let held = Bytes::from(held);
        meters.rx.inc_by(held.len() as u64);
        let replayable = req.idempotent && complete;
        let proxy_header = self.hop.proxy_header(settings);
        let limit = ctx.http.max_body_bytes;
        let mut attempts = Attempts::new(svc, &ctx.metrics, req.hash);
        let deadline = Instant::now() + settings.request_timeout;
        let mut pumped = false;
        let outcome = loop {
            let next =
                exchange::next_h2c(&mut attempts, settings, proxy_header.as_deref(), deadline);
            let Connected {
                task,
                in_flight,
                conn: mut sender,
                reused,
            } = match next.await {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            if pumped {
                // The body went to an earlier attempt: it is gone.
                break Err(ProxyError::UpstreamFailed {
                    attempts: attempts.count(),
                    last: "request body already sent".into(),
                });
            }
            let (body_out, mut feed) = if complete {
                (body::full(held.clone()), None)
            } else {
                let (tx, rx) = mpsc::channel::<ChannelItem>(4);
                let _ = tx.try_send(Ok(held.clone()));
                (ChannelBody::new(rx).boxed_unsync(), Some(tx))
            };
            let request = Request::from_parts(parts.clone(), body_out);
            if sender.ready().await.is_err() {
                attempts.not_sent(reused, task_error(&task, "h2c connection closed"));
                continue;
            }
            let send = sender.try_send_request(request);
            tokio::pin!(send);
            let sent_at = Instant::now();
            let result = loop {
                let pumping = feed.is_some();
                tokio::select! {
                    r = tokio::time::timeout_at(deadline, &mut send) => break r,
                    more = self.pump_channel(&mut body, limit, meters), if pumping => {
                        pumped = true;
                        match more {
                            Ok(Some(data)) => {
                                if let Some(tx) = &feed && tx.send(Ok(data)).await.is_err() {
                                    feed = None;
                                }
                            }
                            Ok(None) => feed = None,
                            Err(e) => {
                                if let Some(tx) = feed.take() {
                                    let _ = tx.send(Err(Box::new(std::io::Error::other(e.to_string())))).await;
                                }
                                return self.answer(e, name, req, false, started, Some(&task)).await;
                            }
                        }
                    }
                }
            };
            match result {
                Err(_) => break Err(ProxyError::Timeout(settings.request_timeout)),
                Ok(Ok(resp)) => break Ok((task, in_flight, resp, sent_at, feed)),
                Ok(Err(mut e)) => {
                    if e.take_message().is_some() {
                        attempts.not_sent(reused, task_error(&task, "h2c connection closed"));
                        continue;
                    }
                    let e = e.into_error();
                    let why = task_error(&task, &e);
                    let msg = why.to_string();
                    if attempts.closed_early(&task, replayable, reused, why) == ClosedEarly::Fail {
                        break Err(ProxyError::UpstreamFailed {
                            attempts: attempts.count(),
                            last: msg,
                        });
                    }
                }
            }
        };
        let (task, in_flight, resp, sent_at, mut feed) = match outcome {
            Ok(o) => o,
            Err(e) => return self.answer(e, name, req, complete, started, None).await,
        };
        task.state
            .observe_latency_us(sent_at.elapsed().as_micros().max(1) as u64);
        // The response, for an HTTP/1.x client.
        let (parts, mut rbody) = resp.into_parts();
        let code = parts.status.as_u16();
        let empty = req.head_method || code == 204 || code == 304 || (100..200).contains(&code);
        let length = parts.headers.contains_key(header::CONTENT_LENGTH);
        let http10 = req.version == Version::Http10;
        let chunked = !empty && !length && !http10;
        let close_delimited = !empty && !length && http10;
        let close =
            !req.keep_alive || close_delimited || ctx.drain.is_cancelled() || feed.is_some();
        self.resp.clear();
        crate::protocol::http1::response::ResponseSink::status_line(
            &mut self.resp,
            code,
            parts.status.canonical_reason().unwrap_or("").as_bytes(),
        );
        editor::response_fields(
            editor::map_fields(&parts.headers).into_iter(),
            ResponseFraming {
                keep_te: false,
                keep_length: length,
            },
            b"2",
            &mut self.resp,
        );
        if chunked {
            self.resp.field(b"transfer-encoding", b"chunked");
        }
        if close {
            self.resp.field(b"connection", b"close");
        } else if http10 {
            self.resp.field(b"connection", b"keep-alive");
        }
        self.resp.extend_from_slice(b"\r\n");
        let mut client_ok = true;
        let mut tx = 0u64;
        if !empty {
            loop {
                let frame = tokio::select! {
                    f = rbody.frame() => f,
                    more = self.pump_channel(&mut body, limit, meters), if feed.is_some() => {
                        match more {
                            Ok(Some(data)) => {
                                if let Some(t) = &feed && t.send(Ok(data)).await.is_err() { feed = None; }
                            }
                            _ => feed = None,
                        }
                        continue;
                    }
                };
                match frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            tx += d.len() as u64;
                            if chunked {
                                if !d.is_empty() {
                                    chunk_header(d.len(), &mut self.resp);
                                    self.resp.extend_from_slice(d);
                                    self.resp.extend_from_slice(b"\r\n");
                                }
                            } else {
                                self.resp.extend_from_slice(d);
                            }
                        }
                    }
                    Some(Err(_)) => {
                        client_ok = false;
                        break;
                    }
                    None => {
                        if chunked {
                            self.resp.extend_from_slice(LAST_CHUNK);
                        }
                        break;
                    }
                }
                if self.client.write_all(&self.resp).await.is_err() {
                    client_ok = false;
                    break;
                }
                self.resp.clear();
            }
        }
        if client_ok && !self.resp.is_empty() {
            client_ok = self.client.write_all(&self.resp).await.is_ok();
        }
        drop(in_flight);
        let _ = rbody.is_end_stream();
        meters.tx.inc_by(tx);
        account(
            ctx,
            meters,
            self.hop.peer,
            code,
            started,
            Some(&task),
            &req.info,
        );
        Next::after(client_ok, close, feed.is_some())
    }

    /// The next piece of a streaming request body as data (`Ok(None)`: it ended).
    async fn pump_channel(
        &mut self,
        body: &mut BodyReader,
        limit: u64,
        meters: &ServiceMeters,
    ) -> Result<Option<Bytes>, ProxyError> {
        loop {
            if body.is_done() {
                return Ok(None);
            }
            if !self.buf.is_empty() {
                let mut data = Vec::new();
                let n = body
                    .advance(&self.buf, |d| data.extend_from_slice(d))
                    .map_err(|e| ProxyError::BadRequest(format!("request body: {e}")))?;
                self.buf.advance(n);
                if limit > 0 && body.data_len() > limit {
                    return Err(ProxyError::BodyTooLarge(limit));
                }
                if !data.is_empty() {
                    meters.rx.inc_by(data.len() as u64);
                    return Ok(Some(Bytes::from(data)));
                }
                if body.is_done() {
                    return Ok(None);
                }
            }
            if !self.read_client(BODY_CHUNK).await {
                return Err(ProxyError::BadRequest("request body cut short".into()));
            }
        }
    }
}

fn malformed(e: BodyError) -> Option<ProxyError> {
    Some(ProxyError::BadRequest(format!("request body: {e}")))
}

/// The key authorization to answer for `GET /.well-known/acme-challenge/TOKEN` when the
/// snapshot holds that token (other tokens go to the routed service, which may run its own
/// ACME client).
fn acme_http01(ctx: &ListenerCtx, method: &str, path: &str) -> Option<String> {
    const PREFIX: &str = "/.well-known/acme-challenge/";
    let token = path.strip_prefix(PREFIX)?;
    if method != "GET" && method != "HEAD" {
        return None;
    }
    let token = token.split(['?', '#']).next().unwrap_or(token);
    ctx.snapshot.load().acme.http01.get(token).cloned()
}

/// Takes what the exchange needs from a checked head, routes it, and writes the head for
/// an HTTP/1.1 task into `out` (or builds the request for an h2c task).
fn prepare(
    ctx: &ListenerCtx,
    hop: &ClientHop,
    head: &request::RequestHead<'_, '_>,
    out: &mut Vec<u8>,
) -> Req {
    let authority = head.target_authority();
    let host_str = authority.or_else(|| head.host.and_then(|h| std::str::from_utf8(h).ok()));
    let path = head.path();
    let acme_answer = (head.framing == Framing::Empty)
        .then(|| acme_http01(ctx, head.method, path))
        .flatten();
    let svc = exchange::route_request(ctx, host_str, path);
    let info = if ctx.access_log {
        AccessInfo {
            method: head.method.to_string(),
            host: host_str.map(str::to_string),
            path: path.to_string(),
        }
    } else {
        AccessInfo::default()
    };
    let mut req = Req {
        head_len: head.len,
        framing: head.framing,
        version: head.version,
        keep_alive: head.keep_alive,
        idempotent: head.idempotent(),
        head_method: head.method == "HEAD",
        upgrade: head.upgrade.map(<[u8]>::to_vec),
        expect_continue: head.expect_continue,
        hash: None,
        info,
        h2c: None,
        svc: Err((ProxyError::NoLiveTask, String::new())),
        acme_answer,
    };
    out.clear();
    if req.acme_answer.is_some() {
        return req;
    }
    let svc = match svc {
        Ok(s) => s,
        Err(e) => {
            req.svc = Err(e);
            return req;
        }
    };
    let settings = &svc.settings;
    req.hash = hash_of(
        settings,
        |name| {
            head.headers
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
                .map(|f| f.value)
        },
        hop.peer,
    );
    // The host the client asked for: the target's authority, else Host.
    let fwd_host: Option<&[u8]> = authority
        .map(str::as_bytes)
        .or(head.host)
        .filter(|h| !h.is_empty());
    let via = exchange::via_of(head.version);
    match settings.upstream_protocol {
        UpstreamProtocol::Http1 => {
            out.extend_from_slice(head.method.as_bytes());
            out.push(b' ');
            out.extend_from_slice(head.origin_target().as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            let fwd = hop.forwarding(fwd_host, authority.is_some(), via, head.upgrade);
            editor::request_fields(head.fields(), &fwd, out);
            if head.host.is_none() && authority.is_none() {
                // HTTP/1.0 without Host: HTTP/1.1 needs one; the address the client reached.
                out.field(b"host", hop.local().to_string().as_bytes());
            }
            if head.framing == Framing::Chunked {
                out.field(b"transfer-encoding", b"chunked");
            }
            out.extend_from_slice(b"\r\n");
        }
        UpstreamProtocol::H2c => {
            let mut headers = HeaderMap::new();
            let fwd = hop.forwarding(fwd_host, false, via, None);
            editor::request_fields(head.fields(), &fwd, &mut headers);
            headers.remove(header::HOST);
            let authority = fwd_host
                .and_then(|h| std::str::from_utf8(h).ok())
                .unwrap_or("localhost");
            let pq = PathAndQuery::try_from(head.origin_target())
                .unwrap_or_else(|_| PathAndQuery::from_static("/"));
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority)
                .path_and_query(pq.clone())
                .build()
                .unwrap_or_else(|_| Uri::from(pq));
            let mut r = Request::new(());
            *r.method_mut() =
                hyper::Method::from_bytes(head.method.as_bytes()).unwrap_or(hyper::Method::GET);
            *r.uri_mut() = uri;
            *r.version_mut() = hyper::Version::HTTP_2;
            *r.headers_mut() = headers;
            if let Framing::Length(n) = head.framing {
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            req.h2c = Some(r.into_parts().0);
        }
    }
    req.svc = Ok(svc);
    req
}
