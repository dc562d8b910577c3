//! This node's presence in etcd: a lease (TTL `node_ttl`) kept alive, the node's `alive`
//! record and its `[[task]]` entries written under it, and a permanent `info` record so that
//! `node ls` can show the node as Down once the lease is gone. When the lease is lost (etcd
//! outage longer than the TTL) a new one is granted and everything is written again. On
//! shutdown the lease is revoked first, so other nodes drop our tasks at once.

use std::sync::Arc;
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

/// Runs until `shutdown`, then revokes the lease (bounded by the dial timeout).
pub async fn run(
    settings: LeaseSettings,
    mut registration: watch::Receiver<Arc<Registration>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::with_max((settings.ttl / 4).max(Duration::from_millis(200)));
    let mut members = Members::new(&settings.endpoints).with_security(settings.security.clone());
    let mut client: Option<Client> = None;
    let mut lease: Option<i64> = None;
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
            keep(&settings, c, &mut lease, &mut registration, &mut backoff).await
        };
        let err = tokio::select! {
            e = round => e,
            _ = shutdown.cancelled() => break,
        };
        let why = err.explain(members.current(), false);
        client = None;
        members.rotate();
        let delay = backoff.next_delay();
        tracing::debug!(error = %err.chain(), "node lease keeper error chain");
        tracing::warn!(retry_in = ?delay, "node lease keeper interrupted: {why}");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
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
                continue;
            }
            Err(e) => return e,
        }
        let mut interval = tokio::time::interval(beat);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut written_at = tokio::time::Instant::now();
        loop {
            let current = registration.borrow_and_update().clone();
            let changed = written.as_ref() != Some(&current);
            // Re-assert now and then: repairs keys deleted by hand, and keys another writer
            // (e.g. a second swarm manager) took over under a lease that has since died.
            let stale = written_at.elapsed() >= REASSERT_EVERY;
            if changed || stale {
                if let Err(e) = write(&mut client, s, id, written.as_deref(), &current, bound).await
                {
                    return e;
                }
                if changed {
                    tracing::info!(node = %current.node, tasks = current.tasks.len(), "node registered in etcd");
                }
                written = Some(current);
                written_at = tokio::time::Instant::now();
                backoff.reset();
            }
            tokio::select! {
                _ = interval.tick() => {}
                _ = registration.changed() => continue,
            }
            match heartbeat(&mut keeper, &mut responses, id, beat_bound).await {
                Ok(true) => {}
                Ok(false) => {
                    *lease = None;
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

/// Writes the node records and tasks in one transaction; removes tasks no longer configured.
async fn write(
    client: &mut Client,
    s: &LeaseSettings,
    lease: i64,
    old: Option<&Registration>,
    new: &Registration,
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
    if let Some(old) = old {
        for t in &old.tasks {
            if !new
                .tasks
                .iter()
                .any(|n| n.service == t.service && n.id == t.id)
            {
                ops.push(TxnOp::delete(task_key(&s.prefix, &t.service, &t.id), None));
            }
        }
    }
    // etcd refuses transactions over --max-txn-ops (128 by default): write in chunks.
    for chunk in ops.chunks(MAX_TXN_OPS) {
        tokio::time::timeout(bound, client.txn(Txn::new().and_then(chunk.to_vec())))
            .await
            .map_err(|_| DiscoveryError::Timeout(bound))??;
    }
    Ok(())
}
