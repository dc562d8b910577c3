//! `[service.NAME]` tables: how a service's tasks are balanced, connected to and health
//! checked, shared by every listener that routes to the service.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::Issues;
use super::file::S;
use super::names::ServiceName;
use super::values::{int_in, one_of, positive_duration, span};

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
    pub udp_idle_timeout: Option<S<String>>,
    pub udp_responses: Option<S<i64>>,
    pub half_close_timeout: Option<S<String>>,
    pub max_pending_connects: Option<S<i64>>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConn,
    P2c,
    /// Consistent hashing on `hash_key` (Maglev lookup table).
    Maglev,
}

/// What a consistent-hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// The MQTT CONNECT's client identifier (tcp listeners).
    MqttClientId,
    /// The client's IP address.
    SourceIp,
    /// The client's IP address and port (udp listeners: one client socket, one task).
    SourceAddr,
    /// An HTTP request header (lower-cased name).
    Header(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    Tcp,
    Http,
}

/// Active health checks of a service's tasks, run by every node that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthSettings {
    pub kind: HealthKind,
    /// Request path of `http` checks.
    pub path: String,
    /// Inclusive range of passing statuses.
    pub expect_status: (u16, u16),
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Consecutive failures that make a task unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive passes that make it healthy again.
    pub healthy_threshold: u32,
}

impl Default for HealthSettings {
    /// Without a `[service.NAME.health]` section: a TCP connect check every 2 s.
    fn default() -> Self {
        HealthSettings {
            kind: HealthKind::Tcp,
            path: "/".into(),
            expect_status: (200, 399),
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    H2c,
}

/// Which PROXY protocol header a service's upstream connections start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// Per-service settings, shared by every listener that routes to the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSettings {
    pub balance: Balance,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Other tasks tried after a failed or timed-out connect.
    pub retries: u32,
    pub upstream_protocol: UpstreamProtocol,
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// What `balance = "maglev"` hashes (default: the client's IP).
    pub hash_key: HashKey,
    /// How long a tcp listener waits for the first packet it must parse (MQTT CONNECT).
    #[serde(with = "humantime_serde_compat")]
    pub peek_timeout: Duration,
    /// Most bytes buffered before routing on the first packet.
    pub max_connect_bytes: usize,
    /// A PROXY protocol header written to each upstream connection (tcp and tls listeners).
    pub send_proxy: Option<ProxyVersion>,
    /// udp listeners: a session ends after this long without a datagram either way.
    #[serde(with = "humantime_serde_compat")]
    pub udp_idle_timeout: Duration,
    /// udp listeners: a session ends after this many reply datagrams (0 = any number;
    /// DNS: 1).
    pub udp_responses: u32,
    /// After one side of a proxied connection (tcp, tls passthrough, HTTP upgrade) sent its
    /// FIN: how long the other direction may stay silent without closing before both sides
    /// are closed (HAProxy's `timeout client-fin` / `server-fin`). Read by `proxy::tcp`.
    #[serde(with = "humantime_serde_compat")]
    pub half_close_timeout: Duration,
    /// MQTT client-id routing: at most this many connections per task (on this node) whose
    /// CONNECT the task has not answered yet; more wait for a place (0 = no limit). Keeps a
    /// broker's accept queue from overflowing in a reconnect storm. Read by `proxy::tcp`.
    pub max_pending_connects: u32,
    pub health: HealthSettings,
    /// Whether `[service.NAME.health]` is written: services reached only through udp
    /// listeners are actively checked only then (no default TCP probe for them).
    pub health_configured: bool,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            retries: 2,
            upstream_protocol: UpstreamProtocol::Http1,
            request_timeout: Duration::from_secs(60),
            hash_key: HashKey::SourceIp,
            peek_timeout: Duration::from_secs(5),
            max_connect_bytes: 65536,
            send_proxy: None,
            udp_idle_timeout: Duration::from_secs(60),
            udp_responses: 0,
            half_close_timeout: Duration::from_secs(60),
            max_pending_connects: 0,
            health: HealthSettings::default(),
            health_configured: false,
        }
    }
}

