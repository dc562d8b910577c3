//! The process-wide monotonic clock in milliseconds: ejection deadlines, rate limits and
//! idle times are stored in these (one `u64`, so they fit in an atomic).

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a process-wide monotonic clock (ejection deadlines are stored in these).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 can mean "never".
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
