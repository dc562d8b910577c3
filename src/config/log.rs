//! The `[log]` section: the tracing filter, text or JSON lines, and the access log.

use serde::Deserialize;

use super::file::S;

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub level: Option<S<String>>,
    pub format: Option<S<String>>,
    pub access: Option<S<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `routemesh=debug`); RUST_LOG wins when set.
    pub level: String,
    pub format: LogFormat,
    /// One line per HTTP request.
    pub access: bool,
}
