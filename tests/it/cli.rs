//! The cluster CLI against a real etcd and real daemons: `task add|rm`, `service ls|ps`,
//! `node ls`, with tables and `--json`, and one-line errors.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::support::process::run_bounded;
use crate::support::{
    Config, Etcd, Etcdctl, Listener, TcpBackend, bin, cli_fails, cli_ok, dead_addr, eventually,
    eventually_value, free_addr, hello, output_text, tempdir,
};

/// Node `name` (advertising 127.0.0.1, lease TTL 2 s) on `etcd`, a TCP listener for `web`.
fn node_config(etcd: &Etcd, name: &str, listen: SocketAddr) -> Config {
    Config::etcd(&[etcd.endpoint()])
        .node(name)
        .set("node.advertise", "127.0.0.1")
        .set("discovery.node_ttl", "2s")
        .listener(Listener::tcp(listen, "web"))
}

#[test]
fn task_add_ps_ls_rm() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let backend = TcpBackend::start("web-1");
    let listen = free_addr();
    let mut n1 = node_config(&etcd, "n1", listen).start();
    n1.wait_ready();

    let addr = backend.addr().to_string();
    let id = cli_ok(&["task", "add", "web", &addr, "--etcd", &ep, "--id", "w1"]);
    assert_eq!(id.trim(), "w1");
    eventually(Duration::from_secs(10), "task routable", || {
        hello(listen).ok().as_deref() == Some("web-1")
    });
    // Derived id, attached to n1's lease.
    let add_on_n1 = [
        "task",
        "add",
        "web",
        "127.0.0.1:9",
        "--etcd",
        &ep,
        "--node",
        "n1",
    ];
    let derived = cli_ok(&add_on_n1);
    assert_eq!(derived.trim(), "n1-127-0-0-1-9");

    let ls = cli_ok(&["service", "ls", "--etcd", &ep]);
    let mut lines = ls.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("TASKS"),
        "{ls}"
    );
    assert!(
        lines.next().unwrap().split_whitespace().eq(["web", "2/2"]),
        "{ls}"
    );

    let ps = cli_ok(&["service", "ps", "web", "--etcd", &ep]);
    assert!(ps.starts_with("ID"), "{ps}");
    assert!(ps.lines().next().unwrap().contains("NODE STATUS"), "{ps}");
    assert!(ps.contains("w1") && ps.contains(&addr), "{ps}");
    assert!(
        ps.lines()
            .any(|l| l.starts_with("n1-127-0-0-1-9") && l.contains("n1") && l.ends_with("Ready")),
        "{ps}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli_ok(&["service", "ps", "web", "--etcd", &ep, "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    let nodes = cli_ok(&["node", "ls", "--etcd", &ep]);
    assert!(nodes.lines().next().unwrap().split_whitespace().eq([
        "NAME",
        "ADDRESS",
        "STATUS",
        "AVAILABILITY",
        "VERSION"
    ]));
    let row: Vec<&str> = nodes.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["n1", "127.0.0.1", "Ready", "active"], "{nodes}");

    // The node dies: its lease-bound task vanishes, the permanent one stays, n1 is Down.
    n1.kill();
    eventually(Duration::from_secs(8), "node-bound task gone", || {
        !cli_ok(&["service", "ps", "web", "--etcd", &ep]).contains("n1-127-0-0-1-9")
    });
    let nodes: serde_json::Value =
        serde_json::from_str(&cli_ok(&["node", "ls", "--etcd", &ep, "--json"])).unwrap();
    assert_eq!(nodes[0]["status"], "Down", "{nodes}");
    // The same task on n1 again, now that n1 is down.
    let err = cli_fails(&add_on_n1);
    assert!(err.contains("Down"), "{err}");

    assert_eq!(
        cli_ok(&["task", "rm", "web", "w1", "--etcd", &ep]).trim(),
        "w1"
    );
    assert!(!cli_ok(&["service", "ps", "web", "--etcd", &ep]).contains("w1"));
    let err = cli_fails(&["task", "rm", "web", "w1", "--etcd", &ep]);
    assert!(err.contains("no task w1"), "{err}");
}

