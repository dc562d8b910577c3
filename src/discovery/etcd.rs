//! etcd discovery: one consistent get of the prefix, then a watch from that revision + 1.
//! Each watch response becomes table updates and one published snapshot. A broken, canceled
//! or compacted watch backs off, lists again and resets the table (nothing lost, nothing
//! applied twice). A periodic full re-list guards against lost watch events. While etcd is
//! unreachable the last snapshot keeps serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Publisher;
use super::failure::{self, Cause};
use super::keys::watch_prefix;
use super::table::Update;
use crate::config::{DiscoveryConfig, EtcdSecurity, ServiceName, ServiceSettings};
use crate::util::backoff::Backoff;

/// Why a discovery round ended. Displayed in plain words (see [`Cause`]); the full chain of
/// an etcd client error is logged at debug level only.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{}", Cause::of(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error("timed out (no answer within {0:?})")]
    Timeout(Duration),
    #[error("watch canceled by etcd: {0}")]
    Canceled(String),
    #[error("watch start revision compacted (oldest available {0})")]
    Compacted(i64),
    #[error("watch stream closed")]
    Closed,
    #[error("etcd credentials: {0}")]
    Credentials(String),
    /// No member answered: each member with why.
    #[error("{}", members_line(.0))]
    Unreachable(Vec<(String, DiscoveryError)>),
    /// An https:// member closed or reset the connection before answering. A plain-text
    /// member does so on our TLS handshake, sometimes with an EOF the TLS library names, and
    /// sometimes with a reset that says nothing of TLS: both are said the same way.
    #[error("{}", Cause::Tls(TLS_CLOSED.into()))]
    TlsClosed,
}

/// The detail of [`DiscoveryError::TlsClosed`].
const TLS_CLOSED: &str = "closed by the member: is it plain text?";

impl DiscoveryError {
    /// The cause in plain words (of the last member tried, when none answered).
    pub fn cause(&self) -> Cause {
        match self {
            DiscoveryError::Etcd(e) => Cause::of(e),
            DiscoveryError::Timeout(d) => Cause::TimedOut(Some(*d)),
            DiscoveryError::Credentials(d) => Cause::Credentials(d.clone()),
            DiscoveryError::Closed => Cause::Closed,
            DiscoveryError::TlsClosed => Cause::Tls(TLS_CLOSED.into()),
            DiscoveryError::Unreachable(all) => {
                all.last().map(|(_, e)| e.cause()).unwrap_or(Cause::Closed)
            }
            other => Cause::Other(other.to_string()),
        }
    }

    /// One line for an operator: the member(s), the cause, and what to check (`cli`: the
    /// command line's flags; else the daemon's config).
    pub fn explain(&self, endpoint: &str, cli: bool) -> String {
        let fix = self.cause().fix(cli);
        match self {
            DiscoveryError::Unreachable(all) if all.len() == 1 => {
                format!("cannot reach etcd at {}: {}; {fix}", all[0].0, all[0].1)
            }
            DiscoveryError::Unreachable(_) => format!("cannot reach etcd ({self}); {fix}"),
            other => format!("etcd at {endpoint}: {other}; {fix}"),
        }
    }

