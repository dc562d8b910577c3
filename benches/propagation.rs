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
//! Run: `cargo bench --bench propagation` (`ROUTEMESH_CHANGES=200` for a shorter run).

// The integration tests' harness; a bench uses a slice of it, the rest is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use etcd_client::Client;
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
