//! Reads and writes on a socket for the proxies' copy loops, on tokio's readiness API.
//!
//! A read that returns less than the space offered means the socket is drained for now
//! (HAProxy bets the same way): its read readiness is cleared at once, so the next read
//! waits for epoll instead of paying a system call to learn EAGAIN. Nothing is missed:
//! new data raises a new edge, and tokio keeps the read-closed state (FIN, reset) across
//! clears.
//!
//! Also: peeking at a connection's first bytes until a parser is satisfied (PROXY headers,
//! TLS ClientHellos). Owns no connection state; callers own their buffers.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::buffers;

/// Spare room below which a read buffer grows before reading.
const MIN_SPARE: usize = 2048;

/// Waits until `s` has data, then reads what is there into `buf`'s spare room (grown by
/// `grow` when nearly full; nothing is zeroed). `Ok(0)`: end of stream.
///
/// The room is made only once the socket is readable, so a connection waiting with an empty
/// (released) buffer holds no memory for it while idle.
pub async fn read_some(s: &TcpStream, buf: &mut BytesMut, grow: usize) -> io::Result<usize> {
    loop {
        s.readable().await?;
        make_room(buf, grow);
        if let Some(r) = try_read_some(s, buf) {
            return r;
        }
    }
}

/// Room for a read in `buf`: a pooled buffer when it has none (an idle connection's released
/// buffer) and `grow` fits one, else `grow` more when less than [`MIN_SPARE`] is left.
pub fn make_room(buf: &mut BytesMut, grow: usize) {
    if buf.capacity() == 0 && grow <= buffers::READ_SIZE {
        buffers::take_read(buf);
    } else if buf.capacity() - buf.len() < MIN_SPARE {
        buf.reserve(grow.max(MIN_SPARE));
    }
}

/// One read without waiting; `None` when nothing had arrived.
pub fn try_read_some(s: &TcpStream, buf: &mut BytesMut) -> Option<io::Result<usize>> {
    let offered = buf.capacity() - buf.len();
    try_read_with(s, offered, || s.try_read_buf(buf))
}

/// Runs `read`, one non-blocking read of at most `offered` bytes from `s` (a recv, a
/// splice into a pipe), if `s` is readable. A short result clears the read readiness (the
/// socket is drained); `None`: nothing had arrived.
pub fn try_read_with(
    s: &TcpStream,
    offered: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> Option<io::Result<usize>> {
    let mut out = None;
    let _ = s.try_io(Interest::READABLE, || {
        let r = read();
        if let Err(e) = &r
            && e.kind() == io::ErrorKind::WouldBlock
        {
            return r.map(drop); // nothing there: tokio clears the readiness
        }
        let drained = matches!(r, Ok(n) if n > 0 && n < offered);
        out = Some(r);
        if drained {
            // Report "would block" to clear readiness; the bytes are already in `buf`.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    out
}

/// Writes all of `data`, waiting for room when the socket's buffer is full. Returns how
/// many bytes went out before an error, with the error.
pub async fn write_all(s: &TcpStream, data: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < data.len() {
        match s.try_write(&data[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = s.writable().await {
                    return Err((done, e));
                }
            }
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Reasons [`peek_until`] gives for the socket itself (metric labels of its caller).
pub struct PeekReasons {
    pub timeout: &'static str,
    pub read_error: &'static str,
    pub closed: &'static str,
}

/// Peeks at what waits on `s` (nothing is consumed) until `parse` is done with it:
/// `Ok(Some(_))` complete, `Ok(None)` needs more, `Err(reason)` never will be. The buffer
/// starts at `initial` bytes and grows fourfold up to `max` while full. Past `deadline`:
/// `reasons.timeout`.
pub async fn peek_until<T>(
    s: &TcpStream,
    initial: usize,
    max: usize,
    deadline: Instant,
    reasons: &PeekReasons,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, &'static str>,
) -> Result<T, &'static str> {
    let mut buf = vec![0u8; initial.min(max)];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Err(_) => return Err(reasons.timeout),
            Ok(Err(_)) => return Err(reasons.read_error),
            Ok(Ok(0)) => return Err(reasons.closed),
            Ok(Ok(n)) => n,
        };
        if let Some(done) = parse(&buf[..n])? {
            return Ok(done);
        }
        if n == buf.len() && buf.len() < max {
            buf.resize((buf.len() * 4).min(max), 0);
        } else if n == seen {
            // Peek returns at once while old bytes wait: pause for new ones.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(reasons.timeout),
            }
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn short_reads_then_more_data_and_eof_are_all_seen() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut w = TcpStream::connect(addr).await.unwrap();
        let (r, _) = l.accept().await.unwrap();
        let mut buf = BytesMut::new();
        w.write_all(b"one").await.unwrap();
        assert_eq!(read_some(&r, &mut buf, 4096).await.unwrap(), 3);
        // Readiness was cleared by the short read: the next bytes must still wake us.
        w.write_all(b"two").await.unwrap();
        assert_eq!(read_some(&r, &mut buf, 4096).await.unwrap(), 3);
        assert_eq!(&buf[..], b"onetwo");
        // Data and FIN together: the data, then the end.
        w.write_all(b"three").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let mut total = 0;
        loop {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                read_some(&r, &mut buf, 4096),
            )
            .await
            .expect("EOF after a short read must not be missed")
            .unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 5);
        assert_eq!(&buf[..], b"onetwothree");
    }

    #[tokio::test]
    async fn write_all_reports_bytes_written() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let w = TcpStream::connect(addr).await.unwrap();
        let (mut r, _) = l.accept().await.unwrap();
        write_all(&w, b"hello").await.unwrap();
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut r, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"hello");
    }
}