#[test]
fn env_and_config_file_select_the_cluster() {
    let etcd = Etcd::start();
    let out = run_bounded(
        Command::new(bin())
            .args(["task", "add", "api", "127.0.0.1:81", "--id", "a1"])
            .env("ROUTEMESH_ETCD", etcd.endpoint())
            .env("ROUTEMESH_PREFIX", "/other"),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(etcd.get("/other/tasks/api/a1").is_some());

    let dir = tempdir("cli");
    let cfg = dir.path().join("c.toml");
    let other = Config::etcd(&[etcd.endpoint()]).set("discovery.prefix", "/other");
    std::fs::write(&cfg, other.to_toml()).unwrap();
    let ls = cli_ok(&["service", "ls", "-c", cfg.to_str().unwrap()]);
    assert!(ls.contains("api"), "{ls}");
}

#[test]
fn errors_are_one_clear_line() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let err = cli_fails(&["task", "add", "web", "not-an-addr", "--etcd", &ep]);
    assert!(err.contains("IP:PORT"), "{err}");
    let err = cli_fails(&["task", "add", "we/b", "127.0.0.1:1", "--etcd", &ep]);
    assert!(err.contains("service name"), "{err}");
    let err = cli_fails(&[
        "task",
        "add",
        "web",
        "127.0.0.1:1",
        "--etcd",
        &ep,
        "--node",
        "ghost",
    ]);
    assert!(err.contains("unknown node ghost"), "{err}");
    let dead = format!("http://{}", dead_addr());
    let err = cli_fails(&["service", "ls", "--etcd", &dead]);
    assert!(err.contains("cannot reach etcd"), "{err}");
    let err = cli_fails(&["node", "ls", "--etcd", &dead]);
    assert!(err.contains(&dead), "{err}");
}

#[test]
fn service_ps_with_admin_shows_each_task_state_and_why() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let live = TcpBackend::start("live");
    let listen = free_addr();
    let mut n1 = node_config(&etcd, "n1", listen)
        .set("service.web.health.interval", "200ms")
        .set("service.web.health.unhealthy_threshold", 2)
        .start();
    n1.wait_ready();
    let dead = dead_addr().to_string();
    cli_ok(&[
        "task",
        "add",
        "web",
        &live.addr().to_string(),
        "--etcd",
        &ep,
        "--id",
        "ok1",
    ]);
    cli_ok(&["task", "add", "web", &dead, "--etcd", &ep, "--id", "bad1"]);
    let admin = n1.admin().to_string();
    let ps = eventually_value(Duration::from_secs(10), "bad1 unhealthy", || {
        let ps = cli_ok(&["service", "ps", "web", "--etcd", &ep, "--admin", &admin]);
        ps.lines()
            .any(|l| l.starts_with("bad1") && l.contains("unhealthy"))
            .then_some(ps)
    });
    let header: Vec<&str> = ps
        .lines()
        .next()
        .unwrap()
        .split("   ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header,
        ["ID", "ADDR", "NODE", "NODE STATUS", "STATE", "WHY"],
        "{ps}"
    );
    let bad = ps.lines().find(|l| l.starts_with("bad1")).unwrap();
    assert!(bad.contains("health check: connect"), "why is given: {ps}");
    let good = ps.lines().find(|l| l.starts_with("ok1")).unwrap();
    assert!(
        good.contains("healthy") && !good.contains("unhealthy"),
        "{ps}"
    );
    let json: serde_json::Value = serde_json::from_str(&cli_ok(&[
        "service", "ps", "web", "--etcd", &ep, "--admin", &admin, "--json",
    ]))
    .unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == "bad1" && t["state"] == "unhealthy")
    );
}
