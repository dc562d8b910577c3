//! Loopback addresses for the things a test starts, and a check that a peer hung up.

use std::collections::HashSet;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// Ports already handed out by this process; never hand out the same one twice.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that was free a moment ago (bind 127.0.0.1:0, read, drop).
/// Never returns the same port twice within one test process.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("free_port: cannot bind 127.0.0.1:0: {e}"));
        let port = listener.local_addr().expect("free_port: local_addr").port();
        drop(listener);
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("free_port: could not find an unused loopback port after 200 attempts");
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
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
