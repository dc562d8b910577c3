//! The status page (issue 17) in a real browser: headless Chromium (Debian's `chromium`)
//! driven over its DevTools protocol, against real daemons and a real etcd.
//!
//! - `status_page_follows_a_three_node_cluster`: the page of a 3-daemon cluster loads with
//!   no console error and no failed request, asks nothing of any other origin, lists the
//!   nodes and tasks; a killed backend shows unhealthy within 2 s without a reload; a drain
//!   through the page is refused without the token and done with it, and so is a weight
//!   change (which keeps the task's other fields and its lease); a node without
//!   `token_file` shows no buttons and answers 403; the page reconnects by itself when its
//!   daemon restarts; stopping etcd shows the discovery banner. Screenshots are written
//!   under cargo's integration-test temp dir (paths printed).
//! - `events_stream_sends_changes_only_and_at_most_twice_a_second`: the raw `GET /events`
//!   stream and `GET /` headers, without a browser.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::browser::{Browser, Page, artifact_dir};
use crate::support::{Daemon, Etcd, Etcdctl, TcpBackend, eventually, free_addr, tempdir};

/// One request (`Connection: close`, 10 s bound): status and body text.
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<(u16, String)> {
    crate::support::http::request(addr, method, path, headers, body, Duration::from_secs(10))
        .map(|r| (r.status, r.text()))
}

const TOKEN: &str = "0123456789abcdef-status-page-test-token";
const PREFIX: &str = "/routemesh";

