//! Retry pacing for background tasks that reconnect (etcd discovery, the node lease, the
//! Docker engine): exponential, capped, with jitter so that nodes do not retry in lockstep.

use std::time::Duration;

/// Exponential backoff with jitter: 100 ms doubling to a cap (5 s by default).
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Backoff {
        Self::with_max(Self::MAX)
    }
    /// A backoff that never waits longer than `max` (the lease keeper must retry well within
    /// the lease TTL, or a short outage would cost the node its lease).
    pub fn with_max(max: Duration) -> Backoff {
        Backoff {
            next: Self::MIN.min(max),
            max,
        }
    }
    pub fn reset(&mut self) {
        self.next = Self::MIN.min(self.max);
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        // ±20 % jitter so that nodes do not retry in lockstep.
        let jitter = 0.8 + fastrand::f64() * 0.4;
        d.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(120));
        for _ in 0..20 {
            assert!(b.next_delay() <= Backoff::MAX.mul_f64(1.2));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
