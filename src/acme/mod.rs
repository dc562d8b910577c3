//! ACME: certificates for the whole cluster. One node orders each certificate (holding a
//! lock in etcd bound to its lease), every node serves it.
//!
//! Owns: deciding when a certificate is due (`schedule.rs`, pure), the lock, running the
//! order (`order.rs`, instant-acme on rustls/ring), recording the outcome in etcd, and the
//! metrics of certificates. The etcd keys and values are `store.rs`; sealing private keys
//! with `[acme] key_file` is `seal.rs`; what every node serves from the routing snapshot
//! (certificates, http-01 answers, tls-alpn-01 certificates) is `served.rs`, built by
//! discovery's one writer. Does not own: TLS termination (`proxy::tls` reads the snapshot)
//! nor answering http-01 requests (`proxy::http`).
//!
//! Every node runs [`run`]: every few seconds it looks at the snapshot, and for each
//! certificate its listeners want that is due (missing, for other names, or in its renewal
//! window, and past any failure backoff) and not locked, tries the lock with a transaction
//! (`put` under its own lease if absent). The holder re-reads the certificate from etcd,
//! orders, stores the certificate (or a failed status with the next retry time), deletes
//! its challenges and releases the lock. A holder that dies loses the lock with its lease;
//! another node then takes over.

pub mod order;
pub mod schedule;
pub mod seal;
pub mod served;
pub mod store;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use crate::config::acme::AcmeConfig;
use crate::config::{DiscoveryConfig, ListenerConfig, NodeName};
use crate::discovery::node::LeaseHandle;
use crate::metrics::Metrics;
use crate::snapshot::SharedSnapshot;
use schedule::Known;
use seal::SealKey;
use store::{CertRecord, StatusRecord, cert_key, challenge_key, lock_key, status_key, to_json};

/// A certificate this node's listeners want: named by its first domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub domains: Vec<String>,
}

/// The certificates `listeners` ask for, once each (the first listener naming a
/// certificate decides its domains).
pub fn wanted(listeners: &[ListenerConfig]) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = Vec::new();
    for l in listeners {
        if let Some(name) = l.edge.acme.first()
            && !out.iter().any(|w| &w.name == name)
        {
            out.push(Wanted {
                name: name.clone(),
                domains: l.edge.acme.clone(),
            });
        }
    }
    out
}

/// How often each node looks for due certificates.
const TICK: Duration = Duration::from_secs(2);
/// Bound on one whole order (account, validation, issuance).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the scheduler knows of `w` from a stored record and status.
fn known(w: &Wanted, cert: Option<&CertRecord>, status: Option<&StatusRecord>) -> Known {
    let same = |c: &CertRecord| {
        c.domains.iter().collect::<BTreeSet<_>>() == w.domains.iter().collect::<BTreeSet<_>>()
    };
    Known {
        valid: cert
            .filter(|c| same(c))
            .map(|c| (c.not_before, c.not_after)),
        retry_at: status
            .filter(|s| s.state == "failed")
            .map_or(0, |s| s.retry_at),
    }
}

/// Everything the ordering loop needs.
pub struct AcmeTask {
    pub acme: AcmeConfig,
    pub discovery: DiscoveryConfig,
    pub node: NodeName,
    /// From this node's TOML at start (published listeners are read from each snapshot).
    pub wanted: Vec<Wanted>,
    pub snapshot: SharedSnapshot,
    pub lease: Arc<LeaseHandle>,
    pub metrics: Arc<Metrics>,
}

