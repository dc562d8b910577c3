//! New MQTT connections per second through routemesh vs HAProxy 2.6, both hashing the MQTT
//! client identifier over the same three real mosquitto brokers (issue 7, "Speed").
//!
//! Starts three mosquitto brokers on free loopback ports, then for each thread count (1, then
//! 2): routemesh (`[runtime] worker_threads = N`, a tcp listener for service `mqtt` with
//! `balance = "maglev"`, `hash_key = "mqtt_client_id"`, the brokers as static `[[task]]`s) and
//! HAProxy (`nbthread N`, `mode tcp`, `tcp-request inspect-delay 5s`, `tcp-request content
//! reject unless { req.payload(0,0),mqtt_is_valid }`, the client id taken with
//! `req.payload(0,0),mqtt_field_value(connect,client_identifier)` into a variable, `balance
//! hash var(sess.mqtt_cid)`, `hash-type consistent`). Why the variable: HAProxy 2.6.12 accepts
//! `balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)` but then finds
//! no key at balance time and falls back to round robin (a second CONNECT with the same id
//! reaches another broker); through a variable set by the frontend rule the hash sticks.
//!
//! The load generator is this process: `clients × N` threads, each looping for a round: open a
//! TCP connection, send an MQTT 3.1.1 CONNECT (clean session, a client id never used before),
//! read the CONNACK (return code 0 expected), send DISCONNECT, wait for the close. Rounds
//! alternate between direct-to-broker (the baseline: client i talks to broker i mod 3),
//! routemesh and HAProxy. Per target it prints medians over the rounds of connections/s, the
//! p50/p99 of connect → CONNACK latency, the proxy's CPU (utime+stime of the process, all
//! threads, from /proc) per connection and the error count, then the routemesh/HAProxy ratios.
//! Before the rounds, a short affinity check per proxy (clean session off: a second CONNECT
//! with the same id must find its session, i.e. reach the same broker) proves that both really
//! hash on the client id instead of falling back to round robin.
//!
//! The reconnect storm (issue 16), per thread count, straight to the brokers (the floor), then
//! on a fresh routemesh and a fresh HAProxy each: `MQTT_BENCH_STORM` (9,000) clients connect
//! at once (one tokio task each, in this process) and stay connected after their CONNACK;
//! printed: the time from the first SYN to the last CONNACK, failed connects, p50/p99 connect
//! → CONNACK, the kernel's accept-queue overflows and retransmitted SYNs over the storm, the
//! proxy's CPU time, its RSS growth per idle connection once all are up, then, after every
//! client has closed, its RSS each second for 30 s and when it came back within 20 % of the
//! pre-storm figure.
//!
//! Everything runs on 127.0.0.1, is bounded in time, and every process it starts is stopped
//! by PID when it ends (or panics).
//!
//! Run (release build; about two minutes with the defaults):
//!     cargo bench --bench mqtt_connect
//! Knobs (environment): MQTT_BENCH_SECS=5 (per round) MQTT_BENCH_ROUNDS=3
//!     MQTT_BENCH_THREADS=1,2 MQTT_BENCH_CLIENTS=32 (client threads per proxy thread).
//!     MQTT_BENCH_STORM=9000 (storm clients; 0: no storm) MQTT_BENCH_STORM_ONLY=1 (skip the
//!     rate rounds) MQTT_BENCH_AFTER_SECS=30 (how long RSS is watched after a storm).
//!     MQTT_BENCH_PACE=0 (routemesh's `max_pending_connects`; 0: no pacing, the default).
//!     A quick check that everything works: MQTT_BENCH_SECS=1
//!     MQTT_BENCH_ROUNDS=1 MQTT_BENCH_STORM=500

// The integration tests' harness; a bench uses a slice of it, the rest is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

