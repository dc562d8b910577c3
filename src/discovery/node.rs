//! This node's presence in etcd: a lease (TTL `node_ttl`) kept alive, the node's `alive`
//! record and its `[[task]]` entries written under it, and a permanent `info` record so that
//! `node ls` can show the node as Down once the lease is gone. When the lease is lost (etcd
//! outage longer than the TTL) a new one is granted and everything is written again. On
//! shutdown the lease is revoked first, so other nodes drop our tasks at once.
//!
//! Upgrades (`routemesh run --upgrade`, src/upgrade/): the old process's keeper stops without
//! revoking ([`LeaseHandle::keep_on_stop`]) and reports its lease and the keys it wrote;
//! the new process's keeper starts from that lease ([`Adopt`]): it keeps it alive at once,
//! writes nothing until the old process has stopped writing, and deletes the old process's
//! keys it does not write itself only once its own task set is complete. No key of the node
//! is ever deleted and written again on the way.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::etcd::{DiscoveryError, Members};
use super::failure;
use super::keys::{NodeRecord, TaskRecord, node_alive_key, node_info_key, task_key};
use crate::config::{NodeName, TaskConfig};
use crate::util::backoff::Backoff;

/// How often the registration is written again even when it did not change.
const REASSERT_EVERY: Duration = Duration::from_secs(30);

/// Operations per etcd transaction (etcd's default limit is 128).
const MAX_TXN_OPS: usize = 100;

/// What this node registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub node: NodeName,
    pub record: NodeRecord,
    pub tasks: Vec<TaskConfig>,
}

/// Settings of the keeper.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ttl: Duration,
    pub dial_timeout: Duration,
    /// TLS and credentials (`[discovery] tls`, `username`).
    pub security: crate::config::EtcdSecurity,
}

/// What the keeper shares with the upgrade hand-over (app.rs).
#[derive(Debug, Default)]
pub struct LeaseHandle {
    /// The lease in use; 0 while there is none.
    lease: AtomicI64,
    /// The keys last written under it (the `alive` record and the tasks).
    written: Mutex<Vec<String>>,
    /// Set when the lease goes to another process: the keeper stops without revoking it.
    keep: AtomicBool,
}

impl LeaseHandle {
    pub fn lease(&self) -> Option<i64> {
        Some(self.lease.load(Ordering::Acquire)).filter(|id| *id != 0)
    }

    /// The keys written under the lease (the `alive` record and the tasks).
    pub fn written_keys(&self) -> Vec<String> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The next stop leaves the lease (and so the node's keys) alive.
    pub fn keep_on_stop(&self) {
        self.keep.store(true, Ordering::Release);
    }

    fn set_lease(&self, id: Option<i64>) {
        self.lease.store(id.unwrap_or(0), Ordering::Release);
    }
}

/// Taking over the lease of the process this one upgrades.
pub struct Adopt {
    pub lease: i64,
    /// `Some(keys)` once the old process has stopped writing: the keys it had written under
    /// the lease. Until then the keeper only keeps the lease alive.
    pub previous: watch::Receiver<Option<Arc<Vec<String>>>>,
    /// Fires once this process's task set is complete (with [docker], after the engine's
    /// first listing): then the old process's keys it does not write itself are deleted (a
    /// task no longer there; the `alive` record of a node renamed by the upgrade).
    pub complete: CancellationToken,
}

/// Where an adoption stands.
struct Adoption {
    /// Waiting for the old process to stop writing.
    waiting: Option<Adopt>,
    /// The old process's keys not decided yet, and the signal that decides them.
    orphans: Vec<String>,
    complete: Option<CancellationToken>,
}

impl Adoption {
    fn none() -> Adoption {
        Adoption {
            waiting: None,
            orphans: Vec::new(),
            complete: None,
        }
    }

