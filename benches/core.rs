//! Criterion micro-benchmarks of the pure core: a task pick per balancer, a snapshot build
//! with 1,000 services × 10 tasks (issue 2's target: ≤ 5 ms), and etcd key/value parsing.
//!
//! Run: `cargo bench --bench core` (add `-- pick` to filter by name).

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

use routemesh::config::{Balance, ServiceName, ServiceSettings, TaskId};
use routemesh::discovery::keys::{Key, TaskRecord, task_key};
use routemesh::discovery::table::{RoutingTable, Update};
use routemesh::snapshot::Snapshot;
use routemesh::util::clock::now_ms;

const PREFIX: &str = "/routemesh";

fn task_value(service: usize, task: usize) -> String {
    format!(
        r#"{{"addr":"10.{}.{}.{}:8080","weight":1}}"#,
        service / 250,
        service % 250,
        task + 1
    )
}

/// A table with `services` services of `tasks` tasks each, filled through the same
/// `Update::Reset` path discovery uses after a list.
fn table(services: usize, tasks: usize) -> RoutingTable {
    let mut kvs = Vec::with_capacity(services * tasks);
    for s in 0..services {
        let svc = ServiceName::new(&format!("svc-{s}")).expect("valid service name");
        for t in 0..tasks {
            let id = TaskId::new(&format!("task-{t}")).expect("valid task id");
            kvs.push((
                task_key(PREFIX, &svc, &id).into_bytes(),
                task_value(s, t).into_bytes(),
            ));
        }
    }
    let mut table = RoutingTable::new(PREFIX);
    let invalid = table.apply(Update::Reset { revision: 1, kvs });
    assert!(invalid.is_empty(), "bench data is valid: {invalid:?}");
    table
}

fn settings_for(services: usize, balance: Balance) -> BTreeMap<ServiceName, ServiceSettings> {
    (0..services)
        .map(|s| {
            (
                ServiceName::new(&format!("svc-{s}")).expect("valid service name"),
                ServiceSettings {
                    balance,
                    ..ServiceSettings::default()
                },
            )
        })
        .collect()
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for (name, balance) in [
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
        ("p2c", Balance::P2c),
    ] {
        let table = table(1, 10);
        let snap = Snapshot::build(&table, &settings_for(1, balance), &Snapshot::default());
        let svc = snap
            .service(&ServiceName::new("svc-0").expect("valid"))
            .expect("service built");
        let now = now_ms();
        group.bench_function(name, |b| {
            b.iter(|| black_box(svc.pick(black_box(&[]), now, None)))
        });
        // The data path's real shape: pick, then hold the task's in-flight guard.
        group.bench_function(format!("{name}+in_flight"), |b| {
            b.iter(|| {
                let i = svc.pick(&[], now, None).expect("a live task");
                black_box(svc.tasks[i].state.begin())
            })
        });
    }
    group.finish();
}

fn bench_snapshot(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(20);
    let table = table(1000, 10);
    let settings = settings_for(0, Balance::RoundRobin);
    group.bench_function("build_1000x10_cold", |b| {
        b.iter(|| black_box(Snapshot::build(&table, &settings, &Snapshot::default())))
    });
    // The common case after a watch event: one task changed, every other service reused.
    let prev = Snapshot::build(&table, &settings, &Snapshot::default());
    let mut changed = table.clone();
    let svc = ServiceName::new("svc-500").expect("valid");
    let id = TaskId::new("task-3").expect("valid");
    changed.apply(Update::Put {
        key: task_key(PREFIX, &svc, &id).into_bytes(),
        value: br#"{"addr":"10.9.9.9:8080"}"#.to_vec(),
    });
    group.bench_function("build_1000x10_one_change", |b| {
        b.iter(|| black_box(Snapshot::build(&changed, &settings, &prev)))
    });
    group.bench_function("table_reset_1000x10", |b| {
        b.iter_batched(
            || {
                let mut kvs = Vec::with_capacity(10_000);
                for s in 0..1000 {
                    for t in 0..10 {
                        kvs.push((
                            format!("{PREFIX}/tasks/svc-{s}/task-{t}").into_bytes(),
                            task_value(s, t).into_bytes(),
                        ));
                    }
                }
                kvs
            },
            |kvs| {
                let mut t = RoutingTable::new(PREFIX);
                black_box(t.apply(Update::Reset { revision: 1, kvs }));
                t
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("keys");
    let key = b"/routemesh/tasks/web-frontend/web-frontend-7f9c2";
    let node_key = b"/routemesh/nodes/n3/alive";
    let value = br#"{"addr":"10.0.3.17:8080","node":"n3","weight":10}"#;
    group.bench_function("parse_task_key", |b| {
        b.iter(|| black_box(Key::parse(black_box(PREFIX), black_box(key))))
    });
    group.bench_function("parse_node_key", |b| {
        b.iter(|| black_box(Key::parse(black_box(PREFIX), black_box(node_key))))
    });
    group.bench_function("parse_task_value", |b| {
        b.iter(|| black_box(TaskRecord::parse(black_box(value))))
    });
    group.bench_function("parse_bad_value", |b| {
        b.iter(|| black_box(TaskRecord::parse(black_box(br#"{"addr":"nope"}"#))))
    });
    let mut table = table(100, 10);
    let put_key = b"/routemesh/tasks/svc-50/task-3".to_vec();
    group.bench_function("table_apply_put", |b| {
        b.iter(|| {
            black_box(table.apply(Update::Put {
                key: put_key.clone(),
                value: value.to_vec(),
            }))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_pick, bench_snapshot, bench_keys);
criterion_main!(benches);
