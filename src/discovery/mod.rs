//! Discovery: the one writer of routing state. It keeps a [`RoutingTable`] in step with etcd
//! (or the static config), builds an immutable [`Snapshot`] after each change and publishes it
//! in one `ArcSwap`. It also keeps this node's liveness lease and its tasks registered
//! (`node.rs`). It never imports `proxy`.

pub mod etcd;
pub mod failure;
pub mod keys;
pub mod node;
pub mod ops;
pub mod published;
pub mod security;
pub mod static_;
pub mod table;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{ServiceName, ServiceSettings};
use crate::snapshot::{SharedSnapshot, Snapshot};
use table::{RoutingTable, Update};

/// Discovery health, read by /readyz and metrics.
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    /// Set once the first full listing has been published.
    synced: AtomicBool,
    /// True while the etcd watch is established and healthy.
    up: AtomicBool,
    /// Unix ms of the last successful sync (list or watch response).
    last_sync_ms: AtomicU64,
    revision: AtomicI64,
    invalid_total: AtomicU64,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DiscoveryStatus {
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }
    pub fn invalid_total(&self) -> u64 {
        self.invalid_total.load(Ordering::Relaxed)
    }
    /// Seconds since the routing state was last confirmed current (None before the first).
    pub fn last_sync_age_secs(&self) -> Option<f64> {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        (last != 0).then(|| unix_ms().saturating_sub(last) as f64 / 1000.0)
    }
    /// Unix ms of the last sync (None before the first).
    pub fn last_sync_unix_ms(&self) -> Option<u64> {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        (last != 0).then_some(last)
    }
    pub(crate) fn mark_synced(&self, revision: i64) {
        self.last_sync_ms.store(unix_ms(), Ordering::Relaxed);
        self.revision.store(revision, Ordering::Relaxed);
        self.synced.store(true, Ordering::Release);
    }
}

/// The single writer: owns the table and publishes snapshots.
pub struct Publisher {
    table: RoutingTable,
    settings: Arc<BTreeMap<ServiceName, ServiceSettings>>,
    shared: SharedSnapshot,
    status: Arc<DiscoveryStatus>,
    /// Told after every publish (the app reconciles its listeners with the snapshot's).
    notify: Option<tokio::sync::watch::Sender<()>>,
    /// `[acme] key_file`: unseals the private keys of ACME certificates.
    acme_key: Option<crate::acme::seal::SealKey>,
}

impl Publisher {
    pub fn new(
        prefix: &str,
        settings: Arc<BTreeMap<ServiceName, ServiceSettings>>,
        shared: SharedSnapshot,
        status: Arc<DiscoveryStatus>,
    ) -> Publisher {
        Publisher {
            table: RoutingTable::new(prefix),
            settings,
            shared,
            status,
            notify: None,
            acme_key: None,
        }
    }

    /// Unseals ACME certificates with `key` (`[acme] key_file`).
    pub fn with_acme_key(mut self, key: Option<crate::acme::seal::SealKey>) -> Publisher {
        self.acme_key = key;
        self
    }

    /// Sends on `notify` after every published snapshot.
    pub fn with_notify(mut self, notify: tokio::sync::watch::Sender<()>) -> Publisher {
        self.notify = Some(notify);
        self
    }

    /// Relative certificate paths of published listeners resolve against `path`'s directory
    /// (this node's config file).
    pub fn with_config_path(mut self, path: &std::path::Path) -> Publisher {
        self.table.config_path = path.to_path_buf();
        self
    }

    pub fn status(&self) -> &Arc<DiscoveryStatus> {
        &self.status
    }

    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// Applies updates to the table, logging and counting malformed entries.
    pub fn apply(&mut self, updates: impl IntoIterator<Item = Update>) {
        for u in updates {
            for bad in self.table.apply(u) {
                self.status.invalid_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %bad.key, reason = %bad.reason, "skipping malformed etcd entry");
            }
        }
    }

    /// Replaces service settings (config reload); takes effect at the next publish.
    pub fn set_settings(&mut self, settings: Arc<BTreeMap<ServiceName, ServiceSettings>>) {
        self.settings = settings;
    }

    /// Builds and publishes a snapshot of the current table.
    pub fn publish(&mut self) {
        let prev = self.shared.load_full();
        let mut next = Snapshot::build(&self.table, &self.settings, &prev);
        {
            let (acme, errors) = crate::acme::served::build(
                &self.table.acme,
                self.table.prefix(),
                self.acme_key.as_ref(),
                &prev.acme,
            );
            for e in errors {
                tracing::error!("ACME: {e}; this node keeps serving its other certificates");
            }
            next.acme = Arc::new(acme);
        }
        self.shared.store(Arc::new(next));
        self.status.mark_synced(self.table.revision);
        if let Some(n) = &self.notify {
            n.send_replace(());
        }
    }
}
