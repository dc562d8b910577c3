//! The app's side of an upgrade (src/upgrade/ has the protocol): which sockets this process
//! takes from the old one or opens itself, what it offers the next one, and when it counts as
//! ready to take over.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};

use super::AppError;
use super::listeners::Listeners;
use crate::admin::AdminState;
use crate::upgrade::{self, Inherited, Kind, Offer, SocketFile, SocketInfo};
use crate::util::net;

/// How long a new process may take to get ready (listeners bound, discovery synced) before
/// it gives up and the old one keeps serving.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// An inherited TCP socket of `kind` at `addr`, or a freshly bound one.
pub(super) fn tcp(
    inherited: &mut Option<Inherited>,
    kind: Kind,
    addr: SocketAddr,
    what: &str,
) -> Result<TcpListener, AppError> {
    let bind_err = |source| AppError::Bind {
        what: what.into(),
        addr,
        source,
    };
    match inherited.as_mut().and_then(|i| i.take_tcp(kind, addr)) {
        Some(s) => {
            s.set_nonblocking(true).map_err(bind_err)?;
            TcpListener::from_std(s).map_err(bind_err)
        }
        None => net::bind(addr).map_err(bind_err),
    }
}

/// The DNS responder's sockets: inherited ones, else freshly bound.
pub(super) fn dns(
    inherited: &mut Option<Inherited>,
    addr: SocketAddr,
) -> Result<crate::dns::Sockets, AppError> {
    let tcp = tcp(inherited, Kind::DnsTcp, addr, "dns listener")?;
    let bind_err = |source| AppError::Bind {
        what: "dns listener".into(),
        addr,
        source,
    };
    let udp = match inherited
        .as_mut()
        .and_then(|i| i.take_udp(Kind::DnsUdp, addr))
    {
        Some(s) => s,
        None => std::net::UdpSocket::bind(addr).map_err(bind_err)?,
    };
    udp.set_nonblocking(true).map_err(bind_err)?;
    Ok(crate::dns::Sockets {
        udp: UdpSocket::from_std(udp).map_err(bind_err)?,
        tcp,
    })
}

/// The upgrade socket: inherited when the path is the same, else bound; `None` (with a
/// warning) when it cannot be had — the daemon runs, only upgrades of it are off.
pub(super) fn upgrade_socket(
    inherited: &mut Option<Inherited>,
    path: Option<&Path>,
) -> Option<(tokio::net::UnixListener, SocketFile)> {
    let path = path?;
    let (std_listener, file) = match inherited.as_mut().and_then(|i| i.take_upgrade(path)) {
        Some(l) => (l, upgrade::adopt_file(path)?),
        None => match upgrade::bind(path) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot serve the upgrade socket; `routemesh run --upgrade` cannot take over from this process (set [admin] upgrade_socket to a writable path; under systemd use RuntimeDirectory=routemesh)");
                return None;
            }
        },
    };
    let listener = std_listener
        .set_nonblocking(true)
        .and_then(|_| tokio::net::UnixListener::from_std(std_listener));
    match listener {
        Ok(l) => Some((l, file)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot serve the upgrade socket");
            None
        }
    }
}

/// Duplicates of the daemon's own sockets (admin, DNS, upgrade), kept to offer them.
#[derive(Default)]
pub(super) struct Held {
    pub admin: Option<(SocketAddr, OwnedFd)>,
    pub dns: Option<(SocketAddr, OwnedFd, OwnedFd)>,
    pub upgrade: Option<(PathBuf, OwnedFd)>,
}

/// A duplicate of `fd`, or a warning (the socket is then opened afresh by the next process).
pub(super) fn dup(fd: BorrowedFd<'_>, what: &str) -> Option<OwnedFd> {
    fd.try_clone_to_owned()
        .map_err(|e| tracing::warn!(socket = what, error = %e, "cannot duplicate a socket"))
        .ok()
}

impl Held {
    /// Every socket of this process, described and duplicated, for the next one.
    pub fn offer(&self, listeners: &Listeners, generation: u64, lease: Option<i64>) -> Offer {
        let info = |kind, name: &str, addr, path| SocketInfo {
            kind,
            name: name.to_string(),
            addr,
            path,
        };
        let mut sockets = Vec::new();
        if let Some((addr, fd)) = &self.admin {
            sockets.extend(
                dup(fd.as_fd(), "admin")
                    .map(|d| (info(Kind::Admin, "admin", Some(*addr), None), d)),
            );
        }
        for (name, addr, kind, fd) in listeners.sockets() {
            sockets.extend(dup(fd, name).map(|d| (info(kind, name, Some(addr), None), d)));
        }
        if let Some((addr, udp, tcp)) = &self.dns {
            sockets.extend(
                dup(udp.as_fd(), "dns").map(|d| (info(Kind::DnsUdp, "dns", Some(*addr), None), d)),
            );
            sockets.extend(
                dup(tcp.as_fd(), "dns").map(|d| (info(Kind::DnsTcp, "dns", Some(*addr), None), d)),
            );
        }
        if let Some((path, fd)) = &self.upgrade {
            sockets.extend(
                dup(fd.as_fd(), "upgrade")
                    .map(|d| (info(Kind::Upgrade, "upgrade", None, Some(path.clone())), d)),
            );
        }
        Offer {
            generation,
            lease,
            sockets,
        }
    }
}

/// Why this process is not ready to take over yet, or `None`.
fn not_ready(admin: &AdminState) -> Option<&'static str> {
    if !admin
        .listeners_bound
        .load(std::sync::atomic::Ordering::Acquire)
    {
        Some("listeners not bound yet")
    } else if !admin.discovery.synced() {
        Some("discovery has not synced yet (is etcd reachable?)")
    } else {
        None
    }
}

/// Waits until listeners are bound and discovery has synced; after `within` (if any), the
/// reason it is still not ready.
pub(super) async fn wait_ready(admin: &AdminState, within: Option<Duration>) -> Result<(), String> {
    let deadline = within.map(|w| tokio::time::Instant::now() + w);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        match not_ready(admin) {
            None => return Ok(()),
            Some(why) if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                return Err(why.to_string());
            }
            Some(_) => {}
        }
    }
}
