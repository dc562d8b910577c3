//! Pebble, the ACME test CA (Debian `pebble`), for the `[acme]` tests: started on the lab's
//! host address with a test config (its HTTPS certificate from a throw-away [`Pki`], which
//! the daemons trust through `ca_file`), `PEBBLE_VA_NOSLEEP=1` and real validation
//! (`PEBBLE_VA_ALWAYS_VALID` unset): its validation authority resolves the test names through
//! [`TestDns`] (`-dnsserver`) and connects to port 80 (http-01) or 443 (tls-alpn-01) of the
//! address it gets. Also a TLS client that returns the leaf a node serves, verified against
//! Pebble's root (fetched from its management port). Everything is killed on drop, by PID.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use super::net::free_port;
use super::pki::Pki;
use super::process::{require_binary, run_bounded, spawn_logged, tail_file, tempdir};
use super::wait::eventually_ok;

const PEBBLE_HINT: &str = "apt-get install -y pebble (or run `bash .ci/install-deps`)";

/// A running Pebble.
pub struct Pebble {
    child: Option<Child>,
    pki: Pki,
    dir: tempfile::TempDir,
    ip: Ipv4Addr,
    port: u16,
    mgmt: SocketAddr,
    dns: SocketAddr,
    validity_secs: u64,
}

impl Pebble {
    /// Starts Pebble on `ip` (free ports), resolving names through `dns`, issuing
    /// certificates valid for `validity_secs`; returns once its directory answers.
    pub fn start(ip: Ipv4Addr, dns: SocketAddr, validity_secs: u64) -> Pebble {
        require_binary("pebble", PEBBLE_HINT);
        require_binary("curl", "apt-get install -y curl");
        let pki = Pki::new();
        let mut p = Pebble {
            child: None,
            pki,
            dir: tempdir("pebble"),
            ip,
            port: free_port(),
            mgmt: SocketAddr::from((ip, free_port())),
            dns,
            validity_secs,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let (cert, key) = self
            .pki
            .issue("pebble", "pebble", &[&format!("IP:{}", self.ip)]);
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{}:{}", self.ip, self.port),
                "managementListenAddress": self.mgmt.to_string(),
                "certificate": cert,
                "privateKey": key,
                "httpPort": 80,
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": self.validity_secs,
            }
        });
        let path = self.dir.path().join("pebble.json");
        std::fs::write(&path, config.to_string()).expect("write pebble config");
        let mut cmd = Command::new(require_binary("pebble", PEBBLE_HINT));
        cmd.arg("-config")
            .arg(&path)
            .arg("-dnsserver")
            .arg(self.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            // No nonce rejections or authorization reuse: each order validates for real.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        self.child = Some(spawn_logged(&mut cmd, &self.log()));
        let url = self.directory();
        let ca = self.ca_file();
        eventually_ok(
            Duration::from_secs(15),
            "pebble's directory to answer",
            || {
                self.check_alive();
                curl(&ca, &url).map(|_| ())
            },
        );
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    fn check_alive(&mut self) {
        if let Some(c) = &mut self.child
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "pebble exited with {status}:\n{}",
                tail_file(&self.log(), 30)
            );
        }
    }

    /// The ACME directory URL (`[acme] directory`).
    pub fn directory(&self) -> String {
        format!("https://{}:{}/dir", self.ip, self.port)
    }

    /// The CA of Pebble's HTTPS certificate (`[acme] ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.pki.ca()
    }

    /// The `[acme]` section for this Pebble.
    pub fn acme_toml(&self, challenge: &str, renew_before: &str, key_file: &Path) -> String {
        format!(
            "[acme]\ndirectory = \"{}\"\nemail = \"ops@mesh.test\"\nca_file = \"{}\"\nchallenge = \"{challenge}\"\nrenew_before = \"{renew_before}\"\nkey_file = \"{}\"\n",
            self.directory(),
            self.ca_file().display(),
            key_file.display()
        )
    }

    /// A file holding Pebble's root certificate (PEM), fetched from its management port
    /// (the root changes with every start).
    pub fn root_file(&self) -> PathBuf {
        let pem = curl(&self.ca_file(), &format!("https://{}/roots/0", self.mgmt))
            .unwrap_or_else(|e| panic!("pebble's root: {e}"));
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, pem).expect("write pebble's root");
        path
    }

    /// Stops Pebble (SIGKILL by PID): the CA is down.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log so far (for failure messages).
    pub fn log_tail(&self) -> String {
        tail_file(&self.log(), 30)
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- pebble log ----\n{}", self.log_tail());
        }
        self.stop();
    }
}

fn curl(ca: &Path, url: &str) -> Result<String, String> {
    let out = run_bounded(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
            .arg(ca)
            .arg(url),
        None,
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A tiny authoritative DNS server for Pebble's validation authority: every A query is
/// answered with the current address list (TTL 1), anything else with no answer. The
/// list can change while it runs (a node powered off is taken out). Stopped on drop.
pub struct TestDns {
    pub addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestDns {
    pub fn start(ip: Ipv4Addr, answers: &[Ipv4Addr]) -> TestDns {
        let socket = UdpSocket::bind((ip, 0)).expect("bind the test DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set a read timeout");
        let addr = socket.local_addr().expect("its address");
        let answers = Arc::new(Mutex::new(answers.to_vec()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (answers.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let ips = a.lock().unwrap().clone();
                if let Some(resp) = dns_answer(&buf[..n], &ips) {
                    let _ = socket.send_to(&resp, from);
                }
            }
        });
        TestDns {
            addr,
            answers,
            stop,
            thread: Some(thread),
        }
    }

    /// Answer A queries with `ips` from now on.
    pub fn set(&self, ips: &[Ipv4Addr]) {
        *self.answers.lock().unwrap() = ips.to_vec();
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The response to one DNS query: its question echoed, A records for an A query.
fn dns_answer(q: &[u8], ips: &[Ipv4Addr]) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + q[i] as usize;
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let end = i + 5;
    if q.len() < end {
        return None;
    }
    let answers: &[Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    let mut r = q[..end].to_vec();
    r[2] = 0x84 | (q[2] & 0x01); // response, authoritative, RD copied
    r[3] = 0;
    r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    r[8..12].copy_from_slice(&[0, 0, 0, 0]);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// An open TLS connection to a node, verified against Pebble's root for `name`.
pub struct TlsConn {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsConn {
    pub fn open(addr: SocketAddr, name: &str, root: &Path) -> Result<TlsConn, String> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok();
        tcp.set_write_timeout(Some(Duration::from_secs(5))).ok();
        let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let config = Arc::new(super::tls::client_config(root, &[b"http/1.1"]));
        let conn = rustls::ClientConnection::new(config, server).map_err(|e| e.to_string())?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| format!("TLS handshake with {addr} as {name}: {e}"))?;
        }
        Ok(TlsConn { stream })
    }

    /// The leaf certificate the server sent (DER).
    pub fn leaf(&self) -> Vec<u8> {
        self.stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// `GET path` on this connection (keep-alive); the response status.
    pub fn get(&mut self, host: &str, path: &str) -> Result<u16, String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.stream
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        let resp = super::http::read_response(&mut self.stream).map_err(|e| e.to_string())?;
        Ok(resp.status)
    }
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }
}

/// The leaf node `addr` serves for `name`, verified against Pebble's root (a PEM file).
pub fn served_leaf(addr: SocketAddr, name: &str, root: &Path) -> Result<Vec<u8>, String> {
    TlsConn::open(addr, name, root).map(|c| c.leaf())
}
