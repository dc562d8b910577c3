//! The set of this node's container tasks, kept by the one engine-discovery task. Pure: it is
//! fed mapped containers and removals and says what the user should be told; `mod.rs` does
//! the IO and publishes [`Tracker::tasks`].

use std::collections::BTreeMap;

use super::container::{Container, DockerTask, Selection, Skip, task_of};
use crate::config::TaskConfig;
use crate::discovery::node::Registration;

/// Something worth a log line, decided here so that a reconcile every 30 s does not repeat
/// the same warning: each is reported once per container and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A container became a task, or its task changed (address, weight, health).
    Registered { container: String, task: DockerTask },
    /// A task left (container stopped, paused, gone, or no longer valid).
    Removed { container: String, why: String },
    /// A labelled container that cannot be a task, and why (bad label, no address).
    Skipped { container: String, why: String },
}

#[derive(Debug, Default)]
pub struct Tracker {
    sel: Selection,
    /// Container id → its name and what it maps to.
    by_id: BTreeMap<String, (String, Result<DockerTask, Skip>)>,
}

impl Tracker {
    pub fn new(sel: Selection) -> Tracker {
        Tracker {
            sel,
            by_id: BTreeMap::new(),
        }
    }

    /// Maps `c` again and records the result.
    pub fn upsert(&mut self, c: &Container) -> Option<Notice> {
        let mapped = task_of(c, &self.sel);
        let old = self
            .by_id
            .insert(c.id.clone(), (c.name.clone(), mapped.clone()));
        let old = old.map(|(_, m)| m);
        notice(&c.name, old.as_ref(), &mapped)
    }

    /// Takes a container's task out (stop/kill/die/pause/destroy events).
    pub fn remove(&mut self, id: &str, why: &str) -> Option<Notice> {
        let (name, old) = self.by_id.remove(id)?;
        old.ok().map(|_| Notice::Removed {
            container: name,
            why: why.to_string(),
        })
    }

    /// Replaces the whole set with a fresh list of the engine's running containers.
    pub fn reset(&mut self, containers: &[Container]) -> Vec<Notice> {
        let mut notices = Vec::new();
        let listed: std::collections::BTreeSet<&str> =
            containers.iter().map(|c| c.id.as_str()).collect();
        let gone: Vec<String> = self
            .by_id
            .keys()
            .filter(|id| !listed.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            notices.extend(self.remove(&id, "no longer running"));
        }
        for c in containers {
            notices.extend(self.upsert(c));
        }
        notices
    }

    /// The tasks to register, ordered by service and id.
    pub fn tasks(&self) -> Vec<TaskConfig> {
        let mut out: Vec<TaskConfig> = self
            .by_id
            .values()
            .filter_map(|(_, m)| m.as_ref().ok().map(|t| t.task.clone()))
            .collect();
        out.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        out
    }
}

fn notice(
    name: &str,
    old: Option<&Result<DockerTask, Skip>>,
    new: &Result<DockerTask, Skip>,
) -> Option<Notice> {
    if old == Some(new) {
        return None;
    }
    match new {
        Ok(t) => Some(Notice::Registered {
            container: name.to_string(),
            task: t.clone(),
        }),
        Err(skip) => match old {
            Some(Ok(_)) => Some(Notice::Removed {
                container: name.to_string(),
                why: skip.to_string(),
            }),
            _ if skip.is_warning() => Some(Notice::Skipped {
                container: name.to_string(),
                why: skip.to_string(),
            }),
            _ => None,
        },
    }
}

