//! The `[http]` section: limits of every http listener (header size and count, timeouts,
//! body size).

use std::time::Duration;

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::{int_in, positive_duration};

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

/// Validates `[http]`.
pub(super) fn validate(issues: &mut Issues, raw: &RawHttp) -> HttpLimits {
    let h = raw;
    let hd = HttpLimits::default();
    HttpLimits {
        max_header_bytes: int_in(
            issues,
            &h.max_header_bytes,
            hd.max_header_bytes as i64,
            1024..=16 * 1024 * 1024,
            "http.max_header_bytes",
        ) as usize,
        max_headers: int_in(
            issues,
            &h.max_headers,
            hd.max_headers as i64,
            1..=10_000,
            "http.max_headers",
        ) as usize,
        header_read_timeout: positive_duration(
            issues,
            &h.header_read_timeout,
            hd.header_read_timeout,
            "http.header_read_timeout",
        ),
        idle_timeout: positive_duration(
            issues,
            &h.idle_timeout,
            hd.idle_timeout,
            "http.idle_timeout",
        ),
        max_body_bytes: int_in(
            issues,
            &h.max_body_bytes,
            0,
            0..=i64::MAX,
            "http.max_body_bytes",
        ) as u64,
    }
}