/// Runs until `shutdown`.
pub async fn run(task: AcmeTask, shutdown: CancellationToken) {
    let key = SealKey::new(&task.acme.key);
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        export_expiry(&task);
        let Some(lease) = task.lease.lease() else {
            continue;
        };
        let snap = task.snapshot.load_full();
        if !snap.synced {
            continue;
        }
        let now = unix_now();
        // This node's TOML listeners, then listeners published in etcd with `tls.acme`.
        let published: Vec<ListenerConfig> =
            snap.published.iter().map(|p| p.config.clone()).collect();
        let mut all = task.wanted.clone();
        for w in wanted(&published) {
            if !all.iter().any(|o| o.name == w.name) {
                all.push(w);
            }
        }
        for w in &all {
            if let Some(Err(_)) = snap.acme.certs.get(&w.name).map(|c| &c.key) {
                // This node cannot open the stored certificate (another key_file): it must
                // not replace it either; the nodes that can will renew it.
                continue;
            }
            let cert = snap.acme.certs.get(&w.name).map(|c| &c.record);
            let k = known(w, cert, snap.acme.status.get(&w.name));
            if schedule::due_at(&w.name, k, task.acme.renew_before) > now
                || snap.acme.locks.contains_key(&w.name)
            {
                continue;
            }
            if client.is_none() {
                match crate::discovery::etcd::connect(
                    &task.discovery.endpoints,
                    task.discovery.dial_timeout,
                    &task.discovery.security,
                )
                .await
                {
                    Ok((c, _)) => client = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "ACME: etcd unreachable; certificates are not renewed until it answers");
                        break;
                    }
                }
            }
            let c = client.as_mut().expect("connected above");
            let at = Attempt {
                task: &task,
                key: &key,
                lease,
                w,
            };
            if let Err(e) = attempt(at, c).await {
                tracing::warn!(certificate = %w.name, error = %e, "ACME: etcd failed during an order; retrying later");
                client = None;
            }
        }
    }
}

/// One attempt at certificate `w` under this node's `lease`.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    task: &'a AcmeTask,
    key: &'a SealKey,
    lease: i64,
    w: &'a Wanted,
}

/// Takes the lock of `w`, orders if it is still due, records the outcome, releases.
/// `Err` only for etcd failures around the order (the order's own failures are recorded).
async fn attempt(at: Attempt<'_>, client: &mut Client) -> Result<(), etcd_client::Error> {
    let Attempt { task, lease, w, .. } = at;
    let prefix = task.discovery.prefix.as_str();
    let lock = lock_key(prefix, &w.name);
    let node = task.node.as_str();
    let took = client
        .txn(
            Txn::new()
                .when([Compare::create_revision(lock.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    lock.as_str(),
                    node,
                    Some(PutOptions::new().with_lease(lease)),
                )]),
        )
        .await?
        .succeeded();
    if !took {
        return Ok(());
    }
    let result = holding(at, client).await;
    // Release only our own lock (a lease that expired meanwhile may have let another in).
    let release = client
        .txn(
            Txn::new()
                .when([Compare::value(lock.as_str(), CompareOp::Equal, node)])
                .and_then([TxnOp::delete(lock.as_str(), None)]),
        )
        .await;
    result.and(release.map(|_| ()))
}

/// The record at `key`, or None when it is absent or does not parse (a malformed record is
/// as good as none: the certificate is ordered again).
async fn read_record<T, E>(
    client: &mut Client,
    key: &str,
    parse: impl Fn(&[u8]) -> Result<T, E>,
) -> Result<Option<T>, etcd_client::Error> {
    let got = client.get(key, None).await?;
    Ok(got.kvs().first().and_then(|kv| parse(kv.value()).ok()))
}

