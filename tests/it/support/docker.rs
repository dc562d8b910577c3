//! The local Docker engine for integration tests, shared by the `docker` and `docker_swarm`
//! modules: `docker` CLI wrappers with bounded waits,
//! the engine check, and the locally built test images (no registry here: a debootstrapped
//! Debian base, `docker import`ed, the nginx workload built on it, and routemesh's own image
//! from deploy/Dockerfile's runtime stage). Images are built at most once per machine;
//! [`images_lock`] serialises builds across test processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::process::{output_text, run_bounded, which};

pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
pub const BASE_IMAGE: &str = "routemesh-test-base:bookworm";
pub const NGINX_IMAGE: &str = "routemesh-test-nginx:bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";

// ---------------------------------------------------------------------------------------
// The engine and images
// ---------------------------------------------------------------------------------------

pub fn docker_raw(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run_bounded(&mut cmd, None, timeout).unwrap_or_else(|e| {
        panic!("`docker {}` could not run: {e}", args.join(" "));
    })
}

/// Runs `docker ARGS`, panicking with its output on failure; returns trimmed stdout.
pub fn docker(args: &[&str]) -> String {
    let out = docker_raw(args, DOCKER_TIMEOUT);
    assert!(
        out.status.success(),
        "`docker {}` failed:\n{}",
        args.join(" "),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The README's flags for routemesh's container: the host network, no capability but
/// binding low ports, a read-only root.
pub const DAEMON_RUN_FLAGS: &[&str] = &[
    "--network",
    "host",
    "--cap-drop",
    "ALL",
    "--cap-add",
    "NET_BIND_SERVICE",
    "--read-only",
];

/// What `container` wrote (stdout, then stderr); its last `tail` lines only when given.
pub fn docker_logs(container: &str, tail: Option<usize>) -> String {
    let tail = tail.map(|n| n.to_string());
    let mut args = vec!["logs"];
    if let Some(n) = &tail {
        args.extend(["--tail", n]);
    }
    args.push(container);
    let out = docker_raw(&args, DOCKER_TIMEOUT);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics with a clear message when the engine is not reachable.
pub fn require_engine() {
    static CHECKED: OnceLock<Result<String, String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        let mut cmd = Command::new("docker");
        cmd.args(["info", "--format", "{{.ServerVersion}}"]);
        match run_bounded(&mut cmd, None, Duration::from_secs(30)) {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().into()),
            Ok(o) => Err(output_text(&o)),
            Err(e) => Err(e.to_string()),
        }
    });
    if let Err(e) = r {
        panic!(
            "the Docker engine is not reachable (`docker info` failed): these tests need a running \
             Docker Engine and permission to use its socket (CI runs them as root).\n{e}"
        );
    }
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("docker-test")
}

pub fn image_exists(name: &str) -> bool {
    docker_raw(
        &["image", "inspect", "--format", "{{.Id}}", name],
        DOCKER_TIMEOUT,
    )
    .status
    .success()
}

pub fn run_checked(cmd: &mut Command, what: &str, timeout: Duration) {
    let out = run_bounded(cmd, None, timeout).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        output_text(&out)
    );
}

