//! Balancers: a selector is built once per snapshot from a service's candidate tasks, so a
//! pick is a lookup that touches only atomics (the cursor and each task's in-flight count).
//!
//! Owns the choice of *which* task; not whether a task is usable (the caller passes that in as
//! a predicate, from health and ejection state) and not connecting (that is `proxy`).

mod least_conn;
mod p2c;
mod round_robin;

use std::sync::Arc;

use crate::config::Balance;
use crate::snapshot::Task;

pub use least_conn::LeastConn;
pub use p2c::P2c;
pub use round_robin::RoundRobin;

/// The per-snapshot selector of one service.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(RoundRobin),
    LeastConn(LeastConn),
    P2c(P2c),
}

impl Selector {
    /// Builds the selector over `candidates` (indices into `tasks` of the tasks that may be
    /// routed at all: node Ready, weight > 0).
    pub fn build(balance: Balance, tasks: &[Arc<Task>], candidates: Vec<usize>) -> Selector {
        match balance {
            Balance::RoundRobin => Selector::RoundRobin(RoundRobin::new(tasks, candidates)),
            Balance::LeastConn => Selector::LeastConn(LeastConn::new(candidates)),
            Balance::P2c => Selector::P2c(P2c::new(candidates)),
            // Placeholder until the Maglev table lands: hashing falls back to round robin.
            Balance::Maglev => Selector::RoundRobin(RoundRobin::new(tasks, candidates)),
        }
    }

    /// Picks a task index for which `usable` holds, or `None` when there is none. `hash` is
    /// the request's key hash for consistent-hashing selectors (others ignore it).
    pub fn pick(
        &self,
        tasks: &[Arc<Task>],
        hash: Option<u64>,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let _ = hash;
        match self {
            Selector::RoundRobin(s) => s.pick(usable),
            Selector::LeastConn(s) => s.pick(tasks, usable),
            Selector::P2c(s) => s.pick(tasks, usable),
        }
    }

    /// The indices this selector may ever return.
    pub fn candidates(&self) -> &[usize] {
        match self {
            Selector::RoundRobin(s) => s.candidates(),
            Selector::LeastConn(s) => s.candidates(),
            Selector::P2c(s) => s.candidates(),
        }
    }
}
