//! What the server serves, independent of where the data lives: an
//! [`ExportSource`] names exports and opens them; an [`Export`] is one
//! export's I/O and metadata. The engine's tracked devices and snapshot
//! images are one source ([`crate::engine_export`], feature `engine`); a
//! backup repository's points in time are another (the backup tool's
//! `serve`).
//!
//! Contexts are derived here from what an export offers, the same way for
//! every source: `base:allocation` everywhere, and, where the export has a
//! change map with change number P, `qemu:dirty-bitmap:since-N` for every
//! N < P: a block is dirty iff its byte in the map (frozen at the take) is
//! greater than N — exactly what an incremental backup after backup N must
//! read.

use std::sync::Arc;

use crate::protocol::*;

const BASE_ALLOCATION: &str = "base:allocation";
const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:since-";

/// A failed export call: the errno the client gets (mapped to the NBD
/// error set by [`wire_error`]) and the text structured replies carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub errno: i32,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        ExportError {
            errno,
            message: message.into(),
        }
    }
}

pub type ExportResult<T> = Result<T, ExportError>;

/// The flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// `NO_HOLE`: the range must stay allocated.
    pub no_hole: bool,
    /// `FAST_ZERO`: only if cheaper than a write, else ENOTSUP before any
    /// change.
    pub fast: bool,
}

/// Named exports: what a client can list and open.
pub trait ExportSource: Send + Sync + 'static {
    /// The names `NBD_OPT_LIST` shows.
    fn names(&self) -> Vec<String>;
    /// The export a client asked for by name, if there is one.
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
}

/// An export's change map: one byte per tracking block (the change number
/// of its last write), and the change number of the map itself.
pub struct ChangeMap {
    pub map: Arc<Vec<u8>>,
    pub block_size: u64,
    pub changes_number: u8,
}

/// One export: its geometry, its I/O and its metadata. Offsets and lengths
/// are checked against [`Export::size`] by the server before any call.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    /// The text of `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String;
    /// Preferred I/O size: a power of two in 4 KiB..=`MAX_PAYLOAD`.
    fn preferred_block(&self) -> u32;
    /// Read-only exports refuse writes, trims and write-zeroes (EPERM).
    fn read_only(&self) -> bool {
        false
    }
    /// Whether write-zeroes can be cheaper than writing zeroes: if not,
    /// every `FAST_ZERO` request is refused (ENOTSUP) without a call; if
    /// so, [`Export::write_zeroes`] decides per request.
    fn fast_zero(&self) -> bool {
        false
    }
    /// Fills all of `buf` (zeroes included: it holds an earlier read's
    /// bytes, which must never reach a client), or fails.
    fn read(&self, buf: &mut [u8], offset: u64) -> ExportResult<()>;
    fn write(&self, data: &[u8], offset: u64) -> ExportResult<()>;
    fn flush(&self) -> ExportResult<()>;
    fn discard(&self, offset: u64, len: u64) -> ExportResult<()>;
    fn write_zeroes(&self, offset: u64, len: u64, how: ZeroFlags) -> ExportResult<()>;
    /// The extents of `[offset, offset+len)`, in order, as (length, reads
    /// as zeroes).
    fn allocation(&self, offset: u64, len: u64) -> ExportResult<Vec<(u64, bool)>>;
    /// The change map behind the dirty-bitmap contexts, if any; read when
    /// a client selects contexts, so that they stay what they were then.
    fn change_map(&self) -> Option<ChangeMap> {
        None
    }

    /// What the change map belongs to (a snapshot), when the same name
    /// can later serve another one: contexts selected on one instance are
    /// refused at `NBD_OPT_GO` on another, since its map would not
    /// describe the data served.
    fn instance(&self) -> Option<u64> {
        None
    }
}

/// A metadata context selected on a connection.
#[derive(Clone)]
pub enum Context {
    Allocation,
    /// Blocks changed after change number `since`, from the map captured
    /// when the context was selected.
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

/// The transmission flags of `export`, for a client whose replies come in
/// chunks (structured replies or extended headers) or not.
pub fn transmission_flags(export: &dyn Export, chunked_replies: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_CACHE
        // One data store behind every connection (the engine, or files
        // that never change): a flush on any of them covers all.
        | TFLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if chunked_replies {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// Every context `export` offers, by name.
pub fn contexts(export: &dyn Export) -> Vec<(String, Context)> {
    let mut all = vec![(BASE_ALLOCATION.to_string(), Context::Allocation)];
    if let Some(ChangeMap {
        map,
        block_size,
        changes_number,
    }) = export.change_map()
    {
        for since in 0..changes_number {
            all.push((
                format!("{DIRTY_PREFIX}{since}"),
                Context::Dirty {
                    since,
                    map: map.clone(),
                    block_size,
                },
            ));
        }
    }
    all
}

/// The contexts a LIST query names: exact names, or every context of a
/// namespace (`base:`, `qemu:`) or of the dirty-bitmap leaf prefix.
pub fn list_matches(export: &dyn Export, query: &str) -> Vec<(String, Context)> {
    contexts(export)
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
/// descriptors would be needed, a prefix of it. No descriptor is longer
/// than `max_extent` (a longer extent is split): compact block status
/// replies have 32-bit lengths, extended ones 64-bit.
pub fn block_status(
    export: &dyn Export,
    context: &Context,
    offset: u64,
    len: u64,
    max: usize,
    max_extent: u64,
) -> ExportResult<Vec<(u64, u32)>> {
    let mut out = Descriptors {
        list: Vec::new(),
        max,
        max_extent,
        full: false,
    };
    match context {
        Context::Allocation => {
            for (elen, zero) in export.allocation(offset, len)? {
                let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                out.push(elen, flags);
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

/// Block status descriptors being built: merged when alike, split at
/// `max_extent`, and cut off for good at `max`.
struct Descriptors {
    list: Vec<(u64, u32)>,
    max: usize,
    max_extent: u64,
    full: bool,
}

impl Descriptors {
    fn push(&mut self, mut len: u64, flags: u32) {
        while len > 0 && !self.full {
            if let Some(last) = self.list.last_mut() {
                if last.1 == flags && last.0 < self.max_extent {
                    let n = len.min(self.max_extent - last.0);
                    last.0 += n;
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
