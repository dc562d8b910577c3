//! A three-node cluster in network namespaces, like three VMs on one switch.
//!
//! Layout (all names carry the test's pid and a per-process counter, `rm{pid}-{n}`):
//!
//! ```text
//!   root ns (the test process: a client at 10.A.B.254)
//!     rm{pid}-{n}h ──veth──┐
//!                          │  {id}-sw: bridge br0
//!   {id}-n1  eth0 ──veth── n1
//!   {id}-n2  eth0 ──veth── n2        10.A.B.1-3/24, lo up in each
//!   {id}-n3  eth0 ──veth── n3
//! ```
//!
//! Each node namespace runs one etcd member (a 3-member cluster on NODEIP:2379/2380), one
//! `routemesh run` daemon (admin on NODEIP:9901, published listeners on 0.0.0.0:80 `web` and
//! 0.0.0.0:1883 `mqtt`) and its workloads (nginx, mosquitto). Processes are started with
//! `ip netns exec NS …`, which execs in place, so the `Child` is the process itself; logs go
//! to files in the lab's temp dir.
//!
//! The test process reaches the nodes through its own veth into the bridge, so its traffic is
//! never forwarded by the root namespace (Docker's FORWARD rules do not apply to it).
//!
//! "Power off" a node = SIGKILL every process in its namespace and set its link down: new
//! connections to it then time out, as with a dead VM. [`Lab`]'s `Drop` kills every process in
//! every namespace and deletes the namespaces and the root veth, even when the test panics; a
//! guard removes leftovers of earlier runs whose process is gone before a lab is created. A
//! file lock serializes labs across processes (2-core CI machine: one lab at a time).
//!
//! Here: the lab, its nodes and their processes; `netns` the network plumbing; `services`
//! what every node runs (etcd, the daemon) and how the test asks them; `workloads` the
//! nginx and mosquitto tasks.
//!
//! Needs root. Missing tools panic with the setup command; nothing is skipped.

mod netns;
mod services;
mod workloads;

pub use workloads::SLOW_BYTES;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::config::Task;
use super::process::{require_binary, send_signal, spawn_logged, tail_file, tempdir};
use netns::{cleanup_leftovers, delete_ns, ip, ip_bin, ip_ok, kill_ns, pick_subnet, take_lock};

/// How to get every tool the lab runs.
pub const LAB_HINT: &str = "run `bash .ci/run` or `apt-get install -y iproute2 procps etcd-server etcd-client nginx-light mosquitto mosquitto-clients`";

/// Port of every node's admin endpoint (on the node IP).
pub const ADMIN_PORT: u16 = 9901;
/// Published `web` port on every node (0.0.0.0).
pub const WEB_PORT: u16 = 80;
/// Published `mqtt` port on every node (0.0.0.0).
pub const MQTT_PORT: u16 = 1883;
/// Node lease TTL of the daemons: a powered-off node's tasks vanish after about this long.
pub const NODE_TTL: Duration = Duration::from_secs(2);
/// Port of the DNS responder on every node's address (daemons started with `Shape::dns`).
pub const DNS_PORT: u16 = 53;
/// The zone those responders answer for.
pub const DNS_ZONE: &str = "mesh.lab";
/// Port of the `coap` udp listener on every node (0.0.0.0; daemons started with
/// `Shape::udp`).
pub const COAP_PORT: u16 = 5683;

/// What a lab daemon's config holds besides its node, etcd and admin settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// The `web` (port 80) and `mqtt` (port 1883) listeners in its TOML. Without them the
    /// node serves only what is published in etcd.
    pub toml_listeners: bool,
    /// A DNS responder for [`DNS_ZONE`] on `NODEIP:53`.
    pub dns: bool,
    /// A `coap` udp listener on 0.0.0.0:[`COAP_PORT`] for service `coap`, balanced by
    /// Maglev on `source_ip`.
    pub udp: bool,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape {
            toml_listeners: true,
            dns: false,
            udp: false,
        }
    }
}

