//! MQTT CONNECT parsing for client-id routing: a pure function over the bytes received so far.
//!
//! Owns recognising the first packet of an MQTT connection (protocol levels 3 = 3.1 "MQIsdp",
//! 4 = 3.1.1 and 5 = 5.0) and extracting the client identifier and keep-alive. It runs on the
//! bytes as they arrive: a prefix of a valid CONNECT is [`Parse::NeedMore`], never an error, so
//! the caller can call it again after each read. Does not own reading the socket, timeouts or
//! hashing (that is `proxy::tcp` and `balance`), and never judges what only the broker should
//! (authentication, client-id length limits of 3.1, ...): it rejects only what it cannot route.

/// Fixed header: one type byte and at most four remaining-length bytes.
pub const MAX_FIXED_HEADER: usize = 5;

/// What a complete CONNECT told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// 3, 4 or 5 (the bridge bit 0x80 that mosquitto bridges set is stripped).
    pub protocol_level: u8,
    /// The client identifier; empty when the client asks the broker to assign one.
    pub client_id: &'a str,
    /// Seconds; 0 = keep-alive off. The proxy's idle timeout, if any, must be ≥ 1.5 × this.
    pub keep_alive: u16,
    /// Clean session (3.x) or clean start (5.0).
    pub clean_start: bool,
    /// Bytes the whole packet takes: fixed header plus remaining length.
    pub packet_len: usize,
}

/// The outcome of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<'a> {
    /// A valid prefix of a CONNECT: read more.
    NeedMore,
    /// A complete, well-formed CONNECT at the start of the input.
    Complete(Connect<'a>),
}

/// Why the first packet cannot be routed. The connection is closed without opening any
/// upstream connection; [`ConnectError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("first packet is not CONNECT (packet type {0})")]
    NotConnect(u8),
    #[error("remaining length continues into a fifth byte")]
    LengthOverflow,
    #[error("remaining length {len} exceeds max_connect_bytes {max}")]
    TooLarge { len: usize, max: usize },
    #[error("client identifier is not valid UTF-8")]
    ClientIdNotUtf8,
    #[error("client identifier contains U+0000")]
    ClientIdNul,
    #[error("unsupported protocol name or level")]
    Protocol,
    #[error("malformed CONNECT: {0}")]
    Malformed(&'static str),
}

impl ConnectError {
    /// The `reason` label of `routemesh_mqtt_connect_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::NotConnect(_) => "not_connect",
            ConnectError::LengthOverflow => "bad_length",
            ConnectError::TooLarge { .. } => "too_large",
            ConnectError::ClientIdNotUtf8 => "client_id_utf8",
            ConnectError::ClientIdNul => "client_id_nul",
            ConnectError::Protocol => "bad_protocol",
            ConnectError::Malformed(_) => "malformed",
        }
    }
}

/// Why a field read stopped: the data is not there yet, or the packet is bad.
enum Halt {
    NeedMore,
    Bad(ConnectError),
}

impl From<ConnectError> for Halt {
    fn from(e: ConnectError) -> Halt {
        Halt::Bad(e)
    }
}

/// A cursor over the packet body. `limit` is the body length the header announced; `buf`
/// holds the part received so far (at most `limit` bytes), so a field that would run past
/// `limit` is malformed at once, while one past `buf` only needs more data.
struct Reader<'a> {
    buf: &'a [u8],
    limit: usize,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Halt> {
        let end = self.pos.saturating_add(n);
        if end > self.limit {
            return Err(ConnectError::Malformed("field runs past the end of the packet").into());
        }
        if end > self.buf.len() {
            return Err(Halt::NeedMore);
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Halt> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Halt> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A two-byte length followed by that many bytes.
    fn binary(&mut self) -> Result<&'a [u8], Halt> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// A variable byte integer (MQTT 5 property length).
    fn varint(&mut self) -> Result<usize, Halt> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ConnectError::Malformed("property length continues into a fifth byte").into())
    }

    /// MQTT 5 properties: a length, then skipped whole.
    fn skip_properties(&mut self) -> Result<(), Halt> {
        let n = self.varint()?;
        self.take(n).map(|_| ())
    }
}

