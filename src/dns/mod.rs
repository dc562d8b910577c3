//! One name for the whole cluster: an authoritative DNS responder for `[dns] zone` on every
//! node, answering only with the nodes that are alive right now.
//!
//! Owns the UDP and TCP sockets of `[dns] listen`, a reachability probe of the other nodes,
//! and the per-source rate limit. The answers themselves are built by the pure core in
//! `answer.rs` (zone logic, rotation, NODATA/REFUSED, truncation, RFC 8482 ANY, the 10x
//! amplification cap) from the live set of `live.rs`. Does not own routing state: it reads
//! the published snapshot (`snapshot.nodes`), whose Ready nodes are those with a lease-bound
//! `alive` record.
//!
//! The probe: every second this node opens a TCP connection (500 ms timeout) to each other
//! Ready node's advertise address at the port of a published listener (an http one when
//! there is one, see `live::probe_targets`). Two failures
//! in a row take the node out of answers, one success brings it back. Nodes that publish no
//! listener or no address are not probed.

pub mod answer;
pub mod live;

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{DnsConfig, NodeName};
use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;
use crate::snapshot::SharedSnapshot;
use crate::util::clock::now_ms;
use answer::{Ctx, Transport, Zone};
use live::{LastKnown, RATE_BURST, RATE_PER_SEC, RateLimiter, Reachability};

/// How often, and how patiently, other nodes are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// TCP clients served at once; more are closed on arrival.
const MAX_TCP_CLIENTS: usize = 256;
/// A TCP client idle this long (between or within messages) is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

static IO_ERROR_LOG: LogLimiter = LogLimiter::new(1000);

/// The bound UDP and TCP sockets of `[dns] listen`.
pub struct Sockets {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

impl Sockets {
    /// Binds both (called by app.rs before it reports ready, so a taken port fails start-up).
    pub fn bind(addr: SocketAddr) -> io::Result<Sockets> {
        let tcp = crate::util::net::bind(addr)?;
        let std_udp = std::net::UdpSocket::bind(addr)?;
        std_udp.set_nonblocking(true)?;
        Ok(Sockets {
            udp: UdpSocket::from_std(std_udp)?,
            tcp,
        })
    }
}

/// What every query reads.
struct Shared {
    zone: Zone,
    self_node: NodeName,
    snapshot: SharedSnapshot,
    /// Nodes the probe sees as unreachable (written by the probe only).
    unreachable: ArcSwap<BTreeSet<NodeName>>,
    last_known: Mutex<LastKnown>,
    rotation: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let (live, serial) = {
            let snap = self.snapshot.load();
            let unreachable = self.unreachable.load();
            (
                live::live_nodes(&snap.nodes, &unreachable),
                snap.revision as u32,
            )
        };
        let live = match self.last_known.lock() {
            Ok(mut lk) => lk.resolve(live),
            Err(_) => live,
        };
        let ctx = Ctx {
            zone: &self.zone,
            nodes: &live,
            serial,
            rotation: self.rotation.fetch_add(1, Ordering::Relaxed),
            self_node: self.self_node.as_str(),
            transport,
        };
        let out = answer::respond(packet, &ctx);
        self.metrics
            .dns_queries_total
            .with_label_values(&[out.qtype, out.rcode])
            .inc();
        out.reply
    }
}

/// Serves `[dns]` on `sockets` until `shutdown`.
pub async fn run(
    cfg: DnsConfig,
    sockets: Sockets,
    snapshot: SharedSnapshot,
    self_node: NodeName,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let zone = match Zone::new(&cfg.zone, cfg.ttl) {
        Ok(z) => z,
        Err(e) => {
            // The config validated the name, so this is a bug, not a user error.
            tracing::error!(zone = %cfg.zone, error = %e, "dns: invalid zone; responder not started");
            return;
        }
    };
    let shared = Arc::new(Shared {
        zone,
        self_node,
        snapshot,
        unreachable: ArcSwap::from_pointee(BTreeSet::new()),
        last_known: Mutex::new(LastKnown::default()),
        rotation: AtomicUsize::new(fastrand::usize(..)),
        metrics,
    });
    tracing::info!(addr = %cfg.listen, zone = %cfg.zone, "dns listening (udp and tcp)");
    let mut tasks = JoinSet::new();
    tasks.spawn(udp_loop(shared.clone(), sockets.udp, shutdown.clone()));
    tasks.spawn(tcp_loop(shared.clone(), sockets.tcp, shutdown.clone()));
    tasks.spawn(probe_loop(shared, shutdown.clone()));
    while tasks.join_next().await.is_some() {}
}

