//! The session table of one udp listener: client address → session, with the session limit
//! and idle expiry. Pure: no sockets and no clock (every call takes `now` in milliseconds),
//! so insertion, lookup, limits and expiry are unit-tested here; `udp.rs` keeps the sockets
//! in the values.
//!
//! A session's activity is the later of the last datagram from its client (recorded here by
//! [`SessionTable::touch`]) and the last reply from its task, which the caller reports
//! through [`Activity`] (the reply path runs elsewhere and keeps it in an atomic).

use std::collections::HashMap;
use std::net::SocketAddr;

/// What the table needs to know of a value: when its task last answered (ms, 0 = never).
pub trait Activity {
    fn last_reply_ms(&self) -> u64;
}

/// Why a session could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("{max} sessions open: the listener's max_sessions")]
    Full { max: usize },
}

struct Slot<V> {
    value: V,
    /// The last datagram from the client (ms).
    last_client_ms: u64,
    /// Distinguishes a session from a later one of the same client.
    id: u64,
}

/// Sessions by client address, at most `max` of them.
pub struct SessionTable<V> {
    slots: HashMap<SocketAddr, Slot<V>>,
    max: usize,
    next_id: u64,
}

impl<V: Activity> SessionTable<V> {
    pub fn new(max: usize) -> SessionTable<V> {
        SessionTable {
            slots: HashMap::new(),
            max,
            next_id: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The session of `client`, its activity refreshed to `now`.
    pub fn touch(&mut self, client: SocketAddr, now: u64) -> Option<(u64, &mut V)> {
        let slot = self.slots.get_mut(&client)?;
        slot.last_client_ms = now;
        Some((slot.id, &mut slot.value))
    }

    /// The session of `client`, untouched.
    pub fn get(&self, client: &SocketAddr) -> Option<&V> {
        self.slots.get(client).map(|s| &s.value)
    }

    /// The id the next inserted session will have (the value may need it, e.g. to report
    /// its own end).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Opens a session for `client` (replacing its old one, which is returned). Refused when
    /// `max` sessions are open and `client` has none.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        value: V,
        now: u64,
    ) -> Result<(u64, Option<V>), TableError> {
        if self.slots.len() >= self.max && !self.slots.contains_key(&client) {
            return Err(TableError::Full { max: self.max });
        }
        let id = self.next_id;
        self.next_id += 1;
        let old = self.slots.insert(
            client,
            Slot {
                value,
                last_client_ms: now,
                id,
            },
        );
        Ok((id, old.map(|s| s.value)))
    }

    /// Whether one more session may be opened for a client that has none.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.max
    }

    /// Removes `client`'s session, whatever it is.
    pub fn remove(&mut self, client: &SocketAddr) -> Option<V> {
        self.slots.remove(client).map(|s| s.value)
    }

    /// Removes `client`'s session if it is still session `id` (a session that ended on its
    /// own must not take a newer one of the same client with it).
    pub fn remove_if(&mut self, client: &SocketAddr, id: u64) -> Option<V> {
        match self.slots.get(client) {
            Some(s) if s.id == id => self.remove(client),
            _ => None,
        }
    }

    /// Removes and returns every session without a datagram either way for `idle_ms` or
    /// more at `now`.
    pub fn expire(&mut self, now: u64, idle_ms: u64) -> Vec<(SocketAddr, V)> {
        let idle = |s: &Slot<V>| {
            let last = s.last_client_ms.max(s.value.last_reply_ms());
            now.saturating_sub(last) >= idle_ms
        };
        let gone: Vec<SocketAddr> = self
            .slots
            .iter()
            .filter(|(_, s)| idle(s))
            .map(|(a, _)| *a)
            .collect();
        gone.into_iter()
            .filter_map(|a| self.slots.remove(&a).map(|s| (a, s.value)))
            .collect()
    }

