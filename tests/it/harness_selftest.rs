//! Self-tests of the integration-test harness (tests/it/support) that do not
//! need the routemesh daemon: real etcd, real TCP backends, helper parsing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::support::etcd::{parse_get_json, parse_lease_grant};
use crate::support::http::{parse_response, read_response};
use crate::support::process::require_binary;
use crate::support::{
    Blackhole, Config, Etcd, EtcdCluster, Etcdctl, Listener, Task, TcpBackend, cli_ok,
    connect_and_greet, dead_addr, echo_roundtrip, eventually, eventually_value, free_addr, hello,
    holds_for, tempdir,
};

#[test]
fn etcd_put_get_stop_start_again_keeps_data() {
    let mut etcd = Etcd::start();
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));

    etcd.put("/rm/a", "1");
    etcd.put("/rm/b", "-starts with a dash\nand has a newline");
    etcd.put("/other", "x");
    assert_eq!(etcd.get("/rm/a").as_deref(), Some("1"));
    assert_eq!(etcd.get("/missing"), None);
    assert_eq!(
        etcd.get_prefix("/rm/"),
        vec![
            ("/rm/a".to_string(), "1".to_string()),
            (
                "/rm/b".to_string(),
                "-starts with a dash\nand has a newline".to_string()
            ),
        ]
    );
    assert_eq!(etcd.del("/other"), 1);
    assert_eq!(etcd.del("/other"), 0);
    let rev = etcd.revision();
    assert!(rev >= 4, "revision {rev}");

    // SIGSTOP/SIGCONT by PID: a paused member still completes TCP handshakes.
    etcd.pause();
    assert!(TcpStream::connect_timeout(&etcd.client_addr(), Duration::from_secs(1)).is_ok());
    etcd.resume();
    assert_eq!(etcd.get("/rm/a").as_deref(), Some("1"));

    let pid = etcd.pid();
    etcd.stop();
    assert!(!etcd.is_running());
    assert!(
        TcpStream::connect_timeout(&etcd.client_addr(), Duration::from_secs(1)).is_err(),
        "etcd (pid {pid}) still accepts connections after stop"
    );

    etcd.start_again();
    assert_ne!(etcd.pid(), pid);
    assert_eq!(etcd.get_prefix("/rm/").len(), 2, "data survives a restart");
    assert_eq!(etcd.get("/rm/a").as_deref(), Some("1"));
}

#[test]
fn etcd_lease_expires() {
    let etcd = Etcd::start();
    let lease = etcd.put_with_lease("/rm/lease/k", "v", 2);
    assert!(
        !lease.is_empty() && lease.chars().all(|c| c.is_ascii_hexdigit()),
        "lease id {lease:?}"
    );
    assert_eq!(etcd.get("/rm/lease/k").as_deref(), Some("v"));
    eventually(Duration::from_secs(15), "leased key to expire", || {
        etcd.get("/rm/lease/k").is_none()
    });

    let lease = etcd.lease_grant(30);
    etcd.put_on_lease("/rm/lease/k2", "v2", &lease);
    etcd.lease_keepalive_once(&lease);
    etcd.lease_revoke(&lease);
    assert_eq!(etcd.get("/rm/lease/k2"), None, "revoke deletes the key");
}

#[test]
fn etcd_cluster_survives_member_kill() {
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(cluster.endpoints_csv(), endpoints.join(","));

    cluster.put("/rm/cluster/before", "1");
    cluster.kill(0);
    assert_eq!(cluster.live_endpoints().len(), 2);

    // A new leader may have to be elected first.
    eventually(
        Duration::from_secs(20),
        "put via the remaining members",
        || {
            cluster
                .try_etcdctl(&["put", "/rm/cluster/after", "2"])
                .is_ok()
        },
    );
    assert_eq!(
        cluster.get_prefix("/rm/cluster/"),
        vec![
            ("/rm/cluster/after".to_string(), "2".to_string()),
            ("/rm/cluster/before".to_string(), "1".to_string()),
        ]
    );
    // Each surviving member answers on its own endpoint.
    assert_eq!(
        cluster.member(1).get("/rm/cluster/after").as_deref(),
        Some("2")
    );

    cluster.member_mut(0).start_again();
    let value = eventually_value(
        Duration::from_secs(10),
        "restarted member to catch up",
        || cluster.member(0).get("/rm/cluster/after"),
    );
    assert_eq!(value, "2");
}

