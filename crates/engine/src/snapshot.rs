//! Copy-on-write of one device in one taken snapshot ([`DeviceSnapshot`]): the
//! chunk map, the copy before the first origin write to a chunk, and the
//! reads and writes of the snapshot image.
//!
//! Invariants:
//! - A chunk is copied at most once: the thread that wins
//!   [`ChunkMap::try_begin_copy`] copies (itself, or on the copier pool when a
//!   copy timeout is set), every other writer and reader of that chunk waits
//!   for it; only then does any origin write to the chunk proceed.
//! - Every wait for a copy ends by the copy timeout when one is set, and as
//!   soon as the image is corrupted or destroyed: both wake every waiter.
//! - An image read of an untouched chunk reads the origin and then re-checks
//!   the chunk state: an origin write to the chunk starts only after its
//!   state left "untouched", so if the state is still untouched the read saw
//!   the content at the take; otherwise the read is redone from the storage.
//!   That guard lives in one place, [`DeviceSnapshot::walk_image`].
//! - Once the image is corrupted (failure policy "keep origin writes") or
//!   destroyed it never becomes valid again; origin writes then skip the
//!   copy. The engine marks an image destroyed before it lets the device's
//!   held writes go, so no image read can pass its final check after an
//!   uncopied write.
//! - A copy gives its storage slot back when it fails: failed copies cost
//!   no storage. Through user space it reads the origin before it takes the
//!   slot; inside the kernel (`copy_file_range(2)`, when the origin and the
//!   storage are files that allow it) it needs the slot first.
//! - A chunk's data moves either inside the kernel or through a reused
//!   buffer; which one changes nothing of the chunk's states. A chunk that
//!   is a hole on the origin when it is copied (`SEEK_DATA`, which sees the
//!   page cache; no origin write into it runs meanwhile) moves no data: its
//!   slot is grown storage that reads as zeroes, or is written with zeroes.
//!
//! Called by [`crate::TrackedDevice`] (origin writes) and [`crate::Image`].

use std::sync::atomic::{AtomicBool as HintBool, AtomicU64 as Counter};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::chunk_map::{ChunkMap, ChunkState};
use crate::config::CopyErrorPolicy;
use crate::copier::CopierPool;
use crate::device::{push_extent, BlockDevice, Extent};
use crate::diff_storage::{DiffStorage, StorageSlot};
use crate::error::{Error, Result};
use crate::events::{Event, EventQueue};
use crate::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use crate::sync::{wait_until, Condvar, Mutex};

#[derive(Debug)]
pub(crate) struct DeviceSnapshot {
    // Never changed after the take.
    /// Unique among the device snapshots of this process, never reused:
    /// what tells a frontend that a name now serves another snapshot.
    id: u64,
    device_name: String,
    origin: Arc<dyn BlockDevice>,
    size: u64,
    chunk_shift: u32,
    storage: Arc<DiffStorage>,
    events: Arc<EventQueue>,
    settings: CowSettings,
    // Lock-free state.
    chunks: ChunkMap,
    /// The errno of the failure that invalidated the image, 0 while valid;
    /// set once, after `corruption` holds its message.
    corrupted: AtomicI32,
    corruption: Mutex<String>,
    destroyed: AtomicBool,
    /// Waits for copies: guards nothing, pairs the condition variable with
    /// the chunk states, `corrupted` and `destroyed`, each of which is
    /// changed before the waiters are woken.
    copy_done: (Mutex<()>, Condvar),
    // Not schedule-checked atomics (like the id counter): a hint and two
    // counters that no state machine reads.
    /// Whether copies try the kernel first: true while the origin is a file
    /// and no copy found the pair unable to; then false for good.
    kernel_copy: HintBool,
    /// Chunks copied, of those the ones copied wholly inside the kernel,
    /// and the ones that were holes on the origin.
    copied: Counter,
    kernel_copied: Counter,
    holes: Counter,
    buffers: BufferPool,
}

