//! udp listeners: CoAP (libcoap's server and client) and DNS (dnsmasq and dig) through the
//! real daemon; sessions, `udp_responses`, failover when a server dies, the limits and bad
//! input (max_sessions, 65,507-byte and empty datagrams, oversized ones, foreign sources, a
//! task that never answers), reload and removal, a listener published in etcd with
//! `publish add … /udp`, and the 3-node lab (every node reaches the one server, Maglev on
//! `source_ip` keeps a client on one server through every node, replies leave from the
//! address the client sent to on a wildcard listener with two addresses, IPv4 and IPv6).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::coap::{self, CoapServer};
use crate::support::daemon::service_tasks;
use crate::support::dnsmasq::{Dnsmasq, dig};
use crate::support::{
    Config, Daemon, Etcd, Listener, Task, UdpEcho, UdpMode, cli_ok, eventually, free_port,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn udp_addr() -> SocketAddr {
    SocketAddr::new(LOCALHOST, free_port())
}

/// The `udp_sessions` of each task of `service` in `/routes`, by task id.
fn sessions_by_task(routes: &Value, service: &str) -> Vec<(String, u64)> {
    service_tasks(routes, service)
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap_or("").to_string(),
                t["udp_sessions"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn sessions_gauge(d: &Daemon, listener: &str, service: &str) -> f64 {
    d.metric(&format!(
        "routemesh_udp_sessions{{listener=\"{listener}\",service=\"{service}\"}}"
    ))
    .unwrap_or(-1.0)
}

fn dropped(d: &Daemon, listener: &str, reason: &str) -> f64 {
    d.metric(&format!(
        "routemesh_udp_dropped_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
    ))
    .unwrap_or(0.0)
}

/// One datagram to `to` from `s`, and the reply (or `None` within `wait`).
fn exchange(s: &UdpSocket, to: SocketAddr, data: &[u8], wait: Duration) -> Option<Vec<u8>> {
    s.send_to(data, to).expect("send");
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 70_000];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, to, "the reply comes from the listener's address");
            Some(buf[..n].to_vec())
        }
        Err(_) => None,
    }
}

fn client() -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()
}

#[test]
fn coap_requests_reach_the_server_with_metrics_and_sessions() {
    let server = CoapServer::start("s1");
    let listen = udp_addr();
    let d = Config::static_tasks()
        .listener(Listener::udp(listen, "coap").name("coap"))
        .task(Task::new("coap", server.addr()).id("c1"))
        .start();
    for _ in 0..3 {
        assert_eq!(
            coap::get(listen, "who", None, Duration::from_secs(2)).as_deref(),
            Some("s1"),
            "{}",
            d.log_tail(30)
        );
    }
    // The real client's three requests came from three ports: three sessions on c1.
    let routes = d.routes();
    assert_eq!(sessions_by_task(&routes, "coap"), [("c1".to_string(), 3)]);
    assert_eq!(sessions_gauge(&d, "coap", "coap"), 3.0);
    let rx = d
        .metric(
            "routemesh_udp_datagrams_total{direction=\"rx\",listener=\"coap\",service=\"coap\"}",
        )
        .unwrap_or(0.0);
    let tx = d
        .metric(
            "routemesh_udp_datagrams_total{direction=\"tx\",listener=\"coap\",service=\"coap\"}",
        )
        .unwrap_or(0.0);
    assert!(rx >= 3.0 && tx >= 3.0, "rx {rx} tx {tx}");
    assert!(
        d.metric("routemesh_bytes_total{direction=\"rx\",listener=\"coap\",service=\"coap\"}")
            .unwrap_or(0.0)
            > 0.0
    );
    // No default TCP probe for a udp service: the task is not marked unhealthy.
    let health = d.metric_sum("routemesh_health_checks_total{service=\"coap\"");
    assert_eq!(health, 0.0, "no active check without [service.coap.health]");
}

