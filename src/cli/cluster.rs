//! The cluster commands: `task add|rm`, `service ls|ps`, `node ls|update`,
//! `publish add|rm|ls|ps`, `cert ls`. They talk to etcd directly with the same key schema the daemons
//! use. Errors are one line on stderr, exit 1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use serde_json::json;

use super::{
    AvailabilityArg, CertCmd, ClusterArgs, NodeCmd, PublishCmd, ServiceCmd, TaskCmd, table,
};
use crate::config::{self, Config, NodeName, PublishSpec, ServiceName, TaskId};
use crate::discovery::etcd::{DiscoveryError, connect};
use crate::discovery::keys::{
    Availability, TaskRecord, listener_key, node_alive_key, node_info_key, task_key,
    valid_listener_name, watch_prefix,
};
use crate::discovery::ops::{self, OpError};
use crate::discovery::published::{self, Source, overlaps};
use crate::discovery::table::{RoutingTable, Update};

pub enum Op {
    Task(TaskCmd),
    Service(ServiceCmd),
    Node(NodeCmd),
    Publish(PublishCmd),
    Cert(CertCmd),
}

/// A cluster command's failure: printed as `error: …`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// etcd failed: one line naming the member, the cause and the fix.
    #[error("{0}")]
    Etcd(String),
}

const TIMEOUT: Duration = Duration::from_secs(5);

struct Target {
    endpoints: Vec<String>,
    /// `[discovery] tls` and credentials of the `-c` config file.
    security: config::EtcdSecurity,
    prefix: String,
    json: bool,
}

impl Target {
    /// What a command prints: one JSON document with `--json`, else its text.
    fn answer(
        &self,
        json: impl FnOnce() -> serde_json::Value,
        text: impl FnOnce() -> String,
    ) -> String {
        if self.json {
            format!("{}\n", json())
        } else {
            text()
        }
    }
}

fn target(args: &ClusterArgs) -> Result<Target, CliError> {
    let file = match &args.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    let endpoints = match (&args.etcd, &file) {
        (Some(list), _) => list
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        (None, Some(c)) => c.discovery.endpoints.clone(),
        (None, None) => vec![config::DEFAULT_ENDPOINT.to_string()],
    };
    if endpoints.is_empty() {
        return Err(CliError::Usage("--etcd names no endpoint".into()));
    }
    let endpoints = endpoints
        .into_iter()
        .map(|e| {
            if e.contains("://") {
                e
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    let prefix = match (&args.prefix, &file) {
        (Some(p), _) => p.trim_end_matches('/').to_string(),
        (None, Some(c)) => c.discovery.prefix.clone(),
        (None, None) => config::DEFAULT_PREFIX.to_string(),
    };
    if !prefix.starts_with('/') {
        return Err(CliError::Usage(format!(
            "--prefix {prefix:?} must start with '/'"
        )));
    }
    Ok(Target {
        security: file
            .as_ref()
            .map(|c| c.discovery.security.clone())
            .unwrap_or_default(),
        endpoints,
        prefix,
        json: args.json,
    })
}

pub fn main(op: Op) -> ExitCode {
    // Errors are one line; `RUST_LOG=debug` adds the full chain of each etcd error.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(op)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(op: Op) -> Result<String, CliError> {
    match op {
        Op::Task(TaskCmd::Add {
            service,
            addr,
            id,
            node,
            weight,
            publish,
            cluster,
        }) => {
            let publish = publish
                .iter()
                .map(|p| usage(PublishSpec::parse(p)))
                .collect::<Result<Vec<_>, _>>()?;
            let task = NewTask {
                service: &service,
                addr: &addr,
                id,
                node,
                weight,
                publish,
            };
            task_add(&target(&cluster)?, task).await
        }
        Op::Task(TaskCmd::Rm {
            service,
            id,
            cluster,
        }) => task_rm(&target(&cluster)?, &service, &id).await,
        Op::Service(ServiceCmd::Ls { cluster }) => service_ls(&target(&cluster)?).await,
        Op::Service(ServiceCmd::Ps {
            service,
            admin,
            cluster,
        }) => service_ps(&target(&cluster)?, &service, admin.as_deref()).await,
        Op::Node(NodeCmd::Ls { cluster }) => node_ls(&target(&cluster)?).await,
        Op::Node(NodeCmd::Update {
            availability,
            node,
            cluster,
        }) => node_update(&target(&cluster)?, &node, availability).await,
        Op::Publish(PublishCmd::Add {
            service,
            port,
            name,
            listen,
            cluster,
        }) => publish_add(&target(&cluster)?, &service, &port, name, listen).await,
        Op::Publish(PublishCmd::Rm { name, cluster }) => {
            publish_rm(&target(&cluster)?, &name).await
        }
        Op::Publish(PublishCmd::Ls { cluster }) => publish_ls(&target(&cluster)?).await,
        Op::Publish(PublishCmd::Ps { name, cluster }) => {
            publish_ps(&target(&cluster)?, &name).await
        }
        Op::Cert(CertCmd::Ls { cluster }) => cert_ls(&target(&cluster)?).await,
    }
}

/// `cert ls`: NAME  DOMAINS  NOT AFTER  ISSUER  STATE, from the records in etcd.
async fn cert_ls(t: &Target) -> Result<String, CliError> {
    let table = load_table(t).await?;
    let now = crate::discovery::unix_ms() / 1000;
    let rows = crate::acme::store::cert_rows(&table.acme, now);
    if t.json {
        return Ok(format!("{}\n", json!(rows)));
    }
    let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let not_after = r
                .not_after
                .map(|s| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(s),
                    )
                    .to_string()
                })
                .unwrap_or_default();
            let state = match &r.last_error {
                Some(e) => format!("{}: {e}", r.state),
                None => r.state.clone(),
            };
            vec![
                r.name.clone(),
                dash(r.domains.join(",")),
                dash(not_after),
                dash(r.issuer.clone()),
                state,
            ]
        })
        .collect();
    Ok(table::render(
        &["NAME", "DOMAINS", "NOT AFTER", "ISSUER", "STATE"],
        &lines,
    ))
}

