//! TLS termination on http listeners (certificates made by the openssl CLI per test, curl and
//! openssl s_client as clients, real nginx behind), and listeners without a default route.

mod support;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::nginx::Nginx;
use support::util::parse_http_response;
use support::util::run_bounded;
use support::{Daemon, eventually, free_addr};

// ---------------------------------------------------------------------------------------------
// helpers

/// `routemesh_rejected_connections_total{listener,reason}` (0 when absent).
fn rejected(d: &Daemon, listener: &str, reason: &str) -> u64 {
    let (_, text) = d.admin_get("/metrics");
    let needle = format!(
        "routemesh_rejected_connections_total{{listener=\"{listener}\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the daemon closed `s` (EOF or reset) within `within`, without sending data.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

/// `curl https://NAME:PORT/PATH` resolved to `addr`, verifying against `ca`, with `extra`
/// options; Ok(stdout) or Err(stderr).
fn curl(
    addr: SocketAddr,
    name: &str,
    path: &str,
    ca: &Path,
    extra: &[&str],
) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(extra)
        .arg("--resolve")
        .arg(format!("{name}:{}:127.0.0.1", addr.port()))
        .arg(format!("https://{name}:{}{path}", addr.port()));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// An HTTP/1.0 GET with `Host: host`; status and body.
fn get_host(addr: SocketAddr, host: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// `openssl s_server -www` with one certificate, on a free port (a TLS task).
struct TlsServer {
    addr: SocketAddr,
    child: Child,
}

impl TlsServer {
    fn start(cert: &Path, key: &Path) -> TlsServer {
        let addr = free_addr();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(addr.to_string())
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::piped()) // s_server exits when stdin closes
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        eventually(Duration::from_secs(10), "s_server to listen", || {
            TcpStream::connect(addr).is_ok()
        });
        TlsServer { addr, child }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// listeners without a default route

#[test]
fn http_listener_without_default_answers_404_for_unknown_hosts() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let d = Daemon::start(&format!(
        r#"
[discovery]
backend = "static"
[[listener]]
name = "web"
listen = "{listen}"
protocol = "http"
  [[listener.route]]
  host = "a.example.com"
  service = "a"
[[task]]
service = "a"
addr = "{}"
"#,
        web.addr()
    ));
    let (status, body) = get_host(listen, "a.example.com", "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("name=web"), "{body}");
    let (status, body) = get_host(listen, "other.example.com", "/x").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(
        body.starts_with("404 Not Found: no route for host \"other.example.com\""),
        "{body}"
    );
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics
            .contains(r#"routemesh_http_requests_total{code="404",listener="web",service=""} 1"#),
        "{metrics}"
    );
}

#[test]
fn tls_listener_without_default_closes_unknown_and_missing_sni() {
    let pki = support::etcd_secure::Pki::new();
    let (cert, key) = pki.issue("a", "a.example.com", &["DNS:a.example.com"]);
    let a = TlsServer::start(&cert, &key);
    let listen = free_addr();
    let d = Daemon::start(&format!(
        r#"
[discovery]
backend = "static"
[[listener]]
name = "sni"
listen = "{listen}"
protocol = "tls"
  [[listener.route]]
  sni = "a.example.com"
  service = "a"
[[task]]
service = "a"
addr = "{}"
"#,
        a.addr
    ));
    let ca = pki.ca();
    let body = curl(listen, "a.example.com", "/", &ca, &[]).unwrap();
    assert!(body.contains("Ciphers"), "{body}");

    // Unknown name: closed before any task sees it.
    let before = rejected(&d, "sni", "tls_no_route");
    let err = curl(listen, "b.example.com", "/", &ca, &[]).unwrap_err();
    assert!(!err.is_empty());
    // No SNI at all (curl sends none for an IP address).
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-k"])
        .arg(format!("https://127.0.0.1:{}/", listen.port()));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).unwrap();
    assert!(
        !out.status.success(),
        "a ClientHello without SNI is refused"
    );
    eventually(Duration::from_secs(3), "both counted", || {
        rejected(&d, "sni", "tls_no_route") >= before + 2
    });
    // A raw ClientHello without SNI gets nothing back: the connection just closes.
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(&client_hello_without_sni()).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)));
}

/// A minimal TLS 1.2 ClientHello with no extensions.
fn client_hello_without_sni() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2f]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}
