//! The L4 path on the static backend: forwarding, byte transparency, half-close, resets,
//! balancing and failover, against real TCP backends and the real daemon.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::net::tcp_listener;
use crate::support::{
    Blackhole, Config, Daemon, Listener, Task, TcpBackend, connect_and_greet, dead_addr,
    eventually, free_addr, hello, holds_for,
};

/// Node `n1`: a TCP listener on `listen` for service `echo`, whose static tasks `t0`, `t1`, …
/// are `tasks`.
fn echo_config(listen: SocketAddr, tasks: &[SocketAddr]) -> Config {
    let tasks = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| Task::new("echo", *t).id(&format!("t{i}")));
    Config::static_tasks()
        .node("n1")
        .listener(Listener::tcp(listen, "echo"))
        .tasks(tasks)
}

#[test]
fn forwards_one_mib_each_way_intact_with_half_close() {
    let backend = TcpBackend::start("b1");
    let listen = free_addr();
    let _d = echo_config(listen, &[backend.addr()]).start();

    let (mut stream, name) = connect_and_greet(listen).expect("connect through the proxy");
    assert_eq!(name, "b1");
    let payload: Vec<u8> = (0..1 << 20).map(|_| fastrand::u8(..)).collect();
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    let t = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        // Half-close: the backend sees EOF, echoes the rest, then closes its side.
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.read_to_end(&mut back).expect("read the echo to EOF");
    t.join().unwrap();
    assert_eq!(back.len(), payload.len(), "every byte came back");
    assert!(back == payload, "bytes arrived unchanged");
}

#[test]
fn round_robin_spreads_evenly() {
    let backends: Vec<_> = (0..3)
        .map(|i| TcpBackend::start(&format!("b{i}")))
        .collect();
    let listen = free_addr();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let _d = echo_config(listen, &addrs).start();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..30 {
        *counts.entry(hello(listen).unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&c| c == 10), "{counts:?}");
}

#[test]
fn least_conn_prefers_the_idle_task() {
    let a = TcpBackend::start("a");
    let b = TcpBackend::start("b");
    let listen = free_addr();
    let _d = echo_config(listen, &[a.addr(), b.addr()])
        .set("service.echo.balance", "least_conn")
        .start();
    let (c1, first) = connect_and_greet(listen).unwrap();
    let (_c2, second) = connect_and_greet(listen).unwrap();
    assert_ne!(first, second, "the second connection goes to the idle task");
    drop(c1);
    let backend_of_first = if first == "a" { &a } else { &b };
    eventually(Duration::from_secs(5), "first connection closed", || {
        backend_of_first.active() == 0
    });
    // Give the proxy a moment to see the close too, then the freed task wins again.
    eventually(
        Duration::from_secs(5),
        "least_conn picks the freed task",
        || {
            let (c, name) = connect_and_greet(listen).unwrap();
            drop(c);
            name == first
        },
    );
}

#[test]
fn weights_shift_the_share() {
    let a = TcpBackend::start("heavy");
    let b = TcpBackend::start("light");
    let listen = free_addr();
    let _d = echo_config(listen, &[])
        .task(Task::new("echo", a.addr()).weight(3))
        .task(Task::new("echo", b.addr()).weight(1))
        .start();
    let heavy = (0..40)
        .filter(|_| hello(listen).unwrap() == "heavy")
        .count();
    assert_eq!(heavy, 30);
}

#[test]
fn refused_task_fails_over_to_a_live_one() {
    let live = TcpBackend::start("live");
    let listen = free_addr();
    let d = echo_config(listen, &[dead_addr(), live.addr()]).start();
    for _ in 0..20 {
        assert_eq!(
            hello(listen).unwrap(),
            "live",
            "no client pays for the dead task"
        );
    }
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains("routemesh_upstream_connect_errors_total{service=\"echo\",task=\"t0\"}"),
        "{metrics}"
    );
    let routes = d.routes();
    let dead = &routes["services"][0]["tasks"][0];
    assert_eq!(dead["id"], "t0");
    assert_eq!(dead["state"], "ejected", "{routes}");
}

