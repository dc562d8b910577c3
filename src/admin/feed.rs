//! The status page's feed: one background task that looks at this node's state every
//! [`TICK`] (an `ArcSwap` load of the snapshot and atomic reads: it never takes a lock the
//! data path takes), records the changes in the [`Journal`], and, while pages are open,
//! builds the state document (`status.rs`) and publishes it when it changed. Each
//! `GET /events` stream sends the newest document at most every [`MIN_GAP`] and only when it
//! differs from the last one that stream sent, a comment line every [`HEARTBEAT`] in between,
//! and ends after [`STREAM_MAX`] (the page's `EventSource` reconnects at once).

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame as BodyFrame;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::AdminState;
use super::events::{DiscoverySeen, Event, Journal, View, diff};
use super::rates::{Sample, Window, read_metrics, read_reloads, read_tasks};
use super::status::{Inputs, stamp, state_json};
use crate::config::DiscoveryBackend;
use crate::discovery::unix_ms;
use crate::util::clock::now_ms;

/// How often the feed looks.
pub const TICK: Duration = Duration::from_millis(250);
/// The shortest time between two documents on one stream.
pub const MIN_GAP: Duration = Duration::from_millis(500);
/// A comment line this often keeps proxies and the browser from timing the stream out.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// A stream ends after this; the page reconnects (so a long-open page cannot pin a
/// connection forever).
pub const STREAM_MAX: Duration = Duration::from_secs(15 * 60);
/// Streams open at once; more get 503.
pub const MAX_STREAMS: usize = 64;

/// One published state document.
#[derive(Debug, Default)]
pub struct Document {
    /// Increases with each document (0: none yet).
    pub seq: u64,
    /// Hash of the document without its time stamps: equal means nothing changed.
    pub fingerprint: u64,
    /// The whole document, stamped.
    pub json: Bytes,
}

/// Shared between the feed task, the streams and the actions.
pub struct Feed {
    documents: watch::Sender<Arc<Document>>,
    journal: Mutex<Journal>,
    /// Streams subscribed so far (the feed publishes at once when it changes, so a new page
    /// gets its first document within a tick).
    subscriptions: AtomicU64,
    streams: Arc<AtomicUsize>,
    /// Cancelled when the admin listener stops: every stream ends.
    closed: CancellationToken,
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            documents: watch::channel(Arc::new(Document::default())).0,
            journal: Mutex::new(Journal::default()),
            subscriptions: AtomicU64::new(0),
            streams: Arc::default(),
            closed: CancellationToken::new(),
        }
    }
}

impl Feed {
    /// Records an event that is not a state change the feed can see (an admin action).
    pub fn record(&self, e: Event) {
        if let Ok(mut j) = self.journal.lock() {
            j.push(e);
        }
    }

    /// Ends every stream (the admin listener is stopping).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// A new stream, or None when [`MAX_STREAMS`] are open.
    pub fn subscribe(&self) -> Option<Stream> {
        if self.streams.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let rx = self.documents.subscribe();
        let after = rx.borrow().seq;
        self.subscriptions.fetch_add(1, Ordering::AcqRel);
        let now = Instant::now();
        Some(Stream {
            rx,
            after,
            last_fingerprint: None,
            last_sent: None,
            heartbeat: now + HEARTBEAT,
            expires: now + STREAM_MAX,
            closed: self.closed.clone(),
            greeted: false,
            open: self.streams.clone(),
        })
    }
}

