//! Connecting to a task: pick, connect with the service's timeout, and on failure eject that
//! task on this node and try another, up to `retries` more, so the client is served by a live
//! task whenever one exists. [`Attempts`] holds the retry rules every listener follows (tcp
//! and http, whatever the client's transport).

use std::io;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::util::net::dial;

use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;
use crate::snapshot::{InFlight, Service, Task, Unanswered};
use crate::util::clock::now_ms;

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no live task for service {service}")]
    NoLiveTask { service: String },
    #[error("all {attempts} connect attempts to service {service} failed; last: {last}")]
    AllFailed {
        service: String,
        attempts: usize,
        #[source]
        last: io::Error,
    },
}

/// A connected task, counted as in flight until dropped.
pub struct Upstream {
    pub stream: TcpStream,
    pub task: Arc<Task>,
    pub in_flight: InFlight,
    /// Attempts it took (1 = first try).
    pub attempts: usize,
    /// Its place among the task's connections awaiting a first answer (a `paced` [`connect`]);
    /// the caller drops it once the task answered.
    pub unanswered: Option<Unanswered>,
}

static CONNECT_FAILED_LOG: LogLimiter = LogLimiter::new(1000);

/// A connect to `task` of `service` failed: eject the task on this node (passive health),
/// count it, and log it (rate-limited).
fn connect_failed(metrics: &Metrics, service: &str, task: &Task, e: &io::Error) {
    task.state.eject(now_ms(), format!("connect: {e}"));
    metrics
        .upstream_connect_errors_total
        .with_label_values(&[service, task.id.as_str()])
        .inc();
    if let Some(suppressed) = CONNECT_FAILED_LOG.allow() {
        tracing::warn!(service, task = %task.id, addr = %task.addr, error = %e, suppressed, "upstream connect failed; trying another task");
    }
}

/// What to do after a task's connection closed before any response byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedEarly {
    /// A kept connection the task closed while it idled: send again once, to the same
    /// pick, on a fresh connection (costs no attempt).
    RetryFresh,
    /// A fresh connection reset: the task is likely dying (a node losing power resets what
    /// is in flight); give the request to another task, as after a failed connect.
    RetryElsewhere,
    Fail,
}

/// A connection made (or reused) to the task it goes to.
pub struct Connected<C> {
    pub task: Arc<Task>,
    /// Held while the request is in flight to `task`.
    pub in_flight: InFlight,
    pub conn: C,
    /// A kept-alive or pooled connection, not a new one.
    pub reused: bool,
}

/// What [`Attempts::settle`] made of a connect.
pub enum Connect<C> {
    Connected(Connected<C>),
    /// Counted against the task: pick the next one.
    Failed,
    /// The request's deadline passed while connecting.
    TimedOut,
}

/// The attempts of one connection (tcp) or one request (http) at the tasks of a service,
/// and the one set of retry rules every listener follows:
/// - a failed connect ejects the task and tries another, whatever the request, up to the
///   service's `retries` more; unless this process is out of descriptors (EMFILE, ENFILE,
///   ENOBUFS, ENOMEM): not the task's fault, so no ejection and no retry;
/// - a request that could not even start to go out on a kept connection goes again (the
///   kept connection costs no attempt);
/// - a replayable request (idempotent, and the proxy holds all of it) whose connection
///   closed before any response byte is sent once more on a fresh connection to the same
///   task when the connection was a kept one, else to another task (and that task is
///   ejected); a request that may have reached a task is otherwise never sent twice.
pub struct Attempts<'a> {
    svc: &'a Service,
    metrics: &'a Metrics,
    hash: Option<u64>,
    tried: Tried,
    max: usize,
    /// The last failure, for the answer.
    last: Option<io::Error>,
    stale_retry_used: bool,
    /// The next connection must be a new one (after an early close).
    fresh_only: bool,
    stopped: bool,
}

