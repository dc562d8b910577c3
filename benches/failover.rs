//! Issue 4's failover figures, measured on the 3-node network-namespace lab of the cluster
//! suite (`tests/it/support/lab/`; needs root, like the suite).
//!
//! Lab: nginx replicas `n1-r1`, `n2-r1`, `n3-r1` (one per node) registered under their node's
//! lease; the `web` listener on port 80 of every node. Traffic is ~200 req/s of fresh-connection
//! GETs through n1 and n3 (100 req/s each, 3 s client timeout). Each round measures:
//!
//! 1. **power-off under traffic** — n2 is powered off (SIGKILL of its namespace + link down);
//!    time until n2's task is out of rotation (not routable in `/routes`) on each surviving
//!    node, and until it is gone from the table (lease expired). Goal: ≤ 1 s out of rotation.
//! 2. **replacement** — a new nginx on n3 is registered with an etcd put (task with
//!    `node = "n3"`); time from the put until the first request served by it through each
//!    surviving node. Goal: ≤ 100 ms.
//! 3. **power-off idle** — the same power-off without traffic (n2 powered on and re-registered
//!    first). Goal: ≤ node_ttl + 0.5 s.
//!
//! Failed requests are counted per phase; "at crash" are those whose upstream connection to n2
//! was open at the SIGKILL (reset by the dying kernel, answered with an error at once). "n2
//! ldr" says whether n2 hosted the etcd leader: then the new leader renews every lease on
//! election and the lease outlives the node by about an election timeout. Results print as a
//! table.
//!
//! Run: `cargo bench --bench failover` (as root; `ROUTEMESH_FAILOVER_ROUNDS=N`, default 3;
//! `ROUTEMESH_WEB_PROTOCOL=http` to measure through the HTTP listener instead of tcp).

// The integration tests' harness; a bench uses a slice of it, the rest is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use etcd_client::Client;
use support::config::Task;
use support::http::get_within as http_get;
use support::lab::{Lab, NODE_TTL};
use support::load::{Load, Sample};

