//! routemesh: an ingress routing-mesh load balancer. Every node runs the same daemon; a
//! connection to a published port of any node reaches a live task of its service.
//!
//! Crate map:
//! - `config`    the TOML file: raw shape, validation with file:line:col, the names newtypes
//! - `discovery` the one writer: etcd list + watch (or static), node lease, routing table
//! - `docker`    engine discovery: this node's labelled containers as tasks under its lease
//! - `snapshot`  immutable routing state published to readers; per-task runtime state
//! - `balance`   selectors built per snapshot: round robin, least connections, P2C, Maglev
//! - `proxy`     listeners, upstream connect with failover, the TCP proxy
//! - `admin`     /healthz /readyz /routes /metrics
//! - `dns`       the cluster name: an authoritative DNS responder that names only live nodes
//! - `metrics`   the Prometheus registry and metric families
//! - `mqtt`      the MQTT CONNECT parser behind client-id routing (pure)
//! - `protocol`  sans-IO protocol code: the HTTP/1.1 codec (heads, bodies, header editor)
//! - `app`       wiring, reload and drain
//! - `cli`       the command line
//! - `ratelimit` rate-limited logging for the data path

pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod dns;
pub mod docker;
pub mod health;
pub mod metrics;
pub mod mqtt;
pub mod protocol;
pub mod proxy;
pub mod ratelimit;
pub mod snapshot;
