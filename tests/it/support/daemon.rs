//! The real `routemesh` daemon, run as a child process per test, plus a
//! bounded runner for one-shot CLI invocations.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

use super::http::try_get;
use super::net::free_addr;
use super::process::{bin, read_log, run_bounded, send_signal, spawn_logged, tail_file, tempdir};
use super::wait::{eventually, eventually_ok};

const HEALTHY_TIMEOUT: Duration = Duration::from_secs(15);
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const TERM_TIMEOUT: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of daemon log printed when a test panics while a `Daemon` is alive.
const PANIC_LOG_LINES: usize = 60;

/// A running `routemesh run -c <tmp>/routemesh.toml`, its temp dir and log.
pub struct Daemon {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    admin: SocketAddr,
    /// Set when the harness added the `[admin]` section itself.
    added_admin: Option<String>,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    /// A panic message already carried the log tail; don't print it again on Drop.
    log_shown: Cell<bool>,
}

impl Daemon {
    /// Write the config (prepending `[admin] listen = "127.0.0.1:<free>"`
    /// unless `body_toml` has an `[admin]` section; appended instead if the
    /// body starts with top-level keys), spawn the daemon and wait until
    /// `GET /healthz` answers 200 (≤ 15 s; panics with the log tail).
    pub fn start(body_toml: &str) -> Daemon {
        Self::start_with_env(body_toml, &[])
    }

    /// [`Daemon::start`] with extra environment variables for the daemon.
    pub fn start_with_env(body_toml: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Self::spawn_with_env(body_toml, env);
        d.wait_healthy();
        d
    }

