//! A builder for the daemon's TOML config in the shapes the tests use: static tasks or etcd
//! discovery, listeners with their routes, service sections, tasks. It writes TOML with the
//! `toml` crate, so values are quoted and escaped by it. A test about the TOML text itself
//! (positions of errors, what a file looks like) writes its text inline instead.
//!
//! ```ignore
//! let d = Config::static_tasks()
//!     .listener(Listener::http(listen, "web").set("max_connections", 1))
//!     .set("service.web.retries", 2)
//!     .task(Task::new("web", backend.addr()))
//!     .start();
//! ```

use std::net::SocketAddr;

use toml::{Table, Value};

use super::daemon::Daemon;

/// A whole daemon config.
#[derive(Clone, Debug, Default)]
pub struct Config(Table);

impl Config {
    /// `[discovery] backend = "static"`: the routes are the `[[task]]`s of the file.
    pub fn static_tasks() -> Config {
        Config::default().set("discovery.backend", "static")
    }

    /// `[discovery] endpoints = [...]`: etcd discovery.
    pub fn etcd<S: ToString>(endpoints: &[S]) -> Config {
        let eps: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        Config::default().set("discovery.endpoints", eps)
    }

    /// `[node] name = "…"`.
    pub fn node(self, name: &str) -> Config {
        self.set("node.name", name)
    }

    /// Sets the key at a dotted path, making the tables on the way:
    /// `set("discovery.node_ttl", "2s")`, `set("service.web.health.interval", "200ms")`.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Config {
        set_path(&mut self.0, path, value.into());
        self
    }

    /// Appends a `[[listener]]`.
    pub fn listener(mut self, l: Listener) -> Config {
        push(&mut self.0, "listener", l.0);
        self
    }

    /// Appends a `[[task]]`.
    pub fn task(mut self, t: Task) -> Config {
        push(&mut self.0, "task", t.0);
        self
    }

    /// Appends every task of `tasks`.
    pub fn tasks(self, tasks: impl IntoIterator<Item = Task>) -> Config {
        tasks.into_iter().fold(self, Config::task)
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.0).expect("a config renders as TOML")
    }

    /// Starts a daemon with this config ([`Daemon::start`]: healthy on return). With static
    /// discovery it is also ready on return: the daemon binds its listeners a moment before
    /// it publishes the static routing table, and `/readyz` tells when that is done.
    pub fn start(&self) -> Daemon {
        let mut d = Daemon::start(&self.to_toml());
        let backend = self.0.get("discovery").and_then(|d| d.get("backend"));
        if backend.and_then(Value::as_str) == Some("static") {
            d.wait_ready();
        }
        d
    }
}

/// One `[[listener]]`.
#[derive(Clone, Debug)]
pub struct Listener(Table);

impl Listener {
    /// A listener of `protocol` ("tcp", "http", "tls", "udp") on `listen`, no default service.
    pub fn new(listen: SocketAddr, protocol: &str) -> Listener {
        let mut t = Table::new();
        t.insert("listen".into(), listen.to_string().into());
        t.insert("protocol".into(), protocol.into());
        Listener(t)
    }

    /// A TCP listener forwarding to `service`.
    pub fn tcp(listen: SocketAddr, service: &str) -> Listener {
        Listener::new(listen, "tcp").set("service", service)
    }

    /// An HTTP listener whose default service is `service`.
    pub fn http(listen: SocketAddr, service: &str) -> Listener {
        Listener::new(listen, "http").set("service", service)
    }

    /// A TLS passthrough listener whose default service is `service`.
    pub fn tls(listen: SocketAddr, service: &str) -> Listener {
        Listener::new(listen, "tls").set("service", service)
    }

    /// A UDP listener forwarding datagrams to `service`.
    pub fn udp(listen: SocketAddr, service: &str) -> Listener {
        Listener::new(listen, "udp").set("service", service)
    }

    /// `name = "…"` (the metrics' `listener` label).
    pub fn name(self, name: &str) -> Listener {
        self.set("name", name)
    }

    /// Any key of the listener, by dotted path.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Listener {
        set_path(&mut self.0, path, value.into());
        self
    }

    /// Appends a `[[listener.route]]` with these string keys (`host`, `path_prefix`, `sni`,
    /// `service`).
    pub fn route(mut self, keys: &[(&str, &str)]) -> Listener {
        push(&mut self.0, "route", strings(keys));
        self
    }

    /// Appends a `[[listener.tls.cert]]` with these string keys (`cert`, `key`, `sni`).
    pub fn tls_cert(mut self, keys: &[(&str, &str)]) -> Listener {
        push(&mut self.0, "tls.cert", strings(keys));
        self
    }
}

/// One `[[task]]`.
#[derive(Clone, Debug)]
pub struct Task(Table);

impl Task {
    /// A task of `service` at `addr`.
    pub fn new(service: &str, addr: SocketAddr) -> Task {
        let mut t = Table::new();
        t.insert("service".into(), service.into());
        t.insert("addr".into(), addr.to_string().into());
        Task(t)
    }

    /// `id = "…"`.
    pub fn id(mut self, id: &str) -> Task {
        self.0.insert("id".into(), id.into());
        self
    }

    /// `weight = N`.
    pub fn weight(mut self, weight: i64) -> Task {
        self.0.insert("weight".into(), weight.into());
        self
    }
}

fn strings(keys: &[(&str, &str)]) -> Table {
    keys.iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect()
}

/// The table at dotted `path` under `root`, made if missing.
fn table_at<'a>(root: &'a mut Table, path: &[&str]) -> &'a mut Table {
    path.iter().fold(root, |t, key| {
        t.entry(key.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("config: `{key}` is not a table"))
    })
}

fn set_path(root: &mut Table, path: &str, value: Value) {
    let keys: Vec<&str> = path.split('.').collect();
    let (last, parents) = keys.split_last().expect("a key path");
    table_at(root, parents).insert(last.to_string(), value);
}

/// Appends `entry` to the array of tables at dotted `path`.
fn push(root: &mut Table, path: &str, entry: Table) {
    let keys: Vec<&str> = path.split('.').collect();
    let (last, parents) = keys.split_last().expect("a key path");
    let array = table_at(root, parents)
        .entry(last.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    array
        .as_array_mut()
        .unwrap_or_else(|| panic!("config: `{path}` is not an array"))
        .push(Value::Table(entry));
}
