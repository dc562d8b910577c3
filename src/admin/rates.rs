//! Per-second rates for the status page, from counters sampled a few times a second: a
//! listener's connections and bytes (the Prometheus counters a `/metrics` scrape reads) and a
//! task's attempts and failures (atomics in its `TaskState`). Rates cover the last
//! [`WINDOW_MS`], so one slow tick does not make them jump. Pure apart from [`read_metrics`].

use std::collections::{HashMap, VecDeque};

use prometheus::core::Collector;

use crate::config::{ServiceName, TaskId};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// The span the rates are averaged over.
pub const WINDOW_MS: u64 = 2000;

/// One counter the page shows a rate of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Counter {
    ListenerConnections(String),
    /// Bytes from clients.
    ListenerBytesIn(String),
    /// Bytes to clients.
    ListenerBytesOut(String),
    TaskAttempts(ServiceName, TaskId),
    TaskFailures(ServiceName, TaskId),
}

/// Counters at one moment, plus gauges that are shown as they are.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// [`crate::util::clock::now_ms`] when taken.
    pub at_ms: u64,
    pub counters: HashMap<Counter, u64>,
    /// Open connections per listener.
    pub active: HashMap<String, i64>,
}

/// The samples of the last [`WINDOW_MS`] (and the one just before, as the base).
#[derive(Debug, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
}

