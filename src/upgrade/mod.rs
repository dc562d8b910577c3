//! Upgrades without a gap: `routemesh run --upgrade` takes every listening socket and the
//! node's etcd lease over from the running daemon, which then drains and exits.
//!
//! The running daemon serves `[admin] upgrade_socket` (a Unix socket, mode 0600). A new
//! process connects and the two speak, one JSON line each way at a time ([`wire`]):
//!
//! ```text
//!  new                                     old
//!  Hello {pid, version}           ──►
//!                                 ◄──      Offer {generation, lease, sockets[]} + SCM_RIGHTS
//!  (serves on them; binds what changed; becomes ready)
//!  Ready                          ──►      (stops accepting, stops writing to etcd, keeps the lease)
//!                                 ◄──      Done {lease, keys it wrote under it}
//!  (writes its registration under the lease; deletes the old keys it no longer has)
//!  … the connection stays open while the old process drains; its close means it exited.
//! ```
//!
//! A new process that fails before `Ready` sends `Abort {reason}` or just goes away (crash):
//! the old one has changed nothing and keeps serving. While an upgrade is in progress, and in
//! the new process while its predecessor still drains, further upgrades are `Refused` with the
//! reason ([`Gate`]).
//!
//! Owns the protocol, the socket file and the client side ([`Takeover`]); the app decides
//! what to offer and what to do on hand-over (it owns the sockets and the lease keeper), and
//! answers the server's [`Request`]s.

pub mod wire;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use wire::Wire;

/// Bound on each step of the exchange that needs only the other process's attention.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process waits for `Done` once it has said `Ready` (the old process stops
/// its listeners and its lease keeper first, bounded by twice its etcd dial timeout).
const DONE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the old process waits for `Ready` (the new one gives up on its own before).
const READY_TIMEOUT_OLD: Duration = Duration::from_secs(150);

/// What a handed-over socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Admin,
    /// A TCP listener (`[[listener]]` or published in etcd).
    Listener,
    /// A UDP listener.
    Udp,
    DnsUdp,
    DnsTcp,
    /// The upgrade socket itself.
    Upgrade,
}

/// One handed-over socket, described (its descriptor travels beside it, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    pub kind: Kind,
    /// The listener's name, or the kind for the daemon's own sockets.
    pub name: String,
    /// The configured address (the key listeners are kept by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    /// The upgrade socket's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    Hello {
        pid: u32,
        version: String,
    },
    Refused {
        reason: String,
    },
    Offer {
        pid: u32,
        version: String,
        generation: u64,
        lease: Option<i64>,
        sockets: Vec<SocketInfo>,
    },
    Ready,
    Abort {
        reason: String,
    },
    Done {
        lease: Option<i64>,
        keys: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "no routemesh is running with upgrade socket {}: {source}; start it without --upgrade (or check [admin] upgrade_socket)",
        path.display()
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the upgrade socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the running routemesh refused the upgrade: {0}")]
    Refused(String),
    #[error("hand-over with the running routemesh failed: {0}")]
    Protocol(String),
    #[error("this config turns upgrades off ([admin] upgrade_socket = \"\")")]
    Disabled,
    /// The new process could not get ready; the old one keeps serving.
    #[error("not ready within {within:?}: {why}; the running routemesh keeps serving")]
    NotReady { within: Duration, why: String },
}

impl UpgradeError {
    /// Nothing listens there (no daemon running): `--upgrade=if-running` starts afresh.
    pub fn nothing_running(&self) -> bool {
        matches!(self, UpgradeError::NotRunning { .. })
    }
}

fn protocol(what: impl std::fmt::Display) -> UpgradeError {
    UpgradeError::Protocol(what.to_string())
}

async fn step<T>(
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, UpgradeError> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(protocol(format!("{what}: {e}"))),
        Err(_) => Err(protocol(format!(
            "{what}: no answer within {STEP_TIMEOUT:?}"
        ))),
    }
}

// ---- the new process's side ---------------------------------------------------------------

/// What the new process got from the old one.
#[derive(Debug)]
pub struct Inherited {
    pub previous_pid: u32,
    pub previous_version: String,
    /// This process's generation: the old one's plus one.
    pub generation: u64,
    pub lease: Option<i64>,
    sockets: Vec<(SocketInfo, OwnedFd)>,
}

impl Inherited {
    fn take(&mut self, pick: impl Fn(&SocketInfo) -> bool) -> Option<(SocketInfo, OwnedFd)> {
        let i = self.sockets.iter().position(|(s, _)| pick(s))?;
        Some(self.sockets.remove(i))
    }

