//! Copy-on-write state of every chunk of one device in one snapshot
//! ([`ChunkMap`]).
//!
//! One 64-bit word per chunk, in pages of [`PAGE_CHUNKS`] allocated the first
//! time a chunk of the page is touched, so an untouched device costs one
//! pointer per page. A word is `0` (untouched: the image reads the origin),
//! `COPYING` (one thread is copying the chunk; others wait), or a
//! [`StorageSlot`] with the `COPIED` tag (where the chunk's old content lives in
//! the difference storage). Transitions: untouched → copying (one CAS winner)
//! → copied, or copying → untouched when the copy failed.

use std::sync::OnceLock;

use crate::diff_storage::StorageSlot;
use crate::sync::atomic::{AtomicU64, Ordering};

// The footprint counter is a plain std atomic: it is bumped inside the page's
// `OnceLock` initialiser, where no scheduling point may happen (a schedule
// checker switching threads there would block the other threads on the
// OnceLock for real). It is a statistic, not state.
use std::sync::atomic::AtomicUsize;

const PAGE_SHIFT: u32 = 12;
pub const PAGE_CHUNKS: u64 = 1 << PAGE_SHIFT;

const UNTOUCHED: u64 = 0;
const COPYING: u64 = 1;
const COPIED: u64 = 2;
const TAG_MASK: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Untouched,
    Copying,
    Copied(StorageSlot),
}

#[derive(Debug)]
pub struct ChunkMap {
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
    allocated_pages: AtomicUsize,
}

impl ChunkMap {
    pub fn new(chunk_count: u64) -> Self {
        let pages = chunk_count.div_ceil(PAGE_CHUNKS) as usize;
        Self {
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
            allocated_pages: AtomicUsize::new(0),
        }
    }

    fn word(&self, chunk: u64) -> Option<&AtomicU64> {
        let page = self.pages[(chunk >> PAGE_SHIFT) as usize].get()?;
        Some(&page[(chunk & (PAGE_CHUNKS - 1)) as usize])
    }

    fn word_or_create(&self, chunk: u64) -> &AtomicU64 {
        let page = self.pages[(chunk >> PAGE_SHIFT) as usize].get_or_init(|| {
            self.allocated_pages
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (0..PAGE_CHUNKS)
                .map(|_| AtomicU64::new(UNTOUCHED))
                .collect()
        });
        &page[(chunk & (PAGE_CHUNKS - 1)) as usize]
    }

    pub fn state(&self, chunk: u64) -> ChunkState {
        let Some(word) = self.word(chunk) else {
            return ChunkState::Untouched;
        };
        decode(word.load(Ordering::SeqCst))
    }

    /// Claims the copy of an untouched chunk; true for exactly one caller.
    pub fn try_begin_copy(&self, chunk: u64) -> bool {
        self.word_or_create(chunk)
            .compare_exchange(UNTOUCHED, COPYING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub fn finish_copy(&self, chunk: u64, slot: StorageSlot) {
        let word = slot.encode() << 2 | COPIED;
        self.word_or_create(chunk).store(word, Ordering::SeqCst);
    }

    pub fn abort_copy(&self, chunk: u64) {
        self.word_or_create(chunk)
            .store(UNTOUCHED, Ordering::SeqCst);
    }

    /// Bytes of chunk state allocated so far.
    pub fn footprint(&self) -> usize {
        self.pages.len() * std::mem::size_of::<OnceLock<Box<[AtomicU64]>>>()
            + self
                .allocated_pages
                .load(std::sync::atomic::Ordering::Relaxed)
                * PAGE_CHUNKS as usize
                * 8
    }
}

fn decode(word: u64) -> ChunkState {
    match word & TAG_MASK {
        UNTOUCHED => ChunkState::Untouched,
        COPYING => ChunkState::Copying,
        _ => ChunkState::Copied(StorageSlot::decode(word >> 2)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_pages_and_transitions() {
        let map = ChunkMap::new(3 * PAGE_CHUNKS + 1);
        let empty = map.footprint();
        assert_eq!(map.state(3 * PAGE_CHUNKS), ChunkState::Untouched);
        assert_eq!(map.footprint(), empty);
        assert!(map.try_begin_copy(5));
        assert!(!map.try_begin_copy(5));
        assert_eq!(map.state(5), ChunkState::Copying);
        assert_eq!(map.footprint(), empty + PAGE_CHUNKS as usize * 8);
        let slot = StorageSlot::new(7, 123_456_789).unwrap();
        map.finish_copy(5, slot);
        assert_eq!(map.state(5), ChunkState::Copied(slot));
        assert!(map.try_begin_copy(6));
        map.abort_copy(6);
        assert_eq!(map.state(6), ChunkState::Untouched);
    }

    /// Every slot the storage can hand out survives the chunk map's packing:
    /// before the extent index was range-checked, extent 2^20 (reachable by
    /// storage growth) packed into the chunk map as extent 0.
    #[test]
    fn slots_never_alias() {
        let map = ChunkMap::new(4);
        let max_extent = (1 << 20) - 1;
        let max_sector = (1 << 42) - 1;
        for (chunk, (extent, sector)) in [
            (0, 0),
            (max_extent, 0),
            (0, max_sector),
            (max_extent, max_sector),
        ]
        .into_iter()
        .enumerate()
        {
            let slot = StorageSlot::new(extent, sector).unwrap();
            assert!(map.try_begin_copy(chunk as u64));
            map.finish_copy(chunk as u64, slot);
            assert_eq!(map.state(chunk as u64), ChunkState::Copied(slot));
            assert_eq!((slot.extent(), slot.sector()), (extent, sector));
        }
        assert_eq!(StorageSlot::new(1 << 20, 0), None);
        assert_eq!(StorageSlot::new(0, 1 << 42), None);
    }
}