#[test]
fn dns_through_a_udp_listener_with_one_response_per_session() {
    let dns = Dnsmasq::start(&[("a.mesh.test", "10.9.8.7"), ("b.mesh.test", "10.9.8.8")]);
    let listen = udp_addr();
    let d = Config::static_tasks()
        .listener(Listener::udp(listen, "dns").name("dns"))
        .set("service.dns.udp_responses", 1)
        // Active checks are opt-in for udp services: dnsmasq also listens on TCP.
        .set("service.dns.health.kind", "tcp")
        .set("service.dns.health.interval", "200ms")
        .task(Task::new("dns", dns.addr()).id("d1"))
        .start();
    eventually(
        Duration::from_secs(5),
        "the opted-in active check runs",
        || {
            d.metric("routemesh_health_checks_total{result=\"pass\",service=\"dns\"}")
                .unwrap_or(0.0)
                > 0.0
        },
    );
    for _ in 0..5 {
        assert_eq!(dig(listen, "a.mesh.test", "A").unwrap(), ["10.9.8.7"]);
        assert_eq!(dig(listen, "b.mesh.test", "A").unwrap(), ["10.9.8.8"]);
    }
    assert!(dns.queries() >= 10, "dnsmasq answered every query");
    // Each session ended with its one reply.
    eventually(Duration::from_secs(2), "no DNS session left open", || {
        sessions_gauge(&d, "dns", "dns") == 0.0
            && sessions_by_task(&d.routes(), "dns") == [("d1".to_string(), 0)]
    });
    let tx = d
        .metric("routemesh_udp_datagrams_total{direction=\"tx\",listener=\"dns\",service=\"dns\"}")
        .unwrap_or(0.0);
    assert_eq!(tx, 10.0);
    // One client port asking again and again: each query opens a session of its own, and
    // each is answered (none goes to a session that has had its one reply).
    let c = client();
    for id in 0..20u16 {
        let reply = exchange(
            &c,
            listen,
            &dns_query(id, "a.mesh.test"),
            Duration::from_secs(2),
        )
        .unwrap_or_else(|| panic!("query {id} unanswered"));
        assert_eq!(&reply[..2], &id.to_be_bytes());
        assert_eq!(&reply[reply.len() - 4..], &[10, 9, 8, 7]);
    }
    eventually(Duration::from_secs(2), "no DNS session left open", || {
        sessions_gauge(&d, "dns", "dns") == 0.0
    });
}

/// A DNS query for the A record of `name`, recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn a_dead_server_is_replaced_within_a_second_and_its_sessions_go() {
    let s1 = CoapServer::start("s1");
    let s2 = CoapServer::start("s2");
    let listen = udp_addr();
    let d = Config::static_tasks()
        .listener(Listener::udp(listen, "coap").name("coap"))
        .task(Task::new("coap", s1.addr()).id("c1"))
        .task(Task::new("coap", s2.addr()).id("c2"))
        .start();
    // Four clients, each with its own session (round robin: two per server).
    let clients: Vec<UdpSocket> = (0..4).map(|_| coap::client_socket(LOCALHOST)).collect();
    let mut on = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (who, _, _) = coap::request(
            c,
            listen,
            i as u16,
            "who",
            Duration::from_millis(200),
            Duration::from_secs(3),
        )
        .expect("an answer");
        on.push(who);
    }
    assert_eq!(on.iter().filter(|w| *w == "s1").count(), 2, "{on:?}");
    let routes = d.routes();
    assert_eq!(
        sessions_by_task(&routes, "coap"),
        [("c1".to_string(), 2), ("c2".to_string(), 2)]
    );
    s1.kill();
    // The next request of every client is answered by s2 within 1 s (a client sends again
    // every 200 ms, as CoAP clients retransmit).
    for (i, c) in clients.iter().enumerate() {
        let (who, _, took) = coap::request(
            c,
            listen,
            100 + i as u16,
            "who",
            Duration::from_millis(200),
            Duration::from_secs(1),
        )
        .unwrap_or_else(|| panic!("client {i} not answered within 1 s:\n{}", d.log_tail(30)));
        assert_eq!(who, "s2");
        assert!(took <= Duration::from_secs(1), "{took:?}");
    }
    let routes = d.routes();
    assert_eq!(
        sessions_by_task(&routes, "coap"),
        [("c1".to_string(), 0), ("c2".to_string(), 4)],
        "the dead server's sessions are gone"
    );
    assert!(
        d.metric_sum("routemesh_upstream_connect_errors_total{service=\"coap\",task=\"c1\"}")
            >= 1.0,
        "the port unreachable counted as a failed connect"
    );
}

