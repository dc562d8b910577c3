//! The hand-over wire: one JSON message per line on a Unix stream socket, with descriptors
//! riding along as `SCM_RIGHTS` ancillary data. rustix's `sendmsg`/`recvmsg` are safe
//! wrappers (the descriptors come back as `OwnedFd`), so this needs no `unsafe`.
//!
//! Descriptors are attached to the bytes of the message they belong to, at most
//! [`FDS_PER_SEND`] per `sendmsg` (the kernel caps one message at 253), so a message with many
//! sockets is sent in several pieces, the first pieces one byte each. The receiver reads with
//! `recvmsg` only, collecting descriptors until the line ends. Received descriptors are
//! close-on-exec.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Descriptors per `sendmsg` (below the kernel's SCM_MAX_FD of 253).
pub const FDS_PER_SEND: usize = 200;
/// The longest message accepted (a hand-over of thousands of sockets stays far below).
const MAX_MESSAGE: usize = 4 << 20;

/// One end of a hand-over connection.
pub struct Wire {
    stream: UnixStream,
    /// Bytes read past the last message (the protocol is request/answer, so normally none).
    buf: Vec<u8>,
    /// Descriptors received with the message being read.
    fds: Vec<OwnedFd>,
}

impl Wire {
    pub fn new(stream: UnixStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Sends `msg` as one line with `fds` attached.
    pub async fn send<T: Serialize>(&mut self, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let chunks: Vec<&[BorrowedFd<'_>]> = fds.chunks(FDS_PER_SEND).collect();
        if chunks.len() > bytes.len() {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let mut off = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            // Every piece but the last carries one byte; the last one the rest.
            let end = if i + 1 < chunks.len() {
                off + 1
            } else {
                bytes.len()
            };
            off += self.send_piece(&bytes[off..end], chunk).await?;
            off = self.send_all(&bytes[..end], off).await?;
        }
        self.send_all(&bytes, off).await?;
        Ok(())
    }

    /// Writes `bytes[off..]` without descriptors; returns `bytes.len()`.
    async fn send_all(&self, bytes: &[u8], mut off: usize) -> io::Result<usize> {
        while off < bytes.len() {
            off += self.send_piece(&bytes[off..], &[]).await?;
        }
        Ok(off)
    }

    /// One `sendmsg`; the descriptors go with its first byte.
    async fn send_piece(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        let n = self
            .stream
            .async_io(Interest::WRITABLE, || {
                let mut space =
                    vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("descriptor buffer too small"));
                }
                rustix::net::sendmsg(
                    &self.stream,
                    &[IoSlice::new(bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(n)
    }

    /// The next message and the descriptors that came with it; `None` when the peer closed
    /// the connection between messages.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let fds = std::mem::take(&mut self.fds);
                let msg = serde_json::from_slice(&line[..pos]).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not a hand-over message ({e})"),
                    )
                })?;
                return Ok(Some((msg, fds)));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "hand-over message too long",
                ));
            }
            let mut chunk = [0u8; 8192];
            let (n, fds) = self
                .stream
                .async_io(Interest::READABLE, || {
                    let mut space = vec![
                        MaybeUninit::<u8>::uninit();
                        rustix::cmsg_space!(ScmRights(FDS_PER_SEND))
                    ];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let r = rustix::net::recvmsg(
                        &self.stream,
                        &mut [IoSliceMut::new(&mut chunk)],
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut fds = Vec::new();
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(got) = m {
                            fds.extend(got);
                        }
                    }
                    if r.flags.contains(ReturnFlags::CTRUNC) {
                        return Err(io::Error::other(
                            "descriptors were cut off in transit (process out of descriptors?)",
                        ));
                    }
                    Ok((r.bytes, fds))
                })
                .await?;
            self.fds.extend(fds);
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[tokio::test]
    async fn messages_carry_their_descriptors_even_hundreds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Wire::new(a), Wire::new(b));
        // 450 descriptors: three sendmsg pieces.
        let sockets: Vec<std::net::UdpSocket> = (0..450)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        let sender = async {
            a.send(&ports, &fds).await.unwrap();
            a.send(&"second", &[]).await.unwrap();
        };
        let receiver = async {
            let (got, fds): (Vec<u16>, _) = b.recv().await.unwrap().unwrap();
            assert_eq!(got, ports);
            assert_eq!(fds.len(), 450);
            for (fd, port) in fds.into_iter().zip(&ports) {
                let s = std::net::UdpSocket::from(fd);
                assert_eq!(s.local_addr().unwrap().port(), *port, "in order");
            }
            let (second, fds): (String, _) = b.recv().await.unwrap().unwrap();
            assert_eq!(second, "second");
            assert!(fds.is_empty());
        };
        tokio::join!(sender, receiver);
        drop(a);
        assert!(b.recv::<String>().await.unwrap().is_none(), "EOF");
    }
}
