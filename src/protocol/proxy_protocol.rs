//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary): pure parsers and encoders.
//!
//! Used in two places: a listener with `accept_proxy = true` reads the header an external load
//! balancer put in front of the stream (so the client's address survives that hop), and a
//! service with `send_proxy = "v1" | "v2"` gets one written to each upstream connection right
//! after connect (so nginx or a broker sees the client instead of this daemon).
//!
//! No IO and no clock here: `parse` takes the bytes received so far and says whether they hold
//! a complete header (and how long it is), need more bytes, or can never become a valid one.
//! It never panics and never asks for more than [`MAX_V2_LEN`] bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes including the CRLF.
pub const MAX_V1_LEN: usize = 107;
/// 16 fixed bytes + a 16-bit length.
pub const MAX_V2_LEN: usize = 16 + u16::MAX as usize;

/// Which header version a service sends (`[service.NAME] send_proxy`).
pub use crate::config::ProxyVersion as Version;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxied connection's source (the client) and destination.
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// v1 `UNKNOWN`, v2 `LOCAL` (health checks of the balancer), or an address family other
    /// than TCP over IPv4/IPv6 (UNIX sockets, UDP): the connection's own addresses apply.
    Local,
}

/// The outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// A valid header of `len` bytes; the stream continues after it.
    Complete { header: Header, len: usize },
    /// A valid prefix so far: read more (never more than [`MAX_V2_LEN`] in all).
    NeedMore,
}

/// Why the bytes are not a PROXY header (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 line")]
    BadV1,
    #[error("PROXY v1 line longer than 107 bytes")]
    V1TooLong,
    #[error("unsupported PROXY v2 version or command")]
    BadV2Command,
    #[error("PROXY v2 address block shorter than its family needs")]
    BadV2Length,
}

impl Error {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Error::NotProxy => "proxy_missing",
            _ => "proxy_invalid",
        }
    }
}

/// Parses a v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parse, Error> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] && !buf.is_empty() {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(Parse::NeedMore)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if buf.is_empty() {
            Ok(Parse::NeedMore)
        } else {
            parse_v1(buf)
        };
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, Error> {
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if buf.len() >= MAX_V1_LEN {
            return Err(Error::V1TooLong);
        }
        if window.contains(&b'\n') {
            return Err(Error::BadV1);
        }
        return Ok(Parse::NeedMore);
    };
    match buf.get(cr + 1) {
        None => return Ok(Parse::NeedMore),
        Some(b'\n') => {}
        Some(_) => return Err(Error::BadV1),
    }
    let line = std::str::from_utf8(&buf[..cr]).map_err(|_| Error::BadV1)?;
    let mut parts = line.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(Error::BadV1);
    }
    let len = cr + 2;
    let header = match parts.next() {
        Some("UNKNOWN") => Header::Local, // the rest of the line is ignored by the spec
        Some(fam @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [s, d, sp, dp] = fields[..] else {
                return Err(Error::BadV1);
            };
            let ip = |t: &str| -> Result<IpAddr, Error> {
                if fam == "TCP4" {
                    t.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    t.parse::<Ipv6Addr>().map(IpAddr::V6)
                }
                .map_err(|_| Error::BadV1)
            };
            let port = |t: &str| -> Result<u16, Error> {
                // Decimal, no sign, no leading zeros (except "0").
                if t.is_empty()
                    || t.len() > 5
                    || !t.bytes().all(|b| b.is_ascii_digit())
                    || (t.len() > 1 && t.starts_with('0'))
                {
                    return Err(Error::BadV1);
                }
                t.parse().map_err(|_| Error::BadV1)
            };
            Header::Proxied {
                src: SocketAddr::new(ip(s)?, port(sp)?),
                dst: SocketAddr::new(ip(d)?, port(dp)?),
            }
        }
        _ => return Err(Error::BadV1),
    };
    Ok(Parse::Complete { header, len })
}

