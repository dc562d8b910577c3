//! The `[http]` section: limits of every http listener (header size and count, timeouts,
//! body size).

use std::time::Duration;

use serde::Deserialize;

use super::file::S;

#[derive(Debug, Default, Deserialize)]
pub struct RawHttp {
    pub max_header_bytes: Option<S<i64>>,
    pub max_headers: Option<S<i64>>,
    pub header_read_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub max_body_bytes: Option<S<i64>>,
}

/// Listener-wide HTTP limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// 0 = unlimited.
    pub max_body_bytes: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_bytes: 65536,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_body_bytes: 0,
        }
    }
}
