//! Real mosquitto brokers, one process per broker on a free loopback port with its own config,
//! log and temp dir. The log (`log_type all`, `connection_messages true`) tells which client
//! ids connected and how many TCP connections the broker accepted.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::Duration;

use super::net::free_port;
use super::process::{read_log, require_binary, sbin, spawn_logged, tail_file, tempdir};
use super::wait::eventually;

const START_TIMEOUT: Duration = Duration::from_secs(10);

pub const MOSQUITTO_HINT: &str =
    "run `bash .ci/run` or `apt-get install -y mosquitto mosquitto-clients`";

/// Path of a mosquitto binary (`mosquitto`, `mosquitto_pub`, `mosquitto_sub`), or a panic
/// that says how to install it.
pub fn mosquitto_bin(name: &str) -> PathBuf {
    if name == "mosquitto" {
        sbin(name, MOSQUITTO_HINT)
    } else {
        require_binary(name, MOSQUITTO_HINT)
    }
}

/// The mosquitto.conf of every test broker: `listener PORT IP`, anonymous, no persistence,
/// the full log (`log_type all`, connection messages) written to `log`.
pub fn conf(ip: IpAddr, port: u16, log: &Path) -> String {
    // `user root`: when started as root, mosquitto would otherwise drop to the `mosquitto`
    // user and could not write its log in our temp dir (no effect when not root).
    format!(
        "listener {port} {ip}\nallow_anonymous true\npersistence false\nuser root\n\
         log_dest file {log}\nlog_type all\nconnection_messages true\nlog_timestamp true\n\
         max_queued_messages 1000\n",
        log = log.display()
    )
}

/// A running broker; killed on drop.
pub struct Mosquitto {
    name: String,
    dir: tempfile::TempDir,
    port: u16,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker on a free loopback port and waits until it accepts connections.
    pub fn start(name: &str) -> Mosquitto {
        let dir = tempdir(&format!("rm-mosquitto-{name}"));
        let log_path = dir.path().join("mosquitto.log");
        let mut m = Mosquitto {
            name: name.to_string(),
            port: free_port(),
            log_path,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let conf_path = self.dir.path().join("mosquitto.conf");
        let ip = IpAddr::from([127, 0, 0, 1]);
        std::fs::write(&conf_path, conf(ip, self.port, &self.log_path))
            .expect("write mosquitto.conf");
        let mut cmd = Command::new(mosquitto_bin("mosquitto"));
        cmd.arg("-c").arg(&conf_path);
        let stdout = self.dir.path().join("stdout.log");
        let mut child = spawn_logged(&mut cmd, &stdout);
        let addr = self.addr();
        eventually(
            START_TIMEOUT,
            &format!("mosquitto {} to accept on {addr}", self.name),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "mosquitto {} exited ({status}) at start:\n{}\n{}",
                        self.name,
                        tail_file(&stdout, 30),
                        tail_file(&self.log_path, 30)
                    );
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            },
        );
        self.child = Some(child);
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The whole broker log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.log_path, n)
    }

    /// Client ids of every MQTT session opened, in order (one per CONNECT accepted).
    pub fn connected_client_ids(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| {
                let rest = l.split_once("New client connected from ")?.1;
                let after_as = rest.split_once(" as ")?.1;
                // "<id> (p2, c1, k60)." — ids in our tests contain no spaces.
                Some(after_as.split(" (").next()?.to_string())
            })
            .collect()
    }

    /// TCP connections the broker accepted (with or without a CONNECT).
    pub fn accepted_connections(&self) -> usize {
        self.log().matches("New connection from").count()
    }

    /// Stops the broker (SIGKILL): its sessions are gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- mosquitto {} log (last 20 lines) ----\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        self.stop();
    }
}
