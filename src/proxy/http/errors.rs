//! Answers the proxy makes itself, and whose fault each one is. Every answer has a short
//! plain-text body naming the reason and the service, so a client (or whoever reads the
//! access log) can tell a proxy answer from the application's.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::body::{Body, full};
use crate::protocol::http1::HeadError;

/// A request the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Downstream: no route (and no default route) for the host.
    #[error("no route for host {host:?}")]
    NoRoute { host: String },
    /// Upstream: the service has no task that could be picked.
    #[error("no live task")]
    NoLiveTask,
    /// Upstream: connects or the exchange failed on every attempt.
    #[error("upstream failed after {attempts} attempt(s): {last}")]
    UpstreamFailed { attempts: usize, last: String },
    /// Upstream: no response head within `request_timeout`.
    #[error("no response from upstream within {0:?}")]
    Timeout(Duration),
    /// Downstream: a malformed head or body.
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("request header fields too large: {0}")]
    HeadersTooLarge(String),
    #[error("request head not received within {0:?}")]
    HeadTimeout(Duration),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("{0}")]
    MethodNotAllowed(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoLiveTask => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::HeadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// Who is to blame: "upstream", "downstream" (the client) or "routing".
    pub fn class(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "routing",
            ProxyError::NoLiveTask | ProxyError::UpstreamFailed { .. } | ProxyError::Timeout(_) => {
                "upstream"
            }
            _ => "downstream",
        }
    }

    /// Whether the client connection must close after this answer (its framing is lost).
    pub fn closes(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_) | ProxyError::HeadersTooLarge(_) | ProxyError::HeadTimeout(_)
        )
    }

    /// The answer: status, `text/plain` body "<code> <reason>: <why> (service <name>)".
    pub fn response(&self, service: &str) -> Response<Body> {
        let status = self.status();
        let mut resp = Response::new(full(Bytes::from(self.text(service))));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert("x-routemesh-error", HeaderValue::from_static(self.class()));
        if self.closes() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl ProxyError {
    fn text(&self, service: &str) -> String {
        let status = self.status();
        format!(
            "{} {}: {self} (service {service})\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
    }

    /// The same answer as [`ProxyError::response`], serialized for an HTTP/1.1 client;
    /// `close` adds `Connection: close` even where the error itself keeps the connection.
    pub fn http1(&self, service: &str, close: bool) -> Vec<u8> {
        let status = self.status();
        let text = self.text(service);
        let close = if close || self.closes() {
            "connection: close\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-routemesh-error: {}\r\ncontent-length: {}\r\n{close}\r\n{text}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.class(),
            text.len()
        )
        .into_bytes()
    }
}

impl From<HeadError> for ProxyError {
    fn from(e: HeadError) -> Self {
        match e {
            HeadError::Malformed(_) => ProxyError::BadRequest(e.to_string()),
            HeadError::TooManyHeaders(_) | HeadError::TooLarge(_) => {
                ProxyError::HeadersTooLarge(e.to_string())
            }
            HeadError::Connect => ProxyError::MethodNotAllowed(e.to_string()),
        }
    }
}
