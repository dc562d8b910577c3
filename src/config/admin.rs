//! The `[admin]` section: where /healthz, /readyz, /routes and /metrics listen.

use std::net::SocketAddr;

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::values::socket_addr;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// Validates `[admin]`.
pub(super) fn validate(issues: &mut Issues, raw: &RawAdmin) -> AdminConfig {
    let listen = raw
        .listen
        .as_ref()
        .and_then(|v| socket_addr(issues, v, "admin.listen"))
        .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid literal"));
    AdminConfig { listen }
}
