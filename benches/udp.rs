//! Request/response datagrams per second through routemesh's udp listener vs nginx's stream
//! module in UDP mode (Debian `libnginx-mod-stream`, `proxy_responses 1`), both in front of
//! the same UDP echo backend, in the same run (issue 15, "Speed").
//!
//! For each thread count (1, then 2) and payload size (64 B, then 1 KiB): routemesh
//! (`[runtime] worker_threads = N`, a udp listener, the echo as a static `[[task]]`) twice —
//! with `udp_responses = 1` (a session per exchange, nginx's `proxy_responses 1` semantics)
//! and with its default (one session per client, kept) — and nginx (`worker_processes N`,
//! `listen … udp reuseport`, `proxy_responses 1`). The load generator is this process: 64
//! client threads, each with its own socket, sending one datagram and waiting for its echo
//! (100 ms, then counted lost) back to back for a round. Rounds alternate the targets' order.
//! Per target it prints medians over the rounds of exchanges/s, the p50/p99 of the exchange
//! latency, the proxy's CPU (utime+stime of the process and its children, /proc) per
//! datagram proxied (two per exchange), the losses, then the routemesh/nginx ratios.
//!
//! Then a flood as spoofed sources make it: one datagram from each of `UDP_BENCH_FLOOD`
//! (20,000) distinct source addresses against a listener with `max_sessions = 5000`. It
//! prints the RSS before, once the 5,000 sessions are open (bytes per session), and after the
//! rest of the flood was refused (growth past `max_sessions`: none is the contract), with the
//! sessions gauge and the `max_sessions` drops.
//!
//! Everything runs on 127.0.0.1 (on a shared machine the figures are noisy: compare within
//! one run), is bounded in time, and every process it starts is stopped by PID on drop.
//!
//! Run (release build; about two minutes with the defaults):
//!     cargo bench --bench udp
//! Knobs (environment): UDP_BENCH_SECS=3 (per round) UDP_BENCH_ROUNDS=3
//!     UDP_BENCH_THREADS=1,2 UDP_BENCH_CLIENTS=64 UDP_BENCH_SIZES=64,1024 UDP_BENCH_FLOOD=20000
//!     (0: no flood).
//!     A quick check that everything works: UDP_BENCH_SECS=1 UDP_BENCH_ROUNDS=1

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
use stats::{
    Samples, cores, env_or, env_threads, fmt_cpu_us, fmt_us, median, on_threads, percentile, ratio,
    round_order,
};

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::Daemon;
use support::net::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(15);
const REPLY_TIMEOUT: Duration = Duration::from_millis(100);
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

struct Opts {
    secs: u64,
    rounds: usize,
    threads: Vec<usize>,
    clients: usize,
    sizes: Vec<usize>,
    flood: usize,
}

impl Opts {
    fn from_env() -> Opts {
        Opts {
            secs: env_or("UDP_BENCH_SECS", 3),
            rounds: env_or("UDP_BENCH_ROUNDS", 3),
            threads: env_threads("UDP_BENCH_THREADS", "1,2"),
            clients: env_or("UDP_BENCH_CLIENTS", 64),
            sizes: env_threads("UDP_BENCH_SIZES", "64,1024"),
            flood: env_or("UDP_BENCH_FLOOD", 20_000),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The echo backend: two threads on one socket, in this process (the same for every target).

struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("echo: bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let (s, stop) = (socket.try_clone().unwrap(), stop.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(&buf[..n], from);
                        }
                    }
                })
            })
            .collect();
        Echo {
            addr,
            stop,
            threads,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxies

/// Waits until one echo exchange through `addr` works.
fn wait_answering(addr: SocketAddr, what: &str, mut alive: impl FnMut()) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    let mut buf = [0u8; 16];
    loop {
        alive();
        let _ = s.send_to(b"ping", addr);
        if let Ok((n, _)) = s.recv_from(&mut buf)
            && &buf[..n] == b"ping"
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not answer on {addr}"
        );
    }
}

fn nginx_bin() -> PathBuf {
    support::nginx::nginx_bin()
}

