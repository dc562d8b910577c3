//! Memory back to the kernel after a storm. glibc's malloc keeps what a process freed in its
//! arenas: after 9,000 connections came and went, RSS stayed at the peak (110.9 MiB against
//! 9.4 MiB fresh, issue 16). Every [`CHECK_EVERY`] this task asks the allocator how much free
//! memory it holds (`mallinfo2`, one walk of the free lists); when that grew by more than
//! [`TRIM_ABOVE`] since the last look, `malloc_trim(0)` gives the free pages of every arena
//! back (madvise DONTNEED), on a blocking thread so no worker waits for the arena locks.
//! One process-wide timer, never one per connection; a steady process never trims.
//!
//! Measured in `benches/mqtt_connect` (README, Performance): after 9,000 connections closed,
//! RSS is back near its fresh figure at the next look, where it stays at the peak with the
//! trimming off (`ROUTEMESH_NO_TRIM=1`). Keeps glibc's allocator: no C allocator to build.
//! A no-op where the C library is not glibc. The one other module with `unsafe` (two libc
//! calls that take and return plain values).
#![allow(unsafe_code)]

use std::time::Duration;

/// How often the allocator's free memory is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Growth of the allocator's free memory that makes it worth a trim.
pub const TRIM_ABOVE: usize = 8 * 1024 * 1024;

/// Free bytes held by the allocator's arenas (not yet given back).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_bytes() -> usize {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes a plain size and only touches the allocator's own state,
    // under its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_bytes() -> usize {
    0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// What the policy decides at one look; pure, so it is tested without an allocator.
#[derive(Debug, Default)]
pub struct Policy {
    /// The free memory after the last trim, or the lowest seen since (memory reused).
    floor: Option<usize>,
}

impl Policy {
    /// Whether to trim now, with `free` bytes held by the allocator.
    pub fn should_trim(&mut self, free: usize) -> bool {
        let floor = self.floor.get_or_insert(free);
        if free < *floor {
            *floor = free;
        }
        free > *floor + TRIM_ABOVE
    }

    /// After a trim: `free` is the new floor.
    pub fn trimmed(&mut self, free: usize) {
        self.floor = Some(free);
    }
}

/// Runs the policy until the runtime stops; `ROUTEMESH_NO_TRIM=1` in the environment turns it
/// off (to measure what it gives back).
pub async fn run() {
    if std::env::var_os("ROUTEMESH_NO_TRIM").is_some_and(|v| v == "1") {
        return;
    }
    let mut policy = Policy::default();
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let free = free_bytes();
        if policy.should_trim(free) {
            let _ = tokio::task::spawn_blocking(trim).await;
            let after = free_bytes();
            tracing::debug!(
                free_mib = free / (1024 * 1024),
                after_mib = after / (1024 * 1024),
                "gave free memory back"
            );
            policy.trimmed(after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_free_memory_grew_past_the_threshold() {
        let mut p = Policy::default();
        let mib = 1024 * 1024;
        assert!(!p.should_trim(2 * mib), "the first look sets the floor");
        assert!(!p.should_trim(9 * mib), "7 MiB more: not yet");
        assert!(p.should_trim(40 * mib), "a storm's memory came free");
        p.trimmed(38 * mib);
        assert!(
            !p.should_trim(38 * mib),
            "a trimmed heap is not trimmed again"
        );
        assert!(!p.should_trim(10 * mib), "memory reused lowers the floor");
        assert!(p.should_trim(19 * mib), "and the next storm is trimmed too");
    }

    #[test]
    fn trim_and_free_bytes_run() {
        let _ = free_bytes();
        trim();
    }
}
