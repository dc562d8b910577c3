//! routemesh's integration tests: one test binary, one module per capability, all sharing
//! the harness in `support/` (compiled once).

mod support;

mod cli;
mod cluster;
mod config_check;
mod discovery;
mod dns;
mod docker;
mod docker_swarm;
mod edge;
mod ha;
mod harness_selftest;
mod http;
mod mqtt;
mod observability;
mod tcp_proxy;
mod tls;
