//! Weighted round robin: a smooth-WRR sequence precomputed per snapshot (nginx's algorithm),
//! walked by one atomic cursor. Unusable tasks are skipped in sequence order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::snapshot::Task;

/// Longest sequence built; larger weight sums are scaled down proportionally.
const MAX_RING: u64 = 4096;

#[derive(Debug)]
pub struct RoundRobin {
    candidates: Vec<usize>,
    /// Task indices in the order they are served.
    ring: Vec<usize>,
    cursor: AtomicUsize,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl RoundRobin {
    pub fn new(tasks: &[Arc<Task>], candidates: Vec<usize>) -> RoundRobin {
        let mut weights: Vec<u64> = candidates
            .iter()
            .map(|&i| tasks[i].weight.max(1) as u64)
            .collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        let total: u64 = weights.iter().sum();
        if total > MAX_RING {
            weights
                .iter_mut()
                .for_each(|w| *w = (*w * MAX_RING / total).max(1));
        }
        let total: i64 = weights.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; weights.len()];
        let mut ring = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (j, w) in weights.iter().enumerate() {
                current[j] += *w as i64;
                if current[j] > current[best] {
                    best = j;
                }
            }
            current[best] -= total;
            ring.push(candidates[best]);
        }
        // Start each snapshot's cursor at a random place so that nodes (and successive
        // snapshots) do not all hit the first task together.
        let start = if ring.is_empty() {
            0
        } else {
            fastrand::usize(..ring.len())
        };
        RoundRobin {
            candidates,
            ring,
            cursor: AtomicUsize::new(start),
        }
    }

    pub fn pick(&self, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.ring.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| self.ring[(start + k) % n])
            .find(|&i| usable(i))
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
    fn equal_weights_alternate() {
        let tasks: Vec<_> = (0..3).map(|i| test_task(i, 1)).collect();
        let rr = RoundRobin::new(&tasks, vec![0, 1, 2]);
        let picks: Vec<_> = (0..6).map(|_| rr.pick(&|_| true).unwrap()).collect();
        for i in 0..3 {
            assert_eq!(picks.iter().filter(|&&p| p == i).count(), 2, "{picks:?}");
        }
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn weights_are_respected_and_smooth() {
        let tasks = vec![test_task(0, 5), test_task(1, 1), test_task(2, 1)];
        let rr = RoundRobin::new(&tasks, vec![0, 1, 2]);
        let picks: Vec<_> = (0..7).map(|_| rr.pick(&|_| true).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 5);
        assert!(picks.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn unusable_are_skipped() {
        let tasks: Vec<_> = (0..3).map(|i| test_task(i, 1)).collect();
        let rr = RoundRobin::new(&tasks, vec![0, 1, 2]);
        for _ in 0..10 {
            assert_eq!(rr.pick(&|i| i == 2), Some(2));
        }
        assert_eq!(rr.pick(&|_| false), None);
        let empty = RoundRobin::new(&tasks, vec![]);
        assert_eq!(empty.pick(&|_| true), None);
    }

    #[test]
    fn huge_weights_are_bounded() {
        let tasks = vec![test_task(0, 1000), test_task(1, 999), test_task(2, 7)];
        let rr = RoundRobin::new(&tasks, vec![0, 1, 2]);
        assert!(rr.ring.len() <= 2100);
        assert!(rr.ring.contains(&2));
    }
}
