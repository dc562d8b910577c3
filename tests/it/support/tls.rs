//! TLS on both ends of a test: `openssl s_server -www` as a TLS task (passthrough and
//! termination), and curl as an HTTPS client that checks the certificate it is sent.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use super::process::run_bounded;

use super::net::free_addr;
use super::wait::eventually;

/// `openssl s_server -www` with one certificate, on a free port; killed on drop.
pub struct TlsServer {
    pub addr: SocketAddr,
    child: Child,
}

impl TlsServer {
    pub fn start(cert: &Path, key: &Path) -> TlsServer {
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
            .expect("openssl s_server (apt-get install -y openssl)");
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

/// `curl https://NAME:PORT/PATH` resolved to `addr`, verifying against `ca`, with `extra`
/// options; Ok(stdout) or Err(stderr).
pub fn curl_https(
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

/// A blocking TLS client connection.
pub type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` for `name` with `cfg`, handshake done (reads time out after 5 s).
pub fn tls_connect(addr: SocketAddr, name: &str, cfg: &Arc<rustls::ClientConfig>) -> TlsConn {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), server_name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

/// A blocking-client rustls config trusting the PEM roots in `ca`, offering `alpn`.
pub fn client_config(ca: &Path, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}
