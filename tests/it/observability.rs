//! Observability and deployment artefacts, checked against real tools: the daemon's
//! `/metrics` through `promtool check metrics` (and the contract's metric names), deploy/'s
//! Prometheus config and alert rules through promtool, the Grafana dashboard's queries against
//! the names src/metrics.rs registers, every example config through `routemesh check`, JSON
//! logs, the systemd unit (`systemd-analyze verify`) and the Dockerfile's healthcheck probe run
//! against a live daemon.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::process::{run_bounded, which};
use crate::support::{
    Config, Listener, Task, TcpBackend, bin, cli_ok, dead_addr, echo_roundtrip, eventually,
    free_addr, output_text, tempdir,
};

const PROMTOOL_HINT: &str =
    "promtool not found: run `bash .ci/run` or `apt-get install -y prometheus`";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Every metric family in the contract (issue 5), with its type.
const CONTRACT: &[(&str, &str)] = &[
    ("routemesh_connections_total", "counter"),
    ("routemesh_active_connections", "gauge"),
    ("routemesh_bytes_total", "counter"),
    ("routemesh_http_requests_total", "counter"),
    ("routemesh_http_request_duration_seconds", "histogram"),
    ("routemesh_upstream_connect_errors_total", "counter"),
    ("routemesh_retries_total", "counter"),
    ("routemesh_no_live_task_total", "counter"),
    ("routemesh_task_up", "gauge"),
    ("routemesh_tasks", "gauge"),
    ("routemesh_discovery_up", "gauge"),
    ("routemesh_discovery_revision", "gauge"),
    ("routemesh_discovery_last_sync_age_seconds", "gauge"),
    ("routemesh_discovery_invalid_entries_total", "counter"),
    ("routemesh_config_reloads_total", "counter"),
    ("routemesh_build_info", "gauge"),
];

/// Families only HTTP traffic produces. The prometheus crate leaves a labelled family out of
/// the exposition until it has a sample, so over the TCP path these are checked as declared
/// (registered in src/metrics.rs and rendered with samples in-process), not scraped.
const HTTP_ONLY: &[&str] = &[
    "routemesh_http_requests_total",
    "routemesh_http_request_duration_seconds",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn promtool() -> PathBuf {
    which("promtool").unwrap_or_else(|| panic!("{PROMTOOL_HINT}"))
}

/// Runs promtool with `args`, feeding `stdin`; panics with its output unless it exits 0.
fn promtool_ok(args: &[&str], stdin: Option<&[u8]>, what: &str) -> String {
    let mut cmd = Command::new(promtool());
    cmd.args(args);
    let out = run_bounded(&mut cmd, stdin, TOOL_TIMEOUT)
        .unwrap_or_else(|e| panic!("promtool {args:?}: {e}"));
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "promtool {args:?} failed on {what} ({}):\n{text}",
        out.status
    );
    text
}

/// `text` (as parsed into `types`) declares `name` with `# TYPE name kind` and a HELP line.
fn assert_declared(text: &str, types: &[(String, String)], name: &str, kind: &str, what: &str) {
    assert!(
        types.iter().any(|(n, k)| n == name && k == kind),
        "{what}: lacks `# TYPE {name} {kind}`:\n{text}"
    );
    assert!(
        text.contains(&format!("# HELP {name} ")),
        "{what}: lacks `# HELP {name}`:\n{text}"
    );
}

/// `# TYPE name kind` lines of an exposition.
fn declared_types(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// Names of the samples present (series lines), without labels.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// The metric names src/metrics.rs registers (its `"routemesh_…"` string literals).
fn registered_names() -> BTreeSet<String> {
    let src = read(&repo().join("src/metrics.rs"));
    let mut names = BTreeSet::new();
    for piece in src.split('"').skip(1).step_by(2) {
        if piece.starts_with("routemesh_")
            && piece
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            names.insert(piece.to_string());
        }
    }
    names
}

