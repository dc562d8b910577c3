//! Real nginx backends (Debian's `nginx`), one per call, on a free loopback port with its own
//! temp dir (config, pid, logs, temp paths). Each answers every request with its own name and
//! echoes the forwarding headers it received, so tests see what a real backend saw.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::net::free_addr;
use super::process::{is_root, sbin, send_signal, spawn_logged, tail_file, tempdir};
use super::wait::eventually;

/// Setup hint used when nginx is missing.
pub const NGINX_SETUP_HINT: &str = "run `bash .ci/run` or `apt-get install -y nginx-light`";

/// The nginx binary (or a panic naming the setup command).
pub fn nginx_bin() -> PathBuf {
    sbin("nginx", NGINX_SETUP_HINT)
}

/// The nginx.conf of every test nginx: one worker, its pid, logs and temp paths in `dir`,
/// and `http_body` (log formats, servers) inside `http { }`. Writes it and returns its path.
pub fn write_conf(dir: &Path, http_body: &str) -> PathBuf {
    let d = dir.display();
    let user = if is_root() { "user root;" } else { "" };
    let conf = format!(
        "{user}\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 1024; }}\nhttp {{\n    \
         client_body_temp_path {d}/tmp/body;\n    proxy_temp_path {d}/tmp/proxy;\n    \
         fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n    \
         scgi_temp_path {d}/tmp/scgi;\n{http_body}\n}}\n"
    );
    fs::create_dir_all(dir.join("tmp")).expect("nginx tmp dir");
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).expect("write nginx.conf");
    path
}

/// The arguments that run nginx in the foreground with `conf` (from [`write_conf`] in `dir`).
pub fn args(dir: &Path, conf: &Path) -> Vec<String> {
    [
        "-e",
        &dir.join("error.log").display().to_string(),
        "-g",
        "daemon off;",
        "-p",
        &format!("{}/", dir.display()),
        "-c",
        &conf.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// How an nginx backend listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NginxProtocol {
    Http1,
    /// HTTP/2 with prior knowledge only (`listen … http2` without TLS).
    H2c,
    /// HTTP/1.1 behind a PROXY protocol header (`listen … proxy_protocol`); `GET /pp`
    /// answers `$proxy_protocol_addr:$proxy_protocol_port`: the client it was told about.
    ProxyProtocol,
}

/// A running nginx (master + one worker), killed on drop.
pub struct Nginx {
    name: String,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nginx {
    /// An HTTP/1.1 backend answering every request with 200 and a body of `key=value` lines:
    /// `name`, `xff`, `xfp`, `xfh`, `forwarded`, `via`, `host`, `uri`, `method`,
    /// `connection`, `secret` (the `X-Secret` header). It also sets `X-Backend: <name>`.
    pub fn start(name: &str) -> Nginx {
        Self::start_with(name, NginxProtocol::Http1, "")
    }

    /// Like [`Nginx::start`], with `extra` inserted in the `server` block (more locations).
    pub fn start_with(name: &str, protocol: NginxProtocol, extra: &str) -> Nginx {
        let dir = tempdir(&format!("nginx-{name}"));
        let addr = free_addr();
        let d = dir.path().display().to_string();
        let (listen_opts, extra) = match protocol {
            NginxProtocol::Http1 => ("", extra.to_string()),
            NginxProtocol::H2c => (" http2", extra.to_string()),
            NginxProtocol::ProxyProtocol => (
                " proxy_protocol",
                format!(
                    "location = /pp {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port\"; }}\n        {extra}"
                ),
            ),
        };
        let conf = write_conf(
            dir.path(),
            &format!(
                r#"    log_format echo '$remote_addr "$request" $status $request_length xff="$http_x_forwarded_for" conn=$connection';
    access_log {d}/access.log echo;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    client_max_body_size 0;
    server {{
        listen {addr}{listen_opts};
        add_header X-Backend {name} always;
        default_type text/plain;
        location / {{
            return 200 "name={name}\nxff=$http_x_forwarded_for\nxfp=$http_x_forwarded_proto\nxfh=$http_x_forwarded_host\nforwarded=$http_forwarded\nvia=$http_via\nhost=$http_host\nuri=$request_uri\nmethod=$request_method\nconnection=$http_connection\nsecret=$http_x_secret\nproto=$server_protocol\n";
        }}
        {extra}
    }}"#
            ),
        );
        let mut cmd = Command::new(nginx_bin());
        cmd.args(args(dir.path(), &conf));
        let child = spawn_logged(&mut cmd, &dir.path().join("stderr.log"));
        let mut n = Nginx {
            name: name.to_string(),
            addr,
            dir,
            child: Some(child),
        };
        n.wait_listening();
        n
    }

    fn wait_listening(&mut self) {
        let addr = self.addr;
        let mut exited = None;
        eventually(
            Duration::from_secs(10),
            &format!("nginx {} to listen on {addr}", self.name),
            || {
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    exited = Some(status);
                    return true;
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            },
        );
        if let Some(status) = exited {
            panic!(
                "nginx {} exited at start ({status}); stderr:\n{}\nerror.log:\n{}",
                self.name,
                tail_file(&self.dir.path().join("stderr.log"), 30),
                tail_file(&self.dir.path().join("error.log"), 30)
            );
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The access log so far: one line per request nginx answered.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.access_log().lines().count()
    }

    /// Distinct client connections seen in the access log (`conn=` serial numbers).
    pub fn connections_seen(&self) -> usize {
        let mut ids: Vec<&str> = Vec::new();
        let log = self.access_log();
        for l in log.lines() {
            if let Some(i) = l.rfind("conn=") {
                let id = &l[i + 5..];
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        // Borrow ends with `log`.
        ids.len()
    }

    /// Stop nginx and wait: SIGKILL to the master, then to the workers it had.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Find the workers while the master lives, kill the master first (a master that
            // sees a worker die forks a new one), then the workers it left behind (an orphaned
            // worker would keep the port open).
            let workers = children_of(c.id());
            let _ = c.kill();
            let _ = c.wait();
            for worker in workers {
                let _ = send_signal(worker, 9);
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The direct children of `pid` (nginx workers of a master).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // Fields after the parenthesised command: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}
