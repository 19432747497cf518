//! Change-block tracking of one device ([`ChangeTracker`]).
//!
//! Owns the live map (one byte per tracking block, raised to the current
//! change number by every write-type request), the readable map (a copy of the
//! live map made at each snapshot take, frozen in between), the generation
//! UUID and the change numbers. Rules: DESIGN.md §2 "Change tracking".
//!
//! Invariants: `1 <= current <= 255`; `previous < current` except right after
//! a wrap, where both restart as at attach (previous 0, current 1) with zeroed
//! maps and a new generation. Callers ([`crate::TrackedDevice`]) hold the
//! device's write gate shared while marking and exclusively around
//! [`ChangeTracker::switch`], so no write straddles a change-number switch.

use crate::sync::atomic::{AtomicU8, Ordering};
use crate::sync::Mutex;

use uuid::Uuid;

use crate::config::Config;

#[derive(Debug)]
pub struct ChangeTracker {
    capacity: u64,
    block_shift: u32,
    live: Box<[AtomicU8]>,
    current: AtomicU8,
    frozen: Mutex<FrozenState>,
}

#[derive(Debug)]
struct FrozenState {
    readable: Vec<u8>,
    previous: u8,
    generation: Uuid,
}

/// What `cbtinfo` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbtInfo {
    pub block_size: u32,
    pub device_capacity: u64,
    pub block_count: u64,
    pub generation_id: Uuid,
    /// The change number of the readable map: a block changed since backup N
    /// iff its byte is greater than N (same generation and block size).
    pub changes_number: u8,
    /// The change number that writes are marked with now.
    pub current_number: u8,
}

impl ChangeTracker {
    pub(crate) fn new(capacity: u64, config: &Config) -> Self {
        let block_shift = config.tracking_block_shift(capacity);
        let count = capacity.div_ceil(1 << block_shift) as usize;
        Self {
            capacity,
            block_shift,
            live: (0..count).map(|_| AtomicU8::new(0)).collect(),
            current: AtomicU8::new(1),
            frozen: Mutex::new(FrozenState {
                readable: vec![0; count],
                previous: 0,
                generation: Uuid::new_v4(),
            }),
        }
    }

    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    pub fn block_count(&self) -> u64 {
        self.live.len() as u64
    }

    /// Marks every block that `[offset, offset+len)` touches as changed in the
    /// current change number. A zero-length request changes nothing.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.capacity {
            return;
        }
        let end = (offset + len).min(self.capacity);
        let first = (offset >> self.block_shift) as usize;
        let last = ((end - 1) >> self.block_shift) as usize;
        let current = self.current.load(Ordering::Relaxed);
        for byte in &self.live[first..=last] {
            // Skip the store when already marked: keeps the cache line clean
            // on the hot path of repeated writes to the same block.
            if byte.load(Ordering::Relaxed) != current {
                byte.store(current, Ordering::Relaxed);
            }
        }
    }

    /// An image write: the live map as any write, and the readable map of
    /// the image's take raised to its change number (`previous`), so the
    /// consumer of that snapshot sees the blocks its image changed.
    pub(crate) fn mark_image_write(&self, offset: u64, len: u64) {
        self.mark(offset, len);
        if len == 0 || offset >= self.capacity {
            return;
        }
        let end = (offset + len).min(self.capacity);
        let first = (offset >> self.block_shift) as usize;
        let last = ((end - 1) >> self.block_shift) as usize;
        let mut frozen = self.frozen.lock().unwrap();
        let number = frozen.previous;
        for byte in &mut frozen.readable[first..=last] {
            *byte = (*byte).max(number);
        }
    }

    /// The snapshot-take switch: the readable map becomes the live map,
    /// previous = current, current += 1; at 256 everything restarts as at
    /// attach with a new generation.
    pub(crate) fn switch(&self) {
        let mut frozen = self.frozen.lock().unwrap();
        let current = self.current.load(Ordering::Relaxed);
        if current == u8::MAX {
            for byte in self.live.iter() {
                byte.store(0, Ordering::Relaxed);
            }
            frozen.readable.fill(0);
            frozen.previous = 0;
            frozen.generation = Uuid::new_v4();
            self.current.store(1, Ordering::Relaxed);
        } else {
            for (dst, src) in frozen.readable.iter_mut().zip(self.live.iter()) {
                *dst = src.load(Ordering::Relaxed);
            }
            frozen.previous = current;
            self.current.store(current + 1, Ordering::Relaxed);
        }
    }

    /// A copy of the readable map (what `readcbtmap` returns).
    pub fn readable_map(&self) -> Vec<u8> {
        self.frozen.lock().unwrap().readable.clone()
    }

    pub fn info(&self) -> CbtInfo {
        let frozen = self.frozen.lock().unwrap();
        CbtInfo {
            block_size: self.block_size(),
            device_capacity: self.capacity,
            block_count: self.block_count(),
            generation_id: frozen.generation,
            changes_number: frozen.previous,
            current_number: self.current.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ChangeTracker {
        let config = Config {
            tracking_block_minimum_shift: 12,
            ..Config::default()
        };
        ChangeTracker::new(10 * 4096 + 512, &config)
    }

    #[test]
    fn attach_state() {
        let t = small();
        let info = t.info();
        assert_eq!(info.block_count, 11);
        assert_eq!(info.changes_number, 0);
        assert_eq!(info.current_number, 1);
        assert!(t.readable_map().iter().all(|&b| b == 0));
    }

    #[test]
    fn marks_each_touched_block_once_switched() {
        let t = small();
        t.mark(4095, 2);
        t.mark(10 * 4096, 512);
        t.mark(5 * 4096, 0);
        assert!(t.readable_map().iter().all(|&b| b == 0));
        t.switch();
        let map = t.readable_map();
        assert_eq!(map, vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(t.info().changes_number, 1);
        t.mark(0, 1);
        t.switch();
        assert_eq!(t.readable_map()[..2], [2, 1]);
    }

    #[test]
    fn wrap_restarts_generation() {
        let t = small();
        let first = t.info().generation_id;
        for _ in 1..254 {
            t.switch();
        }
        t.mark(0, 1);
        assert_eq!(t.info().current_number, 254);
        t.switch();
        assert_eq!(t.readable_map()[0], 254);
        assert_eq!(t.info().generation_id, first);
        t.mark(4096, 1);
        t.switch(); // current would reach 256: restart
        let info = t.info();
        assert_ne!(info.generation_id, first);
        assert_eq!((info.changes_number, info.current_number), (0, 1));
        assert!(t.readable_map().iter().all(|&b| b == 0));
        t.mark(0, 1);
        t.switch();
        assert_eq!(t.readable_map()[..2], [1, 0]);
    }
}
