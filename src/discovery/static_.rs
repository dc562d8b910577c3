//! The static backend: the config file's `[[task]]` entries are the whole routing table; no
//! etcd. What README's first command runs.

use crate::config::TaskConfig;
use crate::discovery::Publisher;
use crate::discovery::keys::{TaskRecord, task_key};
use crate::discovery::table::Update;

/// Replaces the table with `tasks` and publishes it.
pub fn publish_tasks(publisher: &mut Publisher, prefix: &str, tasks: &[TaskConfig]) {
    let kvs = tasks
        .iter()
        .map(|t| {
            let rec = TaskRecord {
                addr: t.addr,
                node: None,
                weight: t.weight,
                publish: t.publish.clone(),
            };
            (
                task_key(prefix, &t.service, &t.id).into_bytes(),
                rec.to_json().into_bytes(),
            )
        })
        .collect();
    publisher.apply([Update::Reset { revision: 0, kvs }]);
    publisher.publish();
    publisher.status().set_up(true);
}
