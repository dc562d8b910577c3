//! Docker integration against the real local engine (`[docker]`, src/docker/).
//!
//! The deployment path for real: a Debian base image made here (debootstrap + `docker
//! import`, no registry), routemesh's image built from deploy/Dockerfile's runtime stage with
//! the binary cargo just built, run with `--network host` as a non-root user with only
//! CAP_NET_BIND_SERVICE, its TOML mounted read-only and the engine socket mounted; nginx
//! replicas (Debian's nginx-light on the same base) run as labelled containers on a bridge
//! network the test creates. Traffic goes only to loopback and to those containers.
//!
//! Images are built once per machine and reused (an exclusive file lock serialises the
//! builds of parallel test processes); containers and networks carry the test's pid and are
//! removed by a guard even when a test fails. Every test here needs the engine: when
//! `docker info` fails they fail with that message, never skip.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::docker::{
    DAEMON_RUN_FLAGS, DOCKER_TIMEOUT, NGINX_IMAGE, build_base, build_daemon, build_nginx, docker,
    docker_logs, docker_raw, images_lock, prebuilt_dockerfile, require_engine, target_dir,
};
use crate::support::http::try_get;
use crate::support::load::{Load, Sample};
use crate::support::process::unique_name;
use crate::support::{
    Config, Daemon, Etcd, Etcdctl, Listener, cli, eventually, eventually_value, free_addr,
    output_text, tempdir,
};

/// Builds what is missing (once per test process; across processes under a file lock) and
/// returns routemesh's image id.
fn images() -> &'static str {
    static IMAGES: OnceLock<String> = OnceLock::new();
    require_engine();
    IMAGES.get_or_init(|| {
        let dir = target_dir();
        let _lock = images_lock();
        let started = Instant::now();
        build_base(&dir);
        build_nginx();
        let id = build_daemon(&dir);
        eprintln!(
            "[docker] images ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        id
    })
}

// ---------------------------------------------------------------------------------------
// A lab: etcd on loopback, a bridge network, the containerized daemon, workload containers
// ---------------------------------------------------------------------------------------

/// Removes every container and the network it created, even when the test panics.
struct Lab {
    name: String,
    network: String,
    prefix: String,
    etcd: Etcd,
    containers: Mutex<Vec<String>>,
    daemon: Option<String>,
    proxy: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// Creates the network; with `containerized`, starts routemesh's image on the host
    /// network and waits until it is ready.
    fn new(containerized: bool) -> Lab {
        let image = images();
        let name = unique_name("rmdt");
        let network = format!("{name}-net");
        docker(&["network", "create", "--label", "routemesh-test=1", &network]);
        let etcd = Etcd::start();
        let mut lab = Lab {
            prefix: format!("/{name}"),
            network,
            etcd,
            containers: Mutex::new(Vec::new()),
            daemon: None,
            proxy: free_addr(),
            admin: free_addr(),
            _dir: tempdir("rmdt"),
            name,
        };
        if containerized {
            lab.start_daemon(image);
        }
        lab
    }

    /// The daemon's config: its node named after the lab, the `web` http listener for the
    /// lab's service, `[docker]` on the engine at `socket`.
    fn config(&self, socket: &str) -> Config {
        Config::etcd(&[self.etcd.endpoint()])
            .node(&self.name)
            .set("discovery.prefix", self.prefix.as_str())
            .set("discovery.node_ttl", "3s")
            .set("admin.listen", self.admin.to_string())
            .listener(Listener::http(self.proxy, &self.name).name("web"))
            .set(&format!("service.{}.connect_timeout", self.name), "500ms")
            .set("docker.enabled", true)
            .set("docker.socket", socket)
            .set("docker.reconcile_interval", "30s")
    }

