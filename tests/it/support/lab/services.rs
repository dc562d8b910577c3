//! What every lab node runs — its etcd member and its `routemesh` daemon — and how the test
//! asks them: etcdctl against the live members, the CLI, each daemon's `/routes`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{ADMIN_PORT, COAP_PORT, DNS_PORT, DNS_ZONE, Lab, MQTT_PORT, NODE_TTL, Shape, WEB_PORT};
use crate::support::config::{Config, Listener, Task};
use crate::support::etcd::{self, CtlTarget, Etcdctl, Member, member_args};
use crate::support::http;
use crate::support::process::{bin, run_bounded};
use crate::support::wait::{eventually_ok, eventually_value};

/// Port of every node's etcd client URL.
const ETCD_CLIENT_PORT: u16 = 2379;
/// Port of every node's etcd peer URL.
const ETCD_PEER_PORT: u16 = 2380;
/// Bound for the cluster's etcd members to become healthy.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a daemon to answer `/readyz` 200.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for every etcdctl/CLI invocation.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

impl Lab {
    // ---- etcd ----

    pub(super) fn spawn_etcd(&mut self, i: usize) {
        let node = self.node(i);
        let client = self.etcd_endpoint(i);
        let peer = format!("http://{}:{ETCD_PEER_PORT}", node.ip);
        let cluster = self
            .nodes
            .iter()
            .map(|n| format!("{}=http://{}:{ETCD_PEER_PORT}", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = member_args(&Member {
            name: &node.name,
            data_dir: &node.dir.join("etcd-data"),
            client_url: &client,
            peer_url: &peer,
            initial_cluster: &cluster,
            token: &self.id,
        });
        // Raft timings of a LAN: a lost leader is replaced within about a second.
        args.extend(["--heartbeat-interval=100", "--election-timeout=1000"].map(String::from));
        self.spawn_in(i, "etcd", &etcd::etcd_bin(), &args, &[]);
    }

    /// Waits until all three members are healthy (one bound for the cluster's start).
    pub(super) fn wait_etcd_cluster_healthy(&mut self) {
        let started = Instant::now();
        for i in 1..=3 {
            self.wait_etcd_healthy(i, ETCD_START_TIMEOUT.saturating_sub(started.elapsed()));
        }
    }

    fn wait_etcd_healthy(&mut self, i: usize, timeout: Duration) {
        let target = CtlTarget {
            endpoints: self.etcd_endpoint(i),
            flags: Vec::new(),
        };
        etcd::wait_healthy(&target, timeout, || {
            self.check_alive(i, "etcd");
            None
        });
    }

    /// Start node `i`'s etcd member again with its data dir (after [`Lab::power_on`]), and
    /// wait until it is healthy.
    pub fn restart_etcd(&mut self, i: usize) {
        self.spawn_etcd(i);
        self.wait_etcd_healthy(i, ETCD_START_TIMEOUT);
    }

    /// Client URL of node `i`'s etcd member.
    fn etcd_endpoint(&self, i: usize) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.ip(i))
    }

    /// Client URLs of the members whose node is powered and whose etcd runs.
    pub fn live_etcd_endpoints(&self) -> Vec<String> {
        (1..=3)
            .filter(|&i| self.node(i).powered && self.is_running(i, "etcd"))
            .map(|i| self.etcd_endpoint(i))
            .collect()
    }

    /// Node number (1..=3) of the current etcd leader, asked from the live members (waits
    /// out an election, ≤ 10 s).
    pub fn etcd_leader(&self) -> usize {
        eventually_value(Duration::from_secs(10), "an etcd leader", || {
            self.try_etcd_leader()
        })
    }

