//! Per-worker pools of connection buffers, so that an idle connection holds none.
//!
//! A connection takes a read buffer when readiness says data is there and gives it back
//! once it has drained the socket (HAProxy does the same); an HTTP/1.1 connection gives all
//! of its buffers back between requests. Each worker thread keeps a few returned buffers for
//! the next connection that needs one, bounded so that a storm's buffers go back to the
//! allocator instead of staying pooled. A buffer taken on one thread and given back on
//! another simply moves pools (tasks may migrate between workers).
//!
//! Owns no sockets; callers decide when a buffer is idle.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a pooled read buffer (a task's response head and first body bytes, a client's
/// head, a TLS record all fit).
pub const READ_SIZE: usize = 32 * 1024;
/// Size of a pooled write buffer (rewritten heads).
pub const WRITE_SIZE: usize = 1024;
/// Buffers of each kind kept per worker thread.
const KEEP: usize = 64;

thread_local! {
    static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Makes sure `buf` has room for a read: a pooled buffer when it has none (an idle
/// connection's released buffer), else as it is.
pub fn take_read(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = READ
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE));
    }
}

/// Gives an empty `buf` back to this worker's pool, leaving it without capacity; a buffer
/// that still holds bytes is kept.
pub fn give_read(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut b = std::mem::take(buf);
    b.clear();
    // Advanced-over room is reclaimed in place when the buffer is not shared.
    if b.try_reclaim(READ_SIZE) && b.capacity() <= 4 * READ_SIZE {
        READ.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEEP {
                p.push(b);
            }
        });
    }
}

/// Makes sure `out` has room for a head: a pooled buffer when it has none.
pub fn take_write(out: &mut Vec<u8>) {
    if out.capacity() == 0 {
        *out = WRITE
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(WRITE_SIZE));
    }
}

/// Gives `out` back (whatever it holds is dropped), leaving it without capacity.
pub fn give_write(out: &mut Vec<u8>) {
    let mut v = std::mem::take(out);
    if v.capacity() < WRITE_SIZE || v.capacity() > 64 * WRITE_SIZE {
        return;
    }
    v.clear();
    WRITE.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[test]
    fn a_given_buffer_is_taken_again_and_the_pool_is_bounded() {
        let mut a = BytesMut::new();
        take_read(&mut a);
        assert!(a.capacity() >= READ_SIZE);
        a.extend_from_slice(b"hello");
        give_read(&mut a);
        assert_eq!(a.len(), 5, "a buffer with bytes is kept by its connection");
        a.advance(5);
        let ptr = a.as_ptr();
        give_read(&mut a);
        assert_eq!(a.capacity(), 0, "an idle connection holds no buffer");
        let mut b = BytesMut::new();
        take_read(&mut b);
        assert!(b.capacity() >= READ_SIZE);
        assert_eq!(
            b.as_ptr(),
            ptr.wrapping_sub(5),
            "the same allocation, room reclaimed"
        );
        let mut many: Vec<BytesMut> = (0..KEEP * 2)
            .map(|_| {
                let mut b = BytesMut::new();
                take_read(&mut b);
                b
            })
            .collect();
        for b in &mut many {
            give_read(b);
        }
        assert_eq!(READ.with(|p| p.borrow().len()), KEEP);
    }

    #[test]
    fn write_buffers_come_back_empty() {
        let mut out = Vec::new();
        take_write(&mut out);
        out.extend_from_slice(b"GET / HTTP/1.1\r\n");
        give_write(&mut out);
        assert_eq!(out.capacity(), 0);
        take_write(&mut out);
        assert!(out.is_empty() && out.capacity() >= WRITE_SIZE);
    }
}