    /// Write the config and spawn the daemon with extra environment variables, without
    /// waiting for health.
    fn spawn_with_env(body_toml: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempdir("routemesh-daemon");
        let config_path = dir.path().join("routemesh.toml");
        let log_path = dir.path().join("daemon.log");
        let (admin, added_admin) = if body_toml.contains("[admin]") {
            (admin_listen_from_toml(body_toml), None)
        } else {
            let addr = free_addr();
            (addr, Some(admin_section(addr)))
        };
        let mut d = Daemon {
            dir,
            config_path,
            log_path,
            admin,
            added_admin,
            child: None,
            exit: None,
            log_shown: Cell::new(false),
        };
        d.write_config(body_toml);

        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("-c")
            .arg(&d.config_path)
            .current_dir(d.dir.path());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        if std::env::var_os("NO_COLOR").is_none() {
            cmd.env("NO_COLOR", "1");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        d.child = Some(spawn_logged(&mut cmd, &d.log_path));
        d
    }

    /// Replace the config file atomically (write + rename). If the harness
    /// added the `[admin]` section at start, it is added again here unless
    /// `body_toml` has its own. The daemon is not signalled.
    pub fn write_config(&self, body_toml: &str) {
        let text = match &self.added_admin {
            Some(section) if !body_toml.contains("[admin]") => with_admin(section, body_toml),
            _ => body_toml.to_string(),
        };
        let tmp = self.dir.path().join(".routemesh.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config into place");
    }

    /// Wait until `GET /healthz` is 200 (≤ 15 s), then until the listeners are bound (admin
    /// answers first, while they are still being bound), so a test's first connection never
    /// meets a port nobody holds yet. Panics with exit status and log tail if the daemon dies
    /// or never gets there.
    pub fn wait_healthy(&mut self) {
        self.wait_admin("GET /healthz 200", HEALTHY_TIMEOUT, |a| {
            admin_200(a, "/healthz")
        });
        self.wait_admin("listeners bound", HEALTHY_TIMEOUT, listeners_bound);
    }

    /// Wait until `GET /readyz` is 200 (≤ 15 s).
    pub fn wait_ready(&mut self) {
        self.wait_admin("GET /readyz 200", READY_TIMEOUT, |a| {
            admin_200(a, "/readyz")
        });
    }

    /// Waits until `check` of the admin address is `Ok`; panics at once if the daemon exits.
    fn wait_admin(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(SocketAddr) -> Result<(), String>,
    ) {
        let admin = self.admin;
        eventually_ok(timeout, &format!("{what} on {admin}"), || {
            if !self.is_running() {
                panic!(
                    "routemesh exited ({}) while waiting for {what}",
                    self.exit_description()
                );
            }
            check(admin)
        });
    }

    /// Admin listen address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `GET {path}` on the admin port; panics (with log tail) on I/O error.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        try_get(self.admin, path).unwrap_or_else(|e| {
            panic!(
                "GET {path} on admin {} failed: {e}; log tail:\n{}",
                self.admin,
                self.panic_tail()
            )
        })
    }

    /// Status of `GET /readyz`.
    pub fn ready_status(&self) -> u16 {
        self.admin_get("/readyz").0
    }

    /// The value of one sample of GET /metrics, e.g.
    /// `routemesh_discovery_up` or `name{label="v"}` (labels as the exposition orders them).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, text) = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)?
                    .strip_prefix(' ')
                    .map(str::to_string)
            })
            .and_then(|v| v.trim().parse().ok())
    }

    /// The sum of the samples of GET /metrics whose line starts with `prefix` (a family
    /// name, maybe with the first labels), 0 when there is none.
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `routemesh_rejected_connections_total{listener,reason}` (0 when absent).
    pub fn rejected(&self, listener: &str, reason: &str) -> u64 {
        let sample = format!(
            "routemesh_rejected_connections_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        );
        self.metric(&sample).unwrap_or(0.0) as u64
    }

    /// `GET /routes` parsed as JSON (must be 200).
    pub fn routes(&self) -> serde_json::Value {
        let (status, body) = self.admin_get("/routes");
        assert_eq!(status, 200, "GET /routes returned {status}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /routes is not JSON ({e}): {body}"))
    }

    /// Whole daemon log so far (stdout + stderr).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Last `n` lines of the daemon log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.log_path, n)
    }

    /// Log tail for a panic message (and suppress the duplicate on Drop).
    fn panic_tail(&self) -> String {
        self.log_shown.set(true);
        self.log_tail(PANIC_LOG_LINES)
    }

    /// Wait until the log contains `needle` (bounded by `timeout`).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        eventually(
            timeout,
            &format!("daemon log to contain {needle:?}"),
            || self.log().contains(needle),
        );
    }

    /// Where the log ends now: pass it to [`Daemon::wait_for_log_since`] to wait for a line
    /// printed after this point (one that start-up may already have printed too).
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// Wait until the log, past `mark` (from [`Daemon::log_mark`]), contains `needle`.
    pub fn wait_for_log_since(&self, mark: usize, needle: &str, timeout: Duration) {
        eventually(
            timeout,
            &format!("daemon log to contain {needle:?} after byte {mark}"),
            || {
                self.log()
                    .get(mark..)
                    .is_some_and(|rest| rest.contains(needle))
            },
        );
    }

    /// Path of `routemesh.toml`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// PID of the daemon (valid until it is reaped).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("daemon was spawned")
    }

    fn exit_description(&self) -> String {
        self.exit
            .map(|s| s.to_string())
            .unwrap_or_else(|| "still running".to_string())
    }

    /// Whether the daemon is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.exit = Some(status);
                false
            }
            Err(e) => panic!("try_wait on routemesh failed: {e}"),
        }
    }

    /// Wait up to `timeout` for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send `sig` to the daemon. Panics if it has already exited (its PID
    /// is only guaranteed to be ours until it is reaped).
    pub fn signal(&self, sig: i32) {
        assert!(
            self.exit.is_none(),
            "routemesh already exited ({}); not signalling",
            self.exit_description()
        );
        send_signal(self.pid(), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) failed: {e}", self.pid()));
    }

    /// SIGKILL + wait.
    pub fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            self.exit = child.wait().ok();
        }
    }

    /// SIGTERM and wait (≤ 30 s) for exit; returns the exit status. If the
    /// daemon does not exit in time it is SIGKILLed and this panics.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        if self.is_running() {
            self.signal(libc::SIGTERM);
        }
        if let Some(status) = self.wait_exit(TERM_TIMEOUT) {
            return status;
        }
        self.kill();
        panic!(
            "routemesh did not exit within {TERM_TIMEOUT:?} after SIGTERM; log tail:\n{}",
            self.panic_tail()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() && !self.log_shown.get() {
            eprintln!(
                "---- routemesh daemon log (last {PANIC_LOG_LINES} lines, {}) ----\n{}\n---- end of daemon log ----",
                self.log_path.display(),
                self.log_tail(PANIC_LOG_LINES)
            );
        }
        self.kill();
    }
}

