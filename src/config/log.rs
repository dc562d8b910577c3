//! The `[log]` section: the tracing filter, text or JSON lines, and the access log.

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::{one_of, span};

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

/// Validates `[log]`.
pub(super) fn validate(issues: &mut Issues, raw: &RawLog) -> LogConfig {
    let lg = raw;
    let level = match &lg.level {
        None => "info".to_string(),
        Some(v) => {
            let s = v.get_ref().trim();
            if s.is_empty() || s.contains(char::is_whitespace) {
                issues.at(
                    span(v),
                    "`log.level`: write a level (\"error\", \"warn\", \"info\", \"debug\", \"trace\") or a filter like \"routemesh=debug\"",
                );
            }
            s.to_string()
        }
    };
    LogConfig {
        level,
        format: one_of(
            issues,
            &lg.format,
            LogFormat::Text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            "log.format",
        ),
        access: lg.access.as_ref().map(|v| *v.get_ref()).unwrap_or(false),
    }
}