fn start_nginx(dir: &Path, port: u16, echo: SocketAddr, workers: usize) -> Proc {
    assert!(
        Path::new(STREAM_MODULE).exists(),
        "{STREAM_MODULE} is missing: `apt-get install -y libnginx-mod-stream` (or bash .ci/install-deps)"
    );
    let d = dir.join(format!("nginx-{workers}"));
    std::fs::create_dir_all(&d).unwrap();
    let user = if support::process::is_root() {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        "load_module {STREAM_MODULE};\n{user}\nworker_processes {workers};\n\
         pid {dd}/nginx.pid;\nerror_log {dd}/error.log warn;\n\
         events {{ worker_connections 65536; }}\n\
         stream {{\n  upstream echo {{ server {echo}; }}\n  \
         server {{\n    listen 127.0.0.1:{port} udp reuseport;\n    proxy_pass echo;\n    \
         proxy_responses 1;\n    proxy_timeout 10s;\n  }}\n}}\n",
        dd = d.display()
    );
    let path = d.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new(nginx_bin());
    cmd.args(["-e", &d.join("error.log").display().to_string()])
        .args(["-g", "daemon off;", "-p"])
        .arg(format!("{}/", d.display()))
        .arg("-c")
        .arg(&path);
    let mut p = Proc::spawn("nginx", &mut cmd, d.join("nginx.out"));
    let errors = d.join("error.log");
    wait_answering(loopback(port), "nginx", || {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "{} exited at start ({status}):\n{}{}",
                p.name,
                std::fs::read_to_string(&p.log).unwrap_or_default(),
                std::fs::read_to_string(&errors).unwrap_or_default()
            );
        }
    });
    p
}

fn start_routemesh(port: u16, echo: SocketAddr, threads: usize, responses: u32) -> Daemon {
    let body = format!(
        r#"[[listener]]
name = "echo"
listen = "127.0.0.1:{port}"
protocol = "udp"
service = "echo"

[service.echo]
udp_responses = {responses}
udp_idle_timeout = "30s"

[[task]]
service = "echo"
addr = "{echo}"
"#
    );
    let d = daemon::start(&body, threads, &[]);
    wait_answering(loopback(port), "routemesh", || {});
    d
}

// ---------------------------------------------------------------------------------------------
// A flood from spoofed-looking sources

/// Sessions a flooded listener may hold.
const FLOOD_MAX_SESSIONS: usize = 5000;

/// One datagram from each of `n` new source addresses (a fresh socket, so a fresh port, each).
fn send_from_new_sources(to: SocketAddr, n: usize) {
    for i in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Bounded: a full socket buffer drops, as the network would; the flood goes on.
        let _ = s.send_to(&(i as u32).to_be_bytes(), to);
    }
}

/// The flood row: RSS per session up to `max_sessions`, and what the rest of the flood adds.
fn flood(report: &mut String, echo: SocketAddr, n: usize) {
    let port = free_port();
    let body = format!(
        r#"[[listener]]
name = "flood"
listen = "127.0.0.1:{port}"
protocol = "udp"
service = "echo"
max_sessions = {FLOOD_MAX_SESSIONS}

[service.echo]
udp_idle_timeout = "60s"

[[task]]
service = "echo"
addr = "{echo}"
"#
    );
    let d = daemon::start(&body, 1, &[]);
    let to = loopback(port);
    wait_answering(to, "routemesh", || {});
    thread::sleep(Duration::from_millis(500));
    let before = rss_bytes(d.pid());
    // Up to max_sessions first (the kernel drops some of a burst at the listener's socket
    // buffer: top up, bounded), so that the rest of the flood finds the table full.
    let first = FLOOD_MAX_SESSIONS.min(n);
    let mut sent = 0;
    let mut open = 0.0;
    for _ in 0..20 {
        let more = first.saturating_sub(open as usize);
        send_from_new_sources(to, more);
        sent += more;
        thread::sleep(Duration::from_millis(300));
        open = d.metric_sum("routemesh_udp_sessions");
        if open as usize >= first {
            break;
        }
    }
    thread::sleep(Duration::from_millis(700));
    let at_max = rss_bytes(d.pid());
    send_from_new_sources(to, n.saturating_sub(sent));
    thread::sleep(Duration::from_secs(1));
    let after = rss_bytes(d.pid());
    let refused =
        d.metric_sum("routemesh_udp_dropped_total{listener=\"flood\",reason=\"max_sessions\"}");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let _ = writeln!(
        report,
        "\n=== flood: one datagram from each of {n} distinct source addresses, max_sessions = \
         {FLOOD_MAX_SESSIONS}, 1 thread ===\n  RSS {:.1} MiB before, {:.1} MiB with {open:.0} \
         sessions open ({:.0} bytes per session), {:.1} MiB after the rest of the flood \
         ({:+.2} MiB past max_sessions); {refused:.0} datagrams refused (max_sessions), the \
         others of the burst dropped by the kernel at the listener's socket buffer",
        mib(before),
        mib(at_max),
        at_max.saturating_sub(before) as f64 / open.max(1.0),
        mib(after),
        mib(after) - mib(at_max),
    );
}

