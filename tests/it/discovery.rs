//! Discovery against a real etcd: tasks added and removed, node liveness through the lease,
//! malformed values, etcd outages and a 3-member cluster losing a member.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::daemon::service_tasks;
use crate::support::{
    Config, Daemon, Etcd, EtcdCluster, Etcdctl, Listener, Task, TcpBackend, eventually, free_addr,
    hello,
};

const P: &str = "/routemesh";

/// Node `node` (lease TTL 2 s, dial timeout 1 s) on `endpoints` under prefix `P`, with a TCP
/// listener on `listen` for service `echo` (connect timeout 300 ms).
fn etcd_config(node: &str, endpoints: &[String], listen: SocketAddr) -> Config {
    Config::etcd(endpoints)
        .node(node)
        .set("node.advertise", "127.0.0.1")
        .set("discovery.prefix", P)
        .set("discovery.node_ttl", "2s")
        .set("discovery.dial_timeout", "1s")
        .listener(Listener::tcp(listen, "echo"))
        .set("service.echo.connect_timeout", "300ms")
}

/// Node n1 with one static task, `echo/w1` (a backend named "x"), ready.
fn n1_with_task_w1(etcd: &Etcd) -> (Daemon, TcpBackend) {
    let backend = TcpBackend::start("x");
    let mut d = etcd_config("n1", &[etcd.endpoint()], free_addr())
        .task(Task::new("echo", backend.addr()).id("w1"))
        .start();
    d.wait_ready();
    (d, backend)
}

/// `d`'s `/routes` lists node `name` with `status`.
fn assert_node_status(d: &Daemon, name: &str, status: &str) {
    let nodes = d.routes()["nodes"].clone();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == name && n["status"] == status),
        "{nodes}"
    );
}

