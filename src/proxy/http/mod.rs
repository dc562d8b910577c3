//! The L7 HTTP proxy (HTTP/1.1 and h2c downstream). Placeholder: the HTTP issue fills it in.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::ListenerCtx;

/// Handles one downstream connection on an http listener.
pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    super::tcp::handle(ctx, client, peer).await
}