fn etcd_failed(endpoint: &str, e: DiscoveryError) -> CliError {
    tracing::debug!(endpoint, error = %e.chain(), "etcd request failed");
    CliError::Etcd(e.explain(endpoint, true))
}

/// A client of the first answering member, and that member's URL.
async fn client(t: &Target) -> Result<(Client, String), CliError> {
    connect(&t.endpoints, Duration::from_secs(2), &t.security)
        .await
        .map_err(|e| etcd_failed(&t.endpoints.join(","), e))
}

/// Runs one etcd request with the CLI's time bound.
async fn bounded<T, F>(endpoint: &str, f: F) -> Result<T, CliError>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(etcd_failed(endpoint, e.into())),
        Err(_) => Err(etcd_failed(endpoint, DiscoveryError::Timeout(TIMEOUT))),
    }
}

async fn load_table(t: &Target) -> Result<RoutingTable, CliError> {
    let (mut c, ep) = client(t).await?;
    let resp = bounded(
        &ep,
        c.get(
            watch_prefix(&t.prefix),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await?;
    let mut table = RoutingTable::new(&t.prefix);
    for bad in table.apply(Update::Reset {
        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        kvs: resp
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect(),
    }) {
        eprintln!(
            "warning: skipping malformed entry {}: {}",
            bad.key, bad.reason
        );
    }
    Ok(table)
}

fn usage<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, CliError> {
    r.map_err(|e| CliError::Usage(e.to_string()))
}

/// `task add`'s arguments.
struct NewTask<'a> {
    service: &'a str,
    addr: &'a str,
    id: Option<String>,
    node: Option<String>,
    weight: u32,
    publish: Vec<PublishSpec>,
}

async fn task_add(t: &Target, task: NewTask<'_>) -> Result<String, CliError> {
    let NewTask {
        service,
        addr,
        id,
        node,
        weight,
        mut publish,
    } = task;
    publish.sort();
    publish.dedup();
    let service = usage(ServiceName::new(service))?;
    let addr: SocketAddr = addr.parse().map_err(|_| {
        CliError::Usage(format!(
            "{addr:?} is not an IP:PORT address (e.g. 10.0.0.2:80 or [::1]:80)"
        ))
    })?;
    if weight > 1000 {
        return Err(CliError::Usage(format!(
            "--weight {weight} is out of range 0..=1000"
        )));
    }
    let node = node.map(|n| usage(NodeName::new(&n))).transpose()?;
    let id = match id {
        Some(id) => usage(TaskId::new(&id))?,
        None => TaskId::derived(node.as_ref(), addr),
    };
    let (mut c, ep) = client(t).await?;
    let mut options = None;
    if let Some(node) = &node {
        let alive = bounded(&ep, c.get(node_alive_key(&t.prefix, node), None)).await?;
        match alive.kvs().first() {
            Some(kv) if kv.lease() != 0 => {
                options = Some(PutOptions::new().with_lease(kv.lease()));
            }
            _ => {
                let info = bounded(&ep, c.get(node_info_key(&t.prefix, node), None)).await?;
                return Err(CliError::Usage(if info.kvs().is_empty() {
                    format!("unknown node {node}: `routemesh node ls` lists the nodes")
                } else {
                    format!(
                        "node {node} is Down: its tasks would vanish at once; pick a Ready node"
                    )
                }));
            }
        }
    }
    let rec = TaskRecord {
        addr,
        node,
        weight,
        publish,
    };
    bounded(
        &ep,
        c.put(task_key(&t.prefix, &service, &id), rec.to_json(), options),
    )
    .await?;
    Ok(t.answer(
        || json!({ "id": id.as_str(), "service": service.as_str() }),
        || format!("{id}\n"),
    ))
}

async fn task_rm(t: &Target, service: &str, id: &str) -> Result<String, CliError> {
    let service = usage(ServiceName::new(service))?;
    let id = usage(TaskId::new(id))?;
    let (mut c, ep) = client(t).await?;
    let resp = bounded(&ep, c.delete(task_key(&t.prefix, &service, &id), None)).await?;
    if resp.deleted() == 0 {
        return Err(CliError::Usage(format!(
            "service {service} has no task {id}: `routemesh service ps {service}` lists them"
        )));
    }
    Ok(t.answer(|| json!({ "removed": id.as_str() }), || format!("{id}\n")))
}

fn node_status(table: &RoutingTable, node: Option<&NodeName>) -> &'static str {
    match node {
        None => "-",
        Some(n) => match table.nodes.get(n) {
            None => "Unknown",
            Some(e) if e.is_ready() => "Ready",
            Some(_) => "Down",
        },
    }
}