#[path = "common/proc.rs"]
mod proc_;
use proc_::{Proc, cpu_secs, loopback, rss_bytes, tcp_ext};
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stats.rs"]
mod stats;
use stats::{
    Samples, cores, env_or, env_threads, fmt_cpu_us, fmt_us, median, on_threads, percentile, ratio,
    round_order,
};

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::Daemon;
use support::mosquitto::mosquitto_bin;
use support::mqtt_wire;
use support::net::free_port;
use support::process::{run_bounded, tempdir};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const START_TIMEOUT: Duration = Duration::from_secs(15);
const BROKERS: usize = 3;

struct Opts {
    secs: u64,
    rounds: usize,
    threads: Vec<usize>,
    clients_per_thread: usize,
    /// Clients of the reconnect storm (0: none).
    storm: usize,
    /// Only the storm, not the rate rounds.
    storm_only: bool,
}

impl Opts {
    fn from_env() -> Opts {
        Opts {
            secs: env_or("MQTT_BENCH_SECS", 5),
            rounds: env_or("MQTT_BENCH_ROUNDS", 3),
            threads: env_threads("MQTT_BENCH_THREADS", "1,2"),
            clients_per_thread: env_or("MQTT_BENCH_CLIENTS", 32),
            storm: env_or("MQTT_BENCH_STORM", 9000),
            storm_only: env_or("MQTT_BENCH_STORM_ONLY", 0) == 1,
        }
    }
}

fn haproxy_bin() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/haproxy");
    if p.exists() {
        return p;
    }
    support::process::require_binary("haproxy", "`apt-get install -y haproxy` (Debian, 2.6)")
}

// ---------------------------------------------------------------------------------------------
// Processes we start, stopped by PID on drop

impl Proc {
    /// Waits until `addr` accepts connections; panics with the log if the process exits or
    /// does not listen within [`START_TIMEOUT`].
    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited at start ({status}); log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {addr}",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn start_broker(dir: &Path, i: usize) -> (Proc, SocketAddr) {
    let port = free_port();
    let conf = dir.join(format!("mosquitto-{i}.conf"));
    // `user root`: as root, mosquitto would otherwise switch to a `mosquitto` user that may
    // not exist here (no effect when not root). No log: the brokers are the same for every
    // target, keep their per-connection work minimal.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n\
             log_dest none\n"
        ),
    )
    .expect("write mosquitto.conf");
    let mut cmd = Command::new(mosquitto_bin("mosquitto"));
    cmd.arg("-c").arg(&conf);
    let mut p = Proc::spawn(
        &format!("mosquitto {i}"),
        &mut cmd,
        dir.join(format!("mosquitto-{i}.out")),
    );
    let addr = loopback(port);
    p.wait_listening(addr);
    (p, addr)
}

