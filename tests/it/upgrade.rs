//! `routemesh run --upgrade` against real etcd, real nginx, real mosquitto and real daemons:
//! under load (HTTP requests, MQTT devices publishing through a Maglev client-id listener,
//! DNS queries over UDP) an upgrade fails no request, refuses or resets no connection, loses
//! no MQTT message, leaves the open MQTT connections with the old process until they close,
//! sends new ones to the new process, and no etcd watcher sees a key of the node deleted. A
//! new process that fails (broken config, killed before it is ready) leaves the old one
//! serving; upgrades chain; a second upgrade while the old process drains is refused. A udp
//! listener keeps answering across an upgrade (its socket is handed over). Clients connecting
//! in a tight loop across hand-overs, hesitating before their first bytes, are all answered.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::etcd::{ETCD_SETUP_HINT, parse_watch_deletes};
use crate::support::http::try_get as try_http_get;
use crate::support::mosquitto::Mosquitto;
use crate::support::mqtt_wire::{self, CONNACK_ACCEPTED, DISCONNECT, parse_packet};
use crate::support::nginx::Nginx;
use crate::support::process::require_binary;
use crate::support::process::tail_file;
use crate::support::tempdir;
use crate::support::{Daemon, Etcd, Etcdctl, bin, eventually, free_addr};

const P: &str = "/routemesh";
const NODE: &str = "up1";
const WAIT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---- the daemon's config ------------------------------------------------------------------

struct Ports {
    admin: SocketAddr,
    web: SocketAddr,
    mqtt: SocketAddr,
    dns: SocketAddr,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            admin: free_addr(),
            web: free_addr(),
            mqtt: free_addr(),
            dns: free_addr(),
        }
    }
}

/// The node: an http listener to nginx, a tcp listener with Maglev on the MQTT client id to
/// the brokers, DNS; its tasks are `[[task]]`s, so they live under the node's lease.
fn config(etcd: &Etcd, p: &Ports, web: SocketAddr, brokers: &[SocketAddr], node: &str) -> String {
    let mut tasks = format!("[[task]]\nservice = \"web\"\naddr = \"{web}\"\nid = \"web-1\"\n");
    for (i, b) in brokers.iter().enumerate() {
        tasks.push_str(&format!(
            "[[task]]\nservice = \"mqtt\"\naddr = \"{b}\"\nid = \"broker-{i}\"\n"
        ));
    }
    format!(
        r#"[node]
name = "{NODE}"
advertise = "127.0.0.1"
{node}
[discovery]
endpoints = ["{etcd}"]
prefix = "{P}"
node_ttl = "2s"
dial_timeout = "1s"
[admin]
listen = "{admin}"
upgrade_socket = "upgrade.sock"
[dns]
listen = "{dns}"
zone = "mesh.test"
[[listener]]
name = "web"
listen = "{web_l}"
protocol = "http"
service = "web"
[[listener]]
name = "mqtt"
listen = "{mqtt}"
protocol = "tcp"
service = "mqtt"
[service.mqtt]
balance = "maglev"
hash_key = "mqtt_client_id"
connect_timeout = "500ms"
[service.mqtt.health]
interval = "1h"
[service.web.health]
interval = "1h"
{tasks}"#,
        etcd = etcd.endpoint(),
        admin = p.admin,
        dns = p.dns,
        web_l = p.web,
        mqtt = p.mqtt,
    )
}

// ---- the new process -----------------------------------------------------------------------

/// `routemesh run --upgrade -c FILE` as a child of the test, killed on drop.
struct Upgrader {
    child: Child,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
    _dir: tempfile::TempDir,
}

impl Upgrader {
    fn start(config: &Path) -> Upgrader {
        Upgrader::spawn(config, "--upgrade", &[])
    }

