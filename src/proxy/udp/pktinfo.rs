//! The address a datagram was sent to, on wildcard-bound udp listeners: IP_PKTINFO and
//! IPV6_RECVPKTINFO on receive, the same control message on send, so a reply leaves from
//! the address the client sent to (a multi-homed node answers from the right IP). IPv4
//! clients of a dual-stack `[::]` socket come as IPv4-mapped addresses; the kernel reports
//! and takes their local address the same way.
//!
//! The control messages are encoded and parsed here as bytes (no `CMSG_*` pointer walks).
//! Unsafe code is allowed in this module for two things only: `setsockopt` of an int
//! option, and viewing the receive buffer as `MaybeUninit` for socket2's `recvmsg`.
#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::mem::{MaybeUninit, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use socket2::{MaybeUninitSlice, MsgHdr, MsgHdrMut, SockAddr, SockRef};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The local end of a received datagram: the address it was sent to and the interface it
/// came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub ip: IpAddr,
    pub ifindex: u32,
}

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    /// `None` when the kernel gave no packet info (not enabled, or not IP).
    pub local: Option<Local>,
}

fn set_int(
    fd: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: `fd` is a live socket borrowed for the call; the option value is a c_int on
    // the stack and its exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel for each datagram's local address on `socket` (bound to `addr`).
pub fn enable(socket: impl AsFd, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        set_int(&socket, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    } else {
        set_int(&socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // IPv4 clients of a dual-stack socket (refused on v6-only sockets: no matter).
        let _ = set_int(&socket, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        Ok(())
    }
}

const ALIGN: usize = size_of::<usize>();
const HDR: usize = size_of::<libc::cmsghdr>();
const IN_PKTINFO: usize = 12;
const IN6_PKTINFO: usize = 20;

const fn align(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// Room for one control message of either kind.
pub const CONTROL_SPACE: usize = align(HDR) + align(IN6_PKTINFO) + align(HDR) + align(IN_PKTINFO);

/// The packet info in a received control buffer (IPv6's wins when both are there).
pub fn parse(control: &[u8]) -> Option<Local> {
    let mut found = None;
    let mut off = 0;
    while off + HDR <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + ALIGN..off + ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[off + ALIGN + 4..off + ALIGN + 8].try_into().ok()?);
        if len < HDR || off + len > control.len() {
            break;
        }
        let data = &control[off + HDR..off + len];
        if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO && data.len() >= IN_PKTINFO {
            // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
            let ifindex = i32::from_ne_bytes(data[0..4].try_into().ok()?) as u32;
            let ip = Ipv4Addr::new(data[8], data[9], data[10], data[11]);
            if found.is_none() {
                found = Some(Local {
                    ip: ip.into(),
                    ifindex,
                });
            }
        } else if level == libc::IPPROTO_IPV6
            && kind == libc::IPV6_PKTINFO
            && data.len() >= IN6_PKTINFO
        {
            // struct in6_pktinfo { in6_addr ipi6_addr; unsigned ipi6_ifindex; }
            let octets: [u8; 16] = data[0..16].try_into().ok()?;
            let ifindex = u32::from_ne_bytes(data[16..20].try_into().ok()?);
            found = Some(Local {
                ip: Ipv6Addr::from(octets).into(),
                ifindex,
            });
        }
        off += align(len);
    }
    found
}

/// Writes the control message that makes a datagram to `to` leave from `from` into `out`;
/// returns its length.
pub fn encode(from: &Local, to: SocketAddr, out: &mut [u8; CONTROL_SPACE]) -> usize {
    out.fill(0);
    let v4_from = match from.ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let v4_to = match to.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    let (level, kind, data_len) = match (v4_from, v4_to) {
        (Some(_), true) => (libc::IPPROTO_IP, libc::IP_PKTINFO, IN_PKTINFO),
        _ => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, IN6_PKTINFO),
    };
    let len = HDR + data_len;
    out[..ALIGN].copy_from_slice(&len.to_ne_bytes());
    out[ALIGN..ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
    out[ALIGN + 4..ALIGN + 8].copy_from_slice(&kind.to_ne_bytes());
    let data = &mut out[HDR..HDR + data_len];
    match (v4_from, data_len) {
        (Some(v4), IN_PKTINFO) => {
            // ifindex 0: the route decides; ipi_spec_dst is the source address (ipi_addr
            // is ignored on send; set alike).
            data[4..8].copy_from_slice(&v4.octets());
            data[8..12].copy_from_slice(&v4.octets());
        }
        _ => {
            let v6 = match from.ip {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            };
            data[0..16].copy_from_slice(&v6.octets());
            data[16..20].copy_from_slice(&from.ifindex.to_ne_bytes());
        }
    }
    align(len)
}

/// Receives one datagram with its packet info, without blocking (`WouldBlock` when there
/// is none; the socket's readiness is cleared then).
pub fn try_recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    socket.try_io(Interest::READABLE, || {
        let sock = SockRef::from(socket);
        let mut name = SockAddr::from(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)));
        let mut control = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        // SAFETY: the kernel only writes initialized bytes into the buffer, and `buf`
        // stays initialized memory whatever it writes; we read back only `len` bytes.
        let view: &mut [MaybeUninit<u8>] =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len()) };
        let mut bufs = [MaybeUninitSlice::new(view)];
        let mut msg = MsgHdrMut::new()
            .with_addr(&mut name)
            .with_buffers(&mut bufs)
            .with_control(&mut control);
        let len = sock.recvmsg(&mut msg, 0)?;
        let control_len = msg.control_len().min(CONTROL_SPACE);
        let mut bytes = [0u8; CONTROL_SPACE];
        for (b, c) in bytes.iter_mut().zip(&control[..control_len]) {
            // SAFETY: the kernel wrote `control_len` bytes of the control buffer.
            *b = unsafe { c.assume_init() };
        }
        let from = name
            .as_socket()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP source"))?;
        Ok(Received {
            len,
            from,
            local: parse(&bytes[..control_len]),
        })
    })
}