fn start_haproxy(
    dir: &Path,
    port: u16,
    brokers: &[SocketAddr],
    threads: usize,
    maxconn: usize,
) -> Proc {
    let servers: String = brokers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{i} {b}\n"))
        .collect();
    let conf = format!(
        "global\n  nbthread {threads}\n  maxconn {maxconn}\n\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend fe_mqtt\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 5s\n  \
         tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}\n  \
         tcp-request content set-var(sess.mqtt_cid) \
         req.payload(0,0),mqtt_field_value(connect,client_identifier)\n  \
         default_backend be_mqtt\n\n\
         backend be_mqtt\n  balance hash var(sess.mqtt_cid)\n  hash-type consistent\n{servers}"
    );
    let path = dir.join(format!("haproxy-{threads}.cfg"));
    std::fs::write(&path, conf).expect("write haproxy.cfg");
    let mut check = Command::new(haproxy_bin());
    check.arg("-c").arg("-f").arg(&path);
    let out = run_bounded(&mut check, None, Duration::from_secs(20)).expect("haproxy -c");
    assert!(
        out.status.success(),
        "haproxy rejects its config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(haproxy_bin());
    cmd.arg("-db").arg("-f").arg(&path);
    let mut p = Proc::spawn(
        "haproxy",
        &mut cmd,
        dir.join(format!("haproxy-{threads}.log")),
    );
    p.wait_listening(loopback(port));
    p
}

fn start_routemesh(port: u16, brokers: &[SocketAddr], threads: usize) -> Daemon {
    start_routemesh_with(port, brokers, threads, &[])
}

/// [`start_routemesh`] with more environment (`ROUTEMESH_NO_TRIM=1`).
fn start_routemesh_with(
    port: u16,
    brokers: &[SocketAddr],
    threads: usize,
    env: &[(&str, &str)],
) -> Daemon {
    let tasks: String = brokers
        .iter()
        .map(|b| format!("[[task]]\nservice = \"mqtt\"\naddr = \"{b}\"\n\n"))
        .collect();
    // `max_pending_connects` (0: none, the default).
    let pace: u32 = env_or("MQTT_BENCH_PACE", 0);
    let body = format!(
        r#"[[listener]]
name = "mqtt"
listen = "127.0.0.1:{port}"
protocol = "tcp"
service = "mqtt"

[service.mqtt]
balance = "maglev"
hash_key = "mqtt_client_id"
peek_timeout = "5s"
connect_timeout = "1s"
max_pending_connects = {pace}

[service.mqtt.health]
interval = "1h"

{tasks}"#
    );
    daemon::start(&body, threads, env)
}

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 client

/// CONNECT, protocol level 4, keep-alive 60, with `client_id` and the clean-session flag.
fn connect_packet(client_id: &[u8], clean: bool) -> Vec<u8> {
    mqtt_wire::connect(client_id, clean, 60)
}

/// One MQTT session: connect, CONNECT, CONNACK (return code 0), DISCONNECT, wait for the
/// peer's close (the broker closes first, so no TIME_WAIT piles up on our side). Returns the
/// connect → CONNACK latency and whether the broker had a session for this id.
fn mqtt_session(addr: SocketAddr, client_id: &str, clean: bool) -> io::Result<(Duration, bool)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(client_id.as_bytes(), clean))?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    let latency = t0.elapsed();
    if ack[0] != 0x20 || ack[1] != 0x02 || ack[3] != 0 {
        return Err(io::Error::other(format!("bad CONNACK {ack:02x?}")));
    }
    s.write_all(&mqtt_wire::DISCONNECT)?;
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    Ok((latency, ack[2] & 1 == 1))
}

/// Through `proxy`, `n` client ids with clean session off, twice each: the second CONNECT must
/// find the session the first one left, i.e. reach the same broker. Then asks each broker
/// directly which one holds it (distribution), and clears every session it made.
fn affinity_check(proxy: SocketAddr, brokers: &[SocketAddr], tag: &str, n: usize) -> String {
    let mut sticky = 0;
    let mut per_broker = vec![0usize; brokers.len()];
    let mut errors = 0;
    for i in 0..n {
        let id = format!("aff-{tag}-{i}");
        let first = mqtt_session(proxy, &id, false);
        let second = mqtt_session(proxy, &id, false);
        match (first, second) {
            (Ok(_), Ok((_, true))) => sticky += 1,
            (Ok(_), Ok((_, false))) => {}
            _ => errors += 1,
        }
        for (b, addr) in brokers.iter().enumerate() {
            if let Ok((_, true)) = mqtt_session(*addr, &id, false) {
                per_broker[b] += 1;
            }
            let _ = mqtt_session(*addr, &id, true);
        }
    }
    let verdict = if sticky == n && errors == 0 {
        "hashes on the client id"
    } else {
        "NOT sticky: not hashing on the client id"
    };
    format!(
        "{sticky}/{n} client ids found their session again ({verdict}), \
         sessions per broker {per_broker:?}, errors {errors}"
    )
}

// ---------------------------------------------------------------------------------------------
// Rounds

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Routemesh,
    Haproxy,
}

const TARGETS: [Target; 3] = [Target::Direct, Target::Routemesh, Target::Haproxy];

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct (brokers)",
            Target::Routemesh => "routemesh",
            Target::Haproxy => "HAProxy",
        }
    }
}

struct RoundResult {
    conns: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    latencies_us: Vec<u32>,
}

