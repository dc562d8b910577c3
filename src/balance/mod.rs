//! Balancers: a selector is built once per snapshot from a service's candidate tasks, so a
//! pick is a lookup that touches only atomics (the cursor and each task's in-flight count).
//!
//! Owns the choice of *which* task; not whether a task is usable (the caller passes that in as
//! a predicate, from health and ejection state) and not connecting (that is `proxy`).

mod least_conn;
pub mod maglev;
mod p2c;
mod round_robin;

use std::sync::Arc;

use crate::config::Balance;
use crate::snapshot::Task;

pub use least_conn::LeastConn;
pub use maglev::{Maglev, addr_hash, ip_hash, key_hash};
pub use p2c::P2c;
pub use round_robin::RoundRobin;

/// The per-snapshot selector of one service.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(RoundRobin),
    LeastConn(LeastConn),
    P2c(P2c),
    Maglev(Maglev),
}

impl Selector {
    /// Builds the selector over `candidates` (indices into `tasks` of the tasks that may be
    /// routed at all: node Ready, weight > 0).
    pub fn build(balance: Balance, tasks: &[Arc<Task>], candidates: Vec<usize>) -> Selector {
        match balance {
            Balance::RoundRobin => Selector::RoundRobin(RoundRobin::new(tasks, candidates)),
            Balance::LeastConn => Selector::LeastConn(LeastConn::new(candidates)),
            Balance::P2c => Selector::P2c(P2c::new(candidates)),
            Balance::Maglev => Selector::Maglev(Maglev::new(tasks, candidates)),
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
        match self {
            Selector::RoundRobin(s) => s.pick(usable),
            Selector::LeastConn(s) => s.pick(tasks, usable),
            Selector::P2c(s) => s.pick(tasks, usable),
            Selector::Maglev(s) => s.pick(hash, usable),
        }
    }

    /// The indices this selector may ever return.
    pub fn candidates(&self) -> &[usize] {
        match self {
            Selector::RoundRobin(s) => s.candidates(),
            Selector::LeastConn(s) => s.candidates(),
            Selector::P2c(s) => s.candidates(),
            Selector::Maglev(s) => s.candidates(),
        }
    }
}
