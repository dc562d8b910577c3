//! The load comparison harness: routemesh against HAProxy 2.6 and nginx, all on loopback.
//!
//! Starts a real nginx backend (a fixed 200 response), an iperf3 server, and for each thread
//! count (1, then 2): routemesh (`[runtime] worker_threads = N`; an http and a tcp listener),
//! HAProxy (`nbthread N`; a `mode http` and a `mode tcp` frontend) and nginx as a reverse
//! proxy (`worker_processes N`, upstream keep-alive). Then, per thread count:
//!
//! 1. idle connections: RSS (VmRSS) of routemesh and of HAProxy, freshly started, before and
//!    while holding `LOAD_IDLE` (9,000) idle TCP connections through their tcp listener;
//!    then idle HTTP/1.1 keep-alive clients (one GET answered, then silence) on a second
//!    fresh routemesh's http listener and on HAProxy's http frontend (the same HAProxy process
//!    as the TCP row, after those connections closed);
//! 2. keep-alive rounds: wrk against direct, routemesh http, routemesh tcp, HAProxy http,
//!    HAProxy tcp, nginx proxy, alternating target each round; req/s, p50/p99 latency, CPU
//!    seconds per request of the proxy's processes (utime+stime from /proc, children included);
//! 3. the same with `Connection: close` (a new connection per request: setup rate);
//! 4. iperf3 bulk throughput through routemesh tcp and HAProxy tcp (and direct);
//! 5. HTTPS keep-alive: wrk through routemesh and HAProxy terminating TLS with the same
//!    certificate (ECDSA P-256, made by the openssl CLI), in the keep-alive rounds;
//! 6. a 100 MiB upload and a 100 MiB download through each proxy's http listener: MiB/s and
//!    RSS growth (the highest VmRSS sampled during the transfer, less the RSS before);
//! 7. HTTP/2 clients: `h2load -c 20 -m 10` (Debian nghttp2-client) over h2c (prior
//!    knowledge; HAProxy `bind … proto h2`) and over TLS with ALPN h2, to the HTTP/1.1
//!    backend, alternating rounds: req/s and CPU per request.
//! 8. the status page's cost: keep-alive rounds on routemesh http with `LOAD_PAGES` (10)
//!    status pages open (each holding `GET /events` and reading every state document) and
//!    with none, alternating; req/s and CPU per request of both, and what the pages received.
//!
//! It prints medians over the rounds and the ratio of each routemesh figure to HAProxy's, with
//! issue 5's targets. Every process it starts is stopped by PID when it ends (or panics).
//!
//! Run (release build; ~8 minutes with the defaults):
//!     cargo bench --bench load
//! Knobs (environment): LOAD_ROUND_SECS=5 LOAD_ROUNDS=3 LOAD_THREADS=1,2 LOAD_CONNECTIONS=64
//!     LOAD_IDLE=9000 LOAD_BACKEND_WORKERS=1 LOAD_STREAM_MIB=100 LOAD_PAGES=10
//!     LOAD_ONLY_IDLE=1 (the idle rows only). A quick check
//!     that everything works:
//!     LOAD_ROUND_SECS=1 LOAD_ROUNDS=1 LOAD_IDLE=500 cargo bench --bench load

// The integration tests' harness; a bench uses a slice of it, the rest is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

#[path = "common/proc.rs"]
mod proc_;
use proc_::{Proc, cpu_secs, loopback, rss_bytes};
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stats.rs"]
mod stats;
use stats::{cores, env_or, env_threads, fmt_cpu_us, fmt_us, median, ratio, round_order};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::process::{run_bounded, tempdir, which};
use support::{Daemon, free_port};

struct Opts {
    round_secs: u64,
    rounds: usize,
    threads: Vec<usize>,
    connections: usize,
    idle: usize,
    backend_workers: usize,
    stream_mib: usize,
    /// Status pages open during the status-page rounds.
    pages: usize,
    /// Only the idle-connection rows.
    only_idle: bool,
}

impl Opts {
    fn from_env() -> Opts {
        Opts {
            round_secs: env_or("LOAD_ROUND_SECS", 5),
            rounds: env_or("LOAD_ROUNDS", 3),
            threads: env_threads("LOAD_THREADS", "1,2"),
            connections: env_or("LOAD_CONNECTIONS", 64),
            idle: env_or("LOAD_IDLE", 9000),
            backend_workers: env_or("LOAD_BACKEND_WORKERS", 1),
            stream_mib: env_or("LOAD_STREAM_MIB", 100),
            pages: env_or("LOAD_PAGES", 10),
            only_idle: env_or("LOAD_ONLY_IDLE", 0) == 1,
        }
    }
}