#[test]
fn connect_timeout_fails_over_fast() {
    let hole = Blackhole::start();
    let live = TcpBackend::start("live");
    let listen = free_addr();
    let _d = echo_config(listen, &[hole.addr(), live.addr()])
        .set("service.echo.connect_timeout", "300ms")
        .start();
    for _ in 0..6 {
        let started = Instant::now();
        assert_eq!(hello(listen).unwrap(), "live");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

#[test]
fn no_live_task_closes_the_client_at_once() {
    let listen = free_addr();
    let d = echo_config(listen, &[dead_addr(), dead_addr()]).start();
    let started = Instant::now();
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    assert!(started.elapsed() < Duration::from_secs(5), "never hangs");
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains("routemesh_no_live_task_total{service=\"echo\"} 1"),
        "{metrics}"
    );
    // A service with no task at all also closes at once.
    let listen2 = free_addr();
    let _d2 = Config::static_tasks()
        .listener(Listener::tcp(listen2, "none"))
        .start();
    let mut s = TcpStream::connect(listen2).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
}

#[test]
fn client_abort_resets_the_backend_side() {
    let upstream = tcp_listener();
    let up_addr = upstream.local_addr().unwrap();
    let listen = free_addr();
    let _d = echo_config(listen, &[up_addr]).start();
    let client = TcpStream::connect(listen).unwrap();
    let (mut conn, _) = upstream.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (&client).write_all(b"x").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(conn.read(&mut buf).unwrap(), 1);
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client); // RST
    let r = conn.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "backend saw {r:?} instead of a reset"
    );
}

#[test]
fn sigterm_drains_open_connections_then_exits_zero() {
    let backend = TcpBackend::start("b");
    let listen = free_addr();
    let mut d = echo_config(listen, &[backend.addr()])
        .set("node.drain_timeout", "1s")
        .start();
    let (mut open, _) = connect_and_greet(listen).unwrap();
    let started = Instant::now();
    let status = d.terminate();
    assert!(status.success(), "exit 0 after drain: {status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for the drain"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // The open connection was closed at the drain timeout.
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4];
    assert!(matches!(open.read(&mut buf), Ok(0) | Err(_)));
    assert!(TcpStream::connect(listen).is_err(), "no longer accepting");
}

/// A listener named `hc` for service `echo` whose one task is `upstream` (a socket the test
/// holds), with `half_close_timeout = timeout`.
fn half_close_config(listen: SocketAddr, upstream: SocketAddr, timeout: &str) -> Daemon {
    Config::static_tasks()
        .node("n1")
        .listener(Listener::tcp(listen, "echo").name("hc"))
        .task(Task::new("echo", upstream).id("t0"))
        .set("service.echo.half_close_timeout", timeout)
        .start()
}

fn half_close_timeouts(d: &Daemon) -> u64 {
    d.metric("routemesh_half_close_timeouts_total{listener=\"hc\",service=\"echo\"}")
        .unwrap_or(0.0) as u64
}

fn active(d: &Daemon) -> u64 {
    d.metric("routemesh_active_connections{listener=\"hc\",service=\"echo\"}")
        .unwrap_or(0.0) as u64
}

/// Whether the peer of `s` has closed its socket entirely: a write is answered by a reset,
/// so a second write fails.
fn peer_closed(s: &TcpStream) -> bool {
    let mut s = s;
    s.write_all(b"?").and_then(|_| s.flush()).is_err()
}

