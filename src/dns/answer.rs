//! Building the reply to one DNS packet: pure (bytes and a node list in, bytes out; no
//! sockets, no clock), so every rule is unit-tested here.
//!
//! Rules, in the order they apply:
//! - shorter than a header, or a response (QR=1): silence (never answer answers: no loops);
//! - undecodable (truncated, bad labels, pointer loops, random bytes): FORMERR, header only;
//! - opcode other than QUERY: NOTIMP; not exactly one question: FORMERR; EDNS version > 0:
//!   BADVERS;
//! - class other than IN, or a name outside the zone: REFUSED (never a recursive resolver);
//! - in the zone (authoritative): A/AAAA of the live nodes for the apex and any name under
//!   it, `NODE.nodes.ZONE` for one node, SRV for `_SERVICE._tcp.ZONE`, SOA and NS (with glue)
//!   at the apex, ANY answered minimally (RFC 8482: one HINFO "RFC8482"), zone transfers
//!   refused; anything else is NODATA (NOERROR, SOA in authority);
//! - record lists are rotated by `rotation` so clients spread across nodes;
//! - over UDP a reply larger than the client's limit (512, or its EDNS size) or than ten times
//!   the query's size (no amplification) is cut to header + question (+ OPT) with TC set, so
//!   the client retries over TCP.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, HINFO, NS, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::discovery::keys::PublishedListener;

/// The UDP payload size we advertise in our OPT record (the DNS flag day 2020 value).
pub const OUR_UDP_PAYLOAD: u16 = 1232;
/// No reply over UDP is larger than this many times the query.
pub const AMPLIFICATION_FACTOR: usize = 10;
/// The label under the zone that holds one name per node (`NODE.nodes.ZONE`).
pub const NODES_LABEL: &str = "nodes";

/// A node that may appear in answers: Ready, with an advertise address, reachable from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveNode {
    /// The node name (case kept; matched case-insensitively).
    pub name: String,
    pub addr: IpAddr,
    /// Its published listeners (SRV answers).
    pub listeners: Vec<PublishedListener>,
}

/// How the packet came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The zone this responder is authoritative for.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Fully qualified, lower case.
    pub origin: Name,
    nodes: Name,
    hostmaster: Name,
    /// TTL of every record (and the SOA minimum, so negative answers cache as long).
    pub ttl: u32,
}

impl Zone {
    /// `zone` as validated by the config (`mesh.example.com`).
    pub fn new(zone: &str, ttl: Duration) -> Result<Zone, hickory_proto::ProtoError> {
        let origin = Name::from_ascii(format!("{}.", zone.trim_end_matches('.')))?.to_lowercase();
        Ok(Zone {
            nodes: Name::from_ascii(NODES_LABEL)?.append_domain(&origin)?,
            hostmaster: Name::from_ascii("hostmaster")?.append_domain(&origin)?,
            origin,
            ttl: ttl.as_secs().min(u32::MAX as u64) as u32,
        })
    }

    /// `NODE.nodes.ZONE`, or None when the node name does not make a valid DNS name.
    pub fn node_host(&self, node: &str) -> Option<Name> {
        Name::from_ascii(node)
            .ok()?
            .append_domain(&self.nodes)
            .ok()
            .map(|n| n.to_lowercase())
    }
}

/// What one query needs besides the packet.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub zone: &'a Zone,
    /// Live nodes in a stable order (by name); rotated per query.
    pub nodes: &'a [LiveNode],
    /// The SOA serial (the snapshot's etcd revision).
    pub serial: u32,
    /// Per-query counter; the answer lists start at `rotation % len`.
    pub rotation: usize,
    /// This node's name: the SOA's primary server.
    pub self_node: &'a str,
    pub transport: Transport,
}

/// The reply, or silence, and the labels of `routemesh_dns_queries_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<Vec<u8>>,
    pub qtype: &'static str,
    pub rcode: &'static str,
}

/// The `type` label: common types by name, everything else `other`.
pub fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::NS => "NS",
        RecordType::SOA => "SOA",
        RecordType::ANY => "ANY",
        RecordType::MX => "MX",
        RecordType::TXT => "TXT",
        RecordType::CNAME => "CNAME",
        RecordType::PTR => "PTR",
        RecordType::AXFR => "AXFR",
        RecordType::IXFR => "IXFR",
        _ => "other",
    }
}