fn tool(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!(
            "{name} not found: `apt-get install -y nginx haproxy wrk iperf3 nghttp2-client openssl` (Debian)"
        )
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Processes we start (stopped by PID on drop)

impl Proc {
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn wait_port(addr: SocketAddr, what: &str, proc_: Option<&mut Proc>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut p = proc_;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(p) = p.as_deref_mut() {
            p.check_running();
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {addr}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The processes under test

fn nginx_conf(dir: &Path, workers: usize, http_body: &str) -> String {
    let d = dir.display();
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "{user}worker_processes {workers};\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nworker_rlimit_nofile 20000;\n\
         events {{ worker_connections 16384; multi_accept on; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         keepalive_requests 1000000;\n{http_body}}}\n"
    )
}

fn start_nginx(name: &str, dir: &Path, conf: String) -> Proc {
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let mut cmd = Command::new(tool("nginx"));
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path);
    Proc::spawn(name, &mut cmd, dir.join("stdout.log"))
}

fn start_backend(dir: &Path, port: u16, workers: usize, stream_mib: usize) -> Proc {
    // A sparse file for the download stream.
    let big = dir.join("big.bin");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len((stream_mib as u64) << 20))
        .expect("create big.bin");
    let body = format!(
        "  client_max_body_size 0;\n  server {{\n    listen 127.0.0.1:{port} backlog=8192;\n    \
         location / {{ default_type text/plain; return 200 \"hello from the nginx backend\\n\"; }}\n    \
         location = /big {{ alias {}; }}\n  }}\n",
        big.display()
    );
    start_nginx("nginx backend", dir, nginx_conf(dir, workers, &body))
}

fn start_nginx_proxy(dir: &Path, port: u16, backend: u16, workers: usize) -> Proc {
    let body = format!(
        "  upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; }}\n  \
         server {{\n    listen 127.0.0.1:{port} backlog=8192;\n    location / {{\n      \
         proxy_pass http://backend;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n    }}\n  }}\n"
    );
    start_nginx("nginx proxy", dir, nginx_conf(dir, workers, &body))
}

struct HaproxyPorts {
    http: u16,
    tcp: u16,
    iperf: u16,
    https: u16,
    h2c: u16,
}

fn start_haproxy(
    dir: &Path,
    p: &HaproxyPorts,
    backend: u16,
    iperf: u16,
    threads: usize,
    pem: &Path,
) -> Proc {
    let conf = format!(
        "global\n  nbthread {threads}\n  maxconn 9000\n\n\
         defaults\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  maxconn 9000\n\n\
         frontend fe_http\n  mode http\n  bind 127.0.0.1:{http}\n  default_backend be_http\n\
         backend be_http\n  mode http\n  server s1 127.0.0.1:{backend}\n\n\
         frontend fe_tcp\n  mode tcp\n  bind 127.0.0.1:{tcp}\n  default_backend be_tcp\n\
         backend be_tcp\n  mode tcp\n  server s1 127.0.0.1:{backend}\n\n\
         frontend fe_iperf\n  mode tcp\n  bind 127.0.0.1:{ip}\n  default_backend be_iperf\n\
         backend be_iperf\n  mode tcp\n  server s1 127.0.0.1:{iperf}\n\n\
         frontend fe_https\n  mode http\n  bind 127.0.0.1:{https} ssl crt {pem} alpn h2,http/1.1\n  default_backend be_http\n\n\
         frontend fe_h2c\n  mode http\n  bind 127.0.0.1:{h2c} proto h2\n  default_backend be_http\n",
        http = p.http,
        tcp = p.tcp,
        ip = p.iperf,
        https = p.https,
        h2c = p.h2c,
        pem = pem.display(),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).expect("write haproxy.cfg");
    let mut check = Command::new(tool("haproxy"));
    check.arg("-c").arg("-q").arg("-f").arg(&path);
    let out = run_bounded(&mut check, None, Duration::from_secs(20)).expect("haproxy -c");
    assert!(
        out.status.success(),
        "haproxy rejects its config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(tool("haproxy"));
    cmd.arg("-db").arg("-f").arg(&path);
    Proc::spawn("haproxy", &mut cmd, dir.join("haproxy.log"))
}

struct RoutemeshPorts {
    http: u16,
    tcp: u16,
    iperf: u16,
    https: u16,
}

fn start_routemesh(
    p: &RoutemeshPorts,
    backend: u16,
    iperf: u16,
    threads: usize,
    cert: &Cert,
) -> Daemon {
    let body = format!(
        r#"[[listener]]
name = "http"
listen = "127.0.0.1:{http}"
protocol = "http"
service = "web"

[[listener]]
name = "tcp"
listen = "127.0.0.1:{tcp}"
protocol = "tcp"
service = "web-tcp"

[[listener]]
name = "iperf"
listen = "127.0.0.1:{ip}"
protocol = "tcp"
service = "iperf"

[[listener]]
name = "https"
listen = "127.0.0.1:{https}"
protocol = "http"
service = "web"
tls = {{ cert = "{cert}", key = "{key}" }}

[[task]]
service = "web"
addr = "127.0.0.1:{backend}"

[[task]]
service = "web-tcp"
addr = "127.0.0.1:{backend}"

[[task]]
service = "iperf"
addr = "127.0.0.1:{iperf}"
"#,
        http = p.http,
        tcp = p.tcp,
        ip = p.iperf,
        https = p.https,
        cert = cert.cert.display(),
        key = cert.key.display(),
    );
    daemon::start(&body, threads, &[])
}

/// The certificate both proxies terminate TLS with (ECDSA P-256, self-signed).
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, for HAProxy's `crt`.
    pem: PathBuf,
}

fn make_cert(dir: &Path) -> Cert {
    let (cert, key, pem) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    let mut cmd = Command::new(tool("openssl"));
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
    ])
    .args([
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=bench.example",
        "-keyout",
    ])
    .arg(&key)
    .arg("-out")
    .arg(&cert);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20)).expect("openssl req");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let both = [
        std::fs::read(&cert).expect("cert.pem"),
        std::fs::read(&key).expect("key.pem"),
    ]
    .concat();
    std::fs::write(&pem, both).expect("write both.pem");
    Cert { cert, key, pem }
}

// ---------------------------------------------------------------------------------------------
// wrk and iperf3

#[derive(Clone, Copy, Default)]
struct WrkResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    errors: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().ok()?;
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_us = parse_duration_us(v)?;
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_us = parse_duration_us(v)?;
        } else if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next()?.parse().ok()?;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (r.rps > 0.0).then_some(r)
}