fn admin_section(addr: SocketAddr) -> String {
    format!("[admin]\nlisten = \"{addr}\"\n\n")
}

/// Prepend the `[admin]` section, unless the body starts with top-level keys
/// (which would then land inside `[admin]`): in that case append it.
fn with_admin(section: &str, body: &str) -> String {
    let first = body
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    match first {
        Some(line) if !line.starts_with('[') => format!("{body}\n\n{section}"),
        _ => format!("{section}{body}"),
    }
}

/// Find `listen = "…"` in the `[admin]` table of a TOML text.
fn admin_listen_from_toml(toml: &str) -> SocketAddr {
    let mut in_admin = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_admin = line == "[admin]";
            continue;
        }
        if !in_admin {
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && key.trim() == "listen"
        {
            let value = value.split('#').next().unwrap_or_default().trim();
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            return value.parse().unwrap_or_else(|e| {
                panic!("[admin] listen = {value:?} is not an IP:port socket address: {e}")
            });
        }
    }
    panic!("config has an [admin] section without `listen = \"IP:PORT\"`; the harness needs it");
}

/// [`cli`] that must exit 0; its stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "routemesh {args:?} failed:\n{}",
        super::process::output_text(&out)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `routemesh ARGS` that must fail with one clear line on stderr (`error: …`); returns it.
pub fn cli_fails(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        !out.status.success(),
        "routemesh {args:?} should fail: {}",
        super::process::output_text(&out)
    );
    let err = String::from_utf8(out.stderr).expect("UTF-8 output");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

/// Run `routemesh ARGS` (stdin closed, stdout/stderr captured, ≤ 30 s).
pub fn cli(args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    if std::env::var_os("NO_COLOR").is_none() {
        cmd.env("NO_COLOR", "1");
    }
    run_bounded(&mut cmd, None, CLI_TIMEOUT)
        .unwrap_or_else(|e| panic!("routemesh {args:?} failed to run: {e}"))
}

/// The tasks of `service` in a `GET /routes` answer (none when it is not listed).
pub fn service_tasks(routes: &serde_json::Value, service: &str) -> Vec<serde_json::Value> {
    routes["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["tasks"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The listener named `name` in a `/routes` document or a node's alive record (its
/// `listeners` list); panics with the document when it is not there.
pub fn listener_named<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name:?} in {doc}"))
}

/// `Ok` once `GET {path}` on `admin` answers 200.
fn admin_200(admin: SocketAddr, path: &str) -> Result<(), String> {
    match try_get(admin, path) {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("status {status}: {body}")),
        Err(e) => Err(format!("error: {e}")),
    }
}

/// `Ok` once the daemon behind `admin` has bound its listeners: `/readyz` gives neither
/// "listeners not bound yet" (the config file's) nor "published listeners not bound yet" (it
/// may still wait for discovery, or be drained).
pub fn listeners_bound(admin: SocketAddr) -> Result<(), String> {
    match try_get(admin, "/readyz") {
        Ok((_, body)) if body.contains("listeners not bound yet") => Err(body),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("error: {e}")),
    }
}
