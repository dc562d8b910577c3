//! The lab's workloads: nginx replicas and a mosquitto broker on a node's own address, with
//! the same configs as the loopback ones of `support::nginx` and `support::mosquitto`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use super::Lab;
use crate::support::{coap, mosquitto, nginx, process::read_log, wait::eventually};

/// Size of the body of an nginx replica's `GET /slow`.
pub const SLOW_BYTES: usize = 64 * 1024;

/// Bound for a workload to accept connections.
const WORKLOAD_START_TIMEOUT: Duration = Duration::from_secs(10);

impl Lab {
    fn workload_dir(&self, i: usize, name: &str) -> PathBuf {
        let d = self.node(i).dir.join(name);
        std::fs::create_dir_all(&d).expect("create workload dir");
        d
    }

    fn next_port(&mut self, i: usize) -> u16 {
        let node = self.node_mut(i);
        node.next_port += 1;
        node.next_port - 1
    }

    fn wait_accepting(&mut self, i: usize, name: &str, addrs: &[SocketAddr]) {
        for addr in addrs {
            eventually(
                WORKLOAD_START_TIMEOUT,
                &format!("{name} on n{i} to accept on {addr}"),
                || {
                    self.check_alive(i, name);
                    TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
                },
            );
        }
    }

    /// Start one nginx on node `i` with one server per replica name, each on its own port of
    /// the node IP answering `GET /` with `200 "<replica>\n"` and `GET /slow` with
    /// [`SLOW_BYTES`] bytes sent at 32 KiB/s (a request that takes about 2 s). Returns the
    /// replicas' addresses (in order) once they all accept connections. The process is named
    /// `nginx-<first>`.
    pub fn start_nginx(&mut self, i: usize, replicas: &[&str]) -> Vec<SocketAddr> {
        assert!(!replicas.is_empty());
        let name = format!("nginx-{}", replicas[0]);
        let dir = self.workload_dir(i, &name);
        let ip = self.ip(i);
        let mut addrs = Vec::new();
        let mut http = format!(
            "    access_log {}/access.log;\n    keepalive_timeout 30s;\n",
            dir.display()
        );
        let slow = dir.join("slow.bin");
        std::fs::write(&slow, vec![b's'; SLOW_BYTES]).expect("write slow.bin");
        for r in replicas {
            let port = self.next_port(i);
            addrs.push(SocketAddr::from((ip, port)));
            let _ = write!(
                http,
                "    server {{\n        listen {ip}:{port} reuseport;\n        location / {{\n          \
                 default_type text/plain;\n          return 200 \"{r}\\n\";\n        }}\n        \
                 location = /slow {{\n          alias {};\n          limit_rate 32k;\n        }}\n    }}\n",
                slow.display()
            );
        }
        let conf = nginx::write_conf(&dir, &http);
        let args = nginx::args(&dir, &conf);
        self.spawn_in(i, &name, &nginx::nginx_bin(), &args, &[]);
        self.wait_accepting(i, &name, &addrs);
        addrs
    }

    /// Requests the nginx started on node `i` with first replica `first` has logged (every
    /// replica of it).
    pub fn nginx_requests(&self, i: usize, first: &str) -> usize {
        read_log(
            &self
                .node(i)
                .dir
                .join(format!("nginx-{first}"))
                .join("access.log"),
        )
        .lines()
        .count()
    }

    /// Start mosquitto on node `i` (`listener PORT NODEIP`, anonymous, full log). Returns its
    /// address once it accepts connections. The process is named `mosquitto`; its broker log
    /// is [`Lab::mosquitto_log`].
    pub fn start_mosquitto(&mut self, i: usize) -> SocketAddr {
        let dir = self.workload_dir(i, "mosquitto");
        let port = self.next_port(i);
        let ip = IpAddr::V4(self.ip(i));
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(
            &conf_path,
            mosquitto::conf(ip, port, &dir.join("broker.log")),
        )
        .expect("write mosquitto.conf");
        let args = vec!["-c".to_string(), conf_path.display().to_string()];
        self.spawn_in(
            i,
            "mosquitto",
            &mosquitto::mosquitto_bin("mosquitto"),
            &args,
            &[],
        );
        let addr = SocketAddr::new(ip, port);
        self.wait_accepting(i, "mosquitto", &[addr]);
        addr
    }

    /// The broker log of node `i`'s mosquitto.
    pub fn mosquitto_log(&self, i: usize) -> String {
        read_log(&self.node(i).dir.join("mosquitto").join("broker.log"))
    }

    /// Start a CoAP server (libcoap's `coap-server-notls`) on node `i`'s address and name it
    /// `name` (`GET /who` answers it). The process is named `coap-<name>`.
    pub fn start_coap(&mut self, i: usize, name: &str) -> SocketAddr {
        let port = self.next_port(i);
        let addr = SocketAddr::from((self.ip(i), port));
        let proc_name = format!("coap-{name}");
        self.spawn_in(
            i,
            &proc_name,
            &coap::server_bin(),
            &coap::server_args(addr),
            &[],
        );
        coap::name_server(addr, name, &mut || self.check_alive(i, &proc_name));
        addr
    }

    /// `GET coap://target/path` with the real client, run in node `from`'s namespace (`None`:
    /// the test's own): the payload, or `None`.
    pub fn coap_get_from(
        &self,
        from: Option<usize>,
        target: SocketAddr,
        path: &str,
    ) -> Option<String> {
        let mut cmd = std::process::Command::new(super::netns::ip_bin());
        let client = coap::client_bin();
        let uri = coap::uri(target, path);
        let args = ["-m", "get", "-B", "2", uri.as_str()];
        match from {
            Some(i) => {
                cmd.args(["netns", "exec", &self.node(i).ns])
                    .arg(&client)
                    .args(args);
            }
            None => {
                cmd = std::process::Command::new(&client);
                cmd.args(args);
            }
        }
        let out =
            crate::support::process::run_bounded(&mut cmd, None, Duration::from_secs(10)).ok()?;
        coap::payload_of(&out.stdout)
    }
}