fn wrk(
    scheme: &str,
    port: u16,
    secs: u64,
    connections: usize,
    close: bool,
) -> Result<WrkResult, String> {
    let mut cmd = Command::new(tool("wrk"));
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s")])
        .args(["--latency", "--timeout", "2s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("{scheme}://127.0.0.1:{port}/"));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(secs + 15))
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_wrk(&text).ok_or_else(|| {
        format!(
            "wrk gave no result ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn iperf(port: u16, secs: u64) -> Result<f64, String> {
    let mut cmd = Command::new(tool("iperf3"));
    cmd.args(["-c", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &secs.to_string(), "-J"]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(secs + 20))
        .map_err(|e| format!("iperf3: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 output is not JSON ({e})"))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 failed: {}", v["error"]))
}

// ---------------------------------------------------------------------------------------------
// Measurement plan

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    RoutemeshHttp,
    RoutemeshTcp,
    HaproxyHttp,
    HaproxyTcp,
    NginxProxy,
    RoutemeshHttps,
    HaproxyHttps,
}

const TARGETS: [Target; 8] = [
    Target::Direct,
    Target::RoutemeshHttp,
    Target::RoutemeshTcp,
    Target::HaproxyHttp,
    Target::HaproxyTcp,
    Target::NginxProxy,
    Target::RoutemeshHttps,
    Target::HaproxyHttps,
];

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct (nginx)",
            Target::RoutemeshHttp => "routemesh http",
            Target::RoutemeshTcp => "routemesh tcp",
            Target::HaproxyHttp => "HAProxy http",
            Target::HaproxyTcp => "HAProxy tcp",
            Target::NginxProxy => "nginx proxy",
            Target::RoutemeshHttps => "routemesh https",
            Target::HaproxyHttps => "HAProxy https",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Target::RoutemeshHttps | Target::HaproxyHttps)
    }

    fn scheme(self) -> &'static str {
        if self.tls() { "https" } else { "http" }
    }
}

#[derive(Default)]
struct Samples {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_us_per_req: Vec<f64>,
    errors: u64,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

struct Setup {
    ports: BTreeMap<Target, u16>,
    pids: BTreeMap<Target, u32>,
}

fn run_rounds(
    opts: &Opts,
    setup: &Setup,
    close: bool,
    report: &mut String,
    heading: &str,
) -> BTreeMap<Target, Samples> {
    let mut samples: BTreeMap<Target, Samples> = BTreeMap::new();
    for round in 0..opts.rounds {
        // Alternate the order too, so no target always runs right after the same one.
        // A new TLS connection per request measures handshakes, not the proxies: keep-alive only.
        let targets: Vec<Target> = TARGETS.into_iter().filter(|t| !close || !t.tls()).collect();
        for t in round_order(&targets, round) {
            let port = setup.ports[&t];
            let pid = setup.pids.get(&t).copied();
            let cpu0 = pid.map(cpu_secs);
            let r = match wrk(t.scheme(), port, opts.round_secs, opts.connections, close) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("  {} round {round}: {e}", t.label());
                    continue;
                }
            };
            let s = samples.entry(t).or_default();
            s.rps.push(r.rps);
            s.p50.push(r.p50_us);
            s.p99.push(r.p99_us);
            s.errors += r.errors;
            if let (Some(pid), Some(c0)) = (pid, cpu0)
                && r.requests > 0
            {
                s.cpu_us_per_req
                    .push((cpu_secs(pid) - c0) / r.requests as f64 * 1e6);
            }
            eprintln!(
                "  [{heading}] round {}/{} {:<15} {:>10.0} req/s  p99 {}",
                round + 1,
                opts.rounds,
                t.label(),
                r.rps,
                fmt_us(r.p99_us)
            );
        }
    }
    let _ = writeln!(
        report,
        "\n{heading} ({} connections, {} round(s) × {} s, medians)",
        opts.connections, opts.rounds, opts.round_secs
    );
    let _ = writeln!(
        report,
        "  {:<16} {:>11} {:>10} {:>10} {:>14} {:>7}",
        "target", "req/s", "p50", "p99", "CPU µs/req", "errors"
    );
    for t in TARGETS.into_iter().filter(|t| !close || !t.tls()) {
        let Some(s) = samples.get(&t) else {
            let _ = writeln!(report, "  {:<16} (no result)", t.label());
            continue;
        };
        let cpu = median(&s.cpu_us_per_req);
        let _ = writeln!(
            report,
            "  {:<16} {:>11.0} {:>10} {:>10} {:>14} {:>7}",
            t.label(),
            median(&s.rps),
            fmt_us(median(&s.p50)),
            fmt_us(median(&s.p99)),
            fmt_cpu_us(cpu),
            s.errors
        );
    }
    samples
}

fn med(s: &BTreeMap<Target, Samples>, t: Target, f: fn(&Samples) -> &Vec<f64>) -> f64 {
    s.get(&t).map(|s| median(f(s))).unwrap_or(f64::NAN)
}

fn ratios(report: &mut String, s: &BTreeMap<Target, Samples>, rm: Target, ha: Target, what: &str) {
    let _ = writeln!(
        report,
        "  routemesh/HAProxy {what}: req/s {}  p50 {}  p99 {}  CPU/req {}",
        ratio(med(s, rm, |x| &x.rps), med(s, ha, |x| &x.rps)),
        ratio(med(s, rm, |x| &x.p50), med(s, ha, |x| &x.p50)),
        ratio(med(s, rm, |x| &x.p99), med(s, ha, |x| &x.p99)),
        ratio(
            med(s, rm, |x| &x.cpu_us_per_req),
            med(s, ha, |x| &x.cpu_us_per_req)
        ),
    );
}

/// One keep-alive GET on `s`, its response read whole (the backend's fixed answer has a
/// Content-Length); the connection stays open.
fn keepalive_get(s: &mut TcpStream) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response's end".into());
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or("no content-length")?;
        if got.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

