//! The `[runtime]` section: the Tokio worker threads (read at start, not on reload).

use serde::Deserialize;

use super::file::S;

#[derive(Debug, Default, Deserialize)]
pub struct RawRuntime {
    pub worker_threads: Option<S<i64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Tokio worker threads; default the number of cores.
    pub worker_threads: usize,
}