    fn start_daemon(&mut self, image: &str) {
        let path = self._dir.path().join("routemesh.toml");
        std::fs::write(&path, self.config("/var/run/docker.sock").to_toml()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let sock_gid = std::fs::metadata("/var/run/docker.sock")
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
            .expect("/var/run/docker.sock exists");
        let cname = format!("{}-routemesh", self.name);
        let (gid, mount) = (
            sock_gid.to_string(),
            format!("{}:/etc/routemesh/routemesh.toml:ro", path.display()),
        );
        let mut args = vec!["run", "-d", "--name", &cname, "--label", "routemesh-test=1"];
        args.extend_from_slice(DAEMON_RUN_FLAGS);
        args.extend([
            "--group-add",
            &gid,
            "-v",
            &mount,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock:ro",
            image,
        ]);
        docker(&args);
        self.daemon = Some(cname);
        let admin = self.admin;
        eventually(Duration::from_secs(20), "routemesh container ready", || {
            try_get(admin, "/readyz").is_ok_and(|(s, _)| s == 200)
        });
    }

    fn daemon_logs(&self) -> String {
        let Some(d) = &self.daemon else {
            return String::new();
        };
        docker_logs(d, Some(200))
    }

    /// Starts an nginx replica labelled for the lab's service on the lab network. (Every
    /// lab's daemon sees every labelled container of the engine, as a node does: the
    /// service is named after the lab so that parallel tests do not route to each other.)
    fn start_web(&self, suffix: &str, extra: &[&str]) -> String {
        let cname = format!("{}-{suffix}", self.name);
        let service_label = format!("routemesh.service={}", self.name);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &cname,
            "--hostname",
            &cname,
            "--network",
            &self.network,
            "--label",
            "routemesh-test=1",
            "--label",
            &service_label,
            "--label",
            "routemesh.port=8080",
            "-e",
            "STOP_DELAY=2",
        ];
        args.extend_from_slice(extra);
        args.push(NGINX_IMAGE);
        self.containers.lock().unwrap().push(cname.clone());
        docker(&args);
        cname
    }

    /// [`Lab::start_web`], then waits until its nginx answers on the lab network (a container
    /// without HEALTHCHECK is registered on `start`, before its process listens; a test
    /// request in that gap would get it ejected for a while).
    fn web(&self, suffix: &str, extra: &[&str]) -> String {
        let cname = self.start_web(suffix, extra);
        let ip = self.ip_of(&cname);
        let addr: SocketAddr = format!("{ip}:8080")
            .parse()
            .unwrap_or_else(|_| panic!("{cname} has no IP on {}: {ip:?}", self.network));
        eventually(Duration::from_secs(10), &format!("{cname} serving"), || {
            try_get(addr, "/").is_ok_and(|(s, _)| s == 200)
        });
        cname
    }

    /// Two replicas, `a` and `b`, both routable.
    fn two_routable_replicas(&self) -> (String, String) {
        let a = self.web("a", &[]);
        let b = self.web("b", &[]);
        self.wait_routable(&[&a, &b], Duration::from_secs(10), "both replicas routable");
        (a, b)
    }

