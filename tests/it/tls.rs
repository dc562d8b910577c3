//! TLS termination on http listeners (certificates made by the openssl CLI per test, curl and
//! openssl s_client as clients, real nginx behind), and listeners without a default route.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::support::http::{parse_response, read_ok};
use crate::support::net::{closed_within, time_to_close};
use crate::support::nginx::Nginx;
use crate::support::pki::Pki;
use crate::support::process::run_bounded;
use crate::support::tls::{TlsConn, TlsServer, curl_https as curl, tls_connect};
use crate::support::{Config, Listener, Task, cli, eventually, free_addr, output_text, tempdir};

// ---------------------------------------------------------------------------------------------
// helpers

/// An HTTP/1.0 GET with `Host: host`; status and body.
fn get_host(addr: SocketAddr, host: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).map(|r| (r.status, r.text()))
}

// ---------------------------------------------------------------------------------------------
// listeners without a default route

#[test]
fn http_listener_without_default_answers_404_for_unknown_hosts() {
    let web = Nginx::start("web");
    let listen = free_addr();
    let d = Config::static_tasks()
        .listener(
            Listener::new(listen, "http")
                .name("web")
                .route(&[("host", "a.example.com"), ("service", "a")]),
        )
        .task(Task::new("a", web.addr()))
        .start();
    let (status, body) = get_host(listen, "a.example.com", "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("name=web"), "{body}");
    let (status, body) = get_host(listen, "other.example.com", "/x").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(
        body.starts_with("404 Not Found: no route for host \"other.example.com\""),
        "{body}"
    );
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics
            .contains(r#"routemesh_http_requests_total{code="404",listener="web",service=""} 1"#),
        "{metrics}"
    );
}

#[test]
fn tls_listener_without_default_closes_unknown_and_missing_sni() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("a", "a.example.com", &["DNS:a.example.com"]);
    let a = TlsServer::start(&cert, &key);
    let listen = free_addr();
    let d = Config::static_tasks()
        .listener(
            Listener::new(listen, "tls")
                .name("sni")
                .route(&[("sni", "a.example.com"), ("service", "a")]),
        )
        .task(Task::new("a", a.addr))
        .start();
    let ca = pki.ca();
    let body = curl(listen, "a.example.com", "/", &ca, &[]).unwrap();
    assert!(body.contains("Ciphers"), "{body}");

    // Unknown name: closed before any task sees it.
    let before = d.rejected("sni", "tls_no_route");
    let err = curl(listen, "b.example.com", "/", &ca, &[]).unwrap_err();
    assert!(!err.is_empty());
    // No SNI at all (curl sends none for an IP address).
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-k"])
        .arg(format!("https://127.0.0.1:{}/", listen.port()));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(10)).unwrap();
    assert!(
        !out.status.success(),
        "a ClientHello without SNI is refused"
    );
    eventually(Duration::from_secs(3), "both counted", || {
        d.rejected("sni", "tls_no_route") >= before + 2
    });
    // A raw ClientHello without SNI gets nothing back: the connection just closes.
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(&client_hello_without_sni()).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)));
}

/// A minimal TLS 1.2 ClientHello with no extensions.
fn client_hello_without_sni() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2f]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

// ---------------------------------------------------------------------------------------------
// TLS termination on http listeners

/// An https listener `https` in front of nginx `web`, with the certificate `a` (default,
/// a.example.com) and `b` (*.b.example.com) of `pki`.
fn terminating_config(listen: SocketAddr, pki: &Pki, web: SocketAddr) -> Config {
    let file = |name: &str| pki.dir().join(name).display().to_string();
    Config::static_tasks()
        .listener(
            Listener::http(listen, "web")
                .name("https")
                .set("handshake_timeout", "700ms")
                .tls_cert(&[("cert", &file("a.pem")), ("key", &file("a-key.pem"))])
                .tls_cert(&[
                    ("sni", "*.b.example.com"),
                    ("cert", &file("b.pem")),
                    ("key", &file("b-key.pem")),
                ]),
        )
        .task(Task::new("web", web))
}

fn issue_ab(pki: &Pki) {
    pki.issue("a", "a.example.com", &["DNS:a.example.com"]);
    pki.issue("b", "*.b.example.com", &["DNS:*.b.example.com"]);
}