// ---------------------------------------------------------------------------------------------
// Rounds

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    /// `udp_responses = 1`: nginx's semantics.
    RoutemeshPerExchange,
    /// The default: one session per client, kept.
    RoutemeshSessions,
    Nginx,
}

const TARGETS: [Target; 3] = [
    Target::RoutemeshPerExchange,
    Target::RoutemeshSessions,
    Target::Nginx,
];

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::RoutemeshPerExchange => "routemesh (responses=1)",
            Target::RoutemeshSessions => "routemesh (sessions)",
            Target::Nginx => "nginx (responses 1)",
        }
    }
}

struct RoundResult {
    exchanges: u64,
    lost: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

/// `clients` threads, each exchanging `size`-byte datagrams with `addr` back to back for
/// `secs` seconds.
fn run_round(addr: SocketAddr, clients: usize, size: usize, secs: u64) -> RoundResult {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let per_thread: Vec<(u64, u64, Vec<u32>)> = on_threads(clients, |t| {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(addr).unwrap();
        sock.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        let mut req = vec![t as u8; size.max(8)];
        req.truncate(size);
        let mut buf = vec![0u8; 65536];
        let (mut ok, mut lost) = (0u64, 0u64);
        let mut lat = Vec::with_capacity(8192);
        let mut seq = 0u64;
        while Instant::now() < deadline {
            seq += 1;
            if size >= 8 {
                req[..8].copy_from_slice(&seq.to_be_bytes());
            }
            let t0 = Instant::now();
            if sock.send(&req).is_err() {
                lost += 1;
                continue;
            }
            loop {
                match sock.recv(&mut buf) {
                    // A late echo of an earlier (lost) one: skip it.
                    Ok(n) if n == size && buf[..n.min(8)] != req[..n.min(8)] => {}
                    Ok(_) => {
                        ok += 1;
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        break;
                    }
                    Err(_) => {
                        lost += 1;
                        break;
                    }
                }
            }
        }
        (ok, lost, lat)
    });
    let mut r = RoundResult {
        exchanges: 0,
        lost: 0,
        secs: start.elapsed().as_secs_f64(),
        latencies_us: Vec::new(),
    };
    for (ok, lost, lat) in per_thread {
        r.exchanges += ok;
        r.lost += lost;
        r.latencies_us.extend(lat);
    }
    r.latencies_us.sort_unstable();
    r
}

fn nginx_version() -> String {
    Command::new(nginx_bin())
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_else(|| "nginx (version unknown)".into())
}

fn main() {
    let opts = Opts::from_env();
    let dir = support::process::tempdir("routemesh-udp-bench");
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "UDP request/response through a udp listener on 127.0.0.1 — {} core(s), {}, one UDP \
         echo backend (2 threads, this process); {} clients, each one datagram out, its echo back",
        cores(),
        nginx_version(),
        opts.clients,
    );
    let echo = Echo::start();

