//! The raw serde shape of the TOML file, exactly as written by the user.
//!
//! Every value is `Spanned` so validation (in `mod.rs`) can point at it. Unknown keys are not
//! rejected here: they are collected by `serde_ignored` so that all of them are reported at
//! once. This module holds no defaults and no checks.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub node: Option<S<RawNode>>,
    #[serde(default)]
    pub discovery: Option<S<RawDiscovery>>,
    #[serde(default)]
    pub admin: Option<S<RawAdmin>>,
    #[serde(default)]
    pub listener: Vec<S<RawListener>>,
    #[serde(default)]
    pub service: BTreeMap<String, S<RawService>>,
    #[serde(default)]
    pub task: Vec<S<RawTask>>,
    #[serde(default)]
    pub http: Option<S<RawHttp>>,
    #[serde(default)]
    pub log: Option<S<RawLog>>,
    #[serde(default)]
    pub runtime: Option<S<RawRuntime>>,
    #[serde(default)]
    pub dns: Option<S<super::dns::RawDns>>,
    #[serde(default)]
    pub docker: Option<S<super::docker::RawDocker>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawNode {
    pub name: Option<S<String>>,
    pub advertise: Option<S<String>>,
    pub drain_timeout: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDiscovery {
    pub backend: Option<S<String>>,
    pub endpoints: Option<S<Vec<S<String>>>>,
    pub prefix: Option<S<String>>,
    pub node_ttl: Option<S<String>>,
    pub resync_interval: Option<S<String>>,
    pub dial_timeout: Option<S<String>>,
    // etcd security (validated in edge.rs)
    pub tls: Option<S<super::edge::RawEtcdTls>>,
    pub username: Option<S<String>>,
    pub password: Option<S<String>>,
    pub password_file: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawListener {
    pub name: Option<S<String>>,
    pub listen: Option<S<String>>,
    pub protocol: Option<S<String>>,
    pub service: Option<S<String>>,
    #[serde(default)]
    pub route: Vec<S<RawRoute>>,
    // edge keys (validated in edge.rs)
    pub accept_proxy: Option<S<bool>>,
    pub trusted_proxies: Option<S<Vec<S<String>>>>,
    pub max_connections: Option<S<i64>>,
    pub max_connections_per_ip: Option<S<i64>>,
    pub handshake_timeout: Option<S<String>>,
    pub max_client_hello_bytes: Option<S<i64>>,
    pub tls: Option<S<super::edge::RawListenerTls>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub service: Option<S<String>>,
    /// tls listeners (edge.rs).
    pub sni: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawService {
    pub balance: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub retries: Option<S<i64>>,
    pub upstream_protocol: Option<S<String>>,
    pub request_timeout: Option<S<String>>,
    pub hash_key: Option<S<String>>,
    pub peek_timeout: Option<S<String>>,
    pub max_connect_bytes: Option<S<i64>>,
    pub send_proxy: Option<S<String>>,
    pub health: Option<S<RawHealth>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHealth {
    pub kind: Option<S<String>>,
    pub path: Option<S<String>>,
    pub expect_status: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub unhealthy_threshold: Option<S<i64>>,
    pub healthy_threshold: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTask {
    pub service: Option<S<String>>,
    pub addr: Option<S<String>>,
    pub id: Option<S<String>>,
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHttp {
    pub max_header_bytes: Option<S<i64>>,
    pub max_headers: Option<S<i64>>,
    pub header_read_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub max_body_bytes: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub level: Option<S<String>>,
    pub format: Option<S<String>>,
    pub access: Option<S<bool>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRuntime {
    pub worker_threads: Option<S<i64>>,
}