    /// The IP address of `container` on the lab network.
    fn ip_of(&self, container: &str) -> String {
        docker(&[
            "inspect",
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.network
            ),
            container,
        ])
    }

    /// `routemesh service ARGS… --json` against the lab's etcd and prefix, parsed.
    fn service_json(&self, args: &[&str]) -> Value {
        let endpoint = self.etcd.endpoint();
        let mut all = vec!["service"];
        all.extend_from_slice(args);
        all.extend(["--etcd", &endpoint, "--prefix", &self.prefix, "--json"]);
        let out = cli(&all);
        assert!(out.status.success(), "{}", output_text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Ten GETs through the proxy, each answered 200 by replica `only`.
    fn assert_all_answered_by(&self, only: &str) {
        for _ in 0..10 {
            let (status, body) = self.get().expect("GET through routemesh");
            assert_eq!((status, body.trim()), (200, only));
        }
    }

    /// The weight of task `id` is 0 (registered, not routable).
    fn weight_zero(&self, id: &str) -> bool {
        self.web_tasks().get(id).is_some_and(|(_, w)| *w == 0)
    }

    fn routes(&self) -> Value {
        let (status, body) = try_get(self.admin, "/routes").unwrap_or((0, String::new()));
        if status != 200 {
            return Value::Null;
        }
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// This node's view of the lab's service: task id → (state, weight).
    fn web_tasks(&self) -> BTreeMap<String, (String, u64)> {
        let r = self.routes();
        let mut out = BTreeMap::new();
        for s in r["services"].as_array().into_iter().flatten() {
            if s["name"] != self.name.as_str() {
                continue;
            }
            for t in s["tasks"].as_array().into_iter().flatten() {
                out.insert(
                    t["id"].as_str().unwrap_or_default().to_string(),
                    (
                        t["state"].as_str().unwrap_or_default().to_string(),
                        t["weight"].as_u64().unwrap_or(0),
                    ),
                );
            }
        }
        out
    }

    fn routable(&self) -> Vec<String> {
        self.web_tasks()
            .into_iter()
            .filter(|(_, (state, w))| state == "healthy" && *w > 0)
            .map(|(id, _)| id)
            .collect()
    }

    fn wait_routable(&self, want: &[&str], within: Duration, what: &str) {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        eventually(within, what, || self.routable() == want);
    }

    fn get(&self) -> io::Result<(u16, String)> {
        try_get(self.proxy, "/")
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = try_get(self.admin, "/metrics").ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn running(&self, container: &str) -> bool {
        docker_raw(
            &["inspect", "--format", "{{.State.Running}}", container],
            DOCKER_TIMEOUT,
        )
        .stdout
        .starts_with(b"true")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- routemesh container log ---\n{}", self.daemon_logs());
        }
        let mut names: Vec<String> = self.containers.lock().unwrap().clone();
        names.extend(self.daemon.clone());
        if !names.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(names.iter().map(String::as_str));
            let _ = docker_raw(&args, DOCKER_TIMEOUT);
        }
        let _ = docker_raw(&["network", "rm", &self.network], DOCKER_TIMEOUT);
    }
}

/// Requests through the proxy every ~5 ms on another thread (at most 60 s).
fn load(proxy: SocketAddr) -> Load {
    Load::start(
        &[proxy],
        Duration::from_millis(5),
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
}

/// How many requests of `samples` were answered.
fn answered(samples: &[Sample]) -> usize {
    samples.iter().filter(|s| s.outcome.is_ok()).count()
}

/// The `retry_in` of every log line with `message` (text format: `retry_in=196.2ms`).
fn retry_delays(log: &str, message: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let value = l.split("retry_in=").nth(1)?.split_whitespace().next()?;
            let unit_at = value.find(|c: char| !c.is_ascii_digit() && c != '.')?;
            let (number, unit) = value.split_at(unit_at);
            let number: f64 = number.parse().ok()?;
            let secs = match unit {
                "s" => number,
                "ms" => number / 1e3,
                "µs" => number / 1e6,
                "ns" => number / 1e9,
                _ => return None,
            };
            Some(Duration::from_secs_f64(secs))
        })
        .collect()
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn prebuilt_dockerfile_keeps_the_runtime_stage() {
    let deploy =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .unwrap();
    let t = prebuilt_dockerfile(&deploy);
    assert!(t.contains("FROM scratch AS build\nLABEL routemesh-test=1\nCOPY routemesh"));
    assert!(!t.contains("cargo build"), "{t}");
    let runtime = &deploy[deploy.find("FROM ${RUNTIME_IMAGE}").expect("runtime stage")..];
    assert!(t.ends_with(runtime) || t.trim_end().ends_with(runtime.trim_end()));
    assert!(t.starts_with("# routemesh container image"));
}

/// The deployment: routemesh's image on the host network, non-root, discovering two
/// labelled nginx replicas; both answer through the published port; a badly labelled
/// container is skipped with a warning naming it.
#[test]
fn containerized_routemesh_routes_to_labelled_containers() {
    let lab = Lab::new(true);
    let daemon = lab.daemon.clone().unwrap();
    // Non-root, only NET_BIND_SERVICE in the bounding set, read-only root.
    assert_eq!(docker(&["exec", &daemon, "id", "-u"]), "10001");
    let status = docker(&["exec", &daemon, "cat", "/proc/1/status"]);
    let bnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .expect("CapBnd line");
    assert!(bnd.ends_with("0000000000000400"), "{bnd}");
    assert_eq!(
        docker(&[
            "inspect",
            "--format",
            "{{.HostConfig.NetworkMode}}",
            &daemon
        ]),
        "host"
    );
    assert_eq!(lab.metric("routemesh_docker_up"), Some(1.0));

    let a = lab.web("a", &[]);
    let b = lab.web("b", &[]);
    let bad = format!("{}-bad", lab.name);
    lab.containers.lock().unwrap().push(bad.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &bad,
        "--network",
        &lab.network,
        "--label",
        "routemesh-test=1",
        "--label",
        &format!("routemesh.service={}", lab.name),
        "--label",
        "routemesh.port=http",
        NGINX_IMAGE,
    ]);
    lab.wait_routable(&[&a, &b], Duration::from_secs(10), "both replicas routable");
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        let (status, body) = lab.get().expect("GET through routemesh");
        assert_eq!(status, 200, "{body}");
        *seen.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec![a.clone(), b.clone()],
        "answers: {seen:?}"
    );
    // The task record: container IP on the lab network, this node, weight 1.
    let rows = lab.service_json(&["ps", &lab.name]);
    let ip_a = lab.ip_of(&a);
    let row_a = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == a.as_str())
        .unwrap_or_else(|| panic!("{a} in service ps: {rows}"));
    assert_eq!(row_a["addr"], format!("{ip_a}:8080"));
    assert_eq!(row_a["node"], lab.name.as_str());
    assert_eq!(row_a["weight"], 1);
    assert!(!lab.web_tasks().contains_key(&bad));
    eventually(
        Duration::from_secs(5),
        "a warning naming the badly labelled container",
        || {
            let logs = lab.daemon_logs();
            logs.contains("labelled container skipped")
                && logs.contains(&bad)
                && logs.contains("routemesh.port")
        },
    );
}