impl Window {
    pub fn push(&mut self, s: Sample) {
        self.samples.push_back(s);
        let newest = self.samples.back().map(|s| s.at_ms).unwrap_or(0);
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|s| newest.saturating_sub(s.at_ms) >= WINDOW_MS)
        {
            self.samples.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Per second over the window; None until there are two samples. A counter absent from
    /// the base counts from 0 (labelled counters appear with their first increment, a new
    /// task starts at 0); one that went backwards (a task that got a new address and so a new
    /// state) gives 0.
    pub fn rate(&self, c: &Counter) -> Option<f64> {
        let (old, new) = (self.samples.front()?, self.samples.back()?);
        let secs = new.at_ms.checked_sub(old.at_ms).filter(|&d| d > 0)? as f64 / 1000.0;
        let now = *new.counters.get(c).unwrap_or(&0);
        let before = *old.counters.get(c).unwrap_or(&0);
        Some(now.saturating_sub(before) as f64 / secs)
    }

    /// Open connections of `listener` in the newest sample.
    pub fn active(&self, listener: &str) -> Option<i64> {
        self.samples
            .back()
            .map(|s| *s.active.get(listener).unwrap_or(&0))
    }
}

/// `x` with three significant digits, so the page's state does not change with noise.
pub fn round3(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    let digits = 2 - x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// The tasks' attempt and failure counts (atomics only).
pub fn read_tasks(snap: &Snapshot, into: &mut HashMap<Counter, u64>) {
    for svc in snap.services.values() {
        for t in &svc.tasks {
            let key = || (svc.name.clone(), t.id.clone());
            let (s, i) = key();
            into.insert(Counter::TaskAttempts(s, i), t.state.attempts());
            let (s, i) = key();
            into.insert(Counter::TaskFailures(s, i), t.state.failures());
        }
    }
}

/// The listeners' connection and byte counters and open connections, summed over services.
/// Reads the registry's families the way a `/metrics` scrape does (shared access to their
/// label maps; never exclusive).
pub fn read_metrics(m: &Metrics, into: &mut Sample) {
    let label = |metric: &prometheus::proto::Metric, name: &str| -> Option<String> {
        metric
            .get_label()
            .iter()
            .find(|l| l.name() == name)
            .map(|l| l.value().to_string())
    };
    for mf in m.connections_total.collect() {
        for metric in mf.get_metric() {
            if let Some(l) = label(metric, "listener") {
                *into
                    .counters
                    .entry(Counter::ListenerConnections(l))
                    .or_default() += metric.get_counter().get_value() as u64;
            }
        }
    }
    for mf in m.bytes_total.collect() {
        for metric in mf.get_metric() {
            let (Some(l), Some(dir)) = (label(metric, "listener"), label(metric, "direction"))
            else {
                continue;
            };
            let key = if dir == "rx" {
                Counter::ListenerBytesIn(l)
            } else {
                Counter::ListenerBytesOut(l)
            };
            *into.counters.entry(key).or_default() += metric.get_counter().get_value() as u64;
        }
    }
    for mf in m.active_connections.collect() {
        for metric in mf.get_metric() {
            if let Some(l) = label(metric, "listener") {
                *into.active.entry(l).or_default() += metric.get_gauge().get_value() as i64;
            }
        }
    }
}

/// `routemesh_config_reloads_total` by result, (success, error), without creating either
/// series (labelled counters appear in /metrics only once they count something).
pub fn read_reloads(m: &Metrics) -> (u64, u64) {
    let (mut ok, mut err) = (0, 0);
    for mf in m.config_reloads_total.collect() {
        for metric in mf.get_metric() {
            let v = metric.get_counter().get_value() as u64;
            match metric.get_label().iter().find(|l| l.name() == "result") {
                Some(l) if l.value() == "success" => ok += v,
                Some(_) => err += v,
                None => {}
            }
        }
    }
    (ok, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, conns: u64) -> Sample {
        let mut s = Sample {
            at_ms,
            ..Default::default()
        };
        s.counters
            .insert(Counter::ListenerConnections("web".into()), conns);
        s
    }

    #[test]
    fn rates_over_the_window() {
        let c = Counter::ListenerConnections("web".into());
        let mut w = Window::default();
        w.push(sample(1000, 0));
        assert_eq!(w.rate(&c), None);
        w.push(sample(1500, 50));
        assert_eq!(w.rate(&c), Some(100.0));
        for (i, t) in [2000, 2500, 3000, 3500, 4000].into_iter().enumerate() {
            w.push(sample(t, 50 + 100 * (i as u64 + 1)));
        }
        // The base is the newest sample at least WINDOW_MS old: t=2000 (150 connections).
        assert_eq!(w.rate(&c), Some((550.0 - 150.0) / 2.0));
        assert_eq!(
            w.rate(&Counter::ListenerBytesIn("web".into())),
            Some(0.0),
            "absent counters count from zero"
        );
        // A counter that went backwards gives 0, not a huge number.
        w.push(sample(4500, 10));
        assert_eq!(w.rate(&c), Some(0.0));
        w.clear();
        assert_eq!(w.rate(&c), None);
    }

    #[test]
    fn three_significant_digits() {
        assert_eq!(round3(0.0), 0.0);
        assert_eq!(round3(1234.5), 1230.0);
        assert_eq!(round3(0.012345), 0.0123);
        assert_eq!(round3(99.95), 100.0);
        assert_eq!(round3(f64::NAN), 0.0);
    }

    #[test]
    fn listener_counters_are_summed_over_services() {
        let m = Metrics::new().unwrap();
        m.connections_total
            .with_label_values(&["web", "a"])
            .inc_by(3);
        m.connections_total
            .with_label_values(&["web", "b"])
            .inc_by(4);
        m.bytes_total
            .with_label_values(&["web", "a", "rx"])
            .inc_by(10);
        m.bytes_total
            .with_label_values(&["web", "a", "tx"])
            .inc_by(20);
        m.active_connections.with_label_values(&["web", "a"]).set(2);
        let mut s = Sample::default();
        read_metrics(&m, &mut s);
        assert_eq!(s.counters[&Counter::ListenerConnections("web".into())], 7);
        assert_eq!(s.counters[&Counter::ListenerBytesIn("web".into())], 10);
        assert_eq!(s.counters[&Counter::ListenerBytesOut("web".into())], 20);
        assert_eq!(s.active["web"], 2);
        assert_eq!(read_reloads(&m), (0, 0));
        m.config_reloads_total.with_label_values(&["success"]).inc();
        m.config_reloads_total.with_label_values(&["error"]).inc();
        assert_eq!(read_reloads(&m), (1, 1));
    }
}
