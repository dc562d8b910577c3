//! The `[dns]` responder against real daemons, real etcd and `dig` (Debian dnsutils): three
//! daemons on 127.0.0.1/.2/.3 (all loopback on Linux), each advertising its own address and
//! answering DNS on it. Every node's answers name the live nodes only: a SIGKILLed node is
//! gone from every survivor's answers within node_ttl + 1 s and returns when it restarts;
//! SRV, REFUSED, NODATA, truncation over UDP with the full answer over TCP, EDNS sizes, and
//! every kind of malformed packet (FORMERR or silence, and the daemon keeps answering).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::process::run_bounded;
use crate::support::{
    Config, Daemon, Etcd, Etcdctl, Listener, TcpBackend, eventually, eventually_value, free_port,
    hello,
};

const ZONE: &str = "mesh.test";
const P: &str = "/routemesh";
/// node_ttl of every daemon: a dead node must be gone within this + 1 s.
const NODE_TTL_SECS: u64 = 2;
const WAIT: Duration = Duration::from_secs(20);

fn dig_bin() -> String {
    let path = "/usr/bin/dig";
    if !std::path::Path::new(path).exists() {
        panic!("dig not found: run `bash .ci/run` or `apt-get install -y dnsutils`");
    }
    path.to_string()
}

/// One parsed `dig` reply.
#[derive(Debug, Default)]
struct Reply {
    status: String,
    flags: BTreeSet<String>,
    /// `[name, ttl, class, type, data...]` per record.
    answer: Vec<Vec<String>>,
    authority: Vec<Vec<String>>,
    additional: Vec<Vec<String>>,
    msg_size: usize,
    text: String,
}

impl Reply {
    /// The data of answer records of type `t`.
    fn data(&self, t: &str) -> Vec<String> {
        self.answer
            .iter()
            .filter(|r| r.get(3).map(String::as_str) == Some(t))
            .map(|r| r[4..].join(" "))
            .collect()
    }
}

/// `dig @server -p port ARGS`; None when no reply came (timeout).
fn dig(server: SocketAddr, args: &[&str]) -> Option<Reply> {
    let mut cmd = Command::new(dig_bin());
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=1", "+tries=1", "+nocookie"])
        .args(args);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).expect("dig runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("->>HEADER<<-") {
        return None;
    }
    let mut r = Reply {
        text: text.clone(),
        ..Default::default()
    };
    let mut section = "";
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("status: ").nth(1) {
            r.status = rest.split(',').next().unwrap_or_default().to_string();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            let flags = rest.split(';').next().unwrap_or_default();
            r.flags = flags.split_whitespace().map(String::from).collect();
        } else if let Some(rest) = line.strip_prefix(";; MSG SIZE  rcvd: ") {
            r.msg_size = rest.trim().parse().unwrap_or(0);
        } else if line.starts_with(";; ") && line.ends_with("SECTION:") {
            section = line;
        } else if line.is_empty() {
            section = "";
        } else if !line.starts_with(';') {
            let fields: Vec<String> = line.split_whitespace().map(String::from).collect();
            match section {
                ";; ANSWER SECTION:" => r.answer.push(fields),
                ";; AUTHORITY SECTION:" => r.authority.push(fields),
                ";; ADDITIONAL SECTION:" => r.additional.push(fields),
                _ => {}
            }
        }
    }
    Some(r)
}

fn must_dig(server: SocketAddr, args: &[&str]) -> Reply {
    dig(server, args).unwrap_or_else(|| panic!("no DNS reply from {server} to {args:?}"))
}

/// A daemon config: `ip` is its advertise address and where all its ports are bound.
fn config(name: &str, ip: &str, etcd: &Etcd, ports: &Ports) -> Config {
    let at = |port: u16| SocketAddr::from((ip.parse::<std::net::IpAddr>().unwrap(), port));
    Config::etcd(&[etcd.endpoint()])
        .node(name)
        .set("node.advertise", ip)
        .set("discovery.prefix", P)
        .set("discovery.node_ttl", format!("{NODE_TTL_SECS}s"))
        .set("discovery.dial_timeout", "1s")
        .set("dns.listen", at(ports.dns).to_string())
        .set("dns.zone", ZONE)
        .set("dns.ttl", "1s")
        .listener(Listener::tcp(at(ports.mqtt), "mqtt").name("mqtt"))
        .listener(Listener::tcp(at(ports.web), "web").name("web"))
        .set("service.web.connect_timeout", "300ms")
}