mod humantime_serde_compat {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Validates the `[service.NAME]` tables.
pub(super) fn validate(
    issues: &mut Issues,
    raw: &BTreeMap<String, S<RawService>>,
) -> BTreeMap<ServiceName, ServiceSettings> {
    let mut services = BTreeMap::new();
    for (key, s) in raw {
        let sname = match ServiceName::new(key) {
            Ok(n) => n,
            Err(e) => {
                issues.at(span(s), format!("[service.{key}]: {e}"));
                continue;
            }
        };
        services.insert(sname, settings(issues, s.get_ref()));
    }
    services
}

/// One service's settings: the defaults overridden by the keys of its table.
fn settings(issues: &mut Issues, s: &RawService) -> ServiceSettings {
    let def = ServiceSettings::default();
    let settings = ServiceSettings {
        balance: one_of(
            issues,
            &s.balance,
            def.balance,
            &[
                ("round_robin", Balance::RoundRobin),
                ("least_conn", Balance::LeastConn),
                ("p2c", Balance::P2c),
                ("maglev", Balance::Maglev),
            ],
            "service.balance",
        ),
        connect_timeout: positive_duration(
            issues,
            &s.connect_timeout,
            def.connect_timeout,
            "service.connect_timeout",
        ),
        retries: int_in(issues, &s.retries, 2, 0..=100, "service.retries") as u32,
        upstream_protocol: one_of(
            issues,
            &s.upstream_protocol,
            def.upstream_protocol,
            &[
                ("http1", UpstreamProtocol::Http1),
                ("h2c", UpstreamProtocol::H2c),
            ],
            "service.upstream_protocol",
        ),
        request_timeout: positive_duration(
            issues,
            &s.request_timeout,
            def.request_timeout,
            "service.request_timeout",
        ),
        hash_key: s
            .hash_key
            .as_ref()
            .and_then(|v| hash_key(issues, v))
            .unwrap_or_else(|| def.hash_key.clone()),
        peek_timeout: positive_duration(
            issues,
            &s.peek_timeout,
            def.peek_timeout,
            "service.peek_timeout",
        ),
        max_connect_bytes: int_in(
            issues,
            &s.max_connect_bytes,
            def.max_connect_bytes as i64,
            16..=16 * 1024 * 1024,
            "service.max_connect_bytes",
        ) as usize,
        send_proxy: send_proxy(issues, &s.send_proxy),
        udp_idle_timeout: positive_duration(
            issues,
            &s.udp_idle_timeout,
            def.udp_idle_timeout,
            "service.udp_idle_timeout",
        ),
        udp_responses: int_in(
            issues,
            &s.udp_responses,
            0,
            0..=1_000_000,
            "service.udp_responses",
        ) as u32,
        half_close_timeout: positive_duration(
            issues,
            &s.half_close_timeout,
            def.half_close_timeout,
            "service.half_close_timeout",
        ),
        max_pending_connects: int_in(
            issues,
            &s.max_pending_connects,
            0,
            0..=1_000_000,
            "service.max_pending_connects",
        ) as u32,
        health: health_settings(issues, s.health.as_ref()),
        health_configured: s.health.is_some(),
    };
    if let Some(v) = &s.hash_key
        && settings.balance != Balance::Maglev
    {
        issues.at(
            span(v),
            "`service.hash_key` only applies to balance = \"maglev\": set the balance or remove the key",
        );
    }
    if let Some(v) = &s.max_pending_connects
        && settings.hash_key != HashKey::MqttClientId
    {
        issues.at(
            span(v),
            "`service.max_pending_connects` only applies to hash_key = \"mqtt_client_id\" (the CONNECT a broker answers): set the hash key or remove the key",
        );
    }
    settings
}

/// `hash_key`: `mqtt_client_id`, `source_ip`, `source_addr` or `header:NAME`.
fn hash_key(issues: &mut Issues, v: &S<String>) -> Option<HashKey> {
    match v.get_ref().as_str() {
        "mqtt_client_id" => Some(HashKey::MqttClientId),
        "source_ip" => Some(HashKey::SourceIp),
        "source_addr" => Some(HashKey::SourceAddr),
        h if h.starts_with("header:")
            && h.len() > 7
            && h[7..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Some(HashKey::Header(h[7..].to_ascii_lowercase()))
        }
        other => {
            issues.at(
                span(v),
                format!("`service.hash_key` = {other:?}: use \"mqtt_client_id\", \"source_ip\", \"source_addr\" or \"header:NAME\""),
            );
            None
        }
    }
}

/// `send_proxy` of a `[service.NAME]`.
fn send_proxy(issues: &mut Issues, v: &Option<S<String>>) -> Option<ProxyVersion> {
    let v = v.as_ref()?;
    match v.get_ref().as_str() {
        "v1" => Some(ProxyVersion::V1),
        "v2" => Some(ProxyVersion::V2),
        other => {
            issues.at(
                span(v),
                format!(
                    "`service.send_proxy` = {other:?}: use \"v1\" or \"v2\" (or remove the key)"
                ),
            );
            None
        }
    }
}

fn health_settings(issues: &mut Issues, raw: Option<&S<RawHealth>>) -> HealthSettings {
    let def = HealthSettings::default();
    let Some(raw) = raw else { return def };
    let h = raw.get_ref();
    // An explicit section starts from the documented section defaults (interval 1s).
    let interval_default = Duration::from_secs(1);
    let expect_status = match &h.expect_status {
        None => def.expect_status,
        Some(v) => {
            let text = v.get_ref().trim();
            let parsed = match text.split_once('-') {
                Some((a, b)) => a
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .zip(b.trim().parse::<u16>().ok()),
                None => text.parse::<u16>().ok().map(|c| (c, c)),
            };
            match parsed {
                Some((a, b)) if (100..=599).contains(&a) && (100..=599).contains(&b) && a <= b => {
                    (a, b)
                }
                _ => {
                    issues.at(
                        span(v),
                        format!("`health.expect_status` = {text:?}: write a status or a range like \"200-399\""),
                    );
                    def.expect_status
                }
            }
        }
    };
    let path = match &h.path {
        None => def.path.clone(),
        Some(p) if p.get_ref().starts_with('/') && !p.get_ref().contains(char::is_whitespace) => {
            p.get_ref().clone()
        }
        Some(p) => {
            issues.at(
                span(p),
                "`health.path` must start with '/' and contain no spaces",
            );
            def.path.clone()
        }
    };
    let interval = positive_duration(issues, &h.interval, interval_default, "health.interval");
    let timeout = positive_duration(issues, &h.timeout, def.timeout, "health.timeout");
    HealthSettings {
        kind: one_of(
            issues,
            &h.kind,
            def.kind,
            &[("tcp", HealthKind::Tcp), ("http", HealthKind::Http)],
            "health.kind",
        ),
        path,
        expect_status,
        interval,
        timeout,
        unhealthy_threshold: int_in(
            issues,
            &h.unhealthy_threshold,
            2,
            1..=100,
            "health.unhealthy_threshold",
        ) as u32,
        healthy_threshold: int_in(
            issues,
            &h.healthy_threshold,
            1,
            1..=100,
            "health.healthy_threshold",
        ) as u32,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{errors_hold, parse};
    use crate::config::{ServiceName, ServiceSettings};

    #[test]
    fn max_pending_connects_paces_mqtt_client_id_services_only() {
        let c = parse(
            "[service.mqtt]\nbalance = \"maglev\"\nhash_key = \"mqtt_client_id\"\nmax_pending_connects = 64\n",
        )
        .unwrap();
        let mqtt = c.service_settings(&ServiceName::new("mqtt").unwrap());
        assert_eq!(mqtt.max_pending_connects, 64);
        assert_eq!(
            ServiceSettings::default().max_pending_connects,
            0,
            "no limit"
        );
        errors_hold(&[
            (
                "[service.web]\nmax_pending_connects = 8\n",
                &["t.toml:2:24:", "hash_key = \"mqtt_client_id\""],
            ),
            (
                "[service.mqtt]\nbalance = \"maglev\"\nhash_key = \"mqtt_client_id\"\nmax_pending_connects = -1\n",
                &["t.toml:4:24:", "max_pending_connects"],
            ),
        ]);
    }
}
