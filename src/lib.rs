//! routemesh: an ingress routing-mesh load balancer. Every node runs the same daemon; a
//! connection to a published port of any node reaches a live task of its service.
//!
//! Crate map (one line per module, in the order data flows):
//! - `config`    the TOML file: one file per section (raw shape + validate), errors with
//!   file:line:col, the names newtypes, listener validation shared with etcd-published ones,
//!   certificate loading
//! - `discovery` the one writer: etcd list + watch (or static), node lease, routing table
//! - `docker`    engine discovery: this node's labelled containers (and swarm tasks) as tasks
//!   under its lease
//! - `snapshot`  immutable routing state published to readers; per-task runtime state
//! - `balance`   selectors built per snapshot: round robin, least connections, P2C, Maglev
//! - `health`    active health checks of the served services' tasks, with hysteresis
//! - `protocol`  sans-IO protocol code: the HTTP/1.1 codec, MQTT CONNECT, PROXY protocol,
//!   TLS ClientHello
//! - `proxy`     the data path: accept loop, admission, upstream connect with failover, TCP,
//!   HTTP and TLS (termination, SNI passthrough)
//! - `admin`     the status page (/ and its /events stream, write actions with a token),
//!   /healthz /readyz /routes /metrics
//! - `dns`       the cluster name: an authoritative DNS responder that names only live nodes
//! - `metrics`   the Prometheus registry and metric families
//! - `acme`      cluster certificates from an ACME CA: one node orders under an etcd lock,
//!   every node serves them from the snapshot; private keys sealed in etcd
//! - `app`       wiring, reload and drain
//! - `upgrade`   `run --upgrade`: the old process's sockets and lease handed to the new one
//!   over a Unix socket (SCM_RIGHTS)
//! - `cli`       the command line
//! - `ratelimit` rate-limited logging for the data path
//! - `util`      runtime helpers: the monotonic clock, retry backoff, socket bind and dial,
//!   systemd readiness notifications

pub mod acme;
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
pub mod protocol;
pub mod proxy;
pub mod ratelimit;
pub mod snapshot;
pub mod upgrade;
pub mod util;