/// Lines of each log printed when a test panics with a lab alive.
const PANIC_LOG_LINES: usize = 40;

/// One process started in a node namespace.
struct Proc {
    /// Unique within the node: "etcd", "routemesh", "nginx-<replica>", "mosquitto".
    name: String,
    child: Child,
    log: PathBuf,
}

/// One node: its namespace, address, config and processes.
struct Node {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    /// This node's files: etcd data dir, configs, logs.
    dir: PathBuf,
    procs: Vec<Proc>,
    /// The `[[task]]`s and shape of the last daemon start (for a restart).
    daemon_tasks: Vec<Task>,
    /// TOML appended to the daemon's config (sections such as `[acme]`, more listeners).
    daemon_extra: String,
    daemon_shape: Shape,
    /// Next port for a workload on this node.
    next_port: u16,
    /// False between `power_off` and `power_on`.
    powered: bool,
}

/// The lab: three node namespaces, a switch namespace, and everything running in them.
pub struct Lab {
    id: String,
    subnet: (u8, u8),
    root_veth: String,
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Value of `protocol` for the `web` listener ("tcp" or "http").
    web_protocol: String,
    /// Held while the lab exists (one lab at a time on this machine).
    _lock: File,
}

impl Lab {
    /// Build the network and start the 3-member etcd cluster (healthy on return). Daemons and
    /// workloads are started by the test ([`Lab::start_daemon`], [`Lab::start_nginx`], …).
    /// `web_protocol` is the `protocol` of the `web` listener on port 80.
    pub fn start(web_protocol: &str) -> Lab {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        netns::require_root();
        for tool in ["ip", "kill", "etcd", "etcdctl"] {
            require_binary(tool, LAB_HINT);
        }
        let lock = take_lock();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("rm{}-{n}", std::process::id());
        cleanup_leftovers(&id);
        let subnet = pick_subnet(n);
        let dir = tempdir(&format!("routemesh-lab-{id}"));
        let nodes = (1..=3u8)
            .map(|i| {
                let ndir = dir.path().join(format!("n{i}"));
                std::fs::create_dir_all(&ndir).expect("create node dir");
                Node {
                    name: format!("n{i}"),
                    ns: format!("{id}-n{i}"),
                    ip: Ipv4Addr::new(10, subnet.0, subnet.1, i),
                    dir: ndir,
                    procs: Vec::new(),
                    daemon_tasks: Vec::new(),
                    daemon_extra: String::new(),
                    daemon_shape: Shape::default(),
                    next_port: 8081,
                    powered: true,
                }
            })
            .collect();
        let mut lab = Lab {
            root_veth: format!("{id}h"),
            id,
            subnet,
            _dir: dir,
            nodes,
            web_protocol: web_protocol.to_string(),
            _lock: lock,
        };
        // From here on, Drop tears down whatever was built.
        lab.build_network();
        for i in 1..=3 {
            lab.spawn_etcd(i);
        }
        lab.wait_etcd_cluster_healthy();
        lab
    }

    fn sw(&self) -> String {
        format!("{}-sw", self.id)
    }