/// One daemon's config: node `n{i}`, a tcp listener for `web`, its backend as task `w{i}`
/// and fast health checks (200 ms, one failure), `token_file` when given.
fn node_toml(
    i: usize,
    etcd: &str,
    admin: SocketAddr,
    listen: SocketAddr,
    backend: SocketAddr,
    token_file: Option<&Path>,
) -> String {
    let token = token_file
        .map(|p| format!("token_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        r#"[node]
name = "n{i}"
advertise = "127.0.0.1"
drain_timeout = "1s"

[discovery]
endpoints = ["{etcd}"]
node_ttl = "2s"
dial_timeout = "1s"

[admin]
listen = "{admin}"
{token}
[[listener]]
name = "web"
listen = "{listen}"
protocol = "tcp"
service = "web"

[service.web.health]
interval = "200ms"
timeout = "300ms"
unhealthy_threshold = 1

[[task]]
service = "web"
addr = "{backend}"
id = "w{i}"
"#
    )
}

/// `expr` as a JS string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// `key state` of each row of a table body, joined by commas.
fn rows(page: &mut Page, tbody: &str, attr: &str) -> String {
    page.eval(&format!(
        "Array.from(document.querySelectorAll({})).map(tr => tr.dataset.key + ' ' + tr.dataset.{attr}).join(',')",
        js(&format!("{tbody} tr"))
    ))
    .as_str()
    .unwrap_or_default()
    .to_string()
}

fn task_state_is(svc_task: &str, state: &str) -> String {
    format!(
        "(document.querySelector({}) || {{dataset: {{}}}}).dataset.state === {}",
        js(&format!("tr[data-key=\"{svc_task}\"]")),
        js(state)
    )
}

/// Clicks `selector`, then the dialog's OK, and waits for the action's outcome message.
fn act_through_page(page: &mut Page, selector: &str) -> (String, String) {
    page.eval("document.getElementById('action-result').dataset.kind = ''; 1");
    let clicked = page.eval(&format!(
        "(() => {{ const b = document.querySelector({}); if (!b) return false; b.click(); return true; }})()",
        js(selector)
    ));
    assert_eq!(clicked, true, "no {selector} on the page");
    page.wait_for(
        "document.getElementById('dlg').open",
        Duration::from_secs(2),
        "the confirmation dialog",
    );
    page.eval("document.getElementById('dlg-ok').click(); 1");
    page.wait_for(
        "['ok', 'error'].includes(document.getElementById('action-result').dataset.kind)",
        Duration::from_secs(10),
        "the action's outcome",
    );
    let kind = page.eval("document.getElementById('action-result').dataset.kind");
    let text = page.eval("document.getElementById('action-result').textContent");
    (
        kind.as_str().unwrap_or_default().to_string(),
        text.as_str().unwrap_or_default().to_string(),
    )
}

fn set_token(page: &mut Page, token: &str) {
    page.eval(&format!(
        "document.getElementById('token').value = {}; 1",
        js(token)
    ));
}

/// The lease (decimal) of `key`, 0 for none.
fn lease_of(etcd: &Etcd, key: &str) -> i64 {
    let out = etcd.etcdctl(&["get", "-w", "json", "--", key]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

#[test]
fn status_page_follows_a_three_node_cluster() {
    let browser = Browser::start();
    let etcd = Etcd::start();
    let dir = tempdir("routemesh-status-page");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let mut backends: Vec<Option<TcpBackend>> = (1..=3)
        .map(|i| Some(TcpBackend::start(&format!("w{i}"))))
        .collect();
    let admins: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let listens: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let bodies: Vec<String> = (0..3)
        .map(|i| {
            node_toml(
                i + 1,
                &etcd.endpoint(),
                admins[i],
                listens[i],
                backends[i].as_ref().expect("backend").addr(),
                (i == 0).then_some(token_file.as_path()),
            )
        })
        .collect();
    let mut daemons: Vec<Daemon> = bodies.iter().map(|b| Daemon::start(b)).collect();
    for d in &mut daemons {
        d.wait_ready();
    }
    eventually(
        Duration::from_secs(15),
        "every node to see 3 Ready nodes and 3 healthy web tasks",
        || {
            daemons.iter().all(|d| {
                let r = d.routes();
                let ready = r["nodes"]
                    .as_array()
                    .is_some_and(|n| n.iter().filter(|n| n["status"] == "Ready").count() == 3);
                let healthy = r["services"][0]["tasks"]
                    .as_array()
                    .is_some_and(|t| t.iter().filter(|t| t["state"] == "healthy").count() == 3);
                ready && healthy
            })
        },
    );

    // The page loads, from its own origin only, with no error.
    let origin = format!("http://{}", admins[0]);
    let mut page = browser.new_page();
    page.goto(&format!("{origin}/"));
    page.wait_for(
        "document.querySelectorAll('#nodes tbody tr').length === 3 && document.querySelectorAll('#services tbody tr').length === 3",
        Duration::from_secs(5),
        "3 nodes and 3 tasks on the page",
    );
    assert_eq!(
        rows(&mut page, "#nodes tbody", "status"),
        "n1 Ready,n2 Ready,n3 Ready"
    );
    page.wait_for(
        &format!(
            "{} && {} && {}",
            task_state_is("web/w1", "healthy"),
            task_state_is("web/w2", "healthy"),
            task_state_is("web/w3", "healthy")
        ),
        Duration::from_secs(5),
        "3 healthy tasks on the page",
    );
    let text = page.eval("document.body.textContent");
    let text = text.as_str().unwrap_or_default();
    for needle in [
        "node n1",
        "discovery: etcd up",
        "Listeners of this node",
        "web",
    ] {
        assert!(text.contains(needle), "{needle:?} not on the page:\n{text}");
    }
    assert_eq!(
        page.eval("document.getElementById('banner').hidden"),
        true,
        "no discovery banner while etcd is up"
    );
    // Rates appear once the page has two samples.
    page.wait_for(
        "document.querySelector('#listeners tbody tr').cells[7].textContent !== '–'",
        Duration::from_secs(5),
        "the listener's connection rate",
    );
    let errors = page.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    let failed = page.failed_requests();
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    let foreign: Vec<String> = page
        .events
        .iter()
        .filter(|e| e["method"] == "Network.requestWillBeSent")
        .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
        .filter(|u| !u.starts_with(&origin) && !u.starts_with("data:"))
        .collect();
    assert!(foreign.is_empty(), "requests to other origins: {foreign:?}");
    let shots = artifact_dir("status_page");
    let shot = shots.join("cluster.png");
    let size = page.screenshot(&shot);
    assert!(size > 20_000, "screenshot of {size} bytes looks empty");
    println!("status page screenshot: {}", shot.display());

    // A killed backend turns unhealthy on the page within 2 s, without a reload.
    page.eval("window.__loadedOnce = performance.timeOrigin; 1");
    backends[1].take().expect("w2").stop();
    let took = page.wait_for(
        &task_state_is("web/w2", "unhealthy"),
        Duration::from_secs(2),
        "w2 unhealthy on the page within 2 s of its backend's death",
    );
    println!(
        "w2 shown unhealthy {:.0} ms after its backend stopped",
        took.as_millis()
    );
    assert_eq!(
        page.eval("window.__loadedOnce === performance.timeOrigin"),
        true,
        "the page was reloaded"
    );
    page.wait_for(
        "Array.from(document.querySelectorAll('#events li')).some(li => li.dataset.subject === 'web/w2' && li.dataset.state === 'unhealthy')",
        Duration::from_secs(2),
        "an event for w2 going unhealthy",
    );

    // A drain through the page: refused without the token, and with a wrong one; done with it.
    let availability = format!("{PREFIX}/nodes/n3/availability");
    let (kind, msg) = act_through_page(&mut page, "tr[data-key=\"n3\"] button[data-action=drain]");
    assert_eq!(kind, "error", "{msg}");
    assert!(msg.contains("401"), "{msg}");
    set_token(&mut page, "not-the-token");
    let (kind, msg) = act_through_page(&mut page, "tr[data-key=\"n3\"] button[data-action=drain]");
    assert_eq!(kind, "error", "{msg}");
    assert!(msg.contains("401"), "{msg}");
    assert_eq!(etcd.get(&availability), None, "a refused drain wrote etcd");
    set_token(&mut page, TOKEN);
    let (kind, msg) = act_through_page(&mut page, "tr[data-key=\"n3\"] button[data-action=drain]");
    assert_eq!(kind, "ok", "{msg}");
    assert_eq!(etcd.get(&availability).as_deref(), Some("drain"));
    page.wait_for(
        "document.querySelector('tr[data-key=\"n3\"]').dataset.availability === 'drain'",
        Duration::from_secs(5),
        "n3 drained on the page",
    );
    page.wait_for(
        &task_state_is("web/w3", "drained"),
        Duration::from_secs(5),
        "w3 drained on the page",
    );
    let (kind, msg) = act_through_page(
        &mut page,
        "tr[data-key=\"n3\"] button[data-action=activate]",
    );
    assert_eq!(kind, "ok", "{msg}");
    assert_eq!(etcd.get(&availability).as_deref(), Some("active"));
    daemons[0].wait_for_log("admin action refused", Duration::from_secs(2));
    daemons[0].wait_for_log("set node n3 availability to drain", Duration::from_secs(2));

    // A weight through the page keeps the task's other fields and its lease.
    let n3_lease = lease_of(&etcd, &format!("{PREFIX}/nodes/n3/alive"));
    assert_ne!(n3_lease, 0, "n3's alive record has no lease");
    let x1 = format!("{PREFIX}/tasks/web/x1");
    let extra = backends[2].as_ref().expect("w3").addr();
    etcd.put_on_lease(
        &x1,
        &format!(r#"{{"addr":"{extra}","node":"n3","owner":"ci-script"}}"#),
        &format!("{n3_lease:x}"),
    );
    page.wait_for(
        "!!document.querySelector('tr[data-key=\"web/x1\"] button[data-action=weight]')",
        Duration::from_secs(5),
        "task x1 with its weight button",
    );
    page.eval("document.getElementById('dlg-weight').value = ''; 1");
    let clicked = page.eval(
        "(() => { document.querySelector('tr[data-key=\"web/x1\"] button[data-action=weight]').click(); document.getElementById('dlg-weight').value = '7'; return true; })()",
    );
    assert_eq!(clicked, true);
    page.eval("document.getElementById('action-result').dataset.kind = ''; document.getElementById('dlg-ok').click(); 1");
    page.wait_for(
        "document.getElementById('action-result').dataset.kind === 'ok'",
        Duration::from_secs(10),
        "the weight change to be done",
    );
    let value: serde_json::Value =
        serde_json::from_str(&etcd.get(&x1).expect("x1 still there")).expect("x1 JSON");
    assert_eq!(
        value,
        serde_json::json!({"addr": extra.to_string(), "node": "n3", "owner": "ci-script", "weight": 7})
    );
    assert_eq!(lease_of(&etcd, &x1), n3_lease, "the task lost its lease");
    page.wait_for(
        "document.querySelector('tr[data-key=\"web/x1\"]').cells[6].textContent === '7'",
        Duration::from_secs(5),
        "weight 7 on the page",
    );

    // Some traffic through n1's listener, then the picture the README shows.
    for _ in 0..20 {
        let _ = crate::support::connect_and_greet(listens[0]);
    }
    page.wait_for(
        "Number(document.querySelector('#listeners tbody tr').cells[7].textContent) > 0",
        Duration::from_secs(5),
        "a non-zero connection rate",
    );
    let shot = shots.join("actions.png");
    page.screenshot(&shot);
    println!(
        "status page screenshot (after the actions): {}",
        shot.display()
    );

    // A node without token_file: no buttons, no token field, and its actions answer 403.
    let mut page2 = browser.new_page();
    page2.goto(&format!("http://{}/", admins[1]));
    page2.wait_for(
        "document.querySelectorAll('#nodes tbody tr').length === 3",
        Duration::from_secs(5),
        "n2's page",
    );
    assert_eq!(
        page2.eval("document.querySelectorAll('button[data-action]').length"),
        0
    );
    assert_eq!(
        page2.eval("document.getElementById('actions-bar').hidden"),
        true
    );
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http_request(
        admins[1],
        "POST",
        "/actions/nodes/n3/availability",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"availability":"drain"}"#),
    )
    .expect("POST to n2");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("token_file"), "{body}");
    assert_eq!(etcd.get(&availability).as_deref(), Some("active"));

    // The daemon restarts: the page reconnects by itself.
    page.eval("window.__before = document.getElementById('summary').textContent; 1");
    let t = daemons[0].terminate();
    assert!(t.success(), "n1 exited {t}");
    page.wait_for(
        "document.getElementById('conn').dataset.state === 'reconnecting'",
        Duration::from_secs(5),
        "the page to notice its daemon stopped",
    );
    daemons[0] = Daemon::start(&bodies[0]);
    page.wait_for(
        "document.getElementById('conn').dataset.state === 'live' && document.getElementById('conn-banner').hidden",
        Duration::from_secs(15),
        "the page to reconnect to the restarted daemon",
    );
    assert_eq!(
        page.eval("window.__loadedOnce === performance.timeOrigin"),
        true,
        "the page was reloaded"
    );
    page.wait_for(
        "document.querySelector('#listeners tbody tr').cells[7].textContent !== '–'",
        Duration::from_secs(5),
        "the rates again after the reconnect",
    );

    // etcd stops: the discovery banner shows.
    let mut etcd = etcd;
    etcd.stop();
    page.wait_for(
        "!document.getElementById('banner').hidden && document.getElementById('banner').dataset.kind === 'down'",
        Duration::from_secs(15),
        "the discovery-down banner",
    );
    let banner = page.eval("document.getElementById('banner').textContent");
    assert!(
        banner
            .as_str()
            .unwrap_or_default()
            .contains("Discovery is DOWN"),
        "{banner}"
    );
    page.wait_for(
        "Array.from(document.querySelectorAll('#events li')).some(li => li.dataset.kind === 'discovery' && li.dataset.state === 'down')",
        Duration::from_secs(2),
        "a discovery-down event",
    );
    let shot = shots.join("discovery-down.png");
    page.screenshot(&shot);
    println!("status page screenshot (etcd stopped): {}", shot.display());
    drop(page2);
    drop(page);
    drop(daemons);
    drop(browser);
}

/// One server-sent event as it arrived.
struct Sse {
    at: Instant,
    text: String,
}

/// Opens `GET /events` on `admin`; returns the response head and a channel of its events
/// (a thread reads and de-chunks the body until the connection closes).
fn open_events(admin: SocketAddr) -> (String, mpsc::Receiver<Sse>) {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: {admin}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = s.read(&mut buf).expect("read head");
        assert!(n > 0, "closed before the head");
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut rest = raw[head_end..].to_vec();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // Chunked transfer coding: SIZE\r\nDATA\r\n …; events end with a blank line.
        let mut body = Vec::new();
        loop {
            while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16)
                    .unwrap_or(0);
                if rest.len() < i + 2 + size + 2 {
                    break;
                }
                body.extend_from_slice(&rest[i + 2..i + 2 + size]);
                rest.drain(..i + 2 + size + 2);
                if size == 0 {
                    return;
                }
                while let Some(end) = body.windows(2).position(|w| w == b"\n\n") {
                    let text = String::from_utf8_lossy(&body[..end]).into_owned();
                    body.drain(..end + 2);
                    if tx
                        .send(Sse {
                            at: Instant::now(),
                            text,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    });
    (head, rx)
}

/// The JSON of a `data:` event, without the fields that change with time alone.
fn stable(e: &Sse) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(e.text.strip_prefix("data: ")?).ok()?;
    let o = v.as_object_mut()?;
    o.remove("generated_ms");
    o.remove("last_sync_age_seconds");
    Some(v)
}

#[test]
fn events_stream_sends_changes_only_and_at_most_twice_a_second() {
    let etcd = Etcd::start();
    let admin = free_addr();
    let mut d = Daemon::start(&format!(
        "[node]\nname = \"solo\"\n[discovery]\nendpoints = [\"{}\"]\nnode_ttl = \"2s\"\n[admin]\nlisten = \"{admin}\"\n",
        etcd.endpoint()
    ));
    d.wait_ready();

    // The page itself: one self-contained document with a strict policy.
    let (status, head_and_body) = {
        let mut s = TcpStream::connect(admin).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        (
            text.split_whitespace().nth(1).unwrap_or("").to_string(),
            text,
        )
    };
    assert_eq!(status, "200");
    let lower = head_and_body.to_ascii_lowercase();
    for header in [
        "content-type: text/html; charset=utf-8",
        "content-security-policy: default-src 'none'; script-src 'sha256-",
        "cache-control: no-store",
        "x-frame-options: deny",
    ] {
        assert!(lower.contains(header), "{header:?} missing");
    }
    let body_len = head_and_body.len() - head_and_body.find("\r\n\r\n").unwrap_or(0);
    assert!(body_len < 150 * 1024, "the page is {body_len} bytes");
    assert!(!head_and_body.contains("https://") && !head_and_body.contains("src=\"http"));

    let (head, rx) = open_events(admin);
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a first event");
    assert_eq!(first.text, "retry: 1000");
    let doc = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the first state");
    let state = stable(&doc).expect("a data event with JSON");
    assert_eq!(state["node"], "solo");
    assert_eq!(state["discovery"]["backend"], "etcd");
    assert!(state["events"].is_array() && state["services"].is_array());

    // A burst of changes: documents keep coming, at most one per 500 ms, each different.
    let mut docs = vec![doc];
    let started = Instant::now();
    for i in 0..25 {
        etcd.put(
            &format!("{PREFIX}/tasks/burst/t{i}"),
            &format!(r#"{{"addr":"127.0.0.1:{}"}}"#, 20000 + i),
        );
    }
    let burst = started.elapsed();
    let settle = Instant::now() + Duration::from_secs(2);
    while let Some(left) = settle.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(e) if e.text.starts_with("data: ") => docs.push(e),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let last = stable(docs.last().expect("docs")).expect("json");
    assert_eq!(
        last["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "burst"))
            .and_then(|s| s["tasks"].as_array())
            .map(Vec::len),
        Some(25),
        "the last document has all 25 tasks"
    );
    let gaps: Vec<u128> = docs
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at).as_millis())
        .collect();
    println!(
        "{} documents for 25 changes over {:.1} s; gaps {gaps:?} ms",
        docs.len(),
        burst.as_secs_f64()
    );
    assert!(docs.len() >= 2, "no document followed the changes");
    assert!(
        (docs.len() as f64) <= (burst.as_secs_f64() + 2.0) / 0.5 + 2.0,
        "{} documents in {:.1} s",
        docs.len(),
        burst.as_secs_f64() + 2.0
    );
    // Arrival times jitter on a busy machine; the server spaces them by 500 ms.
    assert!(gaps.iter().all(|&g| g >= 350), "gaps {gaps:?} ms");
    for w in docs.windows(2) {
        assert_ne!(
            stable(&w[0]),
            stable(&w[1]),
            "a document repeated the previous one"
        );
    }

    // Quiet: nothing is sent unless something changed (comments only keep the stream open).
    let quiet_until = Instant::now() + Duration::from_secs(2);
    let mut prev = stable(docs.last().expect("docs"));
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(e) if e.text.starts_with("data: ") => {
                let s = stable(&e);
                assert_ne!(s, prev, "an unchanged state was sent again");
                prev = s;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }

    // A bounded number of streams: the 65th gets 503 while 64 are open.
    let held: Vec<_> = (0..63).map(|_| open_events(admin)).collect();
    let (status, body) = http_request(admin, "GET", "/events", &[], None).expect("65th stream");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many status pages"), "{body}");
    drop(held);
    drop(rx);
    d.terminate();
}
