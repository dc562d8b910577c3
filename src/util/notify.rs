//! systemd's readiness protocol (`sd_notify(3)`): one datagram to `$NOTIFY_SOCKET`. With
//! `Type=notify` systemd waits for `READY=1` before the unit counts as started (so
//! `systemctl start routemesh@green` returns once the upgrade has taken over) and learns the
//! new main PID from `MAINPID=`. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1") when running under systemd; failures are logged only.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(&path, state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// Sends `state` to the notification socket `path` (`@name`: an abstract address).
pub fn notify_to(path: &OsStr, state: &str) -> io::Result<()> {
    let s = UnixDatagram::unbound()?;
    match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            s.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(())
}

/// `READY=1` with this process as the unit's main process.
pub fn ready() {
    notify(&ready_state());
}

fn ready_state() -> String {
    format!("READY=1\nMAINPID={}", std::process::id())
}

/// `STOPPING=1`: this process has handed over or is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_datagram_to_a_path_or_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        super::notify_to(path.as_os_str(), &super::ready_state()).unwrap();
        let mut buf = [0u8; 128];
        let n = server.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(text, format!("READY=1\nMAINPID={}", std::process::id()));

        use std::os::linux::net::SocketAddrExt;
        let name = format!("routemesh-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        super::notify_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