/// Decodes the remaining length after the type byte: `Ok(None)` while incomplete, else the
/// value and how many bytes it took.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, ConnectError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(ConnectError::LengthOverflow)
}

/// Parses the CONNECT at the start of `buf` (the bytes received so far). `max_remaining`
/// bounds the packet's remaining length (`max_connect_bytes`), so the caller never buffers
/// more than `max_remaining + MAX_FIXED_HEADER` bytes. Bytes after the packet are ignored.
pub fn parse_connect(buf: &[u8], max_remaining: usize) -> Result<Parse<'_>, ConnectError> {
    let Some(&first) = buf.first() else {
        return Ok(Parse::NeedMore);
    };
    if first >> 4 != 1 {
        return Err(ConnectError::NotConnect(first >> 4));
    }
    if first & 0x0f != 0 {
        return Err(ConnectError::Malformed("reserved fixed-header flags set"));
    }
    let Some((len, len_bytes)) = remaining_length(&buf[1..])? else {
        return Ok(Parse::NeedMore);
    };
    if len > max_remaining {
        return Err(ConnectError::TooLarge {
            len,
            max: max_remaining,
        });
    }
    let start = 1 + len_bytes;
    let end = start + len;
    let mut r = Reader {
        buf: &buf[start..buf.len().min(end)],
        limit: len,
        pos: 0,
    };
    match body(&mut r) {
        Ok(mut c) => {
            c.packet_len = end;
            Ok(Parse::Complete(c))
        }
        Err(Halt::NeedMore) => Ok(Parse::NeedMore),
        Err(Halt::Bad(e)) => Err(e),
    }
}

