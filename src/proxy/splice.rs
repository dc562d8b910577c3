//! Zero-copy forwarding with splice(2): bytes move socket → pipe → socket inside the kernel,
//! never through a user-space buffer. This is the one module that needs `unsafe` (three libc
//! calls on file descriptors we own or borrow for the call's duration); everything else in the
//! crate forbids it.
//!
//! The pipe is created lazily on the first readable event, so an idle connection costs no
//! pipe at all. When a pipe cannot be created (descriptor limit), `None` tells the caller to
//! fall back to the buffered copy.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::socket::try_read_with;

/// The default pipe capacity, and most bytes moved per splice call with it.
const CHUNK: usize = 64 * 1024;
/// The capacity asked for a forwarding pipe: fewer, larger splices for bulk flows. Pages are
/// only taken as data passes; the kernel may refuse (pipe-max-size), and CHUNK stays.
const BULK_PIPE: usize = 512 * 1024;

/// A non-blocking pipe; both ends close on drop.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a valid, writable array of two c_ints as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Asks for a `size`-byte pipe; returns the capacity it has.
    fn grow(&self, size: usize) -> usize {
        // SAFETY: fcntl on a descriptor this pipe owns; F_SETPIPE_SZ takes an int.
        let rc = unsafe {
            libc::fcntl(
                self.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                size as libc::c_int,
            )
        };
        if rc > 0 { rc as usize } else { CHUNK }
    }
}

/// One non-blocking splice call between two descriptors.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from live
    // owners by the callers); null offsets are allowed for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// How a forward ended without a socket error.
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// EOF from the source: the caller shuts down the destination's write side.
    Eof,
    /// No pipe could be made (descriptor limit): the caller goes on with a buffered copy.
    NoPipe,
}

/// Moves bytes `from` → `to` until EOF on `from`, counting them with `on_bytes`. `Err` on any
/// socket error.
pub async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> io::Result<Forwarded> {
    let mut pipe: Option<(Pipe, usize)> = None;
    loop {
        from.readable().await?;
        let (p, chunk) = match &pipe {
            Some((p, c)) => (p, *c),
            None => match Pipe::new() {
                Ok(p) => {
                    let c = p.grow(BULK_PIPE);
                    let (p, c) = pipe.insert((p, c));
                    (&*p, *c)
                }
                Err(_) => return Ok(Forwarded::NoPipe),
            },
        };
        // A splice that moved less than it could clears the readiness, as a short read does.
        let moved = match try_read_with(from, chunk, || {
            splice(from.as_raw_fd(), p.write.as_raw_fd(), chunk)
        }) {
            None => continue,
            Some(Ok(0)) => return Ok(Forwarded::Eof),
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(e),
        };
        // Drain the pipe into the destination before reading more.
        let mut left = moved;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(p.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        on_bytes(moved as u64);
    }
}

/// Whether splice works here (checked once per process with a pipe pair).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| Pipe::new().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_bytes_and_eof() {
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l1.local_addr().unwrap()).await.unwrap();
        let (a, _) = l1.accept().await.unwrap();
        let b = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
        let (mut sink, _) = l2.accept().await.unwrap();
        let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t2 = total.clone();
        let fwd = tokio::spawn(async move {
            let r = forward(&a, &b, &|n| {
                t2.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            })
            .await;
            drop(b);
            r
        });
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        sink.read_to_end(&mut got).await.unwrap();
        assert_eq!(fwd.await.unwrap().unwrap(), Forwarded::Eof);
        assert_eq!(got, payload);
        assert_eq!(total.load(std::sync::atomic::Ordering::Relaxed), 300_000);
    }
}