#[test]
fn limits_and_bad_input_leave_the_daemon_serving() {
    let echo = UdpEcho::start(UdpMode::Echo);
    let silent = UdpEcho::start(UdpMode::Silent);
    let (listen, listen6, quiet) = (
        udp_addr(),
        SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], free_port())),
        udp_addr(),
    );
    let d = Config::static_tasks()
        .listener(
            Listener::udp(listen, "echo")
                .name("echo")
                .set("max_sessions", 3),
        )
        .listener(Listener::udp(listen6, "echo").name("echo6"))
        .listener(Listener::udp(quiet, "quiet").name("quiet"))
        .set("service.quiet.udp_idle_timeout", "1s")
        .task(Task::new("echo", echo.addr()).id("e1"))
        .task(Task::new("quiet", silent.addr()).id("q1"))
        .start();
    let w = Duration::from_secs(2);
    // Whole datagrams, the largest and the empty one.
    let c1 = client();
    let big: Vec<u8> = (0..65_507).map(|i| (i % 251) as u8).collect();
    assert_eq!(exchange(&c1, listen, &big, w).as_deref(), Some(&big[..]));
    assert_eq!(exchange(&c1, listen, b"", w).as_deref(), Some(&b""[..]));
    assert_eq!(exchange(&c1, listen, b"hi", w).as_deref(), Some(&b"hi"[..]));
    // max_sessions = 3: a fourth client is dropped and counted; the three keep working.
    let (c2, c3, c4) = (client(), client(), client());
    assert!(exchange(&c2, listen, b"2", w).is_some());
    assert!(exchange(&c3, listen, b"3", w).is_some());
    assert_eq!(
        exchange(&c4, listen, b"4", Duration::from_millis(500)),
        None
    );
    assert_eq!(dropped(&d, "echo", "max_sessions"), 1.0);
    assert_eq!(sessions_gauge(&d, "echo", "echo"), 3.0);
    assert_eq!(
        exchange(&c1, listen, b"again", w).as_deref(),
        Some(&b"again"[..])
    );
    // Over IPv6 a datagram can be larger than 65,507 bytes: dropped and counted.
    let c6 = UdpSocket::bind("[::1]:0").unwrap();
    let huge = vec![7u8; 65_508];
    c6.send_to(&huge, listen6).unwrap();
    assert_eq!(exchange(&c6, listen6, &big, w).as_deref(), Some(&big[..]));
    assert_eq!(dropped(&d, "echo6", "too_large"), 1.0);
    // A foreign source sending to a session's socket: nothing reaches the client, the
    // session goes on.
    let session_sockets = echo.peers();
    assert!(!session_sockets.is_empty());
    let foreign = client();
    for s in &session_sockets {
        foreign.send_to(b"spoofed reply", s).unwrap();
    }
    c1.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        c1.recv_from(&mut buf).is_err(),
        "no datagram from a foreign source reaches the client"
    );
    assert_eq!(
        exchange(&c1, listen, b"still", w).as_deref(),
        Some(&b"still"[..])
    );
    // A task that never answers: the session expires after udp_idle_timeout (1 s).
    let q = client();
    assert_eq!(
        exchange(&q, quiet, b"anyone?", Duration::from_millis(200)),
        None
    );
    assert_eq!(silent.received(), 1);
    assert_eq!(sessions_gauge(&d, "quiet", "quiet"), 1.0);
    let started = Instant::now();
    eventually(Duration::from_secs(3), "the silent session expired", || {
        sessions_gauge(&d, "quiet", "quiet") == 0.0
    });
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before its idle timeout"
    );
    // Serving throughout.
    assert_eq!(
        exchange(&c2, listen, b"end", w).as_deref(),
        Some(&b"end"[..])
    );
    assert!(d.log().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn reload_adds_and_removes_udp_listeners_beside_tcp_on_the_same_port() {
    let echo = UdpEcho::start(UdpMode::Echo);
    let backend = crate::support::TcpBackend::start("tcp");
    let port = free_port();
    let addr = SocketAddr::new(LOCALHOST, port);
    let base = Config::static_tasks()
        .listener(Listener::tcp(addr, "tcp").name("tcp"))
        .task(Task::new("tcp", backend.addr()))
        .task(Task::new("echo", echo.addr()));
    let mut d = base.start();
    let c = client();
    assert_eq!(exchange(&c, addr, b"x", Duration::from_millis(300)), None);
    // SIGHUP with a udp listener on the same address as the tcp one.
    d.write_config(
        &base
            .clone()
            .listener(Listener::udp(addr, "echo").name("u"))
            .to_toml(),
    );
    d.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "the udp listener answers", || {
        exchange(&c, addr, b"y", Duration::from_millis(200)).is_some()
    });
    assert_eq!(
        crate::support::hello(addr).unwrap(),
        "tcp",
        "the tcp listener is untouched"
    );
    assert_eq!(sessions_gauge(&d, "u", "echo"), 1.0);
    // Removed: it stops at once and its sessions end.
    d.write_config(&base.to_toml());
    d.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "the udp listener is gone", || {
        sessions_gauge(&d, "u", "echo") == 0.0
            && exchange(&c, addr, b"z", Duration::from_millis(200)).is_none()
    });
    assert_eq!(crate::support::hello(addr).unwrap(), "tcp");
    assert!(d.is_running());
}