    /// Changes the limit (a reload); sessions above it stay until they end.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Every session (for revalidation after a snapshot change).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.slots.values_mut().map(|s| &mut s.value)
    }

    /// Removes the sessions `drop` says should go; returns them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&V) -> bool) -> Vec<(SocketAddr, V)> {
        let gone: Vec<SocketAddr> = self
            .slots
            .iter()
            .filter(|(_, s)| drop(&s.value))
            .map(|(a, _)| *a)
            .collect();
        gone.into_iter()
            .filter_map(|a| self.slots.remove(&a).map(|s| (a, s.value)))
            .collect()
    }

    /// Removes every session.
    pub fn clear(&mut self) -> Vec<V> {
        self.slots.drain().map(|(_, s)| s.value).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A value with a settable last reply time.
    #[derive(Debug, PartialEq)]
    struct V(u64);
    impl Activity for V {
        fn last_reply_ms(&self) -> u64 {
            self.0
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn insert_lookup_limit() {
        let mut t = SessionTable::new(2);
        assert!(t.is_empty());
        let (id1, old) = t.insert(addr(1), V(0), 10).unwrap();
        assert_eq!(old, None);
        assert_eq!(t.next_id(), id1 + 1);
        t.insert(addr(2), V(0), 10).unwrap();
        assert!(!t.has_room());
        assert_eq!(
            t.insert(addr(3), V(0), 10),
            Err(TableError::Full { max: 2 })
        );
        // The same client may replace its session even when the table is full.
        let (id1b, old) = t.insert(addr(1), V(5), 11).unwrap();
        assert_eq!(old, Some(V(0)));
        assert_ne!(id1, id1b);
        assert_eq!(
            t.touch(addr(1), 12).map(|(id, v)| (id, v.0)),
            Some((id1b, 5))
        );
        assert!(t.touch(addr(3), 12).is_none());
        assert_eq!(t.len(), 2);
        // A stale id removes nothing.
        assert_eq!(t.remove_if(&addr(1), id1), None);
        assert_eq!(t.remove_if(&addr(1), id1b), Some(V(5)));
        assert!(t.has_room());
        assert_eq!(t.get(&addr(2)), Some(&V(0)));
        assert_eq!(t.remove(&addr(2)), Some(V(0)));
        assert!(t.is_empty());
    }

    #[test]
    fn expiry_counts_both_directions() {
        let mut t = SessionTable::new(10);
        t.insert(addr(1), V(0), 1000).unwrap(); // client at 1000, no reply
        t.insert(addr(2), V(1500), 1000).unwrap(); // a reply at 1500
        t.insert(addr(3), V(0), 1000).unwrap();
        t.touch(addr(3), 1800); // client again at 1800
        assert!(t.expire(1999, 1000).is_empty());
        let gone: Vec<u16> = t.expire(2000, 1000).iter().map(|(a, _)| a.port()).collect();
        assert_eq!(gone, [1]);
        let gone: Vec<u16> = t.expire(2500, 1000).iter().map(|(a, _)| a.port()).collect();
        assert_eq!(gone, [2]);
        assert_eq!(t.len(), 1);
        let gone = t.remove_where(|_| true);
        assert_eq!(gone.len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn a_lower_limit_keeps_open_sessions() {
        let mut t = SessionTable::new(3);
        for p in 1..=3 {
            t.insert(addr(p), V(0), 0).unwrap();
        }
        t.set_max(1);
        assert_eq!(t.len(), 3);
        assert!(t.insert(addr(9), V(0), 0).is_err());
        assert_eq!(t.clear().len(), 3);
        assert!(t.insert(addr(9), V(0), 0).is_ok());
    }

    proptest! {
        /// However clients come and go, the table never holds more than `max` sessions and
        /// never expires a session that was active within the idle time.
        #[test]
        fn bounded_and_never_expires_the_active(
            ops in prop::collection::vec((0u16..50, 0u64..5, any::<bool>()), 1..400),
            max in 1usize..20,
        ) {
            let idle = 100;
            let mut t = SessionTable::new(max);
            let mut now = 1u64;
            for (port, step, expire) in ops {
                now += step * 10;
                let open = t.touch(addr(port), now).is_some()
                    || t.insert(addr(port), V(0), now).is_ok();
                prop_assert!(t.len() <= max);
                if expire {
                    t.expire(now, idle);
                    // The session just touched is still there.
                    prop_assert_eq!(t.get(&addr(port)).is_some(), open);
                }
            }
        }
    }
}
