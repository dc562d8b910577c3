//! Rate-limited logging for the data path: a dead backend under load must not flood the log.
//! One `LogLimiter` per kind of event; it lets one line through per interval and reports how
//! many were suppressed in between.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::util::clock::now_ms;

#[derive(Debug)]
pub struct LogLimiter {
    interval_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub const fn new(interval_ms: u64) -> LogLimiter {
        LogLimiter {
            interval_ms,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval() {
        let l = LogLimiter::new(1000);
        assert_eq!(l.allow_at(5000), Some(0));
        assert_eq!(l.allow_at(5001), None);
        assert_eq!(l.allow_at(5500), None);
        assert_eq!(l.allow_at(6000), Some(2));
    }
}
