//! Admission of a freshly accepted connection, before any protocol handler sees it:
//! the listener's `max_connections`, the PROXY protocol header from trusted load balancers
//! (`accept_proxy`), then `max_connections_per_ip` on the real client address.
//!
//! A refused connection is closed at once (an http listener first answers 503 with
//! Retry-After) and counted in `routemesh_rejected_connections_total{listener,reason}`. An
//! admitted one carries a [`Permit`] that frees its slots when the connection ends.
//!
//! The PROXY header is read with MSG_PEEK and then consumed to its exact length, so the bytes
//! after it reach the protocol handler untouched. Owns no routing and no TLS.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::socket::{PeekReasons, peek_until};
use crate::config::ListenerEdge;
use crate::metrics::Metrics;
use crate::protocol::proxy_protocol::{self, Header, Parse};
use crate::ratelimit::LogLimiter;

static REJECT_LOG: LogLimiter = LogLimiter::new(1000);

/// The answer of an http listener over its limits.
const HTTP_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 32\r\nConnection: close\r\n\r\ntoo many connections, retry soon\n";

/// One listener's admission state; shared by its connections.
pub struct Admission {
    listener: String,
    edge: ListenerEdge,
    metrics: Arc<Metrics>,
    /// Answer 503 before closing (plain-text http listeners).
    http_reply: bool,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Held for the life of an admitted connection.
pub struct Permit {
    adm: Arc<Admission>,
    counted: bool,
    ip: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.counted {
            self.adm.open.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(ip) = self.ip {
            self.adm.release_ip(ip);
        }
    }
}

impl Admission {
    pub fn new(
        listener: &str,
        edge: &ListenerEdge,
        metrics: Arc<Metrics>,
        http_reply: bool,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            listener: listener.to_string(),
            edge: edge.clone(),
            metrics,
            http_reply,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Connections open now (admitted and not yet closed).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn release_ip(&self, ip: IpAddr) {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Admits `stream` from `peer`: returns the stream, the client address (from the PROXY
    /// header when one was accepted) and the permit; or closes the stream and returns `None`.
    pub async fn admit(
        self: &Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TcpStream, SocketAddr, Permit)> {
        let mut permit = Permit {
            adm: self.clone(),
            counted: false,
            ip: None,
        };
        if let Some(max) = self.edge.max_connections {
            if self.open.fetch_add(1, Ordering::AcqRel) >= max {
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.reject(stream, peer, "max_connections").await;
                return None;
            }
            permit.counted = true;
        } else {
            self.open.fetch_add(1, Ordering::AcqRel);
            permit.counted = true;
        }

        let mut client = peer;
        if self.edge.accept_proxy {
            if !self
                .edge
                .trusted_proxies
                .iter()
                .any(|c| c.contains(peer.ip()))
            {
                self.reject_silently(stream, peer, "proxy_untrusted");
                return None;
            }
            let deadline = Instant::now() + self.edge.handshake_timeout;
            // Boxed: the header read's state exists only while it runs.
            let header = {
                let reading = Box::pin(read_proxy_header(&mut stream, deadline));
                reading.await
            };
            match header {
                Ok(Header::Proxied { src, .. }) => client = proxy_protocol::unmap(src),
                Ok(Header::Local) => {}
                Err(reason) => {
                    self.reject_silently(stream, peer, reason);
                    return None;
                }
            }
        }

        if let Some(max) = self.edge.max_connections_per_ip {
            let ip = client.ip();
            let over = {
                let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
                let n = map.entry(ip).or_insert(0);
                if *n >= max {
                    true
                } else {
                    *n += 1;
                    false
                }
            };
            if over {
                drop(permit);
                self.reject(stream, client, "max_connections_per_ip").await;
                return None;
            }
            permit.ip = Some(ip);
        }
        Some((stream, client, permit))
    }

    fn count(&self, peer: SocketAddr, reason: &'static str) {
        count_rejected(&self.metrics, &self.listener, peer, reason, None);
    }

    /// Counts and closes without a word (protocol errors, untrusted sources).
    fn reject_silently(&self, stream: TcpStream, peer: SocketAddr, reason: &'static str) {
        self.count(peer, reason);
        drop(stream);
    }

    /// Counts and closes; an http listener answers 503 first.
    async fn reject(&self, mut stream: TcpStream, peer: SocketAddr, reason: &'static str) {
        self.count(peer, reason);
        if !self.http_reply {
            return;
        }
        let answer = async {
            stream.write_all(HTTP_503).await?;
            stream.shutdown().await?;
            // Read what the client sent so that closing sends FIN, not RST (an RST could
            // destroy the 503 before the client read it).
            // On the heap: an array here would sit in every connection's future.
            let mut sink = vec![0u8; 4096];
            let mut total = 0;
            while total < 64 * 1024 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => total += n,
                }
            }
            Ok::<_, io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), answer).await;
    }
}

/// Counts a connection closed before it reached a task, in
/// `routemesh_rejected_connections_total{listener,reason}`, with a rate-limited warning.
/// Shared by admission (limits, PROXY headers) and the TLS listeners.
pub fn count_rejected(
    metrics: &Metrics,
    listener: &str,
    peer: SocketAddr,
    reason: &'static str,
    detail: Option<&dyn std::fmt::Display>,
) {
    metrics
        .rejected_connections_total
        .with_label_values(&[listener, reason])
        .inc();
    if let Some(suppressed) = REJECT_LOG.allow() {
        match detail {
            Some(error) => {
                tracing::warn!(listener, client = %peer, reason, %error, suppressed, "connection refused")
            }
            None => {
                tracing::warn!(listener, client = %peer, reason, suppressed, "connection refused")
            }
        }
    }
}

/// Reads one PROXY header (v1 or v2) and nothing after it; `Err` is a metric reason.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<Header, &'static str> {
    const REASONS: PeekReasons = PeekReasons {
        timeout: "proxy_timeout",
        read_error: "proxy_read_error",
        closed: "proxy_closed",
    };
    // v1 fits in 107 bytes; a v2 header with large TLVs makes the buffer grow.
    let (header, len) = peek_until(
        stream,
        256,
        proxy_protocol::MAX_V2_LEN,
        deadline,
        &REASONS,
        |bytes| match proxy_protocol::parse(bytes) {
            Ok(Parse::Complete { header, len }) => Ok(Some((header, len))),
            Ok(Parse::NeedMore) => Ok(None),
            Err(e) => Err(e.reason()),
        },
    )
    .await?;
    let mut consumed = vec![0u8; len];
    match stream.read_exact(&mut consumed).await {
        Ok(_) => Ok(header),
        Err(_) => Err("proxy_read_error"),
    }
}
