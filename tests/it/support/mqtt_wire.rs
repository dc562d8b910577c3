//! MQTT 3.1.1 packets as bytes, for the tests (and the MQTT bench) that speak to brokers
//! directly and through the daemon: CONNECT, PUBLISH, SUBSCRIBE, and cutting a byte stream
//! into packets.

/// CONNACK, session not present, connection accepted.
pub const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
/// DISCONNECT.
pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];

/// A length-prefixed string or binary field.
pub fn put_str(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A whole packet: the first byte (type and flags), the remaining length, `body`.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(first);
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// CONNECT, protocol level 4, with `client_id`, the clean-session flag when `clean`, and
/// `keep_alive` seconds (0: off).
pub fn connect(client_id: &[u8], clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + client_id.len());
    put_str(&mut body, b"MQTT");
    body.extend_from_slice(&[4, if clean { 0x02 } else { 0x00 }]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(&mut body, client_id);
    packet(0x10, &body)
}

/// PUBLISH at QoS 0.
pub fn publish(topic: &str, payload: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    body.extend_from_slice(payload.as_bytes());
    packet(0x30, &body)
}

/// SUBSCRIBE to one `filter` at QoS 0.
pub fn subscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    put_str(&mut body, filter.as_bytes());
    body.push(0);
    packet(0x82, &body)
}

/// One complete packet at the start of `buf`: (first byte, body, bytes used).
pub fn parse_packet(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = i + len;
    (buf.len() >= end).then(|| (buf[0], buf[i..end].to_vec(), end))
}
