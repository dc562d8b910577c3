//! Property tests of the codec: generated valid heads and bodies round-trip, every prefix of
//! a valid message asks for more, random and mutated bytes never panic and are never
//! accepted with another reading than httparse's, and refused heads stay refused whatever
//! the split across reads.

use proptest::prelude::*;

use super::body::{BodyReader, Framing, LAST_CHUNK, chunk_header};
use super::request::{self, Limits, Version};
use super::response::{self, ResponseRules};

const LIMITS: Limits = Limits {
    max_header_bytes: 65536,
    max_headers: 100,
};

#[derive(Debug, Clone)]
struct Head {
    method: String,
    target: String,
    http11: bool,
    fields: Vec<(String, Vec<u8>)>,
    framing: Framing,
}

impl Head {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.{}\r\n",
            self.method,
            self.target,
            if self.http11 { 1 } else { 0 }
        )
        .into_bytes();
        for (n, v) in &self.fields {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn field_name() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,15}".prop_filter("not a framing field", |n| {
        let l = n.to_ascii_lowercase();
        !matches!(
            l.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection" | "upgrade" | "expect"
        )
    })
}

/// Visible ASCII, inner spaces and tabs, obs-text; no surrounding whitespace.
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff, Just(b' '), Just(b'\t')],
        0..24,
    )
    .prop_map(|v| super::trim_ows(&v).to_vec())
}

fn valid_head() -> impl Strategy<Value = Head> {
    (
        prop_oneof![
            Just("GET"),
            Just("POST"),
            Just("PUT"),
            Just("DELETE"),
            Just("PATCH"),
            Just("HEAD")
        ],
        "/[a-zA-Z0-9/._~%-]{0,30}(\\?[a-z0-9=&]{0,10})?",
        any::<bool>(),
        proptest::collection::vec((field_name(), field_value()), 0..12),
        prop_oneof![
            Just(Framing::Empty),
            (1u64..1_000_000).prop_map(Framing::Length),
            Just(Framing::Chunked)
        ],
        "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
    )
        .prop_map(|(method, target, http11, mut fields, framing, host)| {
            if http11 {
                fields.insert(0, ("Host".into(), host.into_bytes()));
            }
            let framing = match framing {
                Framing::Chunked if !http11 => Framing::Empty,
                f => f,
            };
            match framing {
                Framing::Length(n) => fields.push(("Content-Length".into(), n.to_string().into())),
                Framing::Chunked => fields.push(("Transfer-Encoding".into(), b"chunked".to_vec())),
                _ => {}
            }
            Head {
                method: method.into(),
                target,
                http11,
                fields,
                framing,
            }
        })
}

/// (method, target, minor version, fields) as httparse reads `buf`, when it accepts it.
type Reading = (String, String, u8, Vec<(String, Vec<u8>)>);

fn httparse_reading(buf: &[u8]) -> Option<Reading> {
    let mut fields = vec![httparse::EMPTY_HEADER; LIMITS.max_headers];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some((
            req.method?.to_string(),
            req.path?.to_string(),
            req.version?,
            req.headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
        )),
        _ => None,
    }
}

fn our_reading(buf: &[u8]) -> Result<Option<Reading>, request::HeadError> {
    let mut s = request::storage(LIMITS.max_headers);
    Ok(request::parse(buf, &LIMITS, &mut s)?.map(|h| {
        (
            h.method.to_string(),
            h.target.to_string(),
            if h.version == Version::Http11 { 1 } else { 0 },
            h.headers
                .iter()
                .map(|f| (f.name.to_string(), f.value.to_vec()))
                .collect(),
        )
    }))
}

