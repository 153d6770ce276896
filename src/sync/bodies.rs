//! Recycles the buffers that large message bodies are read into during a copy. A fresh
//! allocation per multi-megabyte message is paid for in page faults and zeroing on every byte
//! received (docs/sync.md, Memory); a body handed back once its APPEND is acknowledged serves
//! the next message instead. One pool serves all of an engine's copies,
//! so a pass starts with what the previous ones read into.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// One budget, in bytes, for the message bodies every copy of an engine holds at once
/// (`[sync] memory_mb`): a fetcher waits for room before it takes a message on.
#[derive(Debug)]
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    limit: u64,
}

impl MemoryBudget {
    /// A budget of `mb` MiB.
    pub fn new(mb: u64) -> MemoryBudget {
        // Semaphore permits are counted in bytes, at most what a u32 request can take back.
        let limit = (mb * 1024 * 1024).clamp(1, u64::from(u32::MAX));
        MemoryBudget {
            bytes: Arc::new(Semaphore::new(limit as usize)),
            limit,
        }
    }

    /// Room for a message of `size` bytes, held until the permit is dropped. A message larger
    /// than the whole budget takes all of it: it is copied alone.
    pub async fn hold(&self, size: u64) -> Result<OwnedSemaphorePermit, AcquireError> {
        let want = size.clamp(1, self.limit) as u32;
        self.bytes.clone().acquire_many_owned(want).await
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// A bounded set of idle buffers, shared by the copies' fetchers (which take) and the messages
/// they produce (which give back when dropped).
#[derive(Debug)]
pub struct BodyPool {
    free: Mutex<Vec<BytesMut>>,
    /// Most idle capacity kept, in bytes.
    keep: usize,
}

impl BodyPool {
    /// Literals below this size are read as before: the allocator reuses small blocks itself.
    pub const MIN: usize = 256 * 1024;

    /// A pool keeping at most `keep` bytes of idle buffers.
    pub fn new(keep: usize) -> BodyPool {
        BodyPool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// An empty buffer with room for `need` bytes: the smallest idle one that fits, else a new
    /// one of the next power of two. Sized to the exact message, idle buffers would rarely fit
    /// the next (larger) one; the unused tail of a larger buffer costs address space only, as
    /// pages are not faulted in until written.
    pub fn take(&self, need: usize) -> BytesMut {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<usize> = None;
        for i in 0..free.len() {
            // An empty buffer's whole allocation counts once its read offset is reclaimed.
            if free[i].try_reclaim(need)
                && best.is_none_or(|b| free[i].capacity() < free[b].capacity())
            {
                best = Some(i);
            }
        }
        match best {
            Some(i) => free.swap_remove(i),
            None => BytesMut::with_capacity(need.next_power_of_two()),
        }
    }

    /// Keeps the storage of `body` for a later `take`, if nothing else shares it and the pool
    /// has room.
    pub fn give(&self, body: Bytes) {
        if body.len() < Self::MIN {
            return;
        }
        let Ok(mut buf) = body.try_into_mut() else {
            return;
        };
        buf.clear();
        self.keep(buf);
    }

    /// Keeps the buffer a body was read into part by part: `tail` is what is left of it once
    /// the `used` bytes before it were split off (and given up by everyone since).
    pub fn give_tail(&self, mut tail: BytesMut, used: usize) {
        // The whole allocation comes back only if no part is still held somewhere.
        if used < Self::MIN || !tail.is_empty() || !tail.try_reclaim(used + tail.capacity()) {
            return;
        }
        self.keep(tail);
    }

    fn keep(&self, buf: BytesMut) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let idle: usize = free.iter().map(BytesMut::capacity).sum();
        if idle + buf.capacity() <= self.keep {
            free.push(buf);
        }
    }

    /// Idle buffers held (for tests).
    pub fn idle(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_given_back_is_taken_again_without_allocating() {
        let pool = BodyPool::new(64 << 20);
        let mut buf = pool.take(4 << 20);
        let first = buf.as_ptr();
        buf.extend_from_slice(b"* 1 FETCH (BODY[] {3000000}\r\n");
        buf.resize(buf.len() + 3_000_000, b'x');
        buf.extend_from_slice(b")\r\n* 2 FE");
        // As the client does: the frame is split off and the leftover moved out.
        let frame = buf.split_to(buf.len() - 6).freeze();
        let rest = BytesMut::from(&buf[..]);
        drop(buf);
        let body = frame.slice(29..29 + 3_000_000);
        drop(frame);
        assert_eq!(&rest[..], b"* 2 FE");
        pool.give(body);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(4 << 20);
        assert_eq!(again.as_ptr(), first, "the same allocation, from its start");
        assert!(again.is_empty() && again.capacity() >= 4 << 20);
        assert_eq!(pool.idle(), 0);
    }

    /// Reads three 1 MiB parts into a buffer of `pool` as the fetcher does: (start of the
    /// allocation, its capacity, the parts, what is left of the buffer).
    fn read_in_parts(pool: &BodyPool) -> (*const u8, usize, Vec<Bytes>, BytesMut) {
        let mut buf = pool.take(3 << 20);
        let (start, cap) = (buf.as_ptr(), buf.capacity());
        let mut parts = Vec::new();
        for _ in 0..3 {
            buf.resize(buf.len() + (1 << 20), b'x');
            parts.push(buf.split().freeze());
        }
        (start, cap, parts, buf)
    }

    #[test]
    fn a_body_read_in_parts_gives_its_whole_buffer_back() {
        let pool = BodyPool::new(64 << 20);
        let (start, cap, parts, tail) = read_in_parts(&pool);
        drop(parts);
        pool.give_tail(tail, 3 << 20);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(3 << 20);
        assert_eq!(again.as_ptr(), start, "the same allocation, from its start");
        assert_eq!(again.capacity(), cap);
    }

    #[test]
    fn a_buffer_with_a_part_still_held_is_not_kept() {
        let pool = BodyPool::new(64 << 20);
        let (_, _, parts, tail) = read_in_parts(&pool);
        let held = parts[1].clone();
        drop(parts);
        pool.give_tail(tail, 3 << 20);
        assert_eq!(pool.idle(), 0);
        assert_eq!(held.len(), 1 << 20);
    }

    #[test]
    fn shared_small_or_surplus_bodies_are_not_kept() {
        let pool = BodyPool::new(1 << 20);
        let big = Bytes::from(vec![0u8; 600_000]);
        let other = big.clone();
        pool.give(big);
        assert_eq!(pool.idle(), 0, "still shared");
        drop(other);
        pool.give(Bytes::from(vec![0u8; 1000]));
        assert_eq!(pool.idle(), 0, "too small to bother");
        pool.give(Bytes::from(vec![0u8; 600_000]));
        pool.give(Bytes::from(vec![0u8; 600_000]));
        assert_eq!(pool.idle(), 1, "the second exceeds what the pool keeps");
        // Too small for the request: a new buffer, the idle one stays.
        let b = pool.take(2 << 20);
        assert!(b.capacity() >= 2 << 20);
        assert_eq!(pool.idle(), 1);
    }
}
