//! The integration-test harness, compiled once into the `it` test binary: real etcd, real
//! backends (TCP, nginx, mosquitto, openssl) and the real daemon, on free loopback ports with
//! per-test temp dirs, and the 3-node network-namespace lab. One module per concern:
//!
//! - `wait`: bounded waits on state (`eventually`, `holds_for`)
//! - `process`, `net`: child processes, tools, temp dirs; free ports, closed connections
//! - `daemon`, `config`: the routemesh daemon and CLI, and a builder for their TOML
//! - `http`, `load`: the one HTTP test client, and a steady load generator
//! - `etcd`, `pki`: etcd members (plain, TLS, auth, clusters) and etcdctl; a test CA
//! - `backend`, `nginx`, `mosquitto`, `tls`: the tasks a daemon routes to (and curl over TLS);
//!   `mqtt_wire`: MQTT 3.1.1 packets as bytes
//! - `pebble`: the ACME test CA, a test DNS server for its validation, a verifying TLS client
//! - `coap`, `dnsmasq`: the UDP tasks (libcoap's server and client, dnsmasq and dig)
//! - `docker`: the local engine and the test images; `lab`: the network-namespace cluster
//! - `browser`: headless Chromium over the DevTools protocol (the status page)
//!
//! Use from a test module as `use crate::support::{Daemon, Etcd, eventually, …};`.

pub mod backend;
pub mod browser;
pub mod coap;
pub mod config;
pub mod daemon;
pub mod dnsmasq;
pub mod docker;
pub mod etcd;
pub mod http;
pub mod lab;
pub mod load;
pub mod mosquitto;
pub mod mqtt_wire;
pub mod net;
pub mod nginx;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod tls;
pub mod wait;

pub use backend::{
    Blackhole, TcpBackend, UdpEcho, UdpMode, connect_and_greet, dead_addr, echo_roundtrip, hello,
};
pub use config::{Config, Listener, Task};
pub use daemon::{Daemon, cli, cli_fails, cli_ok};
pub use etcd::{Etcd, EtcdCluster, Etcdctl};
pub use net::{free_addr, free_port};
pub use process::{bin, output_text, tempdir};
pub use wait::{eventually, eventually_value, holds_for};