impl<'a> Attempts<'a> {
    /// `hash`: the key hash of consistent-hashing services (`None` otherwise).
    pub fn new(svc: &'a Service, metrics: &'a Metrics, hash: Option<u64>) -> Attempts<'a> {
        Attempts {
            svc,
            metrics,
            hash,
            tried: Tried::default(),
            max: 1 + svc.settings.retries as usize,
            last: None,
            stale_retry_used: false,
            fresh_only: false,
            stopped: false,
        }
    }

    /// The next task to try, counted in flight (and as a retry past the first); `None`
    /// once the attempts are used up, the rules said stop, or no task can be picked.
    pub fn pick(&mut self) -> Option<(Arc<Task>, InFlight)> {
        if self.stopped || self.tried.len() >= self.max {
            return None;
        }
        let i = self.svc.pick(self.tried.as_slice(), now_ms(), self.hash)?;
        if !self.tried.is_empty() {
            self.count_retry();
        }
        self.tried.push(i);
        let task = self.svc.tasks[i].clone();
        let in_flight = task.state.begin();
        Some((task, in_flight))
    }

    /// What the connect to a task [`Attempts::pick`] gave came to (`r`: `Ok((conn, reused))`,
    /// or `Err(None)` once the request's deadline passed). A failed connect is counted
    /// against its task (see [`Attempts::connect_failed`]): pick again.
    pub fn settle<C>(
        &mut self,
        task: Arc<Task>,
        in_flight: InFlight,
        r: Result<(C, bool), Option<io::Error>>,
    ) -> Connect<C> {
        match r {
            Ok((conn, reused)) => {
                if !reused {
                    self.connected(&task);
                }
                Connect::Connected(Connected {
                    task,
                    in_flight,
                    conn,
                    reused,
                })
            }
            Err(None) => Connect::TimedOut,
            Err(Some(e)) => {
                drop(in_flight);
                self.connect_failed(&task, e);
                Connect::Failed
            }
        }
    }

    fn count_retry(&self) {
        self.metrics
            .retries_total
            .with_label_values(&[self.svc.name.as_str()])
            .inc();
    }

    /// Attempts made so far.
    pub fn count(&self) -> usize {
        self.tried.len()
    }

    /// Whether the next connection must be a new one (not kept, not pooled).
    pub fn fresh_only(&self) -> bool {
        self.fresh_only
    }

    /// A connect to `task` succeeded: its passive failures are forgotten.
    pub fn connected(&mut self, task: &Task) {
        task.state.succeed();
        self.fresh_only = false;
    }

    /// A connect to `task` failed (see the rules above).
    pub fn connect_failed(&mut self, task: &Task, e: io::Error) {
        if crate::util::net::is_resource_exhaustion(&e) {
            // Out of descriptors here: not the task's fault, so no ejection, no retry.
            if let Some(suppressed) = CONNECT_FAILED_LOG.allow() {
                tracing::warn!(service = %self.svc.name, task = %task.id, error = %e, suppressed, "cannot open an upstream connection: this process is out of resources");
            }
            self.stopped = true;
        } else {
            connect_failed(self.metrics, self.svc.name.as_str(), task, &e);
        }
        self.last = Some(io::Error::new(
            e.kind(),
            format!("connect to {}: {e}", task.addr),
        ));
    }

    /// Nothing of the request went out on the connection (it was closed): any request may
    /// go again; on a kept connection that costs no attempt.
    pub fn not_sent(&mut self, reused: bool, e: io::Error) {
        if reused {
            self.tried.pop();
        } else {
            self.last = Some(e);
        }
    }

    /// The connection closed before any response byte; `replayable`: idempotent and held
    /// whole. Returns what to do (and ejects the task when the rule says so).
    pub fn closed_early(
        &mut self,
        task: &Task,
        replayable: bool,
        reused: bool,
        e: io::Error,
    ) -> ClosedEarly {
        let next = closed_early(
            replayable,
            reused,
            self.stale_retry_used,
            self.tried.len(),
            self.max,
        );
        match next {
            ClosedEarly::RetryFresh => {
                self.stale_retry_used = true;
                self.fresh_only = true;
                self.tried.pop();
                self.count_retry();
                tracing::debug!(service = %self.svc.name, task = %task.id, error = %e, "kept connection closed before the response; retrying once");
            }
            ClosedEarly::RetryElsewhere | ClosedEarly::Fail => {
                // Kept connections are closed by idle timeouts, which says nothing about
                // the task's health; a fresh one reset is the task's doing.
                if !reused {
                    task.state
                        .eject(now_ms(), format!("reset before any response: {e}"));
                }
                if next == ClosedEarly::RetryElsewhere {
                    self.fresh_only = true;
                    tracing::debug!(service = %self.svc.name, task = %task.id, error = %e, "reset before the response; retrying on another task");
                }
            }
        }
        self.last = Some(e);
        next
    }

    /// Out of tasks or attempts: counted in `no_live_task_total`; the last failure, if any
    /// attempt was made (`None`: no task could be picked at all).
    pub fn give_up(&mut self) -> Option<io::Error> {
        self.metrics
            .no_live_task_total
            .with_label_values(&[self.svc.name.as_str()])
            .inc();
        self.last.take()
    }
}

