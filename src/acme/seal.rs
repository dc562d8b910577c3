//! Sealing secrets at rest in etcd: ChaCha20-Poly1305 (ring's AEAD) under the key of
//! `[acme] key_file`, so a copy of etcd leaks no private key.
//!
//! A sealed value is text: `v1:KEYID:BASE64(nonce ‖ ciphertext ‖ tag)`. KEYID (8 hex digits
//! of SHA-256 of the key) lets a node with another key file say so plainly instead of
//! reporting a bad tag; the etcd key the value is stored under is the associated data, so
//! a sealed value copied under another key does not open. Pure apart from the random nonce
//! ([`seal`] takes it from the caller; [`seal_random`] draws it).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::acme::SealKeyBytes;

/// Why a sealed value does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed value (expected v1:KEYID:DATA)")]
    Format,
    #[error(
        "sealed with key {sealed_with}, but key_file holds key {ours}: give this node the key_file the other nodes use"
    )]
    WrongKey { sealed_with: String, ours: String },
    #[error("does not open with key {0} (corrupted, or stored under another etcd key)")]
    Corrupt(String),
    #[error("no randomness for a nonce")]
    Random,
}

/// The sealing key with its id.
#[derive(Clone)]
pub struct SealKey {
    key: [u8; 32],
    id: String,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.id)
    }
}

impl SealKey {
    pub fn new(bytes: &SealKeyBytes) -> SealKey {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes.0);
        let id = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        SealKey { key: bytes.0, id }
    }

    /// 8 hex digits naming the key (not secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.key).expect("32-byte key"))
    }
}

/// Seals `plain` for storage under etcd key `aad` with the given nonce (never reuse one).
pub fn seal(key: &SealKey, aad: &str, plain: &[u8], nonce: [u8; NONCE_LEN]) -> String {
    let mut buf = plain.to_vec();
    key.aead()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut buf,
        )
        .expect("chacha20-poly1305 seals any length we store");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    format!("v1:{}:{}", key.id, STANDARD.encode(out))
}

/// [`seal`] with a fresh random nonce.
pub fn seal_random(key: &SealKey, aad: &str, plain: &[u8]) -> Result<String, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;
    Ok(seal(key, aad, plain, nonce))
}

/// Opens a value sealed by [`seal`] under etcd key `aad`.
pub fn open(key: &SealKey, aad: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
    let mut parts = sealed.trim().splitn(3, ':');
    let (Some("v1"), Some(id), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SealError::Format);
    };
    if id != key.id {
        return Err(SealError::WrongKey {
            sealed_with: id.to_string(),
            ours: key.id.clone(),
        });
    }
    let raw = STANDARD.decode(data).map_err(|_| SealError::Format)?;
    if raw.len() < NONCE_LEN {
        return Err(SealError::Format);
    }
    let (nonce, rest) = raw.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    let mut buf = rest.to_vec();
    let plain = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut buf,
        )
        .map_err(|_| SealError::Corrupt(key.id.clone()))?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SealKey {
        SealKey::new(&SealKeyBytes([b; 32]))
    }

    #[test]
    fn round_trip_and_failures() {
        let k = key(1);
        let s = seal(&k, "/rm/acme/certs/a", b"secret", [7; NONCE_LEN]);
        assert!(s.starts_with(&format!("v1:{}:", k.id())));
        assert!(!s.contains("secret"));
        assert_eq!(open(&k, "/rm/acme/certs/a", &s).unwrap(), b"secret");
        // Another key file: named, not a bad tag.
        match open(&key(2), "/rm/acme/certs/a", &s) {
            Err(SealError::WrongKey { sealed_with, ours }) => {
                assert_eq!(sealed_with, k.id());
                assert_eq!(ours, key(2).id());
            }
            other => panic!("{other:?}"),
        }
        // Moved under another etcd key.
        assert!(matches!(
            open(&k, "/rm/acme/certs/b", &s),
            Err(SealError::Corrupt(_))
        ));
        // Tampered.
        let mut t = s.clone();
        t.pop();
        t.push(if s.ends_with('A') { 'B' } else { 'A' });
        assert!(open(&k, "/rm/acme/certs/a", &t).is_err());
        assert_eq!(open(&k, "x", "garbage"), Err(SealError::Format));
        assert_eq!(
            open(&k, "x", &format!("v1:{}:!!", k.id())),
            Err(SealError::Format)
        );
        let r1 = seal_random(&k, "a", b"x").unwrap();
        let r2 = seal_random(&k, "a", b"x").unwrap();
        assert_ne!(r1, r2);
        assert_eq!(open(&k, "a", &r2).unwrap(), b"x");
    }
}