/// `docker stop`: Docker sends the stop signal (a `kill` event) long before `die`; the
/// task leaves rotation while the process still serves, and a steady load through the
/// proxy sees no failure while the second replica runs.
#[test]
fn docker_stop_leaves_rotation_before_the_process_exits() {
    let lab = Lab::new(true);
    let (a, b) = lab.two_routable_replicas();
    let load = load(lab.proxy);
    eventually(Duration::from_secs(5), "load running", || {
        answered(&load.samples()) > 20
    });

    let stopper = {
        let a = a.clone();
        thread::spawn(move || docker(&["stop", "-t", "10", &a]))
    };
    // The entrypoint keeps nginx serving 2 s after SIGTERM: the task must be out while the
    // container is still running.
    let t0 = Instant::now();
    eventually(
        Duration::from_secs(2),
        "stopped replica out of rotation",
        || !lab.web_tasks().contains_key(&a),
    );
    let out_after = t0.elapsed();
    assert!(
        lab.running(&a),
        "the replica had already exited when its task left rotation ({out_after:?})"
    );
    stopper.join().expect("docker stop");
    assert!(!lab.running(&a));
    let before = answered(&load.samples());
    eventually(Duration::from_secs(5), "more load after the stop", || {
        answered(&load.samples()) > before + 20
    });
    let samples = load.stop();
    let ok = answered(&samples);
    let failed: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    let mut seen = BTreeMap::new();
    for body in samples.iter().filter_map(|s| s.outcome.as_ref().ok()) {
        *seen.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    assert!(seen.contains_key(&a) && seen.contains_key(&b), "{seen:?}");
    eprintln!("out of rotation {out_after:?} after docker stop; {ok} requests, 0 failed");
}

/// `docker kill`: out at once; the remaining replica takes every request.
/// `routemesh.publish` on a container: the port is published on every node (here the one)
/// while the container runs, and goes away when it stops.
#[test]
fn a_container_publishes_its_own_port() {
    let lab = Lab::new(true);
    let port = free_addr().port();
    let label = format!("routemesh.publish={port}/http");
    let c = lab.web("pub", &["--label", &label]);
    let published = SocketAddr::from(([127, 0, 0, 1], port));
    eventually(
        Duration::from_secs(10),
        "the container's port published",
        || try_get(published, "/").is_ok_and(|(s, body)| s == 200 && body.trim() == c),
    );
    let name = format!("{}-{port}-http", lab.name);
    let alive = lab
        .etcd
        .get(&format!("{}/nodes/{}/alive", lab.prefix, lab.name))
        .unwrap();
    let alive: Value = serde_json::from_str(&alive).unwrap();
    let mine = crate::support::daemon::listener_named(&alive, &name);
    assert_eq!(mine["state"], "bound");
    assert_eq!(mine["source"], "tasks");
    docker(&["stop", &c]);
    eventually(
        Duration::from_secs(10),
        "the port goes with the container",
        || {
            matches!(
                std::net::TcpStream::connect_timeout(&published, Duration::from_secs(1)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
            )
        },
    );
}

#[test]
fn docker_kill_takes_the_task_out_at_once() {
    let lab = Lab::new(true);
    let (a, b) = lab.two_routable_replicas();
    let t0 = Instant::now();
    docker(&["kill", &a]);
    eventually(
        Duration::from_secs(1),
        "killed replica out within 1 s",
        || !lab.web_tasks().contains_key(&a),
    );
    eprintln!("out {:?} after docker kill returned", t0.elapsed());
    lab.assert_all_answered_by(&b);
}

/// HEALTHCHECK: registered but not routable while `starting` or `unhealthy` (weight 0,
/// visible in `service ls` / `service ps`), routable while `healthy`.
#[test]
fn failing_healthcheck_takes_the_task_out() {
    let lab = Lab::new(true);
    let b = lab.web("b", &[]);
    let h = lab.web(
        "h",
        &[
            "--health-cmd",
            "test -f /tmp/healthy",
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
            "--health-start-period",
            "60s",
        ],
    );
    // Starting: registered with weight 0.
    eventually(
        Duration::from_secs(10),
        "starting container registered, not routable",
        || lab.weight_zero(&h),
    );
    lab.wait_routable(
        &[&b],
        Duration::from_secs(5),
        "only the plain replica routable",
    );
    let ls = lab.service_json(&["ls"]);
    let mine = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == lab.name.as_str())
        .unwrap_or_else(|| panic!("{} in service ls: {ls}", lab.name));
    assert_eq!(mine["tasks"], 2, "{ls}");
    assert_eq!(mine["routable"], 1, "{ls}");

    docker(&["exec", &h, "touch", "/tmp/healthy"]);
    lab.wait_routable(
        &[&b, &h],
        Duration::from_secs(10),
        "healthy container routable",
    );

    docker(&["exec", &h, "rm", "/tmp/healthy"]);
    eventually(
        Duration::from_secs(10),
        "unhealthy container out of rotation",
        || lab.weight_zero(&h),
    );
    let rows = lab.service_json(&["ps", &lab.name]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == h.as_str())
        .unwrap();
    assert_eq!(row["weight"], 0, "{rows}");
    lab.assert_all_answered_by(&b);
}

/// A new labelled container is routable within 1 s of the engine's `start` event.
#[test]
fn a_new_container_is_in_within_a_second_of_its_start_event() {
    let lab = Lab::new(true);
    let since = format!("{:.3}", now_ns() as f64 / 1e9 - 1.0);
    let c = lab.start_web("new", &[]);
    let seen_at = eventually_value(
        Duration::from_secs(10),
        &format!("{c} to become routable"),
        || {
            lab.web_tasks()
                .get(&c)
                .is_some_and(|(_, w)| *w > 0)
                .then(now_ns)
        },
    );
    let until = format!("{:.3}", now_ns() as f64 / 1e9 + 0.1);
    let started = docker(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        &format!("container={c}"),
        "--filter",
        "event=start",
        "--format",
        "{{.TimeNano}}",
    ]);
    let start_ns: i128 = started
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no start event for {c}: {started:?}"));
    let delay = Duration::from_nanos((seen_at - start_ns).max(0) as u64);
    eprintln!("routable {delay:?} after its start event");
    assert!(delay < Duration::from_secs(1), "took {delay:?}");
    // Registered on `start`; nginx answers a moment later (without a HEALTHCHECK the
    // daemon cannot know when: docs/docker.md recommends one).
    eventually(Duration::from_secs(10), "the new replica answers", || {
        lab.get()
            .is_ok_and(|(status, body)| status == 200 && body.trim() == c)
    });
}

