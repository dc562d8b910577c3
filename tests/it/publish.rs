//! Cluster state in etcd followed live by every node: node availability (drain) and the
//! `publish` CLI's checks. The multi-node scenarios (ports published on every node of the
//! network-namespace lab) are in tests/cluster.rs.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::support::{
    Daemon, Etcd, Etcdctl, TcpBackend, cli_fails, cli_ok as ok, connect_and_greet, eventually,
    free_addr, free_port, hello,
};

fn node(etcd: &Etcd, name: &str, listen: std::net::SocketAddr) -> Daemon {
    let mut d = Daemon::start(&format!(
        "[node]\nname = \"{name}\"\nadvertise = \"127.0.0.1\"\n[discovery]\nendpoints = [\"{}\"]\nnode_ttl = \"2s\"\n\
         [[listener]]\nlisten = \"{listen}\"\nservice = \"web\"\n",
        etcd.endpoint()
    ));
    d.wait_ready();
    d
}

#[test]
fn a_drained_node_gets_no_new_connections_and_is_not_ready() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let (l1, l2) = (free_addr(), free_addr());
    let n1 = node(&etcd, "n1", l1);
    let n2 = node(&etcd, "n2", l2);
    let (b1, b2) = (TcpBackend::start("on-n1"), TcpBackend::start("on-n2"));
    for (id, b, n) in [("w1", &b1, "n1"), ("w2", &b2, "n2")] {
        let addr = b.addr().to_string();
        ok(&[
            "task", "add", "web", &addr, "--etcd", &ep, "--id", id, "--node", n,
        ]);
    }
    eventually(Duration::from_secs(10), "both tasks served via n1", || {
        let seen: std::collections::BTreeSet<String> =
            (0..10).filter_map(|_| hello(l1).ok()).collect();
        seen.len() == 2
    });
    // An open connection to the task on n2 outlives the drain.
    let (mut open, greeting) = eventually_open(l1, "on-n2");
    assert_eq!(greeting, "on-n2");

    assert_eq!(
        ok(&[
            "node",
            "update",
            "--availability",
            "drain",
            "n2",
            "--etcd",
            &ep
        ])
        .trim(),
        "n2"
    );
    eventually(Duration::from_secs(5), "n2's task out of rotation", || {
        (0..10).all(|_| hello(l1).is_ok_and(|n| n == "on-n1"))
            && (0..10).all(|_| hello(l2).is_ok_and(|n| n == "on-n1"))
    });
    assert_eq!(
        echo_once(&mut open, b"still here\n"),
        b"still here\n",
        "the open connection keeps working"
    );
    eventually(Duration::from_secs(5), "n2 not ready", || {
        n2.ready_status() == 503
    });
    let (_, why) = n2.admin_get("/readyz");
    assert!(why.contains("drain"), "{why}");
    assert_eq!(n1.ready_status(), 200);
    let ls = ok(&["node", "ls", "--etcd", &ep]);
    assert!(
        ls.lines().next().unwrap().split_whitespace().eq([
            "NAME",
            "ADDRESS",
            "STATUS",
            "AVAILABILITY",
            "VERSION"
        ]),
        "{ls}"
    );
    let row = |name: &str| -> Vec<String> {
        ls.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(
        row("n2")[..4],
        ["n2", "127.0.0.1", "Ready", "drain"],
        "{ls}"
    );
    assert_eq!(row("n1")[3], "active", "{ls}");
    let routes = n1.routes();
    let w2 = &routes["services"][0]["tasks"][1];
    assert_eq!(w2["state"], "drained", "{routes}");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&["service", "ls", "--etcd", &ep, "--json"])).unwrap();
    assert_eq!(ls[0]["routable"], 1, "{ls}");

    ok(&[
        "node",
        "update",
        "--availability",
        "active",
        "n2",
        "--etcd",
        &ep,
    ]);
    eventually(Duration::from_secs(5), "n2's task back", || {
        (0..20).any(|_| hello(l1).is_ok_and(|n| n == "on-n2"))
    });
    eventually(Duration::from_secs(5), "n2 ready again", || {
        n2.ready_status() == 200
    });
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(&["node", "ls", "--etcd", &ep, "--json"])).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["availability"] == "active"),
        "{nodes}"
    );
}

/// Writes `data` on an open echo connection and reads it back.
fn echo_once(s: &mut std::net::TcpStream, data: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    s.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).unwrap();
    back
}