    /// A listening TCP socket of `kind` at `addr`, checked to be one.
    pub fn take_tcp(&mut self, kind: Kind, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let (info, fd) = self.take(|s| s.kind == kind && s.addr == Some(addr))?;
        checked(&info, fd, socket2::Type::STREAM).map(Into::into)
    }

    /// A UDP socket of `kind` at `addr`.
    pub fn take_udp(&mut self, kind: Kind, addr: SocketAddr) -> Option<std::net::UdpSocket> {
        let (info, fd) = self.take(|s| s.kind == kind && s.addr == Some(addr))?;
        checked(&info, fd, socket2::Type::DGRAM).map(Into::into)
    }

    /// Every TCP listener socket, by configured address.
    pub fn take_listeners(&mut self) -> BTreeMap<SocketAddr, std::net::TcpListener> {
        self.take_all(Kind::Listener, socket2::Type::STREAM)
    }

    /// Every udp listener socket, by configured address.
    pub fn take_udp_listeners(&mut self) -> BTreeMap<SocketAddr, std::net::UdpSocket> {
        self.take_all(Kind::Udp, socket2::Type::DGRAM)
    }

    /// Every socket of `kind` that has an address and is of type `ty`, by that address.
    fn take_all<S: From<socket2::Socket>>(
        &mut self,
        kind: Kind,
        ty: socket2::Type,
    ) -> BTreeMap<SocketAddr, S> {
        let mut out = BTreeMap::new();
        while let Some((info, fd)) = self.take(|s| s.kind == kind && s.addr.is_some()) {
            let addr = info.addr.expect("picked with an address");
            if let Some(s) = checked(&info, fd, ty) {
                out.insert(addr, s.into());
            }
        }
        out
    }

    /// The upgrade socket, when it is at `path`.
    pub fn take_upgrade(&mut self, path: &Path) -> Option<std::os::unix::net::UnixListener> {
        let (_, fd) = self.take(|s| s.kind == Kind::Upgrade && s.path.as_deref() == Some(path))?;
        Some(fd.into())
    }

    /// The upgrade socket's path in the old process when this process does not use it.
    pub fn old_upgrade_path(&self) -> Option<&Path> {
        self.sockets
            .iter()
            .find(|(s, _)| s.kind == Kind::Upgrade)
            .and_then(|(s, _)| s.path.as_deref())
    }

    /// Closes what this process did not take (no longer configured); returns their names.
    pub fn close_rest(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sockets)
            .into_iter()
            .map(|(s, _)| match (s.addr, s.path) {
                (Some(a), _) => format!("{} {a}", s.name),
                (None, Some(p)) => format!("{} {}", s.name, p.display()),
                _ => s.name,
            })
            .collect()
    }
}

/// `fd` as a socket of type `ty` bound to the port of `info.addr`, or a warning and `None`.
fn checked(info: &SocketInfo, fd: OwnedFd, ty: socket2::Type) -> Option<socket2::Socket> {
    let s = socket2::Socket::from(fd);
    let port_ok = |s: &socket2::Socket| match (info.addr, s.local_addr().ok()?.as_socket()) {
        (Some(want), Some(got)) => Some(want.port() == 0 || want.port() == got.port()),
        _ => Some(false),
    };
    if s.r#type().ok() == Some(ty) && port_ok(&s) == Some(true) {
        Some(s)
    } else {
        tracing::warn!(socket = %info.name, addr = ?info.addr, "an inherited socket is not what its description says; opening it afresh");
        None
    }
}

/// The connection of a new process to the running one, between Offer and Ready.
pub struct Takeover {
    wire: Wire,
    pub previous_pid: u32,
}

/// What the old process reported when it stopped.
#[derive(Debug)]
pub struct Done {
    pub lease: Option<i64>,
    /// The etcd keys it had written under the lease (its `alive` record and tasks).
    pub keys: Vec<String>,
}

/// The old process after the hand-over: the connection closes when it exits.
pub struct Predecessor {
    /// `None` when the connection is already gone.
    wire: Option<Wire>,
    pub pid: u32,
}

impl Predecessor {
    /// Returns once the old process has exited (or closed the connection).
    pub async fn exited(self) {
        if let Some(mut wire) = self.wire {
            while let Ok(Some(_)) = wire.recv::<Message>().await {}
        }
    }
}

