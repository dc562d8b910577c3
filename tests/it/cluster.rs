//! The 3-node cluster suite (issue 4): three network namespaces on one bridge, each with an
//! etcd member, a `routemesh` daemon and real workloads (nginx, mosquitto), replaying the
//! reference scenarios. Needs root (CI runs as root); see `support::lab`.
//!
//! Labs are serialized by a machine-wide lock (each is 3 etcd + 3 daemons + workloads on a
//! 2-core machine), so these tests run one after the other even under `cargo test`'s threads
//! or nextest's processes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::http::get_within;
use crate::support::lab::{DNS_PORT, DNS_ZONE, LAB_HINT, Lab, NODE_TTL, SLOW_BYTES, Shape};
use crate::support::load::{Load, Sample, describe_failures};
use crate::support::process::{require_binary, run_bounded};
use crate::support::{Task, eventually, eventually_value, holds_for};

/// `protocol` of the `web` listener on port 80 of every node. "tcp" until the HTTP listener
/// lands; HTTP over a tcp listener works end to end (nginx answers through it).
const WEB_PROTOCOL: &str = "http";
/// Client timeout of every request: a hung request shows up as a 3 s failure.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Steady load: one GET per target every 20 ms.
const INTERVAL: Duration = Duration::from_millis(20);
/// Hard bound on any load run.
const LOAD_MAX: Duration = Duration::from_secs(40);
/// Bound for a change in etcd to show in every node's routing.
const PROPAGATION: Duration = Duration::from_secs(5);
/// A dead node's lease outlives it by up to an etcd election when it hosted the leader (the
/// new leader renews every lease): TTL + election + propagation bounds its removal.
const NODE_DOWN: Duration = Duration::from_secs(2 + 3 + 5);

/// Steady load: this many requests to each target make a phase of about 200 ms.
const PHASE: usize = 10;

/// A task of `service` with id `id`, for a daemon's config.
fn task(service: &str, addr: SocketAddr, id: &str) -> Task {
    Task::new(service, addr).id(id)
}

/// The reference layout: an nginx `web` task `id` on n2 only, registered by n2's daemon;
/// daemons on all three nodes.
fn web_on_n2(id: &str) -> (Lab, Vec<SocketAddr>) {
    let mut lab = Lab::start(WEB_PROTOCOL);
    let web = lab.start_nginx(2, &[id]);
    lab.start_daemon(1, &[]);
    lab.start_daemon(2, &[task("web", web[0], id)]);
    lab.start_daemon(3, &[]);
    (lab, web)
}

/// Steady HTTP load through the web port of `nodes`.
fn load_via(lab: &Lab, nodes: &[usize]) -> Load {
    let targets: Vec<SocketAddr> = nodes.iter().map(|&i| lab.web(i)).collect();
    Load::start(&targets, INTERVAL, CLIENT_TIMEOUT, LOAD_MAX)
}

/// Wait until every node of `nodes` routes `service` to exactly `addrs` (as sets).
fn wait_routable(
    lab: &Lab,
    nodes: &[usize],
    service: &str,
    addrs: &[SocketAddr],
    within: Duration,
) {
    let want: BTreeSet<String> = addrs.iter().map(ToString::to_string).collect();
    eventually(
        within,
        &format!("nodes {nodes:?} to route {service} to exactly {want:?}"),
        || {
            nodes.iter().all(|&i| {
                lab.routable(i, service)
                    .is_some_and(|r| r.into_iter().collect::<BTreeSet<_>>() == want)
            })
        },
    );
}

/// Wait until every node of `observers` sees node `name` Down (its lease expired) and holds
/// no task of it any more.
fn wait_node_down(lab: &Lab, observers: &[usize], name: &str) {
    eventually(
        NODE_DOWN,
        &format!("nodes {observers:?} to see {name} Down"),
        || {
            observers.iter().all(|&i| {
                lab.node_status(i, name).as_deref() == Some("Down")
                    && lab.routes(i).is_some_and(|r| {
                        r["services"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .flat_map(|s| s["tasks"].as_array().into_iter().flatten())
                            .all(|t| t["node"] != name)
                    })
            })
        },
    );
}

/// GET / through node `i`'s published web port.
fn get(lab: &Lab, i: usize) -> Result<String, String> {
    match get_within(lab.web(i), "/", CLIENT_TIMEOUT) {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("status {status}: {body:?}")),
        Err(e) => Err(e),
    }
}

