//! The status page's write actions, off unless `[admin] token_file` is set:
//!
//! ```text
//! POST /actions/nodes/{node}/availability       {"availability":"drain"|"active"}
//! POST /actions/tasks/{service}/{task}/weight   {"weight":0..1000}
//! ```
//!
//! Each needs `Authorization: Bearer <the token file's contents>` and a JSON body; cookies
//! are never read, so another site cannot make a browser act with an operator's rights (a
//! cross-origin script cannot set that header without a CORS preflight, which this listener
//! never grants). Without `token_file` every action answers 403; a missing or wrong token
//! 401. Every action, done or refused, is logged with the client's address, and done ones
//! are listed in the page's Events.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::events::{Event, EventKind};
use super::{AdminState, Body, full};
use crate::config::admin::read_token;
use crate::config::{Config, EtcdSecurity, NodeName, ServiceName, TaskId};
use crate::discovery::etcd::connect;
use crate::discovery::keys::Availability;
use crate::discovery::ops::{self, OpError};
use crate::discovery::unix_ms;
use crate::ratelimit::LogLimiter;

/// The largest action body read.
const BODY_MAX: usize = 1024;
/// Bound on receiving the body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where actions write and who may ask for them.
#[derive(Debug, Clone)]
pub struct Actions {
    pub token_file: PathBuf,
    pub endpoints: Vec<String>,
    pub security: EtcdSecurity,
    pub prefix: String,
    pub dial_timeout: Duration,
}

impl Actions {
    /// Enabled by `[admin] token_file` (which config validation allows with etcd only).
    pub fn of(config: &Config) -> Option<Actions> {
        Some(Actions {
            token_file: config.admin.token_file.clone()?,
            endpoints: config.discovery.endpoints.clone(),
            security: config.discovery.security.clone(),
            prefix: config.discovery.prefix.clone(),
            dial_timeout: config.discovery.dial_timeout,
        })
    }
}

/// One action, parsed from the path and body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Availability(NodeName, Availability),
    Weight(ServiceName, TaskId, u64),
}

impl Action {
    fn describe(&self) -> String {
        match self {
            Action::Availability(n, a) => format!("set node {n} availability to {}", a.as_str()),
            Action::Weight(s, t, w) => format!("set task {s}/{t} weight to {w}"),
        }
    }
}

/// A refusal: the status and the message sent back (as `{"error": …}`).
#[derive(Debug, PartialEq, Eq)]
struct Refusal(StatusCode, String);

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AvailabilityBody {
    availability: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u64,
}

/// Which action `path` names, with its body.
fn parse(path: &str, body: &[u8]) -> Result<Action, Refusal> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let bad_body = |e: serde_json::Error| refuse(StatusCode::BAD_REQUEST, format!("body: {e}"));
    let not_found = |e: crate::config::NameError| refuse(StatusCode::NOT_FOUND, e.to_string());
    match parts.as_slice() {
        ["actions", "nodes", node, "availability"] => {
            let node = NodeName::new(node).map_err(not_found)?;
            let b: AvailabilityBody = serde_json::from_slice(body).map_err(bad_body)?;
            let a = Availability::parse(b.availability.as_bytes())
                .map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))?;
            Ok(Action::Availability(node, a))
        }
        ["actions", "tasks", service, id, "weight"] => {
            let service = ServiceName::new(service).map_err(not_found)?;
            let id = TaskId::new(id).map_err(not_found)?;
            let b: WeightBody = serde_json::from_slice(body).map_err(bad_body)?;
            Ok(Action::Weight(service, id, b.weight))
        }
        _ => Err(refuse(
            StatusCode::NOT_FOUND,
            "no such action: POST /actions/nodes/NODE/availability or /actions/tasks/SERVICE/TASK/weight",
        )),
    }
}

/// Whether `header` is `Bearer <token>` (scheme case-insensitive), compared in constant time.
fn bearer_matches(header: Option<&[u8]>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some(given) = h
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case(b"bearer "))
        .map(|_| h[7..].trim_ascii())
    else {
        return false;
    };
    let want = token.as_bytes();
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

static REFUSED_LOG: LogLimiter = LogLimiter::new(1000);

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut r = full(status, body.to_string(), "application/json");
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"routemesh admin\""),
        );
    }
    r
}

/// Serves one request under `/actions/`.
pub async fn handle(
    state: &AdminState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match checked(state, req, peer).await {
        Ok((action, body)) => {
            tracing::info!(%peer, action = %action.describe(), "admin action done");
            reply(StatusCode::OK, body)
        }
        Err(Refusal(status, message)) => {
            if let Some(suppressed) = REFUSED_LOG.allow() {
                tracing::warn!(%peer, %path, status = status.as_u16(), reason = %message, suppressed, "admin action refused");
            }
            reply(status, json!({ "error": message }))
        }
    }
}

