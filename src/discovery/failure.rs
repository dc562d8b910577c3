//! What went wrong talking to etcd, in plain words. An etcd client error is a deep chain
//! (gRPC status → transport error → hyper/rustls error → OS error) whose debug dump is
//! useless to an operator; [`Cause::of`] walks that chain and names the cause the way a person
//! would (connection refused, timed out, TLS, permission denied), and [`Cause::fix`] says what
//! to change. The full chain ([`chain`]) is for debug logs only.
//!
//! Pure: no IO, no clock; the classification is unit-tested on built error values.

use std::error::Error as StdError;
use std::fmt;
use std::io;

/// The cause of a failed etcd request, as an operator would name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listens at the endpoint (or a firewall rejects).
    Refused,
    /// No answer in time: a dead machine, a blackholed address, or not an etcd (e.g. a port
    /// that accepts but never speaks HTTP/2). `Some` when the bound is ours.
    TimedOut(Option<std::time::Duration>),
    /// The host name does not resolve.
    Unresolved,
    /// No route to the host or network.
    Unreachable,
    /// The TLS handshake failed (wrong CA, a plain-text member behind an https:// URL, a
    /// client certificate etcd refuses …); the detail is the TLS library's reason.
    Tls(String),
    /// etcd refused the credentials or the permission (auth enabled).
    PermissionDenied(String),
    /// The member has no leader (cut off from its quorum).
    NoLeader,
    /// A TLS or password file could not be read.
    Credentials(String),
    /// The connection was closed or reset under us.
    Closed,
    /// Anything else, in etcd's own words.
    Other(String),
}

impl Cause {
    /// Classifies an etcd client error by walking its source chain.
    pub fn of(e: &etcd_client::Error) -> Cause {
        if let etcd_client::Error::GRpcStatus(status) = e
            && let Some(c) = status_cause(status.code() as i32, status.message())
        {
            return c;
        }
        let mut found: Option<Cause> = None;
        // etcd_client::Error has no `source()`: start from what it wraps.
        let mut cur: Option<&(dyn StdError + 'static)> = Some(match e {
            etcd_client::Error::GRpcStatus(s) => s,
            etcd_client::Error::TransportError(t) => t,
            etcd_client::Error::IoError(io) => io,
            other => other,
        });
        while let Some(err) = cur {
            // The deepest link names the cause most precisely.
            if let Some(c) = one(err) {
                found = Some(c);
            }
            cur = err.source();
        }
        found.unwrap_or_else(|| Cause::Other(top_message(e)))
    }

    /// What the operator should check, for the command line (`cli`) or the daemon's config.
    pub fn fix(&self, cli: bool) -> &'static str {
        match (self, cli) {
            (Cause::Tls(_), true) => {
                "check the URL scheme (http/https) and [discovery] tls (ca, cert, key) of -c FILE"
            }
            (Cause::Tls(_), false) => {
                "check the URL scheme (http/https) and [discovery] tls (ca, cert, key)"
            }
            (Cause::PermissionDenied(_) | Cause::Credentials(_), true) => {
                "check [discovery] username and password (or password_file) of -c FILE"
            }
            (Cause::PermissionDenied(_) | Cause::Credentials(_), false) => {
                "check [discovery] username and password (or password_file)"
            }
            (Cause::NoLeader, _) => "the member is cut off from its cluster; check etcd's health",
            (_, true) => {
                "is etcd running there? Point to it with --etcd URL, ROUTEMESH_ETCD or -c FILE"
            }
            (_, false) => "is etcd running there? Check [discovery] endpoints",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Refused => f.write_str("connection refused"),
            Cause::TimedOut(Some(d)) => write!(f, "timed out (no answer within {d:?})"),
            Cause::TimedOut(None) => f.write_str("timed out"),
            Cause::Unresolved => f.write_str("host name not found"),
            Cause::Unreachable => f.write_str("no route to host"),
            Cause::Tls(d) => write!(f, "TLS handshake failed ({d})"),
            Cause::PermissionDenied(d) => write!(f, "permission denied ({d})"),
            Cause::NoLeader => f.write_str("no leader"),
            Cause::Credentials(d) => write!(f, "credentials unusable ({d})"),
            Cause::Closed => f.write_str("connection closed"),
            Cause::Other(d) => f.write_str(d),
        }
    }
}

/// gRPC status codes (tonic::Code's values) that name the cause by themselves.
fn status_cause(code: i32, message: &str) -> Option<Cause> {
    const INVALID_ARGUMENT: i32 = 3;
    const PERMISSION_DENIED: i32 = 7;
    const UNAUTHENTICATED: i32 = 16;
    let m = message.trim_start_matches("etcdserver: ");
    match code {
        PERMISSION_DENIED | UNAUTHENTICATED => Some(Cause::PermissionDenied(m.to_string())),
        // etcd answers bad credentials with InvalidArgument.
        INVALID_ARGUMENT
            if m.contains("authentication failed")
                || m.contains("user name is empty")
                || m.contains("invalid auth token") =>
        {
            Some(Cause::PermissionDenied(m.to_string()))
        }
        _ if m.contains("no leader") => Some(Cause::NoLeader),
        _ => None,
    }
}