fn assert_no_failures(samples: &[Sample]) {
    assert!(
        failures(samples).is_empty(),
        "0 failed requests expected: {}",
        describe_failures(samples)
    );
}

fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.outcome.is_err()).collect()
}

/// Whether the load got an answer `body` from some request so far.
fn served(load: &Load, body: &str) -> bool {
    load.samples()
        .iter()
        .any(|s| s.outcome.as_deref().is_ok_and(|b| b.trim() == body))
}

/// The distinct answers of the requests that started after `at` (sorted).
fn answers_after(samples: &[Sample], at: Duration) -> Vec<String> {
    let after: Vec<Sample> = samples.iter().filter(|s| s.at > at).cloned().collect();
    bodies(&after).into_keys().collect()
}

fn bodies(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        if let Ok(b) = &s.outcome {
            *m.entry(b.trim().to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// Scenario 1: nginx `web` only on n2, published on 80 of every node.
#[test]
fn s1_web_on_one_node_is_served_through_every_node() {
    let (lab, web) = web_on_n2("n2-r1");
    wait_routable(&lab, &[1, 2, 3], "web", &web, PROPAGATION);
    for i in 1..=3 {
        assert_eq!(get(&lab, i), Ok("n2-r1\n".to_string()), "GET via n{i}");
    }
}

/// Scenario 2: the only web task's node dies under load; requests fail fast, never hang; a
/// replacement on n3 is served through n1 and n3; `node ls` shows n2 Down.
#[test]
fn s2_power_off_the_only_task_fails_fast_then_replacement_serves() {
    let (mut lab, web) = web_on_n2("n2-r1");
    wait_routable(&lab, &[1, 3], "web", &web, PROPAGATION);

    let load = load_via(&lab, &[1, 3]);
    load.run_through(PHASE, PROPAGATION);
    let off_at = load.elapsed();
    let off_instant = Instant::now();
    lab.power_off(2);
    wait_routable(&lab, &[1, 3], "web", &[], NODE_DOWN);
    let gone_at = load.elapsed();
    // Keep the load on through the whole dead-node window (until the lease expired): every
    // request in it must fail fast.
    wait_node_down(&lab, &[1, 3], "n2");
    let down_at = load.elapsed();

    let rep = lab.start_nginx(3, &["n3-r1"]);
    lab.add_task("web", rep[0], 3, "n3-r1");
    let reg_at = load.elapsed();
    eventually(PROPAGATION, "n1 and n3 serve the replacement", || {
        [1, 3]
            .iter()
            .all(|&i| get(&lab, i).as_deref() == Ok("n3-r1\n"))
    });
    let served_at = load.elapsed();
    load.run_through(2 * PHASE, PROPAGATION);
    let samples = load.stop();
    eprintln!(
        "s2: power-off at {off_at:?}, n2's task out of routing at {gone_at:?}, n2 Down at \
         {down_at:?}, replacement registered at {reg_at:?}, served on n1+n3 at {served_at:?}; {}",
        describe_failures(&samples)
    );

    let before: Vec<_> = samples.iter().filter(|s| s.at < off_at).collect();
    assert!(!before.is_empty(), "no requests before the power-off");
    assert!(
        before.iter().all(|s| s.outcome.as_deref() == Ok("n2-r1\n")),
        "before the power-off every request is served by n2: {}",
        describe_failures(&samples)
    );
    let slowest_failure = failures(&samples)
        .iter()
        .map(|s| s.latency)
        .max()
        .unwrap_or_default();
    assert!(
        slowest_failure < Duration::from_secs(2),
        "failing requests must fail fast (< 2 s), slowest took {slowest_failure:?}: {}",
        describe_failures(&samples)
    );
    let slowest = samples.iter().map(|s| s.latency).max().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(2),
        "a request hung for {slowest:?}"
    );
    let after: Vec<_> = samples
        .iter()
        .filter(|s| s.at > served_at)
        .cloned()
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|s| s.outcome.as_deref() == Ok("n3-r1\n")),
        "after the replacement is served, every request gets it: {:?}; {}",
        bodies(&after),
        describe_failures(&after)
    );

    // The lease (TTL 2 s) may outlive the passive ejection that took n2's task out of
    // rotation; `node ls` must show n2 Down once it expired.
    let status_of = |ls: &str, node: &str| {
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    };
    let ls = eventually_value(NODE_DOWN, "node ls to show n2 Down", || {
        let ls = lab.cli_ok(&["node", "ls"]);
        (status_of(&ls, "n2").as_deref() == Some("Down")).then_some(ls)
    });
    eprintln!(
        "s2: node ls shows n2 Down {:?} after the power-off:\n{ls}",
        off_instant.elapsed()
    );
    assert_eq!(status_of(&ls, "n1").as_deref(), Some("Ready"), "{ls}");
    assert_eq!(status_of(&ls, "n3").as_deref(), Some("Ready"), "{ls}");
}

