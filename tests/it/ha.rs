//! High availability on loopback: active health checks with hysteresis, SIGHUP reload,
//! and a long etcd outage with zero data-plane errors.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::http;
use crate::support::load::Load;
use crate::support::net::tcp_listener;
use crate::support::{
    Config, Daemon, Etcd, Etcdctl, Listener, Task, TcpBackend, connect_and_greet, eventually,
    free_addr, hello, holds_for,
};

const WAIT: Duration = Duration::from_secs(10);

fn task_state(d: &Daemon, service: &str, id: &str) -> (String, String) {
    let routes = d.routes();
    for s in routes["services"].as_array().into_iter().flatten() {
        if s["name"] != service {
            continue;
        }
        for t in s["tasks"].as_array().into_iter().flatten() {
            if t["id"] == id {
                return (
                    t["state"].as_str().unwrap_or("").to_string(),
                    t["last_error"].as_str().unwrap_or("").to_string(),
                );
            }
        }
    }
    (String::new(), String::new())
}

/// An HTTP backend whose status code the test controls; answers `name` in the body.
struct HttpBackend {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
}

impl HttpBackend {
    fn start(name: &'static str) -> HttpBackend {
        let listener = tcp_listener();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (status.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                let code = st.load(Ordering::Relaxed);
                std::thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let mut buf = [0u8; 2048];
                    let _ = c.read(&mut buf);
                    let body = format!("{name}\n");
                    let _ = write!(
                        c,
                        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        HttpBackend { addr, status, stop }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

#[test]
fn active_tcp_checks_take_a_dead_task_out_and_bring_it_back() {
    let a = TcpBackend::start("a");
    let b = TcpBackend::start("b");
    let b_addr = b.addr();
    let listen = free_addr();
    let d = Config::static_tasks()
        .listener(Listener::tcp(listen, "echo"))
        .set("service.echo.health.interval", "200ms")
        .set("service.echo.health.timeout", "200ms")
        .set("service.echo.health.unhealthy_threshold", 2)
        .set("service.echo.health.healthy_threshold", 2)
        .task(Task::new("echo", a.addr()).id("a"))
        .task(Task::new("echo", b_addr).id("b"))
        .start();
    eventually(WAIT, "both healthy", || {
        task_state(&d, "echo", "a").0 == "healthy" && task_state(&d, "echo", "b").0 == "healthy"
    });
    b.stop();
    eventually(WAIT, "b marked unhealthy by the checker", || {
        task_state(&d, "echo", "b").0 == "unhealthy"
    });
    let (_, why) = task_state(&d, "echo", "b");
    assert!(why.contains("health check"), "why is shown: {why}");
    for _ in 0..10 {
        assert_eq!(hello(listen).unwrap(), "a");
    }
    let _b2 = TcpBackend::start_at("b", b_addr);
    eventually(WAIT, "b healthy again", || {
        task_state(&d, "echo", "b").0 == "healthy"
    });
    eventually(WAIT, "b serves again", || {
        (0..4).any(|_| hello(listen).ok().as_deref() == Some("b"))
    });
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains("routemesh_health_checks_total{result=\"fail\",service=\"echo\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("routemesh_tasks{service=\"echo\",state=\"healthy\"} 2"));
}

#[test]
fn http_checks_catch_a_task_that_accepts_but_fails() {
    let good = HttpBackend::start("good");
    let sick = HttpBackend::start("sick");
    let listen = free_addr();
    let d = Config::static_tasks()
        .listener(Listener::tcp(listen, "web"))
        .set("service.web.health.kind", "http")
        .set("service.web.health.path", "/healthz")
        .set("service.web.health.expect_status", "200-299")
        .set("service.web.health.interval", "200ms")
        .set("service.web.health.unhealthy_threshold", 2)
        .task(Task::new("web", good.addr).id("good"))
        .task(Task::new("web", sick.addr).id("sick"))
        .start();
    sick.status.store(503, Ordering::Relaxed);
    eventually(WAIT, "sick marked unhealthy", || {
        task_state(&d, "web", "sick").0 == "unhealthy"
    });
    assert!(task_state(&d, "web", "sick").1.contains("503"));
    for _ in 0..10 {
        let (code, body) = http::get(listen, "/");
        assert_eq!((code, body.trim()), (200, "good"));
    }
    sick.status.store(200, Ordering::Relaxed);
    eventually(WAIT, "sick recovers", || {
        task_state(&d, "web", "sick").0 == "healthy"
    });
}

#[test]
fn sighup_reload_changes_listeners_without_touching_open_connections() {
    let a = TcpBackend::start("a");
    let b = TcpBackend::start("b");
    let l1 = free_addr();
    let l2 = free_addr();
    // Listener `one` on l1 for service `one_to`, and the tasks of `sa` and `sb`.
    let base = |one_to: &str| {
        Config::static_tasks()
            .listener(Listener::tcp(l1, one_to).name("one"))
            .task(Task::new("sa", a.addr()))
            .task(Task::new("sb", b.addr()))
    };
    let mut d = base("sa").start();
    d.wait_ready();
    let (mut open, name) = connect_and_greet(l1).unwrap();
    assert_eq!(name, "a");
    assert!(std::net::TcpStream::connect(l2).is_err());

    // Add a listener.
    d.write_config(
        &base("sa")
            .listener(Listener::tcp(l2, "sb").name("two"))
            .to_toml(),
    );
    d.signal(libc::SIGHUP);
    eventually(WAIT, "new listener serves", || {
        hello(l2).ok().as_deref() == Some("b")
    });
    // The open connection on the unchanged listener still works.
    open.write_all(b"still here\n").unwrap();
    let mut buf = [0u8; 11];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here\n");

    // An invalid file is refused whole: both listeners keep serving.
    d.write_config(
        &base("sa")
            .listener(Listener::tcp(l2, "sb").set("typo", 1))
            .to_toml(),
    );
    d.signal(libc::SIGHUP);
    eventually(WAIT, "reload error logged with position", || {
        d.log().contains("routemesh.toml:") && d.log().contains("unknown key `listener.1.typo`")
    });
    assert_eq!(hello(l2).unwrap(), "b");
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains("routemesh_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("routemesh_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );

    // Remove the second listener and re-point the first one at another service.
    d.write_config(&base("sb").to_toml());
    d.signal(libc::SIGHUP);
    eventually(WAIT, "second listener removed", || {
        std::net::TcpStream::connect(l2).is_err()
    });
    eventually(WAIT, "first listener re-pointed", || {
        hello(l1).ok().as_deref() == Some("b")
    });
    open.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x", "connections on a changed listener keep running");
}

#[test]
fn a_minute_without_etcd_costs_no_request_and_keeps_the_registration() {
    let mut etcd = Etcd::start();
    let backend = TcpBackend::start("w");
    let l1 = free_addr();
    let l2 = free_addr();
    let cfg = |node: &str, listen: SocketAddr| {
        Config::etcd(&[etcd.endpoint()])
            .node(node)
            .set("discovery.node_ttl", "2s")
            .set("discovery.dial_timeout", "1s")
            .listener(Listener::tcp(listen, "echo"))
    };
    let mut n1 = cfg("n1", l1)
        .task(Task::new("echo", backend.addr()).id("w1"))
        .start();
    let mut n2 = cfg("n2", l2).start();
    n1.wait_ready();
    n2.wait_ready();
    eventually(WAIT, "n2 routes to n1's task", || {
        hello(l2).ok().as_deref() == Some("w")
    });

    // A connection through each node every 50 ms, each answered by the task.
    let probe = Arc::new(|l: SocketAddr| match hello(l) {
        Ok(n) if n == "w" => Ok(n),
        Ok(n) => Err(format!("answered by {n}")),
        Err(e) => Err(e.to_string()),
    });
    let load = Load::with_probe(
        &[l1, l2],
        Duration::from_millis(50),
        Duration::from_secs(120),
        probe,
    );
    let failed = |load: &Load| {
        load.samples()
            .into_iter()
            .filter(|s| s.outcome.is_err())
            .collect::<Vec<_>>()
    };
    load.run_through(10, WAIT);
    etcd.stop();
    // The outage is the scenario: a minute without etcd, over which no connection fails.
    holds_for(
        Duration::from_secs(60),
        "no failed connection while etcd is down",
        || failed(&load).is_empty(),
    );
    etcd.start_again();
    eventually(
        Duration::from_secs(15),
        "discovery back on both nodes",
        || {
            [&n1, &n2].iter().all(|d| {
                d.admin_get("/metrics")
                    .1
                    .contains("routemesh_discovery_up 1")
            })
        },
    );
    // The node's lease-bound task is (still or again) registered.
    eventually(WAIT, "task registered after the outage", || {
        etcd.get("/routemesh/tasks/echo/w1").is_some()
            && etcd.get("/routemesh/nodes/n1/alive").is_some()
    });
    // Three more seconds of traffic after the recovery.
    load.run_through(60, Duration::from_secs(15));
    let samples = load.stop();
    let failures: Vec<_> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(failures.is_empty(), "no data-plane error: {failures:?}");
    assert!(samples.len() > 1000, "traffic flowed throughout");
}

#[test]
fn sigterm_finishes_in_flight_http_requests_and_closes_idle_ones() {
    // A backend that takes 1.5 s to answer; it counts the requests it received.
    let listener = tcp_listener();
    let slow = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                if c.read(&mut buf).is_ok_and(|n| n > 0) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(1500));
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslow\n");
            });
        }
    });
    let listen = free_addr();
    let mut d = Config::static_tasks()
        .set("node.drain_timeout", "20s")
        .listener(Listener::http(listen, "web"))
        .set("service.web.health.interval", "1h")
        .task(Task::new("web", slow))
        .start();
    d.wait_ready();
    // An idle keep-alive connection that has been served once.
    let mut idle = std::net::TcpStream::connect(listen).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    idle.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A request in flight when SIGTERM arrives: it has reached the task.
    let in_flight = std::thread::spawn(move || http::get(listen, "/b"));
    eventually(WAIT, "the second request at the task", || {
        received.load(Ordering::SeqCst) == 2
    });
    let started = Instant::now();
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    let (code, body) = in_flight.join().unwrap();
    assert_eq!(
        (code, body.trim()),
        (200, "slow"),
        "the in-flight request finished"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "idle keep-alive connections did not hold the drain: {:?}",
        started.elapsed()
    );
    assert_eq!(
        idle.read(&mut buf).unwrap_or(0),
        0,
        "idle connection closed"
    );
}