async fn service_ls(t: &Target) -> Result<String, CliError> {
    let table = load_table(t).await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (name, tasks) in &table.tasks {
        let routable = tasks
            .values()
            .filter(|r| {
                table.node_allows(r.node.as_ref())
                    && !table.node_drained(r.node.as_ref())
                    && r.weight > 0
            })
            .count();
        rows.push(vec![
            name.to_string(),
            format!("{routable}/{}", tasks.len()),
        ]);
        out.push(json!({ "name": name.as_str(), "tasks": tasks.len(), "routable": routable }));
    }
    Ok(t.answer(
        || serde_json::Value::Array(out),
        || table::render(&["NAME", "TASKS"], &rows),
    ))
}

/// GET /routes from a daemon's admin endpoint (plain HTTP/1.0, bounded).
async fn admin_routes(admin: &str) -> Result<serde_json::Value, CliError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(format!("GET /routes HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.take(64 << 20).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, fetch)
        .await
        .map_err(|_| CliError::Usage(format!("admin endpoint {addr} did not answer")))?
        .map_err(|e| CliError::Usage(format!("cannot reach the admin endpoint {addr}: {e}")))?;
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &raw[i + 4..])
        .ok_or_else(|| CliError::Usage(format!("admin endpoint {addr}: not an HTTP response")))?;
    serde_json::from_slice(body)
        .map_err(|e| CliError::Usage(format!("admin endpoint {addr}: bad /routes JSON: {e}")))
}