/// The `key=value` line `key` of an nginx echo body.
fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn terminates_tls_by_sni_over_http1_and_h2_and_forwards_https() {
    let pki = Pki::new();
    issue_ab(&pki);
    let web = Nginx::start("web");
    let listen = free_addr();
    let d = terminating_config(listen, &pki, web.addr()).start();
    let ca = pki.ca();
    let version = ["-w", "version=%{http_version}\n"];

    // HTTP/1.1 with the default certificate.
    let body = curl(
        listen,
        "a.example.com",
        "/one",
        &ca,
        &[&["--http1.1"][..], &version].concat(),
    )
    .unwrap();
    assert_eq!(field(&body, "name"), Some("web"), "{body}");
    assert_eq!(field(&body, "xfp"), Some("https"), "{body}");
    assert!(
        field(&body, "forwarded").is_some_and(|f| f.contains("proto=https")),
        "{body}"
    );
    assert_eq!(
        field(&body, "host"),
        Some(&*format!("a.example.com:{}", listen.port())),
        "{body}"
    );
    assert_eq!(field(&body, "version"), Some("1.1"), "{body}");
    // HTTP/2 (ALPN h2) with the wildcard certificate picked by SNI: verification against the
    // name proves which certificate was sent.
    let body = curl(
        listen,
        "x.b.example.com",
        "/two",
        &ca,
        &[&["--http2"][..], &version].concat(),
    )
    .unwrap();
    assert_eq!(field(&body, "xfp"), Some("https"), "{body}");
    assert_eq!(field(&body, "uri"), Some("/two"), "{body}");
    assert_eq!(field(&body, "version"), Some("2"), "{body}");
    // A name no certificate covers gets the default one, which does not match it.
    let err = curl(listen, "c.example.com", "/", &ca, &[]).unwrap_err();
    assert!(err.contains("certificate") || err.contains("SSL"), "{err}");
    // The plain-text port is not TLS: a plain HTTP request gets no HTTP answer.
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains(
            r#"routemesh_http_requests_total{code="200",listener="https",service="web"} 2"#
        ),
        "{metrics}"
    );
}

/// `openssl s_client` with `args` against `addr`; whether the handshake succeeded.
fn s_client(addr: SocketAddr, args: &[&str]) -> bool {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-servername", "a.example.com"])
        .args(args);
    let out = run_bounded(&mut cmd, Some(b"".as_slice()), Duration::from_secs(10)).unwrap();
    out.status.success()
}

#[test]
fn tls_versions_handshake_timeout_and_garbage() {
    let pki = Pki::new();
    issue_ab(&pki);
    let web = Nginx::start("web");
    let listen = free_addr();
    let d = terminating_config(listen, &pki, web.addr()).start();

    // TLS 1.2 and 1.3 only. SECLEVEL=0 lets this client offer TLS 1.1 at all, so the refusal
    // is the daemon's.
    assert!(s_client(listen, &["-tls1_3"]));
    assert!(s_client(listen, &["-tls1_2"]));
    let before = d.rejected("https", "tls_handshake_error");
    assert!(!s_client(
        listen,
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]
    ));
    assert!(!s_client(
        listen,
        &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]
    ));
    eventually(
        Duration::from_secs(3),
        "TLS 1.1 and 1.0 refused by the daemon",
        || d.rejected("https", "tls_handshake_error") >= before + 2,
    );

    // Garbage instead of a ClientHello: closed (after at most an alert), counted.
    let before = d.rejected("https", "tls_handshake_error");
    let mut s = TcpStream::connect(listen).unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00garbage")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    let _ = s.read_to_end(&mut got);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        got.len() < 16 && got.first().is_none_or(|b| *b == 0x15),
        "at most an alert: {got:?}"
    );
    eventually(Duration::from_secs(3), "garbage counted", || {
        d.rejected("https", "tls_handshake_error") > before
    });

    // Silent, and a ClientHello cut short: closed at handshake_timeout (700ms).
    for prefix in [&b""[..], b"\x16\x03\x01\x01\x00\x01\x00\x00\xfc\x03\x03"] {
        let mut s = TcpStream::connect(listen).unwrap();
        s.write_all(prefix).unwrap();
        let e = time_to_close(&mut s, Duration::from_secs(5));
        assert!(
            e >= Duration::from_millis(600) && e < Duration::from_secs(3),
            "{e:?}"
        );
    }
    assert!(d.rejected("https", "tls_timeout") >= 2);
    // Still serving.
    assert!(s_client(listen, &["-tls1_3"]));
}