fn body<'a>(r: &mut Reader<'a>) -> Result<Connect<'a>, Halt> {
    let name = r.binary()?;
    let raw_level = r.u8()?;
    let level = raw_level & 0x7f;
    match (name, level) {
        (b"MQIsdp", 3) | (b"MQTT", 4) | (b"MQTT", 5) => {}
        _ => return Err(ConnectError::Protocol.into()),
    }
    let flags = r.u8()?;
    if level >= 4 && flags & 0x01 != 0 {
        return Err(ConnectError::Malformed("reserved connect flag set").into());
    }
    let keep_alive = r.u16()?;
    if level == 5 {
        r.skip_properties()?;
    }
    let id = r.binary()?;
    let client_id = std::str::from_utf8(id).map_err(|_| ConnectError::ClientIdNotUtf8)?;
    if client_id.contains('\0') {
        return Err(ConnectError::ClientIdNul.into());
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    if will_qos == 3 {
        return Err(ConnectError::Malformed("will QoS 3").into());
    }
    if will {
        if level == 5 {
            r.skip_properties()?;
        }
        r.binary()?; // will topic
        r.binary()?; // will payload
    } else if level >= 4 && flags & 0x38 != 0 {
        return Err(ConnectError::Malformed("will QoS or retain without a will").into());
    }
    if flags & 0x80 != 0 {
        r.binary()?; // user name
    }
    if flags & 0x40 != 0 {
        r.binary()?; // password
    }
    if r.pos < r.limit {
        // Everything is parsed, yet the header announced more bytes than the fields use.
        return Err(ConnectError::Malformed("bytes after the last field").into());
    }
    Ok(Connect {
        protocol_level: level,
        client_id,
        keep_alive,
        clean_start: flags & 0x02 != 0,
        packet_len: 0, // set by the caller, which knows the header length
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the test encoder puts into a CONNECT.
    #[derive(Debug, Clone)]
    struct Spec {
        level: u8,
        client_id: Vec<u8>,
        keep_alive: u16,
        clean: bool,
        /// MQTT 5 property bytes (opaque to the parser).
        props: Vec<u8>,
        will: Option<(Vec<u8>, Vec<u8>, u8, bool)>,
        username: Option<Vec<u8>>,
        password: Option<Vec<u8>>,
    }

    fn spec(level: u8, id: &str) -> Spec {
        Spec {
            level,
            client_id: id.as_bytes().to_vec(),
            keep_alive: 60,
            clean: true,
            props: vec![],
            will: None,
            username: None,
            password: None,
        }
    }

    fn put_varint(out: &mut Vec<u8>, mut n: usize) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    fn put_binary(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    }

    /// An independent CONNECT encoder, written from the spec.
    fn encode(s: &Spec) -> Vec<u8> {
        let mut v = Vec::new();
        put_binary(&mut v, if s.level == 3 { b"MQIsdp" } else { b"MQTT" });
        v.push(s.level);
        let mut flags = 0u8;
        if s.clean {
            flags |= 0x02;
        }
        if let Some((_, _, qos, retain)) = &s.will {
            flags |= 0x04 | (qos << 3) | if *retain { 0x20 } else { 0 };
        }
        if s.username.is_some() {
            flags |= 0x80;
        }
        if s.password.is_some() {
            flags |= 0x40;
        }
        v.push(flags);
        v.extend_from_slice(&s.keep_alive.to_be_bytes());
        if s.level == 5 {
            put_varint(&mut v, s.props.len());
            v.extend_from_slice(&s.props);
        }
        put_binary(&mut v, &s.client_id);
        if let Some((topic, payload, _, _)) = &s.will {
            if s.level == 5 {
                put_varint(&mut v, s.props.len());
                v.extend_from_slice(&s.props);
            }
            put_binary(&mut v, topic);
            put_binary(&mut v, payload);
        }
        if let Some(u) = &s.username {
            put_binary(&mut v, u);
        }
        if let Some(p) = &s.password {
            put_binary(&mut v, p);
        }
        let mut out = vec![0x10];
        put_varint(&mut out, v.len());
        out.extend_from_slice(&v);
        out
    }

    const MAX: usize = 65536;

    fn complete(buf: &[u8]) -> Connect<'_> {
        match parse_connect(buf, MAX) {
            Ok(Parse::Complete(c)) => c,
            other => panic!("expected a complete CONNECT, got {other:?}"),
        }
    }

    #[test]
    fn parses_each_protocol_level() {
        for level in [3, 4, 5] {
            let mut s = spec(level, "esp8266-a1");
            s.keep_alive = 30;
            s.clean = false;
            s.props = vec![0x11, 0, 0, 0, 10]; // session expiry interval
            let bytes = encode(&s);
            let c = complete(&bytes);
            assert_eq!(c.protocol_level, level);
            assert_eq!(c.client_id, "esp8266-a1");
            assert_eq!(c.keep_alive, 30);
            assert!(!c.clean_start);
            assert_eq!(c.packet_len, bytes.len());
        }
    }

    #[test]
    fn mosquitto_pub_v311_bytes() {
        // What `mosquitto_pub -i c1 -k 60` sends first.
        let bytes = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1";
        let c = complete(bytes);
        assert_eq!((c.client_id, c.keep_alive, c.protocol_level), ("c1", 60, 4));
    }

    #[test]
    fn trailing_bytes_after_the_packet_are_ignored() {
        let mut bytes = encode(&spec(4, "x"));
        let n = bytes.len();
        bytes.extend_from_slice(b"\x82\x05"); // a SUBSCRIBE starting right after
        assert_eq!(complete(&bytes).packet_len, n);
    }

    #[test]
    fn every_prefix_needs_more() {
        let mut s = spec(5, "prefix-client");
        s.props = vec![0x21, 0, 10];
        s.will = Some((b"t/will".to_vec(), b"gone".to_vec(), 1, true));
        s.username = Some(b"u".to_vec());
        s.password = Some(b"p".to_vec());
        let bytes = encode(&s);
        for n in 0..bytes.len() {
            assert_eq!(
                parse_connect(&bytes[..n], MAX),
                Ok(Parse::NeedMore),
                "prefix {n}"
            );
        }
        complete(&bytes);
    }

    #[test]
    fn bad_inputs() {
        let err = |b: &[u8]| parse_connect(b, MAX).unwrap_err();
        assert_eq!(err(b"\x30\x02ab"), ConnectError::NotConnect(3));
        assert_eq!(err(b"GET / HTTP/1.1\r\n"), ConnectError::NotConnect(4));
        assert_eq!(
            err(b"\x10\xff\xff\xff\xff\x01"),
            ConnectError::LengthOverflow
        );
        assert_eq!(
            err(b"\x10\xff\xff\x7f"),
            ConnectError::TooLarge {
                len: 2_097_151,
                max: MAX
            }
        );
        assert_eq!(
            err(b"\x12\x00"),
            ConnectError::Malformed("reserved fixed-header flags set")
        );
        let mut s = spec(4, "");
        s.client_id = vec![b'a', 0xff, b'b'];
        assert_eq!(err(&encode(&s)), ConnectError::ClientIdNotUtf8);
        s.client_id = b"a\0b".to_vec();
        assert_eq!(err(&encode(&s)), ConnectError::ClientIdNul);
        assert_eq!(err(b"\x10\x0a\x00\x04MQTT\x07"), ConnectError::Protocol);
        assert_eq!(err(b"\x10\x0c\x00\x06MQIsdp\x04"), ConnectError::Protocol);
        // A client id longer than the packet.
        assert!(matches!(
            err(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x09"),
            ConnectError::Malformed(_)
        ));
        // The announced length is longer than the fields.
        let mut bytes = encode(&spec(4, "x"));
        bytes[1] += 1;
        bytes.push(0);
        assert!(matches!(err(&bytes), ConnectError::Malformed(_)));
        // Reasons are distinct metric labels.
        assert_eq!(ConnectError::LengthOverflow.reason(), "bad_length");
    }

    #[test]
    fn empty_client_id_and_bridge_bit() {
        let c = complete(b"\x10\x0c\x00\x04MQTT\x84\x02\x00\x00\x00\x00");
        assert_eq!((c.client_id, c.protocol_level), ("", 4));
    }

    #[test]
    fn invalid_utf8_is_reported_before_the_packet_ends() {
        let mut s = spec(4, "");
        s.client_id = vec![0xc3, 0x28];
        s.password = Some(vec![7; 100]);
        let bytes = encode(&s);
        let cut = bytes.len() - 50;
        assert_eq!(
            parse_connect(&bytes[..cut], MAX),
            Err(ConnectError::ClientIdNotUtf8)
        );
    }

    fn arb_spec() -> impl Strategy<Value = Spec> {
        (
            prop_oneof![Just(3u8), Just(4u8), Just(5u8)],
            "[^\u{0}]{0,40}",
            any::<u16>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of((
                proptest::collection::vec(any::<u8>(), 0..50),
                proptest::collection::vec(any::<u8>(), 0..200),
                0u8..3,
                any::<bool>(),
            )),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..30)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..30)),
        )
            .prop_map(
                |(level, id, keep_alive, clean, props, will, username, password)| Spec {
                    level,
                    client_id: id.into_bytes(),
                    keep_alive,
                    clean,
                    props,
                    will,
                    username,
                    password,
                },
            )
    }

    proptest! {
        #[test]
        fn no_panic_on_any_input(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                 max in 0usize..1000) {
            let _ = parse_connect(&bytes, max);
        }

        #[test]
        fn no_panic_on_mutated_connects(s in arb_spec(), at in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = encode(&s);
            let i = at % bytes.len();
            bytes[i] = byte;
            for n in 0..=bytes.len() {
                let _ = parse_connect(&bytes[..n], MAX);
            }
        }

        #[test]
        fn round_trip(s in arb_spec()) {
            let bytes = encode(&s);
            let c = complete(&bytes);
            prop_assert_eq!(c.protocol_level, s.level);
            prop_assert_eq!(c.client_id.as_bytes(), &s.client_id[..]);
            prop_assert_eq!(c.keep_alive, s.keep_alive);
            prop_assert_eq!(c.clean_start, s.clean);
            prop_assert_eq!(c.packet_len, bytes.len());
        }

        #[test]
        fn prefixes_need_more_and_chunks_agree(s in arb_spec(), cut in any::<usize>()) {
            let bytes = encode(&s);
            let n = cut % bytes.len();
            prop_assert_eq!(parse_connect(&bytes[..n], MAX), Ok(Parse::NeedMore));
            // Too small a limit is refused as soon as the length is known, never buffered.
            let len = remaining_length(&bytes[1..]).unwrap().unwrap().0;
            if len > 0 {
                let r = parse_connect(&bytes, len - 1);
                prop_assert!(
                    matches!(r, Err(ConnectError::TooLarge { .. })),
                    "{:?}", r
                );
            }
        }
    }
}
