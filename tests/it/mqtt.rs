//! MQTT client-id affinity through Maglev, against real mosquitto brokers, real etcd and the
//! real daemon: the same client id lands on the same broker through every node, a persistent
//! session survives a reconnect through another node, only the departed broker's clients move
//! (and come back), and every bad first packet is closed and counted before any broker
//! connection is opened.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::daemon::service_tasks;
use crate::support::mosquitto::{Mosquitto, mosquitto_bin};
use crate::support::mqtt_wire::{self, CONNACK_ACCEPTED, DISCONNECT};
use crate::support::net::tcp_listener;
use crate::support::process::run_bounded;
use crate::support::{
    Config, Daemon, Etcd, Etcdctl, Listener, Task, eventually, free_addr, holds_for,
};

const P: &str = "/routemesh";
const WAIT: Duration = Duration::from_secs(15);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---- a minimal raw MQTT 3.1.1 client -------------------------------------------------------

/// A CONNECT (level 4, clean session, keep-alive 60) with an arbitrary client id.
fn connect_packet(client_id: &[u8]) -> Vec<u8> {
    mqtt_wire::connect(client_id, true, 60)
}

fn dial(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// CONNECT with `client_id` through `addr`, expect CONNACK accepted, then DISCONNECT.
fn mqtt_session(addr: SocketAddr, client_id: &str) {
    let mut s = dial(addr);
    s.write_all(&connect_packet(client_id.as_bytes())).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)
        .unwrap_or_else(|e| panic!("CONNACK for {client_id:?} via {addr}: {e}"));
    assert_eq!(ack, CONNACK_ACCEPTED, "CONNACK for {client_id:?}");
    s.write_all(&DISCONNECT).unwrap();
    // Wait for the broker to close, so its log has the session before we look.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

// ---- the cluster under test -----------------------------------------------------------------

/// The `mqtt` listener on `listen` and its service: Maglev on the client id, checks off.
fn mqtt_config(config: Config, listen: SocketAddr, max_connect_bytes: i64) -> Config {
    config
        .listener(Listener::tcp(listen, "mqtt").name("mqtt"))
        .set("service.mqtt.balance", "maglev")
        .set("service.mqtt.hash_key", "mqtt_client_id")
        .set("service.mqtt.peek_timeout", "1s")
        .set("service.mqtt.max_connect_bytes", max_connect_bytes)
        .set("service.mqtt.health.interval", "1h")
}

/// A static node `n1` whose `mqtt` listener (on a free port, returned) fronts the one
/// broker `broker` (task `broker-0`).
fn one_broker(broker: SocketAddr, max_connect_bytes: i64) -> (Config, SocketAddr) {
    let listen = free_addr();
    let config = mqtt_config(Config::static_tasks().node("n1"), listen, max_connect_bytes)
        .task(Task::new("mqtt", broker).id("broker-0"));
    (config, listen)
}

/// Node `node` on `etcd`: its `mqtt` listener on `listen`.
fn daemon_config(node: &str, etcd: &Etcd, listen: SocketAddr) -> Config {
    let etcd = Config::etcd(&[etcd.endpoint()])
        .node(node)
        .set("node.advertise", "127.0.0.1")
        .set("discovery.prefix", P)
        .set("discovery.node_ttl", "2s")
        .set("discovery.dial_timeout", "1s");
    mqtt_config(etcd, listen, 65536).set("service.mqtt.connect_timeout", "300ms")
}

struct Cluster {
    brokers: Vec<Mosquitto>,
    daemons: Vec<Daemon>,
    listens: Vec<SocketAddr>,
    etcd: Etcd,
}

impl Cluster {
    fn start(brokers: usize, daemons: usize) -> Cluster {
        let etcd = Etcd::start();
        let brokers: Vec<_> = (0..brokers)
            .map(|i| Mosquitto::start(&format!("b{i}")))
            .collect();
        for (i, b) in brokers.iter().enumerate() {
            etcd.put(&task_key(i), &format!(r#"{{"addr":"{}"}}"#, b.addr()));
        }
        let listens: Vec<_> = (0..daemons).map(|_| free_addr()).collect();
        let daemons: Vec<_> = listens
            .iter()
            .enumerate()
            .map(|(i, l)| daemon_config(&format!("n{i}"), &etcd, *l).start())
            .collect();
        let c = Cluster {
            brokers,
            daemons,
            listens,
            etcd,
        };
        c.wait_tasks(c.brokers.len());
        c
    }

    /// Waits until every daemon routes to exactly `n` broker tasks.
    fn wait_tasks(&self, n: usize) {
        for d in &self.daemons {
            eventually(WAIT, &format!("{n} mqtt tasks in /routes"), || {
                service_tasks(&d.routes(), "mqtt").len() == n
            });
        }
    }

    /// Log positions: how many sessions each broker has logged so far.
    fn marks(&self) -> Vec<usize> {
        self.brokers
            .iter()
            .map(|b| b.connected_client_ids().len())
            .collect()
    }

    /// Client id → broker indices of the sessions logged since `marks` (waits for `expect`
    /// sessions in all).
    fn sessions_since(&self, marks: &[usize], expect: usize) -> BTreeMap<String, Vec<usize>> {
        let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        eventually(WAIT, &format!("{expect} sessions in broker logs"), || {
            out.clear();
            for (i, b) in self.brokers.iter().enumerate() {
                for id in b.connected_client_ids().into_iter().skip(marks[i]) {
                    out.entry(id).or_default().push(i);
                }
            }
            out.values().map(Vec::len).sum::<usize>() >= expect
        });
        out
    }

    /// Connects each id once through `via` and returns id → broker.
    fn placement(&self, ids: &[String], via: SocketAddr) -> BTreeMap<String, usize> {
        let marks = self.marks();
        for id in ids {
            mqtt_session(via, id);
        }
        self.sessions_since(&marks, ids.len())
            .into_iter()
            .map(|(id, b)| {
                assert_eq!(b.len(), 1, "{id} connected once but logged {b:?}");
                (id, b[0])
            })
            .collect()
    }
}

fn task_key(i: usize) -> String {
    format!("{P}/tasks/mqtt/broker-{i}")
}

fn client_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("esp8266-{i:04x}")).collect()
}

#[test]
fn every_client_id_reaches_the_same_broker_through_every_node() {
    let c = Cluster::start(3, 3);
    let ids = client_ids(300);
    let marks = c.marks();
    for id in &ids {
        for l in &c.listens {
            mqtt_session(*l, id);
        }
    }
    let sessions = c.sessions_since(&marks, 900);
    let mut per_broker = [0usize; 3];
    for id in &ids {
        let got = sessions.get(id).cloned().unwrap_or_default();
        assert_eq!(got.len(), 3, "{id}: {got:?}");
        assert!(
            got.iter().all(|&b| b == got[0]),
            "{id} reached different brokers through different nodes: {got:?}"
        );
        per_broker[got[0]] += 1;
    }
    eprintln!("client ids per broker: {per_broker:?}");
    assert!(per_broker.iter().all(|&n| n > 60), "{per_broker:?}");

    // An empty client id (the broker assigns one) routes by source IP: one broker for all.
    let marks = c.marks();
    for _ in 0..3 {
        for l in &c.listens {
            mqtt_session(*l, "");
        }
    }
    let sessions = c.sessions_since(&marks, 9);
    let brokers: BTreeSet<usize> = sessions.values().flatten().copied().collect();
    assert_eq!(brokers.len(), 1, "empty ids spread over {sessions:?}");
}

fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    let out =
        run_bounded(cmd, stdin, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn persistent_session_survives_a_reconnect_through_another_node() {
    let c = Cluster::start(3, 2);
    let (sub, publ) = (
        mosquitto_bin("mosquitto_sub"),
        mosquitto_bin("mosquitto_pub"),
    );
    // All three protocol levels, with real clients (v5 sends CONNECT properties).
    for version in ["mqttv31", "mqttv311", "mqttv5"] {
        let id = format!("persist-{version}");
        let topic = format!("rm/persist/{version}");
        let port = |a: SocketAddr| a.port().to_string();
        // 1. Subscribe with clean session off through node 1, then disconnect.
        let marks = c.marks();
        run(
            Command::new(&sub)
                .args(["-h", "127.0.0.1", "-p", &port(c.listens[0]), "-V", version])
                .args(["-i", &id, "-c", "-q", "1", "-t", &topic, "-E"]),
            None,
        );
        let sessions = c.sessions_since(&marks, 1);
        let holder = sessions[&id][0];
        // 2. 20 QoS 1 messages straight to the broker holding the session.
        let lines: String = (0..20).map(|i| format!("msg-{i}\n")).collect();
        run(
            Command::new(&publ)
                .args(["-h", "127.0.0.1", "-p", &port(c.brokers[holder].addr())])
                .args(["-q", "1", "-t", &topic, "-l"]),
            Some(lines.as_bytes()),
        );
        // 3. Reconnect through node 2: all 20 arrive.
        let out = run(
            Command::new(&sub)
                .args(["-h", "127.0.0.1", "-p", &port(c.listens[1]), "-V", version])
                .args(["-i", &id, "-c", "-q", "1", "-t", &topic])
                .args(["-C", "20", "-W", "20"]),
            None,
        );
        let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let want: Vec<String> = (0..20).map(|i| format!("msg-{i}")).collect();
        assert_eq!(
            got, want,
            "{version}: queued messages after reconnect via node 2"
        );
        assert!(
            c.brokers[holder]
                .connected_client_ids()
                .iter()
                .filter(|x| **x == id)
                .count()
                == 2,
            "{version}: both sessions on broker {holder}"
        );
    }
}

#[test]
fn only_the_departed_brokers_clients_move_and_they_come_back() {
    let c = Cluster::start(3, 2);
    let ids = client_ids(300);
    let before = c.placement(&ids, c.listens[0]);
    assert_eq!(before, c.placement(&ids, c.listens[1]), "nodes agree");

    let gone = 1;
    c.etcd.del(&task_key(gone));
    c.wait_tasks(2);
    let during = c.placement(&ids, c.listens[1]);
    let held: BTreeSet<&String> = before
        .iter()
        .filter(|(_, b)| **b == gone)
        .map(|(i, _)| i)
        .collect();
    let moved: BTreeSet<&String> = ids.iter().filter(|i| before[*i] != during[*i]).collect();
    let fraction = moved.len() as f64 / ids.len() as f64;
    eprintln!(
        "broker {gone} held {} of {} client ids; {} moved ({:.1} %)",
        held.len(),
        ids.len(),
        moved.len(),
        fraction * 100.0
    );
    assert!(
        during.values().all(|b| *b != gone),
        "nobody reaches the removed task"
    );
    assert!(held.is_subset(&moved), "all of its clients moved");
    let others_moved = moved.difference(&held).count();
    assert!(
        others_moved as f64 <= 0.01 * ids.len() as f64,
        "{others_moved} clients of the remaining brokers moved"
    );
    assert_eq!(during, c.placement(&ids, c.listens[0]), "nodes agree");

    c.etcd.put(
        &task_key(gone),
        &format!(r#"{{"addr":"{}"}}"#, c.brokers[gone].addr()),
    );
    c.wait_tasks(3);
    assert_eq!(before, c.placement(&ids, c.listens[0]), "they come back");
    assert_eq!(before, c.placement(&ids, c.listens[1]), "they come back");
}

// ---- bad first packets ----------------------------------------------------------------------

fn error_count(d: &Daemon, reason: &str) -> u64 {
    let (_, metrics) = d.admin_get("/metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("routemesh_mqtt_connect_errors_total{"))
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")) && l.contains("service=\"mqtt\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Sends `bytes` (then keeps the socket open), expects the proxy to close within `within`.
fn expect_closed(listen: SocketAddr, bytes: &[u8], within: Duration) -> Duration {
    let mut s = dial(listen);
    s.set_read_timeout(Some(within)).unwrap();
    let t0 = Instant::now();
    // The proxy may close before all is written; a reset here is fine.
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("proxy answered {:?} to a bad first packet", &buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {within:?}: {e}"),
    }
    t0.elapsed()
}

/// A CONNECT larger than the first read (256 bytes) and than a read chunk (4 KiB): a 6,000-byte
/// client id, whole and in two pieces, is read to its end and routed.
#[test]
fn a_large_connect_is_read_whole_and_routed() {
    let broker = Mosquitto::start("large");
    let (config, listen) = one_broker(broker.addr(), 65536);
    let d = config.start();
    let id = format!("large-{}", "x".repeat(6000));
    for split in [None, Some(300)] {
        let mut s = dial(listen);
        let pkt = connect_packet(id.as_bytes());
        match split {
            None => s.write_all(&pkt).unwrap(),
            Some(at) => {
                s.write_all(&pkt[..at]).unwrap();
                // Shaped input: the rest arrives as a read of its own.
                std::thread::sleep(Duration::from_millis(50));
                s.write_all(&pkt[at..]).unwrap();
            }
        }
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack)
            .unwrap_or_else(|e| panic!("CONNACK (split {split:?}): {e}"));
        assert_eq!(ack, [0x20, 2, 0, 0], "split {split:?}");
    }
    assert_eq!(d.metric_sum("routemesh_mqtt_connect_errors_total"), 0.0);
}

#[test]
fn bad_first_packets_are_closed_counted_and_never_reach_a_broker() {
    let broker = Mosquitto::start("bad");
    let (config, listen) = one_broker(broker.addr(), 1024);
    let d = config.start();

    // Control: a good CONNECT arriving in pieces is routed (partial input is not an error).
    let mut s = dial(listen);
    let pkt = connect_packet(b"good-client");
    for piece in pkt.chunks(5) {
        s.write_all(piece).unwrap();
        // A pause between the pieces, so that they arrive as separate reads (not a wait on
        // state: the input is shaped).
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    drop(s);
    eventually(WAIT, "good-client logged", || {
        broker.connected_client_ids() == ["good-client"]
    });
    let accepted = broker.accepted_connections();

    let mut rng = fastrand::Rng::with_seed(0x6d717474);
    let random: Vec<u8> = (0..200).map(|_| rng.u8(..)).collect();
    let mut big_id = connect_packet(&[b'x'; 2000]);
    big_id.truncate(600);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "PUBLISH first",
            b"\x30\x07\x00\x03a/bhi".to_vec(),
            "not_connect",
        ),
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "not_connect",
        ),
        (
            "fifth length byte",
            b"\x10\xff\xff\xff\xff\x01".to_vec(),
            "bad_length",
        ),
        (
            "length over max_connect_bytes",
            b"\x10\xff\xff\x7f".to_vec(),
            "too_large",
        ),
        ("id > max_connect_bytes", big_id, "too_large"),
        (
            "id not UTF-8",
            connect_packet(b"dev\xff\xfe"),
            "client_id_utf8",
        ),
        (
            "id with U+0000",
            connect_packet(b"dev\0ice"),
            "client_id_nul",
        ),
        (
            "unknown protocol",
            b"\x10\x0a\x00\x04MQTT\x09\x02\x00\x3c".to_vec(),
            "bad_protocol",
        ),
        ("random bytes", random, "not_connect"),
    ];
    for (what, bytes, reason) in &cases {
        let n = error_count(&d, reason);
        let took = expect_closed(listen, bytes, Duration::from_secs(3));
        assert!(
            took < Duration::from_millis(900),
            "{what}: closed after {took:?}, not at once"
        );
        eventually(WAIT, &format!("{what}: counted as {reason}"), || {
            error_count(&d, reason) == n + 1
        });
    }

    // Truncated, then silence: closed at peek_timeout (1 s).
    let took = expect_closed(
        listen,
        &connect_packet(b"slow-client")[..9],
        Duration::from_secs(5),
    );
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before peek_timeout"
    );
    eventually(WAIT, "timeout counted", || error_count(&d, "timeout") == 1);
    // Connected, then closed before a whole CONNECT.
    let mut s = dial(listen);
    s.write_all(&connect_packet(b"gone")[..4]).unwrap();
    drop(s);
    eventually(WAIT, "early close counted", || {
        error_count(&d, "closed") == 1
    });

    // The broker never saw any of them: no new TCP connection, no new session. Each case was
    // counted above, after the daemon had closed it, so a connection it had opened to the
    // broker would show in the broker's log at once; watch that log for a while more.
    holds_for(
        Duration::from_millis(200),
        "no new connection or session at the broker",
        || {
            broker.accepted_connections() == accepted
                && broker.connected_client_ids() == ["good-client"]
        },
    );
    // And the daemon is still routing.
    mqtt_session(listen, "after-the-storm");
}

#[test]
fn a_dead_broker_fails_over_identically_on_every_node() {
    // The task stays registered but its broker is down: each node ejects it after a failed
    // connect and walks on in the table, so both nodes send its clients to the same place.
    let mut c = Cluster::start(3, 2);
    let ids = client_ids(150);
    let before = c.placement(&ids, c.listens[0]);
    let dead = 2;
    c.brokers[dead].stop();
    let via0 = c.placement(&ids, c.listens[0]);
    let via1 = c.placement(&ids, c.listens[1]);
    assert_eq!(via0, via1, "the fallback is the same on every node");
    for id in &ids {
        if before[id] == dead {
            assert_ne!(via0[id], dead, "{id}");
        } else {
            assert_eq!(via0[id], before[id], "{id} was not on the dead broker");
        }
    }
    // Back up: once the ejection lapses, its clients return.
    c.brokers[dead].start_again();
    let back: Vec<String> = ids
        .iter()
        .filter(|id| before[*id] == dead)
        .take(5)
        .cloned()
        .collect();
    eventually(
        Duration::from_secs(40),
        "clients back on the restarted broker",
        || {
            c.placement(&back, c.listens[0])
                .values()
                .all(|b| *b == dead)
        },
    );
}

/// `max_pending_connects`: a broker that is slow to accept never finds more than that many
/// connections from the proxy waiting for its CONNACK (its accept queue cannot overflow in
/// a storm), and every client still gets its CONNACK.
#[test]
fn paced_connects_never_queue_more_than_max_pending_connects_at_a_broker() {
    use std::sync::mpsc;

    const CLIENTS: usize = 12;
    const LIMIT: usize = 3;
    let broker = tcp_listener();
    let broker_addr = broker.local_addr().unwrap();
    broker.set_nonblocking(true).unwrap();
    let (batches_tx, batches) = mpsc::channel::<usize>();
    // The broker: every 200 ms it takes all the connections queued at it, reads each CONNECT
    // and answers CONNACK; it keeps them open until the test ends.
    let broker_thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        while held.len() < CLIENTS && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            let mut batch = Vec::new();
            while let Ok((s, _)) = broker.accept() {
                batch.push(s);
            }
            if batch.is_empty() {
                continue;
            }
            batches_tx.send(batch.len()).unwrap();
            for mut s in batch {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut head = [0u8; 2];
                s.read_exact(&mut head).unwrap();
                let mut rest = vec![0u8; head[1] as usize];
                s.read_exact(&mut rest).unwrap();
                s.write_all(&CONNACK_ACCEPTED).unwrap();
                held.push(s);
            }
        }
        held.len()
    });
    let (config, listen) = one_broker(broker_addr, 65536);
    let d = config
        .set("service.mqtt.max_pending_connects", LIMIT as i64)
        .set("service.mqtt.peek_timeout", "20s")
        .set("service.mqtt.connect_timeout", "20s")
        .start();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = dial(listen);
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(&connect_packet(format!("paced-{i}").as_bytes()))
                    .unwrap();
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack)
                    .unwrap_or_else(|e| panic!("CONNACK for paced-{i}: {e}"));
                assert_eq!(ack, CONNACK_ACCEPTED, "paced-{i}");
                s
            })
        })
        .collect();
    // /routes shows the paced connections as the task's `unanswered`: never above the limit.
    let unanswered = || -> u64 {
        service_tasks(&d.routes(), "mqtt")[0]["unanswered"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    let mut most = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        most = most.max(unanswered());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(most <= LIMIT as u64, "{most} unanswered at once");
    eventually(WAIT, "every CONNACK answered in /routes", || {
        unanswered() == 0
    });
    let connected: Vec<TcpStream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(connected.len(), CLIENTS);
    assert_eq!(
        broker_thread.join().unwrap(),
        CLIENTS,
        "the broker saw every client"
    );
    let seen: Vec<usize> = batches.try_iter().collect();
    assert_eq!(seen.iter().sum::<usize>(), CLIENTS, "{seen:?}");
    assert!(
        seen.iter().all(|&n| n <= LIMIT),
        "at most {LIMIT} connections queued at the broker at once: {seen:?}"
    );
    assert!(seen.len() >= CLIENTS / LIMIT, "{seen:?}");
}
