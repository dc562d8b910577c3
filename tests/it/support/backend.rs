//! Real TCP backends (std threads) plus addresses that refuse or black-hole
//! connections, and small client helpers for talking to them (directly or
//! through routemesh).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::net::{free_addr, free_port, tcp_listener, udp_server};
use super::wait::eventually_ok;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    connections: AtomicUsize,
    active: AtomicUsize,
    next_id: AtomicU64,
    /// Clones of the open connections, so `stop` can cut them.
    open: Mutex<HashMap<u64, TcpStream>>,
}

/// A TCP backend on 127.0.0.1: each connection first receives `"{name}\n"`,
/// then everything it sends is echoed back; on EOF from the client the
/// backend shuts down its write side (half-close is preserved).
pub struct TcpBackend {
    name: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl TcpBackend {
    /// Listen on a free loopback port.
    pub fn start(name: &str) -> TcpBackend {
        let listener = tcp_listener();
        Self::from_listener(name, listener)
    }

    /// Listen on a given address, e.g. to bring a stopped backend back on the
    /// same port (retries binding for up to 5 s).
    pub fn start_at(name: &str, addr: SocketAddr) -> TcpBackend {
        let listener = eventually_ok(
            Duration::from_secs(5),
            &format!("backend {name} to bind {addr}"),
            || TcpListener::bind(addr).map_err(|e| e.to_string()),
        );
        Self::from_listener(name, listener)
    }

    fn from_listener(name: &str, listener: TcpListener) -> TcpBackend {
        let addr = listener.local_addr().expect("backend local_addr");
        let shared = Arc::new(Shared::default());
        let (sh, nm) = (Arc::clone(&shared), name.to_string());
        let accept_thread = thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || accept_loop(listener, &nm, &sh))
            .expect("spawn backend accept thread");
        TcpBackend {
            name: name.to_string(),
            addr,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Name written as the first line of every connection.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stop listening and cut all open connections (same as dropping).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(handle) = self.accept_thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(); the loop sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = handle.join();
        for (_, s) in self
            .shared
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Give handler threads a moment to notice; never block for long.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.active() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, name: &str, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.active.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            shared
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, clone);
        }
        let sh = Arc::clone(shared);
        let banner = format!("{name}\n");
        let spawned = thread::Builder::new()
            .name(format!("backend-{name}-conn{id}"))
            .spawn(move || {
                let _guard = ConnGuard { shared: &sh, id };
                serve(stream, banner.as_bytes());
            });
        if spawned.is_err() {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            shared
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }
}

struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(mut stream: TcpStream, banner: &[u8]) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(banner).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// A loopback address where nothing listens: connecting is refused.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A loopback address whose TCP connects time out (SYNs are silently
/// dropped) instead of being refused. Alive while this value lives.
///
/// How: a listener (made with socket2, a dependency of the crate) with
/// `listen(0)`, whose accept queue is filled by a connection that is never
/// accepted; Linux drops further SYNs
/// when the accept queue is full, so clients see a connect timeout.
pub struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    /// Create a blackhole and verify that a connect to it times out.
    pub fn start() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("blackhole: socket");
        socket
            .bind(&free_addr().into())
            .expect("blackhole: bind a free loopback port");
        // Accept queue of (effectively) one connection, which we fill below.
        socket.listen(0).expect("blackhole: listen(0)");
        let listener = TcpListener::from(socket);
        let addr = listener.local_addr().expect("blackhole local_addr");
        let mut fillers = Vec::new();
        for _ in 0..64 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Blackhole {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    };
                }
                Err(e) => panic!("blackhole: unexpected connect error while filling backlog: {e}"),
            }
        }
        panic!("blackhole: accept queue never filled after 64 connections");
    }

    /// The address whose connects time out.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect (5 s bound) and read the banner line; returns the open stream and
/// the backend name. Reads byte by byte so no echoed data is consumed.
pub fn connect_and_greet(addr: SocketAddr) -> io::Result<(TcpStream, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed before banner (got {line:?})"),
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if line.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "banner too long",
            ));
        }
    }
    Ok((stream, String::from_utf8_lossy(&line).into_owned()))
}

/// Connect, read the banner, close; returns which backend answered.
pub fn hello(addr: SocketAddr) -> io::Result<String> {
    connect_and_greet(addr).map(|(_, name)| name)
}

/// Connect, read the banner, send `payload`, half-close, read until EOF.
/// Returns (backend name, echoed bytes).
pub fn echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> io::Result<(String, Vec<u8>)> {
    let (mut stream, name) = connect_and_greet(addr)?;
    let mut writer = stream.try_clone()?;
    let data = payload.to_vec();
    // Write from another thread so large payloads can't deadlock against the echo.
    let w = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut echoed = Vec::new();
    let read = stream.read_to_end(&mut echoed);
    let written = w
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
    read?;
    written?;
    Ok((name, echoed))
}

/// How a [`UdpEcho`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// Every datagram is sent back unchanged (zero-length ones too).
    Echo,
    /// Nothing is ever sent back (a task that never answers).
    Silent,
}

#[derive(Default)]
struct UdpShared {
    stop: AtomicBool,
    received: AtomicUsize,
    /// Source addresses seen (routemesh's session sockets), in order of first datagram.
    peers: Mutex<Vec<SocketAddr>>,
}

/// A UDP backend on 127.0.0.1 (std thread): counts datagrams, remembers their sources, and
/// echoes them (or not, [`UdpMode::Silent`]).
pub struct UdpEcho {
    addr: SocketAddr,
    shared: Arc<UdpShared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(mode: UdpMode) -> UdpEcho {
        let socket = udp_server();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("udp backend: read timeout");
        let addr = socket.local_addr().expect("udp backend local_addr");
        let shared = Arc::new(UdpShared::default());
        let sh = shared.clone();
        let thread = thread::Builder::new()
            .name("udp-backend".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !sh.stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    sh.received.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut peers = sh.peers.lock().unwrap();
                        if !peers.contains(&from) {
                            peers.push(from);
                        }
                    }
                    if mode == UdpMode::Echo {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
            .expect("spawn udp backend");
        UdpEcho {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.shared.received.load(Ordering::Relaxed)
    }

    /// The sources of the datagrams received so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.peers.lock().unwrap().clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw backend on a free loopback port: `serve` runs on its own thread for each
/// connection (the accept loop ends with the test process, or at an accept error).
pub fn raw_backend(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
    addr
}