#[test]
fn metrics_after_tcp_traffic_pass_promtool_and_cover_the_contract() {
    let backend = TcpBackend::start("echo-1");
    let (echo_listen, dead_listen) = (free_addr(), free_addr());
    let mut daemon = Config::static_tasks()
        .node("obs")
        .listener(Listener::tcp(echo_listen, "echo").name("echo"))
        .listener(Listener::tcp(dead_listen, "dead").name("dead"))
        .set("service.echo.retries", 2)
        .task(Task::new("echo", backend.addr()).id("echo-1"))
        .task(Task::new("echo", dead_addr()).id("echo-dead"))
        .task(Task::new("dead", dead_addr()).id("dead-1"))
        .start();
    daemon.wait_ready();

    // Round robin over a live and a dead task: connect errors and retries, yet every
    // connection is served by echo-1.
    for i in 0..6 {
        let payload = format!("hello {i}").repeat(100);
        let (name, echoed) = echo_roundtrip(echo_listen, payload.as_bytes())
            .unwrap_or_else(|e| panic!("roundtrip {i} through {echo_listen}: {e}"));
        assert_eq!(name, "echo-1");
        assert_eq!(echoed, payload.as_bytes());
    }
    // A service whose only task is dead: refused, counted as no live task.
    let _ = std::net::TcpStream::connect(dead_listen).map(|mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 16];
        let _ = std::io::Read::read(&mut s, &mut buf);
    });
    // A reload, so routemesh_config_reloads_total has a sample.
    daemon.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "a config reload to be counted",
        || {
            daemon
                .admin_get("/metrics")
                .1
                .contains("routemesh_config_reloads_total{")
        },
    );
    eventually(
        Duration::from_secs(10),
        "the dead service to be counted",
        || {
            daemon
                .admin_get("/metrics")
                .1
                .contains("routemesh_no_live_task_total{service=\"dead\"}")
        },
    );

    let (status, body) = daemon.admin_get("/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    promtool_ok(&["check", "metrics"], Some(body.as_bytes()), "GET /metrics");

    let types = declared_types(&body);
    let samples = sample_names(&body);
    for &(name, kind) in CONTRACT {
        if HTTP_ONLY.contains(&name) {
            continue;
        }
        assert_declared(&body, &types, name, kind, "/metrics after TCP traffic");
        assert!(
            samples.contains(name),
            "/metrics has no sample of {name}:\n{body}"
        );
    }
    // Spot-check that the counters count what happened.
    for needle in [
        "routemesh_connections_total{listener=\"echo\",service=\"echo\"} 6",
        "routemesh_upstream_connect_errors_total{service=\"echo\",task=\"echo-dead\"}",
        "routemesh_retries_total{service=\"echo\"}",
        "routemesh_bytes_total{direction=\"rx\",listener=\"echo\",service=\"echo\"}",
        "routemesh_bytes_total{direction=\"tx\",listener=\"echo\",service=\"echo\"}",
        "routemesh_task_up{node=\"\",service=\"echo\",task=\"echo-1\"} 1",
        "routemesh_tasks{service=\"echo\",state=\"healthy\"}",
        "routemesh_config_reloads_total{result=\"success\"} 1",
        "routemesh_discovery_up 1",
        "routemesh_build_info{version=\"",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle:?}:\n{body}");
    }
    // HTTP families: declared even before any HTTP traffic exists.
    let registered = registered_names();
    for name in HTTP_ONLY {
        assert!(
            registered.contains(*name),
            "src/metrics.rs does not register {name}"
        );
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn every_metric_family_renders_valid_exposition_in_process() {
    use routemesh::discovery::DiscoveryStatus;
    use routemesh::metrics::Metrics;
    use routemesh::snapshot::Snapshot;

    let m = Metrics::new().expect("every metric family registers");
    let lc = ["web", "api"];
    m.connections_total.with_label_values(&lc).inc();
    m.active_connections.with_label_values(&lc).set(1);
    m.bytes_total
        .with_label_values(&["web", "api", "rx"])
        .inc_by(10);
    m.http_requests_total
        .with_label_values(&["web", "api", "200"])
        .inc();
    m.http_request_duration_seconds
        .with_label_values(&lc)
        .observe(0.003);
    m.upstream_connect_errors_total
        .with_label_values(&["api", "api-1"])
        .inc();
    m.retries_total.with_label_values(&["api"]).inc();
    m.no_live_task_total.with_label_values(&["api"]).inc();
    m.config_reloads_total.with_label_values(&["success"]).inc();
    let text = m.render(&Snapshot::default(), &DiscoveryStatus::default());
    promtool_ok(
        &["check", "metrics"],
        Some(text.as_bytes()),
        "Metrics::render",
    );
    let types = declared_types(&text);
    for &(name, kind) in CONTRACT {
        if matches!(name, "routemesh_task_up" | "routemesh_tasks") {
            continue; // derived from the snapshot, which is empty here
        }
        assert_declared(&text, &types, name, kind, "Metrics::render");
    }
    assert!(text.contains("routemesh_http_request_duration_seconds_bucket{"));
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let config = deploy("prometheus/prometheus.yml");
    let rules = deploy("prometheus/alerts.yml");
    let out = promtool_ok(
        &["check", "config", config.to_str().unwrap()],
        None,
        "prometheus.yml",
    );
    assert!(
        out.contains("1 rule files found"),
        "prometheus.yml loads alerts.yml:\n{out}"
    );
    promtool_ok(
        &["check", "rules", rules.to_str().unwrap()],
        None,
        "alerts.yml",
    );

    // The required alerts exist and only reference metrics the daemon exports.
    let text = read(&rules);
    for alert in [
        "RoutemeshNodeDown",
        "RoutemeshDiscoveryDown",
        "RoutemeshDiscoveryStale",
        "RoutemeshNoLiveTask",
        "RoutemeshTaskDown",
    ] {
        assert!(
            text.contains(&format!("alert: {alert}\n")),
            "alerts.yml lacks {alert}"
        );
    }
    assert_metrics_exist(&text, "deploy/prometheus/alerts.yml");
    let scrape = read(&config);
    assert!(
        scrape.contains(":9901"),
        "prometheus.yml scrapes the admin port"
    );
}

/// Every `routemesh_…` name in `text` is a registered metric (or a histogram's
/// `_bucket`/`_sum`/`_count` series).
fn assert_metrics_exist(text: &str, what: &str) {
    let registered = registered_names();
    let mut used = BTreeSet::new();
    for (i, _) in text.match_indices("routemesh_") {
        if i > 0 {
            let prev = text.as_bytes()[i - 1];
            if prev.is_ascii_alphanumeric() || prev == b'_' {
                continue;
            }
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(!used.is_empty(), "{what} references no routemesh metric");
    for name in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| registered.contains(*b))
            .unwrap_or(name);
        assert!(
            registered.contains(base),
            "{what} references {name}, which src/metrics.rs does not register (has: {registered:?})"
        );
    }
}

#[test]
fn grafana_dashboard_parses_and_queries_existing_metrics() {
    let path = deploy("grafana/routemesh.json");
    let dash: serde_json::Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(dash["uid"], "routemesh");
    let panels = dash["panels"].as_array().expect("dashboard has panels");
    let mut exprs = Vec::new();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("every target has an expr");
            exprs.push(e.to_string());
        }
    }
    let all = exprs.join("\n");
    assert_metrics_exist(&all, "deploy/grafana/routemesh.json");
    // What the issue asks the dashboard to show.
    for needle in [
        "routemesh_http_requests_total",
        "routemesh_connections_total",
        "histogram_quantile(0.99, sum by (service, le) (rate(routemesh_http_request_duration_seconds_bucket",
        "routemesh_tasks{",
        "routemesh_discovery_up",
    ] {
        assert!(
            all.contains(needle),
            "dashboard has no query with {needle:?}"
        );
    }
    // Template variables the queries use are defined.
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "instance", "service"] {
        assert!(vars.contains(&v), "dashboard lacks variable ${v}");
    }
    // Every expression is valid PromQL once Grafana's variables are substituted.
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$service", ".*");
            format!(
                "      - record: dashboard:expr_{i}\n        expr: {}\n",
                serde_json::Value::String(e)
            )
        })
        .collect();
    let dir = tempdir("grafana-promql");
    let file = dir.path().join("rules.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    promtool_ok(
        &["check", "rules", file.to_str().unwrap()],
        None,
        "dashboard expressions",
    );
}

