//! Real etcd (Debian's `etcd` 3.4 binary): the one place the tests spell an etcd member's
//! command line ([`member_args`]) and wait for it to be healthy ([`wait_healthy`]), used by
//! the loopback members here ([`Etcd`], plain or secured, and [`EtcdCluster`]) and by the
//! lab's members in their namespaces; plus blocking `etcdctl` helpers ([`Etcdctl`]) so tests
//! need no async client.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine as _;

use super::net::free_port;
use super::pki::Pki;
use super::process::{require_binary, run_bounded, send_signal, spawn_logged, tail_file};
use super::process::{tempdir, unique_name};
use super::wait::eventually_ok;

/// Setup hint used when `etcd`/`etcdctl` is missing.
pub const ETCD_SETUP_HINT: &str =
    "run `bash .ci/run` or `apt-get install -y etcd-server etcd-client`";

/// How long a single member may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a whole cluster may take to become healthy.
const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for every etcdctl invocation.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(15);

/// The `etcd` binary (or a panic naming the setup command).
pub fn etcd_bin() -> PathBuf {
    require_binary("etcd", ETCD_SETUP_HINT)
}

/// One member of a cluster, as etcd's flags name it.
pub struct Member<'a> {
    pub name: &'a str,
    pub data_dir: &'a Path,
    /// `--listen-client-urls` and `--advertise-client-urls`.
    pub client_url: &'a str,
    /// `--listen-peer-urls` and `--initial-advertise-peer-urls`.
    pub peer_url: &'a str,
    /// `--initial-cluster`: `name=peer_url,…` of every member.
    pub initial_cluster: &'a str,
    /// `--initial-cluster-token`.
    pub token: &'a str,
}

/// The command line of a new member (warnings only, on stderr); callers add what their
/// cluster needs (TLS, auth token TTL, raft timings).
pub fn member_args(m: &Member) -> Vec<String> {
    vec![
        format!("--name={}", m.name),
        format!("--data-dir={}", m.data_dir.display()),
        format!("--listen-client-urls={}", m.client_url),
        format!("--advertise-client-urls={}", m.client_url),
        format!("--listen-peer-urls={}", m.peer_url),
        format!("--initial-advertise-peer-urls={}", m.peer_url),
        format!("--initial-cluster={}", m.initial_cluster),
        "--initial-cluster-state=new".to_string(),
        format!("--initial-cluster-token={}", m.token),
        "--logger=zap".to_string(),
        "--log-outputs=stderr".to_string(),
        "--log-level=warn".to_string(),
    ]
}

/// Waits (≤ `timeout`) until `etcdctl endpoint health` passes against `target`; `exited`
/// tells whether the member's process is gone (then this panics at once; the owner's drop
/// shows its log).
pub fn wait_healthy(
    target: &CtlTarget,
    timeout: Duration,
    mut exited: impl FnMut() -> Option<String>,
) {
    let what = format!("etcd at {} to be healthy", target.endpoints);
    eventually_ok(timeout, &what, || {
        if let Some(status) = exited() {
            panic!(
                "etcd at {} exited during startup ({status})",
                target.endpoints
            );
        }
        target
            .run(&["endpoint", "health"], None, Duration::from_secs(5))
            .map(drop)
    });
}

/// How a single loopback member is secured.
pub enum Security {
    /// https with `--client-cert-auth`; etcdctl uses a `client` certificate.
    Mtls,
    /// http with `auth enable`; user `root`/`rootpw` for etcdctl, and `user`/`password` with
    /// read-write on `prefix` for the daemon.
    Auth {
        token_ttl_secs: u32,
        user: String,
        password: String,
        prefix: String,
    },
}

/// One etcd member on loopback ports with its own temp dir (data dir + `etcd.log`).
pub struct Etcd {
    name: String,
    client_port: u16,
    https: bool,
    args: Vec<String>,
    /// etcdctl flags this member needs (certificates, the root user).
    ctl_flags: Vec<String>,
    pki: Option<Pki>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// Start a plain single-member cluster and wait (≤ 20 s) until it is healthy.
    pub fn start() -> Etcd {
        let name = unique_name("rm-etcd");
        let peer = peer_url(free_port());
        let cluster = format!("{name}={peer}");
        let mut etcd = Etcd::prepare(&name, false, &peer, &cluster, &name);
        etcd.spawn();
        etcd.wait_healthy(START_TIMEOUT);
        etcd
    }

