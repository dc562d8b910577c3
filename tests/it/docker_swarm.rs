//! Swarm mode source (`[docker] swarm = true`, src/docker/swarm*.rs) against the real local
//! engine: the test turns it into a one-node swarm (`docker swarm init --advertise-addr
//! 127.0.0.1`), creates an attachable overlay network and a service of the nginx test image
//! labelled `routemesh.service` / `routemesh.port`, and runs the routemesh daemon (the debug
//! binary) on the host against a real etcd.
//!
//! What is asserted is **registration**: the running tasks' overlay IPs appear under
//! `/routemesh/tasks/<service>/<service>.<slot>.<task id>` with this node's name, follow a
//! scale-up, vanish with the daemon's lease, come back when it restarts, and leave when the
//! service is removed. Traffic through the overlay is not tested: the host cannot in general
//! reach overlay IPs (they live in the engine's network namespaces), and that is not what
//! this source is about.
//!
//! If the engine is already in a swarm the test fails with a message and touches nothing.
//! A guard removes the service and the network and leaves the swarm it created, also when
//! the test fails. Every wait is bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::docker::{DOCKER_TIMEOUT, docker, docker_raw, nginx_image, require_engine};
use crate::support::process::unique_name;
use crate::support::wait::eventually_ok;
use crate::support::{Config, Etcd, Etcdctl, Listener, free_addr, output_text};
use serde_json::Value;

/// Longest wait for the swarm to schedule and start tasks and routemesh to register them.
const CONVERGE: Duration = Duration::from_secs(60);
/// Longest wait for something an event (or the lease) should do quickly.
const PROMPT: Duration = Duration::from_secs(20);
const PREFIX: &str = "/routemesh";

/// The swarm this test made, and what it created in it; all removed on drop.
struct SwarmLab {
    initialised: bool,
    /// Whether `swarm init` made the engine's docker_gwbridge network (leave keeps it).
    made_gwbridge: bool,
    service: Option<String>,
    network: Option<String>,
}

impl SwarmLab {
    /// Fails (touching nothing) when the engine is already part of a swarm.
    fn check_no_swarm() {
        require_engine();
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        assert!(
            state == "inactive" || state.is_empty(),
            "the Docker engine is already in a swarm (LocalNodeState = {state:?}). This test \
             initialises its own one-node swarm and leaves it afterwards, so it does not run \
             against an existing one: if that swarm is disposable, `docker swarm leave --force` \
             and run the test again."
        );
    }

    fn init(&mut self) {
        let had_gwbridge = docker_raw(&["network", "inspect", "docker_gwbridge"], DOCKER_TIMEOUT)
            .status
            .success();
        let out = docker_raw(
            &["swarm", "init", "--advertise-addr", "127.0.0.1"],
            DOCKER_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "`docker swarm init --advertise-addr 127.0.0.1` failed:\n{}",
            output_text(&out)
        );
        self.initialised = true;
        self.made_gwbridge = !had_gwbridge;
    }
}

impl Drop for SwarmLab {
    fn drop(&mut self) {
        if let Some(s) = &self.service {
            let _ = docker_raw(&["service", "rm", s], DOCKER_TIMEOUT);
            // The network can go only once the task containers are gone.
            let filter = format!("label=com.docker.swarm.service.name={s}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let out = docker_raw(&["ps", "-aq", "--filter", &filter], DOCKER_TIMEOUT);
                if !out.status.success() || out.stdout.iter().all(u8::is_ascii_whitespace) {
                    break;
                }
                thread::sleep(Duration::from_millis(250));
            }
        }
        if let Some(n) = &self.network {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !docker_raw(&["network", "rm", n], DOCKER_TIMEOUT)
                .status
                .success()
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(500));
            }
        }
        if self.initialised {
            let out = docker_raw(&["swarm", "leave", "--force"], DOCKER_TIMEOUT);
            if !out.status.success() {
                eprintln!(
                    "[docker_swarm] `docker swarm leave --force` failed:\n{}",
                    output_text(&out)
                );
            } else if self.made_gwbridge {
                let _ = docker_raw(&["network", "rm", "docker_gwbridge"], DOCKER_TIMEOUT);
            }
        }
    }
}