    /// The lease was lost: nothing of the old process's is left to adopt.
    fn abandon(&mut self) {
        if let Some(a) = self.waiting.take() {
            self.complete = Some(a.complete);
        }
        self.orphans.clear();
    }
}

/// Runs until `shutdown`, then revokes the lease (bounded by the dial timeout) unless it was
/// handed over ([`LeaseHandle::keep_on_stop`]) or never became this process's ([`Adopt`]).
pub async fn run(
    settings: LeaseSettings,
    mut registration: watch::Receiver<Arc<Registration>>,
    handle: Arc<LeaseHandle>,
    adopt: Option<Adopt>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::with_max((settings.ttl / 4).max(Duration::from_millis(200)));
    let mut members = Members::new(&settings.endpoints).with_security(settings.security.clone());
    let mut client: Option<Client> = None;
    let mut lease: Option<i64> = adopt.as_ref().map(|a| a.lease);
    handle.set_lease(lease);
    let mut adoption = Adoption::none();
    adoption.waiting = adopt;
    loop {
        let round = async {
            let c = match &client {
                Some(c) => c.clone(),
                None => match members.connect(settings.dial_timeout).await {
                    Ok(c) => {
                        client = Some(c.clone());
                        c
                    }
                    Err(e) => return e,
                },
            };
            keep(
                &settings,
                c,
                &mut lease,
                &mut registration,
                &mut backoff,
                &handle,
                &mut adoption,
            )
            .await
        };
        let err = tokio::select! {
            e = round => e,
            _ = shutdown.cancelled() => break,
        };
        client = None;
        let what = ("node lease keeper", "");
        if !members
            .pause_after(&err, what, &mut backoff, &shutdown)
            .await
        {
            break;
        }
    }
    if handle.keep.load(Ordering::Acquire) || adoption.waiting.is_some() {
        tracing::info!(lease = ?lease, "node lease left alive for the process that took over");
        return;
    }
    if client.is_none() && lease.is_some() {
        client = members.connect(settings.dial_timeout).await.ok();
    }
    if let (Some(mut c), Some(id)) = (client, lease) {
        match tokio::time::timeout(settings.dial_timeout, c.lease_revoke(id)).await {
            Ok(Ok(_)) => tracing::info!(lease = id, "node lease revoked"),
            Ok(Err(e)) => tracing::warn!(
                "could not revoke the node lease: {}",
                failure::Cause::of(&e)
            ),
            Err(_) => tracing::warn!("timed out revoking the node lease"),
        }
    }
}

/// Grants (or reuses) the lease, writes the records, and keeps the lease alive. Returns only
/// on error.
async fn keep(
    s: &LeaseSettings,
    mut client: Client,
    lease: &mut Option<i64>,
    registration: &mut watch::Receiver<Arc<Registration>>,
    backoff: &mut Backoff,
    handle: &LeaseHandle,
    adoption: &mut Adoption,
) -> DiscoveryError {
    let bound = s.dial_timeout * 2;
    // Heartbeats run at TTL/4 and each must answer within TTL/4: a member that went silent
    // is left for another one long before the lease could expire.
    let beat = (s.ttl / 4).max(Duration::from_millis(250));
    let beat_bound = beat.min(bound);
    let ttl_secs = s.ttl.as_secs().max(1) as i64;
    let mut written: Option<Arc<Registration>> = None;
    loop {
        // A lease we held before an interruption may still be valid: keep it if so.
        let id = match *lease {
            Some(id) => id,
            None => match tokio::time::timeout(bound, client.lease_grant(ttl_secs, None)).await {
                Ok(Ok(r)) => {
                    tracing::info!(lease = r.id(), ttl = r.ttl(), "node lease granted");
                    *lease = Some(r.id());
                    handle.set_lease(*lease);
                    written = None;
                    r.id()
                }
                Ok(Err(e)) => return e.into(),
                Err(_) => return DiscoveryError::Timeout(bound),
            },
        };
        let (mut keeper, mut responses) =
            match tokio::time::timeout(bound, client.lease_keep_alive(id)).await {
                Ok(Ok(k)) => k,
                Ok(Err(e)) => return e.into(),
                Err(_) => return DiscoveryError::Timeout(bound),
            };
        // First keepalive tells whether the lease still exists.
        match heartbeat(&mut keeper, &mut responses, id, bound).await {
            Ok(true) => {}
            Ok(false) => {
                *lease = None;
                adoption.abandon();
                continue;
            }
            Err(e) => return e,
        }
        let mut interval = tokio::time::interval(beat);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut written_at = tokio::time::Instant::now();
        loop {
            // Adopting: only heartbeats until the old process has stopped writing.
            if let Some(waiting) = adoption.waiting.as_mut() {
                let previous = waiting.previous.borrow_and_update().clone();
                if let Some(keys) = previous {
                    let a = adoption.waiting.take().expect("checked");
                    adoption.orphans = keys.to_vec();
                    adoption.complete = Some(a.complete);
                    tracing::info!(
                        lease = id,
                        "node lease taken over from the previous process"
                    );
                } else {
                    tokio::select! {
                        _ = interval.tick() => {}
                        r = waiting.previous.changed() => if r.is_err() {
                            // The hand-over failed: the lease stays the old process's.
                            std::future::pending::<()>().await;
                        },
                    }
                    match heartbeat(&mut keeper, &mut responses, id, beat_bound).await {
                        Ok(true) => continue,
                        Ok(false) => {
                            *lease = None;
                            adoption.abandon();
                            break;
                        }
                        Err(e) => return e,
                    }
                }
            }
            let current = registration.borrow_and_update().clone();
            let changed = written.as_ref() != Some(&current);
            let complete = adoption.complete.as_ref().is_some_and(|c| c.is_cancelled());
            let orphans_due = complete && !adoption.orphans.is_empty();
            // Re-assert now and then: repairs keys deleted by hand, and keys another writer
            // (e.g. a second swarm manager) took over under a lease that has since died.
            let stale = written_at.elapsed() >= REASSERT_EVERY;
            if changed || stale || orphans_due {
                let now = leased_keys(&s.prefix, &current);
                let mut gone: Vec<String> = written
                    .as_deref()
                    .map(|w| leased_keys(&s.prefix, w))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|k| !now.contains(k))
                    .collect();
                if orphans_due {
                    gone.extend(
                        adoption
                            .orphans
                            .iter()
                            .filter(|k| !now.contains(*k))
                            .cloned(),
                    );
                }
                gone.sort();
                gone.dedup();
                if let Err(e) = write(&mut client, s, id, &current, &gone, bound).await {
                    return e;
                }
                if changed {
                    tracing::info!(node = %current.node, tasks = current.tasks.len(), "node registered in etcd");
                }
                if orphans_due {
                    adoption.orphans.clear();
                }
                *handle.written.lock().unwrap_or_else(|p| p.into_inner()) =
                    now.into_iter().collect();
                written = Some(current);
                written_at = tokio::time::Instant::now();
                backoff.reset();
            }
            let waiting_complete = adoption
                .complete
                .clone()
                .filter(|_| !adoption.orphans.is_empty());
            tokio::select! {
                _ = interval.tick() => {}
                _ = registration.changed() => continue,
                _ = async { waiting_complete.as_ref().expect("guarded").cancelled().await }, if waiting_complete.is_some() => continue,
            }
            match heartbeat(&mut keeper, &mut responses, id, beat_bound).await {
                Ok(true) => {}
                Ok(false) => {
                    *lease = None;
                    adoption.abandon();
                    break;
                }
                Err(e) => return e,
            }
        }
    }
}

