//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size whose
//! slots name tasks, built once per snapshot; a pick is `table[hash % size]`.
//!
//! Every node must compute the same choice with no shared state, so everything that goes into
//! the table is a pure function of the candidate set: tasks are taken in task-id order (the
//! snapshot's `tasks` slice is sorted by id), each task's permutation comes from hashing its id
//! with fixed seeds ([`hash64`], stable across processes and versions), and weights enter as
//! integer credits. When a task leaves, only slots it held (plus a small Maglev overshoot) are
//! refilled; when it returns, the table is bit-for-bit the one before.
//!
//! When the picked task is unusable on this node (ejected, unhealthy, already tried), the pick
//! walks on to the next slots until it meets a different usable task: the fallback, too, is the
//! same on every node that sees the same tasks unusable.

use std::net::IpAddr;
use std::sync::Arc;

use crate::snapshot::Task;

/// Default table size: prime, and ≫ the task count so shares are even to a fraction of a %.
pub const TABLE_SIZE: usize = 65537;

/// Seeds of the two permutation hashes of a task id, and of the key hash. Changing any of
/// them (or [`hash64`]) moves every client on a rolling upgrade: never do.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SEED_SKIP: u64 = 0x6d61_676c_6576_736b; // "maglevsk"
const SEED_KEY: u64 = 0x726f_7574_656d_6b79; // "routemky"

const EMPTY: u32 = u32::MAX;

/// A stable 64-bit hash: FNV-1a over the bytes from a seeded basis, then the murmur3 64-bit
/// finaliser so every input bit reaches every output bit. Unlike std's `RandomState` it is the
/// same in every process, on every node, in every version.
pub fn hash64(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= data.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The hash of a routing key (MQTT client id, header value, ...).
pub fn key_hash(key: &[u8]) -> u64 {
    hash64(SEED_KEY, key)
}

/// The hash of a client IP; an IPv4-mapped IPv6 address hashes as the IPv4 address.
pub fn ip_hash(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => key_hash(&v4.octets()),
        IpAddr::V6(v6) => key_hash(&v6.octets()),
    }
}

