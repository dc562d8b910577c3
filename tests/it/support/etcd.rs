//! Real etcd (Debian's `etcd` 3.4 binary) started per test on free loopback
//! ports, plus blocking `etcdctl` helpers so tests need no async client.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::util::{free_port, require_binary, run_bounded, send_signal, tail_file, unique_name};

/// Setup hint used when `etcd`/`etcdctl` is missing.
pub const ETCD_SETUP_HINT: &str =
    "run `bash .ci/run` or `apt-get install -y etcd-server etcd-client`";

/// How long a single member may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a whole cluster may take to become healthy.
const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for every etcdctl invocation.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(15);

fn etcd_bin() -> PathBuf {
    require_binary("etcd", ETCD_SETUP_HINT)
}

fn etcdctl_bin() -> PathBuf {
    require_binary("etcdctl", ETCD_SETUP_HINT)
}

/// One etcd member with its own temp dir (data dir + `etcd.log`).
pub struct Etcd {
    name: String,
    client_port: u16,
    peer_port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// Start a single-member cluster and wait (≤ 20 s) until it is healthy.
    pub fn start() -> Etcd {
        let name = unique_name("rm-etcd");
        let (client_port, peer_port) = (free_port(), free_port());
        let initial_cluster = format!("{name}=http://127.0.0.1:{peer_port}");
        let mut etcd = Etcd::prepare(&name, client_port, peer_port, &initial_cluster, &name);
        etcd.spawn();
        etcd.wait_healthy(Instant::now() + START_TIMEOUT);
        etcd
    }

