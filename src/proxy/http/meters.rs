//! Metric handles of an http listener, per service, resolved once: the label lookups of
//! `with_label_values` (hashing every label) happen the first time a listener serves a
//! service or a status code, never again per request.

use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{Histogram, IntCounter, IntGauge};

use crate::metrics::Metrics;

/// One (listener, service)'s handles.
pub struct ServiceMeters {
    pub service: String,
    listener: String,
    metrics: Arc<Metrics>,
    pub duration: Histogram,
    pub rx: IntCounter,
    pub tx: IntCounter,
    /// `http_requests_total` by status code 100–599.
    codes: Box<[OnceLock<IntCounter>]>,
}

impl ServiceMeters {
    /// Counts one request answered with `code`.
    pub fn count(&self, code: u16) {
        let slot = (code as usize)
            .checked_sub(100)
            .and_then(|i| self.codes.get(i));
        let make = || {
            self.metrics.http_requests_total.with_label_values(&[
                self.listener.as_str(),
                self.service.as_str(),
                &code.to_string(),
            ])
        };
        match slot {
            Some(s) => s.get_or_init(make).inc(),
            None => make().inc(),
        }
    }
}

/// The handles of one listener, by service ("" for requests no route matched).
#[derive(Default)]
pub struct ListenerMeters {
    by_service: Mutex<Vec<Arc<ServiceMeters>>>,
    /// `connections_total` and `active_connections` of the listener's connections.
    connections: OnceLock<(IntCounter, IntGauge)>,
}

/// One open client connection, counted in `connections_total` when opened and in
/// `active_connections` while it lives.
pub struct Open(IntGauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ListenerMeters {
    /// Counts a connection of `listener` (labelled with its default service).
    pub fn open(&self, metrics: &Metrics, listener: &str, service: &str) -> Open {
        let (total, active) = self.connections.get_or_init(|| {
            let labels = [listener, service];
            (
                metrics.connections_total.with_label_values(&labels),
                metrics.active_connections.with_label_values(&labels),
            )
        });
        total.inc();
        active.inc();
        Open(active.clone())
    }

    /// The handles of `service` on `listener` (made the first time).
    pub fn get(&self, metrics: &Arc<Metrics>, listener: &str, service: &str) -> Arc<ServiceMeters> {
        let mut all = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = all.iter().find(|m| m.service == service) {
            return m.clone();
        }
        let labels = [listener, service];
        let (rx, tx) = crate::metrics::rx_tx(&metrics.bytes_total, listener, service);
        let m = Arc::new(ServiceMeters {
            service: service.to_string(),
            listener: listener.to_string(),
            metrics: metrics.clone(),
            duration: metrics
                .http_request_duration_seconds
                .with_label_values(&labels),
            rx,
            tx,
            codes: (100..600).map(|_| OnceLock::new()).collect(),
        });
        all.push(m.clone());
        m
    }
}
