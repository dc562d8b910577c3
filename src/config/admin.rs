//! The `[admin]` section: where /healthz, /readyz, /routes and /metrics listen.

use std::net::SocketAddr;

use serde::Deserialize;

use super::file::S;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}