/// Opens `n` idle connections to `addr` (each after one keep-alive GET when `http`) and
/// returns RSS growth of `pid` per connection.
/// One idle row of the report: `n` idle connections (`http`: each after one answered GET)
/// to `port` of process `pid`; its RSS per connection.
fn idle_row(
    report: &mut String,
    t: Target,
    pid: u32,
    port: u16,
    n: usize,
    http: bool,
) -> Option<f64> {
    match idle_rss_per_conn(pid, loopback(port), n, http) {
        Ok((per, before, after)) => {
            let _ = writeln!(
                report,
                "  {:<16} {:>8.0} bytes/conn ({:.1} KiB; RSS {:.1} → {:.1} MiB)",
                t.label(),
                per,
                per / 1024.0,
                before as f64 / 1048576.0,
                after as f64 / 1048576.0
            );
            Some(per)
        }
        Err(e) => {
            let _ = writeln!(report, "  {:<16} failed: {e}", t.label());
            None
        }
    }
}

fn idle_rss_per_conn(
    pid: u32,
    addr: SocketAddr,
    n: usize,
    http: bool,
) -> Result<(f64, u64, u64), String> {
    // Warm the accept path so one-time allocations do not count.
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        if http {
            keepalive_get(&mut s)?;
        }
    }
    thread::sleep(Duration::from_millis(500));
    let before = rss_bytes(pid);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                if http {
                    keepalive_get(&mut s).map_err(|e| format!("request {i} of {n}: {e}"))?;
                }
                conns.push(s)
            }
            Err(e) => return Err(format!("connection {i} of {n}: {e}")),
        }
    }
    // Let the proxy accept all of them and connect upstream.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = 0;
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = rss_bytes(pid);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let after = rss_bytes(pid);
    drop(conns);
    thread::sleep(Duration::from_millis(500));
    Ok((
        after.saturating_sub(before) as f64 / n as f64,
        before,
        after,
    ))
}

/// Open status pages: each thread holds `GET /events` on the admin port, as a browser's
/// EventSource does, and reads every document until closed.
struct Pages {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(u64, u64)>>,
}

impl Pages {
    fn open(admin: SocketAddr, n: usize) -> Pages {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let (mut bytes, mut docs) = (0u64, 0u64);
                    let Ok(mut s) = TcpStream::connect(admin) else {
                        return (0, 0);
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    if write!(s, "GET /events HTTP/1.1\r\nHost: {admin}\r\n\r\n").is_err() {
                        return (0, 0);
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut tail: Vec<u8> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => {
                                bytes += k as u64;
                                // Count "data: " lines, also across reads.
                                tail.extend_from_slice(&buf[..k]);
                                docs += tail.windows(6).filter(|w| w == b"data: ").count() as u64;
                                let keep = tail.len().min(5);
                                tail.drain(..tail.len() - keep);
                            }
                            Err(_) => continue,
                        }
                    }
                    (bytes, docs)
                })
            })
            .collect();
        Pages { stop, threads }
    }

    /// Closes every page; returns the bytes and documents they received.
    fn close(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .filter_map(|t| t.join().ok())
            .fold((0, 0), |(b, d), (b2, d2)| (b + b2, d + d2))
    }
}

/// Section 5: keep-alive rounds on routemesh http with `opts.pages` status pages open and
/// with none, alternating which goes first.
fn status_page_rounds(opts: &Opts, routemesh: &Daemon, http: u16, report: &mut String, n: usize) {
    let pid = routemesh.pid();
    let (mut rps, mut cpu): (BTreeMap<bool, Vec<f64>>, BTreeMap<bool, Vec<f64>>) =
        Default::default();
    let (mut bytes, mut docs, mut page_secs) = (0u64, 0u64, 0f64);
    for round in 0..opts.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for open in order {
            let pages = open.then(|| Pages::open(routemesh.admin(), opts.pages));
            let started = Instant::now();
            let c0 = cpu_secs(pid);
            let r = wrk("http", http, opts.round_secs, opts.connections, false);
            let c1 = cpu_secs(pid);
            if let Some(p) = pages {
                let (b, d) = p.close();
                bytes += b;
                docs += d;
                page_secs += started.elapsed().as_secs_f64() * opts.pages as f64;
            }
            match r {
                Ok(r) => {
                    eprintln!(
                        "  [{n}T status page] round {}/{} {:>2} pages {:>10.0} req/s",
                        round + 1,
                        opts.rounds,
                        if open { opts.pages } else { 0 },
                        r.rps
                    );
                    rps.entry(open).or_default().push(r.rps);
                    if r.requests > 0 {
                        cpu.entry(open)
                            .or_default()
                            .push((c1 - c0) / r.requests as f64 * 1e6);
                    }
                }
                Err(e) => eprintln!("  [{n}T status page] round {round}: {e}"),
            }
        }
    }
    let med = |m: &BTreeMap<bool, Vec<f64>>, k| median(m.get(&k).map(Vec::as_slice).unwrap_or(&[]));
    let _ = writeln!(
        report,
        "\n{n}T status page cost: routemesh http keep-alive with {} status pages open (GET /events) vs none, alternating ({} round(s) × {} s, medians)",
        opts.pages, opts.rounds, opts.round_secs
    );
    let _ = writeln!(
        report,
        "  {:<16} {:>11} {:>14}",
        "pages open", "req/s", "CPU µs/req"
    );
    for open in [false, true] {
        let _ = writeln!(
            report,
            "  {:<16} {:>11.0} {:>14}",
            if open { opts.pages } else { 0 },
            med(&rps, open),
            fmt_cpu_us(med(&cpu, open))
        );
    }
    let _ = writeln!(
        report,
        "  with/without pages: req/s {}  CPU/req {}; the pages received {:.1} documents/s each ({:.1} KiB/s each)",
        ratio(med(&rps, true), med(&rps, false)),
        ratio(med(&cpu, true), med(&cpu, false)),
        docs as f64 / page_secs.max(1e-9),
        bytes as f64 / 1024.0 / page_secs.max(1e-9),
    );
}