/// The `rcode` label.
pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

fn silence(qtype: &'static str) -> Outcome {
    Outcome {
        reply: None,
        qtype,
        rcode: "dropped",
    }
}

/// FORMERR for a packet whose header could be read but nothing else: header only.
fn formerr_from_header(packet: &[u8]) -> Outcome {
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    let mut msg = Message::error_msg(id, op, ResponseCode::FormErr);
    msg.metadata.recursion_desired = packet[2] & 0x01 != 0;
    match msg.to_vec() {
        Ok(bytes) => Outcome {
            reply: Some(bytes),
            qtype: "invalid",
            rcode: "FORMERR",
        },
        Err(_) => silence("invalid"),
    }
}

/// Answers one packet.
pub fn respond(packet: &[u8], ctx: &Ctx<'_>) -> Outcome {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return silence("invalid");
    }
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return formerr_from_header(packet),
    };
    if request.metadata.message_type != MessageType::Query {
        return silence("invalid");
    }
    let mut resp = Message::new(0, MessageType::Response, request.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&request.metadata);
    let qtype = request
        .queries
        .first()
        .map(|q| qtype_label(q.query_type()))
        .unwrap_or("invalid");
    let client_edns = request.edns.clone();
    if client_edns.is_some() {
        let mut ours = Edns::new();
        ours.set_max_payload(OUR_UDP_PAYLOAD);
        resp.set_edns(ours);
    }
    let rcode = if request.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if request.queries.len() != 1 {
        ResponseCode::FormErr
    } else if client_edns.as_ref().is_some_and(|e| e.version() > 0) {
        resp.add_query(request.queries[0].clone());
        ResponseCode::BADVERS
    } else {
        let q = &request.queries[0];
        resp.add_query(q.clone());
        answer_question(q, ctx, &mut resp)
    };
    resp.metadata.response_code = rcode;
    let limit = match ctx.transport {
        Transport::Tcp => u16::MAX as usize,
        Transport::Udp => {
            let client = client_edns
                .as_ref()
                .map(|e| e.max_payload().max(512))
                .unwrap_or(512) as usize;
            client.min(packet.len() * AMPLIFICATION_FACTOR)
        }
    };
    let bytes = match resp.to_vec() {
        Ok(b) if b.len() <= limit => b,
        Ok(_) => match resp.truncate().to_vec() {
            Ok(b) if b.len() <= limit => b,
            _ => return silence(qtype),
        },
        Err(_) => return silence(qtype),
    };
    Outcome {
        reply: Some(bytes),
        qtype,
        rcode: rcode_label(rcode),
    }
}

/// Fills the sections for one in-zone or out-of-zone question; returns the rcode.
fn answer_question(q: &Query, ctx: &Ctx<'_>, resp: &mut Message) -> ResponseCode {
    let zone = ctx.zone;
    let name = q.name().to_lowercase();
    if q.query_class() != DNSClass::IN || !zone.origin.zone_of(&name) {
        return ResponseCode::Refused;
    }
    resp.metadata.authoritative = true;
    let apex = name == zone.origin;
    let ttl = zone.ttl;
    let nodes = rotated(ctx.nodes, ctx.rotation);
    // `NODE.nodes.ZONE` names one node; every other name in the zone stands for all of them.
    let targets: Vec<&LiveNode> = if zone.nodes.zone_of(&name) && name != zone.nodes {
        nodes
            .iter()
            .copied()
            .filter(|n| zone.node_host(&n.name).as_ref() == Some(&name))
            .collect()
    } else {
        nodes.clone()
    };
    let qname = q.name().clone();
    match q.query_type() {
        RecordType::A | RecordType::AAAA => {
            let v6 = q.query_type() == RecordType::AAAA;
            for n in &targets {
                if let Some(rdata) = addr_rdata(n.addr, v6) {
                    resp.add_answer(Record::from_rdata(qname.clone(), ttl, rdata));
                }
            }
        }
        RecordType::SRV => {
            for (n, port) in srv_targets(&name, zone, &nodes) {
                let Some(host) = zone.node_host(&n.name) else {
                    continue;
                };
                resp.add_answer(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::SRV(SRV::new(0, 10, port, host.clone())),
                ));
                add_glue(resp, host, n, ttl);
            }
        }
        RecordType::NS if apex => {
            for n in &nodes {
                let Some(host) = zone.node_host(&n.name) else {
                    continue;
                };
                resp.add_answer(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::NS(NS(host.clone())),
                ));
                add_glue(resp, host, n, ttl);
            }
        }
        RecordType::SOA if apex => {
            resp.add_answer(soa(ctx));
        }
        RecordType::ANY => {
            resp.add_answer(Record::from_rdata(
                qname,
                ttl,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            ));
        }
        RecordType::AXFR | RecordType::IXFR => {
            resp.metadata.authoritative = false;
            return ResponseCode::Refused;
        }
        _ => {}
    }
    if resp.answers.is_empty() {
        // NODATA: the name exists (every name in the zone does), the type has no records.
        resp.add_authority(soa(ctx));
    }
    ResponseCode::NoError
}

