//! The `[runtime]` section: the Tokio worker threads (read at start, not on reload).

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::int_in;

#[derive(Debug, Default, Deserialize)]
pub struct RawRuntime {
    pub worker_threads: Option<S<i64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Tokio worker threads; default the number of cores.
    pub worker_threads: usize,
}

/// Validates `[runtime]`.
pub(super) fn validate(issues: &mut Issues, raw: &RawRuntime) -> RuntimeConfig {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    RuntimeConfig {
        worker_threads: int_in(
            issues,
            &raw.worker_threads,
            cores as i64,
            1..=1024,
            "runtime.worker_threads",
        ) as usize,
    }
}
