//! routemesh's integration tests: one test binary (`it`), one module per capability, all
//! sharing the harness in `support/`, which is compiled once for all of them.
//!
//! Every test runs the real `routemesh` binary against real components (etcd, nginx,
//! mosquitto, openssl, Docker, network namespaces); see `support` for what is there. Waits
//! on state are bounded (`support::wait`), never sleeps that bet on timing.
//!
//! ## Adding a capability
//!
//! 1. Write `tests/it/<capability>.rs`, starting with a `//!` line on what it covers, and
//!    take what it needs from the harness:
//!    `use crate::support::{Config, Listener, Task, eventually, free_addr};`
//! 2. Add `mod <capability>;` below (keep the list sorted).
//! 3. Its tests are named `<capability>::<test>`: run them alone with
//!    `cargo nextest run -E 'test(/^<capability>::/)'`. If they need a machine-wide resource
//!    that only one test may hold at a time (like the netns lab or the Docker engine), add a
//!    `binary(it) & test(/^<capability>::/)` override with its test group to
//!    `.config/nextest.toml`.
//!
//! A helper two modules need goes into `support/` (the module of its concern, or a new one
//! listed in `support/mod.rs`), not into one test module for the other to copy. Nothing in
//! `support/` is allowed to be dead: the compiler says so, and an unused helper is removed.

mod support;

mod acme;
mod cli;
mod cluster;
mod config_check;
mod discovery;
mod dns;
mod docker;
mod docker_swarm;
mod edge;
mod etcd_errors;
mod ha;
mod harness_selftest;
mod http;
mod http_engine;
mod mqtt;
mod observability;
mod publish;
mod status_page;
mod tcp_proxy;
mod tls;
mod udp;
mod upgrade;
mod upgrade_docker;
