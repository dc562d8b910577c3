//! Issue 2's speed target: "etcd put → routable on a node: p99 ≤ 10 ms over 1,000 changes".
//!
//! Starts a real etcd on free loopback ports and the `routemesh` binary cargo built for this
//! bench (release, with `cargo bench`), two TCP backends A and B, and one tcp listener for
//! service `bench`. Then, 1,000 times: put a new task key `…/tasks/bench/t-{i}` pointing at the
//! backend the previous task did not use, and time from just before the put until a connection
//! through the listener is answered by that backend (routable). The previous key is then
//! deleted and, untimed for the main figure, the bench waits until the old task is out of
//! routing before the next change (reported separately as delete → gone).
//!
//! Then issue 13's target, "put of a listener → accepting on every node: p99 ≤ 100 ms": on the
//! 3-node network-namespace lab of the test suite (needs root), three daemons with no TOML
//! listener; `ROUTEMESH_LISTENER_CHANGES` times (default 100) a listener on a new port is put
//! under `{prefix}/listeners/`, and the time from just before the put until a TCP connection
//! to that port of each node's address is accepted is recorded per node; the listener is then
//! deleted and the bench waits until every node refuses it again.
//!
//! Run: `cargo bench --bench propagation` (`ROUTEMESH_CHANGES=200` for a shorter run).

// The integration tests' harness; a bench uses a slice of it, the rest is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use etcd_client::Client;
use support::lab::{Lab, Shape};
use support::{Daemon, Etcd, TcpBackend, connect_and_greet, free_addr};

