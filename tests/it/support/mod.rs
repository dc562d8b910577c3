#![allow(dead_code)]
//! Integration-test harness for routemesh: real etcd, real TCP backends and
//! the real daemon, all on free loopback ports with per-test temp dirs.
//!
//! Use from a test file with `mod support;` and e.g.
//! `use support::{Daemon, Etcd, TcpBackend, eventually};`.

pub mod backend;
pub mod daemon;
pub mod docker;
pub mod etcd;
pub mod etcd_secure;
pub mod lab;
pub mod mosquitto;
pub mod nginx;
pub mod tls_server;
pub mod util;

#[allow(unused_imports)]
pub use backend::{
    Blackhole, TcpBackend, blackhole_addr, connect_and_greet, dead_addr, echo_roundtrip, hello,
};
#[allow(unused_imports)]
pub use daemon::{Daemon, cli, output_text};
#[allow(unused_imports)]
pub use etcd::{Etcd, EtcdCluster};
#[allow(unused_imports)]
pub use util::{
    bin, eventually, eventually_value, free_addr, free_port, http_get, http_request,
    require_binary, try_http_get, unique_name,
};