/// Opens connections through `addr` until one greets with `want` (round robin gets there).
fn eventually_open(addr: std::net::SocketAddr, want: &str) -> (std::net::TcpStream, String) {
    for _ in 0..20 {
        if let Ok((s, g)) = connect_and_greet(addr)
            && g == want
        {
            return (s, g);
        }
    }
    panic!("no connection through {addr} reached {want}");
}

#[test]
fn publish_and_node_update_refuse_bad_input_in_one_line() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let err = cli_fails(&[
        "node",
        "update",
        "--availability",
        "drain",
        "ghost",
        "--etcd",
        &ep,
    ]);
    assert!(err.contains("unknown node ghost"), "{err}");
    let err = cli_fails(&["publish", "add", "web", "0", "--etcd", &ep]);
    assert!(err.contains("PORT[/PROTOCOL]"), "{err}");
    let err = cli_fails(&["publish", "add", "web", "80/sctp", "--etcd", &ep]);
    assert!(err.contains("tcp, http, tls or udp"), "{err}");
    let err = cli_fails(&[
        "publish", "add", "web", "80", "--listen", "nowhere", "--etcd", &ep,
    ]);
    assert!(err.contains("--listen"), "{err}");
    let err = cli_fails(&["publish", "add", "we/b", "80", "--etcd", &ep]);
    assert!(err.contains("service name"), "{err}");

    assert_eq!(
        ok(&["publish", "add", "web", "8080/http", "--etcd", &ep]).trim(),
        "web-8080-http"
    );
    let stored = etcd.get("/routemesh/listeners/web-8080-http").unwrap();
    let v: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(v["listen"], "0.0.0.0:8080");
    assert_eq!(v["protocol"], "http");
    assert_eq!(v["service"], "web");
    // Idempotent for the same listener; a clash on the address or the name is refused.
    ok(&["publish", "add", "web", "8080/http", "--etcd", &ep]);
    let err = cli_fails(&["publish", "add", "api", "8080", "--etcd", &ep]);
    assert!(err.contains("already published as web-8080-http"), "{err}");
    let err = cli_fails(&[
        "publish",
        "add",
        "api",
        "9090",
        "--name",
        "web-8080-http",
        "--etcd",
        &ep,
    ]);
    assert!(err.contains("publish rm web-8080-http"), "{err}");
    let named = ok(&[
        "publish",
        "add",
        "api",
        "9090/tcp",
        "--name",
        "api",
        "--listen",
        "127.0.0.1",
        "--etcd",
        &ep,
        "--json",
    ]);
    let named: serde_json::Value = serde_json::from_str(&named).unwrap();
    assert_eq!(named["name"], "api");
    assert_eq!(named["listen"], "127.0.0.1:9090");

    let ls = ok(&["publish", "ls", "--etcd", &ep]);
    assert!(
        ls.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["NAME", "LISTEN", "PROTOCOL", "SERVICE", "NODES", "SOURCE"]),
        "{ls}"
    );
    assert!(
        ls.lines().any(|l| l.split_whitespace().eq([
            "web-8080-http",
            "0.0.0.0:8080",
            "http",
            "web",
            "0/0",
            "etcd"
        ])),
        "{ls}"
    );
    let err = cli_fails(&["publish", "rm", "nothing", "--etcd", &ep]);
    assert!(err.contains("no published listener nothing"), "{err}");
    assert_eq!(ok(&["publish", "rm", "api", "--etcd", &ep]).trim(), "api");
    let err = cli_fails(&["publish", "ps", "api", "--etcd", &ep]);
    assert!(err.contains("no published listener api"), "{err}");

    // Ports asked for by tasks are listed with SOURCE tasks and cannot be removed by name.
    ok(&[
        "task",
        "add",
        "mqtt",
        "127.0.0.1:1884",
        "--publish",
        "1883",
        "--etcd",
        &ep,
    ]);
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&["publish", "ls", "--etcd", &ep, "--json"])).unwrap();
    let m = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "mqtt-1883-tcp")
        .unwrap_or_else(|| panic!("{ls}"));
    assert_eq!(m["source"], "tasks");
    assert_eq!(m["listen"], "0.0.0.0:1883");
    let err = cli_fails(&["publish", "rm", "mqtt-1883-tcp", "--etcd", &ep]);
    assert!(err.contains("tasks of service mqtt"), "{err}");
    let err = cli_fails(&[
        "task",
        "add",
        "x",
        "127.0.0.1:1",
        "--publish",
        "70000",
        "--etcd",
        &ep,
    ]);
    assert!(err.contains("PORT[/PROTOCOL]"), "{err}");
}