#[test]
fn tcp_backend_writes_name_and_echoes_with_half_close() {
    let backend = TcpBackend::start("alpha");
    assert_eq!(backend.name(), "alpha");
    assert_eq!(hello(backend.addr()).unwrap(), "alpha");

    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (name, echoed) = echo_roundtrip(backend.addr(), &payload).unwrap();
    assert_eq!(name, "alpha");
    assert_eq!(echoed, payload);

    // Half-close by hand: after our FIN we still read the echo, then EOF.
    let (mut s, name) = connect_and_greet(backend.addr()).unwrap();
    assert_eq!(name, "alpha");
    s.write_all(b"ping").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"ping");

    assert_eq!(backend.connections(), 3);
    let (held, _) = connect_and_greet(backend.addr()).unwrap();
    eventually(Duration::from_secs(5), "one active connection", || {
        backend.active() == 1
    });
    drop(held);
    eventually(Duration::from_secs(5), "no active connections", || {
        backend.active() == 0
    });
    assert_eq!(backend.connections(), 4);

    let addr = backend.addr();
    let (mut open, _) = connect_and_greet(addr).unwrap();
    backend.stop();
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let mut buf = [0u8; 16];
    assert!(
        matches!(open.read(&mut buf), Ok(0) | Err(_)),
        "stop cuts open connections"
    );

    // A backend can come back on the same address.
    let again = TcpBackend::start_at("alpha2", addr);
    assert_eq!(hello(addr).unwrap(), "alpha2");
    drop(again);
}

#[test]
fn dead_addr_refuses() {
    let addr = dead_addr();
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn blackhole_connect_times_out() {
    let bh = Blackhole::start();
    for _ in 0..3 {
        let err = TcpStream::connect_timeout(&bh.addr(), Duration::from_millis(500)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    }
}

#[test]
#[should_panic(expected = "timed out after")]
fn eventually_panics_on_timeout() {
    eventually(Duration::from_millis(100), "never", || false);
}

#[test]
#[should_panic(expected = "no-such-binary-for-routemesh not found: run `bash .ci/run`")]
fn require_binary_names_the_setup_command() {
    require_binary(
        "no-such-binary-for-routemesh",
        "run `bash .ci/run` or `apt-get install -y etcd-server etcd-client`",
    );
}

#[test]
#[should_panic(expected = "no longer true after")]
fn holds_for_panics_at_the_first_false() {
    let mut n = 0;
    holds_for(Duration::from_secs(5), "n stays below 3", || {
        n += 1;
        n < 3
    });
}

#[test]
fn helper_parsers() {
    let json = r#"{"header":{"revision":5},"kvs":[{"key":"L3JtL2E=","value":"MQ==","lease":0},{"key":"L3JtL2I=","value":"YWJj"},{"key":"L3JtL2M=","value":""}],"count":3}"#;
    assert_eq!(
        parse_get_json(json),
        vec![
            ("/rm/a".to_string(), "1".to_string()),
            ("/rm/b".to_string(), "abc".to_string()),
            ("/rm/c".to_string(), String::new()),
        ]
    );
    assert!(parse_get_json(r#"{"header":{"revision":5}}"#).is_empty());
    for bad in ["a", "!!!!"] {
        let json = format!(r#"{{"kvs":[{{"key":"{bad}","value":""}}]}}"#);
        let panicked = std::panic::catch_unwind(|| parse_get_json(&json));
        assert!(panicked.is_err(), "bad base64 {bad:?} is refused");
    }
    assert_eq!(
        parse_lease_grant("lease 694d77aa9e38260f granted with TTL(5s)\n").as_deref(),
        Some("694d77aa9e38260f")
    );

    let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokXX").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let r = parse_response(
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (503, "abcde"));
    let r = parse_response(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil close").unwrap();
    assert_eq!(
        (r.header("server"), r.text().as_str()),
        (Some("old"), "until close")
    );
    // Off a keep-alive connection: one response at a time, nothing of the next consumed.
    let two = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nb";
    let mut conn = &two[..];
    assert_eq!(read_response(&mut conn).unwrap().text(), "a");
    assert_eq!(read_response(&mut conn).unwrap().status, 201);
    assert!(conn.is_empty());
    assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab").is_err());
}

#[test]
fn config_builder_writes_what_check_accepts() {
    let backend = TcpBackend::start("built");
    let listen = free_addr();
    let config = Config::static_tasks()
        .node("n1")
        .listener(
            Listener::http(listen, "web")
                .name("web")
                .set("max_connections", 10)
                .set("accept_proxy", true)
                .set("trusted_proxies", vec!["127.0.0.0/8"])
                .route(&[("host", "api.example.com"), ("service", "api")]),
        )
        .set("service.web.health.interval", "1h")
        .task(Task::new("web", backend.addr()).id("w1").weight(2))
        .task(Task::new("api", backend.addr()));
    let dir = tempdir("config-builder");
    let path = dir.path().join("routemesh.toml");
    let text = config.to_toml();
    std::fs::write(&path, &text).unwrap();
    cli_ok(&["check", "-c", path.to_str().unwrap()]);
    for line in [
        "[[listener.route]]",
        "max_connections = 10",
        "weight = 2",
        "[service.web.health]",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
}
