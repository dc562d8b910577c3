//! A pure, incremental reader of a TLS ClientHello: enough to route a connection by its SNI
//! without terminating TLS. Takes the bytes received so far; says "need more", "complete"
//! (with the server name, if any) or why the bytes can never be a ClientHello. Handles a
//! ClientHello split over several TLS records and over several reads. Never panics, never
//! looks past `max` bytes. No IO.

/// What the first bytes of a connection hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A valid prefix: read more.
    NeedMore,
    /// A whole ClientHello; `sni` is its lower-cased host name (no trailing dot).
    Complete { sni: Option<String> },
}

/// Why the bytes are refused (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS handshake record")]
    NotTls,
    #[error("the first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("malformed ClientHello")]
    Malformed,
    #[error("ClientHello larger than the limit")]
    TooLarge,
}

impl HelloError {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            HelloError::NotTls => "tls_not_tls",
            HelloError::NotClientHello | HelloError::Malformed => "tls_bad_client_hello",
            HelloError::TooLarge => "tls_client_hello_too_large",
        }
    }
}

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const MAX_RECORD: usize = 16 * 1024;
const EXT_SERVER_NAME: u16 = 0;

/// Parses the ClientHello at the start of `buf`, refusing one longer than `max` bytes
/// (records included).
pub fn parse(buf: &[u8], max: usize) -> Result<Hello, HelloError> {
    // Gather the handshake bytes from consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(head) = buf.get(at..at + 5) else {
            // A partial record header: check what we have.
            let part = &buf[at.min(buf.len())..];
            if let Some(&t) = part.first()
                && t != RECORD_HANDSHAKE
            {
                return Err(if at == 0 {
                    HelloError::NotTls
                } else {
                    HelloError::Malformed
                });
            }
            if let Some(&major) = part.get(1)
                && major != 3
            {
                return Err(HelloError::NotTls);
            }
            return need_more(buf, max);
        };
        if head[0] != RECORD_HANDSHAKE {
            return Err(if at == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed
            });
        }
        if head[1] != 3 {
            return Err(HelloError::NotTls);
        }
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::Malformed);
        }
        if at + 5 + len > max {
            return Err(HelloError::TooLarge);
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else {
            // Use what has arrived of this record to fail early on garbage.
            hs.extend_from_slice(&buf[at + 5..]);
            check_partial(&hs, max)?;
            return need_more(buf, max);
        };
        hs.extend_from_slice(fragment);
        at += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello);
            }
            let body_len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if body_len > max {
                return Err(HelloError::TooLarge);
            }
            if hs.len() >= 4 + body_len {
                return client_hello(&hs[4..4 + body_len]).map(|sni| Hello::Complete { sni });
            }
        }
    }
}

fn need_more(buf: &[u8], max: usize) -> Result<Hello, HelloError> {
    if buf.len() >= max {
        Err(HelloError::TooLarge)
    } else {
        Ok(Hello::NeedMore)
    }
}

fn check_partial(hs: &[u8], max: usize) -> Result<(), HelloError> {
    if let Some(&t) = hs.first()
        && t != HANDSHAKE_CLIENT_HELLO
    {
        return Err(HelloError::NotClientHello);
    }
    if hs.len() >= 4 && u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize > max {
        return Err(HelloError::TooLarge);
    }
    Ok(())
}

/// A cursor that fails instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.buf.len() < n {
            return Err(HelloError::Malformed);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The SNI of a ClientHello body (after the 4-byte handshake header).
fn client_hello(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { buf: body };
    let version = r.take(2)?;
    if version[0] != 3 {
        return Err(HelloError::Malformed);
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(HelloError::Malformed); // session id
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(HelloError::Malformed); // compression methods
    }
    if r.buf.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut exts = Reader { buf: r.vec16()? };
    if !r.buf.is_empty() {
        return Err(HelloError::Malformed);
    }
    let mut sni = None;
    while !exts.buf.is_empty() {
        let ty = exts.u16()? as u16;
        let data = exts.vec16()?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            return Err(HelloError::Malformed); // duplicate extension
        }
        let mut list = Reader { buf: data };
        let mut names = Reader { buf: list.vec16()? };
        if !list.buf.is_empty() {
            return Err(HelloError::Malformed);
        }
        while !names.buf.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == 0 && sni.is_none() {
                sni = Some(host_name(name)?);
            }
        }
    }
    Ok(sni)
}