/// The tasks tried, without an allocation for the usual few.
#[derive(Default)]
struct Tried {
    inline: [usize; 4],
    len: usize,
    more: Vec<usize>,
}

impl Tried {
    fn as_slice(&self) -> &[usize] {
        if self.len <= self.inline.len() {
            &self.inline[..self.len]
        } else {
            &self.more
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, i: usize) {
        if self.len < self.inline.len() {
            self.inline[self.len] = i;
        } else {
            if self.len == self.inline.len() {
                self.more = self.inline.to_vec();
            }
            self.more.push(i);
        }
        self.len += 1;
    }

    fn pop(&mut self) {
        if self.len == 0 {
            return;
        }
        self.len -= 1;
        if self.len >= self.inline.len() {
            self.more.pop();
            if self.len == self.inline.len() {
                self.more.clear();
            }
        }
    }
}

/// The early-close rule (see [`Attempts`]).
fn closed_early(
    replayable: bool,
    reused: bool,
    stale_retry_used: bool,
    tried: usize,
    max_attempts: usize,
) -> ClosedEarly {
    if !replayable {
        ClosedEarly::Fail
    } else if reused && !stale_retry_used {
        ClosedEarly::RetryFresh
    } else if tried < max_attempts {
        ClosedEarly::RetryElsewhere
    } else {
        ClosedEarly::Fail
    }
}

/// Connects to a task of `svc` (the tcp path), failing over to other tasks by the rules of
/// [`Attempts`].
pub async fn connect(
    svc: &Service,
    metrics: &Metrics,
    hash: Option<u64>,
    paced: bool,
) -> Result<Upstream, ConnectError> {
    let mut attempts = Attempts::new(svc, metrics, hash);
    while let Some((task, in_flight)) = attempts.pick() {
        let unanswered = if paced {
            // At most `max_pending_connects` per task; a place is waited for at most
            // `peek_timeout`. Boxed: only paced connects carry the wait's state.
            let s = &svc.settings;
            let place = task
                .state
                .unanswered_place(s.max_pending_connects, s.peek_timeout);
            Some(Box::pin(place).await)
        } else {
            None
        };
        match dial(task.addr, svc.settings.connect_timeout).await {
            Ok(stream) => {
                attempts.connected(&task);
                return Ok(Upstream {
                    stream,
                    task,
                    in_flight,
                    attempts: attempts.count(),
                    unanswered,
                });
            }
            Err(e) => {
                drop((in_flight, unanswered));
                attempts.connect_failed(&task, e);
            }
        }
    }
    let tried = attempts.count();
    match attempts.give_up() {
        None => Err(ConnectError::NoLiveTask {
            service: svc.name.to_string(),
        }),
        Some(last) => Err(ConnectError::AllFailed {
            service: svc.name.to_string(),
            attempts: tried,
            last,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tried_keeps_order_past_its_inline_room() {
        let mut t = Tried::default();
        for i in 0..7 {
            t.push(i * 10);
        }
        assert_eq!(t.as_slice(), &[0, 10, 20, 30, 40, 50, 60]);
        for _ in 0..3 {
            t.pop();
        }
        assert_eq!(t.as_slice(), &[0, 10, 20, 30]);
        t.push(99);
        assert_eq!(t.as_slice(), &[0, 10, 20, 30, 99]);
        t.pop();
        t.pop();
        assert_eq!(
            (t.as_slice(), t.len(), t.is_empty()),
            (&[0, 10, 20][..], 3, false)
        );
    }

    #[test]
    fn early_close_rule() {
        use ClosedEarly::*;
        // (replayable, reused, stale retry used, tried, max) → what next
        let cases = [
            ((false, true, false, 1, 3), Fail),
            ((false, false, false, 1, 3), Fail),
            ((true, true, false, 1, 3), RetryFresh),
            ((true, true, true, 1, 3), RetryElsewhere),
            ((true, false, false, 1, 3), RetryElsewhere),
            ((true, false, true, 2, 3), RetryElsewhere),
            ((true, false, false, 3, 3), Fail),
            ((true, true, false, 3, 3), RetryFresh),
        ];
        for ((rp, re, st, t, m), want) in cases {
            assert_eq!(
                closed_early(rp, re, st, t, m),
                want,
                "{rp} {re} {st} {t} {m}"
            );
        }
    }
}
