//! The L7 HTTP proxy: HTTP/1.1 (keep-alive, pipelining, HTTP/1.0 clients, upgrades) and
//! HTTP/2 (h2c with prior knowledge, or ALPN h2 over TLS) on the same port, routed by Host
//! and path prefix to a service, balanced per request over its tasks through pooled
//! connections (HTTP/1.1 or h2c towards the task).
//!
//! One engine per protocol, whatever the client's transport (plain TCP, TLS terminated by
//! `../tls.rs`, after a PROXY header):
//! - HTTP/1.x clients: `h1.rs`, the one exchange pipeline, on the codec of
//!   `crate::protocol::http1` (heads, bodies, the header editor);
//! - HTTP/2 clients: `h2.rs`, hyper's server, whose requests take the same steps
//!   (`exchange.rs`) and the same codec towards HTTP/1.1 tasks.
//!
//! Shared by both: routing (`route.rs`), the retry rules (`proxy::upstream::Attempts`), the
//! pool of task connections (`pool.rs`), metric handles resolved once per listener and
//! service (`meters.rs`), proxy answers (`errors.rs`). hyper is used for HTTP/2 only.

mod body;
mod client;
mod errors;
mod exchange;
mod h1;
mod h2;
mod meters;
mod pool;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use self::client::Client;
use self::exchange::ClientHop;
pub use self::meters::ListenerMeters;
use super::ListenerCtx;

/// The client preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Handles one plain-TCP connection of an http listener.
pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    // The address the client reached: known on a bind to one IP, else asked for only by a
    // request that needs it.
    let local = ctx.bound;
    serve(ctx, Client::Tcp(client), peer, local, false).await
}

/// Handles one TLS connection of an http listener after its handshake: HTTP/2 when ALPN
/// chose h2, else HTTP/1.x (or HTTP/2 with prior knowledge).
pub async fn handle_tls(
    ctx: Arc<ListenerCtx>,
    stream: TlsStream<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    serve(ctx, Client::Tls(Box::new(stream)), peer, Some(local), h2).await
}

async fn serve(
    ctx: Arc<ListenerCtx>,
    mut client: Client,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    h2: bool,
) {
    let _open = ctx
        .http_meters
        .open(&ctx.metrics, &ctx.name, ctx.service_label());
    let accepted = Instant::now();
    let hop = ClientHop::new(peer, local, client.is_tls());
    if h2 {
        return serve_h2(ctx, client, hop, BytesMut::new()).await;
    }
    let Some((initial, h2)) = preface(&ctx, &mut client, accepted).await else {
        return;
    };
    if h2 {
        serve_h2(ctx, client, hop, initial).await
    } else {
        h1::serve(&ctx, client, hop, initial, accepted).await
    }
}

/// [`h2::serve`], boxed: an HTTP/2 connection's state (hyper's) is several times an HTTP/1.1
/// one's, and held inline it would size every connection's future, idle HTTP/1.1 ones too.
async fn serve_h2(ctx: Arc<ListenerCtx>, client: Client, mut hop: ClientHop, initial: BytesMut) {
    // Streams run apart from the connection's socket: learn the address now, once.
    hop.resolve_local(|| client.local_addr());
    let serving = Box::pin(h2::serve(ctx, client, hop, initial));
    serving.await
}

/// Reads until the HTTP/2 preface matches or cannot match: the bytes read, and whether the
/// connection speaks HTTP/2. `None`: the client left (or the daemon drained) before a byte.
async fn preface(
    ctx: &ListenerCtx,
    client: &mut Client,
    accepted: Instant,
) -> Option<(BytesMut, bool)> {
    let deadline = accepted + ctx.http.header_read_timeout;
    let mut initial = BytesMut::with_capacity(4096);
    let h2 = loop {
        if initial.len() >= H2_PREFACE.len() {
            break initial.starts_with(H2_PREFACE);
        }
        if !H2_PREFACE.starts_with(&initial) {
            break false;
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, client.read_some(&mut initial, 4096)) => r,
            // Draining: a connection that has not sent a byte yet gets a grace for it.
            _ = ctx.drain_grace_over(), if initial.is_empty() => return None,
        };
        match read {
            // Out of time: the HTTP/1 engine answers 408 for a partial head, or closes.
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
    };
    Some((initial, h2))
}
