//! Copy-on-write of one device in one taken snapshot ([`DeviceSnapshot`]): the
//! chunk map, the copy before the first origin write to a chunk, and the
//! reads and writes of the snapshot image.
//!
//! Invariants:
//! - A chunk is copied at most once: the thread that wins
//!   [`ChunkMap::try_begin_copy`] copies, every other writer of that chunk
//!   waits for it; only then does any origin write to the chunk proceed.
//! - An image read of an untouched chunk reads the origin and then re-checks
//!   the chunk state: an origin write to the chunk starts only after its
//!   state left "untouched", so if the state is still untouched the read saw
//!   the content at the take; otherwise the read is redone from the storage.
//! - Once the image is corrupted (failure policy "keep origin writes") it
//!   never becomes valid again; origin writes then skip the copy.
//!
//! Called by [`crate::TrackedDevice`] (origin writes) and [`crate::Image`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::chunk_map::{ChunkMap, ChunkState};
use crate::config::CopyErrorPolicy;
use crate::device::{push_extent, BlockDevice, Extent};
use crate::diff_storage::{DiffStorage, StorageSlot};
use crate::error::{Error, Result};
use crate::events::{Event, EventQueue};

#[derive(Debug)]
pub(crate) struct DeviceSnapshot {
    device_name: String,
    origin: Arc<dyn BlockDevice>,
    size: u64,
    chunk_shift: u32,
    chunks: ChunkMap,
    storage: Arc<DiffStorage>,
    events: Arc<EventQueue>,
    policy: CopyErrorPolicy,
    copy_timeout: Option<Duration>,
    /// errno and message of the failure that invalidated the image.
    corruption: OnceLock<(i32, String)>,
    destroyed: AtomicBool,
    copy_done: (Mutex<()>, Condvar),
}

pub(crate) struct CowSettings {
    pub chunk_shift: u32,
    pub policy: CopyErrorPolicy,
    pub copy_timeout: Option<Duration>,
}