fn task_json(addr: SocketAddr) -> String {
    format!(r#"{{"addr":"{addr}"}}"#)
}

/// The backend names seen over `n` connections.
fn seen(listen: SocketAddr, n: usize) -> BTreeSet<String> {
    (0..n).filter_map(|_| hello(listen).ok()).collect()
}

fn task_ids(d: &Daemon, service: &str) -> Vec<String> {
    service_tasks(&d.routes(), service)
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn tasks_added_and_removed_in_etcd_reach_the_proxy() {
    let etcd = Etcd::start();
    let a = TcpBackend::start("a");
    let b = TcpBackend::start("b");
    let listen = free_addr();
    let mut d = etcd_config("n1", &[etcd.endpoint()], listen).start();
    d.wait_ready();
    etcd.put(&format!("{P}/tasks/echo/a"), &task_json(a.addr()));
    eventually(WAIT, "task a routable", || {
        hello(listen).ok().as_deref() == Some("a")
    });
    etcd.put(&format!("{P}/tasks/echo/b"), &task_json(b.addr()));
    eventually(WAIT, "both tasks served", || seen(listen, 4).len() == 2);
    etcd.del(&format!("{P}/tasks/echo/a"));
    eventually(WAIT, "a removed", || task_ids(&d, "echo") == ["b"]);
    assert_eq!(seen(listen, 10), BTreeSet::from(["b".to_string()]));
    // Changing a task's address moves traffic.
    etcd.put(&format!("{P}/tasks/echo/b"), &task_json(a.addr()));
    eventually(WAIT, "b now points at backend a", || {
        seen(listen, 4) == BTreeSet::from(["a".to_string()])
    });
}

#[test]
fn readyz_waits_for_the_first_sync() {
    let mut etcd = Etcd::start();
    etcd.stop();
    let listen = free_addr();
    let mut d = etcd_config("n1", &[etcd.endpoint()], listen).start();
    assert_eq!(d.admin_get("/healthz").0, 200);
    assert_eq!(d.ready_status(), 503, "not ready before discovery synced");
    etcd.start_again();
    d.wait_ready();
}

#[test]
fn ready_means_the_nodes_own_tasks_are_routable() {
    // Whenever /readyz first says 200, a connection through the node's own `[[task]]` is
    // served at once: readiness waits for the node's own registration in its snapshot.
    let etcd = Etcd::start();
    let backend = TcpBackend::start("own");
    for round in 0..5 {
        let listen = free_addr();
        let mut d = etcd_config(&format!("n{round}"), &[etcd.endpoint()], listen)
            .set("discovery.prefix", format!("{P}{round}"))
            .task(Task::new("echo", backend.addr()))
            .start();
        d.wait_ready();
        assert_eq!(
            hello(listen).ok().as_deref(),
            Some("own"),
            "round {round}: ready, but the node's own task was not routable:\n{}",
            d.log_tail(20)
        );
    }
}

#[test]
fn a_killed_node_takes_its_tasks_away_and_sigterm_revokes_at_once() {
    let etcd = Etcd::start();
    let backend = TcpBackend::start("on-n1");
    let l1 = free_addr();
    let l2 = free_addr();
    let task = Task::new("echo", backend.addr()).id("w1");
    let mut n1 = etcd_config("n1", &[etcd.endpoint()], l1)
        .task(task.clone())
        .start();
    let mut n2 = etcd_config("n2", &[etcd.endpoint()], l2).start();
    n2.wait_ready();
    eventually(WAIT, "n2 routes to n1's task", || {
        hello(l2).ok().as_deref() == Some("on-n1")
    });
    assert_node_status(&n2, "n1", "Ready");
    n1.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(8), "n1's task vanishes from n2", || {
        task_ids(&n2, "echo").is_empty()
    });
    let gone_after = killed.elapsed();
    // Lease TTL 2 s (+ etcd's expiry granularity): well under 5 s.
    assert!(gone_after < Duration::from_secs(5), "{gone_after:?}");
    assert_node_status(&n2, "n1", "Down");

    // A clean stop revokes the lease: tasks go at once, not after the TTL.
    let l3 = free_addr();
    let mut n3 = etcd_config("n3", &[etcd.endpoint()], l3)
        .set("discovery.node_ttl", "30s")
        .task(task)
        .start();
    eventually(WAIT, "n3's task registered", || {
        task_ids(&n2, "echo") == ["w1"]
    });
    let started = Instant::now();
    assert!(n3.terminate().success());
    eventually(WAIT, "n3's task removed", || {
        task_ids(&n2, "echo").is_empty()
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "revoked, not expired after 30 s"
    );
}

#[test]
fn malformed_values_are_skipped_and_named() {
    let etcd = Etcd::start();
    let good = TcpBackend::start("good");
    etcd.put(&format!("{P}/tasks/echo/bad-json"), "{not json");
    etcd.put(&format!("{P}/tasks/echo/bad-addr"), r#"{"addr":"nowhere"}"#);
    etcd.put(&format!("{P}/tasks/echo/bad-type"), r#"{"addr":12}"#);
    etcd.put(&format!("{P}/tasks/echo"), r#"{"addr":"127.0.0.1:1"}"#);
    etcd.put(&format!("{P}/tasks/echo/good"), &task_json(good.addr()));
    let listen = free_addr();
    let mut d = etcd_config("n1", &[etcd.endpoint()], listen).start();
    d.wait_ready();
    assert_eq!(seen(listen, 5), BTreeSet::from(["good".to_string()]));
    let routes = d.routes();
    for key in ["bad-json", "bad-addr", "bad-type"] {
        assert!(
            routes["invalid"]
                .get(format!("{P}/tasks/echo/{key}"))
                .is_some(),
            "{key} listed as invalid: {routes}"
        );
    }
    let log = d.log();
    assert!(
        log.contains("/routemesh/tasks/echo/bad-json"),
        "key named in the log"
    );
    // A bad update through the watch is skipped too, and the service keeps working.
    etcd.put(&format!("{P}/tasks/echo/later"), "[]");
    d.wait_for_log("/routemesh/tasks/echo/later", WAIT);
    assert_eq!(seen(listen, 3), BTreeSet::from(["good".to_string()]));
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains("routemesh_discovery_invalid_entries_total 5"),
        "{metrics}"
    );
    assert!(d.log().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn etcd_outage_keeps_traffic_flowing_and_resyncs() {
    let mut etcd = Etcd::start();
    let a = TcpBackend::start("a");
    let b = TcpBackend::start("b");
    etcd.put(&format!("{P}/tasks/echo/a"), &task_json(a.addr()));
    let listen = free_addr();
    let mut d = etcd_config("n1", &[etcd.endpoint()], listen).start();
    d.wait_ready();
    assert_eq!(hello(listen).unwrap(), "a");
    etcd.stop();
    // Static stability: the last snapshot keeps serving.
    for _ in 0..20 {
        assert_eq!(hello(listen).unwrap(), "a");
    }
    eventually(WAIT, "discovery reported down", || {
        d.admin_get("/metrics")
            .1
            .contains("routemesh_discovery_up 0")
    });
    assert_eq!(d.ready_status(), 200, "still ready: it synced once");
    etcd.start_again();
    etcd.put(&format!("{P}/tasks/echo/b"), &task_json(b.addr()));
    eventually(
        Duration::from_secs(15),
        "resynced after etcd returned",
        || seen(listen, 4).len() == 2,
    );
    eventually(WAIT, "discovery up again", || {
        d.admin_get("/metrics")
            .1
            .contains("routemesh_discovery_up 1")
    });
}

#[test]
fn a_lost_lease_is_registered_again_after_a_long_outage() {
    let mut etcd = Etcd::start();
    let (d, _backend) = n1_with_task_w1(&etcd);
    eventually(WAIT, "task registered", || {
        etcd.get(&format!("{P}/tasks/echo/w1")).is_some()
    });
    // Revoke the daemon's lease behind its back (as an expiry during an outage would).
    let alive_lease = || {
        let fields = etcd.etcdctl(&["get", &format!("{P}/nodes/n1/alive"), "-w", "fields"]);
        fields
            .lines()
            .find(|l| l.starts_with("\"Lease\""))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let old = alive_lease().expect("alive key has a lease");
    etcd.lease_revoke(&format!("{old:x}"));
    // The keeper may write the keys again before this test could look at them gone: what
    // shows the repair is a new lease holding them.
    eventually(WAIT, "task registered again under a new lease", || {
        etcd.get(&format!("{P}/tasks/echo/w1")).is_some() && alive_lease().is_some_and(|l| l != old)
    });
    drop(d);
    etcd.stop();
}

#[test]
fn losing_one_member_of_three_does_not_interrupt_discovery() {
    let mut cluster = EtcdCluster::start(3);
    let a = TcpBackend::start("a");
    let b = TcpBackend::start("b");
    cluster.put(&format!("{P}/tasks/echo/a"), &task_json(a.addr()));
    let listen = free_addr();
    let mut d = etcd_config("n1", &cluster.endpoints(), listen).start();
    d.wait_ready();
    assert_eq!(hello(listen).unwrap(), "a");
    for victim in [0usize, 1] {
        // Kill one member (the first time, the first endpoint the client knows).
        cluster.kill(victim);
        let name = if victim == 0 { "b" } else { "a" };
        let addr = if victim == 0 { b.addr() } else { a.addr() };
        // The survivors may need an election first.
        let key = format!("{P}/tasks/echo/{name}2");
        let value = task_json(addr);
        eventually(
            Duration::from_secs(15),
            "put accepted by the survivors",
            || cluster.try_etcdctl(&["put", &key, &value]).is_ok(),
        );
        eventually(
            Duration::from_secs(15),
            "change seen with a member down",
            || task_ids(&d, "echo").contains(&format!("{name}2")),
        );
        assert!(hello(listen).is_ok());
        cluster.member_mut(victim).start_again();
        let member = cluster.member(victim);
        eventually(Duration::from_secs(15), "restarted member healthy", || {
            member.try_etcdctl(&["endpoint", "health"]).is_ok()
                && member
                    .try_etcdctl(&["get", "--consistency=l", "/probe"])
                    .is_ok()
        });
    }
}

#[test]
fn a_node_with_more_tasks_than_one_etcd_transaction_registers_them_all() {
    let etcd = Etcd::start();
    let listen = free_addr();
    let tasks = (0..150).map(|i| {
        Task::new("many", SocketAddr::from(([127, 0, 0, 1], 20000 + i))).id(&format!("t{i}"))
    });
    let mut d = etcd_config("n1", &[etcd.endpoint()], listen)
        .tasks(tasks)
        .start();
    d.wait_ready();
    eventually(WAIT, "150 tasks registered", || {
        etcd.get_prefix(&format!("{P}/tasks/many/")).len() == 150
    });
    eventually(WAIT, "and routed", || task_ids(&d, "many").len() == 150);
}

#[test]
fn a_registration_deleted_by_hand_is_written_again() {
    let etcd = Etcd::start();
    let (_d, _backend) = n1_with_task_w1(&etcd);
    let key = format!("{P}/tasks/echo/w1");
    eventually(WAIT, "task registered", || etcd.get(&key).is_some());
    etcd.del(&key);
    assert!(etcd.get(&key).is_none());
    // The keeper re-asserts its registration every 30 s.
    eventually(Duration::from_secs(40), "task written again", || {
        etcd.get(&key).is_some()
    });
}
