//! High availability on loopback: active health checks with hysteresis, SIGHUP reload,
//! and a long etcd outage with zero data-plane errors.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Daemon, Etcd, TcpBackend, connect_and_greet, eventually, free_addr, hello};

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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
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
    let d = Daemon::start(&format!(
        "[discovery]\nbackend = \"static\"\n[[listener]]\nlisten = \"{listen}\"\nservice = \"echo\"\n\
         [service.echo.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n\
         [[task]]\nservice = \"echo\"\naddr = \"{}\"\nid = \"a\"\n[[task]]\nservice = \"echo\"\naddr = \"{b_addr}\"\nid = \"b\"\n",
        a.addr()
    ));
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
    let d = Daemon::start(&format!(
        "[discovery]\nbackend = \"static\"\n[[listener]]\nlisten = \"{listen}\"\nservice = \"web\"\n\
         [service.web.health]\nkind = \"http\"\npath = \"/healthz\"\nexpect_status = \"200-299\"\ninterval = \"200ms\"\nunhealthy_threshold = 2\n\
         [[task]]\nservice = \"web\"\naddr = \"{}\"\nid = \"good\"\n[[task]]\nservice = \"web\"\naddr = \"{}\"\nid = \"sick\"\n",
        good.addr, sick.addr
    ));
    sick.status.store(503, Ordering::Relaxed);
    eventually(WAIT, "sick marked unhealthy", || {
        task_state(&d, "web", "sick").0 == "unhealthy"
    });
    assert!(task_state(&d, "web", "sick").1.contains("503"));
    for _ in 0..10 {
        let (code, body) = support::http_get(listen, "/");
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
    let base = format!(
        "[discovery]\nbackend = \"static\"\n[[listener]]\nname = \"one\"\nlisten = \"{l1}\"\nservice = \"sa\"\n\
         [[task]]\nservice = \"sa\"\naddr = \"{}\"\n[[task]]\nservice = \"sb\"\naddr = \"{}\"\n",
        a.addr(),
        b.addr()
    );
    let mut d = Daemon::start(&base);
    d.wait_ready();
    let (mut open, name) = connect_and_greet(l1).unwrap();
    assert_eq!(name, "a");
    assert!(std::net::TcpStream::connect(l2).is_err());

    // Add a listener.
    d.write_config(&format!(
        "{base}[[listener]]\nname = \"two\"\nlisten = \"{l2}\"\nservice = \"sb\"\n"
    ));
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
    d.write_config(&format!(
        "{base}[[listener]]\nlisten = \"{l2}\"\nservice = \"sb\"\ntypo = 1\n"
    ));
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
    d.write_config(&base.replace("service = \"sa\"\n[[task]]", "service = \"sb\"\n[[task]]"));
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
    let cfg = |node: &str, listen: SocketAddr, task: &str| {
        format!(
            "[node]\nname = \"{node}\"\n[discovery]\nendpoints = [\"{}\"]\nnode_ttl = \"2s\"\ndial_timeout = \"1s\"\n\
             [[listener]]\nlisten = \"{listen}\"\nservice = \"echo\"\n{task}",
            etcd.endpoint()
        )
    };
    let task = format!(
        "[[task]]\nservice = \"echo\"\naddr = \"{}\"\nid = \"w1\"\n",
        backend.addr()
    );
    let mut n1 = Daemon::start(&cfg("n1", l1, &task));
    let mut n2 = Daemon::start(&cfg("n2", l2, ""));
    n1.wait_ready();
    n2.wait_ready();
    eventually(WAIT, "n2 routes to n1's task", || {
        hello(l2).ok().as_deref() == Some("w")
    });

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for l in [l1, l2] {
                    match hello(l) {
                        Ok(n) if n == "w" => served.fetch_add(1, Ordering::Relaxed),
                        _ => failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    etcd.stop();
    std::thread::sleep(Duration::from_secs(60));
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
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no data-plane error");
    assert!(
        served.load(Ordering::Relaxed) > 1000,
        "traffic flowed throughout"
    );
}

#[test]
fn sigterm_finishes_in_flight_http_requests_and_closes_idle_ones() {
    // A backend that takes 1.5 s to answer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let _ = c.read(&mut buf);
                std::thread::sleep(Duration::from_millis(1500));
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslow\n");
            });
        }
    });
    let listen = free_addr();
    let mut d = Daemon::start(&format!(
        "[node]\ndrain_timeout = \"20s\"\n[discovery]\nbackend = \"static\"\n\
         [[listener]]\nlisten = \"{listen}\"\nprotocol = \"http\"\nservice = \"web\"\n\
         [service.web.health]\ninterval = \"1h\"\n\
         [[task]]\nservice = \"web\"\naddr = \"{slow}\"\n"
    ));
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
    // A request in flight when SIGTERM arrives.
    let in_flight = std::thread::spawn(move || support::http_get(listen, "/b"));
    std::thread::sleep(Duration::from_millis(300));
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
