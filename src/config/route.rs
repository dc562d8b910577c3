//! `[[listener.route]]` tables, both kinds checked here: HTTP routes by host and path prefix
//! (http listeners) and SNI routes (tls listeners), first match wins. A listener's default
//! route is its `service` (listener.rs).

use serde::Deserialize;

use super::error::Issues;
use super::file::S;
use super::listener::Protocol;
use super::names::ServiceName;
use super::values::{name, server_name, span};

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

/// The HTTP routes of a listener. Only http listeners have them: on a tcp listener every
/// route is an error; a tls listener's routes are SNI routes ([`sni_routes`]).
pub(super) fn http_routes(
    issues: &mut Issues,
    routes: &[S<RawRoute>],
    protocol: Protocol,
) -> Vec<RouteConfig> {
    let mut out = Vec::new();
    for r in routes {
        if protocol == Protocol::Tls {
            continue; // SNI routes: sni_routes
        }
        if protocol != Protocol::Http {
            issues.at(
                span(r),
                "[[listener.route]] is only for protocol = \"http\" listeners: remove it or change the protocol",
            );
            continue;
        }
        let r_span = span(r);
        let r = r.get_ref();
        let host = r.host.as_ref().and_then(|h| host(issues, h));
        let path_prefix = r.path_prefix.as_ref().and_then(|p| {
            if p.get_ref().starts_with('/') {
                Some(p.get_ref().clone())
            } else {
                issues.at(
                    span(p),
                    format!(
                        "`route.path_prefix` = {:?} must start with '/'",
                        p.get_ref()
                    ),
                );
                None
            }
        });
        let service = match &r.service {
            Some(v) => name(issues, v, "route.service", ServiceName::new),
            None => {
                issues.at(r_span, "[[listener.route]] needs `service`");
                None
            }
        };
        if let Some(service) = service {
            out.push(RouteConfig {
                host,
                path_prefix,
                service,
            });
        }
    }
    out
}

/// `route.host`: an exact host or `*.suffix`, lower-cased, without port.
fn host(issues: &mut Issues, h: &S<String>) -> Option<String> {
    let v = h.get_ref().trim().to_ascii_lowercase();
    let bare = v.strip_prefix("*.").unwrap_or(&v);
    let ok = !bare.is_empty()
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if ok {
        Some(v)
    } else {
        issues.at(
            span(h),
            format!(
                "`route.host` = {:?}: write a host name (\"api.example.com\") or a wildcard (\"*.example.com\"), without port",
                h.get_ref()
            ),
        );
        None
    }
}

/// The SNI routes of a tls listener; `sni` on any other listener is an error, and so are
/// `host` and `path_prefix` on a tls listener (it sees neither).
pub(super) fn sni_routes(
    issues: &mut Issues,
    routes: &[S<RawRoute>],
    protocol: Protocol,
) -> Vec<SniRoute> {
    let mut out = Vec::new();
    for r in routes {
        let rr = r.get_ref();
        if protocol != Protocol::Tls {
            if let Some(s) = &rr.sni {
                issues.at(
                    span(s),
                    "`route.sni` is only for protocol = \"tls\" listeners (http listeners route by `host`)",
                );
            }
            continue;
        }
        if let Some(h) = rr.host.as_ref() {
            issues.at(
                span(h),
                "protocol = \"tls\" listeners route by `sni`, not `host`",
            );
        }
        if let Some(p) = rr.path_prefix.as_ref() {
            issues.at(
                span(p),
                "protocol = \"tls\" listeners cannot see paths: remove `path_prefix`",
            );
        }
        let sni = match &rr.sni {
            None => {
                issues.at(
                    span(r),
                    "[[listener.route]] of a tls listener needs `sni`, e.g. sni = \"mqtt.example.com\" or \"*.example.com\"",
                );
                None
            }
            Some(s) => server_name(s.get_ref()).or_else(|| {
                issues.at(
                    span(s),
                    format!(
                        "`route.sni` = {:?}: write a host name (\"mqtt.example.com\") or a wildcard (\"*.example.com\")",
                        s.get_ref()
                    ),
                );
                None
            }),
        };
        let service = match &rr.service {
            None => {
                issues.at(span(r), "[[listener.route]] needs `service`");
                None
            }
            Some(v) => name(issues, v, "route.service", ServiceName::new),
        };
        if let (Some(sni), Some(service)) = (sni, service) {
            out.push(SniRoute { sni, service });
        }
    }
    out
}
