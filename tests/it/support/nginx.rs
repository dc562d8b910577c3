//! Real nginx backends (Debian's `nginx`), one per call, on a free loopback port with its own
//! temp dir (config, pid, logs, temp paths). Each answers every request with its own name and
//! echoes the forwarding headers it received, so tests see what a real backend saw.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::util::{eventually, free_addr, tail_file, tempdir, which};

/// Setup hint used when nginx is missing.
pub const NGINX_SETUP_HINT: &str = "run `bash .ci/run` or `apt-get install -y nginx-light`";

fn nginx_bin() -> PathBuf {
    which("nginx")
        .or_else(|| which("/usr/sbin/nginx"))
        .unwrap_or_else(|| panic!("nginx not found: {NGINX_SETUP_HINT}"))
}

/// How an nginx backend listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NginxProtocol {
    Http1,
    /// HTTP/2 with prior knowledge only (`listen … http2` without TLS).
    H2c,
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
        let bin = nginx_bin();
        let dir = tempdir(&format!("nginx-{name}"));
        let addr = free_addr();
        let d = dir.path().display().to_string();
        let user = if is_root() { "user root;" } else { "" };
        let listen_opts = match protocol {
            NginxProtocol::Http1 => "",
            NginxProtocol::H2c => " http2",
        };
        let conf = format!(
            r#"{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format echo '$remote_addr "$request" $status $request_length xff="$http_x_forwarded_for" conn=$connection';
    access_log {d}/access.log echo;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
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
    }}
}}
"#
        );
        fs::create_dir_all(dir.path().join("tmp")).expect("nginx tmp dir");
        let conf_path = dir.path().join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let log = fs::File::create(dir.path().join("stderr.log")).expect("nginx stderr log");
        let child = Command::new(bin)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-g")
            .arg("daemon off;")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn nginx: {e}"));
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

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
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
                let _ = super::util::send_signal(worker, 9);
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
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