/// The same port numbers on every node, as in a real cluster.
struct Ports {
    dns: u16,
    mqtt: u16,
    web: u16,
}

fn node_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 1)
}

struct Cluster {
    etcd: Etcd,
    ports: Ports,
    daemons: Vec<Option<Daemon>>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        dig_bin();
        let etcd = Etcd::start();
        let ports = Ports {
            dns: free_port(),
            mqtt: free_port(),
            web: free_port(),
        };
        let mut c = Cluster {
            etcd,
            ports,
            daemons: Vec::new(),
        };
        for i in 0..n {
            let d = c.start_node(i);
            c.daemons.push(Some(d));
        }
        c
    }

    fn start_node(&self, i: usize) -> Daemon {
        let mut d = config(&format!("n{}", i + 1), &node_ip(i), &self.etcd, &self.ports).start();
        d.wait_ready();
        d
    }

    fn dns(&self, i: usize) -> SocketAddr {
        format!("{}:{}", node_ip(i), self.ports.dns)
            .parse()
            .unwrap()
    }

    fn a_records(&self, i: usize, name: &str) -> Option<Vec<String>> {
        dig(self.dns(i), &[name, "A"]).map(|r| r.data("A"))
    }

    /// Waits until node `i` answers `name` A with exactly `ips` (as a set).
    fn wait_answers(&self, i: usize, ips: &[String]) {
        let want: BTreeSet<String> = ips.iter().cloned().collect();
        eventually(WAIT, &format!("node {i} to answer {want:?}"), || {
            self.a_records(i, &format!("www.{ZONE}"))
                .is_some_and(|got| got.into_iter().collect::<BTreeSet<_>>() == want)
        });
    }
}