/// The cause one link of the chain names, if any.
fn one(err: &(dyn StdError + 'static)) -> Option<Cause> {
    if let Some(tls) = err.downcast_ref::<tokio_rustls::rustls::Error>() {
        return Some(Cause::Tls(tls.to_string()));
    }
    if let Some(io) = err.downcast_ref::<io::Error>() {
        if let Some(tls) = io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>())
        {
            return Some(Cause::Tls(tls.to_string()));
        }
        // tonic's "tls handshake eof": a plain-text server closed on our ClientHello.
        if io.to_string().contains("tls handshake") {
            return Some(Cause::Tls(io.to_string()));
        }
        return Some(match io.kind() {
            io::ErrorKind::ConnectionRefused => Cause::Refused,
            io::ErrorKind::TimedOut => Cause::TimedOut(None),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Cause::Unreachable
            }
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => Cause::Closed,
            // getaddrinfo failures come as `Uncategorized`/`Other` with this text.
            _ if is_dns(&io.to_string()) => Cause::Unresolved,
            _ => return None,
        });
    }
    let text = err.to_string();
    if text.contains("keep-alive timed out") || text.contains("KeepAliveTimedOut") {
        return Some(Cause::TimedOut(None));
    }
    if is_dns(&text) {
        return Some(Cause::Unresolved);
    }
    for needle in ["invalid peer certificate", "received corrupt message"] {
        if let Some(at) = text.find(needle) {
            // Only the TLS library's phrase, not the wrapper's dump around it.
            let detail = &text[at..];
            let end = detail.find(['"', ')', ',']).unwrap_or(detail.len());
            return Some(Cause::Tls(detail[..end].to_string()));
        }
    }
    None
}

fn is_dns(text: &str) -> bool {
    text.contains("failed to lookup address")
        || text.contains("Name or service not known")
        || text.contains("Temporary failure in name resolution")
        || text.contains("dns error")
}

/// etcd-client's own message without its "grpc request error: " style prefix.
fn top_message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().trim_start_matches("etcdserver: ").into(),
        other => other.to_string(),
    }
}

/// The whole error chain on one line, for debug logs.
pub fn chain(e: &etcd_client::Error) -> String {
    let mut out = e.to_string();
    let mut cur: Option<&(dyn StdError + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => s.source(),
        etcd_client::Error::TransportError(t) => t.source(),
        etcd_client::Error::IoError(io) => io.source(),
        _ => None,
    };
    while let Some(err) = cur {
        out.push_str(" <- ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: io::ErrorKind) -> etcd_client::Error {
        etcd_client::Error::IoError(io::Error::new(kind, "x"))
    }

    #[test]
    fn os_errors_are_named() {
        assert_eq!(
            Cause::of(&io(io::ErrorKind::ConnectionRefused)),
            Cause::Refused
        );
        assert_eq!(
            Cause::of(&io(io::ErrorKind::TimedOut)),
            Cause::TimedOut(None)
        );
        assert_eq!(
            Cause::of(&io(io::ErrorKind::HostUnreachable)),
            Cause::Unreachable
        );
    }

    #[test]
    fn tls_errors_are_named() {
        let e = etcd_client::Error::IoError(io::Error::other(
            tokio_rustls::rustls::Error::InvalidCertificate(
                tokio_rustls::rustls::CertificateError::UnknownIssuer,
            ),
        ));
        let c = Cause::of(&e);
        assert!(
            matches!(c, Cause::Tls(ref d) if d.contains("UnknownIssuer")),
            "{c:?}"
        );
        assert!(c.fix(true).contains("tls"));
    }

    #[test]
    fn auth_statuses_are_permission_denied() {
        assert_eq!(
            status_cause(
                3,
                "etcdserver: authentication failed, invalid user ID or password"
            ),
            Some(Cause::PermissionDenied(
                "authentication failed, invalid user ID or password".into()
            ))
        );
        assert!(matches!(
            status_cause(7, "etcdserver: permission denied"),
            Some(Cause::PermissionDenied(_))
        ));
        assert_eq!(status_cause(3, "etcdserver: key is not provided"), None);
        assert_eq!(
            status_cause(14, "etcdserver: no leader"),
            Some(Cause::NoLeader)
        );
    }

    #[test]
    fn fixes_name_the_flags_on_the_command_line() {
        let f = Cause::Refused.fix(true);
        assert!(f.contains("--etcd URL") && f.contains("ROUTEMESH_ETCD") && f.contains("-c FILE"));
        assert!(Cause::Refused.fix(false).contains("[discovery] endpoints"));
    }
}