/// One keepalive round trip within `bound`: `Ok(true)` while the lease lives, `Ok(false)`
/// once etcd says it has expired (the caller registers again under a new one).
async fn heartbeat(
    keeper: &mut LeaseKeeper,
    responses: &mut LeaseKeepAliveStream,
    lease: i64,
    bound: Duration,
) -> Result<bool, DiscoveryError> {
    keeper.keep_alive().await?;
    let answer = tokio::time::timeout(bound, responses.message())
        .await
        .map_err(|_| DiscoveryError::Timeout(bound))??;
    let alive = answer.is_some_and(|r| r.ttl() > 0);
    if !alive {
        tracing::warn!(lease, "node lease expired; registering again");
    }
    Ok(alive)
}

/// The etcd keys a registration writes under the lease: the node's `alive` record and its
/// tasks.
fn leased_keys(prefix: &str, r: &Registration) -> BTreeSet<String> {
    r.tasks
        .iter()
        .map(|t| task_key(prefix, &t.service, &t.id))
        .chain([node_alive_key(prefix, &r.node)])
        .collect()
}

/// Writes the node records and tasks in one transaction and deletes the keys `gone` (tasks
/// no longer registered, keys of the process this one took over from).
async fn write(
    client: &mut Client,
    s: &LeaseSettings,
    lease: i64,
    new: &Registration,
    gone: &[String],
    bound: Duration,
) -> Result<(), DiscoveryError> {
    let leased = || Some(PutOptions::new().with_lease(lease));
    let mut ops = vec![
        TxnOp::put(
            node_info_key(&s.prefix, &new.node),
            new.record.to_json(),
            None,
        ),
        TxnOp::put(
            node_alive_key(&s.prefix, &new.node),
            new.record.to_json(),
            leased(),
        ),
    ];
    for t in &new.tasks {
        let rec = TaskRecord {
            addr: t.addr,
            node: Some(new.node.clone()),
            weight: t.weight,
            publish: t.publish.clone(),
        };
        ops.push(TxnOp::put(
            task_key(&s.prefix, &t.service, &t.id),
            rec.to_json(),
            leased(),
        ));
    }
    for key in gone {
        ops.push(TxnOp::delete(key.as_str(), None));
    }
    // etcd refuses transactions over --max-txn-ops (128 by default): write in chunks.
    for chunk in ops.chunks(MAX_TXN_OPS) {
        tokio::time::timeout(bound, client.txn(Txn::new().and_then(chunk.to_vec())))
            .await
            .map_err(|_| DiscoveryError::Timeout(bound))??;
    }
    Ok(())
}
