//! `[[listener.route]]` tables: HTTP routes by host and path prefix (http listeners) and SNI
//! routes (tls listeners), first match wins.

use serde::Deserialize;

use super::file::S;
use super::names::ServiceName;

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub service: Option<S<String>>,
    /// tls listeners.
    pub sni: Option<S<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Exact host or `*.suffix`, lower-cased, no port.
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub service: ServiceName,
}

/// A `[[listener.route]]` of a `protocol = "tls"` listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// Exact name or `*.suffix`, lower-cased.
    pub sni: String,
    pub service: ServiceName,
}
