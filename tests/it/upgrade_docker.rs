//! The Docker upgrade recipe of the README ("Upgrades without a gap"), with routemesh's image
//! (deploy/Dockerfile's runtime stage, see tests/docker/engine.rs) on the real engine: a new
//! container with the same flags, the host network and the same `/run/routemesh` volume takes
//! over from the running one, which drains its open connection and exits 0 by itself; no
//! connection attempt fails meanwhile and no etcd watcher sees the node's keys deleted.
//! With `[docker]`, the new process's first write comes before its engine listing: the
//! labelled containers' tasks the old process registered are not deleted on the way.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::docker::{
    DAEMON_RUN_FLAGS, DOCKER_TIMEOUT, build_base, build_daemon, docker, docker_logs, docker_raw,
    images_lock, nginx_image, require_engine, target_dir,
};
use crate::support::etcd::parse_watch_deletes;
use crate::support::http::try_get as try_http_get;
use crate::support::process::unique_name;
use crate::support::tempdir;
use crate::support::{Daemon, Etcd, Etcdctl, TcpBackend, echo_roundtrip, eventually, free_addr};

const P: &str = "/routemesh";
const WAIT: Duration = Duration::from_secs(30);

fn image() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    require_engine();
    ID.get_or_init(|| {
        let _lock = images_lock();
        let dir = target_dir();
        build_base(&dir);
        build_daemon(&dir)
    })
}

/// Containers and the volume of one test, removed even when it fails.
struct Guard {
    containers: Mutex<Vec<String>>,
    volume: String,
}

impl Guard {
    fn logs(&self, c: &str) -> String {
        docker_logs(c, None)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let names = self.containers.lock().unwrap().clone();
        if thread::panicking() {
            for c in &names {
                eprintln!("---- {c} ----\n{}", self.logs(c));
            }
        }
        if !names.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(names.iter().map(String::as_str));
            let _ = docker_raw(&args, DOCKER_TIMEOUT);
        }
        let _ = docker_raw(&["volume", "rm", "-f", &self.volume], DOCKER_TIMEOUT);
    }
}

