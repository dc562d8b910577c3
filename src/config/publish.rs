//! `PORT[/PROTOCOL]`: a port a task asks every node to publish for its service (`publish` in
//! a task's etcd value, `routemesh task add --publish`, the `routemesh.publish` label).

use super::{Protocol, ServiceName};

/// `PORT[/PROTOCOL]` of a task's `publish` list (protocol default tcp): the port is bound on
/// every node (all addresses) as listener `{service}-{port}-{protocol}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublishSpec {
    pub port: u16,
    pub protocol: Protocol,
}

impl PublishSpec {
    /// Parses `80`, `80/http`, `1883/tcp`; the error says what is accepted.
    pub fn parse(text: &str) -> Result<PublishSpec, String> {
        let bad = || {
            format!(
                "{text:?} is not PORT[/PROTOCOL]: use a port 1-65535 and a protocol {}",
                Protocol::NAMES
            )
        };
        let (port, protocol) = match text.trim().split_once('/') {
            Some((p, proto)) => (p, proto),
            None => (text.trim(), "tcp"),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let protocol = Protocol::parse(&protocol.to_ascii_lowercase()).ok_or_else(bad)?;
        Ok(PublishSpec { port, protocol })
    }

    /// The listener name every node gives this port of `service`.
    pub fn listener_name(&self, service: &ServiceName) -> String {
        format!("{service}-{}-{}", self.port, self.protocol.as_str())
    }
}

impl std::fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())
    }
}