/// Scenario 3: replicas on n2 and n3; n2 dies under steady load → 0 failed requests
/// (connect timeout 300 ms + retry on another task, passive ejection, then the lease).
#[test]
fn s3_power_off_one_replica_node_under_load_loses_nothing() {
    let mut lab = Lab::start(WEB_PROTOCOL);
    let r2 = lab.start_nginx(2, &["n2-r1"]);
    let r3 = lab.start_nginx(3, &["n3-r1"]);
    lab.start_daemon(1, &[]);
    lab.start_daemon(2, &[task("web", r2[0], "n2-r1")]);
    lab.start_daemon(3, &[task("web", r3[0], "n3-r1")]);
    wait_routable(&lab, &[1, 3], "web", &[r2[0], r3[0]], PROPAGATION);

    let load = load_via(&lab, &[1, 3]);
    load.run_through(PHASE, PROPAGATION);
    eventually(PROPAGATION, "both replicas serving the load", || {
        served(&load, "n2-r1") && served(&load, "n3-r1")
    });
    let off_at = load.elapsed();
    lab.power_off(2);
    let off_done = load.elapsed();
    wait_routable(&lab, &[1, 3], "web", &r3, NODE_DOWN);
    let gone_at = load.elapsed();
    // Keep the load on until n2's lease expired and its task left the table.
    wait_node_down(&lab, &[1, 3], "n2");
    let down_at = load.elapsed();
    load.run_through(2 * PHASE, PROPAGATION);
    let samples = load.stop();
    eprintln!(
        "s3: power-off {off_at:?}..{off_done:?}, n2's task out of rotation at {gone_at:?}, \
         n2 Down at {down_at:?}; {} ; bodies {:?}",
        describe_failures(&samples),
        bodies(&samples)
    );
    let before = bodies(
        &samples
            .iter()
            .filter(|s| s.at < off_at)
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert!(
        before.contains_key("n2-r1") && before.contains_key("n3-r1"),
        "both replicas served before the power-off: {before:?}"
    );
    // A request whose upstream connection to n2 was open at the instant of the SIGKILL gets a
    // reset from the dying kernel before any response byte: the proxy ejects n2's task and
    // retries the GET on n3. So not one request may fail.
    assert_no_failures(&samples);
    assert_eq!(answers_after(&samples, gone_at), ["n3-r1"]);
}

/// Scenario 4: ten replicas over the three nodes; 300 GETs through the node IPs reach all.
#[test]
fn s4_ten_replicas_all_reached_through_every_node() {
    let mut lab = Lab::start(WEB_PROTOCOL);
    let spread = [(1, 3), (2, 3), (3, 4)];
    let mut all = Vec::new();
    let mut names = BTreeSet::new();
    for (node, count) in spread {
        let replicas: Vec<String> = (1..=count).map(|k| format!("n{node}-r{k}")).collect();
        let refs: Vec<&str> = replicas.iter().map(String::as_str).collect();
        let addrs = lab.start_nginx(node, &refs);
        let tasks: Vec<Task> = replicas
            .iter()
            .zip(&addrs)
            .map(|(r, a)| task("web", *a, r))
            .collect();
        lab.start_daemon(node, &tasks);
        all.extend(addrs);
        names.extend(replicas);
    }
    wait_routable(&lab, &[1, 2, 3], "web", &all, PROPAGATION);

    let mut per_node: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for k in 0..300 {
        let node = k % 3 + 1;
        let body = get(&lab, node).unwrap_or_else(|e| panic!("GET #{k} via n{node}: {e}"));
        let body = body.trim().to_string();
        per_node.entry(node).or_default().insert(body.clone());
        seen.insert(body);
    }
    assert_eq!(seen, names, "300 GETs reach all ten replicas");
    for (node, set) in &per_node {
        assert_eq!(set, &names, "100 GETs via n{node} reach all ten replicas");
    }
}

/// Scenario 5: mosquitto only on n2; three publishers through three different nodes; a
/// subscriber through n1 gets every message; the broker saw three publisher clients.
#[test]
fn s5_mqtt_publishers_on_three_nodes_reach_one_broker() {
    let sub_bin = require_binary("mosquitto_sub", LAB_HINT);
    let pub_bin = require_binary("mosquitto_pub", LAB_HINT);
    let mut lab = Lab::start(WEB_PROTOCOL);
    let broker = lab.start_mosquitto(2);
    lab.start_daemon(1, &[]);
    lab.start_daemon(2, &[task("mqtt", broker, "mqtt-n2")]);
    lab.start_daemon(3, &[]);
    wait_routable(&lab, &[1, 2, 3], "mqtt", &[broker], PROPAGATION);
    mqtt_via_every_node(&lab, &sub_bin, &pub_bin);
}

/// Three publishers through three different nodes' port 1883 and a subscriber through n1:
/// the subscriber gets every message and the broker (on n2) saw three publisher clients, each
/// from a different node's daemon.
fn mqtt_via_every_node(lab: &Lab, sub_bin: &std::path::Path, pub_bin: &std::path::Path) {
    const PER_PUBLISHER: usize = 5;
    let total = 3 * PER_PUBLISHER;
    let via1 = lab.mqtt(1);
    let mut sub = Command::new(sub_bin);
    sub.args(["-h", &via1.ip().to_string(), "-p", &via1.port().to_string()])
        .args(["-i", "sub-via-n1", "-q", "1", "-v", "-t", "telemetry/#"])
        .args(["-C", &total.to_string(), "-W", "30"]);
    let subscriber = thread::spawn(move || run_bounded(&mut sub, None, Duration::from_secs(35)));
    eventually(
        Duration::from_secs(10),
        "the subscriber's SUBSCRIBE at the broker",
        || {
            lab.mosquitto_log(2)
                .contains("Received SUBSCRIBE from sub-via-n1")
        },
    );

    let mut expected = BTreeSet::new();
    for node in 1..=3 {
        let via = lab.mqtt(node);
        let client = format!("pub-via-n{node}");
        let mut lines = String::new();
        for k in 0..PER_PUBLISHER {
            let msg = format!(
                "{{\"Mac\":\"AA:BB:CC:00:0{node}:{k:02X}\",\"Temperatura\":{}.{k}}}",
                20 + node
            );
            expected.insert(format!("telemetry/{client} {msg}"));
            lines.push_str(&msg);
            lines.push('\n');
        }
        let mut p = Command::new(pub_bin);
        p.args(["-h", &via.ip().to_string(), "-p", &via.port().to_string()])
            .args([
                "-i",
                &client,
                "-q",
                "1",
                "-t",
                &format!("telemetry/{client}"),
                "-l",
            ]);
        let out = run_bounded(&mut p, Some(lines.as_bytes()), Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("mosquitto_pub via n{node}: {e}"));
        assert!(
            out.status.success(),
            "mosquitto_pub via n{node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = subscriber
        .join()
        .expect("subscriber thread")
        .expect("mosquitto_sub ran");
    let got: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        got,
        expected,
        "the subscriber via n1 receives every message (stderr: {})",
        String::from_utf8_lossy(&out.stderr)
    );

    // "New client connected from 10.x.y.N:PORT as pub-via-nK (p2, c1, k60)."
    let log = lab.mosquitto_log(2);
    let mut publishers = BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line.split_once("New client connected from ").map(|x| x.1) else {
            continue;
        };
        let Some((from, after)) = rest.split_once(" as ") else {
            continue;
        };
        let id = after.split(" (").next().unwrap_or_default();
        if id.starts_with("pub-via-") {
            let ip = from.rsplit_once(':').map(|x| x.0).unwrap_or(from);
            publishers.insert(id.to_string(), ip.to_string());
        }
    }
    assert_eq!(
        publishers.keys().cloned().collect::<Vec<_>>(),
        ["pub-via-n1", "pub-via-n2", "pub-via-n3"],
        "the broker saw three publisher clients; log:\n{log}"
    );
    let sources: BTreeSet<_> = publishers.values().collect();
    assert_eq!(
        sources.len(),
        3,
        "each publisher arrived from a different node's daemon: {publishers:?}"
    );
}

/// Scenario 6: power off the etcd leader's node during traffic (its daemon hosts no web
/// task): 0 data-plane errors on the other two nodes, and discovery goes on there.
#[test]
fn s6_losing_an_etcd_member_keeps_data_plane_and_discovery() {
    let mut lab = Lab::start(WEB_PROTOCOL);
    let leader = lab.etcd_leader();
    let others: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let (a, b) = (others[0], others[1]);
    for i in 1..=3 {
        lab.start_daemon(i, &[]);
    }
    let ra = lab.start_nginx(a, &[&format!("n{a}-r1"), &format!("n{a}-r2")]);
    let rb = lab.start_nginx(b, &[&format!("n{b}-r1")]);
    for (node, addr, id) in [
        (a, ra[0], format!("n{a}-r1")),
        (b, rb[0], format!("n{b}-r1")),
    ] {
        lab.add_task("web", addr, node, &id);
    }
    wait_routable(&lab, &[a, b], "web", &[ra[0], rb[0]], PROPAGATION);

    let load = load_via(&lab, &[a, b]);
    load.run_through(PHASE, PROPAGATION);
    let off_at = load.elapsed();
    lab.power_off(leader);
    // Past a new election and a whole node lease: the survivors' leases must have been kept.
    // First the election; then, for a lease TTL and a second more (what a lost lease would
    // need to show), both survivors keep routing to both tasks.
    eventually(NODE_DOWN, "a new etcd leader among the survivors", || {
        lab.try_etcd_leader().is_some_and(|l| l != leader)
    });
    holds_for(
        NODE_TTL + Duration::from_secs(1),
        "the survivors keep routing to their tasks",
        || {
            [a, b].iter().all(|&i| {
                lab.routable(i, "web").is_some_and(|r| {
                    r.contains(&ra[0].to_string()) && r.contains(&rb[0].to_string())
                })
            })
        },
    );
    let added = Instant::now();
    lab.add_task("web", ra[1], a, &format!("n{a}-r2"));
    wait_routable(&lab, &[a, b], "web", &[ra[0], ra[1], rb[0]], PROPAGATION);
    let routable_after = added.elapsed();
    for &i in &[a, b] {
        let want = format!("n{a}-r2\n");
        eventually(
            PROPAGATION,
            &format!("n{i} serves the task added later"),
            || get(&lab, i).as_deref() == Ok(want.as_str()),
        );
    }
    load.run_through(PHASE, PROPAGATION);
    let samples = load.stop();
    eprintln!(
        "s6: etcd leader n{leader} powered off at {off_at:?}; task added afterwards routable on \
         n{a}+n{b} in {routable_after:?}; {}",
        describe_failures(&samples)
    );
    assert!(
        failures(&samples).is_empty(),
        "0 data-plane errors expected: {}",
        describe_failures(&samples)
    );
    for &i in &[a, b] {
        let routes = lab.routes(i).expect("routes");
        assert_eq!(routes["discovery_up"], true, "n{i} discovery up: {routes}");
    }
}

/// Scenario 7a: rolling replacement through etcd: register the new task, deregister the old
/// one, then stop the old nginx gracefully: 0 failed requests.
#[test]
fn s7a_rolling_replacement_via_etcd_loses_nothing() {
    let mut lab = Lab::start(WEB_PROTOCOL);
    for i in 1..=3 {
        lab.start_daemon(i, &[]);
    }
    let old = lab.start_nginx(2, &["old"]);
    lab.add_task("web", old[0], 2, "old");
    wait_routable(&lab, &[1, 2, 3], "web", &old, PROPAGATION);

    let load = load_via(&lab, &[1, 2, 3]);
    load.run_through(PHASE, PROPAGATION);
    let new = lab.start_nginx(3, &["new"]);
    lab.add_task("web", new[0], 3, "new");
    wait_routable(&lab, &[1, 2, 3], "web", &[old[0], new[0]], PROPAGATION);
    eventually(PROPAGATION, "the new task serving the load", || {
        served(&load, "new")
    });
    lab.cli_ok(&["task", "rm", "web", "old"]);
    wait_routable(&lab, &[1, 2, 3], "web", &new, PROPAGATION);
    // Drain: the old task is out of every node's rotation; stop it gracefully.
    lab.stop(2, "nginx-old", libc::SIGQUIT);
    let stopped_at = load.elapsed();
    load.run_through(2 * PHASE, PROPAGATION);
    let samples = load.stop();
    eprintln!(
        "s7a: {} ; bodies {:?}",
        describe_failures(&samples),
        bodies(&samples)
    );
    assert_no_failures(&samples);
    let seen = bodies(&samples);
    assert!(
        seen.contains_key("old") && seen.contains_key("new"),
        "{seen:?}"
    );
    assert_eq!(answers_after(&samples, stopped_at), ["new"]);
}

/// Scenario 7b: rolling replacement by draining the old task's node: register the new task,
/// SIGTERM the daemon hosting the old one (its lease is revoked at once, it exits 0), then
/// stop the old nginx: 0 failed requests through the other nodes.
#[test]
fn s7b_rolling_replacement_by_node_drain_loses_nothing() {
    let (mut lab, old) = web_on_n2("old");
    wait_routable(&lab, &[1, 3], "web", &old, PROPAGATION);

    let load = load_via(&lab, &[1, 3]);
    load.run_through(PHASE, PROPAGATION);
    let new = lab.start_nginx(1, &["new"]);
    lab.add_task("web", new[0], 1, "new");
    wait_routable(&lab, &[1, 3], "web", &[old[0], new[0]], PROPAGATION);
    eventually(PROPAGATION, "the new task serving the load", || {
        served(&load, "new")
    });
    let term = Instant::now();
    lab.signal_daemon(2, libc::SIGTERM);
    // Lease revoked first: gone from the other nodes well before the lease TTL.
    wait_routable(&lab, &[1, 3], "web", &new, NODE_TTL);
    let gone_in = term.elapsed();
    let status = lab
        .wait_exit(2, "routemesh", Duration::from_secs(10))
        .expect("n2's daemon exits within drain_timeout + margin after SIGTERM");
    assert!(
        status.success(),
        "n2's daemon exits 0 after drain: {status}"
    );
    lab.stop(2, "nginx-old", libc::SIGQUIT);
    let stopped_at = load.elapsed();
    load.run_through(2 * PHASE, PROPAGATION);
    let samples = load.stop();
    eprintln!(
        "s7b: old task out of routing {gone_in:?} after SIGTERM; {} ; bodies {:?}",
        describe_failures(&samples),
        bodies(&samples)
    );
    assert!(
        gone_in < Duration::from_secs(1),
        "SIGTERM revokes the lease first: old task gone in {gone_in:?} (TTL {NODE_TTL:?})"
    );
    assert_no_failures(&samples);
    assert_eq!(answers_after(&samples, stopped_at), ["new"]);
}

/// Scenario 8: a powered-off node comes back: powered on, its etcd member and daemon started
/// again with their data and config, it is Ready on every node again and serves the web
/// task (on n1) through its published port.
#[test]
fn s8_a_powered_off_node_rejoins_when_it_comes_back() {
    let mut lab = Lab::start(WEB_PROTOCOL);
    let web = lab.start_nginx(1, &["n1-r1"]);
    lab.start_daemon(1, &[task("web", web[0], "n1-r1")]);
    lab.start_daemon(2, &[]);
    lab.start_daemon(3, &[]);
    wait_routable(&lab, &[1, 2, 3], "web", &web, PROPAGATION);

    lab.power_off(2);
    wait_node_down(&lab, &[1, 3], "n2");
    lab.power_on(2);
    lab.restart_etcd(2);
    lab.restart_daemon(2);
    eventually(NODE_DOWN, "n1 and n3 to see n2 Ready again", || {
        [1, 3]
            .iter()
            .all(|&i| lab.node_status(i, "n2").as_deref() == Some("Ready"))
    });
    wait_routable(&lab, &[2], "web", &web, PROPAGATION);
    assert_eq!(get(&lab, 2), Ok("n1-r1\n".to_string()), "GET via n2");
}

/// `routemesh publish ls --json` rows by name: (bound, ready).
fn published_counts(lab: &Lab) -> BTreeMap<String, (u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&lab.cli_ok(&["publish", "ls", "--json"])).expect("publish ls JSON");
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                (
                    r["bound"].as_u64().unwrap_or(0),
                    r["ready"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

fn refuses(addr: SocketAddr) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Scenario 9, the reference scenario with no listener in any TOML file: `publish add web
/// 80/http` and `publish add mqtt 1883` serve the page on every node's IP and MQTT through
/// every node; `publish ls` shows 3/3; `publish rm` closes port 80 on every node while a
/// request in flight on an open connection finishes.
#[test]
fn s9_ports_published_once_in_etcd_are_served_by_every_node() {
    let sub_bin = require_binary("mosquitto_sub", LAB_HINT);
    let pub_bin = require_binary("mosquitto_pub", LAB_HINT);
    let mut lab = Lab::start(WEB_PROTOCOL);
    let web = lab.start_nginx(2, &["web-n2"]);
    let broker = lab.start_mosquitto(2);
    let bare = Shape {
        toml_listeners: false,
        ..Shape::default()
    };
    lab.start_daemon_shaped(1, &[], bare);
    lab.start_daemon_shaped(
        2,
        &[
            task("web", web[0], "web-n2"),
            task("mqtt", broker, "mqtt-n2"),
        ],
        bare,
    );
    lab.start_daemon_shaped(3, &[], bare);
    for i in 1..=3 {
        assert!(refuses(lab.web(i)), "nothing is published yet on n{i}");
    }

    assert_eq!(
        lab.cli_ok(&["publish", "add", "web", "80/http"]).trim(),
        "web-80-http"
    );
    assert_eq!(
        lab.cli_ok(&["publish", "add", "mqtt", "1883"]).trim(),
        "mqtt-1883-tcp"
    );
    eventually(PROPAGATION, "both ports bound on 3/3 nodes", || {
        let c = published_counts(&lab);
        c.get("web-80-http") == Some(&(3, 3)) && c.get("mqtt-1883-tcp") == Some(&(3, 3))
    });
    let ls = lab.cli_ok(&["publish", "ls"]);
    assert!(
        ls.lines().any(|l| l.split_whitespace().eq([
            "web-80-http",
            "0.0.0.0:80",
            "http",
            "web",
            "3/3",
            "etcd"
        ])),
        "{ls}"
    );
    for i in 1..=3 {
        let (code, body) = get_within(lab.web(i), "/", CLIENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET / via n{i}: {e}"));
        assert_eq!((code, body.as_str()), (200, "web-n2\n"), "via n{i}");
    }
    mqtt_via_every_node(&lab, &sub_bin, &pub_bin);

    // A slow request in flight through n1 when the port is unpublished.
    use std::io::{Read, Write};
    let mut open = std::net::TcpStream::connect_timeout(&lab.web(1), CLIENT_TIMEOUT).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(open, "GET /slow HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
    let head = crate::support::http::read_head(&mut open).expect("the response head");
    assert_eq!(head.status, 200);
    assert_eq!(
        lab.cli_ok(&["publish", "rm", "web-80-http"]).trim(),
        "web-80-http"
    );
    eventually(PROPAGATION, "port 80 refused on every node", || {
        (1..=3).all(|i| refuses(lab.web(i)))
    });
    let mut body = vec![0; SLOW_BYTES];
    open.read_exact(&mut body)
        .expect("the request in flight finishes after the port is unpublished");
    assert!(body.iter().all(|&b| b == b's'));
    assert!(refuses(lab.web(2)));
    let c = published_counts(&lab);
    assert!(!c.contains_key("web-80-http"), "{c:?}");
    assert_eq!(c.get("mqtt-1883-tcp"), Some(&(3, 3)));
}

/// `dig +short A ZONE @node` through node `i`'s responder: the addresses it names.
fn dns_a(lab: &Lab, i: usize, dig: &std::path::Path) -> Option<BTreeSet<String>> {
    let mut cmd = Command::new(dig);
    cmd.args([
        "+short",
        "+time=1",
        "+tries=1",
        "-p",
        &DNS_PORT.to_string(),
        &format!("@{}", lab.ip(i)),
        DNS_ZONE,
        "A",
    ]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(5)).ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    })
}

/// Scenario 10, drain under load: 200 requests/s through all three nodes, web replicas on n2
/// and n3. Draining n2 fails no request, its replica gets no new request once the drain has
/// propagated (100 ms), DNS stops naming n2 and n2's /readyz is 503; `--availability active`
/// brings all of it back.
#[test]
fn s10_draining_a_node_under_load_loses_nothing() {
    let dig = require_binary("dig", LAB_HINT);
    let mut lab = Lab::start(WEB_PROTOCOL);
    let on2 = lab.start_nginx(2, &["web-n2"]);
    let on3 = lab.start_nginx(3, &["web-n3"]);
    let shape = Shape {
        dns: true,
        ..Shape::default()
    };
    lab.start_daemon_shaped(1, &[], shape);
    lab.start_daemon_shaped(2, &[task("web", on2[0], "web-n2")], shape);
    lab.start_daemon_shaped(3, &[task("web", on3[0], "web-n3")], shape);
    wait_routable(&lab, &[1, 2, 3], "web", &[on2[0], on3[0]], PROPAGATION);
    let all: BTreeSet<String> = (1..=3).map(|i| lab.ip(i).to_string()).collect();
    eventually(PROPAGATION, "DNS names all three nodes", || {
        dns_a(&lab, 1, &dig).as_ref() == Some(&all)
    });

    // 15 ms per target and three targets: 200 requests/s.
    let load = Load::start(
        &[lab.web(1), lab.web(2), lab.web(3)],
        Duration::from_millis(15),
        CLIENT_TIMEOUT,
        LOAD_MAX,
    );
    let served_by_n2 = || lab.nginx_requests(2, "web-n2");
    eventually(
        Duration::from_secs(5),
        "n2's replica serves part of the load",
        || served_by_n2() > 20,
    );
    lab.cli_ok(&["node", "update", "--availability", "drain", "n2"]);
    thread::sleep(Duration::from_millis(100)); // the propagation bound under test
    let at_drain = served_by_n2();
    holds_for(
        Duration::from_secs(2),
        "n2's replica gets no new request while n2 is drained",
        || served_by_n2() == at_drain,
    );
    let without_n2: BTreeSet<String> = [lab.ip(1), lab.ip(3)]
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    eventually(PROPAGATION, "DNS leaves n2 out on every node", || {
        (1..=3).all(|i| dns_a(&lab, i, &dig).as_ref() == Some(&without_n2))
    });
    let (code, why) = get_within(lab.admin(2), "/readyz", CLIENT_TIMEOUT).unwrap();
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("drain"), "{why}");
    let ls = lab.cli_ok(&["node", "ls"]);
    assert!(
        ls.lines().any(|l| l.split_whitespace().take(4).eq([
            "n2",
            &lab.ip(2).to_string(),
            "Ready",
            "drain"
        ])),
        "{ls}"
    );

    lab.cli_ok(&["node", "update", "--availability", "active", "n2"]);
    eventually(PROPAGATION, "n2's replica serves again", || {
        served_by_n2() > at_drain + 5
    });
    eventually(PROPAGATION, "DNS names n2 again", || {
        dns_a(&lab, 1, &dig).as_ref() == Some(&all)
    });
    assert_eq!(
        get_within(lab.admin(2), "/readyz", CLIENT_TIMEOUT)
            .unwrap()
            .0,
        200
    );
    let samples = load.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "no request fails during the drain: {}",
        describe_failures(&samples)
    );
}
