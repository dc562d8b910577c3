//! Runtime helpers shared across the crate, each kept where every user finds it rather than
//! in the module that needed it first:
//! - `clock`   `now_ms`, the process-wide monotonic clock in milliseconds
//! - `backoff` `Backoff`, exponential retry pacing with jitter (etcd, lease, Docker)
//! - `net`     `bind` (listening sockets), `dial` (connects), TCP keepalive, fd exhaustion
//! - `notify`  systemd's readiness protocol (`sd_notify`: READY=1, STOPPING=1, MAINPID)
//! - `trim`    gives the allocator's free memory back to the kernel after a storm
//!
//! Owns no state of the project and knows nothing of config, routing or protocols.

pub mod backoff;
pub mod clock;
pub mod net;
pub mod notify;
pub mod trim;