/// A unix-socket relay to the engine that the test can cut and restore: the daemon's view
/// of an engine that goes away and comes back.
struct EngineRelay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl EngineRelay {
    fn start(path: &Path) -> EngineRelay {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind relay socket");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let accept = thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let mut held = c.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(engine.try_clone().unwrap());
                drop(held);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                    (engine, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        EngineRelay {
            path: path.to_path_buf(),
            stop,
            conns,
            accept: Some(accept),
        }
    }

    /// Refuses new connections and cuts the open ones (the event stream among them).
    fn cut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.path); // wake the accept loop
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for EngineRelay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Engine unreachable: the daemon keeps proxying to the tasks it knows, exports
/// `routemesh_docker_up 0`, logs one warning per backoff step, and reconciles when the
/// engine returns (a container stopped meanwhile leaves, a new one joins).
#[test]
fn engine_outage_keeps_proxying_and_reconciles_on_return() {
    let lab = Lab::new(false);
    let dir = tempdir("rmdt-relay");
    let sock = dir.path().join("engine.sock");
    let mut relay = EngineRelay::start(&sock);
    // The daemon on the host this time, so the test can own the socket it talks to.
    let d = Daemon::start(&lab.config(sock.to_str().unwrap()).to_toml());
    let (a, b) = lab.two_routable_replicas();
    assert_eq!(lab.metric("routemesh_docker_up"), Some(1.0));

    relay.cut();
    eventually(Duration::from_secs(5), "routemesh_docker_up 0", || {
        lab.metric("routemesh_docker_up") == Some(0.0)
    });
    let cut_at = Instant::now();
    // Still proxying, both tasks kept.
    for _ in 0..6 {
        let (status, _) = lab.get().expect("GET during the engine outage");
        assert_eq!(status, 200);
    }
    assert_eq!(lab.routable(), {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });
    // Changes while the engine cannot be heard.
    docker(&["stop", "-t", "0", &a]);
    let c = lab.web("c", &[]);
    // One warning per backoff step (from 100 ms, doubling, ±20 % jitter): each announces a
    // wait at least 4/3 of the one before, so the log does not fill up while the engine is
    // away. Four steps take about 0.7 s.
    let delays = eventually_value(Duration::from_secs(10), "four backoff warnings", || {
        let delays = retry_delays(&d.log(), "docker engine unreachable");
        (delays.len() >= 4).then_some(delays)
    });
    for step in delays.windows(2) {
        assert!(
            step[1].as_secs_f64() >= step[0].as_secs_f64() * 1.3,
            "one warning per backoff step, each waiting longer: {delays:?} in {:?}:\n{}",
            cut_at.elapsed(),
            d.log_tail(30)
        );
    }

    let _relay = EngineRelay::start(&sock);
    lab.wait_routable(
        &[&b, &c],
        Duration::from_secs(10),
        "reconciled after the engine returned",
    );
    assert_eq!(lab.metric("routemesh_docker_up"), Some(1.0));
    drop(d);
}
