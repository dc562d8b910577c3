//! CoAP over UDP: the real libcoap server and client (Debian `libcoap3-bin`:
//! `coap-server-notls`, `coap-client-notls`), and the one request the tests also send
//! themselves when they need to time it or to read the reply's source address.
//!
//! Every test server is started with `-d 10` (clients may create resources) and gets its
//! name PUT into `/who` directly (not through routemesh), so `GET /who` through the proxy
//! tells which server answered.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::net::free_port;
use super::process::{require_binary, run_bounded, spawn_logged, tail_file, tempdir};
use super::wait::eventually_ok;

pub const COAP_HINT: &str = "run `bash .ci/install-deps` or `apt-get install -y libcoap3-bin`";

/// Bound for a server to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub fn server_bin() -> PathBuf {
    require_binary("coap-server-notls", COAP_HINT)
}

pub fn client_bin() -> PathBuf {
    require_binary("coap-client-notls", COAP_HINT)
}

/// `coap-server-notls` arguments for a server on `addr`.
pub fn server_args(addr: SocketAddr) -> Vec<String> {
    vec![
        "-A".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "-d".into(),
        "10".into(),
    ]
}

/// `coap://ADDR/PATH` (IPv6 in brackets).
pub fn uri(addr: SocketAddr, path: &str) -> String {
    format!("coap://{addr}/{path}")
}

/// `GET coap://target/path` with the real client (waits up to `wait` for the answer), from
/// local port `local_port` when given: the answer's payload, or `None` (no answer).
pub fn get(
    target: SocketAddr,
    path: &str,
    local_port: Option<u16>,
    wait: Duration,
) -> Option<String> {
    let mut cmd = Command::new(client_bin());
    cmd.args(["-m", "get", "-B"])
        .arg(wait.as_secs().max(1).to_string());
    if let Some(p) = local_port {
        cmd.args(["-p", &p.to_string()]);
    }
    cmd.arg(uri(target, path));
    let out = run_bounded(&mut cmd, None, wait + Duration::from_secs(5)).ok()?;
    payload_of(&out.stdout)
}

/// The payload the client printed, without its own log lines (`Dec 01 … WARN …`, on stdout
/// too).
pub fn payload_of(stdout: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !is_log_line(l)).collect();
    let text = lines.join("\n").trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn is_log_line(l: &str) -> bool {
    [
        " WARN ", " ERR ", " INFO ", " NOTICE ", " DEBUG ", " CRIT ", " ALRT ", " EMRG ",
    ]
    .iter()
    .any(|level| l.contains(level))
}

/// `PUT coap://target/path` with `payload` (creates the resource on a `-d` server).
pub fn put(target: SocketAddr, path: &str, payload: &str) -> Result<(), String> {
    let mut cmd = Command::new(client_bin());
    cmd.args(["-m", "put", "-B", "2", "-e", payload])
        .arg(uri(target, path));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && !text.lines().any(is_log_line) {
        Ok(())
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Names the server at `addr` (`/who`), retrying while it starts; fails after a bound.
pub fn name_server(addr: SocketAddr, name: &str, alive: &mut dyn FnMut()) {
    eventually_ok(
        START_TIMEOUT,
        &format!("coap server {name} on {addr} to answer"),
        || {
            alive();
            put(addr, "who", name)?;
            match get(addr, "who", None, Duration::from_secs(1)) {
                Some(n) if n == name => Ok(()),
                other => Err(format!("GET /who gave {other:?}")),
            }
        },
    );
}

/// A CoAP server in this namespace on a free loopback port, named `name`.
pub struct CoapServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl CoapServer {
    pub fn start(name: &str) -> CoapServer {
        Self::start_at(name, SocketAddr::from(([127, 0, 0, 1], free_port())))
    }

    pub fn start_at(name: &str, addr: SocketAddr) -> CoapServer {
        let dir = tempdir(&format!("routemesh-coap-{name}"));
        let log = dir.path().join("coap-server.log");
        let child = spawn_logged(Command::new(server_bin()).args(server_args(addr)), &log);
        let mut s = CoapServer {
            child,
            addr,
            log,
            _dir: dir,
        };
        let (child, log) = (&mut s.child, s.log.clone());
        name_server(addr, name, &mut || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "coap-server-notls exited with {status}:\n{}",
                    tail_file(&log, 20)
                );
            }
        });
        s
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server (SIGKILL: a crash, nothing is sent).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoapServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A confirmable `GET /path` with message id `id` (no token).
pub fn get_request(id: u16, path: &str) -> Vec<u8> {
    assert!(path.len() < 13, "short paths only");
    let mut p = vec![0x40, 0x01];
    p.extend_from_slice(&id.to_be_bytes());
    // Option 11 (Uri-Path), delta 11, length len.
    p.push((11 << 4) | path.len() as u8);
    p.extend_from_slice(path.as_bytes());
    p
}

/// The message id and payload of a CoAP reply.
pub fn parse_reply(reply: &[u8]) -> Option<(u16, String)> {
    if reply.len() < 4 || reply[0] >> 6 != 1 {
        return None;
    }
    let id = u16::from_be_bytes([reply[2], reply[3]]);
    let tkl = (reply[0] & 0x0f) as usize;
    let rest = reply.get(4 + tkl..)?;
    let payload = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => String::from_utf8_lossy(&rest[i + 1..]).into_owned(),
        None => String::new(),
    };
    Some((id, payload))
}

/// Sends `GET /path` from `socket` to `target` every `every` until a reply with its message
/// id comes (or `within` passes): the payload, the reply's source, and how long it took.
pub fn request(
    socket: &UdpSocket,
    target: SocketAddr,
    id: u16,
    path: &str,
    every: Duration,
    within: Duration,
) -> Option<(String, SocketAddr, Duration)> {
    let started = Instant::now();
    let req = get_request(id, path);
    let mut buf = [0u8; 2048];
    while started.elapsed() < within {
        socket.send_to(&req, target).ok()?;
        let sent = Instant::now();
        while sent.elapsed() < every {
            socket
                .set_read_timeout(Some(
                    every
                        .saturating_sub(sent.elapsed())
                        .max(Duration::from_millis(1)),
                ))
                .ok()?;
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some((rid, payload)) = parse_reply(&buf[..n])
                        && rid == id
                    {
                        return Some((payload, from, started.elapsed()));
                    }
                }
                Err(_) => break,
            }
        }
    }
    None
}

/// A UDP socket on `ip`, port chosen by the kernel.
pub fn client_socket(ip: IpAddr) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind a client socket")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_shapes() {
        assert_eq!(
            get_request(0x1234, "who"),
            [0x40, 1, 0x12, 0x34, 0xb3, b'w', b'h', b'o']
        );
        // An ACK 2.05 with a token of 2 and payload "s1".
        let reply = [0x62, 0x45, 0x12, 0x34, 0xaa, 0xbb, 0xc0, 0xff, b's', b'1'];
        assert_eq!(parse_reply(&reply), Some((0x1234, "s1".to_string())));
        assert_eq!(parse_reply(&[0x00, 0, 0, 0]), None);
    }
}