fn rotated(nodes: &[LiveNode], rotation: usize) -> Vec<&LiveNode> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let start = rotation % nodes.len();
    nodes[start..].iter().chain(&nodes[..start]).collect()
}

fn addr_rdata(addr: IpAddr, v6: bool) -> Option<RData> {
    match addr {
        IpAddr::V4(a) if !v6 => Some(RData::A(A(a))),
        IpAddr::V6(a) if v6 => Some(RData::AAAA(AAAA(a))),
        _ => None,
    }
}

fn add_glue(resp: &mut Message, host: Name, n: &LiveNode, ttl: u32) {
    let rdata = addr_rdata(n.addr, false)
        .or_else(|| addr_rdata(n.addr, true))
        .expect("an address is either v4 or v6");
    resp.add_additional(Record::from_rdata(host, ttl, rdata));
}

/// `(node, port)` pairs for `_SERVICE._tcp.ZONE`: each node's published listeners bound to
/// that service (http listeners are TCP too). Any other name has none.
fn srv_targets<'a>(name: &Name, zone: &Zone, nodes: &[&'a LiveNode]) -> Vec<(&'a LiveNode, u16)> {
    if name.num_labels() != zone.origin.num_labels() + 2 {
        return Vec::new();
    }
    let mut labels = name.iter();
    let (Some(service), Some(proto)) = (labels.next(), labels.next()) else {
        return Vec::new();
    };
    let (Some(service), b"_tcp") = (service.strip_prefix(b"_"), proto) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for n in nodes {
        for l in &n.listeners {
            if l.service.as_bytes().eq_ignore_ascii_case(service)
                && matches!(l.protocol.as_str(), "tcp" | "http")
            {
                out.push((*n, l.port));
            }
        }
    }
    out
}