#[test]
fn a_new_container_on_the_same_volume_takes_over_and_the_old_one_exits_by_itself() {
    let image = image();
    let etcd = Etcd::start();
    let backend = TcpBackend::start("echo");
    let (admin, listen) = (free_addr(), free_addr());
    let name = unique_name("rmup");
    let dir = tempdir("rmup");
    let config = dir.path().join("routemesh.toml");
    std::fs::write(
        &config,
        format!(
            r#"[node]
name = "{name}"
[discovery]
endpoints = ["{etcd}"]
prefix = "{P}"
node_ttl = "2s"
[admin]
listen = "{admin}"
[[listener]]
name = "echo"
listen = "{listen}"
protocol = "tcp"
service = "echo"
[[task]]
service = "echo"
addr = "{addr}"
"#,
            etcd = etcd.endpoint(),
            addr = backend.addr(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let guard = Guard {
        containers: Mutex::new(Vec::new()),
        volume: format!("{name}-run"),
    };
    docker(&[
        "volume",
        "create",
        "--label",
        "routemesh-test=1",
        &guard.volume,
    ]);
    // The README's flags, every container alike.
    let mount_config = format!("{}:/etc/routemesh/routemesh.toml:ro", config.display());
    let mount_run = format!("{}:/run/routemesh", guard.volume);
    let run = |cname: &str| {
        guard.containers.lock().unwrap().push(cname.to_string());
        let mut args = vec!["run", "-d", "--name", cname, "--label", "routemesh-test=1"];
        args.extend(["--restart", "unless-stopped"]);
        args.extend_from_slice(DAEMON_RUN_FLAGS);
        args.extend(["-v", &mount_config, "-v", &mount_run, image]);
        docker(&args);
    };
    let (c1, c2) = (format!("{name}-1"), format!("{name}-2"));
    run(&c1);
    eventually(WAIT, "the first container ready", || {
        try_http_get(admin, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    let alive = format!("{P}/nodes/{name}/alive");
    eventually(WAIT, "the node registered", || etcd.get(&alive).is_some());
    let start_rev = etcd.revision();

    // An open connection through the first container, and connections opened all along.
    let mut held = TcpStream::connect(listen).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 5];
    held.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"echo\n");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let load = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            match echo_roundtrip(listen, b"ping") {
                Ok((_, b)) if b == b"ping" => {
                    o.fetch_add(1, Ordering::Relaxed);
                }
                Ok((g, b)) => f.lock().unwrap().push(format!("{g:?} {b:?}")),
                Err(e) => f.lock().unwrap().push(e.to_string()),
            }
            thread::sleep(Duration::from_millis(10));
        }
    });

    // The recipe.
    docker(&["update", "--restart", "no", &c1]);
    run(&c2);
    eventually(WAIT, "the second container to take over", || {
        guard.logs(&c2).contains("upgrade done")
    });
    let running = |c: &str| docker(&["inspect", "--format", "{{.State.Running}}", c]) == "true";
    assert!(
        running(&c1),
        "the first container drains its open connection"
    );
    // The held connection still works through the first container.
    held.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let failures = failed.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "connections failed during the upgrade: {failures:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);

    // The last connection closes: the first container exits 0 by itself and stays down.
    drop(held);
    let code = docker_raw(&["wait", &c1], Duration::from_secs(60));
    assert_eq!(
        String::from_utf8_lossy(&code.stdout).trim(),
        "0",
        "{}",
        guard.logs(&c1)
    );
    thread::sleep(Duration::from_secs(1));
    assert!(!running(&c1), "not restarted");
    assert!(running(&c2));
    assert_eq!(
        try_http_get(admin, "/readyz").map(|(s, _)| s).ok(),
        Some(200)
    );
    assert!(guard.logs(&c2).contains("generation=2"));

    // No delete of the node's keys since before the upgrade.
    let deletes = deletes_since(&etcd, start_rev);
    assert!(
        deletes.is_empty(),
        "keys deleted during the upgrade: {deletes:?}"
    );
    assert!(etcd.get(&alive).is_some());
}

/// Keys deleted at or after `rev` (an `etcdctl watch --rev` replays the history; it is
/// stopped once it has printed what happened so far).
fn deletes_since(etcd: &Etcd, rev: i64) -> Vec<String> {
    let bin =
        crate::support::process::require_binary("etcdctl", crate::support::etcd::ETCD_SETUP_HINT);
    let mut child = std::process::Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .args(["watch", "--prefix", P, &format!("--rev={rev}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // The replay arrives at once; a marker put after it tells that everything before is in.
    let marker = format!("{P}/replay-marker");
    etcd.put(&marker, "1");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.contains("replay-marker") {
                break;
            }
        }
        text
    });
    let deadline = Instant::now() + WAIT;
    while !reader.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().unwrap();
    assert!(
        text.contains("replay-marker"),
        "etcd history not replayed: {text}"
    );
    parse_watch_deletes(&text)
}

/// The daemon on the host with `[docker]`, a labelled container registered under its lease:
/// an upgrade keeps the container's task (the new process lists the engine before it deletes
/// anything of the old one's), and the container's end still takes it out.
#[test]
fn container_tasks_survive_an_upgrade() {
    let nginx = nginx_image();
    let etcd = Etcd::start();
    let name = unique_name("rmupd");
    let guard = Guard {
        containers: Mutex::new(Vec::new()),
        volume: format!("{name}-unused"),
    };
    let web = format!("{name}-web");
    guard.containers.lock().unwrap().push(web.clone());
    let service = format!("label=routemesh.service={name}");
    docker(&[
        "run",
        "-d",
        "--name",
        &web,
        "--label",
        "routemesh-test=1",
        "--label",
        &service["label=".len()..],
        "--label",
        "routemesh.port=8080",
        nginx,
    ]);
    let mut old = Daemon::start(&format!(
        "[node]\nname = \"{name}\"\n[discovery]\nendpoints = [\"{}\"]\nprefix = \"{P}\"\nnode_ttl = \"2s\"\n\
         [admin]\nlisten = \"{}\"\nupgrade_socket = \"upgrade.sock\"\n\
         [docker]\nenabled = true\nsocket = \"/var/run/docker.sock\"\n",
        etcd.endpoint(),
        free_addr()
    ));
    old.wait_ready();
    let task = format!("{P}/tasks/{name}/{web}");
    eventually(WAIT, "the container's task registered", || {
        etcd.get(&task).is_some()
    });
    let rev = etcd.revision();

    let log = tempdir("rmupd-new");
    let log_path = log.path().join("new.log");
    let mut new = std::process::Command::new(crate::support::bin())
        .args(["run", "--upgrade", "-c"])
        .arg(old.config_path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let new_pid = new.id();
    let new = Kill(&mut new);
    let text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    eventually(WAIT, "the takeover", || text().contains("upgrade done"));
    eventually(WAIT, "the new process listing the engine", || {
        text().contains("docker engine connected")
    });
    assert_eq!(old.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    // Past a write of the new process's own registration.
    eventually(WAIT, "the new process registered", || {
        text().contains("node registered in etcd")
    });
    assert!(
        etcd.get(&task).is_some(),
        "the container's task is still there"
    );
    assert_eq!(deletes_since(&etcd, rev), Vec::<String>::new());

    docker(&["stop", "-t", "0", &web]);
    eventually(WAIT, "the stopped container's task gone", || {
        etcd.get(&task).is_none()
    });
    let _ = crate::support::process::send_signal(new_pid, libc::SIGTERM);
    drop(new);
}