async fn checked(
    state: &AdminState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<(Action, serde_json::Value), Refusal> {
    let Some(actions) = &state.actions else {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "write actions are disabled on this node: set [admin] token_file to enable them",
        ));
    };
    if req.method() != Method::POST {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "actions are POST requests",
        ));
    }
    let token = read_token(&actions.token_file).map_err(|why| {
        tracing::error!(error = %why, "admin: cannot read [admin] token_file; refusing actions");
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "this node cannot read its token file (see its log)",
        )
    })?;
    let auth = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    if !bearer_matches(auth, &token) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "send the admin token as `Authorization: Bearer TOKEN` (the contents of [admin] token_file)",
        ));
    }
    let json_body = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
    if !json_body {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as Content-Type: application/json",
        ));
    }
    let path = req.uri().path().to_string();
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), BODY_MAX).collect(),
    )
    .await
    .map_err(|_| refuse(StatusCode::REQUEST_TIMEOUT, "body not received in time"))?
    .map_err(|_| {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {BODY_MAX} bytes"),
        )
    })?
    .to_bytes();
    let action = parse(&path, &body)?;
    let result = run(actions, &action).await?;
    state.feed.record(Event::new(
        unix_ms(),
        EventKind::Action,
        match &action {
            Action::Availability(n, _) => n.to_string(),
            Action::Weight(s, t, _) => format!("{s}/{t}"),
        },
        "done",
        format!("{} (requested from {peer})", action.describe()),
    ));
    Ok((action, result))
}

/// Makes the change in etcd.
async fn run(a: &Actions, action: &Action) -> Result<serde_json::Value, Refusal> {
    let (mut client, member) = connect(&a.endpoints, a.dial_timeout, &a.security)
        .await
        .map_err(|e| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                e.explain(&a.endpoints.join(","), false),
            )
        })?;
    let timeout = a.dial_timeout * 2;
    let failed = |e: OpError| match e {
        OpError::Etcd(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.explain(&member, false)),
        e @ (OpError::UnknownNode(_) | OpError::NoSuchTask(..)) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        e @ OpError::Weight(_) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
        e @ (OpError::Malformed { .. } | OpError::Changed(_)) => {
            refuse(StatusCode::CONFLICT, e.to_string())
        }
    };
    match action {
        Action::Availability(node, availability) => {
            ops::set_availability(&mut client, &a.prefix, node, *availability, timeout)
                .await
                .map_err(failed)?;
            Ok(json!({ "ok": true, "node": node.as_str(), "availability": availability.as_str() }))
        }
        Action::Weight(service, id, weight) => {
            let change =
                ops::set_task_weight(&mut client, &a.prefix, service, id, *weight, timeout)
                    .await
                    .map_err(failed)?;
            Ok(json!({
                "ok": true,
                "service": service.as_str(),
                "task": id.as_str(),
                "weight": { "from": change.from, "to": change.to },
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert!(bearer_matches(Some(b"Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(Some(b"bearer s3cret "), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cretX"), "s3cret"));
        assert!(!bearer_matches(Some(b"Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }

    #[test]
    fn actions_from_path_and_body() {
        let n = |s| NodeName::new(s).unwrap();
        assert_eq!(
            parse(
                "/actions/nodes/n2/availability",
                br#"{"availability":"drain"}"#
            ),
            Ok(Action::Availability(n("n2"), Availability::Drain))
        );
        assert_eq!(
            parse("/actions/tasks/web/w-1/weight", br#"{"weight":5}"#),
            Ok(Action::Weight(
                ServiceName::new("web").unwrap(),
                TaskId::new("w-1").unwrap(),
                5
            ))
        );
        let status = |p: &str, b: &[u8]| parse(p, b).unwrap_err().0;
        assert_eq!(
            status(
                "/actions/nodes/n2/availability",
                br#"{"availability":"off"}"#
            ),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(
                "/actions/nodes/n2/availability",
                br#"{"availability":"drain","x":1}"#
            ),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status("/actions/tasks/web/a/weight", br#"{"weight":-1}"#),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(
                "/actions/nodes/a%20b/availability",
                br#"{"availability":"drain"}"#
            ),
            StatusCode::NOT_FOUND
        );
        assert_eq!(status("/actions/reboot", b"{}"), StatusCode::NOT_FOUND);
    }
}