#[test]
fn a_udp_listener_published_with_the_cli_serves() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let server = CoapServer::start("pub");
    let mut d = Daemon::start(&format!(
        "[node]\nname = \"n1\"\nadvertise = \"127.0.0.1\"\n[discovery]\nendpoints = [\"{ep}\"]\nnode_ttl = \"2s\"\n"
    ));
    d.wait_ready();
    let port = free_port();
    cli_ok(&[
        "task",
        "add",
        "coap",
        &server.addr().to_string(),
        "--etcd",
        &ep,
        "--id",
        "c1",
    ]);
    let out = cli_ok(&[
        "publish",
        "add",
        "coap",
        &format!("{port}/udp"),
        "--etcd",
        &ep,
        "--listen",
        "127.0.0.1",
    ]);
    assert_eq!(out.trim(), format!("coap-{port}-udp"));
    // A tcp listener may take the same port number.
    cli_ok(&[
        "publish",
        "add",
        "other",
        &format!("{port}/tcp"),
        "--etcd",
        &ep,
        "--listen",
        "127.0.0.1",
    ]);
    let target = SocketAddr::new(LOCALHOST, port);
    eventually(
        Duration::from_secs(10),
        "the published udp listener answers",
        || coap::get(target, "who", None, Duration::from_secs(1)).as_deref() == Some("pub"),
    );
    let routes = d.routes();
    let published: Vec<(String, String, String)> = routes["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["protocol"].as_str().unwrap().to_string(),
                p["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        published.contains(&(format!("coap-{port}-udp"), "udp".into(), "bind".into()))
            && published.contains(&(format!("other-{port}-tcp"), "tcp".into(), "bind".into())),
        "{published:?}"
    );
    // Removed from etcd: the listener stops.
    cli_ok(&["publish", "rm", &format!("coap-{port}-udp"), "--etcd", &ep]);
    eventually(
        Duration::from_secs(10),
        "the published udp listener is gone",
        || coap::get(target, "who", None, Duration::from_secs(1)).is_none(),
    );
}