#[test]
fn example_configs_in_deploy_pass_check() {
    let dir = deploy("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/config exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        cli_ok(&["check", "-c", path.to_str().unwrap()]);
        checked += 1;
    }
    assert!(
        checked >= 3,
        "deploy/config holds the node examples ({checked} found)"
    );
    // The files the deploy manifests mount exist.
    for (manifest, config) in [
        ("compose.yaml", "config/compose.toml"),
        ("swarm-stack.yml", "config/swarm.toml"),
    ] {
        assert!(deploy(config).is_file(), "{config} is missing");
        let text = read(&deploy(manifest));
        assert!(
            text.contains("network_mode: host") || text.contains("name: host"),
            "{manifest} uses host networking"
        );
    }
    assert!(
        read(&deploy("compose.yaml"))
            .contains("./config/compose.toml:/etc/routemesh/routemesh.toml:ro")
    );
}

#[test]
fn compose_files_are_valid() {
    let Some(compose) = which("docker-compose") else {
        panic!(
            "docker-compose not found: run `bash .ci/run` or `apt-get install -y docker-compose`"
        );
    };
    for file in ["compose.yaml", "swarm-stack.yml"] {
        let mut cmd = Command::new(&compose);
        cmd.arg("-f").arg(deploy(file)).args(["config", "-q"]);
        let out = run_bounded(&mut cmd, None, TOOL_TIMEOUT).expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose config rejects {file}:\n{}",
            output_text(&out)
        );
    }
    let compose = read(&deploy("compose.yaml"));
    let etcd_members = compose.matches("ETCD_NAME: etcd").count();
    assert_eq!(etcd_members, 3, "compose.yaml has a 3-member etcd example");
    let stack = read(&deploy("swarm-stack.yml"));
    assert!(
        stack.contains("mode: global"),
        "swarm stack runs one daemon per node"
    );
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let backend = TcpBackend::start("j");
    let listen = free_addr();
    let mut daemon = Config::static_tasks()
        .listener(Listener::tcp(listen, "s"))
        .task(Task::new("s", backend.addr()))
        .task(Task::new("s", dead_addr()))
        .set("log.format", "json")
        .start();
    daemon.wait_ready();
    // A failed connect logs a warning on the data path.
    for _ in 0..3 {
        let _ = echo_roundtrip(listen, b"x");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
    let log = daemon.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() >= 2,
        "expected start and stop lines, got:\n{log}"
    );
    let mut levels = BTreeSet::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}\nwhole log:\n{log}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        for key in ["timestamp", "level", "fields", "target"] {
            assert!(obj.contains_key(key), "log line lacks {key:?}: {line}");
        }
        levels.insert(obj["level"].as_str().unwrap_or("").to_string());
    }
    assert!(levels.contains("INFO"), "info lines present: {levels:?}");
    assert!(
        log.contains("upstream connect failed"),
        "the dead task's connect failure was logged:\n{log}"
    );
}

