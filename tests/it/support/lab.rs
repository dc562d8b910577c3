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
//! Needs root. Missing tools panic with the setup command; nothing is skipped.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::etcd::ctl_run;
use super::util::{bin, require_binary, run_bounded, send_signal, tail_file, tempdir};

/// How to get every tool the lab runs.
pub const LAB_HINT: &str = "run `bash .ci/run` or `apt-get install -y iproute2 procps etcd-server etcd-client nginx-light mosquitto mosquitto-clients`";

/// Port of every node's etcd client URL.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// Port of every node's etcd peer URL.
pub const ETCD_PEER_PORT: u16 = 2380;
/// Port of every node's admin endpoint (on the node IP).
pub const ADMIN_PORT: u16 = 9901;
/// Published `web` port on every node (0.0.0.0).
pub const WEB_PORT: u16 = 80;
/// Published `mqtt` port on every node (0.0.0.0).
pub const MQTT_PORT: u16 = 1883;
/// Node lease TTL of the daemons: a powered-off node's tasks vanish after about this long.
pub const NODE_TTL: Duration = Duration::from_secs(2);

/// Bound for the cluster's etcd members to become healthy.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a daemon to answer `/readyz` 200.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a workload to accept connections.
const WORKLOAD_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for every `ip`/`kill`/`etcdctl`/CLI invocation.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for the lab lock (another lab of this or another process is running).
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
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
    /// The `[[task]]`s and other extra TOML of the last daemon start (for a restart).
    daemon_extra: Option<String>,
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
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Value of `protocol` for the `web` listener ("tcp" or "http").
    web_protocol: String,
    /// Body of `[service.web]` in every daemon's config.
    pub service_web: String,
    /// Held while the lab exists (one lab at a time on this machine).
    _lock: File,
}

/// Panics unless the process runs as root.
pub fn require_root() {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `id -u`: {e}"));
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        uid == "0",
        "the 3-node network-namespace lab needs root (uid is {uid}); CI runs as root: \
         run the tests as root (e.g. `sudo -E cargo test --test cluster`)"
    );
}

fn ip_bin() -> PathBuf {
    require_binary("ip", LAB_HINT)
}

fn sbin(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("/usr/sbin/{name}"));
    if p.exists() {
        p
    } else {
        require_binary(name, LAB_HINT)
    }
}

/// Run `ip ARGS`; Err(stderr) on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(ip_bin());
    cmd.args(args);
    match run_bounded(&mut cmd, None, CMD_TIMEOUT) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("ip {}: {e}", args.join(" "))),
    }
}

/// Run `ip ARGS` or panic.
fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("lab setup failed: {e}"))
}

/// PIDs of the processes in namespace `ns` (empty if it does not exist).
fn ns_pids(ns: &str) -> Vec<u32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILL every process in `ns` (all were started by this lab), until none is left.
fn kill_ns(ns: &str) {
    let kill = require_binary("kill", LAB_HINT);
    for _ in 0..50 {
        let pids = ns_pids(ns);
        if pids.is_empty() {
            return;
        }
        let mut cmd = Command::new(&kill);
        cmd.args(["-s", "KILL"])
            .args(pids.iter().map(u32::to_string));
        let _ = run_bounded(&mut cmd, None, CMD_TIMEOUT);
        thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "[lab] processes still in {ns} after SIGKILL: {:?}",
        ns_pids(ns)
    );
}

/// Remove namespace `ns` after killing its processes (no error if absent).
fn delete_ns(ns: &str) {
    kill_ns(ns);
    let _ = ip(&["netns", "del", ns]);
}

/// `rm{pid}-{n}` → pid, if `name` starts with a lab id.
fn lab_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("rm")?;
    let (pid, rest) = rest.split_once('-')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Delete namespaces and root veths of labs whose process is gone, and anything named `id`.
