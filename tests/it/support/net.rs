//! Loopback addresses for the things a test starts, and a check that a peer hung up.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// Ports this process holds a claim on (an open, locked file each), so that no other test
/// process (nextest runs one per test) is handed the same port while this one lives.
static CLAIMED: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

/// Where the claims live: one lock file per port, shared by every test process on the machine.
const CLAIMS_DIR: &str = "/tmp/routemesh-test-ports";

/// A loopback port, free a moment ago for TCP (on every address) and UDP, picked below the
/// kernel's ephemeral range so that no outgoing connection of another test can take it
/// between this call and the bind, and claimed for the life of this process (an exclusive
/// lock on `CLAIMS_DIR/PORT`, released by the kernel when the process exits), so that no
/// other test process gets it either. Never returns the same port twice.
pub fn free_port() -> u16 {
    let (low, high) = unclaimed_range();
    let span = u32::from(high - low);
    // Start where the process id says, so parallel test processes rarely probe the same ports.
    let start = std::process::id().wrapping_mul(7919) % span;
    std::fs::create_dir_all(CLAIMS_DIR)
        .unwrap_or_else(|e| panic!("free_port: cannot create {CLAIMS_DIR}: {e}"));
    for i in 0..span {
        let port = low + ((start + i) % span) as u16;
        if !bindable(port) {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{CLAIMS_DIR}/{port}"))
        else {
            continue;
        };
        // A lock on another open file, this process's own included, refuses: a port is
        // handed out once.
        if file.try_lock().is_err() {
            continue;
        }
        CLAIMED.lock().unwrap_or_else(|p| p.into_inner()).push(file);
        return port;
    }
    panic!("free_port: no unclaimed loopback port in {low}..{high}");
}

/// Ports from 10000 up to the start of `net.ipv4.ip_local_port_range` (Linux default 32768).
fn unclaimed_range() -> (u16, u16) {
    let low_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    assert!(
        low_ephemeral > 11000,
        "free_port: net.ipv4.ip_local_port_range starts at {low_ephemeral}; tests need ports \
         below it (set it to \"32768 60999\")"
    );
    (10000, low_ephemeral)
}

/// Whether nothing holds `port`: a TCP listener on 0.0.0.0 (which any listener on any local
/// address would refuse) and a UDP socket on 127.0.0.1 both bind.
fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
        && std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A TCP listener on a claimed free loopback port ([`free_addr`]). Tests bind their task and
/// broker stand-ins here rather than on port 0: a port the kernel hands out for `:0` may be one
/// another test's daemon still dials (a task that test stopped), whose connections would then
/// reach this listener.
pub fn tcp_listener() -> TcpListener {
    let addr = free_addr();
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// A UDP socket that serves (a backend), on a claimed free loopback port, for the reason
/// [`tcp_listener`] gives.
pub fn udp_server() -> std::net::UdpSocket {
    let addr = free_addr();
    std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"))
}

/// How long until the peer closed `s` (EOF or reset) without sending data; panics unless it
/// did within `within`.
pub fn time_to_close(s: &mut TcpStream, within: Duration) -> Duration {
    let t = std::time::Instant::now();
    assert!(
        closed_within(s, within),
        "the connection was not closed (without data) within {within:?}"
    );
    t.elapsed()
}

/// Whether the peer closed `s` (EOF or reset) within `within`, without sending data.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}