/// A DNS host name, lower-cased, without a trailing dot.
fn host_name(raw: &[u8]) -> Result<String, HelloError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && !raw.starts_with(b".")
        && !raw.windows(2).any(|w| w == b"..");
    if !ok {
        return Err(HelloError::Malformed);
    }
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ClientHello with `sni` (and some other extension), in one record.
    pub(crate) fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // supported_versions (43): TLS 1.3
        exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        if let Some(name) = sni {
            let n = name.as_bytes();
            let entry_len = 3 + n.len();
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
            exts.extend_from_slice(&(entry_len as u16).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
            exts.extend_from_slice(n);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, MAX_RECORD)
    }

    /// `hs` in handshake records of at most `frag` bytes.
    pub(crate) fn records(hs: &[u8], frag: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(frag) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn sni_found_in_one_or_many_records() {
        let h = hello(Some("MQTT.Example.com."));
        assert_eq!(
            parse(&h, 16384),
            Ok(Hello::Complete {
                sni: Some("mqtt.example.com".into())
            })
        );
        // Split over 7-byte records.
        let hs = &h[5..];
        let split = records(hs, 7);
        assert_eq!(
            parse(&split, 16384),
            Ok(Hello::Complete {
                sni: Some("mqtt.example.com".into())
            })
        );
        // Every prefix asks for more (split across reads).
        for cut in 0..split.len() {
            assert_eq!(
                parse(&split[..cut], 16384),
                Ok(Hello::NeedMore),
                "cut {cut}"
            );
        }
        assert_eq!(
            parse(&hello(None), 16384),
            Ok(Hello::Complete { sni: None })
        );
    }

    #[test]
    fn garbage_truncated_and_oversized() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", 16384), Err(HelloError::NotTls));
        assert_eq!(parse(b"\x16\x02", 16384), Err(HelloError::NotTls));
        assert_eq!(
            parse(b"\x16\x03\x01\x00\x00", 16384),
            Err(HelloError::Malformed)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 16384),
            Err(HelloError::NotClientHello)
        );
        // Declared handshake longer than the limit.
        assert_eq!(
            parse(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", 1024),
            Err(HelloError::TooLarge)
        );
        // A ClientHello that does not fit in `max`.
        let h = hello(Some(&"a".repeat(200)));
        assert_eq!(parse(&h, 128), Err(HelloError::TooLarge));
        // Inner lengths that lie.
        let mut h = hello(Some("a.b"));
        let n = h.len();
        h[n - 5] = 0xff; // the name's length
        assert_eq!(parse(&h, 16384), Err(HelloError::Malformed));
        // A bad host name.
        assert_eq!(
            parse(&hello(Some("a b")), 16384),
            Err(HelloError::Malformed)
        );
        // A non-handshake record after the first.
        let mut h = records(&hello(Some("x.y"))[5..], 10);
        h.truncate(15);
        h.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse(&h, 16384), Err(HelloError::Malformed));
    }

    proptest! {
        #[test]
        fn never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..2048) {
            let _ = parse(&buf, max);
        }

        #[test]
        fn never_panics_inside_a_record(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = vec![RECORD_HANDSHAKE, 3, 1];
            buf.extend_from_slice(&(tail.len() as u16).to_be_bytes());
            buf.extend_from_slice(&tail);
            let _ = parse(&buf, 16384);
        }

        #[test]
        fn sni_round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..5), frag in 1usize..300) {
            let name = labels.join(".");
            let split = records(&hello(Some(&name))[5..], frag);
            prop_assert_eq!(parse(&split, 65536), Ok(Hello::Complete { sni: Some(name) }));
        }
    }
}