impl Takeover {
    /// Connects to the running daemon at `path` and receives its sockets and lease.
    pub async fn connect(path: &Path) -> Result<(Takeover, Inherited), UpgradeError> {
        let stream = match UnixStream::connect(path).await {
            Ok(s) => s,
            Err(source)
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(UpgradeError::NotRunning {
                    path: path.to_path_buf(),
                    source,
                });
            }
            Err(source) => {
                return Err(UpgradeError::Connect {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut wire = Wire::new(stream);
        let hello = Message::Hello {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        step("sending hello", wire.send(&hello, &[])).await?;
        let (msg, fds) = step("waiting for the offer", wire.recv::<Message>())
            .await?
            .ok_or_else(|| protocol("the running routemesh closed the connection"))?;
        match msg {
            Message::Offer {
                pid,
                version,
                generation,
                lease,
                sockets,
            } => {
                if sockets.len() != fds.len() {
                    return Err(protocol(format!(
                        "{} sockets described but {} received",
                        sockets.len(),
                        fds.len()
                    )));
                }
                let inherited = Inherited {
                    previous_pid: pid,
                    previous_version: version,
                    generation: generation + 1,
                    lease,
                    sockets: sockets.into_iter().zip(fds).collect(),
                };
                Ok((
                    Takeover {
                        wire,
                        previous_pid: pid,
                    },
                    inherited,
                ))
            }
            Message::Refused { reason } => Err(UpgradeError::Refused(reason)),
            other => Err(protocol(format!("unexpected answer {other:?}"))),
        }
    }

    /// Tells the old process that this one serves; returns once it has stopped accepting
    /// and writing, with what it had written. Past `Ready` this process is committed (the old
    /// one may have stopped already): without an answer it serves on, knowing nothing of the
    /// keys the old process wrote (`None`).
    pub async fn ready(mut self) -> Result<(Option<Done>, Predecessor), UpgradeError> {
        step("sending ready", self.wire.send(&Message::Ready, &[])).await?;
        let pid = self.previous_pid;
        let answer = tokio::time::timeout(DONE_TIMEOUT, self.wire.recv::<Message>()).await;
        let why = match answer {
            Ok(Ok(Some((Message::Done { lease, keys }, _)))) => {
                let predecessor = Predecessor {
                    wire: Some(self.wire),
                    pid,
                };
                return Ok((Some(Done { lease, keys }), predecessor));
            }
            Ok(Ok(Some((m, _)))) => format!("unexpected answer {m:?}"),
            Ok(Ok(None)) => "it closed the connection".into(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {DONE_TIMEOUT:?}"),
        };
        tracing::warn!(
            pid,
            "the old process did not confirm the hand-over ({why}); serving on, the keys it wrote are left as they are"
        );
        Ok((None, Predecessor { wire: None, pid }))
    }

    /// Tells the old process this one gives up (it keeps serving).
    pub async fn abort(mut self, reason: &str) {
        let msg = Message::Abort {
            reason: reason.to_string(),
        };
        let _ = tokio::time::timeout(STEP_TIMEOUT, self.wire.send(&msg, &[])).await;
    }
}

// ---- the running process's side -----------------------------------------------------------

/// What the app gives to a new process.
pub struct Offer {
    pub generation: u64,
    pub lease: Option<i64>,
    /// Duplicates of every socket (closed here once sent).
    pub sockets: Vec<(SocketInfo, OwnedFd)>,
}

/// The server's requests to the app (which owns the sockets and the lease keeper).
pub enum Request {
    /// Describe and duplicate every socket; read the lease.
    Offer(oneshot::Sender<Offer>),
    /// The new process serves: stop accepting and writing to etcd (keeping the lease);
    /// answer with the lease and the keys written under it.
    HandOver(HandOver),
}

/// [`Request::HandOver`]: the answer goes on `reply`; `sent` fires once it has gone out to
/// the new process, which the app awaits before it exits (an old process with nothing to
/// drain would otherwise exit before the new one hears that it has stopped).
pub struct HandOver {
    pub reply: oneshot::Sender<Done>,
    pub sent: oneshot::Receiver<()>,
}

/// Whether an upgrade may start now; a refusal says why.
#[derive(Debug, Default)]
pub struct Gate {
    busy: Mutex<Option<String>>,
}

impl Gate {
    /// Closed with `why` until [`Gate::open`].
    pub fn close(&self, why: String) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    pub fn open(&self) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Closes the gate with `why` unless it already is; returns the reason it was closed.
    fn enter(&self, why: String) -> Result<(), String> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        match &*busy {
            Some(reason) => Err(reason.clone()),
            None => {
                *busy = Some(why);
                Ok(())
            }
        }
    }
}

/// Serves upgrade requests on `listener` until `stop` (which a hand-over fires itself).
pub async fn serve(
    listener: UnixListener,
    gate: Arc<Gate>,
    app: mpsc::Sender<Request>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(hand_over(
            Wire::new(stream),
            gate.clone(),
            app.clone(),
            stop.clone(),
        ));
    }
}

/// One upgrade attempt, from Hello to Done (or to the new process giving up).
async fn hand_over(
    mut wire: Wire,
    gate: Arc<Gate>,
    app: mpsc::Sender<Request>,
    stop: CancellationToken,
) {
    let (pid, version) = match tokio::time::timeout(STEP_TIMEOUT, wire.recv::<Message>()).await {
        Ok(Ok(Some((Message::Hello { pid, version }, _)))) => (pid, version),
        Ok(Ok(Some((other, _)))) => {
            tracing::warn!(message = ?other, "upgrade socket: expected a hello; closing");
            return;
        }
        _ => return,
    };
    if let Err(reason) = gate.enter(format!(
        "an upgrade to process {pid} (version {version}) is already in progress"
    )) {
        tracing::warn!(pid, "upgrade refused: {reason}");
        let _ =
            tokio::time::timeout(STEP_TIMEOUT, wire.send(&Message::Refused { reason }, &[])).await;
        return;
    }
    match offer_and_wait(&mut wire, pid, &version, &app).await {
        Ok(()) => {
            // Handed over: no more upgrades here. The connection stays open until this
            // process exits, which is how the new one learns that it has.
            stop.cancel();
            std::future::pending::<()>().await;
        }
        Err(why) => {
            tracing::warn!(pid, "upgrade not done, still serving: {why}");
            gate.open();
        }
    }
}

async fn offer_and_wait(
    wire: &mut Wire,
    pid: u32,
    version: &str,
    app: &mpsc::Sender<Request>,
) -> Result<(), String> {
    let (tx, rx) = oneshot::channel();
    app.send(Request::Offer(tx))
        .await
        .map_err(|_| "the daemon is stopping".to_string())?;
    let offer = rx.await.map_err(|_| "the daemon is stopping".to_string())?;
    let (infos, fds): (Vec<SocketInfo>, Vec<OwnedFd>) = offer.sockets.into_iter().unzip();
    tracing::info!(pid, version, sockets = infos.len(), lease = ?offer.lease, "upgrade: a new process connected; handing it the sockets");
    let msg = Message::Offer {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        generation: offer.generation,
        lease: offer.lease,
        sockets: infos,
    };
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    tokio::time::timeout(STEP_TIMEOUT, wire.send(&msg, &borrowed))
        .await
        .map_err(|_| "timed out sending the sockets".to_string())?
        .map_err(|e| format!("cannot send the sockets: {e}"))?;
    drop(borrowed);
    drop(fds);
    match tokio::time::timeout(READY_TIMEOUT_OLD, wire.recv::<Message>()).await {
        Ok(Ok(Some((Message::Ready, _)))) => {}
        Ok(Ok(Some((Message::Abort { reason }, _)))) => {
            return Err(format!("the new process {pid} gave up: {reason}"));
        }
        Ok(Ok(Some((other, _)))) => {
            return Err(format!("unexpected message {other:?} from process {pid}"));
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            return Err(format!(
                "the new process {pid} went away before it was ready (see its output)"
            ));
        }
        Err(_) => {
            return Err(format!(
                "the new process {pid} was not ready within {READY_TIMEOUT_OLD:?}"
            ));
        }
    }
    let (tx, rx) = oneshot::channel();
    let (sent_tx, sent) = oneshot::channel();
    app.send(Request::HandOver(HandOver { reply: tx, sent }))
        .await
        .map_err(|_| "the daemon is stopping".to_string())?;
    let done = rx.await.map_err(|_| "the daemon is stopping".to_string())?;
    tracing::info!(pid, "upgrade: handed over to the new process; draining");
    let msg = Message::Done {
        lease: done.lease,
        keys: done.keys,
    };
    // Past this point the sockets are the new process's, whatever happens to this message.
    if let Err(e) = step("sending done", wire.send(&msg, &[])).await {
        tracing::warn!(pid, error = %e, "upgrade: could not confirm the hand-over");
    }
    let _ = sent_tx.send(());
    Ok(())
}

// ---- the socket file ----------------------------------------------------------------------

/// The bound upgrade socket file, removed on drop unless it was handed over.
pub struct SocketFile {
    pub path: PathBuf,
    ino: u64,
}

impl SocketFile {
    /// Forget the file: the new process serves on it now.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    fn of(path: &Path) -> Option<SocketFile> {
        let ino = std::fs::symlink_metadata(path).ok()?.ino();
        Some(SocketFile {
            path: path.to_path_buf(),
            ino,
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only our own file: another daemon may have replaced it since.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the directory if missing, then binds `path` with mode 0600 (bound under a
/// temporary name, chmod-ed, then renamed into place, so it is never reachable with wider
/// permissions). A stale file is replaced; one a live process serves is left alone.
pub fn bind(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another running routemesh serves it (give each daemon on a host its own [admin] upgrade_socket)",
                ));
            }
        }
        Err(_) => {}
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let file = SocketFile::of(path).ok_or_else(|| io::Error::other("socket file vanished"))?;
    Ok((listener, file))
}

/// The socket file of an inherited upgrade socket (removed by this process on exit).
pub fn adopt_file(path: &Path) -> Option<SocketFile> {
    SocketFile::of(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upgrade socket in a temporary folder, served by [`serve`] until `stop`; what it
    /// asks of the app arrives on `rx`.
    struct Served {
        path: PathBuf,
        rx: mpsc::Receiver<Request>,
        _file: SocketFile,
        _dir: tempfile::TempDir,
    }

    fn served(stop: CancellationToken) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        let (l, file) = bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(
            UnixListener::from_std(l).unwrap(),
            Arc::new(Gate::default()),
            tx,
            stop,
        ));
        Served {
            path,
            rx,
            _file: file,
            _dir: dir,
        }
    }

    #[test]
    fn bind_is_0600_replaces_stale_and_leaves_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/up.sock");
        let (l, file) = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind(&path).err().expect("live socket kept");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(l);
        // Stale (nobody listens) but the file is there: replaced.
        let (_l2, file2) = bind(&path).unwrap();
        drop(file); // the first file's inode is gone: does not remove the new one
        assert!(path.exists());
        drop(file2);
        assert!(!path.exists());
        std::fs::write(&path, "x").unwrap();
        assert!(bind(&path).is_err(), "a regular file is not replaced");
    }

    #[tokio::test]
    async fn a_second_upgrade_is_refused_while_one_is_in_progress() {
        let stop = CancellationToken::new();
        let Served {
            path,
            mut rx,
            _file,
            _dir,
        } = served(stop.clone());
        // The app: offers one UDP socket.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let app = tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                match req {
                    Request::Offer(reply) => {
                        let _ = reply.send(Offer {
                            generation: 4,
                            lease: Some(77),
                            sockets: vec![(
                                SocketInfo {
                                    kind: Kind::Udp,
                                    name: "u".into(),
                                    addr: Some(addr),
                                    path: None,
                                },
                                udp.as_fd().try_clone_to_owned().unwrap(),
                            )],
                        });
                    }
                    Request::HandOver(h) => {
                        let _ = h.reply.send(Done {
                            lease: Some(77),
                            keys: vec!["/p/tasks/s/t".into()],
                        });
                    }
                }
            }
        });
        let (first, mut inherited) = Takeover::connect(&path).await.unwrap();
        assert_eq!(inherited.generation, 5);
        assert_eq!(inherited.lease, Some(77));
        let got = inherited.take_udp(Kind::Udp, addr).expect("the udp socket");
        assert_eq!(got.local_addr().unwrap(), addr);
        match Takeover::connect(&path).await {
            Err(UpgradeError::Refused(why)) => assert!(why.contains("in progress"), "{why}"),
            other => panic!("second upgrade not refused: {:?}", other.map(|_| ())),
        }
        let (done, _pred) = first.ready().await.unwrap();
        assert_eq!(done.unwrap().keys, vec!["/p/tasks/s/t".to_string()]);
        assert!(stop.is_cancelled(), "the old side stops serving upgrades");
        app.abort();
    }

    #[tokio::test]
    async fn an_aborted_upgrade_opens_the_gate_again() {
        let Served {
            path,
            mut rx,
            _file,
            _dir,
        } = served(CancellationToken::new());
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                if let Request::Offer(reply) = req {
                    let _ = reply.send(Offer {
                        generation: 1,
                        lease: None,
                        sockets: vec![],
                    });
                }
            }
        });
        let (t, _) = Takeover::connect(&path).await.unwrap();
        t.abort("bad config").await;
        // Crash-like: connect and drop.
        for _ in 0..50 {
            match Takeover::connect(&path).await {
                Ok((t, _)) => {
                    drop(t);
                    return;
                }
                Err(UpgradeError::Refused(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the gate stayed closed after an abort");
    }
}