/// What the node registers: its `[[task]]`s and its container tasks. A container task whose
/// service and id equal a configured task's is left out (the file wins); the second value
/// lists those.
pub fn merged(config: &Registration, docker: &[TaskConfig]) -> (Registration, Vec<TaskConfig>) {
    let mut out = config.clone();
    let mut shadowed = Vec::new();
    for t in docker {
        if config
            .tasks
            .iter()
            .any(|c| c.service == t.service && c.id == t.id)
        {
            shadowed.push(t.clone());
        } else {
            out.tasks.push(t.clone());
        }
    }
    (out, shadowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeName;
    use crate::docker::container::tests::labelled;
    use crate::docker::container::{Health, LABEL_PORT};

    fn c(id: &str, name: &str, ip: &str) -> Container {
        labelled(id, name, "80", "n", ip)
    }

    fn ids(t: &Tracker) -> Vec<String> {
        t.tasks().iter().map(|t| t.id.to_string()).collect()
    }

    #[test]
    fn upsert_remove_and_notices() {
        let mut t = Tracker::new(Selection::default());
        let n = t.upsert(&c("b", "web-2", "10.1.0.3"));
        assert!(matches!(n, Some(Notice::Registered { .. })));
        t.upsert(&c("a", "web-1", "10.1.0.2"));
        assert_eq!(ids(&t), ["web-1", "web-2"]);
        // The same state again says nothing.
        assert_eq!(t.upsert(&c("a", "web-1", "10.1.0.2")), None);
        // Health change: still registered, weight 0, and a notice.
        let mut sick = c("a", "web-1", "10.1.0.2");
        sick.health = Some(Health::Unhealthy);
        assert!(
            matches!(t.upsert(&sick), Some(Notice::Registered { task, .. }) if task.task.weight == 0)
        );
        assert_eq!(
            t.remove("b", "kill"),
            Some(Notice::Removed {
                container: "web-2".into(),
                why: "kill".into()
            })
        );
        assert_eq!(t.remove("b", "die"), None);
        assert_eq!(ids(&t), ["web-1"]);
    }

    #[test]
    fn warnings_once_per_reason() {
        let mut t = Tracker::new(Selection::default());
        let mut bad = c("x", "bad", "10.1.0.9");
        bad.labels.insert(LABEL_PORT.into(), "http".into());
        assert!(matches!(t.upsert(&bad), Some(Notice::Skipped { .. })));
        assert_eq!(t.upsert(&bad), None);
        assert!(t.tasks().is_empty());
        // A stopped container is not worth a warning.
        let mut stopped = c("y", "stopped", "10.1.0.8");
        stopped.running = false;
        assert_eq!(t.upsert(&stopped), None);
        // A registered task that turns invalid is reported as removed.
        t.upsert(&c("z", "ok", "10.1.0.7"));
        let mut z = c("z", "ok", "10.1.0.7");
        z.paused = true;
        assert!(matches!(t.upsert(&z), Some(Notice::Removed { why, .. }) if why == "paused"));
    }

    #[test]
    fn reset_replaces_everything() {
        let mut t = Tracker::new(Selection::default());
        t.upsert(&c("a", "web-1", "10.1.0.2"));
        t.upsert(&c("b", "web-2", "10.1.0.3"));
        let notices = t.reset(&[c("b", "web-2", "10.1.0.3"), c("d", "web-4", "10.1.0.5")]);
        assert_eq!(ids(&t), ["web-2", "web-4"]);
        assert_eq!(notices.len(), 2, "{notices:?}"); // web-1 removed, web-4 registered
    }

    #[test]
    fn merge_keeps_config_tasks_first_and_wins_on_clash() {
        let task = TaskConfig::web;
        let reg = Registration {
            node: NodeName::new("n1").unwrap(),
            record: Default::default(),
            tasks: vec![task("static-1", "10.0.0.1:80")],
        };
        let (m, shadowed) = merged(
            &reg,
            &[
                task("static-1", "10.1.0.2:80"),
                task("web-1", "10.1.0.3:80"),
            ],
        );
        assert_eq!(
            m.tasks,
            vec![
                task("static-1", "10.0.0.1:80"),
                task("web-1", "10.1.0.3:80")
            ]
        );
        assert_eq!(shadowed, vec![task("static-1", "10.1.0.2:80")]);
        assert_eq!(m.node, reg.node);
    }
}
