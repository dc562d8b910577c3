//! Prometheus metrics in an explicit registry (no global statics, so each test has its own).
//! Metric names and labels are a contract: dashboards and alerts depend on them.
//!
//! Data-path counters are updated directly by the proxy; gauges derived from routing state
//! (`routemesh_task_up`, `routemesh_tasks`, discovery status) are refreshed at scrape time
//! from the current snapshot, so they can never drift from what the proxy sees.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::discovery::DiscoveryStatus;
use crate::snapshot::{Snapshot, TaskStatus};
use crate::util::clock::now_ms;

/// Every metric the daemon exports.
pub struct Metrics {
    pub registry: Registry,
    pub connections_total: IntCounterVec,
    pub active_connections: IntGaugeVec,
    pub bytes_total: IntCounterVec,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,
    pub upstream_connect_errors_total: IntCounterVec,
    pub retries_total: IntCounterVec,
    pub no_live_task_total: IntCounterVec,
    pub rejected_connections_total: IntCounterVec,
    pub task_up: IntGaugeVec,
    pub tasks: IntGaugeVec,
    pub discovery_up: IntGauge,
    pub discovery_revision: IntGauge,
    pub discovery_last_sync_age_seconds: Gauge,
    pub discovery_invalid_entries_total: IntCounter,
    pub config_reloads_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub health_checks_total: IntCounterVec,
    /// First packets of MQTT client-id routed listeners refused before any upstream connect.
    pub mqtt_connect_errors_total: IntCounterVec,
    /// DNS queries answered (or dropped) by the `[dns]` responder (src/dns/).
    pub dns_queries_total: IntCounterVec,
    /// 1 while the Docker engine's event stream is connected (`[docker]`, src/docker/); 0
    /// while it is unreachable or discovery is disabled.
    pub docker_up: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let lc = &["listener", "service"];
        let m = Metrics {
            connections_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_connections_total",
                        "Downstream connections accepted.",
                    ),
                    lc,
                )
                .unwrap(),
            ),
            active_connections: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "routemesh_active_connections",
                        "Downstream connections open now.",
                    ),
                    lc,
                )
                .unwrap(),
            ),
            bytes_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_bytes_total",
                        "Bytes proxied; rx from clients, tx to clients.",
                    ),
                    &["listener", "service", "direction"],
                )
                .unwrap(),
            ),
            http_requests_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("routemesh_http_requests_total", "HTTP requests answered."),
                    &["listener", "service", "code"],
                )
                .unwrap(),
            ),
            http_request_duration_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "routemesh_http_request_duration_seconds",
                        "Time from request head to response head.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0, 30.0,
                    ]),
                    lc,
                )
                .unwrap(),
            ),
            upstream_connect_errors_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_upstream_connect_errors_total",
                        "Failed or timed-out connects to a task.",
                    ),
                    &["service", "task"],
                )
                .unwrap(),
            ),
            retries_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_retries_total",
                        "Connects or requests retried on another task.",
                    ),
                    &["service"],
                )
                .unwrap(),
            ),
            no_live_task_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_no_live_task_total",
                        "Connections or requests refused because no task was reachable.",
                    ),
                    &["service"],
                )
                .unwrap(),
            ),
            rejected_connections_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_rejected_connections_total",
                        "Connections closed on arrival, by reason.",
                    ),
                    &["listener", "reason"],
                )
                .unwrap(),
            ),
            task_up: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("routemesh_task_up", "1 when the task is routable, else 0."),
                    &["service", "task", "node"],
                )
                .unwrap(),
            ),
            tasks: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("routemesh_tasks", "Tasks per service by state."),
                    &["service", "state"],
                )
                .unwrap(),
            ),
            discovery_up: reg(
                &r,
                IntGauge::new(
                    "routemesh_discovery_up",
                    "1 while the etcd watch is healthy.",
                )
                .unwrap(),
            ),
            discovery_revision: reg(
                &r,
                IntGauge::new(
                    "routemesh_discovery_revision",
                    "etcd revision of the routing snapshot.",
                )
                .unwrap(),
            ),
            discovery_last_sync_age_seconds: reg(
                &r,
                Gauge::new(
                    "routemesh_discovery_last_sync_age_seconds",
                    "Seconds since the routing state was last confirmed current.",
                )
                .unwrap(),
            ),
            discovery_invalid_entries_total: reg(
                &r,
                IntCounter::new(
                    "routemesh_discovery_invalid_entries_total",
                    "Malformed etcd entries skipped.",
                )
                .unwrap(),
            ),
            config_reloads_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("routemesh_config_reloads_total", "Config reloads by result."),
                    &["result"],
                )
                .unwrap(),
            ),
            build_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("routemesh_build_info", "Always 1; the version as a label."),
                    &["version"],
                )
                .unwrap(),
            ),
            health_checks_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_health_checks_total",
                        "Active health checks by result.",
                    ),
                    &["service", "result"],
                )
                .unwrap(),
            ),
            mqtt_connect_errors_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_mqtt_connect_errors_total",
                        "MQTT first packets refused (connection closed, no upstream opened), by reason.",
                    ),
                    &["service", "reason"],
                )
                .unwrap(),
            ),
            docker_up: reg(
                &r,
                IntGauge::new(
                    "routemesh_docker_up",
                    "1 while the local Docker engine's event stream is connected.",
                )
                .unwrap(),
            ),
            dns_queries_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routemesh_dns_queries_total",
                        "DNS queries by type and response code (dropped: no reply sent).",
                    ),
                    &["type", "rcode"],
                )
                .unwrap(),
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Arc::new(m)
    }

    /// Refreshes the state-derived gauges, then renders the text exposition format.
    pub fn render(&self, snapshot: &Snapshot, discovery: &DiscoveryStatus) -> String {
        self.refresh(snapshot, discovery);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(out).unwrap_or_default()
    }

    fn refresh(&self, snapshot: &Snapshot, discovery: &DiscoveryStatus) {
        self.discovery_up.set(discovery.up() as i64);
        self.discovery_revision.set(discovery.revision());
        self.discovery_last_sync_age_seconds
            .set(discovery.last_sync_age_secs().unwrap_or(-1.0));
        let invalid = discovery.invalid_total();
        let seen = self.discovery_invalid_entries_total.get();
        if invalid > seen {
            self.discovery_invalid_entries_total.inc_by(invalid - seen);
        }
        self.task_up.reset();
        self.tasks.reset();
        let now = now_ms();
        for svc in snapshot.services.values() {
            let mut counts = [0i64; 5];
            for t in &svc.tasks {
                let st = t.status(now);
                let node = t.node.as_ref().map(|n| n.as_str()).unwrap_or("");
                self.task_up
                    .with_label_values(&[svc.name.as_str(), t.id.as_str(), node])
                    .set((st == TaskStatus::Healthy) as i64);
                counts[st as usize] += 1;
            }
            for st in [
                TaskStatus::Healthy,
                TaskStatus::Unhealthy,
                TaskStatus::Ejected,
                TaskStatus::NodeDown,
                TaskStatus::Drained,
            ] {
                self.tasks
                    .with_label_values(&[svc.name.as_str(), st.metric_label()])
                    .set(counts[st as usize]);
            }
        }
    }
}