fn main() {
    let opts = Opts::from_env();
    for t in ["nginx", "haproxy", "wrk", "iperf3", "h2load", "openssl"] {
        tool(t);
    }
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "routemesh load comparison on 127.0.0.1 — {} core(s), {}; backend: nginx with {} worker(s); wrk -t1",
        cores(),
        haproxy_version(),
        opts.backend_workers,
    );

    let dir = tempdir("routemesh-load");
    let cert = make_cert(dir.path());
    let backend_port = free_port();
    let backend_dir = dir.path().join("backend");
    std::fs::create_dir_all(&backend_dir).expect("mkdir");
    let mut backend = start_backend(
        &backend_dir,
        backend_port,
        opts.backend_workers,
        opts.stream_mib,
    );
    wait_port(loopback(backend_port), "nginx backend", Some(&mut backend));

    let iperf_port = free_port();
    let mut iperf_server = Proc::spawn(
        "iperf3 server",
        Command::new(tool("iperf3")).args(["-s", "-p", &iperf_port.to_string()]),
        dir.path().join("iperf3.log"),
    );
    wait_port(
        loopback(iperf_port),
        "iperf3 server",
        Some(&mut iperf_server),
    );

    let mut summary = String::new();
    for &n in &opts.threads {
        let rm_ports = RoutemeshPorts {
            http: free_port(),
            tcp: free_port(),
            iperf: free_port(),
            https: free_port(),
        };
        let ha_ports = HaproxyPorts {
            http: free_port(),
            tcp: free_port(),
            iperf: free_port(),
            https: free_port(),
            h2c: free_port(),
        };
        let nginx_port = free_port();
        let ha_dir = dir.path().join(format!("haproxy-{n}"));
        let ngx_dir = dir.path().join(format!("nginx-proxy-{n}"));
        std::fs::create_dir_all(&ha_dir).expect("mkdir");
        std::fs::create_dir_all(&ngx_dir).expect("mkdir");

        let routemesh = start_routemesh(&rm_ports, backend_port, iperf_port, n, &cert);
        let mut haproxy = start_haproxy(&ha_dir, &ha_ports, backend_port, iperf_port, n, &cert.pem);
        let mut nginx = start_nginx_proxy(&ngx_dir, nginx_port, backend_port, n);
        for (port, what) in [
            (ha_ports.http, "haproxy http"),
            (ha_ports.tcp, "haproxy tcp"),
            (ha_ports.https, "haproxy https"),
            (ha_ports.h2c, "haproxy h2c"),
        ] {
            wait_port(loopback(port), what, Some(&mut haproxy));
        }
        wait_port(loopback(nginx_port), "nginx proxy", Some(&mut nginx));
        let _ = writeln!(
            report,
            "\n=== {n} thread(s): routemesh worker_threads = {n}, HAProxy nbthread {n}, nginx worker_processes {n} ==="
        );

        // 1. Idle connections, on freshly started proxies.
        let _ = writeln!(
            report,
            "\nRSS holding {} idle TCP connections (tcp listeners; each also holds its upstream connection)",
            opts.idle
        );
        let mut idle = BTreeMap::new();
        let mut idle_http = BTreeMap::new();
        for (t, pid, port) in [
            (Target::RoutemeshTcp, routemesh.pid(), rm_ports.tcp),
            (Target::HaproxyTcp, haproxy.pid(), ha_ports.tcp),
        ] {
            if let Some(per) = idle_row(&mut report, t, pid, port, opts.idle, false) {
                idle.insert(t, per);
            }
        }
        let _ = writeln!(
            report,
            "RSS holding {} idle HTTP/1.1 keep-alive clients (one GET each, answered; with the \
             pooled task connections; routemesh: a second fresh daemon, HAProxy: the same \
             process after the TCP row)",
            opts.idle
        );
        let fresh_ports = RoutemeshPorts {
            http: free_port(),
            tcp: free_port(),
            iperf: free_port(),
            https: free_port(),
        };
        let fresh = start_routemesh(&fresh_ports, backend_port, iperf_port, n, &cert);
        for (t, pid, port) in [
            (Target::RoutemeshHttp, fresh.pid(), fresh_ports.http),
            (Target::HaproxyHttp, haproxy.pid(), ha_ports.http),
        ] {
            if let Some(per) = idle_row(&mut report, t, pid, port, opts.idle, true) {
                idle_http.insert(t, per);
            }
        }
        drop(fresh);
        if opts.only_idle {
            eprintln!("{report}");
            continue;
        }

        let setup = Setup {
            ports: BTreeMap::from([
                (Target::Direct, backend_port),
                (Target::RoutemeshHttp, rm_ports.http),
                (Target::RoutemeshTcp, rm_ports.tcp),
                (Target::HaproxyHttp, ha_ports.http),
                (Target::HaproxyTcp, ha_ports.tcp),
                (Target::NginxProxy, nginx_port),
                (Target::RoutemeshHttps, rm_ports.https),
                (Target::HaproxyHttps, ha_ports.https),
            ]),
            pids: BTreeMap::from([
                (Target::RoutemeshHttp, routemesh.pid()),
                (Target::RoutemeshTcp, routemesh.pid()),
                (Target::HaproxyHttp, haproxy.pid()),
                (Target::HaproxyTcp, haproxy.pid()),
                (Target::NginxProxy, nginx.pid()),
                (Target::RoutemeshHttps, routemesh.pid()),
                (Target::HaproxyHttps, haproxy.pid()),
            ]),
        };
        // Warm-up (not recorded): every target once, briefly.
        for t in TARGETS {
            let _ = wrk(t.scheme(), setup.ports[&t], 1, opts.connections, false);
        }

        // 2. and 3. wrk rounds.
        let ka = run_rounds(
            &opts,
            &setup,
            false,
            &mut report,
            &format!("{n}T keep-alive"),
        );
        ratios(
            &mut report,
            &ka,
            Target::RoutemeshHttp,
            Target::HaproxyHttp,
            "http",
        );
        ratios(
            &mut report,
            &ka,
            Target::RoutemeshTcp,
            Target::HaproxyTcp,
            "tcp ",
        );
        ratios(
            &mut report,
            &ka,
            Target::RoutemeshHttps,
            Target::HaproxyHttps,
            "https",
        );
        let cl = run_rounds(
            &opts,
            &setup,
            true,
            &mut report,
            &format!("{n}T Connection: close (new connection per request)"),
        );
        ratios(
            &mut report,
            &cl,
            Target::RoutemeshHttp,
            Target::HaproxyHttp,
            "http",
        );
        ratios(
            &mut report,
            &cl,
            Target::RoutemeshTcp,
            Target::HaproxyTcp,
            "tcp ",
        );

        // 5. (before the bulk rounds, while the wrk figures above are fresh) The status page.
        if opts.pages > 0 {
            status_page_rounds(&opts, &routemesh, rm_ports.http, &mut report, n);
        }

        // 4. Bulk throughput.
        let _ = writeln!(
            report,
            "\niperf3 bulk throughput ({} round(s) × {} s, median)",
            opts.rounds, opts.round_secs
        );
        let mut bulk: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 0..opts.rounds {
            for (name, port) in [
                ("direct", iperf_port),
                ("routemesh tcp", rm_ports.iperf),
                ("HAProxy tcp", ha_ports.iperf),
            ] {
                match iperf(port, opts.round_secs) {
                    Ok(bps) => {
                        eprintln!(
                            "  [{n}T iperf3] round {} {name:<15} {:.2} Gbit/s",
                            round + 1,
                            bps / 1e9
                        );
                        bulk.entry(name).or_default().push(bps);
                    }
                    Err(e) => eprintln!("  [{n}T iperf3] {name}: {e}"),
                }
            }
        }
        for name in ["direct", "routemesh tcp", "HAProxy tcp"] {
            let _ = writeln!(
                report,
                "  {name:<16} {:>8.2} Gbit/s",
                median(bulk.get(name).map(Vec::as_slice).unwrap_or(&[])) / 1e9
            );
        }
        let bulk_rm = median(bulk.get("routemesh tcp").map(Vec::as_slice).unwrap_or(&[]));
        let bulk_ha = median(bulk.get("HAProxy tcp").map(Vec::as_slice).unwrap_or(&[]));
        let _ = writeln!(
            report,
            "  routemesh/HAProxy bulk: {}",
            ratio(bulk_rm, bulk_ha)
        );

        // 6. 100 MiB streams.
        let streams = stream_report(
            &opts,
            &mut report,
            &[
                ("routemesh http", rm_ports.http, routemesh.pid()),
                ("HAProxy http", ha_ports.http, haproxy.pid()),
            ],
        );

        // 7. HTTP/2 clients.
        let h2 = h2load_rounds(
            &opts,
            &mut report,
            &[
                ("routemesh h2c", "http", rm_ports.http, routemesh.pid()),
                ("HAProxy h2c", "http", ha_ports.h2c, haproxy.pid()),
                ("routemesh h2 TLS", "https", rm_ports.https, routemesh.pid()),
                ("HAProxy h2 TLS", "https", ha_ports.https, haproxy.pid()),
            ],
            n,
        );

        // Issue 5's targets at this thread count.
        let http_x =
            med(&ka, Target::RoutemeshHttp, |x| &x.rps) / med(&ka, Target::HaproxyHttp, |x| &x.rps);
        let http_p99_ok = med(&ka, Target::RoutemeshHttp, |x| &x.p99)
            <= med(&ka, Target::HaproxyHttp, |x| &x.p99);
        let tcp_x =
            med(&ka, Target::RoutemeshTcp, |x| &x.rps) / med(&ka, Target::HaproxyTcp, |x| &x.rps);
        let bulk_x = bulk_rm / bulk_ha;
        let idle_kib = idle.get(&Target::RoutemeshTcp).copied().unwrap_or(f64::NAN) / 1024.0;
        let idle_http_kib = idle_http
            .get(&Target::RoutemeshHttp)
            .copied()
            .unwrap_or(f64::NAN)
            / 1024.0;
        let https_x = med(&ka, Target::RoutemeshHttps, |x| &x.rps)
            / med(&ka, Target::HaproxyHttps, |x| &x.rps);
        let https_cpu = med(&ka, Target::RoutemeshHttps, |x| &x.cpu_us_per_req)
            / med(&ka, Target::HaproxyHttps, |x| &x.cpu_us_per_req);
        let http_cpu = med(&ka, Target::RoutemeshHttp, |x| &x.cpu_us_per_req)
            / med(&ka, Target::HaproxyHttp, |x| &x.cpu_us_per_req);
        let new_conn_x =
            med(&cl, Target::RoutemeshHttp, |x| &x.rps) / med(&cl, Target::HaproxyHttp, |x| &x.rps);
        let h2_x = |a: &str, b: &str| {
            median(h2.get(a).map(|v| v.0.as_slice()).unwrap_or(&[]))
                / median(h2.get(b).map(|v| v.0.as_slice()).unwrap_or(&[]))
        };
        let h2c_x = h2_x("routemesh h2c", "HAProxy h2c");
        let h2tls_x = h2_x("routemesh h2 TLS", "HAProxy h2 TLS");
        let rss_mib = streams
            .iter()
            .filter(|(n, _)| n.starts_with("routemesh"))
            .map(|(_, g)| *g)
            .fold(f64::NAN, f64::max)
            / 1048576.0;
        let _ = writeln!(summary, "\n{n} thread(s):");
        let _ = writeln!(
            summary,
            "  HTTP  ≥ 1.15× HAProxy req/s, p99 ≤ HAProxy's: {:.2}×, p99 {} → {}",
            http_x,
            if http_p99_ok { "≤" } else { ">" },
            verdict(http_x >= 1.15 && http_p99_ok)
        );
        let _ = writeln!(
            summary,
            "  TCP   ≥ 1.1× HAProxy tcp req/s:              {tcp_x:.2}× → {}",
            verdict(tcp_x >= 1.1)
        );
        let _ = writeln!(
            summary,
            "  bulk  ≥ 1.2× HAProxy:                         {bulk_x:.2}× → {}",
            verdict(bulk_x >= 1.2)
        );
        let _ = writeln!(
            summary,
            "  idle  ≤ 3 KiB RSS per TCP connection:         {idle_kib:.1} KiB → {}  (issue 16)",
            verdict(idle_kib <= 3.0)
        );
        let _ = writeln!(
            summary,
            "  idle  ≤ 3 KiB RSS per HTTP keep-alive client:  {idle_http_kib:.1} KiB → {}  (issue 16)",
            verdict(idle_http_kib <= 3.0)
        );
        let _ = writeln!(summary, "  (issue 20)");
        let _ = writeln!(
            summary,
            "  HTTP  ≥ 1.05× HAProxy req/s, p99 ≤, CPU/req ≤ 0.93×: {http_x:.2}×, p99 {}, CPU {http_cpu:.2}× → {}",
            if http_p99_ok { "≤" } else { ">" },
            verdict(http_x >= 1.05 && http_p99_ok && http_cpu <= 0.93)
        );
        let _ = writeln!(
            summary,
            "  HTTP new connection per request ≥ 1.45×:     {new_conn_x:.2}× → {}",
            verdict(new_conn_x >= 1.45)
        );
        let _ = writeln!(
            summary,
            "  HTTPS ≥ 1.2× HAProxy req/s, CPU/req ≤ 1×:    {https_x:.2}×, CPU {https_cpu:.2}× → {}",
            verdict(https_x >= 1.2 && https_cpu <= 1.0)
        );
        let _ = writeln!(
            summary,
            "  {} MiB streams, RSS growth ≤ 1 MiB:          {rss_mib:.2} MiB → {}",
            opts.stream_mib,
            verdict(rss_mib <= 1.0)
        );
        let _ = writeln!(
            summary,
            "  h2c ≥ 1.0× HAProxy req/s:                     {h2c_x:.2}× → {}",
            verdict(h2c_x >= 1.0)
        );
        let _ = writeln!(
            summary,
            "  h2 over TLS ≥ 1.0× HAProxy req/s:             {h2tls_x:.2}× → {}",
            verdict(h2tls_x >= 1.0)
        );

        haproxy.check_running();
        nginx.check_running();
        drop(nginx);
        drop(haproxy);
        drop(routemesh);
    }
    drop(iperf_server);
    drop(backend);

    println!("{report}");
    println!("Targets (issue 5):{summary}");
    println!(
        "\n(total {:.0} s; every figure is a median over rounds; CPU µs/req counts the proxy's processes only)",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 100 MiB streams

/// Samples VmRSS of `pid` every 20 ms while `work` runs; returns its result and the
/// highest sample.
fn peak_rss_during<T>(pid: u32, work: impl FnOnce() -> T) -> (T, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sampler = thread::spawn(move || {
        let mut peak = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid));
            thread::sleep(Duration::from_millis(20));
        }
        peak.max(rss_bytes(pid))
    });
    let r = work();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (r, sampler.join().unwrap_or(0))
}