    fn build_network(&self) {
        let sw = self.sw();
        ip_ok(&["netns", "add", &sw]);
        ip_ok(&["-n", &sw, "link", "set", "lo", "up"]);
        ip_ok(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &sw, "link", "set", "br0", "up"]);
        for node in &self.nodes {
            let ns = node.ns.as_str();
            let cidr = format!("{}/24", node.ip);
            ip_ok(&["netns", "add", ns]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
            ip_ok(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &node.name,
                "netns", &sw,
            ]);
            ip_ok(&["-n", &sw, "link", "set", &node.name, "master", "br0"]);
            ip_ok(&["-n", &sw, "link", "set", &node.name, "up"]);
            ip_ok(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip_ok(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        let root = self.root_veth.as_str();
        ip_ok(&[
            "link", "add", root, "type", "veth", "peer", "name", "root", "netns", &sw,
        ]);
        ip_ok(&["-n", &sw, "link", "set", "root", "master", "br0"]);
        ip_ok(&["-n", &sw, "link", "set", "root", "up"]);
        let cidr = format!("10.{}.{}.254/24", self.subnet.0, self.subnet.1);
        ip_ok(&["addr", "add", &cidr, "dev", root]);
        ip_ok(&["link", "set", root, "up"]);
    }

    fn node(&self, i: usize) -> &Node {
        assert!((1..=3).contains(&i), "nodes are 1..=3, not {i}");
        &self.nodes[i - 1]
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        assert!((1..=3).contains(&i), "nodes are 1..=3, not {i}");
        &mut self.nodes[i - 1]
    }

    /// IP of node `i` (1..=3).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.node(i).ip
    }

    /// The test process's address on the lab's switch (10.A.B.254): where services the
    /// test runs itself (an ACME CA, a DNS server) are reached from the nodes.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 254)
    }

    /// TOML appended to node `i`'s daemon config from its next start on (e.g. `[acme]`).
    pub fn set_daemon_extra(&mut self, i: usize, toml: &str) {
        self.node_mut(i).daemon_extra = toml.to_string();
    }

    /// Node `i`'s daemon log so far.
    pub fn daemon_log(&self, i: usize) -> String {
        crate::support::process::read_log(&self.log_path(i, "routemesh"))
    }