#[test]
fn systemd_unit_has_the_required_directives() {
    let path = deploy("systemd/routemesh.service");
    let unit = read(&path);
    let directives: Vec<(String, String)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |k: &str| -> Vec<&str> {
        directives
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |k: &str| -> &str {
        let v = get(k);
        assert_eq!(v.len(), 1, "{k}= appears once in the unit (found {v:?})");
        v[0]
    };
    assert!(one("ExecStart").contains("routemesh run -c "));
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("NoNewPrivileges"), "yes");
    let user = one("User");
    assert!(
        !user.is_empty() && user != "root" && user != "0",
        "runs as non-root: {user}"
    );
    for hardening in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "RestrictAddressFamilies",
    ] {
        assert!(!get(hardening).is_empty(), "{hardening}= is set");
    }
    let stop: u64 = one("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 10,
        "TimeoutStopSec ({stop}s) covers the default drain_timeout (10s)"
    );

    let Some(analyze) = which("systemd-analyze") else {
        panic!("systemd-analyze not found: run `bash .ci/run` or `apt-get install -y systemd`");
    };
    // Verify a copy whose ExecStart points at the binary under test (verify checks that the
    // executables exist).
    let dir = tempdir("systemd-verify");
    let copy = dir.path().join("routemesh.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/routemesh", bin())).unwrap();
    let mut cmd = Command::new(analyze);
    cmd.arg("verify").arg(&copy);
    let out = run_bounded(&mut cmd, None, TOOL_TIMEOUT).expect("run systemd-analyze");
    let text = output_text(&out);
    assert!(
        out.status.success() && !text.contains("routemesh.service"),
        "systemd-analyze verify complains:\n{text}"
    );
}

/// The command of the Dockerfile's `HEALTHCHECK … CMD ["bash", "-c", "…"]`.
fn dockerfile_probe(dockerfile: &str) -> String {
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("Dockerfile has a HEALTHCHECK");
    let json = &line[line.find("CMD [").expect("exec-form CMD") + 4..];
    let argv: Vec<String> = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("HEALTHCHECK CMD is not a JSON array ({e}): {json}"));
    assert_eq!(
        &argv[..2],
        ["bash", "-c"],
        "probe runs under bash: {argv:?}"
    );
    argv[2].clone()
}

#[test]
fn dockerfile_is_multistage_non_root_and_its_healthcheck_probe_works() {
    let text = read(&deploy("Dockerfile"));
    for needle in [
        "ARG BUILDER_IMAGE=",
        "ARG RUNTIME_IMAGE=",
        "FROM ${BUILDER_IMAGE} AS build",
        "FROM ${RUNTIME_IMAGE}",
        "COPY --from=build ",
        "setcap cap_net_bind_service=+ep",
        "/healthz",
    ] {
        assert!(text.contains(needle), "Dockerfile lacks {needle:?}");
    }
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("Dockerfile sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "non-root USER: {user}"
    );

    // Run the probe exactly as Docker would, against a live daemon and a dead port.
    let probe = dockerfile_probe(&text);
    let daemon = Config::static_tasks().start();
    let run_probe = |port: u16| {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &probe])
            .env("ROUTEMESH_ADMIN_PORT", port.to_string())
            .stdout(Stdio::piped());
        run_bounded(&mut cmd, None, Duration::from_secs(10)).expect("run the probe")
    };
    let ok = run_probe(daemon.admin().port());
    assert!(
        ok.status.success(),
        "probe fails on a healthy daemon: {}",
        output_text(&ok)
    );
    let dead = run_probe(dead_addr().port());
    assert!(!dead.status.success(), "probe succeeds on a closed port");
    let _ = std::io::stderr().flush();
}