    /// `routemesh run FLAG -c CONFIG` with extra environment variables.
    fn spawn(config: &Path, flag: &str, env: &[(&str, &str)]) -> Upgrader {
        let dir = tempdir("rm-upgrader");
        let log_path = dir.path().join("upgrader.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(bin())
            .args(["run", flag, "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin()));
        Upgrader {
            child,
            log_path,
            exit: None,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().unwrap();
        }
        self.exit.is_none()
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "run --upgrade still running after {within:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.exit.unwrap()
    }

    /// Waits until the takeover is complete (the old process has stopped accepting).
    fn wait_taken_over(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains("upgrade done") {
            assert!(
                self.running(),
                "run --upgrade exited ({:?}) before taking over:\n{}",
                self.exit,
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "no takeover within {WAIT:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        if self.running() {
            crate::support::process::send_signal(self.pid(), libc::SIGTERM).unwrap();
        }
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- run --upgrade log (pid {}) ----\n{}",
                self.pid(),
                tail_file(&self.log_path, 60)
            );
        }
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pid owning each established connection accepted on `port` (`ss -tnp`).
fn owners(port: u16) -> BTreeMap<u32, usize> {
    let ss = require_binary("ss", "run `bash .ci/run` or `apt-get install -y iproute2`");
    let out = Command::new(ss)
        .args(["-Htnp", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("run ss");
    let mut by_pid = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(pid) = line
            .split("pid=")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
        {
            *by_pid.entry(pid).or_insert(0) += 1;
        }
    }
    by_pid
}

// ---- etcd: a watch of the whole prefix --------------------------------------------------------

/// `etcdctl watch --prefix` running for the whole test; its output is the event history.
struct Watch {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Watch {
    fn start(etcd: &Etcd) -> Watch {
        let dir = tempdir("rm-watch");
        let out = dir.path().join("watch.txt");
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new(require_binary("etcdctl", ETCD_SETUP_HINT))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoint()))
            .args(["watch", "--prefix", P])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcdctl watch");
        let w = Watch {
            child,
            out,
            _dir: dir,
        };
        // The watch is live once it reports a probe put.
        let probe = format!("{P}/watch-probe");
        eventually(WAIT, "etcdctl watch to see a probe key", || {
            etcd.put(&probe, "1");
            w.text().contains(&probe)
        });
        w
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Keys deleted so far.
    fn deleted(&self) -> Vec<String> {
        parse_watch_deletes(&self.text())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_keys_deleted(watch: &Watch) -> Vec<String> {
    watch
        .deleted()
        .into_iter()
        .filter(|k| {
            k.starts_with(&format!("{P}/nodes/{NODE}/")) || k.starts_with(&format!("{P}/tasks/"))
        })
        .collect()
}

// ---- MQTT devices and subscribers ------------------------------------------------------------

/// Connects with `id` and waits for an accepting CONNACK. Clean session, keep-alive off (the
/// test's connections stay quiet between publishes).
fn mqtt_connect(addr: SocketAddr, id: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(&mqtt_wire::connect(id.as_bytes(), true, 0))?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack != CONNACK_ACCEPTED {
        return Err(io::Error::other(format!("CONNACK {ack:?}")));
    }
    Ok(s)
}

/// A subscriber to `up/#` directly on a broker, recording every `topic payload` it gets.
struct Subscriber {
    got: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Subscriber {
    fn start(broker: SocketAddr, id: &str) -> Subscriber {
        let mut s = mqtt_connect(broker, id).expect("subscriber connects to its broker");
        s.write_all(&mqtt_wire::subscribe(1, "up/#")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let got = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let handle = thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            // Bounded: the test stops it long before.
            let deadline = Instant::now() + Duration::from_secs(240);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                match s.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue;
                    }
                    Err(_) => return,
                }
                while let Some((kind, body, used)) = parse_packet(&buf) {
                    if kind >> 4 == 3 && body.len() >= 2 {
                        let len = u16::from_be_bytes([body[0], body[1]]) as usize;
                        let topic = String::from_utf8_lossy(&body[2..2 + len]);
                        let payload = String::from_utf8_lossy(&body[2 + len..]);
                        g.lock().unwrap().insert(format!("{topic} {payload}"));
                    }
                    buf.drain(..used);
                }
            }
        });
        Subscriber {
            got,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Devices connected through the node, publishing `up/ID SEQ` once a second from one thread.
struct Devices {
    streams: Arc<Mutex<Vec<(String, TcpStream)>>>,
    rounds: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Devices {
    fn connect(addr: SocketAddr, ids: impl Iterator<Item = String>) -> Vec<(String, TcpStream)> {
        ids.map(|id| {
            let s =
                mqtt_connect(addr, &id).unwrap_or_else(|e| panic!("device {id} via {addr}: {e}"));
            (id, s)
        })
        .collect()
    }

    fn start(streams: Vec<(String, TcpStream)>) -> Devices {
        let streams = Arc::new(Mutex::new(streams));
        let rounds = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, r, e, st) = (
            streams.clone(),
            rounds.clone(),
            errors.clone(),
            stop.clone(),
        );
        let handle = thread::spawn(move || {
            // Bounded: at most 120 rounds.
            for round in 0..120 {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let started = Instant::now();
                for (id, stream) in s.lock().unwrap().iter_mut() {
                    if let Err(err) = stream
                        .write_all(&mqtt_wire::publish(&format!("up/{id}"), &round.to_string()))
                    {
                        e.lock().unwrap().push(format!("{id} round {round}: {err}"));
                    }
                }
                r.store(round + 1, Ordering::Release);
                let rest = Duration::from_secs(1).saturating_sub(started.elapsed());
                thread::sleep(rest);
            }
        });
        Devices {
            streams,
            rounds,
            errors,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops publishing; returns how many rounds every device published.
    fn stop(&mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.rounds.load(Ordering::Acquire)
    }

    /// Devices whose connection was closed or reset (a non-blocking read sees EOF or an error).
    fn closed(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, s) in self.streams.lock().unwrap().iter_mut() {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(n) => out.push(format!("{id}: read {n} bytes (closed or unexpected data)")),
                Err(e) => out.push(format!("{id}: {e}")),
            }
            s.set_nonblocking(false).unwrap();
        }
        out
    }
}

// ---- HTTP and DNS load ------------------------------------------------------------------------

/// Requests on fresh connections from `threads` threads, each every `every`, until stopped.
struct Load {
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        threads: usize,
        every: Duration,
        request: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let request = Arc::new(request);
        let handles = (0..threads)
            .map(|_| {
                let (ok, failed, stop, request) =
                    (ok.clone(), failed.clone(), stop.clone(), request.clone());
                thread::spawn(move || {
                    // Bounded: at most 120 s.
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match request() {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failed.lock().unwrap().push(e),
                        }
                        next += every;
                        thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                })
            })
            .collect();
        Load {
            ok,
            failed,
            stop,
            handles,
        }
    }

    /// Stops; returns (succeeded, failures).
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join().unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

fn http_ok(addr: SocketAddr) -> Result<(), String> {
    match try_http_get(addr, "/") {
        Ok((200, body)) if body.contains("name=web") => Ok(()),
        Ok((status, body)) => Err(format!("{status}: {}", body.lines().next().unwrap_or(""))),
        Err(e) => Err(e.to_string()),
    }
}

/// One A query for the zone apex over UDP; any answer with our id counts.
fn dns_ok(addr: SocketAddr) -> Result<(), String> {
    let id: u16 = fastrand_id();
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["mesh", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(&q, addr).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let (n, _) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("no DNS answer: {e}"))?;
    if n >= 2 && buf[..2] == id.to_be_bytes() {
        Ok(())
    } else {
        Err("an answer to another query".into())
    }
}

fn fastrand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u16
}

/// `name{labels} value` of one sample in a /metrics text.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

// ---- the tests ---------------------------------------------------------------------------------

#[test]
fn an_upgrade_under_load_drops_nothing_and_keeps_the_registration() {
    let etcd = Etcd::start();
    let nginx = Nginx::start("web");
    let brokers = [Mosquitto::start("b0"), Mosquitto::start("b1")];
    let ports = Ports::new();
    let broker_addrs: Vec<SocketAddr> = brokers.iter().map(|b| b.addr()).collect();
    let mut old = Daemon::start(&config(&etcd, &ports, nginx.addr(), &broker_addrs, ""));
    old.wait_ready();
    let old_pid = old.pid();
    let watch = Watch::start(&etcd);
    let subs: Vec<Subscriber> = brokers
        .iter()
        .enumerate()
        .map(|(i, b)| Subscriber::start(b.addr(), &format!("sub-{i}")))
        .collect();

    // 300 devices through the node, publishing once a second.
    let ids: Vec<String> = (0..300).map(|i| format!("dev-{i:03}")).collect();
    let mut devices = Devices::start(Devices::connect(ports.mqtt, ids.iter().cloned()));
    assert_eq!(owners(ports.mqtt.port()).get(&old_pid), Some(&300));
    // 200 HTTP requests a second (4 × 50), DNS over UDP (20 a second).
    let web = ports.web;
    let http = Load::start(4, Duration::from_millis(20), move || http_ok(web));
    let dns_addr = ports.dns;
    let dns = Load::start(1, Duration::from_millis(50), move || dns_ok(dns_addr));
    thread::sleep(Duration::from_secs(2));

    let mut new = Upgrader::start(old.config_path());
    new.wait_taken_over();
    let new_pid = new.pid();
    assert!(
        old.is_running(),
        "the old process drains, it has not exited"
    );
    assert!(
        old.log().contains("handed over to the new process"),
        "old log:\n{}",
        old.log_tail(30)
    );
    // The open MQTT connections stay with the old process; new ones go to the new one.
    let by_pid = owners(ports.mqtt.port());
    assert_eq!(by_pid.get(&old_pid), Some(&300), "{by_pid:?}");
    assert_eq!(by_pid.get(&new_pid), None, "{by_pid:?}");
    let late = Devices::connect(ports.mqtt, (0..20).map(|i| format!("late-{i:02}")));
    let by_pid = owners(ports.mqtt.port());
    assert_eq!(
        by_pid.get(&new_pid),
        Some(&20),
        "new connections: {by_pid:?}"
    );
    assert_eq!(by_pid.get(&old_pid), Some(&300), "{by_pid:?}");
    // The admin port is the new process's now, and says so.
    let (_, metrics) = try_http_get(ports.admin, "/metrics").unwrap();
    assert_eq!(
        sample(
            &metrics,
            &format!("routemesh_process_generation{{pid=\"{new_pid}\"}}")
        ),
        Some(2.0),
        "{metrics}"
    );
    assert!(
        new.log()
            .contains(&format!("routemesh{{pid={new_pid} generation=2}}"))
    );
    thread::sleep(Duration::from_secs(3));

    let rounds = devices.stop();
    let (http_ok_count, http_failed) = http.stop();
    let (dns_ok_count, dns_failed) = dns.stop();
    assert!(
        http_failed.is_empty(),
        "{} HTTP requests failed: {:?}",
        http_failed.len(),
        &http_failed[..http_failed.len().min(10)]
    );
    assert!(
        http_ok_count > 500,
        "only {http_ok_count} HTTP requests ran"
    );
    assert!(dns_failed.is_empty(), "DNS queries failed: {dns_failed:?}");
    assert!(dns_ok_count > 50, "only {dns_ok_count} DNS queries ran");
    assert!(
        devices.errors.lock().unwrap().is_empty(),
        "publish errors: {:?}",
        devices.errors.lock().unwrap()
    );
    assert_eq!(
        devices.closed(),
        Vec::<String>::new(),
        "no device was disconnected"
    );
    assert!(rounds >= 5, "{rounds} rounds");
    eprintln!(
        "[upgrade] {http_ok_count} HTTP requests, {dns_ok_count} DNS queries, {} devices × {rounds} messages; {} etcd events watched",
        ids.len(),
        watch
            .text()
            .lines()
            .filter(|l| *l == "PUT" || *l == "DELETE")
            .count()
    );
    // Every message arrived.
    let want: BTreeSet<String> = ids
        .iter()
        .flat_map(|id| (0..rounds).map(move |r| format!("up/{id} {r}")))
        .collect();
    eventually(WAIT, "every MQTT message delivered", || {
        let got: BTreeSet<String> = subs
            .iter()
            .flat_map(|s| s.got.lock().unwrap().clone())
            .collect();
        want.is_subset(&got)
    });

    // The devices leave: the old process has nothing left to drain and exits 0.
    drop(devices);
    drop(late);
    let status = old
        .wait_exit(WAIT)
        .expect("the old process exits once its connections closed");
    assert_eq!(status.code(), Some(0), "old log:\n{}", old.log_tail(30));
    assert!(
        !old.log().contains("revoked"),
        "the old process left the lease alone"
    );

    // No watcher saw the node or its tasks go, and they are there under the new process.
    assert_eq!(node_keys_deleted(&watch), Vec::<String>::new());
    assert!(etcd.get(&format!("{P}/nodes/{NODE}/alive")).is_some());
    let tasks = etcd.get_prefix(&format!("{P}/tasks/"));
    assert_eq!(tasks.len(), 3, "{tasks:?}");
    eventually(WAIT, "the previous process's exit noticed", || {
        new.log().contains("the previous process has exited")
    });
    assert_eq!(new.terminate().code(), Some(0));
    // A real stop revokes: now the keys go.
    eventually(WAIT, "the node's keys gone after a real stop", || {
        etcd.get(&format!("{P}/nodes/{NODE}/alive")).is_none()
    });
    // …and the watch shows such deletes (so it would have shown one during the upgrade).
    eventually(WAIT, "the watch to report the revoke's deletes", || {
        node_keys_deleted(&watch).contains(&format!("{P}/nodes/{NODE}/alive"))
    });
}

#[test]
fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let etcd = Etcd::start();
    let nginx = Nginx::start("web");
    let ports = Ports::new();
    let good = config(&etcd, &ports, nginx.addr(), &[], "");
    let mut old = Daemon::start(&good);
    old.wait_ready();
    let watch = Watch::start(&etcd);
    let web = ports.web;
    let http = Load::start(2, Duration::from_millis(20), move || http_ok(web));

    // A broken config: refused before anything is touched, with the file:line:col.
    old.write_config(&good.replace("protocol = \"http\"", "protocol = \"htp\""));
    let mut new = Upgrader::start(old.config_path());
    let status = new.wait_exit(WAIT);
    assert_ne!(status.code(), Some(0));
    let log = new.log();
    assert!(
        log.contains("routemesh.toml:") && log.contains("protocol"),
        "{log}"
    );

    // A process that got the sockets but cannot get ready (etcd unreachable), killed before
    // it is: it accepted nothing, the old process serves on.
    old.write_config(&good.replace(
        &etcd.endpoint(),
        &format!("http://{}", crate::support::dead_addr()),
    ));
    let mut new = Upgrader::start(old.config_path());
    eventually(WAIT, "the old process to hand out its sockets", || {
        old.log().contains("handing it the sockets")
    });
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        owners(ports.web.port()).get(&new.pid()),
        None,
        "nothing reaches a process that is not ready"
    );
    new.child.kill().unwrap();
    let _ = new.wait_exit(WAIT);
    old.wait_for_log("went away before it was ready", WAIT);
    assert!(old.is_running());
    assert_eq!(old.ready_status(), 200);

    let (ok, failed) = http.stop();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 50);
    assert_eq!(node_keys_deleted(&watch), Vec::<String>::new());

    // And the next good upgrade goes through.
    old.write_config(&good);
    let mut new = Upgrader::start(old.config_path());
    new.wait_taken_over();
    assert_eq!(old.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    assert_eq!(new.terminate().code(), Some(0));
}

#[test]
fn upgrades_chain_and_a_second_one_is_refused_while_the_old_process_drains() {
    let etcd = Etcd::start();
    let nginx = Nginx::start("web");
    let broker = Mosquitto::start("b0");
    let ports = Ports::new();
    let toml = config(
        &etcd,
        &ports,
        nginx.addr(),
        &[broker.addr()],
        "upgrade_drain_timeout = \"3s\"",
    );
    let mut first = Daemon::start(&toml);
    first.wait_ready();
    let watch = Watch::start(&etcd);
    // An admin connection kept open to the first process, and an MQTT device that holds its
    // drain open until the timeout.
    let mut admin = TcpStream::connect(ports.admin).unwrap();
    admin.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert!(keep_alive_get(&mut admin, "/readyz").starts_with("HTTP/1.1 200"));
    let mut device = mqtt_connect(ports.mqtt, "holder").unwrap();
    // An idle keep-alive HTTP connection to the first process.
    let mut idle = TcpStream::connect(ports.web).unwrap();
    idle.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert!(keep_alive_get(&mut idle, "/").contains("name=web"));

    let mut second = Upgrader::start(first.config_path());
    second.wait_taken_over();
    assert!(
        crate::support::net::closed_within(&mut idle, IO_TIMEOUT),
        "an idle keep-alive connection is closed at once by the old process"
    );
    // The old process says it is not ready any more (to whoever still talks to it).
    let answer = keep_alive_get(&mut admin, "/readyz");
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("handed over"),
        "{answer}"
    );
    // A third process while the first one drains: refused, and says why.
    let mut third = Upgrader::start(first.config_path());
    let status = third.wait_exit(WAIT);
    assert_ne!(status.code(), Some(0));
    let log = third.log();
    assert!(
        log.contains("still draining") && log.contains(&first.pid().to_string()),
        "{log}"
    );
    assert!(second.running());

    // The drain timeout ends the first process (its device is cut), exit 0.
    let status = first
        .wait_exit(WAIT)
        .expect("the drain timeout ends the old process");
    assert_eq!(status.code(), Some(0));
    assert!(
        crate::support::net::closed_within(&mut device, IO_TIMEOUT),
        "the held connection is closed at the drain timeout"
    );
    eventually(WAIT, "the first process's exit noticed", || {
        second.log().contains("the previous process has exited")
    });

    // Now the next upgrade goes through, generation 3.
    let mut fourth = Upgrader::start(first.config_path());
    fourth.wait_taken_over();
    assert!(fourth.log().contains("generation=3"));
    assert_eq!(second.wait_exit(WAIT).code(), Some(0));
    http_ok(ports.web).unwrap();
    dns_ok(ports.dns).unwrap();
    mqtt_connect(ports.mqtt, "after").unwrap();
    assert_eq!(node_keys_deleted(&watch), Vec::<String>::new());
    assert_eq!(fourth.terminate().code(), Some(0));
}

/// GET on a kept-alive connection; the response head and body as text.
fn keep_alive_get(s: &mut TcpStream, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The systemd template's two instances, emulated: every start is `run --upgrade=if-running`
/// with `$NOTIFY_SOCKET` set. The first starts afresh and says READY=1; the next takes over
/// and says READY=1 with its MAINPID only once it has, the old one says STOPPING=1; without a
/// daemon, a plain `--upgrade` fails with exit 3 and the reason. The units verify.
#[test]
fn systemd_instances_take_turns_and_notify() {
    let dir = tempdir("rm-notify");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let recv = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let backend = crate::support::TcpBackend::start("echo");
    let listen = free_addr();
    let cfg_dir = tempdir("rm-notify-cfg");
    let config = cfg_dir.path().join("routemesh.toml");
    std::fs::write(
        &config,
        format!(
            "[discovery]\nbackend = \"static\"\n[admin]\nlisten = \"{}\"\nupgrade_socket = \"up.sock\"\n\
             [[listener]]\nname = \"echo\"\nlisten = \"{listen}\"\nprotocol = \"tcp\"\nservice = \"echo\"\n\
             [[task]]\nservice = \"echo\"\naddr = \"{}\"\n",
            free_addr(),
            backend.addr()
        ),
    )
    .unwrap();
    let env = [("NOTIFY_SOCKET", notify_path.to_str().unwrap())];

    let mut none = Upgrader::spawn(&config, "--upgrade", &[]);
    assert_eq!(none.wait_exit(WAIT).code(), Some(3));
    assert!(
        none.log().contains("no routemesh is running"),
        "{}",
        none.log()
    );

    let mut blue = Upgrader::spawn(&config, "--upgrade=if-running", &env);
    assert_eq!(recv(), format!("READY=1\nMAINPID={}", blue.pid()));
    assert!(blue.log().contains("starting afresh"));
    crate::support::echo_roundtrip(listen, b"x").unwrap();

    let mut green = Upgrader::spawn(&config, "--upgrade=if-running", &env);
    assert_eq!(recv(), "STOPPING=1", "the old instance first");
    assert_eq!(recv(), format!("READY=1\nMAINPID={}", green.pid()));
    green.wait_taken_over();
    assert_eq!(
        blue.wait_exit(WAIT).code(),
        Some(0),
        "blue exits 0: inactive, not failed"
    );
    crate::support::echo_roundtrip(listen, b"x").unwrap();
    assert_eq!(green.terminate().code(), Some(0));
    assert_eq!(recv(), "STOPPING=1");

    // The units: the template's instances and the plain unit pass `systemd-analyze verify`.
    let analyze = require_binary(
        "systemd-analyze",
        "run `bash .ci/run` or `apt-get install -y systemd`",
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let template = std::fs::read_to_string(repo.join("routemesh@.service")).unwrap();
    for needle in [
        "Type=notify",
        "ExecStart=/usr/local/bin/routemesh run --upgrade=if-running -c ",
        "RuntimeDirectory=routemesh",
        "RuntimeDirectoryPreserve=yes",
        "RestartPreventExitStatus=2 3",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
    ] {
        assert!(
            template.contains(needle),
            "routemesh@.service lacks {needle:?}"
        );
    }
    let plain = std::fs::read_to_string(repo.join("routemesh.service")).unwrap();
    assert!(plain.contains("RuntimeDirectory=routemesh"));
    let verify = tempdir("rm-verify");
    for (file, text) in [
        ("routemesh@blue.service", &template),
        ("routemesh@green.service", &template),
        ("routemesh.service", &plain),
    ] {
        let copy = verify.path().join(file);
        std::fs::write(&copy, text.replace("/usr/local/bin/routemesh", bin())).unwrap();
        let mut cmd = Command::new(&analyze);
        cmd.arg("verify").arg(&copy);
        let out = crate::support::process::run_bounded(&mut cmd, None, WAIT).unwrap();
        let text = crate::support::output_text(&out);
        assert!(
            out.status.success() && !text.contains(file),
            "systemd-analyze verify {file}:\n{text}"
        );
    }
}

/// What the new config changed: a listener whose address changed is opened afresh, one no
/// longer configured is closed once handed over, one published in etcd is inherited (bound,
/// not `failed: address in use`); connections open on the old ones run on in the old process.
#[test]
fn changed_and_removed_listeners_and_published_ones() {
    let etcd = Etcd::start();
    let backend = crate::support::TcpBackend::start("echo");
    let ports = Ports::new();
    let (a1, a2, b, published) = (free_addr(), free_addr(), free_addr(), free_addr());
    // The old config also has listener b and a second task; the new one has neither.
    let toml = |a: SocketAddr, old: bool| {
        let mut t = format!(
            "[node]\nname = \"{NODE}\"\n[discovery]\nendpoints = [\"{}\"]\nprefix = \"{P}\"\nnode_ttl = \"2s\"\n\
             [admin]\nlisten = \"{}\"\nupgrade_socket = \"upgrade.sock\"\n\
             [[listener]]\nname = \"a\"\nlisten = \"{a}\"\nprotocol = \"tcp\"\nservice = \"echo\"\n\
             [[task]]\nservice = \"echo\"\naddr = \"{}\"\nid = \"echo-1\"\n",
            etcd.endpoint(),
            ports.admin,
            backend.addr()
        );
        if old {
            t.push_str(&format!(
                "[[listener]]\nname = \"b\"\nlisten = \"{b}\"\nprotocol = \"tcp\"\nservice = \"echo\"\n\
                 [[task]]\nservice = \"echo\"\naddr = \"{}\"\nid = \"echo-2\"\n",
                crate::support::dead_addr()
            ));
        }
        t
    };
    etcd.put(
        &format!("{P}/listeners/pub"),
        &format!(r#"{{"listen":"{published}","protocol":"tcp","service":"echo"}}"#),
    );
    let mut old = Daemon::start(&toml(a1, true));
    old.wait_ready();
    let task = |id: &str| format!("{P}/tasks/echo/{id}");
    eventually(WAIT, "both tasks registered", || {
        etcd.get(&task("echo-2")).is_some()
    });
    let watch = Watch::start(&etcd);
    let mut held: Vec<TcpStream> = [a1, b, published]
        .iter()
        .map(|addr| crate::support::connect_and_greet(*addr).unwrap().0)
        .collect();

    old.write_config(&toml(a2, false));
    let mut new = Upgrader::start(old.config_path());
    new.wait_taken_over();
    let states = |routes: serde_json::Value| -> BTreeMap<String, String> {
        routes["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                (
                    l["name"].as_str().unwrap_or("").to_string(),
                    l["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let (_, body) = try_http_get(ports.admin, "/routes").unwrap();
    let got = states(serde_json::from_str(&body).unwrap());
    assert_eq!(got.get("pub").map(String::as_str), Some("bound"), "{got:?}");
    assert_eq!(got.get("a").map(String::as_str), Some("bound"), "{got:?}");
    assert!(!got.contains_key("b"), "{got:?}");
    for addr in [a2, published] {
        let (_open, greeting) = crate::support::connect_and_greet(addr).unwrap();
        assert_eq!(greeting, "echo");
        let by_pid = owners(addr.port());
        assert_eq!(by_pid.get(&new.pid()), Some(&1), "{addr}: {by_pid:?}");
    }
    for addr in [a1, b] {
        eventually(WAIT, &format!("{addr} closed"), || {
            TcpStream::connect(addr).is_err()
        });
    }
    // The task the new config dropped is deleted, and nothing else.
    eventually(WAIT, "the dropped task's key deleted", || {
        etcd.get(&task("echo-2")).is_none()
    });
    assert_eq!(node_keys_deleted(&watch), vec![task("echo-2")]);
    assert!(etcd.get(&task("echo-1")).is_some());
    // The connections open on the old sockets run on in the old process.
    for s in &mut held {
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    }
    assert!(old.is_running());
    held.clear();
    assert_eq!(old.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    assert_eq!(new.terminate().code(), Some(0));
}

/// One echo exchange of `id` through `target`, sent again every 100 ms for up to 2 s.
fn udp_echo(s: &UdpSocket, target: SocketAddr, id: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 16];
    while Instant::now() < deadline {
        if s.send_to(&id.to_be_bytes(), target).is_err() {
            return false;
        }
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            if buf[..n] == id.to_be_bytes() {
                return true;
            }
        }
    }
    false
}

#[test]
fn a_udp_listener_keeps_answering_across_an_upgrade() {
    let etcd = Etcd::start();
    let echo = crate::support::UdpEcho::start(crate::support::UdpMode::Echo);
    let ports = Ports::new();
    let udp = free_addr();
    let toml = format!(
        "[node]\nname = \"{NODE}\"\n[discovery]\nendpoints = [\"{}\"]\nprefix = \"{P}\"\nnode_ttl = \"2s\"\n\
         [admin]\nlisten = \"{}\"\nupgrade_socket = \"upgrade.sock\"\n\
         [[listener]]\nname = \"u\"\nlisten = \"{udp}\"\nprotocol = \"udp\"\nservice = \"echo\"\n\
         [[task]]\nservice = \"echo\"\naddr = \"{}\"\nid = \"echo-1\"\n",
        etcd.endpoint(),
        ports.admin,
        echo.addr()
    );
    let mut old = Daemon::start(&toml);
    old.wait_ready();
    // Clients send all along: every exchange is answered (datagrams in flight during the
    // switch are sent again, as UDP clients do).
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, lost) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4u32)
        .map(|c| {
            let (stop, answered, lost) = (stop.clone(), answered.clone(), lost.clone());
            thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut id = c << 24;
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    if udp_echo(&s, udp, id) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    eventually(WAIT, "clients answered", || {
        answered.load(Ordering::Relaxed) > 20
    });
    let mut new = Upgrader::start(old.config_path());
    new.wait_taken_over();
    assert_eq!(old.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    // The old process is gone: answers now come from the new one, on the same socket.
    let before = answered.load(Ordering::Relaxed);
    eventually(WAIT, "answers after the old process exited", || {
        answered.load(Ordering::Relaxed) > before + 20
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "an exchange went unanswered"
    );
    assert!(!new.log().contains("cannot bind"), "{}", new.log());
    assert_eq!(new.terminate().code(), Some(0));
}

// ---- connections opened right at the hand-over ------------------------------------------------

/// How long a client of the hand-over test waits between connecting and sending its first
/// bytes: 0 to 15 ms in turn, so some are accepted by the old process just before it stops
/// accepting and send their request only after.
fn hesitation(turn: &AtomicUsize) -> Duration {
    Duration::from_millis(5 * (turn.fetch_add(1, Ordering::Relaxed) % 4) as u64)
}

/// A GET with `Connection: close` on a fresh connection, after `wait`: 200 from nginx.
fn hesitant_get<S: Read + Write>(mut s: S, wait: Duration) -> Result<(), String> {
    thread::sleep(wait);
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .and_then(|()| s.flush())
        .map_err(|e| format!("write after {wait:?}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read after {wait:?}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    if text.starts_with("HTTP/1.1 200") && text.contains("name=web") {
        Ok(())
    } else {
        Err(format!(
            "after {wait:?}: {:?}",
            text.lines().next().unwrap_or("nothing")
        ))
    }
}

/// Clients connecting in a tight loop across two hand-overs, each hesitating up to 15 ms
/// before its first bytes (plain HTTP, HTTPS with the handshake after the hesitation, MQTT
/// CONNECT through a Maglev client-id listener): not one is refused, reset or left unanswered —
/// a connection the old process accepted just before it stopped is served to its end.
#[test]
fn connections_opened_at_the_hand_over_are_all_answered() {
    let etcd = Etcd::start();
    let nginx = Nginx::start("web");
    let broker = Mosquitto::start("b0");
    let ports = Ports::new();
    let pki = crate::support::pki::Pki::new();
    let (cert, key) = pki.issue("web", "web.test", &["DNS:web.test"]);
    let https = free_addr();
    let toml = format!(
        "{}\n[[listener]]\nname = \"https\"\nlisten = \"{https}\"\nprotocol = \"http\"\nservice = \"web\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        config(&etcd, &ports, nginx.addr(), &[broker.addr()], ""),
        cert.display(),
        key.display()
    );
    let mut old = Daemon::start(&toml);
    old.wait_ready();

    let web = ports.web;
    let turn = Arc::new(AtomicUsize::new(0));
    let t = turn.clone();
    let plain = Load::start(2, Duration::ZERO, move || {
        let s = TcpStream::connect_timeout(&web, IO_TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        hesitant_get(s, hesitation(&t))
    });
    let tls = Arc::new(crate::support::tls::client_config(
        &pki.ca(),
        &[b"http/1.1"],
    ));
    let t = turn.clone();
    let secure = Load::start(1, Duration::ZERO, move || {
        let tcp = TcpStream::connect_timeout(&https, IO_TIMEOUT).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("web.test").unwrap();
        let conn = tokio_rustls::rustls::ClientConnection::new(tls.clone(), name).unwrap();
        hesitant_get(
            tokio_rustls::rustls::StreamOwned::new(conn, tcp),
            hesitation(&t),
        )
    });
    let mqtt = ports.mqtt;
    let t = turn.clone();
    let devices = Load::start(1, Duration::ZERO, move || {
        thread::sleep(hesitation(&t));
        let n = t.load(Ordering::Relaxed);
        let mut s = mqtt_connect(mqtt, &format!("storm-{n}")).map_err(|e| e.to_string())?;
        // DISCONNECT, then the device goes.
        s.write_all(&DISCONNECT).map_err(|e| e.to_string())
    });

    thread::sleep(Duration::from_secs(1));
    let mut second = Upgrader::start(old.config_path());
    second.wait_taken_over();
    thread::sleep(Duration::from_millis(500));
    let status = old
        .wait_exit(WAIT)
        .expect("the old process drains and exits");
    assert_eq!(status.code(), Some(0), "old log:\n{}", old.log_tail(30));
    eventually(WAIT, "the previous process's exit noticed", || {
        second.log().contains("the previous process has exited")
    });
    let mut third = Upgrader::start(old.config_path());
    third.wait_taken_over();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(second.wait_exit(WAIT).code(), Some(0), "{}", second.log());

    let (plain_ok, plain_failed) = plain.stop();
    let (secure_ok, secure_failed) = secure.stop();
    let (devices_ok, devices_failed) = devices.stop();
    eprintln!(
        "[hand-over] {plain_ok} HTTP, {secure_ok} HTTPS, {devices_ok} MQTT connections across two upgrades"
    );
    for (kind, failed) in [
        ("HTTP", &plain_failed),
        ("HTTPS", &secure_failed),
        ("MQTT", &devices_failed),
    ] {
        assert!(
            failed.is_empty(),
            "{} {kind} connections failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(10)]
        );
    }
    assert!(plain_ok > 200 && secure_ok > 50 && devices_ok > 50);
    assert_eq!(third.terminate().code(), Some(0));
}
