//! Self-tests of the integration-test harness (tests/it/support) that do not
//! need the routemesh daemon: real etcd, real TCP backends, helper parsing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::support::etcd::{base64_decode, parse_get_json, parse_lease_grant};
use crate::support::util::parse_http_response;
use crate::support::{
    Blackhole, Etcd, EtcdCluster, TcpBackend, connect_and_greet, dead_addr, echo_roundtrip,
    eventually, eventually_value, hello, require_binary,
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
    assert_eq!(cluster.len(), 3);
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
fn helper_parsers() {
    assert_eq!(base64_decode("L3JtL2E=").unwrap(), b"/rm/a");
    assert_eq!(base64_decode("").unwrap(), b"");
    assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
    assert_eq!(base64_decode("YQ").unwrap(), b"a");
    assert!(base64_decode("a").is_none());
    assert!(base64_decode("!!!!").is_none());

    let json = r#"{"header":{"revision":5},"kvs":[{"key":"L3JtL2E=","value":"MQ==","lease":0}],"count":1}"#;
    assert_eq!(
        parse_get_json(json),
        vec![("/rm/a".to_string(), "1".to_string())]
    );
    assert!(parse_get_json(r#"{"header":{"revision":5}}"#).is_empty());
    assert_eq!(
        parse_lease_grant("lease 694d77aa9e38260f granted with TTL(5s)\n").as_deref(),
        Some("694d77aa9e38260f")
    );

    let (status, body) =
        parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokXX").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, body) = parse_http_response(
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (503, "abcde"));
}
