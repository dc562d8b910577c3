//! `routemesh check` and `run` on bad config: every error as FILE:LINE:COL with how to fix
//! it, exit 2, nothing bound. And the static default that README's first command runs.

use std::path::PathBuf;

use crate::support::{
    Config, Listener, Task, TcpBackend, cli, dead_addr, free_addr, hello, output_text, tempdir,
};

fn write(dir: &tempfile::TempDir, body: &str) -> PathBuf {
    let p = dir.path().join("routemesh.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// Runs check on `body`, expects exit 2, returns stderr lines.
fn check_fails(body: &str) -> Vec<String> {
    let dir = tempdir("check");
    let p = write(&dir, body);
    let out = cli(&["check", "-c", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{body}\n{}", output_text(&out));
    let err = String::from_utf8(out.stderr).unwrap();
    let prefix = format!("{}:", p.display());
    let lines: Vec<String> = err.lines().map(|l| l.to_string()).collect();
    for l in &lines {
        assert!(l.starts_with(&prefix), "{l}");
    }
    lines
        .into_iter()
        .map(|l| l[prefix.len()..].to_string())
        .collect()
}

/// Asserts exactly one error at `line:col` mentioning `needle`.
fn one_error(body: &str, line: usize, col: usize, needle: &str) {
    let errs = check_fails(body);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&format!("{line}:{col}: ")),
        "expected {line}:{col}: {errs:?}"
    );
    assert!(errs[0].contains(needle), "{needle:?} in {errs:?}");
}

#[test]
fn each_error_path_is_positioned_and_explained() {
    one_error("[node]\nnmae = \"x\"\n", 2, 1, "unknown key `node.nmae`");
    one_error("[nodes]\n", 1, 2, "unknown key `nodes`");
    one_error("[node]\nname = \"a b\"\n", 2, 8, "node name");
    one_error("[node]\nadvertise = \"host\"\n", 2, 13, "not an IP address");
    one_error("[node]\ndrain_timeout = \"soon\"\n", 2, 17, "\"500ms\"");
    one_error(
        "[discovery]\nbackend = \"zk\"\n",
        2,
        11,
        "\"etcd\", \"static\"",
    );
    one_error(
        "[discovery]\nendpoints = [\"127.0.0.1:2379\"]\n",
        2,
        14,
        "http://HOST:PORT",
    );
    one_error("[discovery]\nendpoints = []\n", 2, 13, "empty");
    one_error(
        "[discovery]\nprefix = \"routemesh\"\n",
        2,
        10,
        "absolute key prefix",
    );
    one_error(
        "[discovery]\nnode_ttl = \"1500ms\"\n",
        2,
        12,
        "whole number of seconds",
    );
    one_error(
        "[discovery]\nnode_ttl = \"0s\"\n",
        2,
        12,
        "greater than zero",
    );
    one_error("[admin]\nlisten = \"localhost\"\n", 2, 10, "IP:PORT");
    one_error("[[listener]]\nservice = \"web\"\n", 1, 1, "needs `listen`");
    one_error(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\n",
        1,
        1,
        "needs `service`",
    );
    one_error(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\nservice = \"w\"\nprotocol = \"sctp\"\n",
        4,
        12,
        "\"tls\", \"udp\"",
    );
    one_error(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\nservice = \"w\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\nservice = \"v\"\n",
        5,
        10,
        "two listeners bind",
    );
    one_error(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\nservice = \"w\"\n[[listener.route]]\nservice = \"x\"\n",
        4,
        1,
        "only for protocol = \"http\"",
    );
    one_error(
        "[service.web]\nbalance = \"random\"\n",
        2,
        11,
        "\"round_robin\"",
    );
    one_error("[service.web]\nretries = 500\n", 2, 11, "from 0 to 100");
    one_error("[service.web]\nretries = \"two\"\n", 2, 11, "invalid type");
    one_error("[service.\"a/b\"]\n", 1, 1, "service name");
    one_error(
        "[[task]]\naddr = \"127.0.0.1:1\"\n",
        1,
        1,
        "needs `service`",
    );
    one_error(
        "[[task]]\nservice = \"w\"\naddr = \"127.0.0.1\"\n",
        3,
        8,
        "IP:PORT",
    );
    one_error(
        "[[task]]\nservice = \"w\"\naddr = \"127.0.0.1:1\"\nweight = 5000\n",
        4,
        10,
        "0 to 1000",
    );
    one_error(
        "[[task]]\nservice = \"w\"\naddr = \"127.0.0.1:1\"\nid = \"x\"\n[[task]]\nservice = \"w\"\naddr = \"127.0.0.1:2\"\nid = \"x\"\n",
        8,
        6,
        "defined twice",
    );
    one_error("[http]\nmax_headers = 0\n", 2, 15, "from 1 to");
    one_error("[log]\nformat = \"xml\"\n", 2, 10, "\"text\", \"json\"");
    one_error("[runtime]\nworker_threads = 0\n", 2, 18, "from 1 to");
    one_error("[node\n", 1, 6, "invalid TOML");
}

#[test]
fn all_errors_are_reported_at_once() {
    let errs = check_fails(
        "[node]\nname = \"ok\"\ncolour = 1\n[discovery]\nnode_ttl = \"x\"\n[[listener]]\nlisten = \"bad\"\nservice = \"w\"\n[[task]]\nservice = \"w\"\naddr = \"nope\"\n",
    );
    assert_eq!(errs.len(), 4, "{errs:?}");
    let positions: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
    assert_eq!(positions, ["3:1", "5:12", "7:10", "11:8"]);
}

#[test]
fn unreadable_file_and_run_refuse_bad_config() {
    let out = cli(&["check", "-c", "/nonexistent/routemesh.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(output_text(&out).contains("cannot read the config file"));

    // `run` validates fully before binding anything.
    let dir = tempdir("run");
    let listen = free_addr();
    let p = write(
        &dir,
        &format!("[[listener]]\nlisten = \"{listen}\"\nservice = \"w\"\n[node]\nbogus = 1\n"),
    );
    let out = cli(&["run", "-c", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains(":5:1: unknown key `node.bogus`"));
    assert!(
        std::net::TcpStream::connect(listen).is_err(),
        "nothing was bound"
    );
}

#[test]
fn example_config_checks_and_summarises() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let out = cli(&["check", "-c", example]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("ok"), "{text}");
}

#[test]
fn static_backend_serves_without_etcd() {
    let backend = TcpBackend::start("static-task");
    let listen = free_addr();
    // Endpoints of an etcd that is not there: the static backend never dials them.
    let mut d = Config::static_tasks()
        .set(
            "discovery.endpoints",
            vec![format!("http://{}", dead_addr())],
        )
        .listener(Listener::tcp(listen, "w"))
        .task(Task::new("w", backend.addr()))
        .start();
    d.wait_ready();
    assert_eq!(hello(listen).unwrap(), "static-task");
    assert!(d.terminate().success());
}