/// The running tasks of `service` as routemesh should register them: task id
/// (`service.slot.taskid`) → overlay IP on `network` : 8080.
fn running_tasks(service: &str, network: &str) -> BTreeMap<String, SocketAddr> {
    let ids = docker(&[
        "service",
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        "desired-state=running",
        service,
    ]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return BTreeMap::new();
    }
    let mut args = vec!["inspect", "--type", "task"];
    args.extend(&ids);
    let out = docker_raw(&args, DOCKER_TIMEOUT);
    if !out.status.success() {
        return BTreeMap::new(); // a task went away between the two calls
    }
    let tasks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("docker inspect json");
    let mut m = BTreeMap::new();
    for t in tasks {
        if t["Status"]["State"] != "running" || t["DesiredState"] != "running" {
            continue;
        }
        let ip = t["NetworksAttachments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["Network"]["Spec"]["Name"] == network)
            .and_then(|a| a["Addresses"][0].as_str())
            .and_then(|a| a.split('/').next())
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        let Some(ip) = ip else { continue };
        let id = format!(
            "{service}.{}.{}",
            t["Slot"].as_u64().expect("replicated task has a slot"),
            t["ID"].as_str().unwrap()
        );
        m.insert(id, SocketAddr::new(ip, 8080));
    }
    m
}

/// What etcd holds for `service`: task id → (addr, node, weight).
fn registered(etcd: &Etcd, service: &str) -> BTreeMap<String, (SocketAddr, String, u64)> {
    let dir = format!("{PREFIX}/tasks/{service}/");
    etcd.get_prefix(&dir)
        .into_iter()
        .map(|(k, v)| {
            let v: Value = serde_json::from_str(&v).unwrap_or_else(|e| panic!("{k}: {v}: {e}"));
            let addr = v["addr"].as_str().unwrap().parse().unwrap();
            (
                k.trim_start_matches(&dir).to_string(),
                (
                    addr,
                    v["node"].as_str().unwrap_or_default().to_string(),
                    v["weight"].as_u64().unwrap_or(1),
                ),
            )
        })
        .collect()
}

/// Waits until etcd holds exactly the `n` running tasks of the service, under `node`;
/// returns them.
fn wait_registered(
    etcd: &Etcd,
    service: &str,
    network: &str,
    node: &str,
    n: usize,
    timeout: Duration,
) -> BTreeMap<String, SocketAddr> {
    eventually_ok(
        timeout,
        &format!("{n} registered tasks of {service}"),
        || {
            let want = running_tasks(service, network);
            let have = registered(etcd, service);
            let same = want.len() == n
                && have.len() == n
                && want
                    .iter()
                    .all(|(id, a)| have.get(id).is_some_and(|(b, nd, _)| a == b && nd == node));
            if same {
                Ok(want)
            } else {
                Err(format!("running (docker): {want:?}; in etcd: {have:?}"))
            }
        },
    )
}

fn wait_none(etcd: &Etcd, service: &str, timeout: Duration, what: &str) {
    eventually_ok(timeout, &format!("no task of {service} ({what})"), || {
        let have = registered(etcd, service);
        if have.is_empty() {
            Ok(())
        } else {
            Err(format!("still registered: {have:?}"))
        }
    });
}

/// Node `node` on `etcd`, a TCP listener for `service`, `[docker]` in swarm mode on `network`.
fn config(node: &str, etcd: &Etcd, service: &str, network: &str) -> Config {
    Config::etcd(&[etcd.endpoint()])
        .node(node)
        .set("discovery.node_ttl", "3s")
        .listener(Listener::tcp(free_addr(), service))
        .set(&format!("service.{service}.connect_timeout"), "500ms")
        .set("docker.enabled", true)
        .set("docker.swarm", true)
        .set("docker.network", network)
        .set("docker.reconcile_interval", "60s")
}

#[test]
fn swarm_manager_registers_labelled_service_tasks() {
    let image = nginx_image();
    SwarmLab::check_no_swarm();
    let name = unique_name("rmsw");
    let (service, network, node) = (name.clone(), format!("{name}-net"), format!("{name}-mgr"));
    let etcd = Etcd::start();
    let mut lab = SwarmLab {
        initialised: false,
        made_gwbridge: false,
        service: None,
        network: None,
    };

    // Not in a swarm yet: the daemon says so, keeps running, registers nothing.
    let mut d = config(&node, &etcd, &service, &network).start();
    d.wait_for_log("not in an active swarm", PROMPT);
    assert!(registered(&etcd, &service).is_empty());
    d.terminate();

    lab.init();
    docker(&[
        "network",
        "create",
        "--driver",
        "overlay",
        "--attachable",
        "--label",
        "routemesh-test=1",
        &network,
    ]);
    lab.network = Some(network.clone());
    let service_label = format!("routemesh.service={service}");
    docker(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        &service,
        "--network",
        &network,
        "--label",
        &service_label,
        "--label",
        "routemesh.port=8080",
        "--label",
        "routemesh-test=1",
        "--replicas",
        "2",
        image,
    ]);
    lab.service = Some(service.clone());

    // reconcile_interval is 60 s: whatever happens below within PROMPT comes from the
    // start-up listing, the engine's events and the re-lists they trigger.
    let mut d = config(&node, &etcd, &service, &network).start();
    let two = wait_registered(&etcd, &service, &network, &node, 2, CONVERGE);
    for (id, addr) in &two {
        assert!(id.starts_with(&format!("{service}.")), "{id}");
        assert!(!addr.ip().is_loopback(), "{id}: {addr}");
    }
    let (_, _, weight) = registered(&etcd, &service).into_values().next().unwrap();
    assert_eq!(weight, 1);

    // Scale up: one more task, the first two untouched.
    docker(&["service", "scale", "-d", &format!("{service}=3")]);
    let three = wait_registered(&etcd, &service, &network, &node, 3, CONVERGE);
    for (id, addr) in &two {
        assert_eq!(three.get(id), Some(addr), "{id} changed on scale-up");
    }

    // Lease-bound: the daemon goes, its tasks go; it comes back and lists them again.
    d.terminate();
    wait_none(&etcd, &service, PROMPT, "the manager's daemon stopped");
    let mut d = config(&node, &etcd, &service, &network).start();
    let again = wait_registered(&etcd, &service, &network, &node, 3, PROMPT);
    assert_eq!(again, three);

    // Service removed: its tasks leave on the event.
    docker(&["service", "rm", &service]);
    wait_none(&etcd, &service, PROMPT, "the service was removed");
    d.wait_for_log("swarm task removed", PROMPT);
    d.terminate();
}
