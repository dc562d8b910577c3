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

/// `[discovery] published_ports`: the ports this node accepts from the cluster's published
/// listeners (`"80"`, `"30000-32767"`); `None` = all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRanges(Option<Vec<(u16, u16)>>);

impl PortRanges {
    /// Every port (the default).
    pub fn all() -> PortRanges {
        PortRanges(None)
    }

    /// No port: this node binds nothing from etcd.
    pub fn none() -> PortRanges {
        PortRanges(Some(Vec::new()))
    }

    /// One `PORT` or `FIRST-LAST` item; the error says what is accepted.
    pub fn parse_item(text: &str) -> Result<(u16, u16), String> {
        let bad = || format!("{text:?} is not a port (1-65535) or a range FIRST-LAST");
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad()),
        };
        match text.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!(
                        "{text:?}: the range's first port is above its last"
                    ));
                }
                Ok((a, b))
            }
            None => port(text).map(|p| (p, p)),
        }
    }

    pub fn new(ranges: Vec<(u16, u16)>) -> PortRanges {
        PortRanges(Some(ranges))
    }

    pub fn allows(&self, port: u16) -> bool {
        match &self.0 {
            None => true,
            Some(r) => r.iter().any(|&(a, b)| (a..=b).contains(&port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        let web = ServiceName::new("web").unwrap();
        let s = PublishSpec::parse("80/http").unwrap();
        assert_eq!((s.port, s.protocol), (80, Protocol::Http));
        assert_eq!(s.listener_name(&web), "web-80-http");
        assert_eq!(PublishSpec::parse("1883").unwrap().protocol, Protocol::Tcp);
        assert_eq!(
            PublishSpec::parse("443/TLS").unwrap().protocol,
            Protocol::Tls
        );
        for bad in ["", "0", "65536", "80/", "80/sctp", "x/tcp", "80/http/x"] {
            assert!(PublishSpec::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(s.to_string(), "80/http");
    }

    #[test]
    fn port_ranges() {
        let r = PortRanges::new(vec![
            PortRanges::parse_item("80").unwrap(),
            PortRanges::parse_item("30000-32767").unwrap(),
        ]);
        assert!(r.allows(80) && r.allows(30000) && r.allows(32767));
        assert!(!r.allows(81) && !r.allows(29999));
        assert!(PortRanges::all().allows(1));
        assert!(!PortRanges::none().allows(1));
        for bad in ["0", "5-4", "a", "1-", "-1", "70000"] {
            assert!(PortRanges::parse_item(bad).is_err(), "{bad:?}");
        }
    }
}