/// Uploads then downloads `mib` MiB on one keep-alive connection; seconds each.
fn stream_once(port: u16, mib: usize) -> Result<(f64, f64), String> {
    use std::io::{Read, Write};
    let err = |e: std::io::Error| e.to_string();
    let mut s = TcpStream::connect(loopback(port)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(err)?;
    let size = mib << 20;
    let t = Instant::now();
    write!(
        s,
        "POST /up HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n"
    )
    .map_err(err)?;
    let chunk = vec![b'u'; 1 << 16];
    for _ in 0..size / chunk.len() {
        s.write_all(&chunk).map_err(err)?;
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut got = Vec::new();
    // The backend's short answer (Content-Length).
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"\n") {
        let n = s.read(&mut buf).map_err(err)?;
        if n == 0 {
            return Err("closed after the upload".into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    if !got.starts_with(b"HTTP/1.1 200") {
        return Err(format!("upload: {}", String::from_utf8_lossy(&got)));
    }
    let up = t.elapsed().as_secs_f64();
    let t = Instant::now();
    write!(s, "GET /big HTTP/1.1\r\nHost: bench\r\n\r\n").map_err(err)?;
    let mut head = Vec::new();
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf).map_err(err)?;
        if n == 0 {
            return Err(format!("download cut at {total}"));
        }
        if head.len() < 4 || !head.windows(4).any(|w| w == b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                total = head.len() - (i + 4);
            }
        } else {
            total += n;
        }
        if total >= size {
            break;
        }
    }
    Ok((up, t.elapsed().as_secs_f64()))
}

/// Per proxy: upload MiB/s, download MiB/s, RSS growth in bytes (one sample per round).
type StreamRow = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Section 6; returns each proxy's RSS growth (median over rounds).
fn stream_report(
    opts: &Opts,
    report: &mut String,
    targets: &[(&'static str, u16, u32)],
) -> Vec<(&'static str, f64)> {
    let mib = opts.stream_mib;
    let mut rows: BTreeMap<&str, StreamRow> = BTreeMap::new();
    for round in 0..opts.rounds {
        for &(name, port, pid) in targets {
            let before = rss_bytes(pid);
            let (r, peak) = peak_rss_during(pid, || stream_once(port, mib));
            match r {
                Ok((up, down)) => {
                    let e = rows.entry(name).or_default();
                    e.0.push(mib as f64 / up);
                    e.1.push(mib as f64 / down);
                    e.2.push(peak.saturating_sub(before) as f64);
                    eprintln!(
                        "  [stream] round {} {name:<15} up {:.0} MiB/s down {:.0} MiB/s RSS +{:.2} MiB",
                        round + 1,
                        mib as f64 / up,
                        mib as f64 / down,
                        peak.saturating_sub(before) as f64 / 1048576.0
                    );
                }
                Err(e) => eprintln!("  [stream] {name}: {e}"),
            }
        }
    }
    let _ = writeln!(
        report,
        "\n{mib} MiB upload then download on one keep-alive connection ({} round(s), medians)",
        opts.rounds
    );
    let mut out = Vec::new();
    for &(name, _, _) in targets {
        let Some((up, down, rss)) = rows.get(name) else {
            let _ = writeln!(report, "  {name:<16} (no result)");
            continue;
        };
        let _ = writeln!(
            report,
            "  {name:<16} up {:>6.0} MiB/s  down {:>6.0} MiB/s  RSS growth {:.2} MiB",
            median(up),
            median(down),
            median(rss) / 1048576.0
        );
        out.push((name, median(rss)));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 clients (h2load)

/// One h2load run: (req/s, requests done, failed).
fn h2load(scheme: &str, port: u16, secs: u64) -> Result<(f64, u64, u64), String> {
    let mut cmd = Command::new(tool("h2load"));
    cmd.args(["-c", "20", "-m", "10", "-t", "1", "-D", &secs.to_string()])
        .arg(format!("{scheme}://127.0.0.1:{port}/"));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(secs + 20))
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rps = None;
    let (mut done, mut failed) = (0, 0);
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            // "finished in 3.00s, 51234.00 req/s, 2.10MB/s"
            rps = rest
                .split(", ")
                .nth(1)
                .and_then(|v| v.strip_suffix(" req/s"))
                .and_then(|v| v.parse::<f64>().ok());
        } else if let Some(rest) = t.strip_prefix("requests: ") {
            // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(", ") {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "succeeded" => done = n,
                    "failed" | "errored" | "timeout" => failed += n,
                    _ => {}
                }
            }
        }
    }
    match rps {
        Some(r) if r > 0.0 => Ok((r, done, failed)),
        _ => Err(format!("h2load gave no result ({}):\n{text}", out.status)),
    }
}