/// The hash of a client IP and port (`hash_key = "source_addr"`); IPv4-mapped addresses
/// hash as IPv4.
pub fn addr_hash(addr: std::net::SocketAddr) -> u64 {
    let mut key = [0u8; 18];
    let n = match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            key[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            key[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    key[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    key_hash(&key[..n + 2])
}

#[derive(Debug)]
pub struct Maglev {
    candidates: Vec<usize>,
    /// Task index per slot; empty when there are no candidates.
    table: Box<[u32]>,
    /// One past the largest task index in the table (sizes the fallback walk's bitmap).
    index_bound: usize,
}

impl Maglev {
    /// Builds the table over `candidates` (indices into `tasks`, ascending = task-id order).
    pub fn new(tasks: &[Arc<Task>], candidates: Vec<usize>) -> Maglev {
        Self::with_size(tasks, candidates, TABLE_SIZE)
    }

    /// Builds a table of `size` slots; `size` must be prime (and > 1) so that every skip
    /// walks all slots.
    pub fn with_size(tasks: &[Arc<Task>], candidates: Vec<usize>, size: usize) -> Maglev {
        debug_assert!(
            size > 1
                && (2..size)
                    .take_while(|d| d * d <= size)
                    .all(|d| !size.is_multiple_of(d))
        );
        let index_bound = candidates.iter().map(|&i| i + 1).max().unwrap_or(0);
        if candidates.is_empty() {
            return Maglev {
                candidates,
                table: Box::new([]),
                index_bound,
            };
        }
        let m = size as u64;
        let n = candidates.len();
        // Each task's next preferred slot, its step, its weight and its accumulated credit.
        let mut pos = Vec::with_capacity(n);
        let mut skip = Vec::with_capacity(n);
        let mut weight = Vec::with_capacity(n);
        for &i in &candidates {
            let id = tasks[i].id.as_str().as_bytes();
            pos.push(hash64(SEED_OFFSET, id) % m);
            skip.push(hash64(SEED_SKIP, id) % (m - 1) + 1);
            weight.push(tasks[i].weight.max(1) as u64);
        }
        let max_weight = weight.iter().copied().max().unwrap_or(1);
        let mut credit = vec![0u64; n];
        let mut table = vec![EMPTY; size].into_boxed_slice();
        let mut filled = 0;
        // Round after round, each task earns its weight in credit and claims one slot (its next
        // free preference) per `max_weight` of credit: shares follow the weights exactly.
        'fill: loop {
            for k in 0..n {
                credit[k] += weight[k];
                while credit[k] >= max_weight {
                    credit[k] -= max_weight;
                    loop {
                        let p = pos[k] as usize;
                        // pos, skip < m: a subtraction instead of a (slow) modulo.
                        pos[k] += skip[k];
                        if pos[k] >= m {
                            pos[k] -= m;
                        }
                        if table[p] == EMPTY {
                            table[p] = candidates[k] as u32;
                            break;
                        }
                    }
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            candidates,
            table,
            index_bound,
        }
    }

    /// The task index of `hash`'s slot, usable or not.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }

    /// Picks `hash`'s task, or when it is not usable the next different usable task in table
    /// order. Without a hash, a random slot: spread by weight.
    pub fn pick(&self, hash: Option<u64>, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let size = self.table.len();
        if size == 0 {
            return None;
        }
        let hash = hash.unwrap_or_else(|| fastrand::u64(..));
        let start = (hash % size as u64) as usize;
        let first = self.table[start] as usize;
        if usable(first) {
            return Some(first);
        }
        // Rare path: remember rejected tasks so each is asked once, and stop when all were.
        let mut rejected = vec![false; self.index_bound];
        rejected[first] = true;
        let mut left = self.candidates.len() - 1;
        for k in 1..size {
            if left == 0 {
                break;
            }
            let t = self.table[(start + k) % size] as usize;
            if rejected[t] {
                continue;
            }
            if usable(t) {
                return Some(t);
            }
            rejected[t] = true;
            left -= 1;
        }
        None
    }

    pub fn candidates(&self) -> &[usize] {
        &self.candidates
    }

    /// Slots per task index (for tests and /routes-style introspection).
    pub fn shares(&self) -> Vec<usize> {
        let mut counts = vec![0; self.index_bound];
        for &t in self.table.iter() {
            counts[t as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TaskId;
    use crate::snapshot::test_task;
    use std::net::SocketAddr;

    fn named(id: &str, weight: u32) -> Arc<Task> {
        Arc::new(Task {
            id: TaskId::new(id).unwrap(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1000)),
            node: None,
            weight,
            node_ready: true,
            node_drained: false,
            state: Arc::default(),
        })
    }

    fn all(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    #[test]
    fn hash_is_stable_across_processes_and_versions() {
        // Golden values: if these change, every client moves on upgrade.
        assert_eq!(hash64(0, b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(key_hash(b"esp8266-0001"), 0xd5c7_5eaf_691a_5b08);
        assert_ne!(key_hash(b"a"), key_hash(b"b"));
        assert_eq!(
            ip_hash("::ffff:10.0.0.1".parse().unwrap()),
            ip_hash("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn equal_weights_share_evenly() {
        let tasks: Vec<_> = (0..7).map(|i| test_task(i, 1)).collect();
        let m = Maglev::new(&tasks, all(7));
        let shares = m.shares();
        let ideal = TABLE_SIZE as f64 / 7.0;
        for s in shares {
            assert!((s as f64 - ideal).abs() / ideal < 0.01, "{s} vs {ideal}");
        }
    }

    #[test]
    fn weights_are_respected() {
        let ws = [1, 2, 3, 10, 4];
        let tasks: Vec<_> = ws
            .iter()
            .enumerate()
            .map(|(i, &w)| test_task(i, w))
            .collect();
        let m = Maglev::new(&tasks, all(ws.len()));
        let total: u32 = ws.iter().sum();
        for (i, s) in m.shares().into_iter().enumerate() {
            let want = TABLE_SIZE as f64 * ws[i] as f64 / total as f64;
            assert!(
                (s as f64 - want).abs() / want < 0.03,
                "task {i}: {s} vs {want}"
            );
        }
        // And keys follow the table.
        let mut hits = [0usize; 5];
        for k in 0..100_000u32 {
            hits[m.pick(Some(key_hash(&k.to_le_bytes())), &|_| true).unwrap()] += 1;
        }
        for (i, h) in hits.into_iter().enumerate() {
            let want = 100_000.0 * ws[i] as f64 / total as f64;
            assert!(
                (h as f64 - want).abs() / want < 0.05,
                "task {i}: {h} vs {want}"
            );
        }
    }

    #[test]
    fn deterministic_from_the_task_set() {
        let tasks: Vec<_> = (0..20)
            .map(|i| named(&format!("mqtt-{i}"), 1 + i % 3))
            .collect();
        let a = Maglev::new(&tasks, all(20));
        let b = Maglev::new(&tasks, all(20));
        assert_eq!(a.table, b.table);
        // Another process sees the same ids at other indices (other services' tasks in the
        // slice, say): the same ids own the same slots.
        let mut shifted = vec![named("aaa-unrelated", 1)];
        shifted.extend(tasks.iter().cloned());
        let c = Maglev::new(&shifted, (1..21).collect());
        assert!(a.table.iter().zip(c.table.iter()).all(|(x, y)| x + 1 == *y));
    }

    /// Fraction of keys whose task changes between two tables over the same task names.
    fn moved(a: &Maglev, a_ids: &[Arc<Task>], b: &Maglev, b_ids: &[Arc<Task>]) -> f64 {
        let keys = 200_000u32;
        let mut moved = 0;
        for k in 0..keys {
            let h = key_hash(&k.to_le_bytes());
            let x = &a_ids[a.lookup(h).unwrap()].id;
            let y = &b_ids[b.lookup(h).unwrap()].id;
            if x != y {
                moved += 1;
            }
        }
        moved as f64 / keys as f64
    }

    #[test]
    fn minimal_disruption_when_a_task_leaves_and_returns() {
        for n in [3usize, 5, 10, 50] {
            let tasks: Vec<_> = (0..n)
                .map(|i| named(&format!("broker-{i:02}"), 1))
                .collect();
            let full = Maglev::new(&tasks, all(n));
            for gone in [0, n / 2, n - 1] {
                let rest: Vec<_> = tasks
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != gone)
                    .map(|(_, t)| t.clone())
                    .collect();
                let less = Maglev::new(&rest, all(n - 1));
                let f = moved(&full, &tasks, &less, &rest);
                let bound = 1.0 / n as f64 + 0.01;
                assert!(f <= bound, "n={n} gone={gone}: moved {f:.4} > {bound:.4}");
                // Keys that did not belong to the departed task mostly stay put.
                let back = Maglev::new(&tasks, all(n));
                assert_eq!(back.table, full.table, "returning restores the table");
            }
        }
    }

    #[test]
    fn unusable_walks_on_deterministically() {
        let tasks: Vec<_> = (0..5).map(|i| test_task(i, 1)).collect();
        let m = Maglev::new(&tasks, all(5));
        for k in 0..1000u32 {
            let h = key_hash(&k.to_le_bytes());
            let home = m.lookup(h).unwrap();
            assert_eq!(m.pick(Some(h), &|_| true), Some(home));
            let alt = m.pick(Some(h), &|i| i != home).unwrap();
            assert_ne!(alt, home);
            assert_eq!(
                m.pick(Some(h), &|i| i != home),
                Some(alt),
                "same answer again"
            );
            // Only the given task is usable: found however far it is.
            assert_eq!(m.pick(Some(h), &|i| i == 3), Some(3));
            assert_eq!(m.pick(Some(h), &|_| false), None);
        }
        // The fallback spreads the departed task's keys over the others.
        let mut seen = [0usize; 5];
        for k in 0..10_000u32 {
            let h = key_hash(&k.to_le_bytes());
            if m.lookup(h) == Some(0) {
                seen[m.pick(Some(h), &|i| i != 0).unwrap()] += 1;
            }
        }
        assert!(seen[1..].iter().all(|&c| c > 300), "{seen:?}");
    }

    #[test]
    fn empty_and_no_hash() {
        let tasks: Vec<_> = (0..3).map(|i| test_task(i, 1)).collect();
        let empty = Maglev::new(&tasks, vec![]);
        assert_eq!(empty.pick(Some(1), &|_| true), None);
        assert_eq!(empty.pick(None, &|_| true), None);
        let m = Maglev::with_size(&tasks, vec![0, 2], 13);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[m.pick(None, &|_| true).unwrap()] += 1;
        }
        assert!(seen[0] > 0 && seen[2] > 0 && seen[1] == 0, "{seen:?}");
    }
}