    /// The full error chain, for `RUST_LOG=debug`.
    pub fn chain(&self) -> String {
        match self {
            DiscoveryError::Etcd(e) => failure::chain(e),
            DiscoveryError::Unreachable(all) => all
                .iter()
                .map(|(ep, e)| format!("{ep}: {}", e.chain()))
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
    }
}

fn members_line(all: &[(String, DiscoveryError)]) -> String {
    all.iter()
        .map(|(ep, e)| format!("{ep}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Connection options shared by the daemon and the CLI.
pub fn connect_options(dial_timeout: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(dial_timeout)
        // HTTP/2 pings find a dead member quickly, so a watch on it breaks and resyncs.
        .with_keep_alive(Duration::from_secs(1), dial_timeout)
        .with_keep_alive_while_idle(true)
        // A member cut off from the quorum cancels our watch instead of going silent.
        .with_require_leader(true)
}

/// Connects to one member, checking that it answers (the client itself connects lazily).
async fn connect_one(
    endpoint: &str,
    dial_timeout: Duration,
    security: &EtcdSecurity,
) -> Result<Client, DiscoveryError> {
    let bound = dial_timeout * 2;
    // TLS files and the password are read at each connect (rotation needs no restart).
    let options = super::security::apply(connect_options(dial_timeout), security)
        .map_err(DiscoveryError::Credentials)?;
    let attempt = async {
        let mut c = Client::connect([endpoint], Some(options)).await?;
        c.status().await?;
        Ok::<_, etcd_client::Error>(c)
    };
    tokio::time::timeout(bound, attempt)
        .await
        .map_err(|_| DiscoveryError::Timeout(bound))?
        .map_err(|e| over_tls(endpoint, DiscoveryError::from(e)))
}

/// A connection to an https:// member that closed before it answered is told as the TLS
/// failure it most likely is (see [`DiscoveryError::TlsClosed`]).
fn over_tls(endpoint: &str, e: DiscoveryError) -> DiscoveryError {
    if endpoint.starts_with("https://") && e.cause() == Cause::Closed {
        DiscoveryError::TlsClosed
    } else {
        e
    }
}

/// Failover over the members of a cluster: each connect tries the members in turn, starting
/// after the one that failed last, and returns the first that answers. One client talks to
/// one member, so a dead member is left at once instead of being retried at random.
#[derive(Debug, Clone)]
pub struct Members {
    endpoints: Vec<String>,
    next: usize,
    security: EtcdSecurity,
}

impl Members {
    pub fn new(endpoints: &[String]) -> Members {
        Members {
            endpoints: endpoints.to_vec(),
            next: 0,
            security: EtcdSecurity::default(),
        }
    }

    /// TLS and credentials for every member (`[discovery] tls`, `username`).
    pub fn with_security(mut self, security: EtcdSecurity) -> Members {
        self.security = security;
        self
    }

    /// The first member, from the rotation point on, that answers.
    pub async fn connect(&mut self, dial_timeout: Duration) -> Result<Client, DiscoveryError> {
        let mut failed = Vec::new();
        for _ in 0..self.endpoints.len() {
            let ep = self.current().to_string();
            match connect_one(&ep, dial_timeout, &self.security).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(endpoint = %ep, error = %e.chain(), "etcd member unreachable; trying the next");
                    failed.push((ep, e));
                    self.next = (self.next + 1) % self.endpoints.len();
                }
            }
        }
        Err(DiscoveryError::Unreachable(failed))
    }

    /// The member in use (after a successful connect) or tried next.
    pub fn current(&self) -> &str {
        self.endpoints
            .get(self.next % self.endpoints.len().max(1))
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Marks the member in use as failed: the next connect starts with another one.
    pub fn rotate(&mut self) {
        self.next = (self.next + 1) % self.endpoints.len().max(1);
    }

    /// After a failed round of `what` ("etcd discovery", "node lease keeper"): warns in one
    /// line (`what interrupted{after}: why`, the error chain at debug), leaves the member in
    /// use and waits the backoff's next delay. False when `shutdown` came first.
    pub async fn pause_after(
        &mut self,
        err: &DiscoveryError,
        (what, after): (&str, &str),
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> bool {
        let why = err.explain(self.current(), false);
        self.rotate();
        let delay = backoff.next_delay();
        tracing::debug!(error = %err.chain(), "{what} error chain");
        tracing::warn!(retry_in = ?delay, "{what} interrupted{after}: {why}");
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

/// Connects to the first answering member of `endpoints` (used by the CLI); returns the
/// client and the member it talks to.
pub async fn connect(
    endpoints: &[String],
    dial_timeout: Duration,
    security: &EtcdSecurity,
) -> Result<(Client, String), DiscoveryError> {
    let mut members = Members::new(endpoints).with_security(security.clone());
    let client = members.connect(dial_timeout).await?;
    Ok((client, members.current().to_string()))
}

/// Runs until `shutdown`: keeps `publisher`'s table in step with etcd.
pub async fn run(
    cfg: DiscoveryConfig,
    mut publisher: Publisher,
    mut settings: watch::Receiver<Arc<BTreeMap<ServiceName, ServiceSettings>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut members = Members::new(&cfg.endpoints).with_security(cfg.security.clone());
    let mut client: Option<Client> = None;
    loop {
        let round = async {
            let c = match &client {
                Some(c) => c.clone(),
                None => {
                    let c = members.connect(cfg.dial_timeout).await?;
                    client = Some(c.clone());
                    c
                }
            };
            sync_and_watch(&cfg, c, &mut publisher, &mut settings, &mut backoff).await
        };
        let result = tokio::select! {
            r = round => r,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok(()) => tracing::debug!("periodic re-list of etcd"),
            Err(e) => {
                publisher.status().set_up(false);
                // Reconnect, starting with another member.
                client = None;
                let what = ("etcd discovery", ", serving the last routing snapshot");
                if !members.pause_after(&e, what, &mut backoff, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// One round: list, publish, then watch until the watch breaks or the re-list timer fires
/// (`Ok`).
async fn sync_and_watch(
    cfg: &DiscoveryConfig,
    mut client: Client,
    publisher: &mut Publisher,
    settings: &mut watch::Receiver<Arc<BTreeMap<ServiceName, ServiceSettings>>>,
    backoff: &mut Backoff,
) -> Result<(), DiscoveryError> {
    let prefix = watch_prefix(&cfg.prefix);
    let resp = tokio::time::timeout(
        cfg.dial_timeout * 2,
        client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| DiscoveryError::Timeout(cfg.dial_timeout * 2))??;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    publisher.apply([Update::Reset { revision, kvs }]);
    publisher.publish();
    tracing::info!(
        revision,
        keys = resp.kvs().len(),
        "routing table synced from etcd"
    );

    let mut stream = tokio::time::timeout(
        cfg.dial_timeout * 2,
        client.watch(
            prefix.as_bytes(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        ),
    )
    .await
    .map_err(|_| DiscoveryError::Timeout(cfg.dial_timeout * 2))??;
    publisher.status().set_up(true);
    backoff.reset();
    let relist = tokio::time::sleep(cfg.resync_interval);
    tokio::pin!(relist);
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(resp) = msg? else { return Err(DiscoveryError::Closed) };
                if resp.compact_revision() > 0 {
                    return Err(DiscoveryError::Compacted(resp.compact_revision()));
                }
                if resp.canceled() {
                    return Err(DiscoveryError::Canceled(resp.cancel_reason().to_string()));
                }
                let mut updates: Vec<Update> = resp
                    .events()
                    .iter()
                    .filter_map(|ev| {
                        let kv = ev.kv()?;
                        Some(match ev.event_type() {
                            EventType::Put => Update::Put {
                                key: kv.key().to_vec(),
                                value: kv.value().to_vec(),
                            },
                            EventType::Delete => Update::Delete { key: kv.key().to_vec() },
                        })
                    })
                    .collect();
                if let Some(h) = resp.header() {
                    updates.push(Update::Revision(h.revision()));
                }
                publisher.apply(updates);
                publisher.publish();
            }
            changed = settings.changed() => {
                if changed.is_ok() {
                    let s = settings.borrow_and_update().clone();
                    publisher.set_settings(s);
                    publisher.publish();
                }
            }
            _ = &mut relist => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_connection_to_an_https_member_is_told_as_tls() {
        let e = over_tls("https://127.0.0.1:43831", DiscoveryError::Closed);
        assert!(matches!(e, DiscoveryError::TlsClosed));
        assert!(matches!(e.cause(), Cause::Tls(_)));
        let line = DiscoveryError::Unreachable(vec![("https://127.0.0.1:43831".into(), e)])
            .explain("https://127.0.0.1:43831", true);
        assert!(line.contains("TLS handshake failed"), "{line}");
        assert!(line.contains("URL scheme"), "{line}");
        // The command line's one-line error stays short (tests/it/etcd_errors.rs: ≤ 200).
        assert!(
            line.len() + "error: ".len() <= 200,
            "{} chars: {line}",
            line.len()
        );
        // Over plain text a closed connection is just that.
        let e = over_tls("http://127.0.0.1:2379", DiscoveryError::Closed);
        assert!(matches!(e, DiscoveryError::Closed));
    }
}
