//! The lab's network plumbing: `ip` commands, namespaces and their processes, leftovers of
//! earlier runs, a free /24 for the lab, and the machine-wide lock (one lab at a time).

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use super::LAB_HINT;
use crate::support::process::{is_root, require_binary, run_bounded};
use crate::support::wait::eventually_ok;

/// Bound for every `ip`/`kill` invocation.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for the lab lock (another lab of this or another process is running).
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// Panics unless the process runs as root.
pub(super) fn require_root() {
    assert!(
        is_root(),
        "the 3-node network-namespace lab needs root; CI runs as root: run the tests as root \
         (e.g. `sudo -E cargo nextest run -E 'test(/^cluster::/)'`)"
    );
}

pub(super) fn ip_bin() -> PathBuf {
    require_binary("ip", LAB_HINT)
}

/// Run `ip ARGS`; Err(stderr) on failure.
pub(super) fn ip(args: &[&str]) -> Result<String, String> {
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
pub(super) fn ip_ok(args: &[&str]) -> String {
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
pub(super) fn kill_ns(ns: &str) {
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
pub(super) fn delete_ns(ns: &str) {
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
pub(super) fn cleanup_leftovers(id: &str) {
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
pub(super) fn pick_subnet(n: u64) -> (u8, u8) {
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

/// Take the machine-wide lab lock (bounded wait: another lab of this or another process
/// may hold it).
pub(super) fn take_lock() -> File {
    let path = std::env::temp_dir().join("routemesh-lab.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut said = false;
    eventually_ok(
        LOCK_TIMEOUT,
        &format!("the lab lock {} (another lab holds it)", path.display()),
        || match file.try_lock() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !said {
                    eprintln!(
                        "[lab] waiting for another lab to finish ({})",
                        path.display()
                    );
                    said = true;
                }
                Err(String::new())
            }
            Err(std::fs::TryLockError::Error(e)) => panic!("cannot lock {}: {e}", path.display()),
        },
    );
    file
}