/// A daemon with the etcd backend and no TOML listener (`extra` is more TOML).
fn bare_node(etcd: &Etcd, name: &str, extra: &str) -> Daemon {
    let mut d = Daemon::start(&format!(
        "[node]\nname = \"{name}\"\nadvertise = \"127.0.0.1\"\n[discovery]\nendpoints = [\"{}\"]\nnode_ttl = \"2s\"\n{extra}",
        etcd.endpoint()
    ));
    d.wait_ready();
    d
}

/// `publish add SERVICE PORT --listen 127.0.0.1`; returns the listener's name.
fn publish_on_loopback(ep: &str, service: &str, port: u16) -> String {
    ok(&[
        "publish",
        "add",
        service,
        &port.to_string(),
        "--listen",
        "127.0.0.1",
        "--etcd",
        ep,
    ])
}

fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// `publish ps NAME --json` as (node, state) pairs.
fn states(ep: &str, name: &str) -> Vec<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["publish", "ps", name, "--etcd", ep, "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_published_port_is_bound_live_changed_in_place_and_removed() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let d = bare_node(&etcd, "n1", "");
    let b = TcpBackend::start("web-1");
    ok(&["task", "add", "web", &b.addr().to_string(), "--etcd", &ep]);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let name = publish_on_loopback(&ep, "web", port);
    assert_eq!(name.trim(), format!("web-{port}-tcp"));
    let name = name.trim().to_string();
    eventually(Duration::from_secs(5), "published port served", || {
        hello(addr).is_ok_and(|n| n == "web-1")
    });
    eventually(Duration::from_secs(5), "publish ls says 1/1", || {
        ok(&["publish", "ls", "--etcd", &ep])
            .lines()
            .any(|l| l.starts_with(&name) && l.contains(" 1/1 ") && l.ends_with("etcd"))
    });
    assert_eq!(
        states(&ep, &name),
        [("n1".to_string(), "bound".to_string())]
    );
    let routes = d.routes();
    let mine = crate::support::daemon::listener_named(&routes, &name);
    assert_eq!(mine["state"], "bound");
    assert_eq!(mine["source"], "etcd");

    // A changed value (a connection limit) keeps the socket and the open connection.
    let (mut open, _) = connect_and_greet(addr).unwrap();
    let key = format!("/routemesh/listeners/{name}");
    etcd.put(
        &key,
        &format!(r#"{{"listen":"{addr}","service":"web","max_connections":50}}"#),
    );
    eventually(Duration::from_secs(5), "the change applied", || {
        d.log().contains("listening") && d.log().matches(&format!("listener={name}")).count() >= 2
    });
    assert_eq!(echo_once(&mut open, b"ping\n"), b"ping\n");
    assert!(hello(addr).is_ok_and(|n| n == "web-1"));

    // Deleted: no new connection is accepted; the open one runs on (drain_timeout).
    assert_eq!(ok(&["publish", "rm", &name, "--etcd", &ep]).trim(), name);
    eventually(Duration::from_secs(5), "port closed", || refused(addr));
    assert_eq!(echo_once(&mut open, b"still\n"), b"still\n");
    eventually(
        Duration::from_secs(5),
        "the node no longer reports it",
        || {
            d.routes()["listeners"]
                .as_array()
                .is_some_and(|l| l.iter().all(|l| l["name"] != name.as_str()))
        },
    );
}

#[test]
fn shadowed_conflicting_refused_and_failed_listeners_are_reported_and_retried() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let (toml_port, allowed, other) = (free_port(), free_port(), free_port());
    let b = TcpBackend::start("web-1");
    let mut d = bare_node(
        &etcd,
        "n1",
        &format!(
            "published_ports = [\"{toml_port}\", \"{allowed}\"]\n[[listener]]\nname = \"local\"\nlisten = \"127.0.0.1:{toml_port}\"\nservice = \"web\"\n"
        ),
    );
    ok(&["task", "add", "web", &b.addr().to_string(), "--etcd", &ep]);
    // The TOML listener holds the address: shadowed.
    etcd.put(
        "/routemesh/listeners/shadow",
        &format!(r#"{{"listen":"127.0.0.1:{toml_port}","service":"web"}}"#),
    );
    // Not in published_ports: refused.
    etcd.put(
        "/routemesh/listeners/elsewhere",
        &format!(r#"{{"listen":"127.0.0.1:{other}","service":"web"}}"#),
    );
    // Held by another process: failed, then bound once it is free.
    let squatter = TcpListener::bind(("127.0.0.1", allowed)).unwrap();
    etcd.put(
        "/routemesh/listeners/b-held",
        &format!(r#"{{"listen":"127.0.0.1:{allowed}","service":"web"}}"#),
    );
    // Same address, name sorts after: conflict.
    etcd.put(
        "/routemesh/listeners/c-later",
        &format!(r#"{{"listen":"0.0.0.0:{allowed}","service":"web"}}"#),
    );
    // Malformed: skipped with the key named.
    etcd.put("/routemesh/listeners/broken", r#"{"listen":"127.0.0.1:1"}"#);
    etcd.put("/routemesh/listeners/notjson", "{{");
    let state_of = |name: &str| states(&ep, name).first().map(|(_, s)| s.clone());
    eventually(Duration::from_secs(5), "every state reported", || {
        state_of("shadow").as_deref() == Some("shadowed")
            && state_of("elsewhere").as_deref() == Some("refused: port not allowed")
            && state_of("b-held").is_some_and(|s| s.starts_with("failed: address in use"))
            && state_of("c-later").as_deref() == Some("conflict")
    });
    let routes = d.routes();
    let invalid = routes["invalid"].as_object().unwrap();
    assert!(
        invalid["/routemesh/listeners/broken"]
            .as_str()
            .unwrap()
            .contains("service"),
        "{routes}"
    );
    assert!(
        invalid.contains_key("/routemesh/listeners/notjson"),
        "{routes}"
    );
    assert!(
        d.metric("routemesh_discovery_invalid_entries_total")
            .unwrap()
            >= 2.0
    );
    assert!(hello(SocketAddr::from(([127, 0, 0, 1], toml_port))).is_ok());
    assert!(d.is_running(), "a bind failure never stops the daemon");

    drop(squatter);
    let held = SocketAddr::from(([127, 0, 0, 1], allowed));
    eventually(
        Duration::from_secs(12),
        "bound after the port is freed",
        || state_of("b-held").as_deref() == Some("bound") && hello(held).is_ok(),
    );
    // A bad update keeps the last valid value.
    etcd.put("/routemesh/listeners/b-held", r#"{"listen":"nowhere"}"#);
    eventually(Duration::from_secs(5), "bad update flagged", || {
        d.routes()["invalid"]
            .as_object()
            .is_some_and(|i| i.contains_key("/routemesh/listeners/b-held"))
    });
    assert!(hello(held).is_ok(), "the last valid listener keeps serving");
}

#[test]
fn tasks_publish_their_ports_while_registered() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let _d = bare_node(&etcd, "n1", "");
    let b = TcpBackend::start("mq-1");
    let port = free_port();
    // Task-requested ports bind on all addresses: pick a free one on every address.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    ok(&[
        "task",
        "add",
        "mqtt",
        &b.addr().to_string(),
        "--id",
        "m1",
        "--publish",
        &format!("{port}/tcp"),
        "--etcd",
        &ep,
    ]);
    eventually(Duration::from_secs(5), "task's port served", || {
        hello(addr).is_ok_and(|n| n == "mq-1")
    });
    let name = format!("mqtt-{port}-tcp");
    assert_eq!(
        states(&ep, &name),
        [("n1".to_string(), "bound".to_string())]
    );
    ok(&["task", "rm", "mqtt", "m1", "--etcd", &ep]);
    eventually(
        Duration::from_secs(5),
        "port gone with the last task",
        || refused(addr),
    );
}

#[test]
fn a_restarted_daemon_binds_published_listeners_before_it_is_ready() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let b = TcpBackend::start("web-1");
    ok(&["task", "add", "web", &b.addr().to_string(), "--etcd", &ep]);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    publish_on_loopback(&ep, "web", port);
    let mut d = Daemon::start(&format!(
        "[node]\nname = \"n1\"\n[discovery]\nendpoints = [\"{ep}\"]\n"
    ));
    // The first moment /readyz says 200, the published port already accepts.
    eventually(Duration::from_secs(15), "ready", || {
        crate::support::http::try_get(d.admin(), "/readyz").is_ok_and(|(code, _)| code == 200)
    });
    assert!(hello(addr).is_ok_and(|n| n == "web-1"));
    d.wait_ready();
}