fn cleanup_leftovers(id: &str) {
    let stale = |name: &str| {
        name.starts_with(&format!("{id}-"))
            || name == format!("{id}h")
            || lab_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if stale(name) {
            eprintln!("[lab] removing leftover namespace {name}");
            delete_ns(name);
        }
    }
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        // "12: rm123-0h@if4: <BROADCAST,…"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or_default();
        if name.ends_with('h') && stale(name) {
            eprintln!("[lab] removing leftover link {name}");
            let _ = ip(&["link", "del", name]);
        }
    }
}

/// Parse "a.b.c.d/len" (or "a.b.c.d" = /32).
fn parse_prefix(s: &str) -> Option<(u32, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    (len <= 32).then_some((u32::from(addr), len))
}

fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a.0 & mask == b.0 & mask
}

/// A /24 in 10.64.0.0/10 derived from the pid and `n` that overlaps no route or address of
/// the root namespace (labs are serialized by the lock, so this check is not racy).
fn pick_subnet(n: u64) -> (u8, u8) {
    let mut taken = Vec::new();
    for out in [
        ip(&["-4", "route", "show", "table", "all"]).unwrap_or_default(),
        ip(&["-4", "-o", "addr", "show"]).unwrap_or_default(),
    ] {
        for word in out.split_whitespace() {
            if word.contains('.')
                && let Some(p) = parse_prefix(word)
            {
                taken.push(p);
            }
        }
    }
    let mut k = (u64::from(std::process::id()) * 7 + n) % (64 * 256);
    for _ in 0..64 * 256 {
        let (a, b) = (64 + (k / 256) as u8, (k % 256) as u8);
        let net = (u32::from(Ipv4Addr::new(10, a, b, 0)), 24);
        if !taken.iter().any(|t| t.1 > 0 && overlaps(*t, net)) {
            return (a, b);
        }
        k = (k + 1) % (64 * 256);
    }
    panic!("no free /24 in 10.64.0.0/10 for the lab (routes: {taken:?})");
}

