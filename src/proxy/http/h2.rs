//! HTTP/2 clients (h2c with prior knowledge, or ALPN h2 over TLS): hyper's server reads the
//! streams; each request goes through the same steps as an HTTP/1.x one (`exchange.rs`:
//! route, hash, pick, connect by the rules of `upstream::Attempts`) and the same codec
//! towards HTTP/1.1 tasks (the editor writes the head, the response head is parsed and
//! edited into a `HeaderMap`, the body is read through the codec's framing); h2c tasks get
//! it through hyper's client. Rapid reset (CVE-2023-44487) is bounded.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::{self, Body, BodyFlags, Counted, TaskBody};
use super::client::Client;
use super::errors::ProxyError;
use super::exchange::{
    self, AccessInfo, BodyFailure, ClientHop, Failed, H1Request, Rest, account, hash_of,
    log_answer, task_error,
};
use super::h1::MAX_HELD_BODY;
use super::meters::ServiceMeters;
use crate::config::UpstreamProtocol;
use crate::protocol::http1::response::ResponseRules;
use crate::protocol::http1::{HeaderSink, editor};
use crate::proxy::ListenerCtx;
use crate::proxy::upstream::{Attempts, ClosedEarly, Connected};
use crate::snapshot::{Service, Task};

/// The client's bytes read before hyper took over (the preface), then the client.
struct Prefixed {
    prefix: Bytes,
    io: Client,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        match &mut self.io {
            Client::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Client::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Client::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Client::Tcp(s) => s.is_write_vectored(),
            Client::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Client::Tcp(s) => Pin::new(s).poll_flush(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Client::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One HTTP/2 client connection, shared by its streams.
struct Conn {
    ctx: Arc<ListenerCtx>,
    hop: ClientHop,
}

/// Serves HTTP/2 on `client` (`prefix`: bytes already read) until it ends.
pub async fn serve(ctx: Arc<ListenerCtx>, client: Client, hop: ClientHop, prefix: BytesMut) {
    let limits = ctx.http.clone();
    let conn = Arc::new(Conn {
        ctx: ctx.clone(),
        hop,
    });
    let peer = conn.hop.peer;
    let service = service_fn(move |req| {
        let conn = conn.clone();
        // Boxed: hyper spawns each stream with its future, which would otherwise be copied
        // whole (the exchange's state is a few KiB) into every task.
        Box::pin(async move { Ok::<_, Infallible>(proxy(&conn, req).await) })
    });
    let io = TokioIo::new(Prefixed {
        prefix: prefix.freeze(),
        io: client,
    });
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        // Rapid reset (CVE-2023-44487): streams reset before the server accepted them, or
        // reset by the server for errors, end the connection past these counts.
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .max_concurrent_streams(Some(256))
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = b.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.drain.cancelled() => {
            // Draining: GOAWAY, finish the streams in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = %ctx.name, client = %peer, error = %e, "http/2 connection ended with an error");
    }
}

/// Serves one stream: the proxy's own answer or the task's response.
async fn proxy(conn: &Conn, req: Request<Incoming>) -> Response<Body> {
    let ctx = &conn.ctx;
    let started = Instant::now();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
    let info = if ctx.access_log {
        AccessInfo {
            method: req.method().to_string(),
            host: host.clone(),
            path: req.uri().path().to_string(),
        }
    } else {
        AccessInfo::default()
    };
    let (result, meters) = match exchange::route_request(ctx, host.as_deref(), req.uri().path()) {
        Err((e, label)) => (Err(e), ctx.http_meters.get(&ctx.metrics, &ctx.name, &label)),
        Ok(svc) => {
            let meters = ctx
                .http_meters
                .get(&ctx.metrics, &ctx.name, svc.name.as_str());
            (
                forward(conn, &svc, &meters, req, host.as_deref()).await,
                meters,
            )
        }
    };
    let (resp, task) = match result {
        Ok((resp, task)) => (resp, Some(task)),
        Err(e) => {
            log_answer(ctx, &meters.service, conn.hop.peer, &e);
            (e.response(&meters.service), None)
        }
    };
    account(
        ctx,
        &meters,
        conn.hop.peer,
        resp.status().as_u16(),
        started,
        task.as_deref(),
        &info,
    );
    resp
}

/// A request body from an HTTP/2 client: held whole (up to [`MAX_HELD_BODY`]), or its
/// first frames and the rest to stream.
struct ClientBody {
    held: Vec<u8>,
    rest: Option<Incoming>,
}

/// Reads up to [`MAX_HELD_BODY`] of a body; `Err`: the answer (413, 400).
async fn hold(mut body: Incoming, limit: u64) -> Result<ClientBody, ProxyError> {
    let mut held = Vec::new();
    loop {
        if body.is_end_stream() {
            return Ok(ClientBody { held, rest: None });
        }
        if held.len() > MAX_HELD_BODY {
            return Ok(ClientBody {
                held,
                rest: Some(body),
            });
        }
        match body.frame().await {
            None => return Ok(ClientBody { held, rest: None }),
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    held.extend_from_slice(d);
                    if limit > 0 && held.len() as u64 > limit {
                        return Err(ProxyError::BodyTooLarge(limit));
                    }
                }
            }
            Some(Err(e)) => return Err(ProxyError::BadRequest(format!("request body: {e}"))),
        }
    }
}

/// Sends an HTTP/2 client's request to a task of `svc` with the retry rules.
async fn forward(
    conn: &Conn,
    svc: &Service,
    meters: &Arc<ServiceMeters>,
    req: Request<Incoming>,
    host: Option<&str>,
) -> Result<(Response<Body>, Arc<Task>), ProxyError> {
    let ctx = &conn.ctx;
    let settings = &svc.settings;
    let limit = ctx.http.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if limit > 0 && declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    let hash = hash_of(
        settings,
        |name| req.headers().get(name).map(|v| v.as_bytes()),
        conn.hop.peer,
    );
    let (mut parts, body) = req.into_parts();
    // HTTP/2 may split Cookie into several fields; HTTP/1.1 allows one (RFC 9113 §8.2.3).
    if parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .nth(1)
        .is_some()
    {
        let joined: Vec<&[u8]> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let fwd_host = host.map(str::as_bytes).filter(|h| !h.is_empty());
    match settings.upstream_protocol {
        UpstreamProtocol::Http1 => {
            let body = hold(body, limit).await?;
            to_h1(
                conn, svc, meters, &parts, &pq, fwd_host, declared, body, hash,
            )
            .await
        }
        UpstreamProtocol::H2c => {
            let mut headers = HeaderMap::new();
            let fwd = conn.hop.forwarding(fwd_host, false, b"2", None);
            editor::request_fields(
                editor::map_fields(&parts.headers).into_iter(),
                &fwd,
                &mut headers,
            );
            headers.remove(header::HOST);
            let authority = host.unwrap_or("localhost");
            parts.uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority)
                .path_and_query(pq.clone())
                .build()
                .unwrap_or_else(|_| Uri::from(pq));
            parts.headers = headers;
            parts.version = Version::HTTP_2;
            to_h2c(conn, svc, meters, parts, body, hash).await
        }
    }
}

/// To an HTTP/1.1 task: the head written by the editor, the body as it is (with
/// Content-Length) or chunked, the response read through the codec.
#[allow(clippy::too_many_arguments)]
async fn to_h1(
    conn: &Conn,
    svc: &Service,
    meters: &Arc<ServiceMeters>,
    parts: &hyper::http::request::Parts,
    pq: &PathAndQuery,
    fwd_host: Option<&[u8]>,
    declared: Option<u64>,
    body: ClientBody,
    hash: Option<u64>,
) -> Result<(Response<Body>, Arc<Task>), ProxyError> {
    let ctx = &conn.ctx;
    let settings = &svc.settings;
    let limit = ctx.http.max_body_bytes;
    let complete = body.rest.is_none();
    // Framing towards the task: the declared length, the held length, or chunked.
    let length = declared.or(complete.then_some(body.held.len() as u64));
    let mut out = Vec::with_capacity(512 + body.held.len());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(pq.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let fwd = conn.hop.forwarding(fwd_host, true, b"2", None);
    editor::request_fields(
        editor::map_fields(&parts.headers)
            .into_iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(b"content-length")),
        &fwd,
        &mut out,
    );
    if fwd_host.is_none() {
        out.field(b"host", conn.hop.local().to_string().as_bytes());
    }
    let chunked = length.is_none();
    match length {
        Some(0) if !matches!(parts.method.as_str(), "POST" | "PUT" | "PATCH") => {}
        Some(n) => out.field(b"content-length", n.to_string().as_bytes()),
        None => out.field(b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
    if chunked {
        crate::protocol::http1::body::encode_chunk(&body.held, &mut out);
    } else {
        out.extend_from_slice(&body.held);
    }
    let replayable = complete
        && crate::protocol::http1::request::is_idempotent(parts.method.as_str().as_bytes());
    let proxy_header = conn.hop.proxy_header(settings);
    let request = H1Request {
        out: &out,
        replayable,
        fresh_only: false,
        proxy_header: proxy_header.as_deref(),
        rules: ResponseRules {
            head_request: parts.method == hyper::Method::HEAD,
            ..Default::default()
        },
    };
    let mut rest = match body.rest {
        None => Rest::Done,
        Some(incoming) => Rest::Frames {
            body: incoming,
            chunked,
            seen: body.held.len() as u64,
            ended: false,
        },
    };
    // A task's response head: room for a typical one without growing.
    let mut headers = HeaderMap::with_capacity(16);
    let mut rbuf = BytesMut::new();
    let sent = exchange::to_h1_task(
        svc,
        &ctx.metrics,
        hash,
        &request,
        &mut rest,
        limit,
        &meters.rx,
        &mut None,
        &mut headers,
        &mut rbuf,
    )
    .await;
    let a = match sent {
        Ok(a) => a,
        Err(Failed::Answer(e)) | Err(Failed::Body(BodyFailure::Refused(e), _)) => return Err(e),
        Err(Failed::Body(BodyFailure::Gone, _)) => {
            return Err(ProxyError::BadRequest("request body cut short".into()));
        }
    };
    // An early answer ends the exchange: the rest of the body is not sent.
    let reusable = a.head.reusable && !a.unfinished && proxy_header.is_none();
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(a.head.code).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = headers;
    let body = TaskBody::new(
        a.up,
        a.task.addr,
        rbuf,
        a.head.framing,
        reusable,
        meters.tx.clone(),
        Box::new(a.in_flight),
    );
    let (p, ()) = resp.into_parts();
    Ok((Response::from_parts(p, body.boxed_unsync()), a.task))
}

/// To an h2c task through hyper's client.
async fn to_h2c(
    conn: &Conn,
    svc: &Service,
    meters: &Arc<ServiceMeters>,
    parts: hyper::http::request::Parts,
    body: Incoming,
    hash: Option<u64>,
) -> Result<(Response<Body>, Arc<Task>), ProxyError> {
    let ctx = &conn.ctx;
    let settings = &svc.settings;
    let limit = ctx.http.max_body_bytes;
    let replayable =
        crate::protocol::http1::request::is_idempotent(parts.method.as_str().as_bytes())
            && body.is_end_stream();
    let flags = Arc::new(BodyFlags::default());
    let mut pending = Some(
        Counted::new(
            body,
            meters.rx.clone(),
            limit,
            Some(flags.clone()),
            Box::new(()),
        )
        .boxed_unsync(),
    );
    let proxy_header = conn.hop.proxy_header(settings);
    let mut attempts = Attempts::new(svc, &ctx.metrics, hash);
    let deadline = Instant::now() + settings.request_timeout;
    loop {
        let next = exchange::next_h2c(&mut attempts, settings, proxy_header.as_deref(), deadline);
        let Connected {
            task,
            in_flight,
            conn: mut sender,
            reused,
        } = next.await?;
        let body = pending.take().unwrap_or_else(body::empty);
        let request = Request::from_parts(parts.clone(), body);
        if sender.ready().await.is_err() {
            pending = Some(request.into_body());
            attempts.not_sent(reused, task_error(&task, "h2c connection closed"));
            continue;
        }
        let sent_at = Instant::now();
        match tokio::time::timeout_at(deadline, sender.try_send_request(request)).await {
            Err(_) => return Err(ProxyError::Timeout(settings.request_timeout)),
            Ok(Ok(resp)) => {
                task.state
                    .observe_latency_us(sent_at.elapsed().as_micros().max(1) as u64);
                let (mut rparts, rbody) = resp.into_parts();
                let mut headers = HeaderMap::new();
                editor::response_fields(
                    editor::map_fields(&rparts.headers).into_iter(),
                    editor::ResponseFraming {
                        keep_te: false,
                        keep_length: true,
                    },
                    b"2",
                    &mut headers,
                );
                rparts.headers = headers;
                rparts.version = Version::HTTP_2;
                let body = Counted::new(rbody, meters.tx.clone(), 0, None, Box::new(in_flight));
                return Ok((Response::from_parts(rparts, body.boxed_unsync()), task));
            }
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    pending = Some(req.into_body());
                    attempts.not_sent(reused, task_error(&task, "h2c connection closed"));
                    continue;
                }
                let e = e.into_error();
                if flags.too_large.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(ProxyError::BodyTooLarge(limit));
                }
                if flags.broken.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(ProxyError::BadRequest(
                        "request body malformed or cut short".into(),
                    ));
                }
                let why = task_error(&task, &e);
                let msg = why.to_string();
                drop(in_flight);
                if attempts.closed_early(&task, replayable, reused, why) == ClosedEarly::Fail {
                    return Err(ProxyError::UpstreamFailed {
                        attempts: attempts.count(),
                        last: msg,
                    });
                }
                // Replayable: bodiless, so an empty body goes again.
                pending = Some(body::empty());
            }
        }
    }
}
