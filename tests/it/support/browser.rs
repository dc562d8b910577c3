//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a websocket:
//! what a page does over time (evaluate script, click, wait for the DOM to change), what it
//! logged (console errors, exceptions, failed requests) and screenshots. Everything it starts
//! runs in its own process group and is killed by that group's id on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use crate::support::process::{require_binary, run_bounded, tempdir};

pub const CHROMIUM_HINT: &str =
    "run `bash .ci/install-deps` (or `apt-get install -y chromium`, Debian's package)";

/// How long the browser may take to start and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one DevTools call.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A running headless Chromium with its own profile dir.
pub struct Browser {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Browser {
    pub fn start() -> Browser {
        let bin = require_binary("chromium", CHROMIUM_HINT);
        let dir = tempdir("routemesh-chromium");
        let profile = dir.path().join("profile");
        let log = std::fs::File::create(dir.path().join("chromium.log")).expect("chromium log");
        let child = Command::new(bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-features=Translate,MediaRouter,OptimizationHints",
                "--mute-audio",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            // Its own group, so drop can stop the renderer and helper processes too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromium: {e}; {CHROMIUM_HINT}"));
        let mut b = Browser {
            child,
            dir,
            port: 0,
        };
        // Chromium writes the port it picked to DevToolsActivePort in the profile.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(port) = std::fs::read_to_string(&active)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                b.port = port;
                break;
            }
            if let Ok(Some(status)) = b.child.try_wait() {
                panic!("chromium exited ({status}) at start; log:\n{}", b.log());
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port within {START_TIMEOUT:?}; log:\n{}",
                b.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// Its stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("dbus"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A new tab, attached.
    pub fn new_page(&self) -> Page {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let (status, body) = devtools_http(addr, "PUT", "/json/new?about:blank");
        assert_eq!(status, 200, "DevTools /json/new answered {status}: {body}");
        let target: Value = serde_json::from_str(&body).expect("DevTools target JSON");
        let url = target["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("no webSocketDebuggerUrl in {target}"))
            .to_string();
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect DevTools");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let (ws, _) = tungstenite::client(url.as_str(), stream)
            .unwrap_or_else(|e| panic!("DevTools websocket {url}: {e}"));
        let mut page = Page {
            ws,
            next_id: 0,
            events: Vec::new(),
        };
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            page.call(domain, json!({}));
        }
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group this browser leads (renderers, GPU and network helpers), by its id;
        // procps' kill, as the crate has no unsafe code for kill(2).
        let group = format!("-{}", self.child.id());
        let kill = require_binary("kill", "apt-get install -y procps");
        let _ = run_bounded(
            Command::new(kill).args(["-s", "KILL", "--", &group]),
            None,
            Duration::from_secs(10),
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request to DevTools' HTTP endpoint, which keeps connections open: the body is read
/// by its Content-Length.
fn devtools_http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let fail = |e: std::io::Error| -> ! { panic!("DevTools {method} {path}: {e}") };
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| fail(e));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| fail(e));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap_or_else(|e| fail(e));
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned();
                return (status, body);
            }
        }
        let n = s.read(&mut buf).unwrap_or_else(|e| fail(e));
        assert!(
            n > 0,
            "DevTools closed the connection during {method} {path}"
        );
        raw.extend_from_slice(&buf[..n]);
    }
}

/// One tab.
pub struct Page {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    /// DevTools events received so far (console, network, page…), in order.
    pub events: Vec<Value>,
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

impl Page {
    /// Reads one message if one arrives within the socket's read timeout.
    fn read_one(&mut self) -> Option<Value> {
        match self.ws.read() {
            Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).ok(),
            Ok(_) => None,
            Err(e) if would_block(&e) => None,
            Err(e) => panic!("DevTools websocket failed: {e}"),
        }
    }

    /// Calls `method` and returns its result; panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(msg))
            .unwrap_or_else(|e| panic!("DevTools send {method}: {e}"));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            if let Some(v) = self.read_one() {
                if v["id"].as_u64() == Some(id) {
                    if let Some(err) = v.get("error") {
                        panic!("DevTools {method} failed: {err}");
                    }
                    return v["result"].clone();
                }
                if v.get("method").is_some() {
                    self.events.push(v);
                }
            }
            assert!(
                Instant::now() < deadline,
                "DevTools {method} did not answer within {CALL_TIMEOUT:?}"
            );
        }
    }

    /// Takes in the events that arrived meanwhile.
    pub fn pump(&mut self) {
        while let Some(v) = self.read_one() {
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("page script {expr:?} threw: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Navigates to `url` and waits for its load event.
    pub fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_event("Page.loadEventFired", Duration::from_secs(15));
    }

    fn wait_event(&mut self, method: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let seen = |events: &[Value]| events.iter().any(|e| e["method"] == method);
        while !seen(&self.events) {
            assert!(Instant::now() < deadline, "no {method} within {within:?}");
            self.pump();
        }
    }

    /// Waits until `expr` is truthy in the page (checked every 50 ms, bounded by `within`);
    /// returns how long it took. Panics naming `what` and the last value otherwise.
    pub fn wait_for(&mut self, expr: &str, within: Duration, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let v = self.eval(expr);
            let truthy = match &v {
                Value::Bool(b) => *b,
                Value::Null => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "timed out after {:.1}s waiting for {what} (`{expr}` = {v})",
                start.elapsed().as_secs_f64()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Console errors, uncaught exceptions and error log entries so far, as text.
    pub fn console_errors(&mut self) -> Vec<String> {
        self.pump();
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.consoleAPICalled"
                    if matches!(e["params"]["type"].as_str(), Some("error" | "assert")) =>
                {
                    Some(format!(
                        "console.{}: {}",
                        e["params"]["type"], e["params"]["args"]
                    ))
                }
                "Runtime.exceptionThrown" => {
                    Some(format!("exception: {}", e["params"]["exceptionDetails"]))
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => Some(format!(
                    "log: {} {}",
                    e["params"]["entry"]["text"], e["params"]["entry"]["url"]
                )),
                _ => None,
            })
            .collect()
    }

    /// Requests that failed (network errors) or got a status of 400 or more, as text.
    pub fn failed_requests(&mut self) -> Vec<String> {
        self.pump();
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Network.loadingFailed" => Some(format!(
                    "failed: {} {}",
                    e["params"]["errorText"], e["params"]["requestId"]
                )),
                "Network.responseReceived"
                    if e["params"]["response"]["status"].as_u64().unwrap_or(0) >= 400 =>
                {
                    Some(format!(
                        "{} {}",
                        e["params"]["response"]["status"], e["params"]["response"]["url"]
                    ))
                }
                _ => None,
            })
            .collect()
    }

    /// A PNG of the whole page, written to `path`; returns its size in bytes.
    pub fn screenshot(&mut self, path: &Path) -> usize {
        let r = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, &png).expect("write screenshot");
        png.len()
    }
}

/// Where a test's screenshots go: under cargo's temp dir for integration tests (kept after
/// the run, unlike a TempDir), one directory per test process.
pub fn artifact_dir(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}-{}", std::process::id()))
}