async fn service_ps(t: &Target, service: &str, admin: Option<&str>) -> Result<String, CliError> {
    let service = usage(ServiceName::new(service))?;
    let table = load_table(t).await?;
    let view = match admin {
        Some(a) => Some(admin_routes(a).await?),
        None => None,
    };
    // This node's view of each task: state and why.
    let view_of = |id: &str| -> Option<(String, String)> {
        let v = view.as_ref()?;
        let svc = v["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service.as_str())?;
        let task = svc["tasks"].as_array()?.iter().find(|x| x["id"] == id)?;
        Some((
            task["state"].as_str().unwrap_or("-").to_string(),
            task["last_error"].as_str().unwrap_or("").to_string(),
        ))
    };
    let empty = BTreeMap::new();
    let tasks = table.tasks.get(&service).unwrap_or(&empty);
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (id, r) in tasks {
        let status = node_status(&table, r.node.as_ref());
        let node = r.node.as_ref().map(|n| n.to_string()).unwrap_or("-".into());
        let mut row = vec![
            id.to_string(),
            r.addr.to_string(),
            node.clone(),
            status.to_string(),
        ];
        let mut j = json!({
            "id": id.as_str(),
            "addr": r.addr.to_string(),
            "node": r.node.as_ref().map(|n| n.as_str()),
            "node_status": status,
            "weight": r.weight,
        });
        if view.is_some() {
            let (state, why) = view_of(id.as_str())
                .unwrap_or_else(|| ("not seen".into(), "not in this node's snapshot yet".into()));
            row.push(state.clone());
            row.push(if why.is_empty() {
                "-".into()
            } else {
                why.clone()
            });
            j["state"] = json!(state);
            j["why"] = json!(why);
        }
        rows.push(row);
        out.push(j);
    }
    Ok(if t.json {
        format!("{}\n", serde_json::Value::Array(out))
    } else if view.is_some() {
        table::render(
            &["ID", "ADDR", "NODE", "NODE STATUS", "STATE", "WHY"],
            &rows,
        )
    } else {
        table::render(&["ID", "ADDR", "NODE", "NODE STATUS"], &rows)
    })
}

async fn node_ls(t: &Target) -> Result<String, CliError> {
    let table = load_table(t).await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (name, e) in &table.nodes {
        let status = if e.is_ready() { "Ready" } else { "Down" };
        let rec = e.record();
        let addr = rec
            .and_then(|r| r.advertise)
            .map(|a| a.to_string())
            .unwrap_or("-".into());
        let version = rec
            .map(|r| r.version.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or("-".into());
        let availability = e.availability.as_str();
        rows.push(vec![
            name.to_string(),
            addr.clone(),
            status.to_string(),
            availability.to_string(),
            version.clone(),
        ]);
        out.push(json!({
            "name": name.as_str(),
            "address": addr,
            "status": status,
            "availability": availability,
            "version": version,
        }));
    }
    Ok(t.answer(
        || serde_json::Value::Array(out),
        || {
            table::render(
                &["NAME", "ADDRESS", "STATUS", "AVAILABILITY", "VERSION"],
                &rows,
            )
        },
    ))
}

async fn node_update(
    t: &Target,
    node: &str,
    availability: AvailabilityArg,
) -> Result<String, CliError> {
    let node = usage(NodeName::new(node))?;
    let availability = match availability {
        AvailabilityArg::Active => Availability::Active,
        AvailabilityArg::Drain => Availability::Drain,
    };
    let (mut c, ep) = client(t).await?;
    ops::set_availability(&mut c, &t.prefix, &node, availability, TIMEOUT)
        .await
        .map_err(|e| match e {
            OpError::Etcd(e) => etcd_failed(&ep, e),
            other => CliError::Usage(other.to_string()),
        })?;
    Ok(t.answer(
        || json!({ "node": node.as_str(), "availability": availability.as_str() }),
        || format!("{node}\n"),
    ))
}

async fn publish_add(
    t: &Target,
    service: &str,
    port: &str,
    name: Option<String>,
    listen: Option<String>,
) -> Result<String, CliError> {
    let service = usage(ServiceName::new(service))?;
    let spec = usage(PublishSpec::parse(port))?;
    let name = name.unwrap_or_else(|| spec.listener_name(&service));
    if !valid_listener_name(&name) {
        return Err(CliError::Usage(format!(
            "listener name {name:?} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ - (--name NAME)"
        )));
    }
    let ip: std::net::IpAddr = match listen.as_deref() {
        None => std::net::Ipv4Addr::UNSPECIFIED.into(),
        Some(ip) => ip.trim_matches(['[', ']']).parse().map_err(|_| {
            CliError::Usage(format!(
                "--listen {ip:?} is not an IP address (e.g. 0.0.0.0, 10.0.0.1 or ::)"
            ))
        })?,
    };
    let addr = SocketAddr::new(ip, spec.port);
    let value = json!({
        "listen": addr.to_string(),
        "protocol": spec.protocol.as_str(),
        "service": service.as_str(),
    })
    .to_string();
    // The daemons validate it the same way; refuse here what they would skip.
    config::listener::from_json(
        &listener_key(&t.prefix, &name),
        value.as_bytes(),
        Path::new(""),
    )
    .map_err(|e| CliError::Usage(e.to_string()))?;
    let table = load_table(t).await?;
    if let Some(existing) = table.listeners.get(&name)
        && (existing.listen != addr
            || existing.protocol != spec.protocol
            || existing.service.as_ref() != Some(&service))
    {
        return Err(CliError::Usage(format!(
            "{name} is already published on {} for {}: `routemesh publish rm {name}` first",
            existing.listen,
            existing.service.as_ref().map(|s| s.as_str()).unwrap_or("-")
        )));
    }
    if let Some((other, l)) = table.listeners.iter().find(|(n, l)| {
        **n != name
            && l.protocol.transport() == spec.protocol.transport()
            && overlaps(l.listen, addr)
    }) {
        return Err(CliError::Usage(format!(
            "{addr} is already published as {other} (on {}): pick another port, or `routemesh publish rm {other}`",
            l.listen
        )));
    }
    let (mut c, ep) = client(t).await?;
    bounded(&ep, c.put(listener_key(&t.prefix, &name), value, None)).await?;
    let record = || {
        json!({
            "name": name,
            "listen": addr.to_string(),
            "protocol": spec.protocol.as_str(),
            "service": service.as_str(),
        })
    };
    Ok(t.answer(record, || format!("{name}\n")))
}

async fn publish_rm(t: &Target, name: &str) -> Result<String, CliError> {
    let table = load_table(t).await?;
    if !table.listeners.contains_key(name) {
        let requested = published::published(&table)
            .into_iter()
            .find(|p| p.config.name == name && p.source == Source::Tasks);
        return Err(CliError::Usage(match requested {
            Some(p) => format!(
                "{name} is published by the tasks of service {} (their publish list): it goes away with the last task that asks for it",
                p.config.service.as_ref().map(|s| s.as_str()).unwrap_or("-")
            ),
            None => format!("no published listener {name}: `routemesh publish ls` lists them"),
        }));
    }
    let (mut c, ep) = client(t).await?;
    bounded(&ep, c.delete(listener_key(&t.prefix, name), None)).await?;
    Ok(t.answer(|| json!({ "removed": name }), || format!("{name}\n")))
}

/// What each Ready node reports about listener `name` (from its `alive` record).
fn node_states<'a>(
    table: &'a RoutingTable,
    name: &'a str,
) -> impl Iterator<Item = (&'a NodeName, Option<&'a str>)> + 'a {
    table.nodes.iter().filter_map(move |(node, e)| {
        let rec = e.alive.as_ref()?;
        let state = rec
            .listeners
            .iter()
            .find(|l| l.name == name && l.source != "config")
            .map(|l| l.state.as_str());
        Some((node, state))
    })
}