/// A blocking rustls client trusting `ca`, offering HTTP/1.1 only, never resuming.
fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut cfg = crate::support::tls::client_config(ca, &[b"http/1.1"]);
    // A resumed session shows the certificate of the session it resumes: always a full
    // handshake, so each connection shows what the daemon serves now.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// The leaf certificate the server sent.
fn peer_cert(s: &TlsConn) -> Vec<u8> {
    s.conn.peer_certificates().unwrap()[0].to_vec()
}

fn leaf_on_disk(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// One keep-alive GET on `s`; the body of its 200.
fn keepalive_get(s: &mut TlsConn, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.example.com\r\n\r\n").as_bytes())
        .unwrap();
    s.flush().unwrap();
    read_ok(s)
}

#[test]
fn certificates_reload_on_sighup_without_dropping_connections() {
    let pki = Pki::new();
    issue_ab(&pki);
    let web = Nginx::start("web");
    let listen = free_addr();
    let mut d = terminating_config(listen, &pki, web.addr()).start();
    let cfg = client_config(&pki.ca());
    let a_pem = pki.dir().join("a.pem");
    let old = leaf_on_disk(&a_pem);

    let mut open = tls_connect(listen, "a.example.com", &cfg);
    assert_eq!(peer_cert(&open), old);
    assert!(keepalive_get(&mut open, "/before").contains("xfp=https"));

    // New certificate and key on disk; the config text does not change.
    pki.issue("a", "a.example.com", &["DNS:a.example.com"]);
    let new = leaf_on_disk(&a_pem);
    assert_ne!(new, old);
    // Start-up logs "TLS certificates reloaded" too: wait for the line this SIGHUP prints.
    let mark = d.log_mark();
    d.signal(libc::SIGHUP);
    d.wait_for_log_since(mark, "config reloaded", Duration::from_secs(10));
    let fresh = tls_connect(listen, "a.example.com", &cfg);
    assert_eq!(
        peer_cert(&fresh),
        new,
        "new connections see the new certificate"
    );
    // The connection opened before the reload keeps working.
    assert!(keepalive_get(&mut open, "/after").contains("uri=/after"));

    // A broken file refuses the reload whole: the last good certificate stays.
    std::fs::write(&a_pem, "not a certificate\n").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for_log("config reload refused", Duration::from_secs(10));
    assert!(d.log().contains("a.pem"), "{}", d.log_tail(20));
    let mut again = tls_connect(listen, "a.example.com", &cfg);
    assert_eq!(peer_cert(&again), new);
    assert!(keepalive_get(&mut again, "/still").contains("uri=/still"));
    assert!(keepalive_get(&mut open, "/open").contains("uri=/open"));
    // SIGTERM: idle keep-alive connections and the one that never sent a request close at
    // once instead of holding the drain.
    let t = Instant::now();
    assert!(d.terminate().success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(fresh);
}

#[test]
fn check_reports_unusable_certificates_with_positions() {
    let pki = Pki::new();
    issue_ab(&pki);
    let dir = tempdir("tls-check");
    let path = dir.path().join("routemesh.toml");
    let d = pki.dir().display();
    std::fs::write(
        &path,
        format!(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\nprotocol = \"http\"\nservice = \"w\"\ntls = {{ cert = \"{d}/a.pem\", key = \"{d}/b-key.pem\" }}\n"
        ),
    )
    .unwrap();
    let out = cli(&["check", "-c", path.to_str().unwrap()]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let col = "tls = { cert = \"\", key = ".len() + d.to_string().len() + "/a.pem".len() + 1;
    assert!(
        text.contains(&format!("routemesh.toml:5:{col}: "))
            && text.contains("does not match the certificate"),
        "{text}"
    );
}
