//! The validated configuration: typed values, defaults filled, every problem reported at once.
//!
//! `load` reads a TOML file, deserializes the raw shape (`file.rs`), collects unknown keys and
//! invalid values with their `file:line:col`, and returns a [`Config`] only when there are
//! none. Nothing here binds sockets or talks to etcd; this module imports nothing else of
//! the project.

pub mod admin;
pub mod certs;
pub mod discovery;
pub mod dns;
pub mod docker;
pub mod error;
pub mod file;
pub mod http;
pub mod listener;
pub mod log;
pub mod names;
pub mod node;
pub mod route;
pub mod runtime;
pub mod service;
pub mod task;
mod values;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use admin::{AdminConfig, DEFAULT_ADMIN};
pub use discovery::{
    DEFAULT_ENDPOINT, DEFAULT_PREFIX, DiscoveryBackend, DiscoveryConfig, EtcdAuth, EtcdSecurity,
    EtcdTls, Password,
};
pub use dns::DnsConfig;
pub use docker::DockerConfig;
use error::Issues;
pub use error::{ConfigError, ConfigIssue};
use file::{RawConfig, path_segments, span_of};
pub use http::HttpLimits;
pub use listener::{Cidr, ListenerConfig, ListenerEdge, Protocol};
pub use log::{LogConfig, LogFormat};
pub use names::{NameError, NodeName, ServiceName, TaskId};
pub use node::{NodeConfig, hostname};
pub use route::{RouteConfig, SniRoute};
pub use runtime::RuntimeConfig;
pub use service::{
    Balance, HashKey, HealthKind, HealthSettings, ProxyVersion, ServiceSettings, UpstreamProtocol,
};
pub use task::TaskConfig;
use values::{duration, int_in, name, one_of, positive_duration, socket_addr, span};

/// A whole, valid configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (reloads read it again).
    pub source: PathBuf,
    pub node: NodeConfig,
    pub discovery: DiscoveryConfig,
    pub admin: AdminConfig,
    pub listeners: Vec<ListenerConfig>,
    /// Settings of services named in the file; services seen only in etcd get the defaults.
    pub services: BTreeMap<ServiceName, ServiceSettings>,
    /// Tasks this node hosts (etcd backend) or the whole table (static backend).
    pub tasks: Vec<TaskConfig>,
    pub http: HttpLimits,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// The `[dns]` responder; None when the section is absent.
    pub dns: Option<DnsConfig>,
    /// `[docker]` engine discovery (disabled by default); app.rs starts it.
    pub docker: DockerConfig,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single(path, format!("cannot read the config file: {e}")))?;
        Config::parse(path, &source)
    }

    /// Validates `source` as if read from `path`.
    pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
        let mut issues = Issues::new(source);
        let table = match toml::de::DeTable::parse(source) {
            Ok(t) => t,
            Err(e) => {
                issues.at(
                    e.span().unwrap_or(0..0),
                    format!("invalid TOML: {}", e.message().trim()),
                );
                return Err(issues.into_error(path));
            }
        };
        let mut unknown: Vec<Vec<String>> = Vec::new();
        let raw: RawConfig = match toml::Deserializer::parse(source)
            .and_then(|de| serde_ignored::deserialize(de, |p| unknown.push(path_segments(&p))))
        {
            Ok(raw) => raw,
            Err(e) => {
                issues.at(
                    e.span().unwrap_or(0..0),
                    format!("{} (see config/example.toml)", e.message().trim()),
                );
                return Err(issues.into_error(path));
            }
        };
        for segments in unknown {
            let span = span_of(table.get_ref(), &segments).unwrap_or(0..0);
            let key = segments.join(".");
            issues.at(
                span,
                format!(
                    "unknown key `{key}`: remove it or check its spelling (config/example.toml lists every key)"
                ),
            );
        }
        let config = validate(path, raw, &mut issues);
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(issues.into_error(path))
        }
    }

    /// The settings a service gets: its `[service.NAME]` table or the defaults.
    pub fn service_settings(&self, name: &ServiceName) -> ServiceSettings {
        self.services.get(name).cloned().unwrap_or_default()
    }
}

