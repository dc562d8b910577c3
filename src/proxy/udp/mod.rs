//! udp listeners: datagrams of a client reach one task of the listener's service through a
//! session, and the task's replies go back to that client only.
//!
//! A session is (listener, client IP:port) → one task, through its own UDP socket connected
//! to the task (the kernel then drops datagrams from any other source on it). The listener
//! loop owns the session table ([`session::SessionTable`], pure) and is its only writer:
//! it receives every client datagram, opens sessions (the service's balancer; Maglev hashes
//! `source_ip` or `source_addr`), forwards, and sweeps idle sessions once per tick — one
//! timer per listener, none per session. Each session has a reply task that waits on its
//! socket and sends what the task answers to the client, from the address the client sent
//! to (IP_PKTINFO on wildcard binds, [`pktinfo`]); it reports its end (`udp_responses`
//! reached, ICMP port unreachable) to the loop over a channel.
//!
//! Rules:
//! - a session stays on its task while the task is routable (in the snapshot, node Ready and
//!   not drained, not unhealthy, not ejected); otherwise the client's next datagram opens a
//!   session on another task;
//! - ECONNREFUSED on a session socket (ICMP port unreachable) ejects the task on this node,
//!   as a failed TCP connect does, and ends the session; when the forward itself reports it,
//!   that datagram goes to another task at once;
//! - datagrams are forwarded whole, 0 to 65,507 bytes; larger ones are dropped (`too_large`);
//! - a new session beyond `max_sessions` is refused (`max_sessions`), so a flood from spoofed
//!   sources is bounded; an idle session holds no buffer (the reply tasks share one buffer
//!   per worker thread, the loop one per listener).
//!
//! Owns no config parsing and never writes routing state (ejections go to the task's
//! shared atomics, like every passive failure).

pub mod pktinfo;
pub mod session;

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::pktinfo::Local;
use self::session::{Activity, SessionTable};
use crate::balance::{addr_hash, ip_hash};
use crate::config::{Balance, HashKey, ServiceName};
use crate::metrics::{Metrics, rx_tx};
use crate::ratelimit::LogLimiter;
use crate::snapshot::{Health, Service, SharedSnapshot, Snapshot, Task, UdpSessionCount};
use crate::util::clock::now_ms;

/// The largest datagram forwarded: the most an IPv4 UDP datagram can carry.
pub const MAX_DATAGRAM: usize = 65_507;
/// Receive buffers hold any IPv6 datagram too, so an oversized one is seen whole and dropped.
const BUF_SIZE: usize = 65_536;
/// Datagrams the loop takes from its socket before it looks at its other work.
const BATCH: usize = 64;
/// Bounds of the sweep interval (a quarter of the idle timeout in between).
const SWEEP_MIN: Duration = Duration::from_millis(50);
const SWEEP_MAX: Duration = Duration::from_secs(1);

static NO_TASK_LOG: LogLimiter = LogLimiter::new(1000);
static SOCKET_LOG: LogLimiter = LogLimiter::new(1000);
static REFUSED_LOG: LogLimiter = LogLimiter::new(1000);

/// What one udp listener's loop needs.
pub struct UdpCtx {
    /// Metric label and log field.
    pub name: String,
    /// The configured address: a wildcard IP turns on packet info.
    pub listen: SocketAddr,
    pub service: ServiceName,
    pub snapshot: SharedSnapshot,
    pub metrics: Arc<Metrics>,
    /// Most sessions open at once.
    pub max_sessions: usize,
}

/// Metric handles of one listener, resolved once.
struct Meters {
    rx_datagrams: IntCounter,
    tx_datagrams: IntCounter,
    rx_bytes: IntCounter,
    tx_bytes: IntCounter,
    sessions: IntGauge,
    dropped_max_sessions: IntCounter,
    dropped_no_live_task: IntCounter,
    dropped_too_large: IntCounter,
    dropped_unknown_source: IntCounter,
    dropped_socket_error: IntCounter,
}