/// Take the machine-wide lab lock (bounded wait).
fn take_lock() -> File {
    let path = std::env::temp_dir().join("routemesh-lab.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let start = Instant::now();
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return file,
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                panic!("cannot lock {}: {e}", path.display())
            }
        }
        if !said {
            eprintln!(
                "[lab] waiting for another lab to finish ({})",
                path.display()
            );
            said = true;
        }
        assert!(
            start.elapsed() < LOCK_TIMEOUT,
            "another lab held {} for {LOCK_TIMEOUT:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

impl Lab {
    /// Build the network and start the 3-member etcd cluster (healthy on return). Daemons and
    /// workloads are started by the test ([`Lab::start_daemon`], [`Lab::start_nginx`], …).
    /// `web_protocol` is the `protocol` of the `web` listener on port 80.
    pub fn start(web_protocol: &str) -> Lab {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        require_root();
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
                    daemon_extra: None,
                    next_port: 8081,
                    powered: true,
                }
            })
            .collect();
        let mut lab = Lab {
            root_veth: format!("{id}h"),
            id,
            subnet,
            dir,
            nodes,
            web_protocol: web_protocol.to_string(),
            service_web: "connect_timeout = \"300ms\"\n".to_string(),
            _lock: lock,
        };
        // From here on, Drop tears down whatever was built.
        lab.build_network();
        for i in 1..=3 {
            lab.spawn_etcd(i);
        }
        lab.wait_etcd_healthy(&[1, 2, 3]);
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

    /// The lab id (`rm{pid}-{n}`), prefix of every namespace name.
    pub fn id(&self) -> &str {
        &self.id
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

    /// Namespace of node `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.node(i).ns
    }

    /// Node `i`'s published `web` address (NODEIP:80).
    pub fn web(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), WEB_PORT))
    }

    /// Node `i`'s published `mqtt` address (NODEIP:1883).
    pub fn mqtt(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), MQTT_PORT))
    }

    /// Node `i`'s admin address (NODEIP:9901).
    pub fn admin(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.ip(i), ADMIN_PORT))
    }

    /// Client URL of node `i`'s etcd member.
    pub fn etcd_endpoint(&self, i: usize) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.ip(i))
    }

    /// Client URLs of all three members.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        (1..=3).map(|i| self.etcd_endpoint(i)).collect()
    }

    /// Client URLs of the members whose node is powered and whose etcd runs.
    pub fn live_etcd_endpoints(&self) -> Vec<String> {
        (1..=3)
            .filter(|&i| self.node(i).powered && self.is_running(i, "etcd"))
            .map(|i| self.etcd_endpoint(i))
            .collect()
    }

    fn is_running(&self, i: usize, name: &str) -> bool {
        self.node(i).procs.iter().any(|p| p.name == name)
    }

    /// Spawn `program ARGS` in node `i`'s namespace, output to `log`; registered as `name`.
    fn spawn_in(
        &mut self,
        i: usize,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) {
        assert!(
            !self.is_running(i, name),
            "{name} already runs on n{i}; stop it first"
        );
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        let node = self.node(i);
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &node.ns])
            .arg(program)
            .args(args)
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("ETCD_") || k.starts_with("ETCDCTL_") {
                cmd.env_remove(&*k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {} in {}: {e}", program.display(), node.ns));
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

    /// Log of process `name` on node `i` (also after it was stopped).
    pub fn log(&self, i: usize, name: &str) -> String {
        let path = self.log_path(i, name);
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    }

    fn log_path(&self, i: usize, name: &str) -> PathBuf {
        self.node(i).dir.join(format!("{name}.log"))
    }

    // ---- etcd ----

    fn spawn_etcd(&mut self, i: usize) {
        let node = self.node(i);
        let client = format!("http://{}:{ETCD_CLIENT_PORT}", node.ip);
        let peer = format!("http://{}:{ETCD_PEER_PORT}", node.ip);
        let cluster = self
            .nodes
            .iter()
            .map(|n| format!("{}=http://{}:{ETCD_PEER_PORT}", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(",");
        let args = vec![
            format!("--name={}", node.name),
            format!("--data-dir={}", node.dir.join("etcd-data").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={cluster}"),
            "--initial-cluster-state=new".to_string(),
            format!("--initial-cluster-token={}", self.id),
            "--heartbeat-interval=100".to_string(),
            "--election-timeout=1000".to_string(),
            "--logger=zap".to_string(),
            "--log-outputs=stderr".to_string(),
            "--log-level=warn".to_string(),
        ];
        let log = self.log_path(i, "etcd");
        let etcd = require_binary("etcd", LAB_HINT);
        self.spawn_in(i, "etcd", &etcd, &args, &[], log);
    }

    fn wait_etcd_healthy(&mut self, nodes: &[usize]) {
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        for &i in nodes {
            loop {
                self.check_alive(i, "etcd");
                let ok = ctl_run(
                    &self.etcd_endpoint(i),
                    &["endpoint", "health"],
                    None,
                    Duration::from_secs(5),
                )
                .is_ok();
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd on n{i} not healthy within {ETCD_START_TIMEOUT:?}; log:\n{}",
                    tail_file(&self.log_path(i, "etcd"), PANIC_LOG_LINES)
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Start node `i`'s etcd member again with its data dir (after [`Lab::power_on`]), and
    /// wait until it is healthy.
    pub fn restart_etcd(&mut self, i: usize) {
        self.spawn_etcd(i);
        self.wait_etcd_healthy(&[i]);
    }

    /// Node number (1..=3) of the current etcd leader, asked from the live members.
    pub fn etcd_leader(&self) -> usize {
        let out = self
            .etcdctl(&["endpoint", "status", "-w", "json"])
            .unwrap_or_else(|e| panic!("etcdctl endpoint status: {e}"));
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("endpoint status is not JSON ({e}): {out}"));
        for s in v.as_array().into_iter().flatten() {
            let member = s["Status"]["header"]["member_id"].as_u64();
            let leader = s["Status"]["leader"].as_u64();
            if member.is_some() && member == leader {
                let ep = s["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = (1..=3).find(|&i| self.etcd_endpoint(i) == ep) {
                    return i;
                }
            }
        }
        panic!("no leader in etcd endpoint status: {out}");
    }

    /// `etcdctl --endpoints=<live members> ARGS`.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        ctl_run(
            &self.live_etcd_endpoints().join(","),
            args,
            None,
            CMD_TIMEOUT,
        )
    }

    /// `etcdctl put KEY` with `value` on stdin, against the live members; panics on failure.
    pub fn etcd_put(&self, key: &str, value: &str) {
        ctl_run(
            &self.live_etcd_endpoints().join(","),
            &["put", "--", key],
            Some(value.as_bytes()),
            CMD_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("etcdctl put {key}: {e}"));
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

    // ---- the daemon ----

    /// The daemon config of node `i`, with `extra` (e.g. `[[task]]` tables) appended.
    pub fn daemon_toml(&self, i: usize, extra: &str) -> String {
        let node = self.node(i);
        let endpoints = self
            .etcd_endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"[node]
name = "{name}"
advertise = "{ip}"
drain_timeout = "5s"

[discovery]
backend = "etcd"
endpoints = [{endpoints}]
node_ttl = "{ttl}s"
dial_timeout = "1s"

[admin]
listen = "{ip}:{ADMIN_PORT}"

[[listener]]
name = "web"
listen = "0.0.0.0:{WEB_PORT}"
protocol = "{proto}"
service = "web"

[[listener]]
name = "mqtt"
listen = "0.0.0.0:{MQTT_PORT}"
protocol = "tcp"
service = "mqtt"

[service.web]
{service_web}
{extra}
"#,
            name = node.name,
            ip = node.ip,
            ttl = NODE_TTL.as_secs(),
            proto = self.web_protocol,
            service_web = self.service_web,
        )
    }

    /// Start node `i`'s daemon with `extra` TOML (its `[[task]]`s) and wait for `/readyz` 200.
    pub fn start_daemon(&mut self, i: usize, extra: &str) {
        let toml = self.daemon_toml(i, extra);
        let path = self.node(i).dir.join("routemesh.toml");
        std::fs::write(&path, toml).expect("write daemon config");
        self.node_mut(i).daemon_extra = Some(extra.to_string());
        let log = self.log_path(i, "routemesh");
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
        let args = vec![
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
            log,
        );
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            self.check_alive(i, "routemesh");
            if matches!(
                http_get(self.admin(i), "/readyz", Duration::from_secs(2)),
                Ok((200, _))
            ) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "routemesh on n{i}: /readyz not 200 within {DAEMON_READY_TIMEOUT:?}; log:\n{}",
                tail_file(&self.log_path(i, "routemesh"), PANIC_LOG_LINES)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start the daemon again with the config of its last start.
    pub fn restart_daemon(&mut self, i: usize) {
        let extra = self.node(i).daemon_extra.clone().unwrap_or_default();
        self.start_daemon(i, &extra);
    }

    /// `GET /routes` of node `i` as JSON (None if the admin endpoint does not answer).
    pub fn routes(&self, i: usize) -> Option<serde_json::Value> {
        match http_get(self.admin(i), "/routes", Duration::from_secs(2)) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// The routable task addresses of `service` as node `i` sees them (None: no answer).
    pub fn routable(&self, i: usize, service: &str) -> Option<Vec<String>> {
        let routes = self.routes(i)?;
        let svc = routes["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service);
        Some(
            svc.and_then(|s| s["tasks"].as_array())
                .into_iter()
                .flatten()
                .filter(|t| t["routable"] == true)
                .filter_map(|t| t["addr"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Every task of `service` as node `i` sees it: (addr, state) (None: no answer).
    pub fn tasks(&self, i: usize, service: &str) -> Option<Vec<(String, String)>> {
        let routes = self.routes(i)?;
        let svc = routes["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service);
        Some(
            svc.and_then(|s| s["tasks"].as_array())
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["addr"].as_str().unwrap_or_default().to_string(),
                        t["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
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
        send_signal(p.child.id(), sig).unwrap_or_else(|e| panic!("signal daemon on n{i}: {e}"));
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

    // ---- workloads ----

    fn workload_dir(&self, i: usize, name: &str) -> PathBuf {
        let d = self.node(i).dir.join(name);
        std::fs::create_dir_all(&d).expect("create workload dir");
        d
    }

    fn wait_accepting(&mut self, i: usize, name: &str, addrs: &[SocketAddr]) {
        let deadline = Instant::now() + WORKLOAD_START_TIMEOUT;
        for addr in addrs {
            while TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_err() {
                self.check_alive(i, name);
                assert!(
                    Instant::now() < deadline,
                    "{name} on n{i} does not accept on {addr} within {WORKLOAD_START_TIMEOUT:?}"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Start one nginx on node `i` with one server per replica name, each on its own port of
    /// the node IP answering `GET /` with `200 "<replica>\n"`. Returns the replicas' addresses
    /// (in order) once they all accept connections. The process is named `nginx-<first>`.
    pub fn start_nginx(&mut self, i: usize, replicas: &[&str]) -> Vec<SocketAddr> {
        assert!(!replicas.is_empty());
        let name = format!("nginx-{}", replicas[0]);
        let dir = self.workload_dir(i, &name);
        let ip = self.ip(i);
        let mut addrs = Vec::new();
        let mut servers = String::new();
        for r in replicas {
            let port = self.node(i).next_port;
            self.node_mut(i).next_port += 1;
            addrs.push(SocketAddr::from((ip, port)));
            let _ = write!(
                servers,
                "  server {{\n    listen {ip}:{port} reuseport;\n    location / {{\n      \
                 default_type text/plain;\n      return 200 \"{r}\\n\";\n    }}\n  }}\n"
            );
        }
        let d = dir.display();
        let conf = format!(
            "user root root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log notice;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_timeout 30s;\n\
             {servers}}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let args = vec![
            "-p".to_string(),
            format!("{d}/"),
            "-c".to_string(),
            conf_path.display().to_string(),
            "-e".to_string(),
            format!("{d}/error.log"),
        ];
        let log = self.log_path(i, &name);
        self.spawn_in(i, &name, &sbin("nginx"), &args, &[], log);
        self.wait_accepting(i, &name, &addrs);
        addrs
    }

    /// Start mosquitto on node `i` (`listener PORT NODEIP`, anonymous, full log). Returns its
    /// address once it accepts connections. The process is named `mosquitto`; its broker log
    /// is [`Lab::mosquitto_log`].
    pub fn start_mosquitto(&mut self, i: usize) -> SocketAddr {
        let dir = self.workload_dir(i, "mosquitto");
        let port = self.node(i).next_port;
        self.node_mut(i).next_port += 1;
        let addr = SocketAddr::from((self.ip(i), port));
        let conf = format!(
            "listener {port} {ip}\nallow_anonymous true\npersistence false\nuser root\n\
             log_dest file {d}/broker.log\nlog_type all\nconnection_messages true\n\
             log_timestamp true\nmax_queued_messages 1000\n",
            ip = self.ip(i),
            d = dir.display()
        );
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let args = vec!["-c".to_string(), conf_path.display().to_string()];
        let log = self.log_path(i, "mosquitto");
        self.spawn_in(i, "mosquitto", &sbin("mosquitto"), &args, &[], log);
        self.wait_accepting(i, "mosquitto", &[addr]);
        addr
    }

    /// The broker log of node `i`'s mosquitto.
    pub fn mosquitto_log(&self, i: usize) -> String {
        let path = self.node(i).dir.join("mosquitto").join("broker.log");
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
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

// ---- a small blocking HTTP/1.1 client with one overall deadline ----

/// `GET path` with `Connection: close`; the whole exchange is bounded by `timeout`. Returns
/// status and body, or an error description.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let deadline = Instant::now() + timeout;
    let io = |e: io::Error| e.to_string();
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    let left = |d: Instant| {
        d.checked_duration_since(Instant::now())
            .filter(|l| !l.is_zero())
            .ok_or_else(|| "timed out".to_string())
    };
    stream
        .set_write_timeout(Some(left(deadline)?))
        .map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(io)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left(deadline)?)).map_err(io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if !raw.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("{e} after {} bytes", raw.len())),
        }
        if let Some(done) = complete_response(&raw) {
            return done;
        }
    }
    complete_response(&raw).unwrap_or_else(|| {
        Err(format!(
            "connection closed after {} bytes of response: {:?}",
            raw.len(),
            String::from_utf8_lossy(&raw)
        ))
    })
}

/// Some(result) once `raw` holds a complete response with a Content-Length (or a
/// chunked body that ended); None while more bytes are needed.
fn complete_response(raw: &[u8]) -> Option<Result<(u16, String), String>> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let body = &raw[head_end + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Some(Err(format!("bad status line in {head:?}")));
    };
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        return (body.len() >= len)
            .then(|| Ok((status, String::from_utf8_lossy(&body[..len]).into_owned())));
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size = String::from_utf8_lossy(&rest[..line_end]);
            let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                return Some(Ok((status, String::from_utf8_lossy(&out).into_owned())));
            }
            if rest.len() < size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }
    None
}

// ---- steady load ----

/// One request of a [`Load`].
#[derive(Clone, Debug)]
pub struct Sample {
    /// Which node address it was sent to.
    pub target: SocketAddr,
    /// When it started, since the load started.
    pub at: Duration,
    /// How long until it completed or failed.
    pub latency: Duration,
    /// The body of a 200, or why it failed (error, or another status).
    pub outcome: Result<String, String>,
}

/// Steady GETs: one thread per target, one request every `interval`, each bounded by
/// `timeout`, until stopped (or `max_duration`, whichever comes first).
pub struct Load {
    stop: Arc<AtomicBool>,
    start: Instant,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    pub fn start(
        targets: &[SocketAddr],
        interval: Duration,
        timeout: Duration,
        max_duration: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = targets
            .iter()
            .map(|&target| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut samples = Vec::new();
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < max_duration {
                        let t0 = Instant::now();
                        let outcome = match http_get(target, "/", timeout) {
                            Ok((200, body)) => Ok(body),
                            Ok((status, body)) => Err(format!("status {status}: {body:?}")),
                            Err(e) => Err(e),
                        };
                        samples.push(Sample {
                            target,
                            at: t0 - start,
                            latency: t0.elapsed(),
                            outcome,
                        });
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                    samples
                })
            })
            .collect();
        Load {
            stop,
            start,
            threads,
        }
    }

    /// Time since the load started (to relate events to [`Sample::at`]).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stop and collect every sample, ordered by start time.
    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Sample> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread panicked"))
            .collect();
        all.sort_by_key(|s| s.at);
        all
    }
}

/// A readable list of the failed samples (for assert messages).
pub fn describe_failures(samples: &[Sample]) -> String {
    let failed: Vec<_> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    let mut s = format!("{} of {} requests failed", failed.len(), samples.len());
    for f in failed.iter().take(20) {
        let _ = write!(
            s,
            "\n  at {:>7.3}s to {} after {:>5} ms: {}",
            f.at.as_secs_f64(),
            f.target,
            f.latency.as_millis(),
            f.outcome.as_ref().err().map(String::as_str).unwrap_or("")
        );
    }
    s
}