fn validate(path: &Path, raw: RawConfig, issues: &mut Issues) -> Config {
    // [node]
    let node_raw = raw.node.map(|n| n.into_inner()).unwrap_or_default();
    let node_name = match &node_raw.name {
        Some(v) => name(issues, v, "node.name", NodeName::new),
        None => {
            let host = hostname();
            let cleaned: String = host
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .take(128)
                .collect();
            NodeName::new(&cleaned).ok()
        }
    }
    .unwrap_or_else(|| NodeName::new("node").expect("valid literal"));
    let advertise = node_raw
        .advertise
        .as_ref()
        .and_then(|v| match v.get_ref().trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                issues.at(
                    span(v),
                    format!(
                        "`node.advertise`: {:?} is not an IP address; write the address clients use for this node, e.g. \"10.0.0.1\"",
                        v.get_ref()
                    ),
                );
                None
            }
        });
    let drain_timeout = duration(
        issues,
        &node_raw.drain_timeout,
        Duration::from_secs(10),
        "node.drain_timeout",
    );

    // [discovery]
    let d = raw.discovery.map(|d| d.into_inner()).unwrap_or_default();
    let backend = one_of(
        issues,
        &d.backend,
        DiscoveryBackend::Etcd,
        &[
            ("etcd", DiscoveryBackend::Etcd),
            ("static", DiscoveryBackend::Static),
        ],
        "discovery.backend",
    );
    let endpoints = match &d.endpoints {
        None => vec![DEFAULT_ENDPOINT.to_string()],
        Some(list) => {
            if list.get_ref().is_empty() {
                issues.at(
                    span(list),
                    "`discovery.endpoints` is empty: list every etcd member, e.g. [\"http://10.0.0.1:2379\"]",
                );
            }
            let mut out = Vec::new();
            for ep in list.get_ref() {
                let s = ep.get_ref().trim();
                let rest = s
                    .strip_prefix("http://")
                    .or_else(|| s.strip_prefix("https://"));
                let valid = rest.is_some_and(|r| {
                    let hostport = r.trim_end_matches('/');
                    hostport.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    })
                });
                if valid {
                    out.push(s.trim_end_matches('/').to_string());
                } else {
                    issues.at(
                        span(ep),
                        format!(
                            "`discovery.endpoints`: {s:?} is not an etcd URL; write \"http://HOST:PORT\" (or https://)"
                        ),
                    );
                }
            }
            out
        }
    };
    let prefix = match &d.prefix {
        None => DEFAULT_PREFIX.to_string(),
        Some(p) => {
            let s = p.get_ref().trim_end_matches('/');
            if !p.get_ref().starts_with('/') || s.is_empty() || s.contains("//") {
                issues.at(
                    span(p),
                    format!(
                        "`discovery.prefix` = {:?}: write an absolute key prefix such as \"/routemesh\"",
                        p.get_ref()
                    ),
                );
                DEFAULT_PREFIX.to_string()
            } else {
                s.to_string()
            }
        }
    };
    let node_ttl = positive_duration(
        issues,
        &d.node_ttl,
        Duration::from_secs(3),
        "discovery.node_ttl",
    );
    if let Some(v) = &d.node_ttl
        && (node_ttl.subsec_nanos() != 0 || node_ttl > Duration::from_secs(3600))
    {
        issues.at(
            span(v),
            "`discovery.node_ttl` must be a whole number of seconds from 1s to 1h (etcd leases count seconds; etcd raises TTLs below 2s to 2s)",
        );
    }
    let resync_interval = positive_duration(
        issues,
        &d.resync_interval,
        Duration::from_secs(300),
        "discovery.resync_interval",
    );
    let dial_timeout = positive_duration(
        issues,
        &d.dial_timeout,
        Duration::from_secs(2),
        "discovery.dial_timeout",
    );

    let security = discovery::etcd_security(issues, path, &d, &endpoints);

    // [admin]
    let admin_raw = raw.admin.map(|a| a.into_inner()).unwrap_or_default();
    let admin_listen = admin_raw
        .listen
        .as_ref()
        .and_then(|v| socket_addr(issues, v, "admin.listen"))
        .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid literal"));

    // [[listener]]
    let mut listeners = Vec::new();
    let mut seen_names = BTreeSet::new();
    let mut seen_addrs = BTreeSet::new();
    for l in &raw.listener {
        let l_span = span(l);
        let l = l.get_ref();
        let protocol = one_of(
            issues,
            &l.protocol,
            Protocol::Tcp,
            &[
                ("tcp", Protocol::Tcp),
                ("http", Protocol::Http),
                ("tls", Protocol::Tls),
            ],
            "listener.protocol",
        );
        let listen = match &l.listen {
            Some(v) => socket_addr(issues, v, "listener.listen"),
            None => {
                issues.at(
                    l_span.clone(),
                    "[[listener]] needs `listen`, e.g. listen = \"0.0.0.0:80\"",
                );
                None
            }
        };
        // Optional on http and tls listeners (no default route: 404 or close).
        let service = match &l.service {
            Some(v) => name(issues, v, "listener.service", ServiceName::new).map(Some),
            None if protocol == Protocol::Tcp => {
                issues.at(
                    l_span.clone(),
                    "[[listener]] needs `service`: the service its connections go to",
                );
                None
            }
            None => Some(None),
        };
        let mut routes = Vec::new();
        for r in &l.route {
            if protocol == Protocol::Tls {
                continue; // SNI routes: listener::listener
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
            let host = r.host.as_ref().and_then(|h| {
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
            });
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
                routes.push(RouteConfig {
                    host,
                    path_prefix,
                    service,
                });
            }
        }
        let (Some(listen), Some(service)) = (listen, service) else {
            continue;
        };
        let lname = match &l.name {
            Some(v) => {
                if v.get_ref().is_empty()
                    || v.get_ref().len() > 64
                    || !v
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    issues.at(
                        span(v),
                        "`listener.name`: use 1-64 characters from A-Z a-z 0-9 . _ -",
                    );
                }
                v.get_ref().clone()
            }
            None => format!("{}-{}", protocol.as_str(), listen.port()),
        };
        let at = l.name.as_ref().map(span).unwrap_or(l_span.clone());
        let dup_addr = !seen_addrs.insert(listen);
        if dup_addr {
            let at = l.listen.as_ref().map(span).unwrap_or(l_span.clone());
            issues.at(
                at,
                format!("two listeners bind {listen}: each `listen` address may appear once"),
            );
        }
        if !seen_names.insert(lname.clone()) && !dup_addr {
            issues.at(
                at,
                format!(
                    "two listeners are named {lname:?}: give each [[listener]] a distinct `name`"
                ),
            );
        }
        listeners.push(ListenerConfig {
            name: lname,
            listen,
            protocol,
            service,
            routes,
            edge: listener::listener(issues, path, l, protocol),
        });
    }
    if listeners.iter().any(|l| l.listen == admin_listen) {
        issues.at(
            0..0,
            format!("the admin listener and a [[listener]] both bind {admin_listen}"),
        );
    }

    // [service.NAME]
    let mut services = BTreeMap::new();
    for (key, s) in &raw.service {
        let sname = match ServiceName::new(key) {
            Ok(n) => n,
            Err(e) => {
                issues.at(span(s), format!("[service.{key}]: {e}"));
                continue;
            }
        };
        let s = s.get_ref();
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
            hash_key: match &s.hash_key {
                None => def.hash_key.clone(),
                Some(v) => match v.get_ref().as_str() {
                    "mqtt_client_id" => HashKey::MqttClientId,
                    "source_ip" => HashKey::SourceIp,
                    h if h.starts_with("header:")
                        && h.len() > 7
                        && h[7..]
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                    {
                        HashKey::Header(h[7..].to_ascii_lowercase())
                    }
                    other => {
                        issues.at(
                            span(v),
                            format!("`service.hash_key` = {other:?}: use \"mqtt_client_id\", \"source_ip\" or \"header:NAME\""),
                        );
                        def.hash_key.clone()
                    }
                },
            },
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
            send_proxy: service::send_proxy(issues, &s.send_proxy),
            health: service::health_settings(issues, s.health.as_ref()),
        };
        if let Some(v) = &s.hash_key
            && settings.balance != Balance::Maglev
        {
            issues.at(
                span(v),
                "`service.hash_key` only applies to balance = \"maglev\": set the balance or remove the key",
            );
        }
        services.insert(sname, settings);
    }

    // [[task]]
    let mut tasks: Vec<TaskConfig> = Vec::new();
    let mut seen_tasks = BTreeSet::new();
    for t in &raw.task {
        let t_span = span(t);
        let t = t.get_ref();
        let service = match &t.service {
            Some(v) => name(issues, v, "task.service", ServiceName::new),
            None => {
                issues.at(
                    t_span.clone(),
                    "[[task]] needs `service`: the service this task serves",
                );
                None
            }
        };
        let addr = match &t.addr {
            Some(v) => socket_addr(issues, v, "task.addr"),
            None => {
                issues.at(
                    t_span.clone(),
                    "[[task]] needs `addr`, the task's IP:PORT, e.g. addr = \"10.0.0.2:1884\"",
                );
                None
            }
        };
        let weight = int_in(issues, &t.weight, 1, 0..=1000, "task.weight") as u32;
        let id =
            t.id.as_ref()
                .and_then(|v| name(issues, v, "task.id", TaskId::new));
        let (Some(service), Some(addr)) = (service, addr) else {
            continue;
        };
        let node_for_id = (backend == DiscoveryBackend::Etcd).then_some(&node_name);
        let id = id.unwrap_or_else(|| TaskId::derived(node_for_id, addr));
        if !seen_tasks.insert((service.clone(), id.clone())) {
            issues.at(
                t.id.as_ref().map(span).unwrap_or(t_span),
                format!(
                    "task {id} of service {service} is defined twice: give each a distinct `id`"
                ),
            );
        }
        tasks.push(TaskConfig {
            service,
            addr,
            id,
            weight,
        });
    }

    // [http]
    let h = raw.http.map(|h| h.into_inner()).unwrap_or_default();
    let hd = HttpLimits::default();
    let http = HttpLimits {
        max_header_bytes: int_in(
            issues,
            &h.max_header_bytes,
            hd.max_header_bytes as i64,
            1024..=16 * 1024 * 1024,
            "http.max_header_bytes",
        ) as usize,
        max_headers: int_in(
            issues,
            &h.max_headers,
            hd.max_headers as i64,
            1..=10_000,
            "http.max_headers",
        ) as usize,
        header_read_timeout: positive_duration(
            issues,
            &h.header_read_timeout,
            hd.header_read_timeout,
            "http.header_read_timeout",
        ),
        idle_timeout: positive_duration(
            issues,
            &h.idle_timeout,
            hd.idle_timeout,
            "http.idle_timeout",
        ),
        max_body_bytes: int_in(
            issues,
            &h.max_body_bytes,
            0,
            0..=i64::MAX,
            "http.max_body_bytes",
        ) as u64,
    };

    // [log]
    let lg = raw.log.map(|l| l.into_inner()).unwrap_or_default();
    let level = match &lg.level {
        None => "info".to_string(),
        Some(v) => {
            let s = v.get_ref().trim();
            if s.is_empty() || s.contains(char::is_whitespace) {
                issues.at(
                    span(v),
                    "`log.level`: write a level (\"error\", \"warn\", \"info\", \"debug\", \"trace\") or a filter like \"routemesh=debug\"",
                );
            }
            s.to_string()
        }
    };
    let log = LogConfig {
        level,
        format: one_of(
            issues,
            &lg.format,
            LogFormat::Text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            "log.format",
        ),
        access: lg.access.as_ref().map(|v| *v.get_ref()).unwrap_or(false),
    };

    let docker = docker::validate(issues, raw.docker.as_ref(), backend);

    let dns = dns::validate(issues, raw.dns.as_ref(), admin_listen, &listeners);

    // [runtime]
    let rt = raw.runtime.map(|r| r.into_inner()).unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let runtime = RuntimeConfig {
        worker_threads: int_in(
            issues,
            &rt.worker_threads,
            cores as i64,
            1..=1024,
            "runtime.worker_threads",
        ) as usize,
    };

    Config {
        source: path.to_path_buf(),
        node: NodeConfig {
            name: node_name,
            advertise,
            drain_timeout,
        },
        discovery: DiscoveryConfig {
            backend,
            endpoints,
            prefix,
            node_ttl,
            resync_interval,
            dial_timeout,
            security,
        },
        admin: AdminConfig {
            listen: admin_listen,
        },
        listeners,
        services,
        tasks,
        http,
        log,
        runtime,
        dns,
        docker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), src)
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.discovery.backend, DiscoveryBackend::Etcd);
        assert_eq!(c.discovery.endpoints, vec![DEFAULT_ENDPOINT.to_string()]);
        assert_eq!(c.discovery.prefix, "/routemesh");
        assert_eq!(c.discovery.node_ttl, Duration::from_secs(3));
        assert_eq!(c.admin.listen, DEFAULT_ADMIN.parse().unwrap());
        assert_eq!(c.node.drain_timeout, Duration::from_secs(10));
        assert!(c.listeners.is_empty());
        assert_eq!(c.http, HttpLimits::default());
    }

    #[test]
    fn example_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.node.name.as_str(), "n1");
        assert!(!c.listeners.is_empty());
    }

    #[test]
    fn full_contract_parses() {
        let c = parse(
            r#"
[node]
name = "n1"
advertise = "10.0.0.1"
drain_timeout = "10s"
[discovery]
backend = "etcd"
endpoints = ["http://127.0.0.1:2379"]
prefix = "/routemesh"
node_ttl = "3s"
[admin]
listen = "127.0.0.1:9901"
[[listener]]
name = "mqtt"
listen = "0.0.0.0:1883"
protocol = "tcp"
service = "mqtt"
[service.mqtt]
balance = "round_robin"
connect_timeout = "1s"
retries = 2
[[task]]
service = "mqtt"
addr = "10.0.0.2:1884"
id = "mqtt-1"
"#,
        )
        .unwrap();
        assert_eq!(c.listeners[0].name, "mqtt");
        assert_eq!(c.tasks[0].id.as_str(), "mqtt-1");
        assert_eq!(
            c.service_settings(&ServiceName::new("mqtt").unwrap())
                .retries,
            2
        );
    }

    #[test]
    fn default_listener_name_and_task_id() {
        let c = parse(
            "[node]\nname=\"n9\"\n[[listener]]\nlisten=\"0.0.0.0:1883\"\nservice=\"m\"\n[[task]]\nservice=\"m\"\naddr=\"10.0.0.2:1884\"\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0].name, "tcp-1883");
        assert_eq!(c.tasks[0].id.as_str(), "n9-10-0-0-2-1884");
    }

    #[test]
    fn every_error_reported_with_position() {
        let src = "[node]\nnmae = \"x\"\ndrain_timeout = \"ten\"\n[discovery]\nbackend = \"zk\"\n[[listener]]\nlisten = \"nowhere\"\nservice = \"web\"\nbogus = 1\n";
        let err = parse(src).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("t.toml:2:1: unknown key `node.nmae`"),
            "{text}"
        );
        assert!(text.contains("t.toml:3:17:"), "{text}");
        assert!(text.contains("t.toml:5:11:"), "{text}");
        assert!(text.contains("t.toml:7:10:"), "{text}");
        assert!(
            text.contains("t.toml:9:1: unknown key `listener.0.bogus`"),
            "{text}"
        );
        assert_eq!(err.issues.len(), 5, "{text}");
    }

    #[test]
    fn wrong_type_and_syntax_are_positioned() {
        let err = parse("[service.web]\nretries = \"two\"\n").unwrap_err();
        assert_eq!(err.issues[0].line, 2, "{err}");
        let err = parse("[node\n").unwrap_err();
        assert_eq!(err.issues[0].line, 1, "{err}");
        assert!(err.to_string().contains("invalid TOML"));
    }

    #[test]
    fn duplicates_are_errors() {
        let err = parse(
            "[[listener]]\nlisten=\"127.0.0.1:80\"\nservice=\"a\"\n[[listener]]\nlisten=\"127.0.0.1:80\"\nservice=\"b\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("two listeners bind"), "{err}");
    }

    #[test]
    fn default_service_is_optional_on_http_and_tls_listeners() {
        let c = parse(
            "[[listener]]\nlisten=\"127.0.0.1:80\"\nprotocol=\"http\"\n[[listener.route]]\nhost=\"a.example.com\"\nservice=\"a\"\n[[listener]]\nlisten=\"127.0.0.1:443\"\nprotocol=\"tls\"\n[[listener.route]]\nsni=\"a.example.com\"\nservice=\"a\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listeners[0].service, None);
        assert_eq!(c.listeners[1].service, None);
        let err = parse("[[listener]]\nlisten=\"127.0.0.1:80\"\nprotocol=\"tcp\"\n").unwrap_err();
        assert!(err.to_string().contains("needs `service`"), "{err}");
    }

    #[test]
    fn node_ttl_must_be_whole_seconds() {
        let err = parse("[discovery]\nnode_ttl = \"1500ms\"\n").unwrap_err();
        assert!(err.to_string().contains("whole number of seconds"), "{err}");
    }
}