    fn prepare(
        name: &str,
        client_port: u16,
        peer_port: u16,
        initial_cluster: &str,
        token: &str,
    ) -> Etcd {
        let dir = super::util::tempdir(name);
        let data_dir = dir.path().join("data");
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-state=new".to_string(),
            format!("--initial-cluster-token={token}"),
            "--logger=zap".to_string(),
            "--log-outputs=stderr".to_string(),
            "--log-level=warn".to_string(),
        ];
        Etcd {
            name: name.to_string(),
            client_port,
            peer_port,
            args,
            dir,
            child: None,
        }
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd {} is already running",
            self.name
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open etcd log: {e}"));
        let log2 = log.try_clone().expect("clone etcd log handle");
        let mut cmd = Command::new(etcd_bin());
        cmd.args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Don't let a developer's ETCD_* environment change the member's config.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn etcd: {e}"));
        self.child = Some(child);
    }

    fn wait_healthy(&mut self, deadline: Instant) {
        let addr = self.client_addr();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "etcd {} exited during startup with {status}; log tail:\n{}",
                        self.name,
                        self.log_tail(40)
                    );
                }
            } else {
                panic!("etcd {} is not running", self.name);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && ctl_run(
                    &self.endpoint(),
                    &["endpoint", "health"],
                    None,
                    Duration::from_secs(5),
                )
                .is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd {} not healthy at {} in time; log tail:\n{}",
                    self.name,
                    self.endpoint(),
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT` (client URL).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Client address as a socket address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// Peer URL `http://127.0.0.1:PEER_PORT`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Member name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Temp dir holding `data/` and `etcd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the member's combined stdout/stderr log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Last `n` lines of the member's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.log_path(), n)
    }

    /// PID of the running member; panics if it is stopped.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("etcd {} is not running", self.name))
    }

    /// Whether the process is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL + wait. Keeps the data dir and ports for [`Etcd::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restart on the same ports and data dir and wait (≤ 20 s) until healthy.
    /// For a cluster member this needs a quorum of the cluster to be up.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
        self.wait_healthy(Instant::now() + START_TIMEOUT);
    }

    /// Freeze the member with SIGSTOP: its sockets still accept TCP
    /// connections but nothing answers (a hung etcd). Undo with [`Etcd::resume`].
    pub fn pause(&self) {
        send_signal(self.pid(), libc::SIGSTOP).expect("SIGSTOP etcd");
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        send_signal(self.pid(), libc::SIGCONT).expect("SIGCONT etcd");
    }

    fn ctl_endpoints(&self) -> String {
        self.endpoint()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An n-member etcd cluster on loopback; all members start concurrently.
pub struct EtcdCluster {
    members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Start `n` members at once and wait (≤ 30 s) until every one is healthy.
    pub fn start(n: usize) -> EtcdCluster {
        assert!(n >= 1, "a cluster needs at least one member");
        let token = unique_name("rm-etcd-cluster");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let names: Vec<String> = (0..n).map(|i| format!("{token}-m{i}")).collect();
        let initial_cluster = names
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = names
            .iter()
            .zip(&ports)
            .map(|(name, &(client, peer))| {
                Etcd::prepare(name, client, peer, &initial_cluster, &token)
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        let deadline = Instant::now() + CLUSTER_START_TIMEOUT;
        for m in &mut members {
            m.wait_healthy(deadline);
        }
        EtcdCluster { members }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false (a cluster has ≥ 1 member); here for clippy.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of all members (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// `endpoints()` joined with commas.
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// Client URLs of the members that are currently running.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Etcd::endpoint)
            .collect()
    }

    /// SIGKILL member `i` (+ wait). Restart it with `member_mut(i).start_again()`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].stop();
    }

    /// Member `i`.
    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }

    /// Member `i`, mutably (stop / start_again / pause).
    pub fn member_mut(&mut self, i: usize) -> &mut Etcd {
        &mut self.members[i]
    }

    fn ctl_endpoints(&self) -> String {
        let live = self.live_endpoints();
        assert!(!live.is_empty(), "no etcd member of the cluster is running");
        live.join(",")
    }
}

/// The etcdctl conveniences, shared by [`Etcd`] and [`EtcdCluster`] (the
/// cluster variant talks to the members that are currently running).
macro_rules! etcdctl_methods {
    ($t:ty) => {
        impl $t {
            /// Run `etcdctl --endpoints=… ARGS` (ETCDCTL_API=3, ≤ 15 s); panics on failure.
            pub fn etcdctl(&self, args: &[&str]) -> String {
                let endpoints = self.ctl_endpoints();
                ctl_run(&endpoints, args, None, ETCDCTL_TIMEOUT).unwrap_or_else(|e| {
                    panic!("etcdctl --endpoints={endpoints} {args:?} failed: {e}")
                })
            }

            /// Like `etcdctl` but returns the error text (stderr) instead of panicking.
            pub fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
                ctl_run(&self.ctl_endpoints(), args, None, ETCDCTL_TIMEOUT)
            }

            /// `put key value` (value passed on stdin, so any bytes/leading dashes are fine).
            pub fn put(&self, key: &str, value: &str) {
                ctl_put(&self.ctl_endpoints(), key, value, None);
            }

            /// Value of `key`, if present.
            pub fn get(&self, key: &str) -> Option<String> {
                let out = self.etcdctl(&["get", "-w", "json", "--", key]);
                parse_get_json(&out).into_iter().next().map(|(_, v)| v)
            }

            /// All `(key, value)` pairs under `prefix`, in key order.
            pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
                let out = self.etcdctl(&["get", "--prefix", "-w", "json", "--", prefix]);
                parse_get_json(&out)
            }

            /// Delete `key`; returns how many keys were deleted (0 or 1).
            pub fn del(&self, key: &str) -> usize {
                parse_count(&self.etcdctl(&["del", "--", key]))
            }

            /// Delete every key under `prefix`; returns how many were deleted.
            pub fn del_prefix(&self, prefix: &str) -> usize {
                parse_count(&self.etcdctl(&["del", "--prefix", "--", prefix]))
            }

            /// Grant a lease (etcd raises TTLs below 2 s to 2 s); returns its hex id.
            pub fn lease_grant(&self, ttl_secs: u64) -> String {
                let out = self.etcdctl(&["lease", "grant", &ttl_secs.to_string()]);
                parse_lease_grant(&out)
                    .unwrap_or_else(|| panic!("unexpected `lease grant` output: {out:?}"))
            }

            /// Revoke a lease (deletes its keys).
            pub fn lease_revoke(&self, lease_id_hex: &str) {
                self.etcdctl(&["lease", "revoke", lease_id_hex]);
            }

            /// Refresh a lease once.
            pub fn lease_keepalive_once(&self, lease_id_hex: &str) {
                self.etcdctl(&["lease", "keep-alive", "--once", lease_id_hex]);
            }

            /// Grant a lease of `ttl_secs` and put `key` with it; returns the lease id (hex).
            pub fn put_with_lease(&self, key: &str, value: &str, ttl_secs: u64) -> String {
                let lease = self.lease_grant(ttl_secs);
                ctl_put(&self.ctl_endpoints(), key, value, Some(&lease));
                lease
            }

            /// Put `key` attached to an existing lease.
            pub fn put_on_lease(&self, key: &str, value: &str, lease_id_hex: &str) {
                ctl_put(&self.ctl_endpoints(), key, value, Some(lease_id_hex));
            }

            /// Current store revision.
            pub fn revision(&self) -> i64 {
                let out = self.etcdctl(&[
                    "get",
                    "-w",
                    "json",
                    "--",
                    "/__routemesh_support_revision_probe__",
                ]);
                let v: serde_json::Value = serde_json::from_str(&out)
                    .unwrap_or_else(|e| panic!("bad etcdctl json ({e}): {out}"));
                v["header"]["revision"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("no header.revision in {out}"))
            }
        }
    };
}