/// One `GET /events` stream's position.
pub struct Stream {
    rx: watch::Receiver<Arc<Document>>,
    /// Documents up to this one were published before the stream opened: not sent.
    after: u64,
    last_fingerprint: Option<u64>,
    last_sent: Option<Instant>,
    heartbeat: Instant,
    expires: Instant,
    closed: CancellationToken,
    greeted: bool,
    /// [`Feed::streams`], decremented when the stream is dropped (finished, or dropped by
    /// hyper when the client went away).
    open: Arc<AtomicUsize>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Stream {
    /// The next bytes to send, or None when the stream ends.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.greeted {
            self.greeted = true;
            // Reconnect 1 s after the stream ends or breaks.
            return Some(Bytes::from_static(b"retry: 1000\n\n"));
        }
        loop {
            let doc = self.rx.borrow_and_update().clone();
            if doc.seq > self.after && Some(doc.fingerprint) != self.last_fingerprint {
                if let Some(wait) = self.last_sent.map(|t| t + MIN_GAP)
                    && wait > Instant::now()
                {
                    tokio::select! {
                        _ = tokio::time::sleep_until(wait) => continue,
                        _ = self.closed.cancelled() => return None,
                    }
                }
                self.last_fingerprint = Some(doc.fingerprint);
                let now = Instant::now();
                self.last_sent = Some(now);
                self.heartbeat = now + HEARTBEAT;
                let mut out = Vec::with_capacity(doc.json.len() + 16);
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&doc.json);
                out.extend_from_slice(b"\n\n");
                return Some(out.into());
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.heartbeat) => {
                    self.heartbeat = Instant::now() + HEARTBEAT;
                    return Some(Bytes::from_static(b": keep-alive\n\n"));
                }
                _ = tokio::time::sleep_until(self.expires) => return None,
                _ = self.closed.cancelled() => return None,
            }
        }
    }
}

/// The body of one `GET /events` response.
pub fn body(
    stream: Stream,
) -> StreamBody<impl futures_util::Stream<Item = Result<BodyFrame<Bytes>, Infallible>>> {
    StreamBody::new(futures_util::stream::unfold(
        stream,
        |mut stream| async move {
            let chunk = stream.next_chunk().await?;
            Some((Ok(BodyFrame::data(chunk)), stream))
        },
    ))
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Runs until `shutdown`: looks every [`TICK`], records events, publishes documents.
pub async fn run(state: Arc<AdminState>, shutdown: CancellationToken) {
    let mut view = View::default();
    let mut window = Window::default();
    let mut seen_subscriptions = 0;
    let mut last_fingerprint = None;
    let mut seq = 0;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let snap = state.snapshot.load_full();
        let now = now_ms();
        let unix = unix_ms();
        let d = &state.discovery;
        let seen = DiscoverySeen {
            synced: d.synced(),
            up: d.up(),
            stale: state.page.is_stale(d),
            revision: d.revision(),
            is_static: state.page.backend == DiscoveryBackend::Static,
        };
        let next = View::observe(&snap, seen, read_reloads(&state.metrics), now, unix, &view);
        let changes = diff(&view, &next, unix);
        view = next;
        for e in &changes {
            tracing::debug!(kind = ?e.kind, subject = %e.subject, state = %e.state, "{}", e.message);
        }
        let Ok(mut journal) = state.feed.journal.lock() else {
            return;
        };
        journal.extend(changes);
        if state.feed.documents.receiver_count() == 0 {
            // Nobody is looking: no rates, no document (the next page forces a fresh one).
            drop(journal);
            window.clear();
            continue;
        }
        let mut sample = Sample {
            at_ms: now,
            ..Default::default()
        };
        read_tasks(&snap, &mut sample.counters);
        read_metrics(&state.metrics, &mut sample);
        window.push(sample);
        let listeners = state.listeners.load();
        let mut doc = state_json(&Inputs {
            info: &state.page,
            snap: &snap,
            discovery: d,
            listeners: &listeners,
            view: &view,
            rates: &window,
            events: &journal,
            now,
        });
        drop(journal);
        let fp = fingerprint(&serde_json::to_vec(&doc).unwrap_or_default());
        let subscriptions = state.feed.subscriptions.load(Ordering::Acquire);
        if Some(fp) == last_fingerprint && subscriptions == seen_subscriptions {
            continue;
        }
        last_fingerprint = Some(fp);
        seen_subscriptions = subscriptions;
        seq += 1;
        stamp(&mut doc, unix, d);
        let json = serde_json::to_vec(&doc).unwrap_or_default();
        state.feed.documents.send_replace(Arc::new(Document {
            seq,
            fingerprint: fp,
            json: json.into(),
        }));
    }
}