/// `clients` threads, each running MQTT sessions back to back against `addrs[t % len]` for
/// `secs` seconds; every client id is new (`tag` is unique per round).
fn run_round(addrs: &[SocketAddr], clients: usize, secs: u64, tag: &str) -> RoundResult {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let per_thread: Vec<(u64, u64, Option<String>, Vec<u32>)> = on_threads(clients, |t| {
        let addr = addrs[t % addrs.len()];
        let mut ok = 0u64;
        let mut errors = 0u64;
        let mut first_error = None;
        let mut lat = Vec::with_capacity(4096);
        let mut seq = 0u64;
        while Instant::now() < deadline {
            let id = format!("{tag}-{t}-{seq}");
            seq += 1;
            match mqtt_session(addr, &id, true) {
                Ok((l, _)) => {
                    ok += 1;
                    lat.push(l.as_micros().min(u32::MAX as u128) as u32);
                }
                Err(e) => {
                    errors += 1;
                    if first_error.is_none() {
                        first_error = Some(format!("{addr}: {e}"));
                    }
                    // Do not spin on a refused port.
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
        (ok, errors, first_error, lat)
    });
    let secs = start.elapsed().as_secs_f64();
    let mut r = RoundResult {
        conns: 0,
        errors: 0,
        first_error: None,
        secs,
        latencies_us: Vec::new(),
    };
    for (ok, err, first, lat) in per_thread {
        r.conns += ok;
        r.errors += err;
        if r.first_error.is_none() {
            r.first_error = first;
        }
        r.latencies_us.extend(lat);
    }
    r.latencies_us.sort_unstable();
    r
}

// ---------------------------------------------------------------------------------------------
// The reconnect storm

struct StormResult {
    /// First SYN → last CONNACK.
    total: Duration,
    ok: usize,
    failures: usize,
    first_error: Option<String>,
    /// Sorted connect → CONNACK latencies.
    latencies_us: Vec<u32>,
    rss_before: u64,
    /// All clients connected and idle.
    rss_held: u64,
    /// RSS each second after the clients closed, for 30 s.
    rss_after: Vec<u64>,
    /// Kernel counters over the storm: accept queues found full, SYNs sent again.
    listen_overflows: u64,
    syn_retrans: u64,
    /// The proxy's CPU time (all threads) from the first SYN until every client is through.
    cpu_secs: f64,
}

impl StormResult {
    /// Seconds after the close until RSS was within 20 % of the pre-storm figure.
    fn back_within(&self) -> Option<usize> {
        let bound = self.rss_before as f64 * 1.2;
        self.rss_after.iter().position(|&r| r as f64 <= bound)
    }
}

/// One MQTT client of the storm: connect, CONNECT (clean session), CONNACK; the open stream.
async fn storm_client(addr: SocketAddr, id: String) -> io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(id.as_bytes(), true)).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[0] != 0x20 || ack[1] != 0x02 || ack[3] != 0 {
        return Err(io::Error::other(format!("bad CONNACK {ack:02x?}")));
    }
    Ok(s)
}

/// Kernel counters a storm reads before and after (see [`tcp_ext`]).
const STORM_COUNTERS: [&str; 2] = ["ListenOverflows", "TCPSynRetrans"];

/// `n` clients at once, client i to `addrs[i % len]` (one proxy, or the brokers directly),
/// held until all are through, then closed; the proxy's (process `pid`) RSS before, while
/// held, and for 30 s after.
fn storm(addrs: &[SocketAddr], pid: Option<u32>, n: usize, tag: &str) -> StormResult {
    thread::sleep(Duration::from_millis(500));
    let rss = |pid: Option<u32>| pid.map_or(0, rss_bytes);
    let rss_before = rss(pid);
    let counters0 = tcp_ext(&STORM_COUNTERS);
    let cpu0 = pid.map_or(0.0, cpu_secs);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut r = rt.block_on(async {
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let id = format!("storm-{tag}-{i}");
                let proxy = addrs[i % addrs.len()];
                tokio::spawn(async move {
                    let t0 = tokio::time::Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(30), storm_client(proxy, id))
                        .await
                        .unwrap_or_else(|_| Err(io::Error::other("no CONNACK within 30 s")));
                    (t0.elapsed(), tokio::time::Instant::now(), r)
                })
            })
            .collect();
        let mut last = start;
        let mut held = Vec::with_capacity(n);
        let mut r = StormResult {
            total: Duration::ZERO,
            ok: 0,
            failures: 0,
            first_error: None,
            latencies_us: Vec::with_capacity(n),
            rss_before,
            rss_held: 0,
            rss_after: Vec::new(),
            listen_overflows: 0,
            syn_retrans: 0,
            cpu_secs: 0.0,
        };
        for t in tasks {
            let (latency, done, result) = t.await.expect("storm client panicked");
            match result {
                Ok(s) => {
                    r.ok += 1;
                    last = last.max(done);
                    r.latencies_us
                        .push(latency.as_micros().min(u32::MAX as u128) as u32);
                    held.push(s);
                }
                Err(e) => {
                    r.failures += 1;
                    r.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        r.total = last - start;
        let counters = tcp_ext(&STORM_COUNTERS);
        r.listen_overflows = counters[0] - counters0[0];
        r.syn_retrans = counters[1] - counters0[1];
        r.cpu_secs = pid.map_or(0.0, cpu_secs) - cpu0;
        // Every connection idle now: let the proxy settle, then read its RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.rss_held = rss(pid);
        drop(held);
        r
    });
    r.latencies_us.sort_unstable();
    if pid.is_some() {
        for _ in 0..env_or("MQTT_BENCH_AFTER_SECS", 30) {
            thread::sleep(Duration::from_secs(1));
            r.rss_after.push(rss(pid));
        }
    } else {
        // Let the brokers finish with the closed sessions before the next storm.
        thread::sleep(Duration::from_secs(3));
    }
    r
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The storm through a fresh routemesh and a fresh HAProxy at `threads`; a report section.
fn storm_section(
    dir: &Path,
    brokers: &[SocketAddr],
    threads: usize,
    n: usize,
    report: &mut String,
) {
    let _ = writeln!(
        report,
        "\n=== reconnect storm, {threads} thread(s): {n} MQTT clients at once (clean session, \
         distinct ids), held after CONNACK, then closed; fresh proxies ==="
    );
    let mut results = Vec::new();
    // The brokers without a proxy (the floor: what the brokers themselves take), routemesh
    // as shipped, routemesh with its allocator trimming off (what the trimming gives back),
    // HAProxy.
    for (label, which) in [
        ("direct", 3),
        ("routemesh", 0),
        ("rm no trim", 1),
        ("HAProxy", 2),
    ] {
        let port = free_port();
        let addr = loopback(port);
        let tag = format!("s{which}t{threads}");
        // Each proxy alive only for its own storm (its memory is what is measured).
        let (r, check) = match which {
            0 | 1 => {
                let env: &[(&str, &str)] = if which == 1 {
                    &[("ROUTEMESH_NO_TRIM", "1")]
                } else {
                    &[]
                };
                let d = start_routemesh_with(port, brokers, threads, env);
                let check = affinity_check(addr, brokers, &tag, 12);
                (storm(&[addr], Some(d.pid()), n, &tag), check)
            }
            2 => {
                let p = start_haproxy(dir, port, brokers, threads, n + 500);
                let check = affinity_check(addr, brokers, &tag, 12);
                (storm(&[addr], Some(p.pid()), n, &tag), check)
            }
            _ => (storm(brokers, None, n, &tag), "— (no proxy)".to_string()),
        };
        let per_conn = r.rss_held.saturating_sub(r.rss_before) as f64 / r.ok.max(1) as f64;
        eprintln!("  storm {label} done: {:.2} s", r.total.as_secs_f64());
        let _ = writeln!(report, "  {:<10} affinity: {check}", label);
        let _ = writeln!(
            report,
            "  {:<10} first SYN → last CONNACK {:.2} s, {} ok, {} failed{}, p50 {}, p99 {}",
            label,
            r.total.as_secs_f64(),
            r.ok,
            r.failures,
            r.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            fmt_us(percentile(&r.latencies_us, 0.50)),
            fmt_us(percentile(&r.latencies_us, 0.99)),
        );
        let _ = writeln!(
            report,
            "  {:<10} kernel over the storm: {} accept-queue overflows, {} SYNs sent again; \
             proxy CPU {}",
            label,
            r.listen_overflows,
            r.syn_retrans,
            if which == 3 {
                "— (no proxy)".to_string()
            } else {
                format!(
                    "{:.0} ms ({:.1} µs per connection)",
                    r.cpu_secs * 1e3,
                    r.cpu_secs * 1e6 / n as f64
                )
            }
        );
        if which == 3 {
            results.push((r, 0.0));
            continue;
        }
        let after = |s: usize| r.rss_after.get(s - 1).copied().unwrap_or(0);
        let _ = writeln!(
            report,
            "  {:<10} RSS {:.1} MiB before, {:.1} MiB held ({:.2} KiB per idle connection), \
             after close {:.1} / {:.1} / {:.1} MiB at 1 / 10 / 30 s; within 20 % of before: {}",
            label,
            mib(r.rss_before),
            mib(r.rss_held),
            per_conn / 1024.0,
            mib(after(1)),
            mib(after(10)),
            mib(after(30)),
            match r.back_within() {
                Some(s) => format!("after {} s", s + 1),
                None => "NOT within 30 s".into(),
            }
        );
        results.push((r, per_conn));
    }
    let (direct, rm, ha) = (&results[0], &results[1], &results[3]);
    let _ = writeln!(
        report,
        "  routemesh/HAProxy: storm time {} (target ≤ 0.8×), p99 {}, RSS per idle connection {}",
        ratio(rm.0.total.as_secs_f64(), ha.0.total.as_secs_f64()),
        ratio(
            percentile(&rm.0.latencies_us, 0.99),
            percentile(&ha.0.latencies_us, 0.99)
        ),
        ratio(rm.1, ha.1),
    );
    let _ = writeln!(
        report,
        "  storm time / direct: routemesh {}, HAProxy {}",
        ratio(rm.0.total.as_secs_f64(), direct.0.total.as_secs_f64()),
        ratio(ha.0.total.as_secs_f64(), direct.0.total.as_secs_f64()),
    );
}

fn haproxy_version() -> String {
    Command::new(haproxy_bin())
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "HAProxy (version unknown)".into())
}

fn main() {
    let opts = Opts::from_env();
    let dir = tempdir("routemesh-mqtt-bench");
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "MQTT new connections/s on 127.0.0.1 — {} core(s), {}, {BROKERS} mosquitto brokers; \
         per connection: CONNECT (3.1.1, clean session, new client id) → CONNACK → DISCONNECT → close",
        cores(),
        haproxy_version(),
    );

    let mut brokers = Vec::new();
    let mut broker_addrs = Vec::new();
    for i in 0..BROKERS {
        let (p, addr) = start_broker(dir.path(), i);
        brokers.push(p);
        broker_addrs.push(addr);
    }

    for &n in &opts.threads {
        if opts.storm > 0 {
            storm_section(dir.path(), &broker_addrs, n, opts.storm, &mut report);
            eprintln!("{report}");
        }
        if opts.storm_only {
            continue;
        }
        let clients = opts.clients_per_thread * n;
        let rm_port = free_port();
        let ha_port = free_port();
        let routemesh = start_routemesh(rm_port, &broker_addrs, n);
        let haproxy = start_haproxy(dir.path(), ha_port, &broker_addrs, n, 8000);
        let rm_addr = loopback(rm_port);
        let ha_addr = loopback(ha_port);

        let _ = writeln!(
            report,
            "\n=== {n} thread(s): routemesh worker_threads = {n}, HAProxy nbthread {n}; \
             {clients} client threads, {} round(s) × {} s, medians ===",
            opts.rounds, opts.secs
        );
        let _ = writeln!(
            report,
            "  affinity routemesh: {}",
            affinity_check(rm_addr, &broker_addrs, &format!("rm{n}"), 12)
        );
        let _ = writeln!(
            report,
            "  affinity HAProxy:   {}",
            affinity_check(ha_addr, &broker_addrs, &format!("ha{n}"), 12)
        );

        // Warm-up (one second each), not counted.
        for (t, addrs) in [(Target::Routemesh, [rm_addr]), (Target::Haproxy, [ha_addr])] {
            let r = run_round(&addrs, clients, 1, &format!("w{n}{t:?}"));
            if r.conns == 0 {
                panic!(
                    "{} serves no MQTT connection: {}",
                    t.label(),
                    r.first_error.unwrap_or_default()
                );
            }
        }

        let mut samples: Vec<(Target, Samples)> =
            TARGETS.iter().map(|&t| (t, Samples::default())).collect();
        for round in 0..opts.rounds {
            for t in round_order(&TARGETS, round) {
                let (addrs, pid): (Vec<SocketAddr>, Option<u32>) = match t {
                    Target::Direct => (broker_addrs.clone(), None),
                    Target::Routemesh => (vec![rm_addr], Some(routemesh.pid())),
                    Target::Haproxy => (vec![ha_addr], Some(haproxy.pid())),
                };
                let cpu0 = pid.map(cpu_secs);
                let tag = format!("r{n}{round}{}", &t.label()[..1]);
                let r = run_round(&addrs, clients, opts.secs, &tag);
                let cpu = pid.zip(cpu0).map(|(p, c0)| cpu_secs(p) - c0);
                let s = &mut samples.iter_mut().find(|(x, _)| *x == t).expect("target").1;
                let rate = r.conns as f64 / r.secs;
                let cpu_us = cpu
                    .filter(|_| r.conns > 0)
                    .map(|c| c / r.conns as f64 * 1e6);
                s.record(rate, &r.latencies_us, r.errors, cpu_us);
                eprintln!(
                    "  [{n} thread(s)] round {}/{} {:<17} {:>8.0} conn/s  p99 {}  errors {}{}",
                    round + 1,
                    opts.rounds,
                    t.label(),
                    rate,
                    fmt_us(percentile(&r.latencies_us, 0.99)),
                    r.errors,
                    r.first_error
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(300));
            }
        }

        let _ = writeln!(
            report,
            "  {:<17} {:>10} {:>10} {:>10} {:>14} {:>7}",
            "target", "conn/s", "p50", "p99", "CPU µs/conn", "errors"
        );
        for (t, s) in &samples {
            let cpu = median(&s.cpu_us);
            let _ = writeln!(
                report,
                "  {:<17} {:>10.0} {:>10} {:>10} {:>14} {:>7}",
                t.label(),
                median(&s.rate),
                fmt_us(median(&s.p50)),
                fmt_us(median(&s.p99)),
                fmt_cpu_us(cpu),
                s.failed
            );
        }
        let get = |t: Target| &samples.iter().find(|(x, _)| *x == t).expect("target").1;
        let (rm, ha) = (get(Target::Routemesh), get(Target::Haproxy));
        let _ = writeln!(
            report,
            "  routemesh/HAProxy: conn/s {}  p50 {}  p99 {}  CPU/conn {}  (conn/s: higher is better)",
            ratio(median(&rm.rate), median(&ha.rate)),
            ratio(median(&rm.p50), median(&ha.p50)),
            ratio(median(&rm.p99), median(&ha.p99)),
            ratio(median(&rm.cpu_us), median(&ha.cpu_us)),
        );
        drop(haproxy);
        drop(routemesh);
    }
    drop(brokers);
    let _ = writeln!(
        report,
        "\n(latency: connect → CONNACK; CPU: utime+stime of the proxy process over the round; \
         total run {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{report}");
}
