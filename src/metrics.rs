//! Prometheus metrics in an explicit registry (no global statics, so each test has its own).
//! Metric names and labels are a contract: dashboards and alerts depend on them.
//!
//! Data-path counters are updated directly by the proxy; gauges derived from routing state
//! (`routemesh_task_up`, `routemesh_tasks`, discovery status) are refreshed at scrape time
//! from the current snapshot, so they can never drift from what the proxy sees.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::discovery::DiscoveryStatus;
use crate::snapshot::{Snapshot, TaskStatus};
use crate::util::clock::now_ms;

/// The `rx` and `tx` children of a `{listener, service, direction}` counter family.
pub fn rx_tx(family: &IntCounterVec, listener: &str, service: &str) -> (IntCounter, IntCounter) {
    (
        family.with_label_values(&[listener, service, "rx"]),
        family.with_label_values(&[listener, service, "tx"]),
    )
}

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
    /// This process's upgrade generation (1 for a fresh start, the old one's + 1 after
    /// `run --upgrade`), labelled with its pid: tells the two processes of an upgrade apart.
    pub process_generation: IntGaugeVec,
    pub health_checks_total: IntCounterVec,
    /// First packets of MQTT client-id routed listeners refused before any upstream connect.
    pub mqtt_connect_errors_total: IntCounterVec,
    /// Proxied connections closed because, after one side's FIN, the other direction stayed
    /// silent and open for the service's `half_close_timeout` (src/proxy/tcp.rs).
    pub half_close_timeouts_total: IntCounterVec,
    /// DNS queries answered (or dropped) by the `[dns]` responder (src/dns/).
    pub dns_queries_total: IntCounterVec,
    /// UDP sessions open now, per udp listener (src/proxy/udp/).
    pub udp_sessions: IntGaugeVec,
    /// Datagrams forwarded by udp listeners; rx from clients, tx to clients.
    pub udp_datagrams_total: IntCounterVec,
    /// Datagrams a udp listener dropped, by reason (`max_sessions`, `no_live_task`,
    /// `too_large`, `unknown_source`, `socket_error`).
    pub udp_dropped_total: IntCounterVec,
    /// 1 while the Docker engine's event stream is connected (`[docker]`, src/docker/); 0
    /// while it is unreachable or discovery is disabled.
    pub docker_up: IntGauge,
    /// NOT AFTER (Unix seconds) of each ACME certificate this node serves (src/acme/).
    pub tls_certificate_expiry_seconds: IntGaugeVec,
    /// ACME orders this node ran, by result (`success` | `error`).
    pub acme_orders_total: IntCounterVec,
}

/// A metric family Prometheus refused: a name or label that is not valid, or a name
/// registered twice. A programming error, reported at start-up rather than as a panic.
#[derive(Debug, thiserror::Error)]
#[error("cannot register metric {name}: {source}")]
pub struct MetricsError {
    pub name: &'static str,
    #[source]
    pub source: prometheus::Error,
}

/// The labels of per-listener families.
const LISTENER_SERVICE: &[&str] = &["listener", "service"];

/// Request duration buckets, 0.5 ms to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Makes metric families and registers each in one registry.
struct Families<'r>(&'r Registry);

type Made<T> = Result<T, MetricsError>;

impl Families<'_> {
    /// A family with labels, made by `make` (e.g. `IntCounterVec::new`).
    fn labelled<T: Collector + Clone + 'static>(
        &self,
        make: fn(Opts, &[&str]) -> prometheus::Result<T>,
        name: &'static str,
        help: &str,
        labels: &[&str],
    ) -> Made<T> {
        self.register(name, make(Opts::new(name, help), labels))
    }

    /// A family of one series, made by `make` (e.g. `IntGauge::new`).
    fn single<T: Collector + Clone + 'static>(
        &self,
        make: fn(String, String) -> prometheus::Result<T>,
        name: &'static str,
        help: &str,
    ) -> Made<T> {
        self.register(name, make(name.to_string(), help.to_string()))
    }

    fn register<T: Collector + Clone + 'static>(
        &self,
        name: &'static str,
        made: prometheus::Result<T>,
    ) -> Made<T> {
        let err = |source| MetricsError { name, source };
        let metric = made.map_err(err)?;
        self.0.register(Box::new(metric.clone())).map_err(err)?;
        Ok(metric)
    }
}

/// The request duration histograms, with [`DURATION_BUCKETS`].
fn duration_histograms(opts: Opts, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(
        HistogramOpts::from(opts).buckets(DURATION_BUCKETS.to_vec()),
        labels,
    )
}

