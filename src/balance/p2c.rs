//! Power of two choices over peak-EWMA latency × (in-flight + 1), as linkerd and tower do:
//! draw two usable tasks at random and take the cheaper. Latency samples are recorded on the
//! task's state by the HTTP proxy (`TaskState::observe_latency`).

use std::sync::Arc;

use crate::snapshot::Task;

#[derive(Debug)]
pub struct P2c {
    candidates: Vec<usize>,
}

impl P2c {
    pub fn new(candidates: Vec<usize>) -> P2c {
        P2c { candidates }
    }

    fn cost(task: &Task) -> u64 {
        let latency = task.state.latency_ewma_us().max(1);
        latency.saturating_mul(task.state.in_flight() as u64 + 1) / task.weight.max(1) as u64
    }

    pub fn pick(&self, tasks: &[Arc<Task>], usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.candidates.len();
        if n == 0 {
            return None;
        }
        // Two random draws first; fall back to a scan when both are unusable.
        let a = self.candidates[fastrand::usize(..n)];
        let b = if n > 1 {
            let off = 1 + fastrand::usize(..n - 1);
            let ia = self.candidates.iter().position(|&c| c == a).unwrap_or(0);
            self.candidates[(ia + off) % n]
        } else {
            a
        };
        match (usable(a), usable(b)) {
            (true, true) => Some(if Self::cost(&tasks[b]) < Self::cost(&tasks[a]) {
                b
            } else {
                a
            }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => {
                let start = fastrand::usize(..n);
                (0..n)
                    .map(|k| self.candidates[(start + k) % n])
                    .filter(|&i| usable(i))
                    .min_by_key(|&i| Self::cost(&tasks[i]))
            }
        }
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
    fn prefers_the_faster_task() {
        let tasks = vec![test_task(0, 1), test_task(1, 1)];
        tasks[0].state.observe_latency_us(50_000);
        tasks[1].state.observe_latency_us(1_000);
        let p = P2c::new(vec![0, 1]);
        let fast = (0..100)
            .filter(|_| p.pick(&tasks, &|_| true) == Some(1))
            .count();
        assert_eq!(fast, 100);
    }

    #[test]
    fn skips_unusable() {
        let tasks: Vec<_> = (0..4).map(|i| test_task(i, 1)).collect();
        let p = P2c::new(vec![0, 1, 2, 3]);
        for _ in 0..50 {
            assert_eq!(p.pick(&tasks, &|i| i == 3), Some(3));
        }
        assert_eq!(p.pick(&tasks, &|_| false), None);
    }
}