/// Sends `buf` to `to` from the local address `from` (when given): one non-blocking
/// system call, whatever tokio believes of the socket's readiness (a socket just made has
/// none yet). `WouldBlock` when its buffer is full.
pub fn send_now(
    socket: &impl AsFd,
    buf: &[u8],
    to: SocketAddr,
    from: Option<&Local>,
) -> io::Result<usize> {
    let sock = SockRef::from(socket);
    let addr = SockAddr::from(to);
    let Some(from) = from else {
        return sock.send_to(buf, &addr);
    };
    let mut control = [0u8; CONTROL_SPACE];
    let control_len = encode(from, to, &mut control);
    let bufs = [IoSlice::new(buf)];
    let msg = MsgHdr::new()
        .with_addr(&addr)
        .with_buffers(&bufs)
        .with_control(&control[..control_len]);
    sock.sendmsg(&msg, 0)
}

/// [`send_now`] through tokio's readiness (cleared on `WouldBlock`, so `writable()` then
/// waits for room).
pub fn try_send(
    socket: &UdpSocket,
    buf: &[u8],
    to: SocketAddr,
    from: Option<&Local>,
) -> io::Result<usize> {
    socket.try_io(Interest::WRITABLE, || send_now(socket, buf, to, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_parse_round_trips() {
        let mut out = [0u8; CONTROL_SPACE];
        for (from, to) in [
            ("10.0.0.7", "10.0.0.9:5683"),
            ("fd00::7", "[fd00::9]:5683"),
            ("::ffff:10.0.0.7", "[::ffff:10.0.0.9]:5683"),
        ] {
            let local = Local {
                ip: from.parse().unwrap(),
                ifindex: 3,
            };
            let n = encode(&local, to.parse().unwrap(), &mut out);
            let got = parse(&out[..n]).unwrap();
            // IPv4 (mapped or not) goes as IP_PKTINFO with the interface left to the route.
            if from.starts_with("::ffff:") || local.ip.is_ipv4() {
                assert_eq!(got.ip, local.ip.to_canonical());
                assert_eq!(got.ifindex, 0);
            } else {
                assert_eq!(got, local);
            }
        }
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0xff; 7]), None);
        // A length running past the buffer stops the walk.
        let mut bad = [0u8; CONTROL_SPACE];
        bad[..ALIGN].copy_from_slice(&(CONTROL_SPACE * 2).to_ne_bytes());
        assert_eq!(parse(&bad), None);
    }

    #[tokio::test]
    async fn the_local_address_of_a_wildcard_socket() {
        let bind: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let std = std::net::UdpSocket::bind(bind).unwrap();
        std.set_nonblocking(true).unwrap();
        enable(&std, bind).unwrap();
        let server = UdpSocket::from_std(std).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"hi", ("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 64];
        let got = loop {
            server.readable().await.unwrap();
            match try_recv(&server, &mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&buf[..got.len], b"hi");
        assert_eq!(got.from, client.local_addr().unwrap());
        let local = got.local.expect("packet info");
        assert_eq!(local.ip, IpAddr::from([127, 0, 0, 1]));
        loop {
            server.writable().await.unwrap();
            match try_send(&server, b"yo", got.from, Some(&local)) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        let (n, from) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"yo");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port)));
    }
}