etcdctl_methods!(Etcd);
etcdctl_methods!(EtcdCluster);

/// Run etcdctl against `endpoints` (comma separated). Ok(stdout) on exit 0,
/// Err(description incl. stderr) otherwise, including on timeout.
pub fn ctl_run(
    endpoints: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, String> {
    let mut cmd = Command::new(etcdctl_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=5s")
        .args(args);
    match run_bounded(&mut cmd, stdin, timeout) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn ctl_put(endpoints: &str, key: &str, value: &str, lease: Option<&str>) {
    let lease_arg = lease.map(|l| format!("--lease={l}"));
    let mut args = vec!["put"];
    if let Some(l) = &lease_arg {
        args.push(l);
    }
    args.extend(["--", key]);
    ctl_run(endpoints, &args, Some(value.as_bytes()), ETCDCTL_TIMEOUT)
        .unwrap_or_else(|e| panic!("etcdctl put {key:?} at {endpoints} failed: {e}"));
}

fn parse_count(out: &str) -> usize {
    out.trim()
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected etcdctl del output: {out:?}"))
}

/// `lease 694d77aa9e38260f granted with TTL(5s)` → `694d77aa9e38260f`.
pub fn parse_lease_grant(out: &str) -> Option<String> {
    let mut words = out.split_whitespace();
    (words.next()? == "lease").then_some(())?;
    let id = words.next()?;
    id.chars()
        .all(|c| c.is_ascii_hexdigit())
        .then(|| id.to_string())
}

/// Parse `etcdctl get -w json` output into (key, value) pairs (base64-decoded).
pub fn parse_get_json(out: &str) -> Vec<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(out).unwrap_or_else(|e| panic!("bad etcdctl json ({e}): {out}"));
    let Some(kvs) = v.get("kvs").and_then(|k| k.as_array()) else {
        return Vec::new();
    };
    kvs.iter()
        .map(|kv| {
            let field = |name: &str| {
                let b64 = kv.get(name).and_then(|x| x.as_str()).unwrap_or("");
                let bytes = base64_decode(b64)
                    .unwrap_or_else(|| panic!("bad base64 in etcdctl json: {b64:?}"));
                String::from_utf8_lossy(&bytes).into_owned()
            };
            (field("key"), field("value"))
        })
        .collect()
}

/// Standard-alphabet base64 decoder (padding optional). None on bad input.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let data = s.trim_end_matches('=').as_bytes();
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}
