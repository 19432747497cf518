//! The blksnap engine: change-block tracking, copy-on-write snapshots of
//! several block devices at once, a difference storage that grows, and
//! snapshot images.
//!
//! The engine knows nothing of NBD, FUSE, sockets or the command line: it takes
//! positional reads and writes on tracked devices ([`TrackedDevice`]) and
//! snapshot images ([`Image`]) and exposes the snapshot and CBT operations on
//! [`Engine`]. Frontends and the daemon (later crates) call it.
//!
//! Semantics follow `DESIGN.md` §2 of the project: tracking-block and chunk
//! sizing, the CBT change-number rules, the difference storage growth rule and
//! the failure policy (by default the origin write always proceeds).

mod cbt;
mod chunk_map;
mod config;
mod copier;
pub mod device;
mod diff_storage;
mod engine;
mod error;
mod events;
mod image;
mod io_flusher;
mod snapshot;
mod sync;
mod tracked;
pub mod volume;

pub use cbt::{CbtInfo, CbtState, Change, ChangeJournal, ChangeTracker, GenerationReason};
pub use config::{Config, CopyErrorPolicy, OriginCache, SnapshotOptions};
pub use device::{holds_data, BlockDevice, DeviceIdentity, Extent, FileDevice, MemDevice, Zeroing};
pub use diff_storage::{StorageSpec, StorageStats};
pub use engine::{Engine, ImageInfo, SnapshotInfo, TrackingStart};
pub use error::{Error, Result};
pub use events::{monotonic_ns, Event};
pub use image::Image;
pub use io_flusher::mark_io_flusher;
pub use tracked::{DeviceMode, TrackedDevice};
pub use volume::Volume;

/// Bytes in a sector: the unit of sector ranges in the control commands.
pub const SECTOR_SIZE: u64 = 512;

/// A range of 512-byte sectors, as the original tool's `--range S:C` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SectorRange {
    pub start: u64,
    pub count: u64,
}

impl SectorRange {
    pub fn new(start: u64, count: u64) -> Self {
        Self { start, count }
    }
    pub fn byte_offset(&self) -> u64 {
        self.start * SECTOR_SIZE
    }
    pub fn byte_len(&self) -> u64 {
        self.count * SECTOR_SIZE
    }
}
