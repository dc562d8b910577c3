//! The client's end of an HTTP connection, whatever its transport: a TCP stream (plain, or
//! after a PROXY header) or a TLS stream terminated here. One small enum, so the exchange
//! pipeline is the same code for both; plain TCP keeps the readiness-based reads and
//! writes of `socket.rs` (no EAGAIN after a short read) and splice(2) for tunnels.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::proxy::socket;
use crate::proxy::tcp::HalfClose;

/// After a refusal the proxy reads and drops what the client still sends, so that closing
/// sends FIN, not RST (an RST could destroy the answer before the client read it): at
/// most this much, this long.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);

pub enum Client {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
    pub fn is_tls(&self) -> bool {
        matches!(self, Client::Tls(_))
    }

    /// The address the client reached on this node (a system call).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Client::Tcp(s) => s.local_addr().ok(),
            Client::Tls(s) => s.get_ref().0.local_addr().ok(),
        }
    }

    /// Waits for bytes and appends what is there to `buf` (grown by `grow` when nearly
    /// full). `Ok(0)`: the client closed.
    pub async fn read_some(&mut self, buf: &mut BytesMut, grow: usize) -> io::Result<usize> {
        match self {
            Client::Tcp(s) => socket::read_some(s, buf, grow).await,
            Client::Tls(s) => {
                socket::make_room(buf, grow);
                s.read_buf(buf).await
            }
        }
    }

    /// Writes all of `data` (and flushes TLS records).
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Client::Tcp(s) => socket::write_all(s, data).await.map_err(|(_, e)| e),
            Client::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    /// Ends the connection after an answer the client may still be sending a request to:
    /// our side is shut (FIN, TLS close_notify), then what arrives is read and dropped
    /// (bounded), so the close does not reset the answer away.
    pub async fn linger_close(&mut self) {
        let linger = async {
            match self {
                Client::Tcp(s) => {
                    let _ = socket2::SockRef::from(&*s).shutdown(std::net::Shutdown::Write);
                }
                Client::Tls(s) => {
                    let _ = s.shutdown().await;
                }
            }
            let mut sink = BytesMut::with_capacity(16 * 1024);
            let mut total = 0;
            while total < LINGER_BYTES {
                sink.clear();
                match self.read_some(&mut sink, 16 * 1024).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, linger).await;
    }

    /// A clean end: TLS sends close_notify (bounded); TCP closes when dropped.
    pub async fn finish(&mut self) {
        if let Client::Tls(s) = self {
            let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
        }
    }

    /// After a 101: bytes both ways until both sides end (splice(2) for plain TCP), or
    /// until `hc` closes a half-closed tunnel.
    pub async fn tunnel(
        &mut self,
        up: &mut TcpStream,
        rx: &IntCounter,
        tx: &IntCounter,
        hc: &HalfClose<'_>,
    ) {
        match self {
            Client::Tcp(s) => crate::proxy::tcp::splice_streams(s, up, rx, tx, hc).await,
            Client::Tls(s) => {
                let (to_task, to_client) =
                    crate::proxy::tcp::copy_streams(s.as_mut(), up, hc).await;
                rx.inc_by(to_task);
                tx.inc_by(to_client);
            }
        }
    }
}