/// Most bytes and most buffers a [`BufferPool`] keeps for reuse.
const POOL_BYTES: usize = 8 << 20;
const POOL_BUFFERS: usize = 16;

/// Chunk buffers for copies through user space, reused: a fresh
/// `vec![0; chunk]` per copy is an allocation glibc serves by mmap for a
/// 256 KiB chunk, so every first write paid page faults and the kernel's
/// zeroing of each page, then the munmap. Bounded: at most `keep` buffers
/// wait for reuse; more concurrent copies allocate and drop their own.
#[derive(Debug)]
struct BufferPool {
    size: usize,
    keep: usize,
    /// Not a schedule-checked lock: held only for one push or pop, never
    /// across another lock, a wait or I/O.
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn new(size: usize) -> Self {
        Self {
            size,
            keep: (POOL_BYTES / size.max(1)).clamp(1, POOL_BUFFERS),
            free: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a buffer of `len` bytes (at most the chunk size), with
    /// whatever an earlier copy left in it.
    fn with<T>(&self, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        let taken = self.free.lock().unwrap().pop();
        let mut buf = taken.unwrap_or_else(|| vec![0; self.size]);
        let result = f(&mut buf[..len]);
        let mut free = self.free.lock().unwrap();
        if free.len() < self.keep {
            free.push(buf);
        }
        result
    }
}

#[derive(Debug)]
pub(crate) struct CowSettings {
    pub chunk_shift: u32,
    pub policy: CopyErrorPolicy,
    /// Longest any writer or reader waits for a copy.
    pub copy_timeout: Option<Duration>,
    /// Longest a copy waits for storage to be appended when it is full.
    pub storage_wait: Duration,
    /// Where copies run when there is a copy timeout (so that the waiter can
    /// give up while the copy finishes).
    pub copier: Option<Arc<CopierPool>>,
}

/// One step of an image walk ([`DeviceSnapshot::walk_image`]).
enum Step {
    /// Read `[start, end)` from the origin (a run of untouched chunks).
    Origin { start: u64, end: u64 },
    /// `[start, end)` of the last origin run is confirmed: its chunks were
    /// still untouched after the read. The rest of the run is walked again.
    Confirmed { start: u64, end: u64 },
    /// `[start, end)` lives in the storage at `slot`, from `offset_in_chunk`.
    Copied {
        slot: StorageSlot,
        start: u64,
        end: u64,
        offset_in_chunk: u64,
    },
}

/// The part of one chunk inside a request.
struct Piece {
    chunk: u64,
    start: u64,
    end: u64,
    offset_in_chunk: u64,
}

impl DeviceSnapshot {
    pub fn new(
        device_name: String,
        origin: Arc<dyn BlockDevice>,
        settings: CowSettings,
        storage: Arc<DiffStorage>,
        events: Arc<EventQueue>,
    ) -> Self {
        // Not a schedule-checked atomic: only ever incremented, and read by
        // no state machine.
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let size = origin.size();
        let chunk_shift = settings.chunk_shift;
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            device_name,
            size,
            chunk_shift,
            storage,
            events,
            settings,
            chunks: ChunkMap::new(size.div_ceil(1 << chunk_shift)),
            corrupted: AtomicI32::new(0),
            corruption: Mutex::new(String::new()),
            destroyed: AtomicBool::new(false),
            copy_done: (Mutex::new(()), Condvar::new()),
            kernel_copy: HintBool::new(origin.as_fd().is_some()),
            copied: Counter::new(0),
            kernel_copied: Counter::new(0),
            holes: Counter::new(0),
            buffers: BufferPool::new(1 << chunk_shift),
            origin,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Chunks copied so far; of those, the ones copied wholly inside the
    /// kernel, and the ones that were holes on the origin (kept without
    /// reading or writing data where their slot reads as zeroes).
    pub fn copy_counts(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.copied.load(Relaxed),
            self.kernel_copied.load(Relaxed),
            self.holes.load(Relaxed),
        )
    }

    pub fn footprint(&self) -> usize {
        self.chunks.footprint()
    }

    /// The errno of the failure that invalidated the image, 0 while valid.
    pub fn error_code(&self) -> i32 {
        self.corrupted.load(Ordering::SeqCst)
    }

    /// From now on every image call fails and origin writes skip the copy;
    /// every waiter is woken.
    pub fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::SeqCst);
        self.wake_waiters();
    }

    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk << self.chunk_shift;
        (start, (start + self.chunk_size()).min(self.size) - start)
    }

    /// The chunk pieces of `[offset, end)`, in order.
    fn pieces(&self, offset: u64, end: u64) -> impl Iterator<Item = Piece> + '_ {
        let first = offset >> self.chunk_shift;
        let last = (end.max(offset + 1) - 1) >> self.chunk_shift;
        (first..=last)
            .filter(move |_| end > offset)
            .map(move |chunk| {
                let (chunk_start, chunk_len) = self.chunk_range(chunk);
                let start = offset.max(chunk_start);
                Piece {
                    chunk,
                    start,
                    end: end.min(chunk_start + chunk_len),
                    offset_in_chunk: start - chunk_start,
                }
            })
    }

    /// Whether origin writes still need copies: the image is neither
    /// corrupted nor destroyed.
    fn needs_copies(&self) -> bool {
        !self.destroyed.load(Ordering::SeqCst) && self.corrupted.load(Ordering::SeqCst) == 0
    }

    /// Whether the image can still be used: not destroyed, not corrupted.
    pub fn check_usable(&self) -> Result<()> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::NotFound(format!(
                "snapshot image of {} (the snapshot was destroyed)",
                self.device_name
            )));
        }
        let errno = self.corrupted.load(Ordering::SeqCst);
        if errno != 0 {
            return Err(Error::Corrupted {
                device: self.device_name.clone(),
                cause: self.corruption.lock().unwrap().clone(),
                errno,
            });
        }
        Ok(())
    }

    /// The copy-before-write for an origin write of `[offset, offset+len)`.
    /// Ok means the write may proceed; Err only under the
    /// "break origin write" policy.
    pub fn before_origin_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        for piece in self.pieces(offset, offset + len) {
            if !self.needs_copies() {
                return Ok(());
            }
            match self.copy_chunk(piece.chunk) {
                Ok(_) => {}
                // Corrupted or destroyed meanwhile: nothing left to keep.
                Err(_) if !self.needs_copies() => return Ok(()),
                Err(e) => match self.settings.policy {
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
        // 0 means "valid" here; every error has a real errno, but be sure.
        let errno = match cause.errno() {
            0 => rustix::io::Errno::IO.raw_os_error(),
            e => e,
        };
        let mut message = self.corruption.lock().unwrap();
        if self.corrupted.load(Ordering::SeqCst) != 0 {
            return;
        }
        *message = cause.to_string();
        self.corrupted.store(errno, Ordering::SeqCst);
        drop(message);
        tracing::error!(device = %self.device_name, error = %cause, "snapshot image corrupted");
        self.events.push(Event::Corrupted {
            device: self.device_name.clone(),
            errno,
        });
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        let (lock, cv) = &self.copy_done;
        drop(lock.lock().unwrap());
        cv.notify_all();
    }

    /// `None`: no timeout, or one too long to add to the clock.
    fn deadline(&self) -> Option<Instant> {
        self.settings
            .copy_timeout
            .and_then(|t| Instant::now().checked_add(t))
    }

    fn timed_out(&self, chunk: u64) -> Error {
        Error::TimedOut {
            what: format!(
                "copy of chunk {chunk} of {} to the difference storage",
                self.device_name
            ),
            millis: self.settings.copy_timeout.unwrap_or_default().as_millis(),
        }
    }

    /// Makes sure the chunk's take-time content is in the storage: copies it
    /// or waits for the thread that does.
    fn copy_chunk(self: &Arc<Self>, chunk: u64) -> Result<StorageSlot> {
        let deadline = self.deadline();
        loop {
            self.check_usable()?;
            match self.chunks.state(chunk) {
                ChunkState::Copied(slot) => return Ok(slot),
                ChunkState::Copying => self.wait_for_copy(chunk, deadline)?,
                ChunkState::Untouched => {
                    if self.chunks.try_begin_copy(chunk) {
                        return match &self.settings.copier {
                            None => self.copy_claimed(chunk),
                            Some(pool) => self.copy_on_pool(pool, chunk, deadline),
                        };
                    }
                }
            }
        }
    }

    /// Waits until the chunk is no longer being copied or the image became
    /// unusable; fails at the deadline.
    fn wait_for_copy(&self, chunk: u64, deadline: Option<Instant>) -> Result<()> {
        let (lock, cv) = &self.copy_done;
        let mut guard = lock.lock().unwrap();
        let mut expired = false;
        loop {
            if self.chunks.state(chunk) != ChunkState::Copying || !self.needs_copies() {
                return Ok(());
            }
            if expired {
                return Err(self.timed_out(chunk));
            }
            (guard, expired) = wait_until(cv, lock, guard, deadline);
        }
    }

    /// Runs the copy of a claimed chunk on the copier pool and waits for it
    /// until the deadline; the copy goes on after a timeout and finishes
    /// the chunk's state itself.
    fn copy_on_pool(
        self: &Arc<Self>,
        pool: &CopierPool,
        chunk: u64,
        deadline: Option<Instant>,
    ) -> Result<StorageSlot> {
        let outcome: Arc<Mutex<Option<Result<StorageSlot>>>> = Arc::new(Mutex::new(None));
        let (this, done) = (Arc::clone(self), Arc::clone(&outcome));
        pool.run(Box::new(move || {
            let result = this.copy_claimed(chunk);
            *done.lock().unwrap() = Some(result);
            this.wake_waiters();
        }));
        let (lock, cv) = &self.copy_done;
        let mut guard = lock.lock().unwrap();
        let mut expired = false;
        loop {
            if let Some(result) = outcome.lock().unwrap().take() {
                return result;
            }
            self.check_usable()?;
            if expired {
                return Err(self.timed_out(chunk));
            }
            (guard, expired) = wait_until(cv, lock, guard, deadline);
        }
    }

    fn copy_claimed(&self, chunk: u64) -> Result<StorageSlot> {
        let result = self.copy_to_storage(chunk);
        match &result {
            Ok(slot) => self.chunks.finish_copy(chunk, *slot),
            Err(_) => self.chunks.abort_copy(chunk),
        }
        self.wake_waiters();
        result
    }

    /// Puts the chunk's origin content into a new storage slot.
    fn copy_to_storage(&self, chunk: u64) -> Result<StorageSlot> {
        use std::sync::atomic::Ordering::Relaxed;
        let (start, len) = self.chunk_range(chunk);
        let slot = if self.origin_is_hole(start, len) {
            self.holes.fetch_add(1, Relaxed);
            self.keep_hole(len)?
        } else if self.kernel_copy.load(Relaxed) {
            self.copy_in_kernel(chunk, start, len)?
        } else {
            self.buffers.with(len as usize, |buf| {
                self.read_origin(chunk, buf, start)?;
                let slot = self.allocate(len)?;
                self.write_storage(slot, len, buf, 0)?;
                Ok::<_, Error>(slot)
            })?
        };
        self.copied.fetch_add(1, Relaxed);
        Ok(slot)
    }

    /// The copy by `copy_file_range(2)`: the slot first, as the kernel
    /// needs the destination; what the kernel did not copy (all of it when
    /// the pair cannot copy that way: another filesystem, a block device)
    /// goes through a buffer. The origin write waits for this copy, and the
    /// kernel reads through the page cache, so the copy holds the content
    /// before that write.
    fn copy_in_kernel(&self, chunk: u64, start: u64, len: u64) -> Result<StorageSlot> {
        use std::sync::atomic::Ordering::Relaxed;
        let slot = self.allocate(len)?;
        let copied = match self.storage.copy_from(slot, &*self.origin, start, len) {
            Ok(Some(n)) => n.min(len),
            Ok(None) => {
                tracing::debug!(device = %self.device_name, "copies go through user space: the kernel cannot copy between origin and storage");
                self.kernel_copy.store(false, Relaxed);
                0
            }
            Err(e) => {
                self.storage.release(slot, len);
                return Err(e);
            }
        };
        if copied == len {
            self.kernel_copied.fetch_add(1, Relaxed);
            return Ok(slot);
        }
        let rest = (len - copied) as usize;
        self.buffers.with(rest, |buf| {
            let read = self.read_origin(chunk, buf, start + copied);
            if let Err(e) = read {
                self.storage.release(slot, len);
                return Err(e);
            }
            self.write_storage(slot, len, buf, copied)
        })?;
        Ok(slot)
    }

    /// Whether the origin holds no data in `[start, start + len)` (a hole,
    /// or space reserved and never written), which the filesystem tells
    /// (`SEEK_DATA`, which sees writes still in the page cache). No origin
    /// write into the chunk runs meanwhile: it waits for this copy. Where
    /// the device cannot tell, or the query fails, the chunk is copied.
    fn origin_is_hole(&self, start: u64, len: u64) -> bool {
        matches!(
            self.origin.extents(start, len).as_deref(),
            Ok([Extent { zero: true, len: l }]) if *l == len
        )
    }

    /// The copy of a chunk of zeroes: a slot that reads as zeroes already
    /// (grown space never handed out) is kept as it is, with no data read
    /// or written; another one is written with zeroes.
    fn keep_hole(&self, len: u64) -> Result<StorageSlot> {
        let (slot, zeroed) = self.allocate_slot(len)?;
        if !zeroed {
            // The first failed piece gives the slot back and ends the loop.
            crate::device::write_zero_pieces(0, len, |zeroes, at| {
                self.write_storage(slot, len, zeroes, at)
            })?;
        }
        Ok(slot)
    }

    fn allocate(&self, len: u64) -> Result<StorageSlot> {
        self.allocate_slot(len).map(|(slot, _)| slot)
    }

    /// A slot, and whether it reads as zeroes ([`DiffStorage::allocate`]).
    fn allocate_slot(&self, len: u64) -> Result<(StorageSlot, bool)> {
        self.storage.allocate(len, Some(self.settings.storage_wait))
    }

    fn read_origin(&self, chunk: u64, buf: &mut [u8], at: u64) -> Result<()> {
        self.origin.read_at(buf, at).map_err(|e| {
            Error::io(
                format!(
                    "{}: read of chunk {chunk} for the snapshot copy",
                    self.device_name
                ),
                e,
            )
        })
    }

    /// Writes into the chunk's slot; gives the slot (of `len` bytes) back
    /// when the write fails.
    fn write_storage(&self, slot: StorageSlot, len: u64, buf: &[u8], at: u64) -> Result<()> {
        let written = self.storage.write(slot, buf, at);
        if written.is_err() {
            self.storage.release(slot, len);
        }
        written
    }

    /// Walks `[offset, end)` of the image for a reader, in order: copied
    /// chunk pieces as [`Step::Copied`]; runs of untouched chunks as
    /// [`Step::Origin`] (one origin request per run), then re-checks the
    /// run's chunks and reports the prefix still untouched as
    /// [`Step::Confirmed`]; the walk resumes after that prefix from the
    /// chunks' new states. Waits (bounded) for chunks being copied.
    fn walk_image(
        &self,
        offset: u64,
        end: u64,
        mut step: impl FnMut(Step) -> Result<()>,
    ) -> Result<()> {
        let deadline = self.deadline();
        let mut pos = offset;
        while pos < end {
            let chunk = pos >> self.chunk_shift;
            let (chunk_start, chunk_len) = self.chunk_range(chunk);
            let piece_end = (chunk_start + chunk_len).min(end);
            match self.chunks.state(chunk) {
                ChunkState::Copied(slot) => {
                    step(Step::Copied {
                        slot,
                        start: pos,
                        end: piece_end,
                        offset_in_chunk: pos - chunk_start,
                    })?;
                    pos = piece_end;
                }
                ChunkState::Copying => {
                    self.wait_for_copy(chunk, deadline)?;
                    self.check_usable()?;
                }
                ChunkState::Untouched => {
                    let mut run_end = piece_end;
                    while run_end < end
                        && self.chunks.state(run_end >> self.chunk_shift) == ChunkState::Untouched
                    {
                        run_end = (run_end + self.chunk_size()).min(end);
                    }
                    step(Step::Origin {
                        start: pos,
                        end: run_end,
                    })?;
                    let last = (run_end - 1) >> self.chunk_shift;
                    let mut c = chunk;
                    while c <= last && self.chunks.state(c) == ChunkState::Untouched {
                        c += 1;
                    }
                    let confirmed = if c > last {
                        run_end
                    } else {
                        (c << self.chunk_shift).max(pos)
                    };
                    if confirmed > pos {
                        step(Step::Confirmed {
                            start: pos,
                            end: confirmed,
                        })?;
                    }
                    pos = confirmed;
                }
            }
        }
        Ok(())
    }

    /// Reads the image: `buf.len()` bytes at `offset`, as the origin was at
    /// the take plus the image's own writes.
    pub fn read_image(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        let end = offset + buf.len() as u64;
        let range = |start: u64, end: u64| (start - offset) as usize..(end - offset) as usize;
        self.walk_image(offset, end, |step| match step {
            Step::Origin { start, end } => {
                let run = &mut buf[range(start, end)];
                self.origin.read_at(run, start).map_err(|e| {
                    Error::io(
                        format!(
                            "{}: image read of {} bytes at {start}",
                            self.device_name,
                            run.len()
                        ),
                        e,
                    )
                })
            }
            Step::Confirmed { .. } => Ok(()),
            Step::Copied {
                slot,
                start,
                end,
                offset_in_chunk,
            } => self
                .storage
                .read(slot, &mut buf[range(start, end)], offset_in_chunk),
        })?;
        // A copy failure or a destroy during the read invalidates what was
        // read.
        self.check_usable()
    }

    /// Which parts of an image range read as zeroes: copied chunks are data;
    /// untouched runs have the origin's allocation, kept only where the walk
    /// confirms them, so a racing copy cannot make a hole claim wrong.
    pub fn image_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_usable()?;
        let mut extents = Vec::new();
        let mut origin_run = Vec::new();
        self.walk_image(offset, offset + len, |step| {
            match step {
                Step::Origin { start, end } => {
                    origin_run = self.origin.extents(start, end - start).map_err(|e| {
                        Error::io(format!("{}: allocation at {start}", self.device_name), e)
                    })?;
                }
                Step::Confirmed { start, end } => {
                    let mut left = end - start;
                    for e in &origin_run {
                        let len = e.len.min(left);
                        push_extent(&mut extents, Extent { len, zero: e.zero });
                        left -= len;
                    }
                }
                Step::Copied { start, end, .. } => push_extent(
                    &mut extents,
                    Extent {
                        len: end - start,
                        zero: false,
                    },
                ),
            }
            Ok(())
        })?;
        self.check_usable()?;
        Ok(extents)
    }

    /// Writes into the image: the chunks are copied first, the data lands in
    /// the difference storage only.
    pub fn write_image(self: &Arc<Self>, buf: &[u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        for piece in self.pieces(offset, offset + buf.len() as u64) {
            let slot = self.copy_chunk(piece.chunk)?;
            let data = &buf[(piece.start - offset) as usize..(piece.end - offset) as usize];
            self.storage.write(slot, data, piece.offset_in_chunk)?;
        }
        Ok(())
    }
}