impl Meters {
    fn new(m: &Metrics, listener: &str, service: &str) -> Meters {
        let dropped = |reason| m.udp_dropped_total.with_label_values(&[listener, reason]);
        let (rx_datagrams, tx_datagrams) = rx_tx(&m.udp_datagrams_total, listener, service);
        let (rx_bytes, tx_bytes) = rx_tx(&m.bytes_total, listener, service);
        Meters {
            rx_datagrams,
            tx_datagrams,
            rx_bytes,
            tx_bytes,
            sessions: m.udp_sessions.with_label_values(&[listener, service]),
            dropped_max_sessions: dropped("max_sessions"),
            dropped_no_live_task: dropped("no_live_task"),
            dropped_too_large: dropped("too_large"),
            dropped_unknown_source: dropped("unknown_source"),
            dropped_socket_error: dropped("socket_error"),
        }
    }
}

/// What a session's listener-side and reply-side share.
struct Link {
    /// Connected to the task.
    socket: UdpSocket,
    client: SocketAddr,
    /// Where the client sent to (wildcard binds): the replies' source.
    local: Option<Local>,
    /// `now_ms()` of the last reply (0 = none yet).
    last_reply_ms: AtomicU64,
    /// Set by the reply task before it ends (before the last reply goes out when
    /// `udp_responses` is reached): the client's next datagram opens a new session instead
    /// of going where no reply would be read.
    closed: AtomicBool,
}

/// One open session, as the table holds it.
struct Session {
    link: Arc<Link>,
    /// The task as of snapshot `epoch`.
    task: Arc<Task>,
    epoch: u64,
    reply: JoinHandle<()>,
    _count: UdpSessionCount,
    gauge: IntGauge,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reply.abort();
        self.gauge.dec();
    }
}

impl Activity for Session {
    fn last_reply_ms(&self) -> u64 {
        self.link.last_reply_ms.load(Ordering::Relaxed)
    }
}

/// A reply task's end, for the loop to remove the session: client and session id.
type Ended = (SocketAddr, u64);

/// Whether new datagrams may go to `task` now.
fn routable(task: &Task, now: u64) -> bool {
    task.is_candidate() && task.state.health() != Health::Unhealthy && !task.state.is_ejected(now)
}

/// The key hash of a new session (`None`: the service does not hash).
fn hash_of(svc: &Service, client: SocketAddr) -> Option<u64> {
    match (svc.settings.balance, &svc.settings.hash_key) {
        (Balance::Maglev, HashKey::SourceAddr) => Some(addr_hash(client)),
        (Balance::Maglev, _) => Some(ip_hash(client.ip())),
        _ => None,
    }
}

/// A passive failure of `task`: the task refused a datagram (ICMP port unreachable).
fn refused(metrics: &Metrics, service: &str, task: &Task) {
    task.state.eject(now_ms(), "udp: port unreachable".into());
    metrics
        .upstream_connect_errors_total
        .with_label_values(&[service, task.id.as_str()])
        .inc();
    if let Some(suppressed) = REFUSED_LOG.allow() {
        tracing::warn!(service, task = %task.id, addr = %task.addr, suppressed, "udp task refused a datagram (port unreachable); ejected on this node");
    }
}

