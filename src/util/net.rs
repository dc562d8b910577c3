//! Sockets as every part of the daemon opens them: listening sockets for published ports
//! and the admin and DNS endpoints ([`bind`]), outgoing connections to tasks and health
//! checks ([`dial`]), the TCP keepalive both carry, and the test for running out of
//! descriptors that the accept loop and the connect path share.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Binds a TCP listener for a published port. TCP_NODELAY and keepalive are set on the
/// listening socket: Linux copies them to every accepted connection, which saves five
/// system calls per connection.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    if addr.is_ipv6() {
        // "[::]:80" serves IPv4 too unless the system says otherwise.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Binds a udp listener's socket. No SO_REUSEADDR (on UDP it would let a second socket
/// share the port and take datagrams); larger buffers (best effort, the kernel caps them)
/// so bursts are not dropped while the loop is busy.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Opens one TCP connection with `timeout`, TCP_NODELAY and keepalive set.
pub async fn dial(addr: SocketAddr, timeout: std::time::Duration) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    set_keepalive(&stream);
    Ok(stream)
}

/// TCP keepalive so that a peer that vanished is noticed on long idle connections: probes
/// after 60 s idle, every 10 s, 6 unanswered ones close it.
pub fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6)
}

/// [`keepalive`] on a connection this node opened (accepted ones inherit it from their
/// listening socket, see [`bind`]).
pub fn set_keepalive(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive());
}

pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == libc::EMFILE || code == libc::ENFILE || code == libc::ENOBUFS || code == libc::ENOMEM
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(s.nodelay().unwrap());
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 6);
    }
}
