//! Bounded waits on state. A test never sleeps and then looks: it polls the state it waits
//! for until a bound ([`eventually`] and friends), or, to show that something does *not*
//! happen, watches it for an explicit window ([`holds_for`]).

use std::thread;
use std::time::{Duration, Instant};

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(20);

/// Poll `f` until it returns `Ok`; panic after `timeout` naming `what` and the last `Err`.
pub fn eventually_ok<T, F: FnMut() -> Result<T, String>>(
    timeout: Duration,
    what: &str,
    mut f: F,
) -> T {
    let start = Instant::now();
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            let last = if last.is_empty() {
                String::new()
            } else {
                format!(" (last: {last})")
            };
            panic!(
                "timed out after {:.1}s waiting for: {what}{last}",
                start.elapsed().as_secs_f64()
            );
        }
        thread::sleep(POLL);
    }
}

/// Poll `f` until it returns `Some`; panic with `what` after `timeout`.
pub fn eventually_value<T, F: FnMut() -> Option<T>>(timeout: Duration, what: &str, mut f: F) -> T {
    eventually_ok(timeout, what, || f().ok_or_else(String::new))
}

/// Poll `f` until it returns true; panic with `what` after `timeout`.
pub fn eventually<F: FnMut() -> bool>(timeout: Duration, what: &str, mut f: F) {
    eventually_value(timeout, what, || f().then_some(()));
}

/// Assert that `f` stays true for all of `window` (polled; it panics at the first false): how
/// a test shows that something does not happen, over a bound it states.
pub fn holds_for<F: FnMut() -> bool>(window: Duration, what: &str, mut f: F) {
    let start = Instant::now();
    loop {
        assert!(
            f(),
            "no longer true after {:.1}s (of {window:?}): {what}",
            start.elapsed().as_secs_f64()
        );
        if start.elapsed() >= window {
            return;
        }
        thread::sleep(POLL);
    }
}
