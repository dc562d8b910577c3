//! Real mosquitto brokers, one process per broker on a free loopback port with its own config,
//! log and temp dir. The log (`log_type all`, `connection_messages true`) tells which client
//! ids connected and how many TCP connections the broker accepted.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::util::{free_port, require_binary, tail_file, tempdir};

const START_TIMEOUT: Duration = Duration::from_secs(10);

pub const MOSQUITTO_HINT: &str =
    "run `bash .ci/run` or `apt-get install -y mosquitto mosquitto-clients`";

/// Path of a mosquitto binary (`mosquitto`, `mosquitto_pub`, `mosquitto_sub`), or a panic
/// that says how to install it.
pub fn mosquitto_bin(name: &str) -> PathBuf {
    if name == "mosquitto" {
        let sbin = PathBuf::from("/usr/sbin/mosquitto");
        if sbin.exists() {
            return sbin;
        }
    }
    require_binary(name, MOSQUITTO_HINT)
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
        let bin = mosquitto_bin("mosquitto");
        let conf = self.dir.path().join("mosquitto.conf");
        // `user root`: when started as root, mosquitto would otherwise drop to the `mosquitto`
        // user and could not write its log in our temp dir (no effect when not root).
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n\
             log_dest file {log}\nlog_type all\nconnection_messages true\nlog_timestamp true\n\
             max_queued_messages 1000\n",
            port = self.port,
            log = self.log_path.display()
        );
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout.log"))
            .expect("open mosquitto stdout log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mosquitto {} exited ({status}) at start:\n{}\n{}",
                    self.name,
                    tail_file(&self.dir.path().join("stdout.log"), 30),
                    tail_file(&self.log_path, 30)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "mosquitto {} not accepting on {} within {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.addr(),
                    tail_file(&self.log_path, 30)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The whole broker log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
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