impl Metrics {
    /// Every family, registered in a registry of its own.
    pub fn new() -> Result<Arc<Metrics>, MetricsError> {
        let registry = Registry::new();
        let f = Families(&registry);
        let lc = LISTENER_SERVICE;
        let m = Metrics {
            connections_total: f.labelled(
                IntCounterVec::new,
                "routemesh_connections_total",
                "Downstream connections accepted.",
                lc,
            )?,
            active_connections: f.labelled(
                IntGaugeVec::new,
                "routemesh_active_connections",
                "Downstream connections open now.",
                lc,
            )?,
            bytes_total: f.labelled(
                IntCounterVec::new,
                "routemesh_bytes_total",
                "Bytes proxied; rx from clients, tx to clients.",
                &["listener", "service", "direction"],
            )?,
            http_requests_total: f.labelled(
                IntCounterVec::new,
                "routemesh_http_requests_total",
                "HTTP requests answered.",
                &["listener", "service", "code"],
            )?,
            http_request_duration_seconds: f.labelled(
                duration_histograms,
                "routemesh_http_request_duration_seconds",
                "Time from request head to response head.",
                lc,
            )?,
            upstream_connect_errors_total: f.labelled(
                IntCounterVec::new,
                "routemesh_upstream_connect_errors_total",
                "Failed or timed-out connects to a task.",
                &["service", "task"],
            )?,
            retries_total: f.labelled(
                IntCounterVec::new,
                "routemesh_retries_total",
                "Connects or requests retried on another task.",
                &["service"],
            )?,
            no_live_task_total: f.labelled(
                IntCounterVec::new,
                "routemesh_no_live_task_total",
                "Connections or requests refused because no task was reachable.",
                &["service"],
            )?,
            rejected_connections_total: f.labelled(
                IntCounterVec::new,
                "routemesh_rejected_connections_total",
                "Connections closed on arrival, by reason.",
                &["listener", "reason"],
            )?,
            task_up: f.labelled(
                IntGaugeVec::new,
                "routemesh_task_up",
                "1 when the task is routable, else 0.",
                &["service", "task", "node"],
            )?,
            tasks: f.labelled(
                IntGaugeVec::new,
                "routemesh_tasks",
                "Tasks per service by state.",
                &["service", "state"],
            )?,
            discovery_up: f.single(
                IntGauge::new,
                "routemesh_discovery_up",
                "1 while the etcd watch is healthy.",
            )?,
            discovery_revision: f.single(
                IntGauge::new,
                "routemesh_discovery_revision",
                "etcd revision of the routing snapshot.",
            )?,
            discovery_last_sync_age_seconds: f.single(
                Gauge::new,
                "routemesh_discovery_last_sync_age_seconds",
                "Seconds since the routing state was last confirmed current.",
            )?,
            discovery_invalid_entries_total: f.single(
                IntCounter::new,
                "routemesh_discovery_invalid_entries_total",
                "Malformed etcd entries skipped.",
            )?,
            config_reloads_total: f.labelled(
                IntCounterVec::new,
                "routemesh_config_reloads_total",
                "Config reloads by result.",
                &["result"],
            )?,
            build_info: f.labelled(
                IntGaugeVec::new,
                "routemesh_build_info",
                "Always 1; the version as a label.",
                &["version"],
            )?,
            process_generation: f.labelled(
                IntGaugeVec::new,
                "routemesh_process_generation",
                "This process's upgrade generation (1 on a fresh start, +1 per `run --upgrade`); the pid as a label.",
                &["pid"],
            )?,
            health_checks_total: f.labelled(
                IntCounterVec::new,
                "routemesh_health_checks_total",
                "Active health checks by result.",
                &["service", "result"],
            )?,
            mqtt_connect_errors_total: f.labelled(
                IntCounterVec::new,
                "routemesh_mqtt_connect_errors_total",
                "MQTT first packets refused (connection closed, no upstream opened), by reason.",
                &["service", "reason"],
            )?,
            half_close_timeouts_total: f.labelled(
                IntCounterVec::new,
                "routemesh_half_close_timeouts_total",
                "Half-closed connections closed after half_close_timeout without the other side's FIN.",
                lc,
            )?,
            docker_up: f.single(
                IntGauge::new,
                "routemesh_docker_up",
                "1 while the local Docker engine's event stream is connected.",
            )?,
            tls_certificate_expiry_seconds: f.labelled(
                IntGaugeVec::new,
                "routemesh_tls_certificate_expiry_seconds",
                "NOT AFTER of each ACME certificate this node serves, as Unix seconds (subtract time() for the time left).",
                &["name"],
            )?,
            acme_orders_total: f.labelled(
                IntCounterVec::new,
                "routemesh_acme_orders_total",
                "ACME orders run by this node, by result (success, error).",
                &["result"],
            )?,
            dns_queries_total: f.labelled(
                IntCounterVec::new,
                "routemesh_dns_queries_total",
                "DNS queries by type and response code (dropped: no reply sent).",
                &["type", "rcode"],
            )?,
            udp_sessions: f.labelled(
                IntGaugeVec::new,
                "routemesh_udp_sessions",
                "UDP sessions open now.",
                lc,
            )?,
            udp_datagrams_total: f.labelled(
                IntCounterVec::new,
                "routemesh_udp_datagrams_total",
                "Datagrams forwarded by udp listeners; rx from clients, tx to clients.",
                &["listener", "service", "direction"],
            )?,
            udp_dropped_total: f.labelled(
                IntCounterVec::new,
                "routemesh_udp_dropped_total",
                "Datagrams dropped by udp listeners, by reason.",
                &["listener", "reason"],
            )?,
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(Arc::new(m))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_registers_and_renders() {
        let m = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
        let text = m.render(&Snapshot::default(), &DiscoveryStatus::default());
        for needle in [
            "routemesh_build_info{version=",
            "# TYPE routemesh_discovery_up gauge",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
    }

    #[test]
    fn a_bad_definition_is_an_error_naming_the_family() {
        let r = Registry::new();
        let f = Families(&r);
        assert!(f.single(IntCounter::new, "test_twice", "first").is_ok());
        let err = f
            .single(IntCounter::new, "test_twice", "again")
            .unwrap_err();
        assert_eq!(err.name, "test_twice");
        assert!(
            err.to_string()
                .starts_with("cannot register metric test_twice: ")
        );
        assert!(
            f.labelled(IntCounterVec::new, "test bad name", "x", &["a"])
                .is_err()
        );
        assert!(
            f.labelled(IntGaugeVec::new, "test_bad_label", "x", &["a b"])
                .is_err()
        );
    }
}
