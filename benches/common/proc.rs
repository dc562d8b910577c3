//! A child process a bench starts (backend, proxy, broker), with its log file, stopped when
//! dropped: SIGTERM, up to 5 s to exit, then SIGKILL, and SIGKILL for children it left (nginx
//! workers outlive a killed master). Each bench adds its own start checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::process::send_signal;

/// A child process started by a bench; stopped by PID in the bench's `Drop`.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("create log file");
        let file2 = file.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let kids = children(self.pid());
        let _ = send_signal(self.pid(), SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        // nginx workers outlive a killed master; they were ours, stop them too.
        for k in kids {
            if proc_stat(k).is_some() {
                let _ = send_signal(k, SIGKILL);
            }
        }
    }
}

const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

/// `127.0.0.1:port`, where every process a bench starts listens.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// /proc readings (CPU time of the processes under test)

/// (ppid, utime + stime in ticks) of a process, all its threads included.
pub fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime …
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// VmRSS of `pid` in bytes (0 when it cannot be read).
#[allow(dead_code)] // not every bench reads memory
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Direct children of `pid` (nginx workers).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            && proc_stat(p).is_some_and(|(ppid, _)| ppid == pid)
        {
            out.push(p);
        }
    }
    out
}

/// CPU seconds used so far by `pid` and its children.
pub fn cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = std::iter::once(pid)
        .chain(children(pid))
        .filter_map(|p| proc_stat(p).map(|(_, t)| t))
        .sum();
    ticks as f64 / clock_ticks()
}

pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Counters of `/proc/net/netstat` (`TcpExt` row) by name, for this network namespace: e.g.
/// `ListenOverflows` (a listener's accept queue was full: the SYN or the handshake's last ACK
/// was dropped) and `TCPSynRetrans` (SYNs sent again after a timeout). 0 for a name not there.
#[allow(dead_code)] // read by the MQTT storm only
pub fn tcp_ext(names: &[&str]) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(head), Some(values)) = (lines.next(), lines.next()) else {
        return vec![0; names.len()];
    };
    let pairs: Vec<(&str, u64)> = head
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(k, v)| (k, v.parse().unwrap_or(0)))
        .collect();
    names
        .iter()
        .map(|n| pairs.iter().find(|(k, _)| k == n).map_or(0, |(_, v)| *v))
        .collect()
}