    /// Start a single member secured as `security` says (its own [`Pki`]), healthy on return.
    pub fn start_secure(security: Security) -> Etcd {
        let pki = Pki::new();
        let name = unique_name("rm-etcd-sec");
        let peer = peer_url(free_port());
        let cluster = format!("{name}={peer}");
        let mtls = matches!(security, Security::Mtls);
        let mut etcd = Etcd::prepare(&name, mtls, &peer, &cluster, &name);
        match &security {
            Security::Mtls => {
                let (cert, key) = pki.issue("server", "127.0.0.1", &["IP:127.0.0.1"]);
                let (ccert, ckey) = pki.issue("client", "etcdctl", &[]);
                etcd.args.extend([
                    format!("--cert-file={}", cert.display()),
                    format!("--key-file={}", key.display()),
                    format!("--trusted-ca-file={}", pki.ca().display()),
                    "--client-cert-auth".into(),
                ]);
                etcd.ctl_flags.extend([
                    format!("--cacert={}", pki.ca().display()),
                    format!("--cert={}", ccert.display()),
                    format!("--key={}", ckey.display()),
                ]);
            }
            Security::Auth { token_ttl_secs, .. } => {
                etcd.args.push(format!("--auth-token-ttl={token_ttl_secs}"));
            }
        }
        etcd.pki = Some(pki);
        etcd.spawn();
        etcd.wait_healthy(START_TIMEOUT);
        if let Security::Auth {
            user,
            password,
            prefix,
            ..
        } = &security
        {
            etcd.etcdctl(&["user", "add", "root:rootpw"]);
            etcd.etcdctl(&["role", "add", "root"]);
            etcd.etcdctl(&["user", "grant-role", "root", "root"]);
            etcd.etcdctl(&["user", "add", &format!("{user}:{password}")]);
            etcd.etcdctl(&["role", "add", "routemesh"]);
            etcd.etcdctl(&[
                "role",
                "grant-permission",
                "routemesh",
                "--prefix=true",
                "readwrite",
                &format!("{prefix}/"),
            ]);
            etcd.etcdctl(&["user", "grant-role", user, "routemesh"]);
            etcd.etcdctl(&["auth", "enable"]);
            etcd.ctl_flags.push("--user=root:rootpw".into());
            etcd.etcdctl(&["endpoint", "health"]);
        }
        etcd
    }

