//! The routemesh daemon as the comparison benches run it (included with `#[path]`): a node
//! named `bench` with static discovery and warn-level logs.

use crate::support::Daemon;

/// Starts routemesh with `body` (its listeners, services and tasks) and `worker_threads =
/// threads`, `RUST_LOG=warn` and `env` in its environment; ready on return.
pub fn start(body: &str, threads: usize, env: &[(&str, &str)]) -> Daemon {
    let toml = format!(
        r#"
[node]
name = "bench"
drain_timeout = "1s"

[discovery]
backend = "static"

{body}
[log]
level = "warn"

[runtime]
worker_threads = {threads}
"#
    );
    let mut all = vec![("RUST_LOG", "warn")];
    all.extend_from_slice(env);
    let mut d = Daemon::start_with_env(&toml, &all);
    d.wait_ready();
    d
}