impl DeviceSnapshot {
    pub fn new(
        device_name: String,
        origin: Arc<dyn BlockDevice>,
        settings: CowSettings,
        storage: Arc<DiffStorage>,
        events: Arc<EventQueue>,
    ) -> Self {
        let size = origin.size();
        let chunk_count = size.div_ceil(1 << settings.chunk_shift);
        Self {
            device_name,
            origin,
            size,
            chunk_shift: settings.chunk_shift,
            chunks: ChunkMap::new(chunk_count),
            storage,
            events,
            policy: settings.policy,
            copy_timeout: settings.copy_timeout,
            corruption: OnceLock::new(),
            destroyed: AtomicBool::new(false),
            copy_done: (Mutex::new(()), Condvar::new()),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub fn footprint(&self) -> usize {
        self.chunks.footprint()
    }

    /// The errno of the failure that invalidated the image, 0 while valid.
    pub fn error_code(&self) -> i32 {
        self.corruption.get().map_or(0, |c| c.0)
    }

    pub fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::SeqCst);
    }

    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk << self.chunk_shift;
        (start, (start + self.chunk_size()).min(self.size) - start)
    }

    /// Whether the image can still be used: not destroyed, not corrupted.
    pub fn check_usable(&self) -> Result<()> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::NotFound(format!(
                "snapshot image of {} (the snapshot was destroyed)",
                self.device_name
            )));
        }
        if let Some((errno, cause)) = self.corruption.get() {
            return Err(Error::Corrupted {
                device: self.device_name.clone(),
                cause: cause.clone(),
                errno: *errno,
            });
        }
        Ok(())
    }

    /// The copy-before-write for an origin write of `[offset, offset+len)`.
    /// Ok means the write may proceed; Err only under the
    /// "break origin write" policy.
    pub fn before_origin_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let first = offset >> self.chunk_shift;
        let last = (offset + len - 1) >> self.chunk_shift;
        for chunk in first..=last {
            if self.corruption.get().is_some() {
                return Ok(());
            }
            match self.copy_chunk(chunk) {
                Ok(_) => {}
                Err(Error::Corrupted { .. }) => return Ok(()),
                Err(e) => match self.policy {
                    CopyErrorPolicy::BreakOriginWrite => {
                        return Err(Error::Io {
                            context: format!(
                                "{}: write refused because the snapshot copy failed ({e})",
                                self.device_name
                            ),
                            source: std::io::Error::from_raw_os_error(e.errno()),
                        })
                    }
                    CopyErrorPolicy::KeepOriginWrites => {
                        self.mark_corrupted(&e);
                        return Ok(());
                    }
                },
            }
        }
        Ok(())
    }

    fn mark_corrupted(&self, cause: &Error) {
        let errno = cause.errno();
        if self.corruption.set((errno, cause.to_string())).is_ok() {
            tracing::error!(device = %self.device_name, error = %cause, "snapshot image corrupted");
            self.events.push(Event::Corrupted {
                device: self.device_name.clone(),
                errno,
            });
        }
    }

    /// Makes sure the chunk's take-time content is in the storage: copies it
    /// or waits for the thread that does.
    fn copy_chunk(self: &Arc<Self>, chunk: u64) -> Result<StorageSlot> {
        loop {
            self.check_usable()?;
            match self.chunks.state(chunk) {
                ChunkState::Copied(slot) => return Ok(slot),
                ChunkState::Copying => self.wait_while_copying(chunk),
                ChunkState::Untouched => {
                    if self.chunks.try_begin_copy(chunk) {
                        return self.run_copy(chunk);
                    }
                }
            }
        }
    }

    fn wait_while_copying(&self, chunk: u64) {
        let (lock, cv) = &self.copy_done;
        let mut guard = lock.lock().unwrap();
        while self.chunks.state(chunk) == ChunkState::Copying {
            guard = cv.wait(guard).unwrap();
        }
    }

    fn notify_copy_done(&self) {
        let (lock, cv) = &self.copy_done;
        drop(lock.lock().unwrap());
        cv.notify_all();
    }

    /// Copies a chunk this thread has claimed, with the copy timeout if one
    /// is set.
    fn run_copy(self: &Arc<Self>, chunk: u64) -> Result<StorageSlot> {
        let Some(timeout) = self.copy_timeout else {
            return self.copy_claimed(chunk);
        };
        // The copy runs on a helper thread so that the writer can give up
        // waiting; the helper still owns the chunk state and finishes it.
        let (tx, rx) = mpsc::channel();
        let this = Arc::clone(self);
        std::thread::spawn(move || {
            let _ = tx.send(this.copy_claimed(chunk));
        });
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) => Err(Error::TimedOut {
                what: format!(
                    "copy of chunk {chunk} of {} to the difference storage",
                    self.device_name
                ),
                millis: timeout.as_millis(),
            }),
        }
    }

    fn copy_claimed(&self, chunk: u64) -> Result<StorageSlot> {
        let result = self.copy_to_storage(chunk);
        match result {
            Ok(slot) => self.chunks.finish_copy(chunk, slot),
            Err(_) => self.chunks.abort_copy(chunk),
        }
        self.notify_copy_done();
        result
    }

    fn copy_to_storage(&self, chunk: u64) -> Result<StorageSlot> {
        let (start, len) = self.chunk_range(chunk);
        let slot = self.storage.allocate(len)?;
        let mut buf = vec![0u8; len as usize];
        self.origin.read_at(&mut buf, start).map_err(|e| {
            Error::io(
                format!(
                    "{}: read of chunk {chunk} for the snapshot copy",
                    self.device_name
                ),
                e,
            )
        })?;
        self.storage.write(slot, &buf, 0)?;
        Ok(slot)
    }

    /// Reads the image: `buf.len()` bytes at `offset`, as the origin was at
    /// the take plus the image's own writes.
    pub fn read_image(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let chunk = pos >> self.chunk_shift;
            let (chunk_start, chunk_len) = self.chunk_range(chunk);
            let piece_end = (chunk_start + chunk_len).min(end);
            let piece = &mut buf[(pos - offset) as usize..(piece_end - offset) as usize];
            match self.chunks.state(chunk) {
                ChunkState::Copied(slot) => {
                    self.storage.read(slot, piece, pos - chunk_start)?;
                    pos = piece_end;
                }
                ChunkState::Copying => self.wait_while_copying(chunk),
                ChunkState::Untouched => {
                    // Read a run of untouched chunks from the origin in one
                    // request, then confirm none was touched meanwhile.
                    let mut run_end = piece_end;
                    while run_end < end
                        && self.chunks.state(run_end >> self.chunk_shift) == ChunkState::Untouched
                    {
                        run_end = (run_end + self.chunk_size()).min(end);
                    }
                    let run = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                    self.origin.read_at(run, pos).map_err(|e| {
                        Error::io(
                            format!(
                                "{}: image read of {} bytes at {pos}",
                                self.device_name,
                                run.len()
                            ),
                            e,
                        )
                    })?;
                    let last = (run_end - 1) >> self.chunk_shift;
                    // Chunks still untouched were read intact; stop at the
                    // first one that changed and redo it from its new state.
                    let mut c = chunk;
                    while c <= last && self.chunks.state(c) == ChunkState::Untouched {
                        c += 1;
                    }
                    pos = if c > last {
                        run_end
                    } else {
                        (c << self.chunk_shift).max(pos)
                    };
                }
            }
        }
        // A copy failure during the read invalidates what was read.
        self.check_usable()
    }

    /// Which parts of an image range read as zeroes: copied chunks are data;
    /// untouched runs have the origin's allocation, confirmed afterwards as
    /// in [`Self::read_image`] so a racing copy cannot make a hole claim
    /// wrong.
    pub fn image_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_usable()?;
        let end = offset + len;
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end {
            let chunk = pos >> self.chunk_shift;
            let (chunk_start, chunk_len) = self.chunk_range(chunk);
            let piece_end = (chunk_start + chunk_len).min(end);
            match self.chunks.state(chunk) {
                ChunkState::Copied(_) => {
                    push_extent(
                        &mut extents,
                        Extent {
                            len: piece_end - pos,
                            zero: false,
                        },
                    );
                    pos = piece_end;
                }
                ChunkState::Copying => self.wait_while_copying(chunk),
                ChunkState::Untouched => {
                    let mut run_end = piece_end;
                    while run_end < end
                        && self.chunks.state(run_end >> self.chunk_shift) == ChunkState::Untouched
                    {
                        run_end = (run_end + self.chunk_size()).min(end);
                    }
                    let origin = self.origin.extents(pos, run_end - pos).map_err(|e| {
                        Error::io(format!("{}: allocation at {pos}", self.device_name), e)
                    })?;
                    let last = (run_end - 1) >> self.chunk_shift;
                    if (chunk..=last).all(|c| self.chunks.state(c) == ChunkState::Untouched) {
                        for e in origin {
                            push_extent(&mut extents, e);
                        }
                        pos = run_end;
                    }
                    // Otherwise a copy started meanwhile: look again.
                }
            }
        }
        self.check_usable()?;
        Ok(extents)
    }

    /// Writes into the image: the chunks are copied first, the data lands in
    /// the difference storage only.
    pub fn write_image(self: &Arc<Self>, buf: &[u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let chunk = pos >> self.chunk_shift;
            let (chunk_start, chunk_len) = self.chunk_range(chunk);
            let piece_end = (chunk_start + chunk_len).min(end);
            let slot = self.copy_chunk(chunk)?;
            let piece = &buf[(pos - offset) as usize..(piece_end - offset) as usize];
            self.storage.write(slot, piece, pos - chunk_start)?;
            pos = piece_end;
        }
        Ok(())
    }
}