/// A UDP socket connected to `addr`, for one session.
fn connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM.nonblocking(),
        None,
    )?;
    s.connect(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Runs one udp listener on `socket` until `stop`; its sessions end with it.
pub async fn serve(ctx: Arc<UdpCtx>, socket: Arc<UdpSocket>, stop: CancellationToken) {
    let pktinfo = ctx.listen.ip().is_unspecified();
    if pktinfo && let Err(e) = pktinfo::enable(&*socket, ctx.listen) {
        tracing::warn!(listener = %ctx.name, error = %e, "cannot ask for packet info: replies leave from the route's address");
    }
    let (ended_tx, ended_rx) = mpsc::unbounded_channel();
    let meters = Arc::new(Meters::new(&ctx.metrics, &ctx.name, ctx.service.as_str()));
    let mut l = Loop {
        table: SessionTable::new(ctx.max_sessions),
        pktinfo,
        ended_tx,
        meters,
        service: None,
        seen: None,
        epoch: 0,
        socket,
        ctx,
    };
    l.run(ended_rx, stop).await;
    let open = l.table.clear().len();
    tracing::debug!(listener = %l.ctx.name, sessions = open, "udp listener stopped; its sessions ended");
}

/// The listener loop's state: the only writer of the session table.
struct Loop {
    ctx: Arc<UdpCtx>,
    socket: Arc<UdpSocket>,
    pktinfo: bool,
    table: SessionTable<Session>,
    ended_tx: mpsc::UnboundedSender<Ended>,
    meters: Arc<Meters>,
    /// The service as of snapshot `seen`.
    service: Option<Arc<Service>>,
    seen: Option<Arc<Snapshot>>,
    /// Bumped at each new snapshot: sessions of an older epoch revalidate their task.
    epoch: u64,
}

impl Loop {
    async fn run(&mut self, mut ended: mpsc::UnboundedReceiver<Ended>, stop: CancellationToken) {
        let mut buf = vec![0u8; BUF_SIZE].into_boxed_slice();
        let mut next_sweep = tokio::time::Instant::now() + self.sweep_every();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some((client, id)) = ended.recv() => {
                    self.table.remove_if(&client, id);
                }
                _ = tokio::time::sleep_until(next_sweep) => {
                    self.sweep();
                    next_sweep = tokio::time::Instant::now() + self.sweep_every();
                }
                r = self.socket.readable() => {
                    if r.is_err() {
                        continue;
                    }
                    self.drain(&mut buf);
                }
            }
        }
    }

    /// Takes up to [`BATCH`] datagrams off the listener socket.
    fn drain(&mut self, buf: &mut [u8]) {
        for _ in 0..BATCH {
            let got = if self.pktinfo {
                pktinfo::try_recv(&self.socket, buf).map(|r| (r.len, r.from, r.local))
            } else {
                self.socket
                    .try_recv_from(buf)
                    .map(|(n, from)| (n, from, None))
            };
            match got {
                Ok((len, from, local)) => self.datagram(&buf[..len], from, local),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // A pending error of the socket itself (nothing to do with one client).
                    if let Some(suppressed) = SOCKET_LOG.allow() {
                        tracing::warn!(listener = %self.ctx.name, error = %e, suppressed, "udp listener receive error");
                    }
                    return;
                }
            }
        }
    }

    /// The idle timeout of the service's sessions.
    fn idle(&self) -> Duration {
        self.service
            .as_ref()
            .map(|s| s.settings.udp_idle_timeout)
            .unwrap_or(Duration::from_secs(60))
    }

    fn sweep_every(&self) -> Duration {
        (self.idle() / 4).clamp(SWEEP_MIN, SWEEP_MAX)
    }

    fn sweep(&mut self) {
        self.refresh();
        let idle = self.idle().as_millis() as u64;
        let gone = self.table.expire(now_ms(), idle);
        if !gone.is_empty() {
            tracing::debug!(listener = %self.ctx.name, sessions = gone.len(), "udp sessions expired");
        }
    }

    /// Follows the published snapshot: a new one may change the service's tasks.
    fn refresh(&mut self) {
        let snap = self.ctx.snapshot.load();
        if !self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &snap)) {
            self.service = snap.service(&self.ctx.service);
            self.seen = Some(arc_swap::Guard::into_inner(snap));
            self.epoch += 1;
        }
    }

    /// One datagram from `client`.
    fn datagram(&mut self, data: &[u8], client: SocketAddr, local: Option<Local>) {
        if data.len() > MAX_DATAGRAM {
            self.meters.dropped_too_large.inc();
            return;
        }
        self.refresh();
        let now = now_ms();
        let (epoch, service) = (self.epoch, self.service.clone());
        let (meters, ctx) = (&self.meters, &self.ctx);
        if let Some((_, s)) = self.table.touch(client, now) {
            let mut keep = !s.link.closed.load(Ordering::Relaxed);
            if keep && s.epoch != epoch {
                // The task as the current snapshot has it (same id and address), if at all.
                match service.as_ref().and_then(|svc| current(svc, &s.task)) {
                    Some(t) => {
                        s.task = t;
                        s.epoch = epoch;
                    }
                    None => keep = false,
                }
            }
            if keep && routable(&s.task, now) {
                match SockRef::from(&s.link.socket).send(data) {
                    Ok(_) => {
                        meters.rx_datagrams.inc();
                        meters.rx_bytes.inc_by(data.len() as u64);
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The socket's send buffer is full: drop, as the network would.
                        meters.dropped_socket_error.inc();
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        refused(&ctx.metrics, ctx.service.as_str(), &s.task);
                    }
                    Err(e) => {
                        if let Some(suppressed) = SOCKET_LOG.allow() {
                            tracing::warn!(listener = %ctx.name, client = %client, task = %s.task.id, error = %e, suppressed, "udp session send failed; opening another");
                        }
                    }
                }
            }
            // Not routable any more, or it refused: this datagram opens a new session.
            self.table.remove(&client);
        }
        self.open(data, client, local, service, now);
    }

    /// Opens a session for `client` and forwards its first datagram.
    fn open(
        &mut self,
        data: &[u8],
        client: SocketAddr,
        local: Option<Local>,
        service: Option<Arc<Service>>,
        now: u64,
    ) {
        if !self.table.has_room() {
            self.meters.dropped_max_sessions.inc();
            return;
        }
        let Some(svc) = service else {
            self.no_live_task(client);
            return;
        };
        // A task that refuses at once is ejected and another one tried, as TCP connects are.
        let mut tried = Vec::new();
        loop {
            let Some(i) = svc.pick(&tried, now, hash_of(&svc, client)) else {
                self.no_live_task(client);
                return;
            };
            tried.push(i);
            let task = svc.tasks[i].clone();
            let socket = match connect(task.addr) {
                Ok(s) => s,
                Err(e) => {
                    self.meters.dropped_socket_error.inc();
                    if let Some(suppressed) = SOCKET_LOG.allow() {
                        tracing::warn!(listener = %self.ctx.name, client = %client, task = %task.id, error = %e, suppressed, "cannot open a udp session socket");
                    }
                    return;
                }
            };
            match SockRef::from(&socket).send(data) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    refused(&self.ctx.metrics, svc.name.as_str(), &task);
                    continue;
                }
                Err(e) => {
                    self.meters.dropped_socket_error.inc();
                    if let Some(suppressed) = SOCKET_LOG.allow() {
                        tracing::warn!(listener = %self.ctx.name, client = %client, task = %task.id, error = %e, suppressed, "udp session send failed");
                    }
                    return;
                }
            }
            self.count_rx(data.len());
            let link = Arc::new(Link {
                socket,
                client,
                local: if self.pktinfo { local } else { None },
                last_reply_ms: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            });
            let id = self.table.next_id();
            let reply = tokio::spawn(reply_loop(Reply {
                link: link.clone(),
                listener: self.socket.clone(),
                meters: self.meters.clone(),
                metrics: self.ctx.metrics.clone(),
                service: svc.name.clone(),
                task: task.clone(),
                responses: svc.settings.udp_responses,
                ended: self.ended_tx.clone(),
                id,
            }));
            self.meters.sessions.inc();
            let session = Session {
                link,
                _count: task.state.open_udp_session(),
                task,
                epoch: self.epoch,
                reply,
                gauge: self.meters.sessions.clone(),
            };
            tracing::trace!(listener = %self.ctx.name, client = %client, task = %session.task.id, "udp session opened");
            // Room was checked above and the client's old session (if any) removed.
            let _ = self.table.insert(client, session, now);
            return;
        }
    }

    fn no_live_task(&self, client: SocketAddr) {
        self.meters.dropped_no_live_task.inc();
        self.ctx
            .metrics
            .no_live_task_total
            .with_label_values(&[self.ctx.service.as_str()])
            .inc();
        if let Some(suppressed) = NO_TASK_LOG.allow() {
            tracing::warn!(listener = %self.ctx.name, client = %client, service = %self.ctx.service, suppressed, "dropping datagram: no live task");
        }
    }

    fn count_rx(&self, len: usize) {
        self.meters.rx_datagrams.inc();
        self.meters.rx_bytes.inc_by(len as u64);
    }
}