#[test]
fn three_nodes_answer_with_live_nodes_only_rotated_and_a_dead_node_leaves_and_returns() {
    let mut c = Cluster::start(3);
    let all: Vec<String> = (0..3).map(node_ip).collect();
    for i in 0..3 {
        c.wait_answers(i, &all);
    }

    // All three, rotated: over a few queries each node comes first at least once.
    let www = format!("www.{ZONE}");
    let mut firsts = BTreeSet::new();
    for _ in 0..9 {
        let r = must_dig(c.dns(0), &[&www, "A"]);
        assert_eq!(r.status, "NOERROR");
        assert!(r.flags.contains("aa"), "{}", r.text);
        let a = r.data("A");
        assert_eq!(a.len(), 3, "{}", r.text);
        assert_eq!(r.answer[0][1], "1", "ttl from [dns] ttl: {}", r.text);
        firsts.insert(a[0].clone());
    }
    assert_eq!(firsts.len(), 3, "answers are rotated: {firsts:?}");
    // The apex answers too, and each node's own name only that node.
    assert_eq!(
        must_dig(c.dns(1), &[ZONE, "A"]).data("A").len(),
        3,
        "apex A"
    );
    assert_eq!(
        must_dig(c.dns(1), &[&format!("n3.nodes.{ZONE}"), "A"]).data("A"),
        [node_ip(2)]
    );

    // SRV for the mqtt listeners: every node with the published port, glue included.
    let r = must_dig(c.dns(2), &[&format!("_mqtt._tcp.{ZONE}"), "SRV"]);
    assert_eq!(r.status, "NOERROR");
    let srv = r.data("SRV");
    assert_eq!(srv.len(), 3, "{}", r.text);
    for s in &srv {
        let f: Vec<&str> = s.split(' ').collect();
        assert_eq!(f[2], c.ports.mqtt.to_string(), "{}", r.text);
        assert!(f[3].ends_with(&format!(".nodes.{ZONE}.")), "{}", r.text);
    }
    assert_eq!(r.additional.len(), 3, "glue: {}", r.text);

    // SOA and NS at the apex (NS = the Ready nodes, with glue).
    let r = must_dig(c.dns(0), &[ZONE, "NS"]);
    assert_eq!(r.data("NS").len(), 3, "{}", r.text);
    assert_eq!(r.additional.len(), 3, "{}", r.text);
    let r = must_dig(c.dns(0), &[ZONE, "SOA"]);
    assert_eq!(r.data("SOA").len(), 1, "{}", r.text);

    // Outside the zone: REFUSED, never recursion.
    for name in ["example.com", "www.example.org", "xmesh.test", "."] {
        let r = must_dig(c.dns(0), &[name, "A"]);
        assert_eq!(r.status, "REFUSED", "{name}: {}", r.text);
        assert!(r.answer.is_empty());
        assert!(!r.flags.contains("ra"));
    }
    // NODATA: NOERROR, no answer, the SOA in authority.
    for t in ["MX", "TXT", "AAAA"] {
        let r = must_dig(c.dns(1), &[&www, t]);
        assert_eq!(r.status, "NOERROR", "{t}: {}", r.text);
        assert!(r.answer.is_empty(), "{t}: {}", r.text);
        assert_eq!(r.authority.len(), 1, "{t}: {}", r.text);
        assert_eq!(r.authority[0][3], "SOA", "{t}: {}", r.text);
    }
    // ANY: one HINFO (RFC 8482).
    let r = must_dig(c.dns(1), &[ZONE, "ANY"]);
    assert_eq!(r.answer.len(), 1, "{}", r.text);
    assert_eq!(r.answer[0][3], "HINFO", "{}", r.text);

    // The reference scenario, before the kill: resolve, then fetch through the published port.
    let backend = TcpBackend::start("web-1");
    c.etcd.put(
        &format!("{P}/tasks/web/w1"),
        &format!(r#"{{"addr":"{}"}}"#, backend.addr()),
    );
    let fetch = |c: &Cluster, resolver: usize| -> (String, Result<String, String>) {
        let ips = c
            .a_records(resolver, &www)
            .unwrap_or_else(|| panic!("no DNS reply from node {resolver}"));
        let ip = ips.first().cloned().expect("at least one address");
        let addr: SocketAddr = format!("{ip}:{}", c.ports.web).parse().unwrap();
        (ip, hello(addr).map_err(|e| e.to_string()))
    };
    eventually(WAIT, "a fetch through a resolved address", || {
        fetch(&c, 0).1.is_ok_and(|n| n == "web-1")
    });

    // Kill node 3: within node_ttl + 1 s no survivor names it.
    let dead = node_ip(2);
    c.daemons[2].as_mut().unwrap().kill();
    let killed = Instant::now();
    let limit = Duration::from_secs(NODE_TTL_SECS + 1);
    eventually_value(
        limit + Duration::from_secs(5),
        "every survivor to stop naming the dead node",
        || {
            (0..2)
                .all(|i| {
                    c.a_records(i, &www)
                        .is_some_and(|a| !a.contains(&dead) && a.len() == 2)
                })
                .then_some(())
        },
    );
    let took = killed.elapsed();
    assert!(
        took <= limit,
        "the dead node left the answers after {took:?}, more than node_ttl + 1 s"
    );
    // ... and from then on no answer from any survivor names it, and every fetch works.
    for round in 0..20 {
        let resolver = round % 2;
        let r = must_dig(c.dns(resolver), &[&www, "A"]);
        assert!(!r.data("A").contains(&dead), "round {round}: {}", r.text);
        let srv = must_dig(c.dns(resolver), &[&format!("_mqtt._tcp.{ZONE}"), "SRV"]);
        assert_eq!(srv.data("SRV").len(), 2, "{}", srv.text);
        let ns = must_dig(c.dns(resolver), &[ZONE, "NS"]);
        assert_eq!(ns.data("NS").len(), 2, "{}", ns.text);
        let (ip, got) = fetch(&c, resolver);
        assert_ne!(ip, dead, "round {round}");
        assert_eq!(got.as_deref(), Ok("web-1"), "round {round} via {ip}");
    }

    // It comes back with the node.
    c.daemons[2] = Some(c.start_node(2));
    for i in 0..3 {
        c.wait_answers(i, &all);
    }

    // The metric counts queries by type and rcode.
    let (status, body) = c.daemons[0].as_ref().unwrap().admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("routemesh_dns_queries_total{rcode=\"REFUSED\",type=\"A\"}")),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("routemesh_dns_queries_total{rcode=\"NOERROR\",type=\"SRV\"}")),
        "{body}"
    );
}

