//! Operator writes to the cluster's keys, shared by the CLI (`node update`) and the status
//! page's write actions: a node's availability and a task's weight. Each request to etcd is
//! bounded by the caller's timeout. The value rewrite of a task is pure ([`with_weight`]).

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use super::etcd::DiscoveryError;
use super::keys::{Availability, TaskRecord, node_availability_key, task_key};
use crate::config::{NodeName, ServiceName, TaskId};

/// Why an operator write was not made.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("unknown node {0}: `routemesh node ls` lists the nodes")]
    UnknownNode(NodeName),
    #[error("service {0} has no task {1}: `routemesh service ps {0}` lists them")]
    NoSuchTask(ServiceName, TaskId),
    #[error("`weight` {0} is out of range 0..=1000")]
    Weight(u64),
    /// The task's value in etcd does not parse: rewriting it would guess.
    #[error("the value of {key} is not a valid task ({reason}); fix it with `routemesh task add`")]
    Malformed { key: String, reason: String },
    /// Someone else wrote the key between our read and our write.
    #[error("{0} changed while it was being updated; try again")]
    Changed(String),
    #[error(transparent)]
    Etcd(#[from] DiscoveryError),
}

/// Runs one etcd request within `timeout`.
async fn bounded<T>(
    timeout: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, OpError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|e| OpError::Etcd(e.into())),
        Err(_) => Err(OpError::Etcd(DiscoveryError::Timeout(timeout))),
    }
}

/// Writes `{prefix}/nodes/{node}/availability`; a node with no record at all is refused (a
/// typo would otherwise create a key nobody reads).
pub async fn set_availability(
    client: &mut Client,
    prefix: &str,
    node: &NodeName,
    availability: Availability,
    timeout: Duration,
) -> Result<(), OpError> {
    let known = bounded(
        timeout,
        client.get(
            format!("{prefix}/nodes/{node}/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        ),
    )
    .await?;
    if known.count() == 0 {
        return Err(OpError::UnknownNode(node.clone()));
    }
    bounded(
        timeout,
        client.put(
            node_availability_key(prefix, node),
            availability.as_str(),
            None,
        ),
    )
    .await?;
    Ok(())
}

/// What [`set_task_weight`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChange {
    pub from: u32,
    pub to: u32,
    /// The lease the value stays attached to (0: permanent key).
    pub lease: i64,
}

/// `value` (a task's JSON) with `weight` replaced and every other field kept as written,
/// unknown ones included. Returns the new value and the old weight.
pub fn with_weight(key: &str, value: &[u8], weight: u32) -> Result<(String, u32), OpError> {
    let malformed = |reason: String| OpError::Malformed {
        key: key.to_string(),
        reason,
    };
    let old = TaskRecord::parse(value).map_err(|e| malformed(e.to_string()))?;
    let mut obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(value).map_err(|e| malformed(e.to_string()))?;
    obj.insert("weight".into(), weight.into());
    let text = serde_json::Value::Object(obj).to_string();
    Ok((text, old.weight))
}

/// Rewrites the task's value under `{prefix}/tasks/{service}/{id}` with a new `weight`,
/// keeping its other fields and its lease. The write only happens if the key is unchanged
/// since it was read (a transaction on its mod revision), so a concurrent update is never
/// overwritten with stale fields.
pub async fn set_task_weight(
    client: &mut Client,
    prefix: &str,
    service: &ServiceName,
    id: &TaskId,
    weight: u64,
    timeout: Duration,
) -> Result<WeightChange, OpError> {
    if weight > 1000 {
        return Err(OpError::Weight(weight));
    }
    let weight = weight as u32;
    let key = task_key(prefix, service, id);
    let current = bounded(timeout, client.get(key.as_str(), None)).await?;
    let Some(kv) = current.kvs().first() else {
        return Err(OpError::NoSuchTask(service.clone(), id.clone()));
    };
    let (value, from) = with_weight(&key, kv.value(), weight)?;
    let lease = kv.lease();
    let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then([TxnOp::put(key.as_str(), value, options)]);
    let done = bounded(timeout, client.txn(txn)).await?;
    if !done.succeeded() {
        return Err(OpError::Changed(key));
    }
    Ok(WeightChange {
        from,
        to: weight,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_rewrite_keeps_every_other_field() {
        let (v, from) = with_weight(
            "/rm/tasks/web/a",
            br#"{"addr":"10.0.0.2:80","node":"n2","publish":["80/http"],"x-owner":"ci"}"#,
            7,
        )
        .unwrap();
        assert_eq!(from, 1);
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"addr":"10.0.0.2:80","node":"n2","publish":["80/http"],"x-owner":"ci","weight":7})
        );
        let (v, from) = with_weight("/k", br#"{"addr":"10.0.0.2:80","weight":3}"#, 0).unwrap();
        assert_eq!(from, 3);
        assert_eq!(TaskRecord::parse(v.as_bytes()).unwrap().weight, 0);
    }

    #[test]
    fn a_malformed_task_is_not_rewritten() {
        let err = with_weight("/rm/tasks/web/a", b"{\"addr\":\"nowhere\"}", 2).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the value of /rm/tasks/web/a is not a valid task"),
            "{err}"
        );
        assert!(with_weight("/k", b"[1]", 2).is_err());
    }
}
