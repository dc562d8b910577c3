//! Connection shards: with `worker_threads = N > 1`, N threads each run a current-thread
//! runtime, and every accepted connection lives on one of them (round robin) from accept to
//! close. A connection's futures, timers, socket readiness and kept task connections stay on
//! one thread: no work stealing and no cross-thread wakeups on the data path (the shape of
//! nginx's workers and HAProxy's threads). Accept loops, discovery, health checks and the
//! admin endpoint run on the daemon's own runtime.
//!
//! Owns only the threads; what runs on them is the listeners' business. Dropping the last
//! handle stops the threads (connections still on them are dropped, which closes them).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The shard runtimes.
pub struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with the shards: each thread's runtime then returns and the thread ends.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Shards {
    /// Starts `n` shard threads.
    pub fn start(n: usize) -> io::Result<Arc<Shards>> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            stops.push(stop_tx);
            std::thread::Builder::new()
                .name(format!("routemesh-shard-{i}"))
                .spawn(move || {
                    let _ = rt.block_on(stop_rx);
                })?;
        }
        Ok(Arc::new(Shards {
            handles,
            next: AtomicUsize::new(0),
            _stop: stops,
        }))
    }

    /// The runtime for the next connection.
    pub fn pick(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_work_over_its_threads_and_stops_when_dropped() {
        let shards = Shards::start(2).unwrap();
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            shards.pick().spawn(async move {
                let _ = tx.send(std::thread::current().name().map(str::to_string));
            });
            names.insert(rx.recv().unwrap().unwrap());
        }
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["routemesh-shard-0", "routemesh-shard-1"]
        );
        drop(shards);
    }
}
