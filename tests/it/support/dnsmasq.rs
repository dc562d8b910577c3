//! A real DNS server (dnsmasq, Debian `dnsmasq-base`) on a free loopback port with fixed
//! records, and `dig` to ask through anything in front of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use super::net::free_port;
use super::process::{require_binary, run_bounded, sbin, spawn_logged, tail_file, tempdir};
use super::wait::eventually_ok;

pub const DNSMASQ_HINT: &str =
    "run `bash .ci/install-deps` or `apt-get install -y dnsmasq-base dnsutils`";

/// A dnsmasq answering only its own records (no upstream, no hosts file, queries logged).
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// `records`: `(name, ipv4)` A records.
    pub fn start(records: &[(&str, &str)]) -> Dnsmasq {
        let bin = sbin("dnsmasq", DNSMASQ_HINT);
        require_binary("dig", DNSMASQ_HINT);
        let dir = tempdir("routemesh-dnsmasq");
        let log = dir.path().join("dnsmasq.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
            "--log-queries",
            "--log-facility=-",
        ])
        .arg(format!("--port={}", addr.port()));
        for (name, ip) in records {
            cmd.arg(format!("--host-record={name},{ip}"));
        }
        let child = spawn_logged(&mut cmd, &log);
        let mut d = Dnsmasq {
            child,
            addr,
            log,
            _dir: dir,
        };
        let first = records.first().map(|r| r.0).unwrap_or("localhost");
        eventually_ok(Duration::from_secs(10), "dnsmasq to answer", || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("dnsmasq exited with {status}:\n{}", tail_file(&d.log, 20));
            }
            dig(d.addr, first, "A").map(|_| ())
        });
        d
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries dnsmasq logged (`query[A] NAME from IP` lines).
    pub fn queries(&self) -> usize {
        super::process::read_log(&self.log)
            .lines()
            .filter(|l| l.contains("query["))
            .count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig @server NAME TYPE +short` over UDP, one try of 2 s: the answers, one per line.
pub fn dig(server: SocketAddr, name: &str, kind: &str) -> Result<Vec<String>, String> {
    let mut cmd = Command::new(require_binary("dig", DNSMASQ_HINT));
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), name, kind])
        .args(["+short", "+tries=1", "+time=2", "+notcp"]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("timed out") || text.contains("no servers") {
        return Err(format!(
            "dig {name}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text.lines().map(str::to_string).collect())
}