fn log_io_error(what: &str, e: &io::Error) {
    if let Some(suppressed) = IO_ERROR_LOG.allow() {
        tracing::warn!(error = %e, suppressed, "dns: {what}");
    }
}

async fn udp_loop(shared: Arc<Shared>, socket: UdpSocket, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 65535];
    let mut limiter = RateLimiter::new(RATE_PER_SEC, RATE_BURST);
    loop {
        let (n, src) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    log_io_error("udp receive failed", &e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if !limiter.allow(src.ip(), now_ms()) {
            shared
                .metrics
                .dns_queries_total
                .with_label_values(&["unknown", "ratelimited"])
                .inc();
            continue;
        }
        if let Some(reply) = shared.answer(&buf[..n], Transport::Udp)
            && let Err(e) = socket.send_to(&reply, src).await
        {
            log_io_error("udp send failed", &e);
        }
    }
}

async fn tcp_loop(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    let mut clients = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    log_io_error("tcp accept failed", &e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Reap finished clients so the set does not grow.
        while clients.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // over the limit: dropped, which closes it
        };
        let shared = shared.clone();
        let stop = shutdown.clone();
        clients.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = tcp_client(&shared, stream) => {
                    if let Err(e) = r && e.kind() != io::ErrorKind::UnexpectedEof {
                        tracing::debug!(error = %e, "dns: tcp client closed");
                    }
                }
            }
            drop(permit);
        });
    }
    clients.shutdown().await;
}

/// Serves length-prefixed messages (RFC 1035 4.2.2, several per connection, RFC 7766) until
/// the client closes or idles.
async fn tcp_client(shared: &Shared, mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 65535];
    loop {
        let mut len = [0u8; 2];
        idle(stream.read_exact(&mut len)).await?;
        let len = u16::from_be_bytes(len) as usize;
        idle(stream.read_exact(&mut buf[..len])).await?;
        match shared.answer(&buf[..len], Transport::Tcp) {
            Some(reply) => {
                let mut out = Vec::with_capacity(reply.len() + 2);
                out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
                out.extend_from_slice(&reply);
                idle(stream.write_all(&out)).await?;
            }
            // Silence over TCP means the stream cannot be trusted any more: close it.
            None => return Ok(()),
        }
    }
}

async fn idle<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(TCP_IDLE, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle"))?
}

async fn probe_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut reach = Reachability::default();
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let targets = live::probe_targets(&shared.snapshot.load().nodes, &shared.self_node);
        let probed: BTreeSet<NodeName> = targets.iter().map(|(n, _)| n.clone()).collect();
        let mut changed = reach.retain(&probed);
        let mut probes = JoinSet::new();
        for (node, addr) in targets {
            probes.spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await,
                    Ok(Ok(_))
                );
                (node, addr, ok)
            });
        }
        while let Some(r) = probes.join_next().await {
            let Ok((node, addr, ok)) = r else { continue };
            if reach.observe(&node, ok) {
                changed = true;
                if ok {
                    tracing::info!(node = %node, %addr, "dns: node reachable again; back in answers");
                } else {
                    tracing::warn!(node = %node, %addr, "dns: node unreachable from here; left out of answers");
                }
            }
        }
        if changed {
            shared
                .unreachable
                .store(Arc::new(reach.unreachable().clone()));
        }
    }
}