/// `task` as `svc` has it now (same id and address), if it is still there.
fn current(svc: &Service, task: &Arc<Task>) -> Option<Arc<Task>> {
    let i = svc.tasks.binary_search_by(|t| t.id.cmp(&task.id)).ok()?;
    let t = &svc.tasks[i];
    (t.addr == task.addr).then(|| t.clone())
}

/// What a session's reply task needs.
struct Reply {
    link: Arc<Link>,
    /// The listener's socket, which replies leave from.
    listener: Arc<UdpSocket>,
    meters: Arc<Meters>,
    metrics: Arc<Metrics>,
    service: ServiceName,
    task: Arc<Task>,
    /// End after this many replies (0 = never).
    responses: u32,
    ended: mpsc::UnboundedSender<Ended>,
    id: u64,
}

thread_local! {
    /// The reply tasks' receive buffer, one per worker thread: an idle session holds none.
    static REPLY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
}

/// What one receive on a session socket gave.
enum Got {
    /// A reply was sent to the client.
    Sent,
    /// The session's last reply (`udp_responses`) was sent.
    Last,
    /// A datagram not from the task, dropped.
    Foreign,
    /// The listener socket is full: the reply waits, copied, for room.
    Pending(Vec<u8>),
    Empty,
    Refused,
    Failed(io::Error),
}