#[test]
fn half_close_timeout_closes_both_sides_when_the_task_never_closes() {
    let upstream = tcp_listener();
    let listen = free_addr();
    let d = half_close_config(listen, upstream.local_addr().unwrap(), "1s");
    let mut client = TcpStream::connect(listen).unwrap();
    client.write_all(b"ping").unwrap();
    let (mut task, _) = upstream.accept().unwrap();
    task.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    // The client's FIN: the task sees EOF after the bytes, then never closes its side.
    client.shutdown(Shutdown::Write).unwrap();
    let fin = Instant::now();
    task.read_to_end(&mut got).expect("the task sees the FIN");
    assert_eq!(got, b"ping");

    // The proxy closes the client's side after the timeout (EOF, not a hang)...
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(
        matches!(client.read(&mut buf), Ok(0) | Err(_)),
        "the client's side is closed"
    );
    assert!(
        fin.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before half_close_timeout",
        fin.elapsed()
    );
    // ... and the task's: its writes are refused, and the connection is gone from the proxy.
    eventually(Duration::from_secs(10), "the task's side is closed", || {
        peer_closed(&task)
    });
    eventually(
        Duration::from_secs(10),
        "counted and no longer open",
        || half_close_timeouts(&d) == 1 && active(&d) == 0,
    );
}

#[test]
fn half_close_timeout_closes_both_sides_when_the_client_never_closes() {
    let upstream = tcp_listener();
    let listen = free_addr();
    let d = half_close_config(listen, upstream.local_addr().unwrap(), "1s");
    let mut client = TcpStream::connect(listen).unwrap();
    let (mut task, _) = upstream.accept().unwrap();
    // The task answers and closes its write side; the client reads it all and stays.
    task.write_all(b"bye").unwrap();
    task.shutdown(Shutdown::Write).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .expect("the client sees the FIN");
    assert_eq!(got, b"bye");
    task.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(
        matches!(task.read(&mut buf), Ok(0) | Err(_)),
        "the task's side is closed"
    );
    eventually(
        Duration::from_secs(10),
        "the client's side is closed",
        || peer_closed(&client),
    );
    eventually(
        Duration::from_secs(10),
        "counted and no longer open",
        || half_close_timeouts(&d) == 1 && active(&d) == 0,
    );
}

#[test]
fn half_closed_connection_that_still_moves_bytes_is_not_cut() {
    let upstream = tcp_listener();
    let listen = free_addr();
    let d = half_close_config(listen, upstream.local_addr().unwrap(), "1s");
    let mut client = TcpStream::connect(listen).unwrap();
    client.write_all(b"get").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (mut task, _) = upstream.accept().unwrap();
    let mut got = Vec::new();
    task.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"get");
    // A slow answer after the client's FIN: a byte every 300 ms for 3 s, then the end.
    let writer = std::thread::spawn(move || {
        for _ in 0..10 {
            task.write_all(b"x").unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        // dropping `task` closes it
    });
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    writer.join().unwrap();
    assert_eq!(answer, b"xxxxxxxxxx", "the whole slow answer arrived");
    assert_eq!(half_close_timeouts(&d), 0);
}

#[test]
fn idle_connection_without_fin_is_never_cut_by_half_close_timeout() {
    let upstream = tcp_listener();
    let listen = free_addr();
    let d = half_close_config(listen, upstream.local_addr().unwrap(), "500ms");
    let mut client = TcpStream::connect(listen).unwrap();
    client.write_all(b"a").unwrap();
    let (mut task, _) = upstream.accept().unwrap();
    let mut buf = [0u8; 8];
    task.read_exact(&mut buf[..1]).unwrap();
    // Idle for four times the timeout, both sides open.
    holds_for(
        Duration::from_secs(2),
        "the idle connection stays open",
        || active(&d) == 1,
    );
    client.write_all(b"b").unwrap();
    task.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    task.read_exact(&mut buf[..1]).unwrap();
    assert_eq!(&buf[..1], b"b");
    task.write_all(b"c").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.read_exact(&mut buf[..1]).unwrap();
    assert_eq!(&buf[..1], b"c");
    assert_eq!(half_close_timeouts(&d), 0);
}