/// Default `protocol` of the `web` listener (the cluster suite's WEB_PROTOCOL).
const WEB_PROTOCOL: &str = "http";
/// Per target: one GET every 10 ms → 2 × 100 = 200 req/s.
const INTERVAL: Duration = Duration::from_millis(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Any measured event must happen within this, or the bench fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often each surviving node's `/routes` is polled.
const POLL: Duration = Duration::from_millis(5);
/// Nodes that stay up (observers and traffic entry points); n2 is the one powered off.
const SURVIVORS: [usize; 2] = [1, 3];

/// Per surviving node: time until the task was out of rotation, and until it was gone.
type Detection = Vec<(Option<Duration>, Option<Duration>)>;

struct Row {
    phase: String,
    round: usize,
    per_node: Vec<Option<Duration>>,
    goal: Duration,
    requests: Option<usize>,
    /// Failed requests, and how many of them were in flight to n2 at the SIGKILL.
    failed: Option<(usize, usize)>,
    /// Whether n2's etcd member was the leader when it was powered off (then its lease is
    /// renewed by the new leader and outlives it by about an election).
    leader: Option<bool>,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("failover: a benchmark on a 3-node netns lab; run `cargo bench --bench failover`");
        return;
    }
    let rounds: usize = std::env::var("ROUTEMESH_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let proto =
        std::env::var("ROUTEMESH_WEB_PROTOCOL").unwrap_or_else(|_| WEB_PROTOCOL.to_string());

    let mut lab = Lab::start(&proto);
    let mut n2_replica = 0;
    for i in [1, 3] {
        let addrs = lab.start_nginx(i, &[&format!("n{i}-r1")]);
        lab.start_daemon(i, &[Task::new("web", addrs[0]).id(&format!("n{i}-r1"))]);
    }
    lab.start_daemon(2, &[]);
    let mut n2_task = register_n2(&mut lab, &mut n2_replica);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rows = Vec::new();
    let mut put_rpc = Vec::new();
    let idle_goal = NODE_TTL + Duration::from_millis(500);

    for round in 1..=rounds {
        // 1. Power-off under traffic.
        let load = start_load(&lab);
        thread::sleep(Duration::from_millis(500));
        let leader = lab.etcd_leader() == 2;
        let off_at = load.elapsed();
        let t0 = Instant::now();
        lab.power_off(2);
        let off_done = load.elapsed();
        let det = detect(&lab, n2_task, t0);
        thread::sleep(Duration::from_millis(300));
        let samples = load.stop();
        let phase: Vec<_> = samples.iter().filter(|s| s.at >= off_at).collect();
        let at_crash = phase
            .iter()
            .filter(|s| {
                s.outcome.is_err()
                    && s.at < off_done
                    && s.at + s.latency < off_done + Duration::from_millis(100)
            })
            .count();
        push_detection(
            &mut rows,
            round,
            "power-off → out of rotation (200 req/s)",
            "power-off → removed, lease (200 req/s)",
            &det,
            Duration::from_secs(1),
            NODE_TTL + Duration::from_millis(500),
            Some((phase.len(), count_failed(&phase), at_crash)),
            leader,
        );
        report_failures("power-off under traffic", round, &phase);

        // 2. Replacement on n3, registered with an etcd put, under traffic.
        let name = format!("rep-{round}");
        let rep = lab.start_nginx(3, &[&name])[0];
        let mut client = rt
            .block_on(Client::connect(lab.live_etcd_endpoints(), None))
            .expect("connect to etcd");
        let load = start_load(&lab);
        thread::sleep(Duration::from_millis(300));
        let reg_at = load.elapsed();
        let key = format!("/routemesh/tasks/web/{name}");
        let t0 = Instant::now();
        rt.block_on(client.put(
            key.as_str(),
            format!(r#"{{"addr":"{rep}","node":"n3"}}"#),
            None,
        ))
        .expect("etcd put");
        let put_took = t0.elapsed();
        let served = first_served(&lab, &name, t0);
        thread::sleep(Duration::from_millis(300));
        let samples = load.stop();
        let phase: Vec<_> = samples.iter().filter(|s| s.at >= reg_at).collect();
        put_rpc.push(put_took);
        rows.push(Row {
            phase: "registration → first served (200 req/s)".to_string(),
            round,
            per_node: served,
            goal: Duration::from_millis(100),
            requests: Some(phase.len()),
            failed: Some((count_failed(&phase), 0)),
            leader: None,
        });
        report_failures("replacement", round, &phase);
        // Untimed: take the replacement away again.
        rt.block_on(client.delete(key.as_str(), None))
            .expect("etcd delete");
        wait(EVENT_TIMEOUT, "replacement out of routing", || {
            SURVIVORS.iter().all(|&i| {
                lab.routable(i, "web")
                    .is_some_and(|r| !r.contains(&rep.to_string()))
            })
        });
        lab.stop(3, &format!("nginx-{name}"), libc::SIGQUIT);

        // 3. Power-off idle.
        power_on_n2(&mut lab);
        n2_task = register_n2(&mut lab, &mut n2_replica);
        thread::sleep(Duration::from_millis(500));
        let leader = lab.etcd_leader() == 2;
        let t0 = Instant::now();
        lab.power_off(2);
        let det = detect(&lab, n2_task, t0);
        push_detection(
            &mut rows,
            round,
            "power-off → out of rotation (idle)",
            "power-off → removed, lease (idle)",
            &det,
            idle_goal,
            idle_goal,
            None,
            leader,
        );

        if round < rounds {
            power_on_n2(&mut lab);
            n2_task = register_n2(&mut lab, &mut n2_replica);
        }
    }

    print_table(&proto, rounds, &mut rows);
    let puts: Vec<String> = put_rpc.iter().map(|d| ms1(*d)).collect();
    println!(
        "registration = etcd put RPC start; the put RPCs themselves took {} ms",
        puts.join(", ")
    );
}

fn start_load(lab: &Lab) -> Load {
    let targets: Vec<_> = SURVIVORS.iter().map(|&i| lab.web(i)).collect();
    Load::start(&targets, INTERVAL, CLIENT_TIMEOUT, Duration::from_secs(60))
}

fn count_failed(samples: &[&Sample]) -> usize {
    samples.iter().filter(|s| s.outcome.is_err()).count()
}

fn report_failures(phase: &str, round: usize, samples: &[&Sample]) {
    let failed: Vec<_> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    if failed.is_empty() {
        return;
    }
    let mut s = format!("round {round}, {phase}: {} failed requests:", failed.len());
    for f in failed.iter().take(5) {
        let _ = write!(
            s,
            "\n  to {} after {} ms: {}",
            f.target,
            f.latency.as_millis(),
            f.outcome.as_ref().err().map(String::as_str).unwrap_or("")
        );
    }
    eprintln!("{s}");
}

fn wait(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Start a fresh nginx replica on n2, register it under n2's lease and wait until every node
/// routes it. Returns its address.
fn register_n2(lab: &mut Lab, replica: &mut usize) -> SocketAddr {
    *replica += 1;
    let name = format!("n2-r{replica}");
    let addr = lab.start_nginx(2, &[&name])[0];
    lab.add_task("web", addr, 2, &name);
    wait(EVENT_TIMEOUT, "n2's task routable on every node", || {
        (1..=3).all(|i| {
            lab.routable(i, "web")
                .is_some_and(|r| r.contains(&addr.to_string()))
        })
    });
    addr
}

/// Power n2 on again: link up, its etcd member back (same data dir), its daemon.
fn power_on_n2(lab: &mut Lab) {
    lab.power_on(2);
    lab.restart_etcd(2);
    lab.restart_daemon(2);
}

/// Poll each surviving node's `/routes` until `task` is not routable there, and until it is
/// gone from its table; times are since `t0`.
fn detect(lab: &Lab, task: SocketAddr, t0: Instant) -> Detection {
    let task = task.to_string();
    let admins: Vec<SocketAddr> = SURVIVORS.iter().map(|&i| lab.admin(i)).collect();
    thread::scope(|s| {
        let handles: Vec<_> = admins
            .iter()
            .map(|&admin| {
                let task = task.clone();
                s.spawn(move || {
                    let (mut out, mut gone) = (None, None);
                    while gone.is_none() && t0.elapsed() < EVENT_TIMEOUT {
                        if let Some(state) = task_state(admin, &task) {
                            let routable = state.as_ref().is_some_and(|(r, _)| *r);
                            if !routable && out.is_none() {
                                out = Some(t0.elapsed());
                            }
                            if state.is_none() {
                                gone = Some(t0.elapsed());
                            }
                        }
                        thread::sleep(POLL);
                    }
                    (out, gone)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poller"))
            .collect()
    })
}

/// `Some(None)`: the task is not in `admin`'s table; `Some(Some((routable, state)))`; `None`:
/// no answer.
fn task_state(admin: SocketAddr, task: &str) -> Option<Option<(bool, String)>> {
    let (status, body) = http_get(admin, "/routes", Duration::from_secs(1)).ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let found = v["services"]
        .as_array()?
        .iter()
        .flat_map(|s| s["tasks"].as_array().into_iter().flatten())
        .find(|t| t["addr"] == task);
    Some(found.map(|t| {
        (
            t["routable"] == true,
            t["state"].as_str().unwrap_or_default().to_string(),
        )
    }))
}

/// Per surviving node: time since `t0` of the first GET through it answered by `name`.
fn first_served(lab: &Lab, name: &str, t0: Instant) -> Vec<Option<Duration>> {
    let want = format!("{name}\n");
    let webs: Vec<SocketAddr> = SURVIVORS.iter().map(|&i| lab.web(i)).collect();
    thread::scope(|s| {
        let handles: Vec<_> = webs
            .iter()
            .map(|&web| {
                let want = want.clone();
                s.spawn(move || {
                    while t0.elapsed() < EVENT_TIMEOUT {
                        if let Ok((200, body)) = http_get(web, "/", CLIENT_TIMEOUT)
                            && body == want
                        {
                            return Some(t0.elapsed());
                        }
                    }
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("prober"))
            .collect()
    })
}

#[allow(clippy::too_many_arguments)]
fn push_detection(
    rows: &mut Vec<Row>,
    round: usize,
    out_phase: &str,
    gone_phase: &str,
    det: &Detection,
    out_goal: Duration,
    gone_goal: Duration,
    load: Option<(usize, usize, usize)>,
    leader: bool,
) {
    rows.push(Row {
        phase: out_phase.to_string(),
        round,
        per_node: det.iter().map(|d| d.0).collect(),
        goal: out_goal,
        requests: load.map(|l| l.0),
        failed: load.map(|l| (l.1, l.2)),
        leader: Some(leader),
    });
    rows.push(Row {
        phase: gone_phase.to_string(),
        round,
        per_node: det.iter().map(|d| d.1).collect(),
        goal: gone_goal,
        requests: None,
        failed: None,
        leader: Some(leader),
    });
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .unwrap_or_else(|| "never".to_string())
}

fn ms1(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn print_table(proto: &str, rounds: usize, rows: &mut [Row]) {
    rows.sort_by(|a, b| a.phase.cmp(&b.phase).then(a.round.cmp(&b.round)));
    println!(
        "\nfailover on the 3-node lab ({rounds} rounds, web listener protocol {proto}, node_ttl \
         {} s; n2 powered off, observed on n1 and n3; times in ms)",
        NODE_TTL.as_secs()
    );
    println!(
        "{:<48} {:>5} {:>6} {:>8} {:>8} {:>8} {:>7} {:>5} {:>9} {:>7} {:>8}",
        "phase",
        "round",
        "n2 ldr",
        "n1",
        "n3",
        "all",
        "goal",
        "met",
        "requests",
        "failed",
        "at crash"
    );
    for r in rows.iter() {
        let all = if r.per_node.iter().all(Option::is_some) {
            r.per_node.iter().flatten().max().copied()
        } else {
            None
        };
        let met = all.is_some_and(|a| a <= r.goal);
        let dash = || "-".to_string();
        println!(
            "{:<48} {:>5} {:>6} {:>8} {:>8} {:>8} {:>7} {:>5} {:>9} {:>7} {:>8}",
            r.phase,
            r.round,
            r.leader
                .map(|l| if l { "yes" } else { "no" }.to_string())
                .unwrap_or_else(dash),
            ms(r.per_node[0]),
            ms(r.per_node[1]),
            ms(all),
            ms(Some(r.goal)),
            if met { "yes" } else { "NO" },
            r.requests.map(|n| n.to_string()).unwrap_or_else(dash),
            r.failed.map(|f| f.0.to_string()).unwrap_or_else(dash),
            r.failed.map(|f| f.1.to_string()).unwrap_or_else(dash),
        );
    }
}