async fn reply_loop(r: Reply) {
    let mut replies: u32 = 0;
    let end = 'session: loop {
        if r.link.closed.load(Ordering::Relaxed) {
            break Got::Last;
        }
        let ready = match r
            .link
            .socket
            .ready(Interest::READABLE | Interest::ERROR)
            .await
        {
            Ok(ready) => ready,
            Err(e) => break Got::Failed(e),
        };
        if ready.is_error() {
            match r.link.socket.take_error() {
                Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionRefused => break Got::Refused,
                Ok(Some(e)) => break Got::Failed(e),
                // The error was taken by a send: clear the readiness, go on.
                _ => {
                    let _ = r.link.socket.try_io(Interest::ERROR, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                }
            }
        }
        loop {
            match r.recv_one(&mut replies) {
                Got::Sent => {}
                Got::Foreign => continue,
                Got::Pending(data) => {
                    // Wait for room on the listener socket (backpressure on this session).
                    loop {
                        if r.listener.writable().await.is_err() {
                            break;
                        }
                        match pktinfo::try_send(
                            &r.listener,
                            &data,
                            r.link.client,
                            r.link.local.as_ref(),
                        ) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            _ => break,
                        }
                    }
                    if r.link.closed.load(Ordering::Relaxed) {
                        break 'session Got::Last;
                    }
                }
                Got::Empty => break,
                end => break 'session end,
            }
        }
    };
    r.link.closed.store(true, Ordering::Relaxed);
    match end {
        Got::Refused => refused(&r.metrics, r.service.as_str(), &r.task),
        Got::Failed(e) => {
            if let Some(suppressed) = SOCKET_LOG.allow() {
                tracing::warn!(service = %r.service, task = %r.task.id, error = %e, suppressed, "udp session socket error; session ended");
            }
        }
        _ => {}
    }
    let _ = r.ended.send((r.link.client, r.id));
}

impl Reply {
    /// Takes one datagram off the session socket and sends it to the client; `replies`
    /// counts them (the last one allowed closes the session before it goes out).
    fn recv_one(&self, replies: &mut u32) -> Got {
        REPLY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let (n, from) = match self.link.socket.try_recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) => {
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Got::Empty,
                        io::ErrorKind::ConnectionRefused => Got::Refused,
                        _ => Got::Failed(e),
                    };
                }
            };
            if from != self.task.addr || n > MAX_DATAGRAM {
                // The socket is connected to the task, so the kernel filters sources; this
                // is the check of last resort (no amplification, no loops).
                self.meters.dropped_unknown_source.inc();
                return Got::Foreign;
            }
            let data = &buf[..n];
            if *replies == 0 {
                // The task answers: it is alive (ends a passive ejection like a connect does).
                self.task.state.succeed();
            }
            *replies = replies.saturating_add(1);
            let last = self.responses != 0 && *replies >= self.responses;
            if last {
                self.link.closed.store(true, Ordering::Relaxed);
            }
            let got = match pktinfo::send_now(
                &*self.listener,
                data,
                self.link.client,
                self.link.local.as_ref(),
            ) {
                Ok(_) => Got::Sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Got::Pending(data.to_vec()),
                Err(e) => {
                    // The client's address cannot be sent to (e.g. unreachable): its loss.
                    if let Some(suppressed) = SOCKET_LOG.allow() {
                        tracing::debug!(client = %self.link.client, error = %e, suppressed, "udp reply not sent");
                    }
                    Got::Sent
                }
            };
            self.link.last_reply_ms.store(now_ms(), Ordering::Relaxed);
            self.meters.tx_datagrams.inc();
            self.meters.tx_bytes.inc_by(n as u64);
            match got {
                Got::Sent if last => Got::Last,
                other => other,
            }
        })
    }
}
