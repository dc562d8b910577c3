//! When to order a certificate: pure arithmetic on Unix seconds (the caller passes the
//! wall clock, since certificates carry wall times), unit-tested without waiting.
//!
//! A certificate is renewed `renew_before` ahead of its NOT AFTER, but never earlier than
//! half-way through its life (a CA issuing certificates shorter than `renew_before` must not
//! be asked again at once), minus a jitter of up to a tenth of that window derived from the
//! name and the expiry, so every node computes the same time and certificates issued
//! together do not all renew in the same second. After failures, nobody orders before the
//! status record's `retry_at`, set with [`backoff`]: doubling from 30 s up to 1 h.

use std::time::Duration;

/// Backoff after `failures` failed orders in a row (1 = the first failure).
pub fn backoff(failures: u32) -> Duration {
    const BASE: u64 = 30;
    const MAX: u64 = 3600;
    let n = failures.saturating_sub(1).min(16);
    Duration::from_secs((BASE << n).min(MAX))
}

/// A stable hash for the jitter (FNV-1a).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Unix second at which a certificate valid `not_before..not_after` is renewed.
pub fn renew_at(name: &str, not_before: u64, not_after: u64, renew_before: Duration) -> u64 {
    let life = not_after.saturating_sub(not_before);
    let window = renew_before.as_secs().min(life / 2);
    let spread = window / 10;
    let jitter = if spread == 0 {
        0
    } else {
        fnv(format!("{name}/{not_after}").as_bytes()) % (spread + 1)
    };
    not_after.saturating_sub(window + jitter)
}

/// What is known about one certificate when deciding.
#[derive(Debug, Clone, Copy, Default)]
pub struct Known {
    /// Validity of the stored certificate, when there is one for the wanted names.
    pub valid: Option<(u64, u64)>,
    /// `retry_at` of the status record after failures (0 = none).
    pub retry_at: u64,
}

/// The Unix second from which the certificate `name` should be ordered (≤ now: now).
pub fn due_at(name: &str, known: Known, renew_before: Duration) -> u64 {
    let due = match known.valid {
        None => 0,
        Some((nb, na)) => renew_at(name, nb, na, renew_before),
    };
    due.max(known.retry_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn renews_ahead_with_bounded_jitter() {
        let rb = Duration::from_secs(30 * DAY);
        let (nb, na) = (1_000_000, 1_000_000 + 90 * DAY);
        let at = renew_at("www.example.com", nb, na, rb);
        assert!(at <= na - 30 * DAY && at >= na - 33 * DAY, "{at}");
        // The same inputs give the same time on every node; other names spread.
        assert_eq!(at, renew_at("www.example.com", nb, na, rb));
        let spread: std::collections::BTreeSet<u64> = (0..20)
            .map(|i| renew_at(&format!("n{i}.example.com"), nb, na, rb))
            .collect();
        assert!(spread.len() > 10);
    }

    #[test]
    fn short_certificates_renew_half_way() {
        // 40 s certificate, renew_before 30 d: renewed at 20 s (minus up to 2 s), not at once.
        let at = renew_at("a", 100, 140, Duration::from_secs(30 * DAY));
        assert!((118..=120).contains(&at), "{at}");
        // renew_before shorter than half the life is kept.
        let at = renew_at("a", 100, 160, Duration::from_secs(10));
        assert!((149..=150).contains(&at), "{at}");
    }

    #[test]
    fn missing_is_due_now_and_failures_wait() {
        let rb = Duration::from_secs(30 * DAY);
        assert_eq!(due_at("a", Known::default(), rb), 0);
        let k = Known {
            valid: None,
            retry_at: 500,
        };
        assert_eq!(due_at("a", k, rb), 500);
        let k = Known {
            valid: Some((0, 90 * DAY)),
            retry_at: 5,
        };
        assert!(due_at("a", k, rb) >= 57 * DAY);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(30));
        assert_eq!(backoff(2), Duration::from_secs(60));
        assert_eq!(backoff(3), Duration::from_secs(120));
        assert_eq!(backoff(50), Duration::from_secs(3600));
        assert_eq!(backoff(0), Duration::from_secs(30));
    }
}