    for &n in &opts.threads {
        let (p1, p0, pn) = (free_port(), free_port(), free_port());
        let rm1 = start_routemesh(p1, echo.addr, n, 1);
        let rm0 = start_routemesh(p0, echo.addr, n, 0);
        let nginx = start_nginx(dir.path(), pn, echo.addr, n);
        let target = |t: Target| match t {
            Target::RoutemeshPerExchange => (loopback(p1), rm1.pid()),
            Target::RoutemeshSessions => (loopback(p0), rm0.pid()),
            Target::Nginx => (loopback(pn), nginx.pid()),
        };
        for &size in &opts.sizes {
            let _ = writeln!(
                report,
                "\n=== {n} thread(s) (routemesh worker_threads = {n}, nginx worker_processes {n}), \
                 {size}-byte datagrams; {} round(s) × {} s, medians ===",
                opts.rounds, opts.secs
            );
            for t in TARGETS {
                let r = run_round(target(t).0, opts.clients, size, 1);
                assert!(r.exchanges > 0, "{} answers nothing", t.label());
            }
            let mut samples: Vec<(Target, Samples)> =
                TARGETS.iter().map(|&t| (t, Samples::default())).collect();
            for round in 0..opts.rounds {
                for t in round_order(&TARGETS, round) {
                    let (addr, pid) = target(t);
                    let cpu0 = cpu_secs(pid);
                    let r = run_round(addr, opts.clients, size, opts.secs);
                    let cpu = cpu_secs(pid) - cpu0;
                    let s = &mut samples.iter_mut().find(|(x, _)| *x == t).unwrap().1;
                    let rate = r.exchanges as f64 / r.secs;
                    let cpu_us = (r.exchanges > 0).then(|| cpu / (2 * r.exchanges) as f64 * 1e6);
                    s.record(rate, &r.latencies_us, r.lost, cpu_us);
                    eprintln!(
                        "  [{n} thread(s), {size} B] round {}/{} {:<24} {:>8.0} exchanges/s  p99 {}  lost {}",
                        round + 1,
                        opts.rounds,
                        t.label(),
                        rate,
                        fmt_us(percentile(&r.latencies_us, 0.99)),
                        r.lost
                    );
                    thread::sleep(Duration::from_millis(200));
                }
            }
            let _ = writeln!(
                report,
                "  {:<24} {:>12} {:>10} {:>10} {:>17} {:>7}",
                "target", "exchanges/s", "p50", "p99", "CPU µs/datagram", "lost"
            );
            for (t, s) in &samples {
                let _ = writeln!(
                    report,
                    "  {:<24} {:>12.0} {:>10} {:>10} {:>17} {:>7}",
                    t.label(),
                    median(&s.rate),
                    fmt_us(median(&s.p50)),
                    fmt_us(median(&s.p99)),
                    fmt_cpu_us(median(&s.cpu_us)),
                    s.failed
                );
            }
            let get = |t: Target| &samples.iter().find(|(x, _)| *x == t).unwrap().1;
            let ng = get(Target::Nginx);
            for t in [Target::RoutemeshPerExchange, Target::RoutemeshSessions] {
                let rm = get(t);
                let _ = writeln!(
                    report,
                    "  {}/nginx: exchanges/s {}  p50 {}  p99 {}  CPU/datagram {}  (exchanges/s: higher is better)",
                    t.label(),
                    ratio(median(&rm.rate), median(&ng.rate)),
                    ratio(median(&rm.p50), median(&ng.p50)),
                    ratio(median(&rm.p99), median(&ng.p99)),
                    ratio(median(&rm.cpu_us), median(&ng.cpu_us)),
                );
            }
        }
        drop(nginx);
        drop(rm0);
        drop(rm1);
    }
    if opts.flood > 0 {
        flood(&mut report, echo.addr, opts.flood);
    }
    drop(echo);
    let _ = writeln!(
        report,
        "\n(latency: send → echo received, 100 ms then lost; CPU: utime+stime of the proxy and \
         its children over the round, per datagram proxied (2 per exchange); total run {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{report}");
}