    /// The current etcd leader's node, if the live members agree on one now.
    pub fn try_etcd_leader(&self) -> Option<usize> {
        let out = self
            .try_etcdctl(&["endpoint", "status", "-w", "json"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.as_array()?.iter().find_map(|s| {
            let member = s["Status"]["header"]["member_id"].as_u64()?;
            (s["Status"]["leader"].as_u64()? == member).then_some(())?;
            let ep = s["Endpoint"].as_str()?;
            (1..=3).find(|&i| self.etcd_endpoint(i) == ep)
        })
    }

    /// `routemesh ARGS --etcd <live members>` from the root namespace (≤ 20 s).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .arg("--etcd")
            .arg(self.live_etcd_endpoints().join(","))
            .env("NO_COLOR", "1")
            .env_remove("ROUTEMESH_ETCD")
            .env_remove("ROUTEMESH_PREFIX");
        run_bounded(&mut cmd, None, CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("routemesh {args:?} did not run: {e}"))
    }

    /// [`Lab::cli`] that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "routemesh {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `routemesh task add SERVICE ADDR --node nNODE --id ID`: a task under node `node`'s
    /// lease.
    pub fn add_task(&self, service: &str, addr: SocketAddr, node: usize, id: &str) {
        self.cli_ok(&[
            "task",
            "add",
            service,
            &addr.to_string(),
            "--node",
            &format!("n{node}"),
            "--id",
            id,
        ]);
    }

    // ---- the daemon ----

    /// The daemon config of node `i`, with its `tasks`.
    fn daemon_config(&self, i: usize, tasks: &[Task], shape: Shape) -> Config {
        let node = self.node(i);
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        let mut c = Config::etcd(&(1..=3).map(|i| self.etcd_endpoint(i)).collect::<Vec<_>>())
            .node(&node.name)
            .set("node.advertise", node.ip.to_string())
            .set("node.drain_timeout", "5s")
            .set("discovery.node_ttl", format!("{}s", NODE_TTL.as_secs()))
            .set("discovery.dial_timeout", "1s")
            .set("admin.listen", format!("{}:{ADMIN_PORT}", node.ip));
        if shape.toml_listeners {
            c = c
                .listener(
                    Listener::new(any(WEB_PORT), &self.web_protocol)
                        .name("web")
                        .set("service", "web"),
                )
                .listener(Listener::tcp(any(MQTT_PORT), "mqtt").name("mqtt"));
        }
        if shape.dns {
            c = c
                .set("dns.listen", format!("{}:{DNS_PORT}", node.ip))
                .set("dns.zone", DNS_ZONE)
                .set("dns.ttl", "1s");
        }
        if shape.udp {
            c = c
                .listener(Listener::udp(any(COAP_PORT), "coap").name("coap"))
                .set("service.coap.balance", "maglev")
                .set("service.coap.hash_key", "source_ip");
        }
        c.set("service.web.connect_timeout", "300ms")
            .tasks(tasks.iter().cloned())
    }

    /// Start node `i`'s daemon with its `tasks` and wait for `/readyz` 200.
    pub fn start_daemon(&mut self, i: usize, tasks: &[Task]) {
        self.start_daemon_shaped(i, tasks, Shape::default());
    }

    /// [`Lab::start_daemon`] with another config `shape` (kept for restarts).
    pub fn start_daemon_shaped(&mut self, i: usize, tasks: &[Task], shape: Shape) {
        let path = self.node(i).dir.join("routemesh.toml");
        let toml = format!(
            "{}\n{}",
            self.daemon_config(i, tasks, shape).to_toml(),
            self.node(i).daemon_extra
        );
        std::fs::write(&path, toml).expect("write daemon config");
        self.node_mut(i).daemon_tasks = tasks.to_vec();
        self.node_mut(i).daemon_shape = shape;
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
        let args = [
            "run".to_string(),
            "-c".to_string(),
            path.display().to_string(),
        ];
        self.spawn_in(
            i,
            "routemesh",
            Path::new(bin()),
            &args,
            &[("RUST_LOG", &rust_log), ("NO_COLOR", "1")],
        );
        let admin = self.admin(i);
        eventually_ok(
            DAEMON_READY_TIMEOUT,
            &format!("routemesh on n{i}: /readyz 200"),
            || {
                self.check_alive(i, "routemesh");
                match http::get_within(admin, "/readyz", Duration::from_secs(2)) {
                    Ok((200, _)) => Ok(()),
                    Ok((status, body)) => Err(format!("{status} {body}")),
                    Err(e) => Err(e),
                }
            },
        );
    }

    /// Start the daemon again with the config of its last start.
    pub fn restart_daemon(&mut self, i: usize) {
        let tasks = self.node(i).daemon_tasks.clone();
        let shape = self.node(i).daemon_shape;
        self.start_daemon_shaped(i, &tasks, shape);
    }

    /// `GET /routes` of node `i` as JSON (None if the admin endpoint does not answer).
    pub fn routes(&self, i: usize) -> Option<serde_json::Value> {
        match http::get_within(self.admin(i), "/routes", Duration::from_secs(2)) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// The tasks of `service` as node `i` sees them (None: no answer).
    fn service_tasks(&self, i: usize, service: &str) -> Option<Vec<serde_json::Value>> {
        let routes = self.routes(i)?;
        let svc = routes["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service);
        Some(
            svc.and_then(|s| s["tasks"].as_array())
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// The routable task addresses of `service` as node `i` sees them (None: no answer).
    pub fn routable(&self, i: usize, service: &str) -> Option<Vec<String>> {
        let tasks = self.service_tasks(i, service)?;
        Some(
            tasks
                .iter()
                .filter(|t| t["routable"] == true)
                .filter_map(|t| t["addr"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Status ("Ready" / "Down") of node `name` as node `i` sees it (None: unknown or no answer).
    pub fn node_status(&self, i: usize, name: &str) -> Option<String> {
        let routes = self.routes(i)?;
        routes["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["status"].as_str().map(str::to_string))
    }

    /// Send `sig` to node `i`'s daemon.
    pub fn signal_daemon(&self, i: usize, sig: i32) {
        let p = self
            .node(i)
            .procs
            .iter()
            .find(|p| p.name == "routemesh")
            .unwrap_or_else(|| panic!("no daemon runs on n{i}"));
        crate::support::process::send_signal(p.child.id(), sig)
            .unwrap_or_else(|e| panic!("signal daemon on n{i}: {e}"));
    }
}

impl Etcdctl for Lab {
    /// The live members (powered, etcd running).
    fn ctl_target(&self) -> CtlTarget {
        CtlTarget {
            endpoints: self.live_etcd_endpoints().join(","),
            flags: Vec::new(),
        }
    }
}