/// With the lock held: re-check against etcd, order, record.
async fn holding(at: Attempt<'_>, client: &mut Client) -> Result<(), etcd_client::Error> {
    let Attempt {
        task,
        key,
        lease,
        w,
    } = at;
    let prefix = task.discovery.prefix.as_str();
    let ck = cert_key(prefix, &w.name);
    let sk = status_key(prefix, &w.name);
    let cert = read_record(client, &ck, CertRecord::parse).await?;
    let status = read_record(client, &sk, StatusRecord::parse).await?;
    let now = unix_now();
    let k = known(w, cert.as_ref(), status.as_ref());
    if schedule::due_at(&w.name, k, task.acme.renew_before) > now {
        // Another node finished it between our look and the lock.
        return Ok(());
    }
    let renewing = cert.is_some();
    tracing::info!(certificate = %w.name, domains = %w.domains.join(","), renewing, "ACME: ordering");
    let mut tokens = Vec::new();
    let outcome = {
        let mut ctx = order::OrderCtx {
            client: &mut *client,
            prefix,
            node: task.node.as_str(),
            lease,
            acme: &task.acme,
            key,
            snapshot: &task.snapshot,
        };
        // A CA that accepts connections but never answers must not hold the lock forever.
        match tokio::time::timeout(
            ORDER_TIMEOUT,
            order::order(&mut ctx, &w.name, &w.domains, &mut tokens),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(order::OrderError::Order(format!(
                "the CA did not complete the order within {ORDER_TIMEOUT:?}"
            ))),
        }
    };
    for t in &tokens {
        client
            .delete(challenge_key(prefix, t).as_str(), None)
            .await?;
    }
    let now = unix_now();
    let record = |state: &str, last_error, failures, retry_at| StatusRecord {
        state: state.into(),
        last_error,
        failures,
        retry_at,
        node: task.node.to_string(),
        at: now,
    };
    let (st, result) = match outcome {
        Ok(rec) => {
            tracing::info!(certificate = %w.name, not_after = rec.not_after, issuer = %rec.issuer, "ACME: certificate issued and stored");
            client.put(ck.as_str(), to_json(&rec), None).await?;
            (record("valid", None, 0, 0), "success")
        }
        Err(e) => {
            let failures = status
                .filter(|s| s.state == "failed")
                .map_or(0, |s| s.failures)
                + 1;
            let wait = schedule::backoff(failures);
            tracing::warn!(certificate = %w.name, error = %e, failures, retry_in = ?wait, "ACME: order failed; the current certificate (if any) keeps serving");
            let retry_at = now + wait.as_secs();
            (
                record("failed", Some(e.to_string()), failures, retry_at),
                "error",
            )
        }
    };
    client.put(sk.as_str(), to_json(&st), None).await?;
    task.metrics
        .acme_orders_total
        .with_label_values(&[result])
        .inc();
    Ok(())
}

/// `routemesh_tls_certificate_expiry_seconds{name}` for each certificate this node serves.
fn export_expiry(task: &AcmeTask) {
    let snap = task.snapshot.load();
    for (name, c) in &snap.acme.certs {
        if c.key.is_ok() {
            task.metrics
                .tls_certificate_expiry_seconds
                .with_label_values(&[name])
                .set(c.record.not_after as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_once_per_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "00".repeat(32)).unwrap();
        let c = crate::config::Config::parse(
            &dir.path().join("t.toml"),
            "[acme]\ndirectory = \"https://ca/dir\"\nkey_file = \"k\"\n[[listener]]\nlisten = \"0.0.0.0:443\"\nprotocol = \"http\"\ntls = { acme = [\"a.test\", \"b.test\"] }\n[[listener]]\nlisten = \"0.0.0.0:8443\"\nprotocol = \"http\"\ntls = { acme = [\"a.test\"] }\n[[listener]]\nlisten = \"0.0.0.0:80\"\nprotocol = \"http\"\n",
        )
        .unwrap();
        assert_eq!(
            wanted(&c.listeners),
            vec![Wanted {
                name: "a.test".into(),
                domains: vec!["a.test".into(), "b.test".into()],
            }]
        );
    }

    #[test]
    fn known_ignores_certificates_for_other_names() {
        let w = Wanted {
            name: "a".into(),
            domains: vec!["a".into(), "b".into()],
        };
        let mut c = CertRecord {
            domains: vec!["b".into(), "a".into()],
            chain_pem: String::new(),
            key: String::new(),
            not_before: 1,
            not_after: 2,
            issuer: String::new(),
            node: String::new(),
        };
        assert_eq!(known(&w, Some(&c), None).valid, Some((1, 2)));
        c.domains.pop();
        assert_eq!(known(&w, Some(&c), None).valid, None);
        let st = StatusRecord {
            state: "failed".into(),
            last_error: None,
            failures: 1,
            retry_at: 9,
            node: String::new(),
            at: 0,
        };
        assert_eq!(known(&w, None, Some(&st)).retry_at, 9);
    }
}