/// Heads the smuggling rules refuse.
const REFUSED: &[&str] = &[
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 41\r\nTransfer-Encoding: chunked\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 37\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rContent-Length: 37\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nContent-Length: 37\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "GET / HTTP/1.1\r\n\r\n",
    "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "GET / HTTP/1.1\nHost: a\n\n",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_heads_round_trip(h in valid_head()) {
        let raw = h.bytes();
        let mut s = request::storage(LIMITS.max_headers);
        let parsed = request::parse(&raw, &LIMITS, &mut s).unwrap().expect("whole head");
        prop_assert_eq!(parsed.len, raw.len());
        prop_assert_eq!(parsed.method, h.method.as_str());
        prop_assert_eq!(parsed.target, h.target.as_str());
        prop_assert_eq!(parsed.version == Version::Http11, h.http11);
        prop_assert_eq!(parsed.framing, h.framing);
        let got: Vec<(String, Vec<u8>)> = parsed
            .headers
            .iter()
            .map(|f| (f.name.to_string(), f.value.to_vec()))
            .collect();
        prop_assert_eq!(got, h.fields.clone());
    }

    #[test]
    fn every_prefix_of_a_valid_head_asks_for_more(h in valid_head()) {
        let raw = h.bytes();
        for cut in 0..raw.len() {
            let mut s = request::storage(LIMITS.max_headers);
            let r = request::parse(&raw[..cut], &LIMITS, &mut s);
            prop_assert!(matches!(r, Ok(None)), "prefix {} of {:?}: {:?}", cut, String::from_utf8_lossy(&raw), r);
        }
    }

    #[test]
    fn random_bytes_never_panic_nor_disagree_with_httparse(
        raw in proptest::collection::vec(any::<u8>(), 0..300)
    ) {
        if let Ok(Some(ours)) = our_reading(&raw) {
            prop_assert_eq!(Some(ours), httparse_reading(&raw));
        }
    }

    #[test]
    fn mutated_heads_never_panic_nor_disagree_with_httparse(
        h in valid_head(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4)
    ) {
        let mut raw = h.bytes();
        for (at, byte, kind) in edits {
            let i = at.index(raw.len());
            match kind {
                0 => raw[i] = byte,
                1 => raw.insert(i, byte),
                _ => { raw.remove(i); }
            }
        }
        if let Ok(Some(ours)) = our_reading(&raw) {
            prop_assert_eq!(Some(ours), httparse_reading(&raw));
        }
    }

    #[test]
    fn refused_heads_stay_refused_whatever_the_split(
        which in 0..REFUSED.len(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        // Bytes arrive in pieces; the head is parsed again from the start after each.
        let raw = REFUSED[which].as_bytes();
        let mut ends: Vec<usize> = cuts.iter().map(|c| c.index(raw.len())).collect();
        ends.push(raw.len());
        ends.sort_unstable();
        let mut refused = false;
        for end in ends {
            let mut s = request::storage(LIMITS.max_headers);
            match request::parse(&raw[..end], &LIMITS, &mut s) {
                Ok(Some(h)) => prop_assert!(false, "accepted {:?} after {} bytes: {:?}", REFUSED[which], end, h),
                Ok(None) => {}
                Err(_) => { refused = true; break; }
            }
        }
        prop_assert!(refused, "{:?} never refused", REFUSED[which]);
    }

    #[test]
    fn chunked_bodies_round_trip_whatever_the_split(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
        ext in proptest::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
        trailers in proptest::collection::vec((field_name(), field_value()), 0..3),
        splits in proptest::collection::vec(1usize..64, 1..50),
    ) {
        let mut raw = Vec::new();
        for c in &chunks {
            let start = raw.len();
            chunk_header(c.len(), &mut raw);
            if let Some(e) = &ext {
                // ";ext" before the CRLF of the size line
                let crlf = raw.len() - 2;
                raw.splice(crlf..crlf, format!(";{e}").into_bytes());
            }
            let _ = start;
            raw.extend_from_slice(c);
            raw.extend_from_slice(b"\r\n");
        }
        if trailers.is_empty() {
            raw.extend_from_slice(LAST_CHUNK);
        } else {
            raw.extend_from_slice(b"0\r\n");
            for (n, v) in &trailers {
                raw.extend_from_slice(n.as_bytes());
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(v);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"\r\n");
        }
        let want: Vec<u8> = chunks.concat();
        // In pieces: what is not taken is offered again with the next piece.
        let mut r = BodyReader::new(Framing::Chunked);
        let mut data = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut taken = 0;
        let mut sizes = splits.iter().cycle();
        while fed < raw.len() {
            let n = (*sizes.next().unwrap()).min(raw.len() - fed);
            pending.extend_from_slice(&raw[fed..fed + n]);
            fed += n;
            let k = r.advance(&pending, |d| data.extend_from_slice(d)).unwrap();
            taken += k;
            pending.drain(..k);
            if fed < raw.len() {
                prop_assert!(!r.is_done(), "done before the last byte");
            }
        }
        prop_assert!(r.is_done());
        prop_assert_eq!(taken, raw.len());
        prop_assert_eq!(data, want);
        // Bytes after the body are not taken.
        let mut r = BodyReader::new(Framing::Chunked);
        let mut more = raw.clone();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        prop_assert_eq!(r.relay(&more).unwrap(), raw.len());
    }

    #[test]
    fn random_bodies_never_panic(
        raw in proptest::collection::vec(any::<u8>(), 0..400),
        len in 0u64..500,
    ) {
        for framing in [Framing::Chunked, Framing::Length(len), Framing::Close, Framing::Empty] {
            let mut r = BodyReader::new(framing);
            if let Ok(n) = r.relay(&raw) {
                prop_assert!(n <= raw.len());
            }
        }
    }

    #[test]
    fn response_heads_round_trip_and_prefixes_ask_for_more(
        code in prop_oneof![200u16..208, 300u16..308, 400u16..452, 500u16..505],
        reason in "[A-Za-z ]{0,20}",
        fields in proptest::collection::vec((field_name(), field_value()), 0..10),
        length in proptest::option::of(0u64..100_000),
    ) {
        let mut raw = format!("HTTP/1.1 {code} {reason}\r\n").into_bytes();
        for (n, v) in &fields {
            raw.extend_from_slice(n.as_bytes());
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v);
            raw.extend_from_slice(b"\r\n");
        }
        match length {
            Some(n) => raw.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
            None => raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        }
        raw.extend_from_slice(b"\r\n");
        let rules = ResponseRules::default();
        let mut out = Vec::new();
        let h = response::parse(&raw, &rules, &mut out).unwrap().expect("whole head");
        prop_assert_eq!(h.len, raw.len());
        prop_assert_eq!(h.code, code);
        let want = match (code, length) {
            (204 | 304, _) => Framing::Empty,
            (_, Some(n)) => Framing::Length(n),
            (_, None) => Framing::Chunked,
        };
        prop_assert_eq!(h.framing, want);
        // The rewritten head is itself a valid head with the same fields plus Via.
        let mut again = Vec::new();
        let h2 = response::parse(&out, &rules, &mut again).unwrap().expect("rewritten head");
        prop_assert_eq!(h2.code, code);
        prop_assert_eq!(h2.framing, want);
        for cut in 0..raw.len() {
            prop_assert_eq!(response::parse(&raw[..cut], &rules, &mut Vec::new()), Ok(None));
        }
    }
}