async fn publish_ls(t: &Target) -> Result<String, CliError> {
    let table = load_table(t).await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for p in published::published(&table) {
        let name = p.config.name.as_str();
        let (mut bound, mut ready) = (0, 0);
        for (_, state) in node_states(&table, name) {
            ready += 1;
            bound += usize::from(state == Some("bound"));
        }
        let service = p.config.service.as_ref().map(|s| s.as_str()).unwrap_or("-");
        rows.push(vec![
            name.to_string(),
            p.config.listen.to_string(),
            p.config.protocol.as_str().to_string(),
            service.to_string(),
            format!("{bound}/{ready}"),
            p.source.as_str().to_string(),
        ]);
        out.push(json!({
            "name": name,
            "listen": p.config.listen.to_string(),
            "protocol": p.config.protocol.as_str(),
            "service": service,
            "bound": bound,
            "ready": ready,
            "source": p.source.as_str(),
        }));
    }
    Ok(t.answer(
        || serde_json::Value::Array(out),
        || {
            table::render(
                &["NAME", "LISTEN", "PROTOCOL", "SERVICE", "NODES", "SOURCE"],
                &rows,
            )
        },
    ))
}

async fn publish_ps(t: &Target, name: &str) -> Result<String, CliError> {
    let table = load_table(t).await?;
    if !published::published(&table)
        .iter()
        .any(|p| p.config.name == name)
    {
        return Err(CliError::Usage(format!(
            "no published listener {name}: `routemesh publish ls` lists them"
        )));
    }
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (node, state) in node_states(&table, name) {
        // A node that does not list it has not applied it yet (or runs the static backend).
        let state = state.unwrap_or("pending");
        rows.push(vec![node.to_string(), state.to_string()]);
        out.push(json!({ "node": node.as_str(), "state": state }));
    }
    Ok(t.answer(
        || serde_json::Value::Array(out),
        || table::render(&["NODE", "STATE"], &rows),
    ))
}
