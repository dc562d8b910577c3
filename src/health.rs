//! Active health checks: every node checks the tasks of the services it serves (a TCP connect,
//! or an HTTP GET with an expected status range), with jittered start times and hysteresis
//! (`unhealthy_threshold` failures to go down, `healthy_threshold` passes to come back).
//! Results go into each task's shared `TaskState`, which the balancers read; a passing check
//! also ends a passive ejection. Owns no routing state: it follows the published snapshot.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{HealthKind, HealthSettings, ServiceName, TaskId};
use crate::metrics::Metrics;
use crate::snapshot::{Health, SharedSnapshot, Snapshot, TaskState};
use crate::util::net::dial;

/// How often the supervisor looks for a new snapshot.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Checks `addr` once.
pub async fn check_once(addr: SocketAddr, hs: &HealthSettings) -> Result<(), String> {
    let mut stream = dial(addr, hs.timeout)
        .await
        .map_err(|e| format!("health check: connect: {e}"))?;
    if hs.kind == HealthKind::Tcp {
        return Ok(());
    }
    let exchange = async {
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: routemesh-health/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            hs.path,
            env!("CARGO_PKG_VERSION")
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = [0u8; 64];
        let mut got = 0;
        // The status line is all we need: "HTTP/1.1 200 ...".
        while got < 12 {
            let n = stream.read(&mut buf[got..]).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok::<_, std::io::Error>(buf[..got].to_vec())
    };
    let head = tokio::time::timeout(hs.timeout, exchange)
        .await
        .map_err(|_| format!("health check: no response within {:?}", hs.timeout))?
        .map_err(|e| format!("health check: {e}"))?;
    let status =
        parse_status(&head).ok_or_else(|| "health check: not an HTTP response".to_string())?;
    if (hs.expect_status.0..=hs.expect_status.1).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "health check: {} answered {status}, expected {}-{}",
            hs.path, hs.expect_status.0, hs.expect_status.1
        ))
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    if !text.starts_with("HTTP/1.") || text.as_bytes()[8] != b' ' {
        return None;
    }
    text[9..12].parse().ok()
}

/// Hysteresis over consecutive results; pure, so it is unit-tested.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    passes: u32,
    fails: u32,
}

impl Streak {
    /// Records a result; returns the new health when it changes.
    pub fn record(&mut self, ok: bool, current: Health, hs: &HealthSettings) -> Option<Health> {
        self.step(ok, current, hs.unhealthy_threshold, hs.healthy_threshold)
    }

    /// `record` with explicit thresholds: `down_after` consecutive failures make the state
    /// Unhealthy, `up_after` consecutive passes Healthy.
    pub fn step(
        &mut self,
        ok: bool,
        current: Health,
        down_after: u32,
        up_after: u32,
    ) -> Option<Health> {
        if ok {
            self.passes += 1;
            self.fails = 0;
            (current != Health::Healthy && self.passes >= up_after).then_some(Health::Healthy)
        } else {
            self.fails += 1;
            self.passes = 0;
            (current != Health::Unhealthy && self.fails >= down_after).then_some(Health::Unhealthy)
        }
    }
}

async fn check_loop(
    service: ServiceName,
    task: TaskId,
    addr: SocketAddr,
    state: Arc<TaskState>,
    hs: HealthSettings,
    metrics: Arc<Metrics>,
) {
    // Jittered start: nodes and tasks do not check in lockstep.
    let jitter = hs.interval.mul_f64(fastrand::f64());
    tokio::time::sleep(jitter).await;
    let mut streak = Streak::default();
    let mut ticker = tokio::time::interval(hs.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = check_once(addr, &hs).await;
        let ok = result.is_ok();
        metrics
            .health_checks_total
            .with_label_values(&[service.as_str(), if ok { "pass" } else { "fail" }])
            .inc();
        let change = streak.record(ok, state.health(), &hs);
        match (&result, change) {
            (Ok(()), Some(h)) => {
                if state.health() == Health::Unhealthy {
                    tracing::info!(service = %service, task = %task, %addr, "task healthy again");
                }
                state.set_health(h);
                state.set_error(None);
            }
            (Err(why), Some(h)) => {
                tracing::warn!(service = %service, task = %task, %addr, reason = %why, "task unhealthy");
                state.set_health(h);
                state.set_error(Some(why.clone()));
            }
            _ => {}
        }
        if ok {
            // A passing active check ends a passive ejection.
            state.succeed();
        }
    }
}

