//! Child processes and scratch space: the binary under test, external tools (found or a
//! panic naming the setup command), bounded runs, signals by PID, log tails, temp dirs.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Path of the `routemesh` binary built by cargo for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_routemesh")
}

/// Look `name` up on `PATH` (or check it directly if it contains a `/`).
pub fn which(name: &str) -> Option<PathBuf> {
    fn is_executable(p: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Resolve a required external binary or panic with `"{name} not found: {setup_hint}"`.
/// Nothing is skipped silently.
pub fn require_binary(name: &str, setup_hint: &str) -> PathBuf {
    which(name).unwrap_or_else(|| panic!("{name} not found: {setup_hint}"))
}

/// A daemon binary Debian installs in /usr/sbin (not on a non-root PATH), else on `PATH`.
pub fn sbin(name: &str, setup_hint: &str) -> PathBuf {
    let p = PathBuf::from(format!("/usr/sbin/{name}"));
    if p.exists() {
        p
    } else {
        require_binary(name, setup_hint)
    }
}

/// Whether this process runs as root (uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

/// Spawn `cmd` with stdin closed and stdout and stderr appended to `log`, without the
/// developer's `ETCD_*`/`ETCDCTL_*` environment (it would change an etcd member's config).
/// Panics if it cannot be spawned.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = out.try_clone().expect("clone a log handle");
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("ETCD_") || name.starts_with("ETCDCTL_") {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))
}

/// Run `cmd` to completion with captured stdout/stderr, optionally feeding
/// `stdin`. If it is still running after `timeout` it is SIGKILLed, reaped,
/// and `ErrorKind::TimedOut` is returned.
pub fn run_bounded(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;

    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                // The child may exit without reading everything; ignore EPIPE.
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });

    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Reader threads are detached: a grandchild could hold the pipes open.
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}; killed"),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Status plus the last 200 lines of stdout and stderr of a run, for assert messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        tail_lines(&String::from_utf8_lossy(&out.stdout), 200),
        tail_lines(&String::from_utf8_lossy(&out.stderr), 200)
    )
}

/// The whole of a log file so far (empty if it cannot be read yet).
pub fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Last `n` lines of a text file (or a note that it could not be read).
pub fn tail_file(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), n),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Send signal number `sig` (e.g. `libc::SIGTERM`) to a process that this
/// test started, by PID. The crate forbids `unsafe`, so this runs procps'
/// `kill -s SIG PID` instead of calling kill(2).
pub fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let kill = require_binary("kill", "run `bash .ci/run` or `apt-get install -y procps`");
    let mut cmd = Command::new(kill);
    cmd.arg("-s").arg(sig.to_string()).arg(pid.to_string());
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "kill -s {sig} {pid}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A process-unique, test-run-unique name: `{prefix}-{pid}-{n}`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A fresh temp dir. Set `ROUTEMESH_KEEP_TMP=1` to keep it after the test
/// (its path is printed to stderr).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create temp dir: {e}"));
    if std::env::var_os("ROUTEMESH_KEEP_TMP").is_some_and(|v| v != "0" && !v.is_empty()) {
        dir.disable_cleanup(true);
        eprintln!("[support] keeping temp dir {}", dir.path().display());
    }
    dir
}

/// Sets process `pid`'s descriptor limit (`prlimit --nofile=SOFT:HARD`, either may be empty).
pub fn limit_nofile(pid: u32, soft_hard: &str) {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft_hard}"))
        .output()
        .expect("prlimit (util-linux; bash .ci/install-deps)");
    assert!(out.status.success(), "{out:?}");
}
