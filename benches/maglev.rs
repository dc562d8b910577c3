//! Criterion micro-benchmarks of MQTT client-id routing: the per-connection work (parse the
//! CONNECT, hash the client id, Maglev pick through `Service::pick`) and the per-snapshot work
//! (building the 65537-slot table at 10, 100 and 1,000 tasks).
//!
//! Run: `cargo bench --bench maglev` (add `-- rebuild` to filter by name).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};

use routemesh::balance::{Maglev, key_hash};
use routemesh::config::{Balance, HashKey, ServiceName, ServiceSettings, TaskId};
use routemesh::protocol::mqtt::{Parse, parse_connect};
use routemesh::snapshot::{Service, Task};
use routemesh::util::clock::now_ms;

fn tasks(n: usize) -> Vec<Arc<Task>> {
    let mut v: Vec<_> = (0..n)
        .map(|i| {
            Arc::new(Task {
                id: TaskId::new(&format!("mqtt-broker-{i:04}")).expect("valid task id"),
                addr: SocketAddr::from(([10, (i / 250) as u8, (i % 250) as u8, 1], 1883)),
                node: None,
                weight: 1,
                node_ready: true,
                node_drained: false,
                state: Arc::default(),
            })
        })
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

/// A CONNECT as an ESP8266 sends it: MQTT 3.1.1 (or 5.0 with a session-expiry property),
/// clean session off, keep-alive 60, a user name and password.
fn connect_bytes(level: u8, client_id: &str) -> Vec<u8> {
    fn binary(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut body = Vec::new();
    binary(&mut body, b"MQTT");
    body.extend_from_slice(&[level, 0xc0, 0, 60]);
    if level == 5 {
        body.extend_from_slice(&[5, 0x11, 0, 0, 0x0e, 0x10]);
    }
    binary(&mut body, client_id.as_bytes());
    binary(&mut body, b"device");
    binary(&mut body, b"s3cret-token-0123456789");
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

fn per_connection(c: &mut Criterion) {
    let svc = Service::build(
        ServiceName::new("mqtt").expect("valid service name"),
        ServiceSettings {
            balance: Balance::Maglev,
            hash_key: HashKey::MqttClientId,
            ..ServiceSettings::default()
        },
        tasks(3),
    );
    let v4 = connect_bytes(4, "esp8266-00a1b2c3");
    let v5 = connect_bytes(5, "esp8266-00a1b2c3");
    let mut g = c.benchmark_group("mqtt");
    g.bench_function("parse_connect_v311", |b| {
        b.iter(|| parse_connect(black_box(&v4), 65536))
    });
    g.bench_function("parse_connect_v5", |b| {
        b.iter(|| parse_connect(black_box(&v5), 65536))
    });
    g.bench_function("parse_hash_pick_3_tasks", |b| {
        b.iter(|| {
            let Ok(Parse::Complete(connect)) = parse_connect(black_box(&v4), 65536) else {
                unreachable!("the bench CONNECT is valid")
            };
            let hash = key_hash(connect.client_id.as_bytes());
            svc.pick(&[], now_ms(), Some(hash))
        })
    });
    g.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_rebuild");
    g.sample_size(20);
    for n in [10, 100, 1000] {
        let ts = tasks(n);
        g.bench_function(format!("{n}_tasks"), |b| {
            b.iter(|| Maglev::new(black_box(&ts), (0..n).collect()))
        });
    }
    g.finish();
}

criterion_group!(benches, per_connection, rebuild);
criterion_main!(benches);