    fn prepare(name: &str, https: bool, peer: &str, cluster: &str, token: &str) -> Etcd {
        let dir = tempdir(name);
        let client_port = free_port();
        let scheme = if https { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let args = member_args(&Member {
            name,
            data_dir: &dir.path().join("data"),
            client_url: &client_url,
            peer_url: peer,
            initial_cluster: cluster,
            token,
        });
        Etcd {
            name: name.to_string(),
            client_port,
            https,
            args,
            ctl_flags: Vec::new(),
            pki: None,
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
        let mut cmd = Command::new(etcd_bin());
        cmd.args(&self.args).current_dir(self.dir.path());
        self.child = Some(spawn_logged(&mut cmd, &self.log_path()));
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let target = self.ctl_target();
        let child = self.child.as_mut().expect("etcd was spawned");
        wait_healthy(&target, timeout, || {
            child.try_wait().ok().flatten().map(|s| s.to_string())
        });
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https` when secured with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Client address as a socket address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The PKI of a member started with [`Etcd::start_secure`].
    pub fn pki(&self) -> &Pki {
        self.pki
            .as_ref()
            .unwrap_or_else(|| panic!("etcd {} was started without a PKI", self.name))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
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
        self.wait_healthy(START_TIMEOUT);
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
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- etcd {} log (last 20 lines) ----\n{}",
                self.name,
                tail_file(&self.log_path(), 20)
            );
        }
        self.stop();
    }
}

impl Etcdctl for Etcd {
    fn ctl_target(&self) -> CtlTarget {
        CtlTarget {
            endpoints: self.endpoint(),
            flags: self.ctl_flags.clone(),
        }
    }
}

fn peer_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
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
        let names: Vec<String> = (0..n).map(|i| format!("{token}-m{i}")).collect();
        let peers: Vec<String> = (0..n).map(|_| peer_url(free_port())).collect();
        let cluster = names
            .iter()
            .zip(&peers)
            .map(|(name, peer)| format!("{name}={peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = names
            .iter()
            .zip(&peers)
            .map(|(name, peer)| Etcd::prepare(name, false, peer, &cluster, &token))
            .collect();
        for m in &mut members {
            m.spawn();
        }
        // One bound for the whole cluster: the members elect a leader together.
        let started = std::time::Instant::now();
        for m in &mut members {
            m.wait_healthy(CLUSTER_START_TIMEOUT.saturating_sub(started.elapsed()));
        }
        EtcdCluster { members }
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
}

impl Etcdctl for EtcdCluster {
    /// The members that are currently running.
    fn ctl_target(&self) -> CtlTarget {
        let live = self.live_endpoints();
        assert!(!live.is_empty(), "no etcd member of the cluster is running");
        CtlTarget {
            endpoints: live.join(","),
            flags: Vec::new(),
        }
    }
}

/// Where `etcdctl` talks to: comma-separated endpoints and the flags they need.
pub struct CtlTarget {
    pub endpoints: String,
    pub flags: Vec<String>,
}

impl CtlTarget {
    /// Run `etcdctl --endpoints=… FLAGS ARGS` (API 3, ≤ `timeout`), `stdin` fed to it.
    /// Ok(stdout) on exit 0, Err(description incl. stderr) otherwise, including on timeout.
    pub fn run(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<String, String> {
        let mut cmd = Command::new(require_binary("etcdctl", ETCD_SETUP_HINT));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .args(&self.flags)
            .args(args);
        match run_bounded(&mut cmd, stdin, timeout) {
            Ok(out) if out.status.success() => {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(out) => Err(format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// `etcdctl` against something that runs etcd: a member, a cluster, the lab.
pub trait Etcdctl {
    /// Endpoints and flags to reach it now.
    fn ctl_target(&self) -> CtlTarget;

    /// `etcdctl ARGS` with `stdin` (≤ 15 s); the error text instead of a panic.
    fn try_etcdctl_with(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, String> {
        self.ctl_target().run(args, stdin, ETCDCTL_TIMEOUT)
    }

    /// `etcdctl ARGS` (≤ 15 s); the error text instead of a panic.
    fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        self.try_etcdctl_with(args, None)
    }

    /// `etcdctl ARGS` (≤ 15 s); panics on failure.
    fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args).unwrap_or_else(|e| {
            panic!(
                "etcdctl --endpoints={} {args:?} failed: {e}",
                self.ctl_target().endpoints
            )
        })
    }

    /// `put key value` (value passed on stdin, so any bytes/leading dashes are fine).
    fn put(&self, key: &str, value: &str) {
        put(self, key, value, None);
    }

    /// `put` attached to an existing lease (hex id).
    fn put_on_lease(&self, key: &str, value: &str, lease_id_hex: &str) {
        put(self, key, value, Some(lease_id_hex));
    }

    /// Value of `key`, if present.
    fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "-w", "json", "--", key]);
        parse_get_json(&out).into_iter().next().map(|(_, v)| v)
    }

    /// All `(key, value)` pairs under `prefix`, in key order.
    fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&["get", "--prefix", "-w", "json", "--", prefix]);
        parse_get_json(&out)
    }

    /// Delete `key`; returns how many keys were deleted (0 or 1).
    fn del(&self, key: &str) -> usize {
        let out = self.etcdctl(&["del", "--", key]);
        out.trim()
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected etcdctl del output: {out:?}"))
    }

    /// Grant a lease (etcd raises TTLs below 2 s to 2 s); returns its hex id.
    fn lease_grant(&self, ttl_secs: u64) -> String {
        let out = self.etcdctl(&["lease", "grant", &ttl_secs.to_string()]);
        parse_lease_grant(&out)
            .unwrap_or_else(|| panic!("unexpected `lease grant` output: {out:?}"))
    }

    /// Revoke a lease (deletes its keys).
    fn lease_revoke(&self, lease_id_hex: &str) {
        self.etcdctl(&["lease", "revoke", lease_id_hex]);
    }

    /// Refresh a lease once.
    fn lease_keepalive_once(&self, lease_id_hex: &str) {
        self.etcdctl(&["lease", "keep-alive", "--once", lease_id_hex]);
    }

    /// Grant a lease of `ttl_secs` and put `key` with it; returns the lease id (hex).
    fn put_with_lease(&self, key: &str, value: &str, ttl_secs: u64) -> String {
        let lease = self.lease_grant(ttl_secs);
        self.put_on_lease(key, value, &lease);
        lease
    }

    /// Current store revision.
    fn revision(&self) -> i64 {
        let out = self.etcdctl(&[
            "get",
            "-w",
            "json",
            "--",
            "/__routemesh_support_revision_probe__",
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad etcdctl json ({e}): {out}"));
        v["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no header.revision in {out}"))
    }
}

fn put<C: Etcdctl + ?Sized>(ctl: &C, key: &str, value: &str, lease: Option<&str>) {
    let lease_arg = lease.map(|l| format!("--lease={l}"));
    let mut args = vec!["put"];
    args.extend(lease_arg.as_deref());
    args.extend(["--", key]);
    ctl.try_etcdctl_with(&args, Some(value.as_bytes()))
        .unwrap_or_else(|e| panic!("etcdctl put {key:?} failed: {e}"));
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

/// The keys `etcdctl watch` output reports deleted (a `DELETE` line, then the key), in order.
pub fn parse_watch_deletes(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "DELETE")
        .map(|w| w[1].to_string())
        .collect()
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
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_else(|e| panic!("bad base64 in etcdctl json ({e}): {b64:?}"));
                String::from_utf8_lossy(&bytes).into_owned()
            };
            (field("key"), field("value"))
        })
        .collect()
}