/// Per target: req/s samples, CPU µs per request samples, failed requests.
type H2Row = (Vec<f64>, Vec<f64>, u64);

/// Section 7: alternating rounds, per target.
fn h2load_rounds(
    opts: &Opts,
    report: &mut String,
    targets: &[(&'static str, &str, u16, u32)],
    threads: usize,
) -> BTreeMap<&'static str, H2Row> {
    let mut out: BTreeMap<&'static str, H2Row> = BTreeMap::new();
    for &(_, scheme, port, _) in targets {
        let _ = h2load(scheme, port, 1); // warm-up
    }
    for round in 0..opts.rounds {
        for (name, scheme, port, pid) in round_order(targets, round) {
            let c0 = cpu_secs(pid);
            match h2load(scheme, port, opts.round_secs) {
                Ok((rps, done, failed)) => {
                    let e = out.entry(name).or_default();
                    e.0.push(rps);
                    if done > 0 {
                        e.1.push((cpu_secs(pid) - c0) / done as f64 * 1e6);
                    }
                    e.2 += failed;
                    eprintln!(
                        "  [{threads}T h2load] round {} {name:<17} {rps:>10.0} req/s",
                        round + 1
                    );
                }
                Err(e) => eprintln!("  [{threads}T h2load] {name}: {e}"),
            }
        }
    }
    let _ = writeln!(
        report,
        "\nHTTP/2 clients, h2load -c 20 -m 10 ({} round(s) × {} s, medians)",
        opts.rounds, opts.round_secs
    );
    let _ = writeln!(
        report,
        "  {:<18} {:>11} {:>14} {:>7}",
        "target", "req/s", "CPU µs/req", "failed"
    );
    for &(name, ..) in targets {
        let Some((rps, cpu, failed)) = out.get(name) else {
            let _ = writeln!(report, "  {name:<18} (no result)");
            continue;
        };
        let _ = writeln!(
            report,
            "  {name:<18} {:>11.0} {:>14} {:>7}",
            median(rps),
            fmt_cpu_us(median(cpu)),
            failed
        );
    }
    for pair in targets.chunks(2) {
        if let [(a, ..), (b, ..)] = pair {
            let m = |n: &str, f: fn(&H2Row) -> &Vec<f64>| {
                out.get(n).map(|v| median(f(v))).unwrap_or(f64::NAN)
            };
            let _ = writeln!(
                report,
                "  {a} / {b}: req/s {}  CPU/req {}",
                ratio(m(a, |v| &v.0), m(b, |v| &v.0)),
                ratio(m(a, |v| &v.1), m(b, |v| &v.1))
            );
        }
    }
    out
}

fn haproxy_version() -> String {
    Command::new(tool("haproxy"))
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.split(" - ").next().unwrap_or(l).to_string())
        })
        .unwrap_or_else(|| "HAProxy (version unknown)".into())
}
