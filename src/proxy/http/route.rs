//! Choosing the service of a request: by Host (port stripped, case-insensitive) and path
//! prefix, first matching route wins, else the listener's default service.
//!
//! Pure: no IO, no clock. Does not know whether the chosen service exists or has tasks.

use crate::config::{RouteConfig, ServiceName};

/// The routing form of a Host value or URI authority: port stripped, lower-cased, trailing
/// dot removed; IPv6 literals keep their brackets. `None` for an empty host.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        match raw.find(']') {
            Some(i) => &raw[..=i],
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// `pattern` is an exact lower-cased host or `*.suffix`; a wildcard matches any name with at
/// least one more label, never the bare suffix.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}

/// A plain string prefix, as nginx `location /v1` and Envoy `prefix` do ("/v1" also
/// matches "/v10"; write "/v1/" to match a whole segment).
pub fn path_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
}

/// The service of a request with normalized `host` and `path`: the first route whose host
/// and path prefix (each optional) both match, else `default`. `None` means 404.
pub fn route<'a>(
    routes: &'a [RouteConfig],
    default: Option<&'a ServiceName>,
    host: Option<&str>,
    path: &str,
) -> Option<&'a ServiceName> {
    routes
        .iter()
        .find(|r| {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(p), Some(h)) => host_matches(p, h),
                (Some(_), None) => false,
            };
            host_ok
                && r.path_prefix
                    .as_deref()
                    .is_none_or(|p| path_matches(p, path))
        })
        .map(|r| &r.service)
        .or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn r(host: Option<&str>, prefix: Option<&str>, service: &str) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_string),
            path_prefix: prefix.map(str::to_string),
            service: svc(service),
        }
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(
            normalize_host("API.Example.com:8080").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            normalize_host("example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host(":80"), None);
    }

    #[test]
    fn wildcards_need_one_more_label() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        assert!(host_matches("example.com", "example.com"));
        assert!(!host_matches("example.com", "a.example.com"));
    }

    #[test]
    fn first_match_wins_then_default() {
        let routes = vec![
            r(Some("api.example.com"), Some("/v1"), "api-v1"),
            r(Some("api.example.com"), None, "api"),
            r(Some("*.example.com"), None, "wild"),
            r(None, Some("/static/"), "static"),
        ];
        let web = svc("web");
        let go = |h: Option<&str>, p: &str| route(&routes, Some(&web), h, p).map(|s| s.to_string());
        assert_eq!(
            go(Some("api.example.com"), "/v1/users").as_deref(),
            Some("api-v1")
        );
        assert_eq!(go(Some("api.example.com"), "/v2").as_deref(), Some("api"));
        assert_eq!(go(Some("x.example.com"), "/v1").as_deref(), Some("wild"));
        assert_eq!(
            go(Some("other.org"), "/static/a.css").as_deref(),
            Some("static")
        );
        assert_eq!(go(None, "/static/a.css").as_deref(), Some("static"));
        assert_eq!(go(Some("other.org"), "/"), Some("web".into()));
        assert_eq!(go(None, "/"), Some("web".into()));
        assert_eq!(route(&routes, None, Some("other.org"), "/"), None);
    }
}