// ---- the 3-node lab ----

#[test]
fn lab_coap_through_every_node_maglev_and_reply_source() {
    use crate::support::lab::{Lab, Shape};
    let mut lab = Lab::start("tcp");
    let shape = Shape {
        udp: true,
        ..Shape::default()
    };
    let s1 = lab.start_coap(1, "s1");
    for i in 1..=3 {
        let tasks = if i == 1 {
            vec![Task::new("coap", s1).id("s1")]
        } else {
            vec![]
        };
        lab.start_daemon_shaped(i, &tasks, shape);
    }
    // Three clients, one through each node, all reach the one server.
    for i in 1..=3 {
        let target = lab.coap(i);
        crate::support::wait::eventually_ok(
            Duration::from_secs(10),
            &format!("coap via n{i}"),
            || match coap::get(target, "who", None, Duration::from_secs(1)) {
                Some(w) if w == "s1" => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    // A second server: with maglev on source_ip, each client lands on one server through
    // every node. Clients: the test's own address and each node's (from its namespace).
    let s2 = lab.start_coap(2, "s2");
    lab.cli_ok(&[
        "task",
        "add",
        "coap",
        &s2.to_string(),
        "--id",
        "s2",
        "--node",
        "n2",
    ]);
    eventually(
        Duration::from_secs(10),
        "every node routes to both servers",
        || (1..=3).all(|i| lab.routable(i, "coap").is_some_and(|r| r.len() == 2)),
    );
    let mut servers_seen = BTreeSet::new();
    for from in [None, Some(1), Some(2), Some(3)] {
        let mut seen = BTreeSet::new();
        for i in 1..=3 {
            for _ in 0..2 {
                let who = lab
                    .coap_get_from(from, lab.coap(i), "who")
                    .unwrap_or_else(|| panic!("client {from:?} via n{i}: no answer"));
                seen.insert(who);
            }
        }
        assert_eq!(seen.len(), 1, "client {from:?} landed on {seen:?}");
        servers_seen.extend(seen);
    }
    assert!(!servers_seen.is_empty());
    // Reply source: n1 has a second IPv4 and two IPv6 addresses; its wildcard listeners
    // ([::]:PORT, dual-stack) answer from the address each datagram was sent to.
    let extra4 = lab.add_address(1, 101);
    let (v6a, v6b) = lab.add_ipv6(1);
    let me6 = lab.root_ipv6();
    let port = free_port();
    lab.cli_ok(&[
        "publish",
        "add",
        "coap",
        &format!("{port}/udp"),
        "--name",
        "coap6",
        "--listen",
        "::",
    ]);
    let targets: Vec<SocketAddr> = [
        IpAddr::V4(lab.ip(1)),
        IpAddr::V4(extra4),
        v6a.into(),
        v6b.into(),
    ]
    .into_iter()
    .map(|ip| SocketAddr::new(ip, port))
    .collect();
    for (n, target) in targets.iter().enumerate() {
        let sock = if target.is_ipv4() {
            coap::client_socket(IpAddr::V4(lab.root_ip()))
        } else {
            coap::client_socket(me6.into())
        };
        let (who, from, _) = eventually_reply(&sock, *target, n as u16);
        assert!(who == "s1" || who == "s2");
        assert_eq!(
            from, *target,
            "the reply leaves from the address the client sent to"
        );
    }
}

/// A CoAP reply to `target` (retried for up to 10 s while the listener comes up).
fn eventually_reply(
    sock: &UdpSocket,
    target: SocketAddr,
    id: u16,
) -> (String, SocketAddr, Duration) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = coap::request(
            sock,
            target,
            id,
            "who",
            Duration::from_millis(300),
            Duration::from_secs(1),
        ) {
            return r;
        }
        assert!(Instant::now() < deadline, "no reply from {target}");
    }
}
