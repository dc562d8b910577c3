//! Least connections: the usable task with the fewest in-flight connections per unit of
//! weight; ties broken by a rotating start so equal tasks share the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::snapshot::Task;

#[derive(Debug)]
pub struct LeastConn {
    candidates: Vec<usize>,
    cursor: AtomicUsize,
}

impl LeastConn {
    pub fn new(candidates: Vec<usize>) -> LeastConn {
        LeastConn {
            candidates,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self, tasks: &[Arc<Task>], usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(u64, usize)> = None;
        for k in 0..n {
            let i = self.candidates[(start + k) % n];
            if !usable(i) {
                continue;
            }
            let t = &tasks[i];
            // Compare in_flight / weight without division: scale by a common factor.
            let load = (t.state.in_flight() as u64 + 1) * 1_000_000 / t.weight.max(1) as u64;
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, i));
            }
        }
        best.map(|(_, i)| i)
    }

    pub fn candidates(&self) -> &[usize] {
        &self.candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::test_task;

    #[test]
    fn picks_the_least_loaded() {
        let tasks: Vec<_> = (0..3).map(|i| test_task(i, 1)).collect();
        let lc = LeastConn::new(vec![0, 1, 2]);
        let _g0 = tasks[0].state.begin();
        let _g1 = tasks[1].state.begin();
        let _g1b = tasks[1].state.begin();
        assert_eq!(lc.pick(&tasks, &|_| true), Some(2));
        let _g2 = tasks[2].state.begin();
        let _g2b = tasks[2].state.begin();
        assert_eq!(lc.pick(&tasks, &|_| true), Some(0));
        let p = lc.pick(&tasks, &|i| i != 0).unwrap();
        assert!(p == 1 || p == 2);
    }

    #[test]
    fn ties_rotate() {
        let tasks: Vec<_> = (0..3).map(|i| test_task(i, 1)).collect();
        let lc = LeastConn::new(vec![0, 1, 2]);
        let picks: std::collections::BTreeSet<_> = (0..3)
            .map(|_| lc.pick(&tasks, &|_| true).unwrap())
            .collect();
        assert_eq!(picks.len(), 3);
    }
}