    /// Whether node `i`'s daemon is still running (not exited).
    pub fn daemon_alive(&mut self, i: usize) -> bool {
        let node = self.node_mut(i);
        node.procs
            .iter_mut()
            .find(|p| p.name == "routemesh")
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Node `i`'s published `web` address (NODEIP:80).
    pub fn web(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), WEB_PORT))
    }

    /// Node `i`'s published `mqtt` address (NODEIP:1883).
    pub fn mqtt(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), MQTT_PORT))
    }

    /// Node `i`'s `coap` udp listener (NODEIP:5683).
    pub fn coap(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), COAP_PORT))
    }

    /// The test process's own address on the lab's switch.
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 254)
    }

    /// The lab's IPv6 prefix (`fd00:A:B::/64`), host part `host`.
    fn ipv6(&self, host: u16) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(
            0xfd00,
            self.subnet.0.into(),
            self.subnet.1.into(),
            0,
            0,
            0,
            0,
            host,
        )
    }

    /// Adds `10.A.B.host/24` to node `i`'s eth0 (a second address); returns it.
    pub fn add_address(&self, i: usize, host: u8) -> Ipv4Addr {
        let ip = Ipv4Addr::new(10, self.subnet.0, self.subnet.1, host);
        ip_ok(&[
            "-n",
            &self.node(i).ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        ip
    }

    /// Gives the root veth `fd00:A:B::fe/64` (once) and node `i` two addresses of that
    /// prefix (`::i` and `::10i`, no duplicate detection); returns node `i`'s two.
    pub fn add_ipv6(&self, i: usize) -> (std::net::Ipv6Addr, std::net::Ipv6Addr) {
        let root = self.root_ipv6();
        let have = ip(&["-6", "addr", "show", "dev", &self.root_veth]).unwrap_or_default();
        if !have.contains(&root.to_string()) {
            ip_ok(&[
                "addr",
                "add",
                &format!("{root}/64"),
                "dev",
                &self.root_veth,
                "nodad",
            ]);
        }
        let (a, b) = (self.ipv6(i as u16), self.ipv6(0x100 + i as u16));
        for addr in [a, b] {
            ip_ok(&[
                "-n",
                &self.node(i).ns,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        (a, b)
    }

    /// The test process's IPv6 address on the switch (see [`Lab::add_ipv6`]).
    pub fn root_ipv6(&self) -> std::net::Ipv6Addr {
        self.ipv6(0xfe)
    }

    /// Node `i`'s admin address (NODEIP:9901).
    pub fn admin(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), ADMIN_PORT))
    }

    fn is_running(&self, i: usize, name: &str) -> bool {
        self.node(i).procs.iter().any(|p| p.name == name)
    }

    /// Spawn `program ARGS` in node `i`'s namespace, output to its log; registered as `name`.
    fn spawn_in(
        &mut self,
        i: usize,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) {
        assert!(
            !self.is_running(i, name),
            "{name} already runs on n{i}; stop it first"
        );
        let log = self.log_path(i, name);
        let node = self.node(i);
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &node.ns])
            .arg(program)
            .args(args)
            .current_dir(&node.dir)
            .envs(env.iter().copied());
        let child = spawn_logged(&mut cmd, &log);
        self.node_mut(i).procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
    }

    /// Panic (with its log) if process `name` of node `i` has exited.
    fn check_alive(&mut self, i: usize, name: &str) {
        let node = self.node_mut(i);
        let Some(pos) = node.procs.iter().position(|p| p.name == name) else {
            panic!("{name} is not running on n{i}");
        };
        if let Ok(Some(status)) = node.procs[pos].child.try_wait() {
            let p = node.procs.remove(pos);
            panic!(
                "{name} on n{i} exited with {status}; log {}:\n{}",
                p.log.display(),
                tail_file(&p.log, PANIC_LOG_LINES)
            );
        }
    }

    fn log_path(&self, i: usize, name: &str) -> PathBuf {
        self.node(i).dir.join(format!("{name}.log"))
    }

    /// Wait up to `timeout` for process `name` on node `i` to exit; its status, or None.
    pub fn wait_exit(
        &mut self,
        i: usize,
        name: &str,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.node_mut(i);
            let pos = node.procs.iter().position(|p| p.name == name)?;
            if let Ok(Some(status)) = node.procs[pos].child.try_wait() {
                node.procs.remove(pos);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send `sig` to process `name` on node `i` and wait (≤ 10 s) for it to exit.
    pub fn stop(&mut self, i: usize, name: &str, sig: i32) {
        let pid = self
            .node(i)
            .procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
            .unwrap_or_else(|| panic!("{name} does not run on n{i}"));
        let _ = send_signal(pid, sig);
        if self.wait_exit(i, name, Duration::from_secs(10)).is_none() {
            let _ = send_signal(pid, 9);
            self.wait_exit(i, name, Duration::from_secs(5));
            panic!("{name} on n{i} did not exit within 10 s of signal {sig}");
        }
    }

    // ---- power ----

    /// Power off node `i`: SIGKILL every process in its namespace, then set its link down
    /// (connections to its address then time out, like a dead VM).
    pub fn power_off(&mut self, i: usize) {
        let ns = self.node(i).ns.clone();
        kill_ns(&ns);
        ip_ok(&["-n", &ns, "link", "set", "eth0", "down"]);
        let node = self.node_mut(i);
        node.powered = false;
        for mut p in node.procs.drain(..) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Power node `i` on again: link up (its processes are not restarted; see
    /// [`Lab::restart_etcd`] and [`Lab::restart_daemon`]).
    pub fn power_on(&mut self, i: usize) {
        let ns = self.node(i).ns.clone();
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        self.node_mut(i).powered = true;
    }

    fn teardown(&mut self) {
        for node in &mut self.nodes {
            kill_ns(&node.ns);
            for mut p in node.procs.drain(..) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        for node in &self.nodes {
            delete_ns(&node.ns);
        }
        delete_ns(&self.sw());
        let _ = ip(&["link", "del", &self.root_veth]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            for node in &self.nodes {
                for name in ["etcd", "routemesh"] {
                    let path = node.dir.join(format!("{name}.log"));
                    eprintln!(
                        "---- lab {} {}: {name} log (last {PANIC_LOG_LINES} lines, {}) ----\n{}",
                        self.id,
                        node.name,
                        path.display(),
                        tail_file(&path, PANIC_LOG_LINES)
                    );
                }
            }
        }
        self.teardown();
    }
}