const PREFIX: &str = "/rmbench";
/// One change must become visible within this, or the bench fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    // `cargo bench` passes `--bench`; filters make no sense for one measurement.
    let changes: usize = std::env::var("ROUTEMESH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);

    let etcd = Etcd::start();
    let backends = [TcpBackend::start("A"), TcpBackend::start("B")];
    let listen = free_addr();
    let mut daemon = Daemon::start(&format!(
        r#"
[node]
name = "bench"

[discovery]
endpoints = ["{endpoint}"]
prefix = "{PREFIX}"

[[listener]]
name = "bench"
listen = "{listen}"
protocol = "tcp"
service = "bench"

[service.bench]
connect_timeout = "500ms"

[log]
level = "warn"
"#,
        endpoint = etcd.endpoint()
    ));
    daemon.wait_ready();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut client = rt
        .block_on(Client::connect([etcd.endpoint()], None))
        .expect("connect to etcd");

    let key = |i: usize| format!("{PREFIX}/tasks/bench/t-{i:05}");
    let value = |b: &TcpBackend| format!(r#"{{"addr":"{}"}}"#, b.addr());

    // Task 0 on A; wait until it is routable.
    rt.block_on(client.put(key(0), value(&backends[0]), None))
        .expect("etcd put");
    wait_hits(listen, "A", 1, Duration::from_secs(15)).expect("first task routable");

    let mut put_ms = Vec::with_capacity(changes);
    let mut del_ms = Vec::with_capacity(changes);
    let started = Instant::now();
    for i in 1..=changes {
        let target = &backends[i % 2];
        let t0 = Instant::now();
        rt.block_on(client.put(key(i), value(target), None))
            .expect("etcd put");
        let put_done = t0.elapsed();
        // Round robin over {old, new}: the new task answers within two connections.
        if let Err(e) = wait_hits(listen, target.name(), 1, CHANGE_TIMEOUT) {
            eprintln!("change {i}: put → routable failed: {e}; daemon log tail:");
            eprintln!("{}", daemon.log_tail(30));
            std::process::exit(1);
        }
        put_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if i == 1 {
            println!(
                "(first put RPC took {:.2} ms of its total)",
                put_done.as_secs_f64() * 1e3
            );
        }

        let t1 = Instant::now();
        rt.block_on(client.delete(key(i - 1), None))
            .expect("etcd delete");
        // Gone: three answers in a row from the new task (round robin over two tasks
        // cannot produce that while the old one is still routed).
        if let Err(e) = wait_hits(listen, target.name(), 3, CHANGE_TIMEOUT) {
            eprintln!("change {i}: delete → gone failed: {e}");
            std::process::exit(1);
        }
        del_ms.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    let wall = started.elapsed();

    println!(
        "etcd put → routable through a tcp listener, {changes} changes ({:.1} s wall):",
        wall.as_secs_f64()
    );
    report("put → routable", &mut put_ms);
    report("delete → gone ", &mut del_ms);
    let p99 = percentile(&put_ms, 0.99);
    println!(
        "target (issue 2): put → routable p99 ≤ 10 ms: {} ({p99:.2} ms)",
        if p99 <= 10.0 { "MET" } else { "NOT MET" }
    );
    let _ = daemon.terminate();
    drop(etcd);

    let listener_changes: usize = std::env::var("ROUTEMESH_LISTENER_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    if !support::process::is_root() {
        println!(
            "listener put → accepting on 3 nodes: NOT RUN (the network-namespace lab needs root)"
        );
        return;
    }
    listeners_on_three_nodes(listener_changes);
}

/// Issue 13: a listener put in etcd → accepting on each of three daemons (lab nodes).
fn listeners_on_three_nodes(changes: usize) {
    let mut lab = Lab::start("http");
    let bare = Shape {
        toml_listeners: false,
        ..Shape::default()
    };
    for i in 1..=3 {
        lab.start_daemon_shaped(i, &[], bare);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut client = rt
        .block_on(Client::connect(lab.live_etcd_endpoints(), None))
        .expect("connect to etcd");
    let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut slowest = Vec::with_capacity(changes);
    let mut rpc = Vec::with_capacity(changes);
    let started = Instant::now();
    for c in 0..changes {
        let port = 20000 + c as u16;
        let key = format!("/routemesh/listeners/bench-{port}");
        let value = format!(r#"{{"listen":"0.0.0.0:{port}","service":"web"}}"#);
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|i| SocketAddr::from((lab.ip(i), port)))
            .collect();
        let t0 = Instant::now();
        rt.block_on(client.put(key.as_str(), value, None))
            .expect("etcd put");
        rpc.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut done = [None; 3];
        while done.iter().any(Option::is_none) {
            assert!(
                t0.elapsed() < CHANGE_TIMEOUT,
                "listener {port} not accepting on every node within {CHANGE_TIMEOUT:?}: {done:?}"
            );
            for (n, addr) in addrs.iter().enumerate() {
                if done[n].is_none()
                    && let Ok(s) = TcpStream::connect_timeout(addr, Duration::from_millis(200))
                {
                    done[n] = Some(t0.elapsed());
                    abort(s);
                }
            }
        }
        let times: Vec<f64> = done
            .iter()
            .map(|d| d.expect("all done").as_secs_f64() * 1e3)
            .collect();
        for (n, t) in times.iter().enumerate() {
            per_node[n].push(*t);
        }
        slowest.push(times.iter().copied().fold(0.0, f64::max));
        rt.block_on(client.delete(key.as_str(), None))
            .expect("etcd delete");
        let gone = Instant::now();
        while addrs
            .iter()
            .any(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
        {
            assert!(
                gone.elapsed() < CHANGE_TIMEOUT,
                "listener {port} not removed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!(
        "listener put → accepting on each of 3 lab nodes, {changes} changes ({:.1} s wall):",
        started.elapsed().as_secs_f64()
    );
    for (n, ms) in per_node.iter_mut().enumerate() {
        report(&format!("node n{}      ", n + 1), ms);
    }
    report("slowest node", &mut slowest);
    report("(of which the put RPC, etcd's commit)", &mut rpc);
    let p99 = percentile(&slowest, 0.99);
    println!(
        "target (issue 13): listener put → accepting on every node p99 ≤ 100 ms: {} ({p99:.2} ms)",
        if p99 <= 100.0 { "MET" } else { "NOT MET" }
    );
}

/// Connects through `listen` until `need` consecutive connections are answered by the
/// backend named `want`. Each probe closes with RST (linger 0) so 1,000s of probes leave
/// no TIME_WAIT sockets behind.
fn wait_hits(listen: SocketAddr, want: &str, need: usize, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut run = 0;
    let mut last = String::new();
    while Instant::now() < deadline {
        match connect_and_greet(listen) {
            Ok((stream, name)) => {
                abort(stream);
                if name == want {
                    run += 1;
                    if run >= need {
                        return Ok(());
                    }
                } else {
                    run = 0;
                }
                last = name;
            }
            Err(e) => {
                run = 0;
                last = e.to_string();
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    Err(format!(
        "not answered by {want} within {timeout:?} (last: {last})"
    ))
}

fn abort(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn report(what: &str, ms: &mut [f64]) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    println!(
        "  {what}: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  mean {mean:.2} ms",
        percentile(ms, 0.50),
        percentile(ms, 0.90),
        percentile(ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
    );
}
