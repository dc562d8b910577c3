//! The validated configuration: typed values, defaults filled, every problem reported at once.
//!
//! `load` reads a TOML file, deserializes the raw shape (`file.rs`), collects unknown keys and
//! invalid values with their `file:line:col`, and returns a [`Config`] only when there are
//! none. Nothing here binds sockets or talks to etcd; this module imports nothing else of
//! the project.
//!
//! One file per section, each with its raw shape, its validated type and its own
//! `validate`: `node`, `discovery` (etcd security included), `admin`, `listener` (also for
//! listeners published in etcd, [`listener::from_json`]), `route` (HTTP and SNI routes),
//! `service` (health checks included), `task`, `http`, `log`, `runtime`, `dns`, `docker`, `acme`.
//! Beside them: `file` (the whole document), `values` (checks of one value shared by the
//! sections), `certs` (certificate files, loaded here and by the proxy), `error`, `names`.

pub mod acme;
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
pub mod publish;
pub mod route;
pub mod runtime;
pub mod service;
pub mod task;
mod values;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use admin::{AdminConfig, DEFAULT_ADMIN, DEFAULT_UPGRADE_SOCKET};
pub use discovery::{
    DEFAULT_ENDPOINT, DEFAULT_PREFIX, DiscoveryBackend, DiscoveryConfig, EtcdAuth, EtcdSecurity,
    EtcdTls, Password,
};
pub use dns::DnsConfig;
pub use docker::DockerConfig;
use error::Issues;
pub use error::{ConfigError, ConfigIssue};
use file::{RawConfig, S};
pub use http::HttpLimits;
pub use listener::{Cidr, ListenerConfig, ListenerEdge, Protocol, Transport};
pub use log::{LogConfig, LogFormat};
pub use names::{NameError, NodeName, ServiceName, TaskId};
pub use node::{NodeConfig, hostname};
pub use publish::{PortRanges, PublishSpec};
pub use route::{RouteConfig, SniRoute};
pub use runtime::RuntimeConfig;
pub use service::{
    Balance, HashKey, HealthKind, HealthSettings, ProxyVersion, ServiceSettings, UpstreamProtocol,
};
pub use task::TaskConfig;

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
    /// `[acme]` cluster certificates; None when the section is absent.
    pub acme: Option<acme::AcmeConfig>,
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
        let Some(raw) = file::deserialize::<RawConfig>(source, &mut issues) else {
            return Err(issues.into_error(path));
        };
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

/// Validates each section in file order; every problem goes to `issues`.
fn validate(path: &Path, raw: RawConfig, issues: &mut Issues) -> Config {
    let node = node::validate(issues, &raw.node.map(S::into_inner).unwrap_or_default());
    let discovery = discovery::validate(
        issues,
        path,
        &raw.discovery.map(S::into_inner).unwrap_or_default(),
    );
    let admin = admin::validate(
        issues,
        path,
        &raw.admin.map(S::into_inner).unwrap_or_default(),
        discovery.backend,
    );
    let listeners = listener::validate_all(issues, &raw.listener, path);
    if listeners.iter().any(|l| l.listen == admin.listen) {
        issues.at(
            0..0,
            format!(
                "the admin listener and a [[listener]] both bind {}",
                admin.listen
            ),
        );
    }
    let services = service::validate(issues, &raw.service);
    let tasks = task::validate(issues, &raw.task, discovery.backend, &node.name);
    let http = http::validate(issues, &raw.http.map(S::into_inner).unwrap_or_default());
    let log = log::validate(issues, &raw.log.map(S::into_inner).unwrap_or_default());
    let docker = docker::validate(issues, raw.docker.as_ref(), discovery.backend);
    let dns = dns::validate(issues, raw.dns.as_ref(), admin.listen, &listeners);
    let runtime = runtime::validate(issues, &raw.runtime.map(S::into_inner).unwrap_or_default());
    let acme = acme::validate(issues, path, raw.acme.as_ref());
    if let (Some(_), Some(a)) = (&acme, &raw.acme)
        && discovery.backend == DiscoveryBackend::Static
    {
        issues.at(
            a.span(),
            "[acme] keeps certificates in etcd: it needs [discovery] backend = \"etcd\"",
        );
    }
    if acme.is_none() {
        for (l, raw_l) in listeners.iter().zip(&raw.listener) {
            if !l.edge.acme.is_empty() {
                let at = raw_l
                    .get_ref()
                    .tls
                    .as_ref()
                    .map(|t| t.span())
                    .unwrap_or(0..0);
                issues.at(
                    at,
                    format!(
                        "listener {:?}: `tls.acme` needs an [acme] section (directory, key_file)",
                        l.name
                    ),
                );
            }
        }
    }
    Config {
        source: path.to_path_buf(),
        node,
        discovery,
        admin,
        listeners,
        services,
        tasks,
        http,
        log,
        runtime,
        dns,
        docker,
        acme,
    }
}

/// What the config unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use super::{Config, ConfigError};

    /// Validates `src` as the file `t.toml`.
    pub(crate) fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), src)
    }

    /// Validates `src` as `/etc/routemesh/t.toml` (relative paths resolve under /etc/routemesh).
    pub(crate) fn parse_etc(src: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/routemesh/t.toml"), src)
    }

    /// The errors of [`parse_etc`], rendered.
    pub(crate) fn err(src: &str) -> String {
        parse_etc(src).unwrap_err().to_string()
    }

    /// Validates `src` as `DIR/t.toml` (for files named relative to it), errors rendered.
    pub(crate) fn parse_in(dir: &Path, src: &str) -> Result<Config, String> {
        Config::parse(&dir.join("t.toml"), src).map_err(|e| e.to_string())
    }

    /// Each case's source gives an error whose text holds every one of its needles.
    pub(crate) fn errors_hold(cases: &[(&str, &[&str])]) {
        for (src, needles) in cases {
            let text = err(src);
            for needle in *needles {
                assert!(text.contains(needle), "{src:?}: no {needle:?} in {text}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::testing::parse;
    use super::*;

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