fn soa(ctx: &Ctx<'_>) -> Record {
    let zone = ctx.zone;
    let mname = zone
        .node_host(ctx.self_node)
        .unwrap_or_else(|| zone.origin.clone());
    Record::from_rdata(
        zone.origin.clone(),
        zone.ttl,
        RData::SOA(SOA::new(
            mname,
            zone.hostmaster.clone(),
            ctx.serial,
            60,
            10,
            3600,
            zone.ttl,
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        Zone::new("mesh.example.com", Duration::from_secs(5)).unwrap()
    }

    fn node(name: &str, ip: &str, listeners: &[(&str, u16)]) -> LiveNode {
        LiveNode {
            name: name.into(),
            addr: ip.parse().unwrap(),
            listeners: listeners
                .iter()
                .map(|(s, p)| PublishedListener {
                    name: format!("{s}-{p}"),
                    port: *p,
                    protocol: "tcp".into(),
                    service: (*s).into(),
                    state: "bound".into(),
                    source: "config".into(),
                })
                .collect(),
        }
    }

    fn three() -> Vec<LiveNode> {
        vec![
            node("n1", "10.0.0.1", &[("mqtt", 1883)]),
            node("n2", "10.0.0.2", &[("mqtt", 1883), ("web", 80)]),
            node("n3", "10.0.0.3", &[]),
        ]
    }

    fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// A query without EDNS over UDP.
    fn ask_udp(
        name: &str,
        t: RecordType,
        nodes: &[LiveNode],
        rotation: usize,
    ) -> (Outcome, Message) {
        ask(&query(name, t, None), nodes, rotation, Transport::Udp)
    }

    /// What `respond` makes of `packet` (zone [`zone`], serial 7, node n1 asked).
    fn outcome(packet: &[u8], nodes: &[LiveNode], rotation: usize, t: Transport) -> Outcome {
        let z = zone();
        let ctx = Ctx {
            zone: &z,
            nodes,
            serial: 7,
            rotation,
            self_node: "n1",
            transport: t,
        };
        respond(packet, &ctx)
    }

    fn ask(packet: &[u8], nodes: &[LiveNode], rotation: usize, t: Transport) -> (Outcome, Message) {
        let out = outcome(packet, nodes, rotation, t);
        let msg = Message::from_vec(out.reply.as_ref().expect("a reply")).unwrap();
        (out, msg)
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_records_of_every_live_node_rotated() {
        let nodes = three();
        let q = query("www.Mesh.example.com.", RecordType::A, None);
        let (out, m) = ask(&q, &nodes, 0, Transport::Udp);
        assert_eq!((out.qtype, out.rcode), ("A", "NOERROR"));
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(addrs(&m), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(m.answers[0].ttl, 5);
        let (_, m) = ask(&q, &nodes, 1, Transport::Udp);
        assert_eq!(addrs(&m), ["10.0.0.2", "10.0.0.3", "10.0.0.1"]);
        let (_, m) = ask_udp("mesh.example.com.", RecordType::A, &nodes, 5);
        assert_eq!(addrs(&m), ["10.0.0.3", "10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn aaaa_only_from_v6_nodes_else_nodata() {
        let mut nodes = three();
        let (_, m) = ask_udp("mesh.example.com.", RecordType::AAAA, &nodes, 0);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        nodes.push(node("n4", "fd00::4", &[]));
        let (_, m) = ask_udp("mesh.example.com.", RecordType::AAAA, &nodes, 0);
        assert_eq!(addrs(&m), ["fd00::4"]);
    }

    #[test]
    fn node_names_answer_one_node() {
        let nodes = three();
        let (_, m) = ask_udp("N2.nodes.mesh.example.com.", RecordType::A, &nodes, 2);
        assert_eq!(addrs(&m), ["10.0.0.2"]);
        let (out, m) = ask_udp("n9.nodes.mesh.example.com.", RecordType::A, &nodes, 0);
        assert_eq!(out.rcode, "NOERROR");
        assert!(m.answers.is_empty());
    }

    #[test]
    fn srv_lists_published_ports_with_glue() {
        let nodes = three();
        let (out, m) = ask_udp("_mqtt._tcp.mesh.example.com.", RecordType::SRV, &nodes, 0);
        assert_eq!((out.qtype, out.rcode), ("SRV", "NOERROR"));
        let srv: Vec<(u16, String)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.port, s.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            srv,
            [
                (1883, "n1.nodes.mesh.example.com.".to_string()),
                (1883, "n2.nodes.mesh.example.com.".to_string())
            ]
        );
        assert_eq!(m.additionals.len(), 2);
        for name in ["_web._udp", "_nope._tcp", "mqtt._tcp", "_mqtt._tcp.x"] {
            let (_, m) = ask_udp(
                &format!("{name}.mesh.example.com."),
                RecordType::SRV,
                &nodes,
                0,
            );
            assert!(m.answers.is_empty(), "{name}");
            assert_eq!(m.authorities.len(), 1, "{name}");
        }
    }

    #[test]
    fn apex_soa_and_ns_with_glue() {
        let nodes = three();
        let (_, m) = ask_udp("mesh.example.com.", RecordType::SOA, &nodes, 0);
        let RData::SOA(soa) = &m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!(soa.serial, 7);
        assert_eq!(soa.mname.to_ascii(), "n1.nodes.mesh.example.com.");
        let (_, m) = ask_udp("mesh.example.com.", RecordType::NS, &nodes, 1);
        assert_eq!(m.answers.len(), 3);
        assert_eq!(m.additionals.len(), 3);
        assert_eq!(
            m.additionals[0].name.to_ascii(),
            "n2.nodes.mesh.example.com."
        );
        // Below the apex: NODATA.
        let (_, m) = ask_udp("www.mesh.example.com.", RecordType::NS, &nodes, 0);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn outside_the_zone_is_refused() {
        let nodes = three();
        for name in [
            "example.com.",
            "www.example.org.",
            "xmesh.example.com.",
            ".",
        ] {
            let (out, m) = ask(&query(name, RecordType::A, None), &nodes, 0, Transport::Udp);
            assert_eq!(out.rcode, "REFUSED", "{name}");
            assert!(!m.metadata.authoritative);
            assert!(m.answers.is_empty());
        }
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        let mut question = Query::query(
            Name::from_ascii("mesh.example.com.").unwrap(),
            RecordType::A,
        );
        question.set_query_class(DNSClass::CH);
        q.add_query(question);
        let (out, _) = ask(&q.to_vec().unwrap(), &nodes, 0, Transport::Udp);
        assert_eq!(out.rcode, "REFUSED");
    }

    #[test]
    fn other_types_are_nodata_with_soa() {
        let nodes = three();
        for t in [RecordType::MX, RecordType::TXT, RecordType::CNAME] {
            let (out, m) = ask(
                &query("www.mesh.example.com.", t, None),
                &nodes,
                0,
                Transport::Udp,
            );
            assert_eq!(out.rcode, "NOERROR");
            assert!(m.answers.is_empty());
            assert_eq!(m.authorities.len(), 1);
            assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        }
        let (out, _) = ask(
            &query("mesh.example.com.", RecordType::AXFR, None),
            &nodes,
            0,
            Transport::Tcp,
        );
        assert_eq!(out.rcode, "REFUSED");
    }

    #[test]
    fn any_is_minimal() {
        let nodes = three();
        let (out, m) = ask_udp("mesh.example.com.", RecordType::ANY, &nodes, 0);
        assert_eq!(out.qtype, "ANY");
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].record_type(), RecordType::HINFO);
    }

    #[test]
    fn udp_truncates_over_the_client_limit_and_tcp_does_not() {
        let nodes: Vec<LiveNode> = (0..60)
            .map(|i| node(&format!("n{i}"), &format!("10.0.1.{i}"), &[]))
            .collect();
        let q = query("www.mesh.example.com.", RecordType::A, None);
        let (out, m) = ask(&q, &nodes, 0, Transport::Udp);
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
        assert!(out.reply.unwrap().len() <= 512);
        let (_, m) = ask(&q, &nodes, 0, Transport::Tcp);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 60);
    }

    #[test]
    fn edns_size_is_honoured_within_the_amplification_cap() {
        let nodes: Vec<LiveNode> = (0..40)
            .map(|i| node(&format!("n{i}"), &format!("10.0.1.{i}"), &[]))
            .collect();
        // A long name makes a large query, so the 10x cap is not what limits here.
        let long = format!("{}.{}.mesh.example.com.", "a".repeat(60), "b".repeat(60));
        let (_, m) = ask(
            &query(&long, RecordType::A, Some(512)),
            &nodes,
            0,
            Transport::Udp,
        );
        assert!(m.metadata.truncation);
        let (out, m) = ask(
            &query(&long, RecordType::A, Some(4096)),
            &nodes,
            0,
            Transport::Udp,
        );
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 40);
        assert!(out.reply.unwrap().len() > 512);
        assert_eq!(m.edns.as_ref().unwrap().max_payload(), OUR_UDP_PAYLOAD);
        // Without EDNS the classic 512 applies.
        let (_, m) = ask_udp(&long, RecordType::A, &nodes, 0);
        assert!(m.metadata.truncation);
    }

    #[test]
    fn replies_never_exceed_ten_times_the_query() {
        let nodes: Vec<LiveNode> = (0..40)
            .map(|i| node(&format!("n{i}"), &format!("10.0.1.{i}"), &[]))
            .collect();
        let q = query("mesh.example.com.", RecordType::A, Some(4096));
        let (out, m) = ask(&q, &nodes, 0, Transport::Udp);
        assert!(m.metadata.truncation);
        assert!(out.reply.unwrap().len() <= q.len() * AMPLIFICATION_FACTOR);
        for t in [
            RecordType::NS,
            RecordType::ANY,
            RecordType::MX,
            RecordType::SOA,
        ] {
            let q = query("mesh.example.com.", t, Some(4096));
            let out = outcome(&q, &nodes, 0, Transport::Udp);
            assert!(
                out.reply.unwrap().len() <= q.len() * AMPLIFICATION_FACTOR,
                "{t}"
            );
        }
    }

    #[test]
    fn protocol_errors() {
        let nodes = three();
        // Two questions: FORMERR.
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("a.mesh.example.com.").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_ascii("b.mesh.example.com.").unwrap(),
            RecordType::A,
        ));
        let (out, r) = ask(&m.to_vec().unwrap(), &nodes, 0, Transport::Udp);
        assert_eq!(out.rcode, "FORMERR");
        assert_eq!(r.metadata.id, 9);
        // No question at all: FORMERR.
        let m = Message::new(10, MessageType::Query, OpCode::Query);
        let (out, _) = ask(&m.to_vec().unwrap(), &nodes, 0, Transport::Udp);
        assert_eq!(out.rcode, "FORMERR");
        // UPDATE: NOTIMP.
        let mut m = Message::new(11, MessageType::Query, OpCode::Update);
        m.add_query(Query::query(
            Name::from_ascii("mesh.example.com.").unwrap(),
            RecordType::SOA,
        ));
        let (out, _) = ask(&m.to_vec().unwrap(), &nodes, 0, Transport::Udp);
        assert_eq!(out.rcode, "NOTIMP");
        // EDNS version 1: BADVERS.
        let mut m = Message::new(12, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("mesh.example.com.").unwrap(),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_version(1);
        m.set_edns(e);
        let (out, r) = ask(&m.to_vec().unwrap(), &nodes, 0, Transport::Udp);
        assert_eq!(out.rcode, "BADVERS");
        // 16 is both BADVERS and BADSIG; the decoder names it BADSIG.
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert!(r.edns.is_some());
    }

    fn raw(packet: &[u8]) -> Outcome {
        outcome(packet, &three(), 0, Transport::Udp)
    }

    #[test]
    fn malformed_packets_get_formerr_or_silence() {
        // Truncated header: silence.
        assert_eq!(raw(&[0x12, 0x34, 0x01]).reply, None);
        assert_eq!(raw(&[]).reply, None);
        // A response: silence.
        let mut resp = query("mesh.example.com.", RecordType::A, None);
        resp[2] |= 0x80;
        assert_eq!(raw(&resp).reply, None);
        // Header says one question, none follows: FORMERR.
        let hdr = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let out = raw(&hdr);
        assert_eq!(out.rcode, "FORMERR");
        let m = Message::from_vec(&out.reply.unwrap()).unwrap();
        assert_eq!(m.metadata.id, 0xabcd);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A compression pointer to itself (a loop).
        let mut p = hdr.to_vec();
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(raw(&p).rcode, "FORMERR");
        // Two pointers pointing at each other.
        let mut p = hdr.to_vec();
        p.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(raw(&p).rcode, "FORMERR");
        // An oversized label (64 bytes; the length byte 0x40 is a reserved label type).
        let mut p = hdr.to_vec();
        p.push(64);
        p.extend_from_slice(&[b'a'; 64]);
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(raw(&p).rcode, "FORMERR");
        // A name longer than 255 bytes.
        let mut p = hdr.to_vec();
        for _ in 0..5 {
            p.push(63);
            p.extend_from_slice(&[b'a'; 63]);
        }
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(raw(&p).rcode, "FORMERR");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(8);
        for len in 0..600 {
            let mut p: Vec<u8> = (0..len % 300).map(|_| rng.u8(..)).collect();
            if len % 2 == 0 && p.len() > 2 {
                p[2] &= 0x7f; // half of them look like queries
            }
            let out = raw(&p);
            if let Some(r) = out.reply {
                assert!(r.len() <= (p.len() * AMPLIFICATION_FACTOR).max(12));
            }
        }
    }
}
