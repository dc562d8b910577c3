//! Errors about etcd, from the CLI and the daemon: one short line naming the endpoint, the
//! cause in plain words and the fix; the full error chain only under `RUST_LOG=debug`.
//! Each cause is produced for real: nothing listening, a port that never answers, TLS
//! against a member with another CA, and etcd's own authentication.

use std::fs;
use std::time::Duration;

use crate::support::etcd::Security;
use crate::support::net::tcp_listener;
use crate::support::pki::Pki;
use crate::support::process::run_bounded;
use crate::support::{Daemon, Etcd, bin, cli, dead_addr, output_text, tempdir};

const CLI_FIX: [&str; 3] = ["--etcd URL", "ROUTEMESH_ETCD", "-c FILE"];

/// Runs a cluster command that must fail; returns its one stderr line.
fn one_line_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_bounded(
        std::process::Command::new(bin())
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied()),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "{args:?} should fail: {}",
        output_text(&out)
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let line = err.trim().to_string();
    assert!(line.starts_with("error: "), "{line}");
    assert!(line.len() <= 200, "short ({} chars): {line}", line.len());
    for noise in ["grpc", "tonic", "Status {", "source:", "Os {"] {
        assert!(!line.contains(noise), "no debug dump ({noise}): {line}");
    }
    line
}

#[test]
fn connection_refused_names_the_endpoint_and_the_flags() {
    let dead = format!("http://{}", dead_addr());
    let line = one_line_error(&["node", "ls", "--etcd", &dead], &[]);
    assert!(line.contains(&dead), "{line}");
    assert!(line.contains("connection refused"), "{line}");
    for fix in CLI_FIX {
        assert!(line.contains(fix), "names {fix}: {line}");
    }
    // The environment variable selects the cluster just as --etcd does.
    let line = one_line_error(&["service", "ls"], &[("ROUTEMESH_ETCD", &dead)]);
    assert!(
        line.contains(&dead) && line.contains("connection refused"),
        "{line}"
    );
}

#[test]
fn a_port_that_never_answers_is_timed_out() {
    // Accepts TCP (the kernel does) but never speaks HTTP/2.
    let silent = tcp_listener();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let line = one_line_error(&["node", "ls", "--etcd", &url], &[]);
    assert!(line.contains(&url) && line.contains("timed out"), "{line}");
    for fix in CLI_FIX {
        assert!(line.contains(fix), "names {fix}: {line}");
    }
}

#[test]
fn tls_failures_say_tls_and_point_at_the_tls_settings() {
    let etcd = Etcd::start_secure(Security::Mtls);
    let other_ca = Pki::new();
    let (cert, key) = etcd.pki().issue("cli", "cli", &[]);
    let dir = tempdir("etcd-errors-tls");
    let cfg = dir.path().join("wrong-ca.toml");
    fs::write(
        &cfg,
        format!(
            "[discovery]\nendpoints = [\"{}\"]\ntls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            etcd.endpoint(),
            other_ca.ca().display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let line = one_line_error(&["node", "ls", "-c", cfg.to_str().unwrap()], &[]);
    assert!(line.contains(&etcd.endpoint()), "{line}");
    assert!(line.contains("TLS"), "{line}");
    assert!(line.contains("[discovery] tls"), "{line}");

    // A plain-text member behind an https:// URL.
    let plain = Etcd::start();
    let https = plain.endpoint().replace("http://", "https://");
    let line = one_line_error(&["node", "ls", "--etcd", &https], &[]);
    assert!(line.contains(&https) && line.contains("TLS"), "{line}");
}

#[test]
fn refused_credentials_are_permission_denied() {
    let etcd = Etcd::start_secure(Security::Auth {
        token_ttl_secs: 300,
        user: "rm".into(),
        password: "right".into(),
        prefix: "/routemesh".into(),
    });
    let dir = tempdir("etcd-errors-auth");
    let cfg = dir.path().join("wrong-password.toml");
    fs::write(
        &cfg,
        format!(
            "[discovery]\nendpoints = [\"{}\"]\nusername = \"rm\"\npassword = \"wrong\"\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let line = one_line_error(&["service", "ls", "-c", cfg.to_str().unwrap()], &[]);
    assert!(line.contains(&etcd.endpoint()), "{line}");
    assert!(line.contains("permission denied"), "{line}");
    assert!(line.contains("username and password"), "{line}");
}

#[test]
fn the_full_chain_is_shown_only_under_rust_log_debug() {
    let dead = format!("http://{}", dead_addr());
    let out = cli(&["node", "ls", "--etcd", &dead]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    let out = run_bounded(
        std::process::Command::new(bin())
            .args(["node", "ls", "--etcd", &dead])
            .env("RUST_LOG", "debug"),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() > 1, "{err}");
    assert!(err.contains("tcp connect error"), "the chain: {err}");
    assert!(err.lines().last().unwrap().starts_with("error: "), "{err}");
}

#[test]
fn the_daemon_warns_in_one_line_with_the_endpoint_cause_and_fix() {
    let dead = format!("http://{}", dead_addr());
    let d = Daemon::start(&format!(
        "[node]\nname = \"lonely\"\n[discovery]\nendpoints = [\"{dead}\"]\n"
    ));
    d.wait_for_log("discovery interrupted", Duration::from_secs(20));
    d.wait_for_log("node lease keeper interrupted", Duration::from_secs(20));
    let log = d.log();
    for line in log.lines().filter(|l| l.contains("interrupted")) {
        assert!(line.contains(&dead), "{line}");
        assert!(line.contains("connection refused"), "{line}");
        assert!(line.contains("[discovery] endpoints"), "{line}");
        assert!(!line.contains("tonic") && !line.contains("Os {"), "{line}");
    }
}