type Key = (ServiceName, TaskId, SocketAddr);

struct Running {
    settings: HealthSettings,
    state: Arc<TaskState>,
    handle: JoinHandle<()>,
}

/// The checks this node should run for `snap`: tasks of the served services whose node is
/// not Down.
fn desired(
    snap: &Snapshot,
    served: &BTreeSet<ServiceName>,
) -> HashMap<Key, (HealthSettings, Arc<TaskState>)> {
    let mut out = HashMap::new();
    for name in served {
        let Some(svc) = snap.services.get(name) else {
            continue;
        };
        for t in &svc.tasks {
            if t.node_ready {
                out.insert(
                    (name.clone(), t.id.clone(), t.addr),
                    (svc.settings.health.clone(), t.state.clone()),
                );
            }
        }
    }
    out
}

/// Runs checks for the services in `served` until `shutdown`, following snapshot changes.
pub async fn run(
    snapshot: SharedSnapshot,
    mut served: watch::Receiver<Arc<BTreeSet<ServiceName>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<Key, Running> = HashMap::new();
    let mut last: Option<Arc<Snapshot>> = None;
    let mut last_served: Option<Arc<BTreeSet<ServiceName>>> = None;
    loop {
        let snap = snapshot.load_full();
        let serving = served.borrow_and_update().clone();
        let changed = !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &snap))
            || !last_served
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &serving));
        if changed {
            let want = desired(&snap, &serving);
            running.retain(|key, r| {
                let keep = want
                    .get(key)
                    .is_some_and(|(s, st)| *s == r.settings && Arc::ptr_eq(st, &r.state));
                if !keep {
                    r.handle.abort();
                }
                keep
            });
            for (key, (settings, state)) in want {
                if running.contains_key(&key) {
                    continue;
                }
                let handle = tokio::spawn(check_loop(
                    key.0.clone(),
                    key.1.clone(),
                    key.2,
                    state.clone(),
                    settings.clone(),
                    metrics.clone(),
                ));
                running.insert(
                    key,
                    Running {
                        settings,
                        state,
                        handle,
                    },
                );
            }
            last = Some(snap);
            last_served = Some(serving);
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = served.changed() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    for (_, r) in running {
        r.handle.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.0 503 x"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0-Open"), None);
        assert_eq!(parse_status(b"HTTP/1.1"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2x0 x"), None);
    }

    #[test]
    fn hysteresis() {
        let hs = HealthSettings {
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            ..HealthSettings::default()
        };
        let mut s = Streak::default();
        // Two failures make it unhealthy (a success in between resets the streak), two
        // successes healthy again, and a transition is reported once.
        let probes = [false, true, false, false, false, true, true];
        let (sick, well) = (Some(Health::Unhealthy), Some(Health::Healthy));
        let want = [None, None, None, sick, None, None, well];
        let mut now = Health::Unknown;
        for (i, (ok, want)) in probes.into_iter().zip(want).enumerate() {
            let got = s.record(ok, now, &hs);
            assert_eq!(got, want, "step {i}: probe ok = {ok}, health {now:?}");
            now = got.unwrap_or(now);
        }
    }

    #[tokio::test]
    async fn tcp_and_http_checks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                n += 1;
                let code = if n % 2 == 1 { 200 } else { 500 };
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let tcp = HealthSettings::default();
        assert!(check_once(addr, &tcp).await.is_ok());
        let http = HealthSettings {
            kind: HealthKind::Http,
            ..HealthSettings::default()
        };
        // First accepted connection above was the TCP check (answered 200, ignored).
        let r = check_once(addr, &http).await;
        assert!(r.as_ref().is_err_and(|e| e.contains("500")), "{r:?}");
        assert!(check_once(addr, &http).await.is_ok());
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(check_once(dead, &tcp).await.is_err());
    }
}