/// Registers `n` extra Ready nodes directly in etcd (`127.0.1.X`, no listeners).
fn register_extra_nodes(etcd: &Etcd, n: usize) {
    for x in 1..=n {
        let v =
            format!(r#"{{"advertise":"127.0.1.{x}","version":"x","started":0,"listeners":[]}}"#);
        etcd.put(&format!("{P}/nodes/x{x}/alive"), &v);
        etcd.put(&format!("{P}/nodes/x{x}/info"), &v);
    }
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp_honouring_edns() {
    let c = Cluster::start(1);
    register_extra_nodes(&c.etcd, 40);
    let www = format!("www.{ZONE}");
    eventually(WAIT, "41 nodes in the answer over TCP", || {
        dig(c.dns(0), &[&www, "A", "+tcp"]).is_some_and(|r| r.data("A").len() == 41)
    });

    // UDP, dig's default EDNS size (1232): over ten times the query, so truncated.
    let r = must_dig(c.dns(0), &[&www, "A", "+ignore"]);
    assert!(r.flags.contains("tc"), "{}", r.text);
    assert!(r.answer.is_empty(), "{}", r.text);
    // dig retries over TCP by itself and gets everything.
    let r = must_dig(c.dns(0), &[&www, "A"]);
    assert_eq!(r.data("A").len(), 41, "{}", r.text);
    assert!(!r.flags.contains("tc"), "{}", r.text);
    let r = must_dig(c.dns(0), &[&www, "A", "+tcp"]);
    assert_eq!(r.data("A").len(), 41, "{}", r.text);

    // EDNS honoured: a long name makes a large query (so the 10x cap is not the limit).
    let long = format!("{}.{}.{ZONE}", "a".repeat(60), "b".repeat(60));
    let r = must_dig(c.dns(0), &[&long, "A", "+ignore", "+bufsize=512"]);
    assert!(r.flags.contains("tc"), "{}", r.text);
    let r = must_dig(c.dns(0), &[&long, "A", "+ignore", "+noedns"]);
    assert!(r.flags.contains("tc"), "{}", r.text);
    let r = must_dig(c.dns(0), &[&long, "A", "+ignore", "+bufsize=4096"]);
    assert!(!r.flags.contains("tc"), "{}", r.text);
    assert_eq!(r.data("A").len(), 41, "{}", r.text);
    assert!(r.msg_size > 512, "{}", r.text);
    let r = must_dig(c.dns(0), &[&long, "A", "+ignore", "+bufsize=700"]);
    assert!(
        r.flags.contains("tc"),
        "a 700-byte limit is honoured: {}",
        r.text
    );
}

fn header(id: u16, qdcount: u16) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&[0x01, 0x00]);
    h.extend_from_slice(&qdcount.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    h
}

/// Sends one datagram; the reply within 1 s, if any.
fn udp_exchange(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.send_to(packet, server).unwrap();
    let mut buf = [0u8; 65535];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// FORMERR (rcode 1) for `id`, or silence.
fn assert_formerr_or_silence(what: &str, id: u16, reply: Option<Vec<u8>>) {
    if let Some(r) = reply {
        assert!(r.len() >= 12, "{what}: short reply {r:?}");
        assert_eq!(u16::from_be_bytes([r[0], r[1]]), id, "{what}");
        assert!(r[2] & 0x80 != 0, "{what}: QR set");
        assert_eq!(r[3] & 0x0f, 1, "{what}: FORMERR, got {r:?}");
    }
}

#[test]
fn malformed_packets_get_formerr_or_silence_and_the_daemon_keeps_answering() {
    let c = Cluster::start(1);
    let server = c.dns(0);
    c.wait_answers(0, &[node_ip(0)]);

    // Truncated header.
    assert_eq!(udp_exchange(server, &[0x12, 0x34, 0x01]), None);
    // Header promising a question that is not there.
    let reply = udp_exchange(server, &header(0x1111, 1));
    assert!(reply.is_some(), "a readable header gets FORMERR");
    assert_formerr_or_silence("missing question", 0x1111, reply);
    // A compression pointer loop (points at itself), and two pointing at each other.
    let mut p = header(0x2222, 1);
    p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_formerr_or_silence("pointer loop", 0x2222, udp_exchange(server, &p));
    let mut p = header(0x2323, 1);
    p.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
    assert_formerr_or_silence("pointer ping-pong", 0x2323, udp_exchange(server, &p));
    // An oversized label (64 bytes) and a name over 255 bytes.
    let mut p = header(0x3333, 1);
    p.push(64);
    p.extend_from_slice(&[b'a'; 64]);
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_formerr_or_silence("oversized label", 0x3333, udp_exchange(server, &p));
    let mut p = header(0x3434, 1);
    for _ in 0..5 {
        p.push(63);
        p.extend_from_slice(&[b'a'; 63]);
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_formerr_or_silence("over-long name", 0x3434, udp_exchange(server, &p));
    // Random bytes (seeded), queries and not.
    let mut rng = fastrand::Rng::with_seed(53);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..300 {
        let len = rng.usize(0..200);
        let mut p: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if i % 2 == 0 && p.len() > 2 {
            p[2] &= 0x7f;
        }
        s.send_to(&p, server).unwrap();
    }
    // Garbage over TCP: a length prefix with random bytes, and a length with nothing after.
    let mut t = TcpStream::connect(server).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let junk: Vec<u8> = (0..40).map(|_| rng.u8(..)).collect();
    t.write_all(&(junk.len() as u16).to_be_bytes()).unwrap();
    t.write_all(&junk).unwrap();
    let mut buf = Vec::new();
    let _ = t.read_to_end(&mut buf);
    let mut t = TcpStream::connect(server).unwrap();
    t.write_all(&[0xff, 0xff, 1, 2]).unwrap();
    drop(t);

    // Still answering, over both transports.
    eventually(Duration::from_secs(5), "answers after the garbage", || {
        dig(server, &[&format!("www.{ZONE}"), "A"]).is_some_and(|r| r.data("A") == [node_ip(0)])
    });
    let r = must_dig(server, &[&format!("www.{ZONE}"), "A", "+tcp"]);
    assert_eq!(r.data("A"), [node_ip(0)]);
    let (_, body) = c.daemons[0].as_ref().unwrap().admin_get("/metrics");
    assert!(
        body.contains("routemesh_dns_queries_total{rcode=\"FORMERR\",type=\"invalid\"}"),
        "{body}"
    );
}

#[test]
fn a_flooding_source_is_rate_limited_and_answered_again_later() {
    let c = Cluster::start(1);
    let server = c.dns(0);
    c.wait_answers(0, &[node_ip(0)]);
    let query = {
        // www.mesh.test A, id 7.
        let mut q = header(7, 1);
        for label in ["www", "mesh", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Batches small enough for the socket buffers, fast enough to outrun the refill.
    let (mut sent, mut answered) = (0, 0);
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    for _ in 0..40 {
        for _ in 0..50 {
            s.send_to(&query, server).unwrap();
            sent += 1;
        }
        let mut got = 0;
        while got < 50 && s.recv(&mut buf).is_ok() {
            got += 1;
        }
        answered += got;
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(answered > 0, "some queries are answered");
    assert!(
        answered < sent,
        "a flood from one source is rate-limited ({answered} of {sent} answered in {secs:.1}s)"
    );
    // The flooder is answered again once its bucket refills.
    eventually(Duration::from_secs(5), "the flooder answered again", || {
        udp_exchange(server, &query).is_some()
    });
    let (_, body) = c.daemons[0].as_ref().unwrap().admin_get("/metrics");
    assert!(body.contains("rcode=\"ratelimited\""), "{body}");
}
