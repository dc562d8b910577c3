//! A steady load generator: one thread per target, one probe (by default an HTTP `GET /`)
//! every interval, each outcome recorded as a [`Sample`] the test can look at while the load
//! runs (to wait until it has run through a phase) and after it stopped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::http;
use super::wait::eventually;

/// One probe of a [`Load`].
#[derive(Clone, Debug)]
pub struct Sample {
    /// Which address it was sent to.
    pub target: SocketAddr,
    /// When it started, since the load started.
    pub at: Duration,
    /// How long until it completed or failed.
    pub latency: Duration,
    /// The answer (the body of a 200), or why it failed (error, or another status).
    pub outcome: Result<String, String>,
}

/// What one probe of a target does: its answer, or why it failed.
pub type Probe = Arc<dyn Fn(SocketAddr) -> Result<String, String> + Send + Sync>;

/// Steady probes: one thread per target, one probe every `interval`, until stopped (or
/// `max_duration`, whichever comes first). Dropping it stops it too.
pub struct Load {
    stop: Arc<AtomicBool>,
    start: Instant,
    targets: Vec<SocketAddr>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// `GET /` to every target, each bounded by `timeout`; a 200's body is the answer.
    pub fn start(
        targets: &[SocketAddr],
        interval: Duration,
        timeout: Duration,
        max_duration: Duration,
    ) -> Load {
        let get: Probe = Arc::new(move |target| match http::get_within(target, "/", timeout) {
            Ok((200, body)) => Ok(body),
            Ok((status, body)) => Err(format!("status {status}: {body:?}")),
            Err(e) => Err(e),
        });
        Load::with_probe(targets, interval, max_duration, get)
    }

    /// Any probe, e.g. a TCP connection that reads a backend's greeting.
    pub fn with_probe(
        targets: &[SocketAddr],
        interval: Duration,
        max_duration: Duration,
        probe: Probe,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let threads = targets
            .iter()
            .map(|&target| {
                let (stop, samples, probe) = (stop.clone(), samples.clone(), probe.clone());
                thread::spawn(move || {
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < max_duration {
                        let t0 = Instant::now();
                        let outcome = probe(target);
                        let sample = Sample {
                            target,
                            at: t0 - start,
                            latency: t0.elapsed(),
                            outcome,
                        };
                        samples.lock().unwrap().push(sample);
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            start,
            targets: targets.to_vec(),
            samples,
            threads,
        }
    }

    /// Time since the load started (to relate events to [`Sample::at`]).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The samples so far, in the order they completed.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Waits (≤ `within`) until every target has completed `n` more probes that started
    /// from now on: the load has run through this point of the test.
    pub fn run_through(&self, n: usize, within: Duration) {
        let from = self.elapsed();
        eventually(
            within,
            &format!("{n} more probes to each target of the load"),
            || {
                let samples = self.samples();
                let done = |t: &SocketAddr| {
                    samples
                        .iter()
                        .filter(|s| s.target == *t && s.at >= from)
                        .count()
                };
                self.targets.iter().all(|t| done(t) >= n)
            },
        );
    }

    /// Stop and collect every sample, ordered by start time.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("load thread panicked");
        }
        let mut all = self.samples();
        all.sort_by_key(|s| s.at);
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A readable list of the failed samples (for assert messages).
pub fn describe_failures(samples: &[Sample]) -> String {
    let failed: Vec<_> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    let mut s = format!("{} of {} requests failed", failed.len(), samples.len());
    for f in failed.iter().take(20) {
        let _ = write!(
            s,
            "\n  at {:>7.3}s to {} after {:>5} ms: {}",
            f.at.as_secs_f64(),
            f.target,
            f.latency.as_millis(),
            f.outcome.as_ref().err().map(String::as_str).unwrap_or("")
        );
    }
    s
}
