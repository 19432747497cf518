//! What an NBD export is in engine terms: a tracked device (read-write) or
//! a snapshot image (`snapshot/<device>`, read-write into the difference
//! storage), the metadata contexts each offers, and their block status.
//!
//! Contexts: `base:allocation` everywhere (holes of the origin, copied
//! chunks as data); on images, `qemu:dirty-bitmap:since-N` for every change
//! number N < P of the image's generation, where P is the image's change
//! number: a block is dirty iff its byte in the readable map (frozen at the
//! take) is greater than N — exactly what an incremental backup after
//! backup N must read.

use std::sync::Arc;

use blksnap_engine::{Engine, Volume};

use crate::protocol::*;

const BASE_ALLOCATION: &str = "base:allocation";
const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:since-";

/// A volume as an NBD export.
#[derive(Clone)]
pub struct Export {
    volume: Volume,
}

/// A metadata context selected on a connection.
#[derive(Clone)]
pub enum Context {
    Allocation,
    /// Blocks changed after change number `since`, from the readable map
    /// captured when the context was selected.
    Dirty {
        since: u8,
        map: Arc<Vec<u8>>,
        block_size: u64,
    },
}

impl Context {
    pub fn id(&self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::Dirty { since, .. } => 256 + *since as u32,
        }
    }
}

/// Exports, by the names clients use: the engine's volume names.
pub fn list(engine: &Engine) -> Vec<String> {
    engine.volume_names()
}

pub fn resolve(engine: &Engine, name: &str) -> Option<Export> {
    engine.volume(name).map(|volume| Export { volume })
}

impl Export {
    pub fn size(&self) -> u64 {
        self.volume.size()
    }

    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_FAST_ZERO
            // One engine behind every connection: a flush on any of them
            // covers the writes of all.
            | TFLAG_CAN_MULTI_CONN;
        if structured {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }

    /// Preferred I/O size: a chunk for images (whole-chunk copies), the
    /// device's minimum I/O size otherwise, rounded up to a power of two
    /// (the NBD spec requires one) and kept within 4 KiB..=`MAX_PAYLOAD`.
    pub fn preferred_block(&self) -> u32 {
        match &self.volume {
            // MAX_PAYLOAD is a power of two, so clamping first keeps the
            // rounded size within it (and clear of u32 overflow).
            Volume::Device(d) => d.min_io_size().clamp(4096, MAX_PAYLOAD).next_power_of_two(),
            Volume::Image(i) => i.chunk_size().min(MAX_PAYLOAD as u64) as u32,
        }
    }

    pub fn description(&self) -> String {
        match &self.volume {
            Volume::Device(d) => format!("blksnap tracked device {}", d.name()),
            Volume::Image(i) => format!("blksnap snapshot image of {}", i.device_name()),
        }
    }

    /// Whether write-zeroes is cheaper than writing zeroes (FAST_ZERO): on
    /// devices it is a fallocate; on images it writes the storage.
    pub fn fast_zero(&self) -> bool {
        matches!(self.volume, Volume::Device(_))
    }

    /// The volume behind the export, for its I/O.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Every context this export offers, by name.
    pub fn contexts(&self) -> Vec<(String, Context)> {
        let mut all = vec![(BASE_ALLOCATION.to_string(), Context::Allocation)];
        if let Volume::Image(image) = &self.volume {
            let tracker = image.change_tracker();
            let info = tracker.info();
            let map = Arc::new(tracker.readable_map());
            for since in 0..info.changes_number {
                all.push((
                    format!("{DIRTY_PREFIX}{since}"),
                    Context::Dirty {
                        since,
                        map: map.clone(),
                        block_size: info.block_size as u64,
                    },
                ));
            }
        }
        all
    }

    /// The contexts a LIST query names: exact names, or every context of a
    /// namespace (`base:`, `qemu:`) or of the dirty-bitmap leaf prefix.
    pub fn list_matches(&self, query: &str) -> Vec<(String, Context)> {
        self.contexts()
            .into_iter()
            .filter(|(name, _)| {
                name == query
                    || (query.ends_with(':') && name.starts_with(query))
                    || query == "qemu:dirty-bitmap:" && name.starts_with(DIRTY_PREFIX)
            })
            .collect()
    }

    /// Status descriptors `(length, flags)` of one context from `offset`:
    /// contiguous, covering `[offset, offset+len)` or, when more than `max`
    /// descriptors would be needed, a prefix of it.
    pub fn block_status(
        &self,
        context: &Context,
        offset: u64,
        len: u64,
        max: usize,
    ) -> blksnap_engine::Result<Vec<(u32, u32)>> {
        let mut out = Descriptors {
            list: Vec::new(),
            max,
            full: false,
        };
        match context {
            Context::Allocation => {
                for e in self.volume.extents(offset, len)? {
                    let flags = if e.zero { STATE_HOLE | STATE_ZERO } else { 0 };
                    out.push(e.len, flags);
                }
            }
            Context::Dirty {
                since,
                map,
                block_size,
            } => {
                let end = offset + len;
                let mut pos = offset;
                while pos < end && !out.full {
                    let block = (pos / block_size) as usize;
                    let block_end = ((block as u64 + 1) * block_size).min(end);
                    let dirty = map.get(block).is_some_and(|&n| n > *since);
                    out.push(block_end - pos, if dirty { STATE_DIRTY } else { 0 });
                    pos = block_end;
                }
            }
        }
        Ok(out.list)
    }
}

/// Block status descriptors being built: merged when alike, split at 1 GiB
/// (lengths are 32-bit), and cut off for good at `max`.
struct Descriptors {
    list: Vec<(u32, u32)>,
    max: usize,
    full: bool,
}

impl Descriptors {
    fn push(&mut self, mut len: u64, flags: u32) {
        const PIECE: u64 = 1 << 30;
        while len > 0 && !self.full {
            if let Some(last) = self.list.last_mut() {
                if last.1 == flags && (last.0 as u64) < PIECE {
                    let n = len.min(PIECE - last.0 as u64);
                    last.0 += n as u32;
                    len -= n;
                    continue;
                }
            }
            if self.list.len() >= self.max {
                self.full = true;
                return;
            }
            self.list.push((0, flags));
        }
    }
}