fn parse_v2(buf: &[u8]) -> Result<Parse, Error> {
    if buf.len() < 16 {
        // Check what we already have so garbage is refused early.
        if let Some(&vc) = buf.get(12)
            && (vc >> 4 != 2 || vc & 0x0f > 1)
        {
            return Err(Error::BadV2Command);
        }
        return Ok(Parse::NeedMore);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(Error::BadV2Command);
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Err(Error::BadV2Command);
    }
    let fam = buf[13];
    let addr_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + addr_len;
    if buf.len() < len {
        return Ok(Parse::NeedMore);
    }
    let block = &buf[16..len];
    if command == 0 {
        // LOCAL: the balancer's own connection (e.g. a health check).
        return Ok(Parse::Complete {
            header: Header::Local,
            len,
        });
    }
    let header = match fam {
        // TCP over IPv4
        0x11 => {
            if block.len() < 12 {
                return Err(Error::BadV2Length);
            }
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[o],
                    block[o + 1],
                    block[o + 2],
                    block[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Header::Proxied {
                src: SocketAddr::new(ip(0), port(8)),
                dst: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP over IPv6
        0x21 => {
            if block.len() < 36 {
                return Err(Error::BadV2Length);
            }
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&block[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Header::Proxied {
                src: SocketAddr::new(ip(0), port(32)),
                dst: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC, UDP, UNIX: keep the connection's own addresses (the spec says so for
        // families a receiver does not support).
        _ => Header::Local,
    };
    Ok(Parse::Complete { header, len })
}

/// Both addresses in one family: a mixed pair is written as IPv6 (IPv4-mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

/// The v1 line for a TCP connection from `src` to `dst`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The v2 header (command PROXY, TCP, no TLVs) for a connection from `src` to `dst`.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => unreachable!("same_family returns one family"),
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// The header of `version` for a connection from `src` to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match version {
        Version::V1 => encode_v1(src, dst),
        Version::V2 => encode_v2(src, dst),
    }
}

/// The addresses a receiver should use: IPv4-mapped IPv6 addresses are shown as IPv4.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /";
        assert_eq!(
            parse(line),
            Ok(Parse::Complete {
                header: Header::Proxied {
                    src: sa("192.168.0.1:56324"),
                    dst: sa("192.168.0.11:443")
                },
                len: line.len() - 5
            })
        );
        let line = b"PROXY TCP6 ::1 2001:db8::1 1 65535\r\n";
        assert!(matches!(
            parse(line),
            Ok(Parse::Complete {
                header: Header::Proxied { .. },
                len: 36
            })
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 whatever\r\n"),
            Ok(Parse::Complete {
                header: Header::Local,
                len: 32
            })
        );
    }

    #[test]
    fn v1_bad_inputs() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Error::NotProxy));
        assert_eq!(parse(&[0u8; 20]), Err(Error::NotProxy));
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert_eq!(parse(&long), Err(Error::V1TooLong));
        assert_eq!(parse(b"PRO"), Ok(Parse::NeedMore));
        assert_eq!(parse(b""), Ok(Parse::NeedMore));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parse::NeedMore));
    }

    #[test]
    fn v2_local_unix_and_bad() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&local),
            Ok(Parse::Complete {
                header: Header::Local,
                len: 16
            })
        );
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        assert_eq!(
            parse(&unix),
            Ok(Parse::Complete {
                header: Header::Local,
                len: 232
            })
        );
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 4, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(Error::BadV2Length));
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.push(0x31);
        assert_eq!(parse(&v3), Err(Error::BadV2Command));
        let mut cmd = V2_SIGNATURE.to_vec();
        cmd.extend_from_slice(&[0x22, 0x11, 0, 12]);
        assert_eq!(parse(&cmd), Err(Error::BadV2Command));
        // TLVs after the addresses are skipped.
        let mut tlv = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        tlv[15] += 7;
        tlv.extend_from_slice(&[0x01, 0x00, 0x04, b'h', b'2', b'x', b'y']);
        assert_eq!(
            parse(&tlv),
            Ok(Parse::Complete {
                header: Header::Proxied {
                    src: sa("1.2.3.4:5"),
                    dst: sa("6.7.8.9:10")
                },
                len: 35
            })
        );
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let h = encode_v1(sa("1.2.3.4:5"), sa("[::1]:80"));
        assert_eq!(h, b"PROXY TCP6 ::ffff:1.2.3.4 ::1 5 80\r\n");
        let Ok(Parse::Complete {
            header: Header::Proxied { src, .. },
            ..
        }) = parse(&encode_v2(sa("1.2.3.4:5"), sa("[::1]:80")))
        else {
            panic!()
        };
        assert_eq!(unmap(src), sa("1.2.3.4:5"));
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
        ]
    }

    proptest! {
        #[test]
        fn never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&buf);
        }

        #[test]
        fn never_panics_after_a_signature(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let head: &[u8] = if v2 { &V2_SIGNATURE } else { b"PROXY " };
            let buf = [head, &tail].concat();
            if let Ok(Parse::Complete { len, .. }) = parse(&buf) {
                prop_assert!(len <= buf.len());
            }
        }

        #[test]
        fn round_trip(src in any_addr(), dst in any_addr(), v2 in any::<bool>(),
                      tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let header = encode(version, src, dst);
            if !v2 {
                prop_assert!(header.len() <= MAX_V1_LEN);
            }
            let buf = [&header[..], &tail].concat();
            let parsed = parse(&buf);
            let Ok(Parse::Complete { header: Header::Proxied { src: s, dst: d }, len }) = parsed else {
                return Err(TestCaseError::fail(format!("{parsed:?}")));
            };
            prop_assert_eq!(len, header.len());
            if src.is_ipv4() == dst.is_ipv4() {
                prop_assert_eq!((s, d), (src, dst));
            } else {
                prop_assert_eq!((unmap(s), unmap(d)), (unmap(src), unmap(dst)));
            }
            // Every proper prefix asks for more.
            for cut in 0..header.len() {
                prop_assert_eq!(parse(&header[..cut]), Ok(Parse::NeedMore));
            }
        }
    }
}