/// `routemesh-test-base:bookworm`: a minbase Debian rootfs from debootstrap, imported. The
/// rootfs is kept under target/docker-test/ and the image in the engine, so either is built
/// at most once.
pub fn build_base(dir: &Path) {
    if image_exists(BASE_IMAGE) {
        return;
    }
    let rootfs = dir.join("rootfs-bookworm");
    if !rootfs.join("etc/debian_version").exists() {
        assert!(
            which("debootstrap").is_some(),
            "debootstrap not found: `apt-get install -y debootstrap` (.ci/install-deps does)"
        );
        let tmp = dir.join("rootfs-bookworm.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        eprintln!("[docker] debootstrap bookworm into {}", tmp.display());
        run_checked(
            Command::new("debootstrap").args([
                "--variant=minbase",
                "bookworm",
                tmp.to_str().expect("utf-8 path"),
                MIRROR,
            ]),
            "debootstrap",
            BUILD_TIMEOUT,
        );
        std::fs::rename(&tmp, &rootfs).expect("rename the rootfs into place");
    }
    eprintln!("[docker] importing {BASE_IMAGE}");
    run_checked(
        Command::new("sh").arg("-c").arg(format!(
            "tar -C '{}' -c . | docker import - {BASE_IMAGE}",
            rootfs.display()
        )),
        "docker import",
        BUILD_TIMEOUT,
    );
}

/// The nginx workload image (support/images/nginx.Dockerfile); the engine's build cache makes
/// a rebuild with unchanged inputs take a second.
pub fn build_nginx() {
    let ctx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/images");
    docker_build(
        &[
            "-t",
            NGINX_IMAGE,
            "-f",
            ctx.join("nginx.Dockerfile").to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
        &format!("{NGINX_IMAGE} (its RUN apt-get needs the Debian mirror)"),
    );
}

/// `docker build -q ARGS`; panics naming `what` with the build's output when it fails.
fn docker_build(args: &[&str], what: &str) {
    let all: Vec<&str> = ["build", "-q"].iter().chain(args).copied().collect();
    let out = docker_raw(&all, BUILD_TIMEOUT);
    assert!(
        out.status.success(),
        "building {what} failed:\n{}",
        output_text(&out)
    );
}

/// Holds target/docker-test/images.lock (exclusive) while alive: one image build at a time
/// across the test processes of a run.
pub fn images_lock() -> std::fs::File {
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("create target/docker-test");
    let lock = std::fs::File::create(dir.join("images.lock")).expect("lock file");
    lock.lock().expect("lock target/docker-test/images.lock");
    lock
}

/// The base and nginx workload images, built when missing (once per test process; across
/// processes under [`images_lock`]). Returns the nginx image's name.
pub fn nginx_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    require_engine();
    BUILT.get_or_init(|| {
        let _lock = images_lock();
        let started = Instant::now();
        build_base(&target_dir());
        build_nginx();
        eprintln!(
            "[docker] workload images ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    });
    NGINX_IMAGE
}

pub const DAEMON_IMAGE: &str = "routemesh-test-daemon:latest";

/// routemesh's image: deploy/Dockerfile with its compile stage swapped for the binary cargo
/// built for this test run (a Rust toolchain image cannot be had here without a registry),
/// its runtime stage used verbatim on the local Debian base. Returns the image id.
pub fn build_daemon(dir: &Path) -> String {
    let ctx = dir.join("daemon-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(ctx.join("config")).unwrap();
    // Without debug info the context is a fraction of the size; same code.
    let bin = ctx.join("routemesh");
    let stripped = Command::new("objcopy")
        .args([
            "--strip-debug",
            crate::support::bin(),
            bin.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(crate::support::bin(), &bin).expect("copy the routemesh binary");
    }
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml"),
        ctx.join("config/example.toml"),
    )
    .unwrap();
    let deploy =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .expect("read deploy/Dockerfile");
    std::fs::write(ctx.join("Dockerfile"), prebuilt_dockerfile(&deploy)).unwrap();
    // Images of earlier binaries, untagged by the last build: ours (labelled), unused.
    let _ = docker_raw(
        &["image", "prune", "-f", "--filter", "label=routemesh-test=1"],
        DOCKER_TIMEOUT,
    );
    docker_build(
        &[
            "--label",
            "routemesh-test=1",
            "--build-arg",
            &format!("RUNTIME_IMAGE={BASE_IMAGE}"),
            "-t",
            DAEMON_IMAGE,
            ctx.to_str().unwrap(),
        ],
        "routemesh's image from deploy/Dockerfile",
    );
    docker(&["image", "inspect", "--format", "{{.Id}}", DAEMON_IMAGE])
}

/// deploy/Dockerfile with its first (compile) stage replaced by `FROM scratch AS build`
/// holding the prebuilt binary where the compile stage installs it; everything from the
/// second FROM on (the runtime stage users get) is kept as is.
pub fn prebuilt_dockerfile(deploy: &str) -> String {
    let lines: Vec<&str> = deploy.lines().collect();
    let froms: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            lines[i]
                .trim_start()
                .to_ascii_uppercase()
                .starts_with("FROM ")
        })
        .collect();
    assert!(
        froms.len() >= 2 && lines[froms[0]].contains(" AS build"),
        "deploy/Dockerfile no longer has a compile stage named `build` followed by the runtime stage; update tests/docker.rs"
    );
    assert!(
        deploy.contains("COPY --from=build /usr/local/bin/routemesh"),
        "deploy/Dockerfile's runtime stage no longer copies /usr/local/bin/routemesh from `build`"
    );
    let mut out: Vec<&str> = lines[..froms[0]].to_vec();
    out.push("FROM scratch AS build");
    out.push("LABEL routemesh-test=1");
    out.push("COPY routemesh /usr/local/bin/routemesh");
    out.push("");
    out.extend_from_slice(&lines[froms[1]..]);
    out.join("\n") + "\n"
}
