//! The difference storage of one snapshot ([`DiffStorage`]): where the old
//! content of copied chunks lives, shared by all the snapshot's devices.
//!
//! The storage is a list of extents (a device or file, an offset, a length),
//! filled in order; a chunk is always stored inside one extent, so the tail of
//! an extent too short for the next chunk is left unused. Extents come from:
//! a regular file that grows by `diff_storage_minimum` steps (fallocate)
//! whenever free space falls below half a step, up to the snapshot's limit;
//! an unnamed O_TMPFILE in a directory (grows the same way, vanishes with
//! the storage); a whole block device (fixed); and sector ranges appended at
//! any time, also after the take. When growth is needed and impossible, a
//! `no_space` event asks for more (once until storage is appended).
//!
//! Growth runs ahead of need, off the write path: the allocation that takes
//! free space below the low-water mark (half a step) starts one growth
//! thread, which fallocates the step in pieces of [`GROW_PIECE`] without
//! the allocator lock and publishes each piece under it (the pieces
//! of one step extend one extent). An allocation waits only when there is no
//! free slot at all, and then for the growth in flight (at most one per
//! storage), not for a fallocate of its own under the lock. The thread holds
//! the storage, so the storage (and its file) goes after the last growth.
//!
//! Not durable on purpose: a non-persistent snapshot does not survive a crash,
//! so nothing here is fsynced. Called by the copy-on-write path
//! ([`crate::snapshot`]) and by the engine when a snapshot is created or
//! storage is appended.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{FallocateFlags, Mode, OFlags};

use crate::device::{media, BlockDevice, DeviceIdentity, FileDevice};
use crate::error::{Error, Result};
use crate::events::{Event, EventQueue};
use crate::sync::{thread, wait_until, Condvar, Mutex, RwLock};
use crate::{SectorRange, SECTOR_SIZE};

/// Where a snapshot's difference storage starts out.
#[derive(Debug, Clone)]
pub enum StorageSpec {
    /// By what the path is: a regular file (used whole, then grown), a
    /// directory (an unnamed temporary file there, grown), or a block device
    /// (used whole, fixed size).
    Path(PathBuf),
    /// As `Path`, opened already (read-write, without `O_EXCL`) by the
    /// caller, who checked the right to: a regular file (an O_TMPFILE for a
    /// directory) or a block device. The engine never resolves `path`
    /// (messages only): it makes the file exclusive itself
    /// ([`FileDevice::exclusive`]) on a duplicate of the descriptor.
    File { file: Arc<File>, path: PathBuf },
    /// Nothing yet: sector ranges are appended later.
    Empty,
    /// A whole device object, fixed size (tests, benchmarks).
    Device(Arc<dyn BlockDevice>),
}

/// Most extents one storage holds: the extent index of a [`StorageSlot`]
/// has 20 bits.
const MAX_EXTENTS: usize = 1 << 20;
/// Most sectors one extent holds: the sector of a [`StorageSlot`] has 42
/// bits (2 PiB).
const MAX_EXTENT_SECTORS: u64 = 1 << SLOT_SECTOR_BITS;
const SLOT_SECTOR_BITS: u32 = 42;
/// Most bytes one fallocate call of a growth asks for. Off the allocator
/// lock is not off every lock: fallocate holds the file's inode lock, and so
/// does every write into the file (ext4, tmpfs), so a writer storing a chunk
/// waits for the piece in progress ([`pause_for_writers`] makes it one
/// piece). Pieces of 16 MiB keep that wait short where fallocate is slow
/// (tmpfs zeroes pages: about 2 ms here, seconds for a 1 GiB step; 4 MiB
/// pieces, 0.6 ms, would shorten it further but make a step of up to
/// 16 MiB grow in several visible parts), and an allocation that finds the
/// storage truly full waits for one piece, not for the whole step. Where
/// fallocate is cheap (ext4: under 1 ms for 1 GiB) the extra calls cost
/// nothing measurable.
const GROW_PIECE: u64 = 16 << 20;

/// Longest pause between two pieces of a growth.
const GROW_PAUSE_MAX: Duration = Duration::from_millis(5);

/// A pause between two pieces of a growth, as long as the last piece's
/// fallocate (at most [`GROW_PAUSE_MAX`]), taken only while the storage has
/// room. fallocate and every write into the file take the file's inode
/// lock, and a growth that called fallocate again at once got the lock back
/// before the woken writer (the kernel lets a running thread take it
/// first): on tmpfs, where a 16 MiB piece takes about 2 ms, the write after
/// the growth started waited for the whole 64 MiB step, 10-13 ms. With the
/// pause a write waits for one piece at most; the growth, which starts half
/// a step ahead of need, takes at most twice as long.
fn pause_for_writers(last_piece: Duration) {
    let pause = last_piece.min(GROW_PAUSE_MAX);
    // Under the schedule checker time does not pass: no pause.
    #[cfg(not(feature = "shuttle"))]
    std::thread::sleep(pause);
    #[cfg(feature = "shuttle")]
    let _ = pause;
}

/// Where one chunk lives: an extent and a sector offset inside it. Both are
/// range-checked when made ([`StorageSlot::new`]), so the packed form
/// ([`StorageSlot::encode`], 62 bits) cannot alias another slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSlot {
    extent: u32,
    sector: u64,
}

impl StorageSlot {
    /// `None` when the extent index or the sector is out of range.
    pub fn new(extent: usize, sector: u64) -> Option<Self> {
        (extent < MAX_EXTENTS && sector < MAX_EXTENT_SECTORS).then_some(Self {
            extent: extent as u32,
            sector,
        })
    }

    pub fn extent(self) -> usize {
        self.extent as usize
    }

    pub fn sector(self) -> u64 {
        self.sector
    }

    /// Packs into 62 bits: 20 bits of extent index, 42 of sector.
    pub fn encode(self) -> u64 {
        (self.extent as u64) << SLOT_SECTOR_BITS | self.sector
    }

    /// The inverse of [`Self::encode`] for any of its results.
    pub fn decode(word: u64) -> Self {
        Self {
            extent: ((word >> SLOT_SECTOR_BITS) as u32) & (MAX_EXTENTS as u32 - 1),
            sector: word & (MAX_EXTENT_SECTORS - 1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageStats {
    /// Bytes of storage available in all extents.
    pub total: u64,
    /// Bytes handed out to chunks (and extent tails skipped), not counting
    /// the slots of failed copies waiting for reuse.
    pub used: u64,
    pub limit: Option<u64>,
    pub extents: usize,
}

#[derive(Debug)]
struct StorageExtent {
    device: Arc<dyn BlockDevice>,
    offset: u64,
    len: u64,
    /// Space the storage grew by (fallocated past the file's end): it reads
    /// as zeroes until written. Appended ranges, block devices and a file's
    /// initial length may hold anything.
    zeroed: bool,
}

#[derive(Debug, Default)]
struct Allocator {
    extent: usize,
    next: u64,
    total: u64,
    used: u64,
    /// Slots of copies that failed, with their length, for the next copies.
    free: Vec<(u64, StorageSlot)>,
    no_space_reported: bool,
    /// A wait for more storage ran out: later allocations fail at once
    /// until storage is added.
    starved: bool,
    /// A growth thread is running (at most one per storage).
    growth_running: bool,
    /// The last growth thread, joined by [`DiffStorage::close`].
    growth_thread: Option<thread::JoinHandle<()>>,
    /// Bytes the growth in flight may still add; they count against the
    /// limit already.
    growing: u64,
    /// Growths that ended having added nothing (the filesystem is full, or
    /// fallocate failed): an allocation that saw one fail while it waited
    /// reports no space instead of starting another at once.
    growth_failures: u64,
    /// Growths started, and allocations that found no free slot and had to
    /// wait for one (the unit tests tell growth ahead of need by them).
    growths: u64,
    growth_waits: u64,
}

/// A file the storage grows by fallocate.
#[derive(Debug)]
struct GrowableFile {
    device: Arc<FileDevice>,
    /// The file's length when we got it; restored when the storage goes.
    original_len: u64,
    /// It held no data when we got it (only holes or reserved space), so it
    /// holds none when given back: what we wrote there is cleared.
    was_empty: bool,
    len: Mutex<u64>,
}

#[derive(Debug)]
pub(crate) struct DiffStorage {
    label: String,
    /// Lock order everywhere: `alloc`, then `extents`.
    extents: RwLock<Vec<StorageExtent>>,
    alloc: Mutex<Allocator>,
    /// Signalled when storage is added (appended or grown) or closed.
    space: Condvar,
    /// Held shared by every write into the storage; [`Self::close`] takes it
    /// exclusively, so no write lands after the storage is closed.
    open: RwLock<bool>,
    growable: Option<GrowableFile>,
    limit: Option<u64>,
    step: u64,
    max_extents: usize,
    events: Arc<EventQueue>,
}

/// Refuses a storage placed on something the engine serves: storing into a
/// served device could deadlock and would snapshot into itself.
pub(crate) fn check_not_served(path: &Path, served: &HashSet<DeviceIdentity>) -> Result<()> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!("difference storage path {shown}")),
        _ => Error::io(format!("cannot stat {shown}"), e),
    })?;
    check_meta_not_served(path, &meta, served)
}

/// [`check_not_served`] of a file open already (`path` for messages only).
pub(crate) fn check_file_not_served(
    file: &File,
    path: &Path,
    served: &HashSet<DeviceIdentity>,
) -> Result<()> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    check_meta_not_served(path, &meta, served)
}

fn check_meta_not_served(
    path: &Path,
    meta: &std::fs::Metadata,
    served: &HashSet<DeviceIdentity>,
) -> Result<()> {
    let shown = path.display();
    let own = if meta.file_type().is_block_device() {
        DeviceIdentity::Block { rdev: meta.rdev() }
    } else {
        DeviceIdentity::File {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    };
    // A file on a filesystem that lives on a served block device, or a loop
    // device over a served file, is served storage too.
    let on_filesystem =
        (!meta.file_type().is_block_device()).then_some(DeviceIdentity::Block { rdev: meta.dev() });
    let candidates: Vec<DeviceIdentity> = [Some(own), on_filesystem, own.loop_backing_file()]
        .into_iter()
        .flatten()
        .collect();
    // Block devices also clash through the media they share: a partition
    // of a served disk, the disk of a served partition, a device stacked
    // on a served one (sysfs tells).
    let sysfs = Path::new(media::SYSFS_ROOT);
    let shares_media = |a: &DeviceIdentity| {
        let DeviceIdentity::Block { rdev: a } = *a else {
            return false;
        };
        served.iter().any(|s| match *s {
            DeviceIdentity::Block { rdev: b } => media::shares_media(a, b, sysfs),
            DeviceIdentity::File { .. } => false,
        })
    };
    let refused = candidates
        .iter()
        .any(|id| served.contains(id) || shares_media(id));
    if refused {
        return Err(Error::InvalidArgument(format!(
            "difference storage {shown} is on a device this daemon serves; \
             place it on a device that is not tracked"
        )));
    }
    Ok(())
}

impl DiffStorage {
    pub fn new(
        label: String,
        spec: &StorageSpec,
        limit: Option<u64>,
        step: u64,
        served: &HashSet<DeviceIdentity>,
        events: Arc<EventQueue>,
    ) -> Result<Self> {
        let mut storage = Self {
            label,
            extents: RwLock::new(Vec::new()),
            alloc: Mutex::new(Allocator::default()),
            space: Condvar::new(),
            open: RwLock::new(true),
            growable: None,
            limit,
            step,
            max_extents: MAX_EXTENTS,
            events,
        };
        match spec {
            StorageSpec::Empty => {}
            StorageSpec::Device(device) => {
                let len = device.size() / SECTOR_SIZE * SECTOR_SIZE;
                storage.add_extent(device.clone(), 0, len)?;
            }
            StorageSpec::Path(path) => {
                check_not_served(path, served)?;
                let meta = std::fs::metadata(path)
                    .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
                if meta.is_dir() {
                    let file = open_tmpfile(path)?;
                    storage.growable = Some(GrowableFile::new(FileDevice::from_file(file, path)?));
                } else {
                    storage.start_with(FileDevice::open(path)?)?;
                }
            }
            StorageSpec::File { file, path } => {
                check_file_not_served(file, path, served)?;
                let file = file
                    .try_clone()
                    .map_err(|e| Error::io(format!("cannot use {}", path.display()), e))?;
                storage.start_with(FileDevice::exclusive(file, path)?)?;
            }
        }
        Ok(storage)
    }

    /// A block device is used whole; a regular file whole and then grown.
    fn start_with(&mut self, device: FileDevice) -> Result<()> {
        if device.is_block_device() {
            let len = device.size() / SECTOR_SIZE * SECTOR_SIZE;
            return self.add_extent(Arc::new(device), 0, len);
        }
        let growable = GrowableFile::new(device);
        let len = growable.original_len / SECTOR_SIZE * SECTOR_SIZE;
        *growable.len.lock().unwrap() = len;
        let dev = growable.device.clone();
        self.growable = Some(growable);
        if len > 0 {
            self.add_extent(dev, 0, len)?;
        }
        Ok(())
    }

    /// The block device with identity `identity` that this storage holds
    /// (opened exclusively), for appending more of its ranges: a second
    /// exclusive open of it, ours included, is refused by the kernel.
    pub(crate) fn held_block_device(
        &self,
        identity: DeviceIdentity,
    ) -> Option<Arc<dyn BlockDevice>> {
        self.extents
            .read()
            .unwrap()
            .iter()
            .find(|e| e.device.identity() == Some(identity))
            .map(|e| e.device.clone())
    }

    fn add_extent(&self, device: Arc<dyn BlockDevice>, offset: u64, len: u64) -> Result<()> {
        let mut alloc = self.alloc.lock().unwrap();
        let mut extents = self.extents.write().unwrap();
        self.push_extent_locked(&mut alloc, &mut extents, device, offset, len, false)
    }

    /// Adds an extent under both locks: the only place extents are added.
    /// `zeroed`: it reads as zeroes (grown space).
    #[allow(clippy::too_many_arguments)]
    fn push_extent_locked(
        &self,
        alloc: &mut Allocator,
        extents: &mut Vec<StorageExtent>,
        device: Arc<dyn BlockDevice>,
        offset: u64,
        len: u64,
        zeroed: bool,
    ) -> Result<()> {
        // Longer extents are split: a slot's sector has 42 bits.
        let pieces = extent_pieces(len);
        if extents.len() + pieces > self.max_extents {
            return Err(Error::NoSpace {
                snapshot: self.label.clone(),
                detail: format!(
                    "{pieces} more extents would exceed the limit of {} (it has {})",
                    self.max_extents,
                    extents.len()
                ),
            });
        }
        let mut pos = 0;
        while pos < len {
            let piece = (len - pos).min(MAX_EXTENT_SECTORS * SECTOR_SIZE);
            extents.push(StorageExtent {
                device: device.clone(),
                offset: offset + pos,
                len: piece,
                zeroed,
            });
            alloc.total += piece;
            pos += piece;
        }
        alloc.no_space_reported = false;
        alloc.starved = false;
        self.space.notify_all();
        Ok(())
    }

    /// Appends sector ranges of `device` (a block device or file of any
    /// size), usable at once, also after the take. Every range must hold at
    /// least `min_len` bytes (the snapshot's chunk size: a chunk is stored
    /// in one extent) and none may overlap storage the snapshot has on the
    /// same device; all or none are added.
    pub fn append_ranges(
        &self,
        device: Arc<dyn BlockDevice>,
        ranges: &[SectorRange],
        min_len: u64,
    ) -> Result<()> {
        let size = device.size();
        for r in ranges {
            let end = r
                .start
                .checked_add(r.count)
                .and_then(|e| e.checked_mul(SECTOR_SIZE));
            if r.count == 0 || end.is_none_or(|end| end > size) {
                return Err(Error::InvalidArgument(format!(
                    "sector range {}:{} is empty or beyond the end of the storage device ({} sectors)",
                    r.start,
                    r.count,
                    size / SECTOR_SIZE
                )));
            }
            if r.byte_len() < min_len {
                return Err(Error::InvalidArgument(format!(
                    "sector range {}:{} ({} bytes) is smaller than the snapshot's chunk size \
                     of {min_len} bytes ({} sectors), the least a range must hold",
                    r.start,
                    r.count,
                    r.byte_len(),
                    min_len / SECTOR_SIZE
                )));
            }
        }
        // Checked and added under one lock: two appends of the same range
        // cannot both pass the check.
        let mut alloc = self.alloc.lock().unwrap();
        let mut extents = self.extents.write().unwrap();
        check_no_overlap(&self.label, &extents, &device, ranges)?;
        let pieces: usize = ranges.iter().map(|r| extent_pieces(r.byte_len())).sum();
        if extents.len() + pieces > self.max_extents {
            return Err(Error::NoSpace {
                snapshot: self.label.clone(),
                detail: format!(
                    "{} more ranges would exceed the limit of {} extents",
                    ranges.len(),
                    self.max_extents
                ),
            });
        }
        for r in ranges {
            self.push_extent_locked(
                &mut alloc,
                &mut extents,
                device.clone(),
                r.byte_offset(),
                r.byte_len(),
                false,
            )?;
        }
        Ok(())
    }

    /// Hands out `len` bytes (rounded up to a sector) inside one extent,
    /// and says whether they read as zeroes: grown space handed out for the
    /// first time (not the slot of a failed copy, which may hold part of
    /// it), so a copy of zeroes into it can be skipped.
    /// When that takes free space below half a step, growth starts in the
    /// background. When there is no room, it waits for the growth in flight
    /// (starting one if none is); when the storage cannot grow, it queues
    /// `no_space` and waits up to `wait` for storage to be appended; after a
    /// wait that ran out, later calls fail at once until storage is added.
    pub fn allocate(
        self: &Arc<Self>,
        len: u64,
        wait: Option<Duration>,
    ) -> Result<(StorageSlot, bool)> {
        let len = len.next_multiple_of(SECTOR_SIZE);
        // No wait at all for zero; an unbounded one for a wait too long to
        // add to the clock.
        let waits = wait.is_some_and(|w| !w.is_zero());
        let deadline = wait.and_then(|w| Instant::now().checked_add(w));
        let mut alloc = self.alloc.lock().unwrap();
        // A growth that fails while this call waits is not retried by it:
        // the filesystem is full, so report instead of looping.
        let failures = alloc.growth_failures;
        let mut waited = false;
        loop {
            self.check_open()?;
            if let Some(slot) = self.take_free(&mut alloc, len) {
                return Ok((slot, false));
            }
            if let Some((slot, zeroed)) = self.take_from_extents(&mut alloc, len) {
                if !alloc.growth_running && alloc.total - alloc.used < self.step / 2 {
                    self.grow_or_report(&mut alloc, len);
                }
                return Ok((slot, zeroed));
            }
            // Truly full: wait for the growth in flight, as the fallocate
            // under the lock used to take (not bounded by `wait`, which is
            // for storage that must come from outside).
            if alloc.growth_running
                || (alloc.growth_failures == failures && self.grow_or_report(&mut alloc, len))
            {
                if !waited {
                    waited = true;
                    alloc.growth_waits += 1;
                }
                alloc = self.space.wait(alloc).unwrap();
                continue;
            }
            if alloc.starved || !waits {
                return Err(self.no_space(&alloc));
            }
            let (guard, expired) = wait_until(&self.space, &self.alloc, alloc, deadline);
            alloc = guard;
            if expired {
                alloc.starved = true;
            }
        }
    }

    /// Starts a growth when a growable storage holds less than half a step
    /// free and none is in flight, as an allocation would; nothing when it
    /// cannot grow (full, at its limit: the first allocation reports that).
    /// Called when the snapshot is created, so that its first copies after
    /// the take find room instead of waiting for a fallocate.
    pub fn grow_ahead(self: &Arc<Self>) {
        let mut alloc = self.alloc.lock().unwrap();
        if alloc.growth_running || alloc.total - alloc.used >= self.step / 2 {
            return;
        }
        if self.growth_step(&alloc, 0).is_some() {
            self.grow_or_report(&mut alloc, 0);
        }
    }

    /// Waits until no growth is in flight (tests and benchmarks compare the
    /// storage with what it holds once growth has settled).
    pub fn wait_growth(&self) {
        let mut alloc = self.alloc.lock().unwrap();
        while alloc.growth_running {
            alloc = self.space.wait(alloc).unwrap();
        }
    }

    fn no_space(&self, alloc: &Allocator) -> Error {
        Error::NoSpace {
            snapshot: self.label.clone(),
            detail: format!(
                "{} bytes in use of {}{}",
                alloc.used,
                alloc.total,
                match self.limit {
                    Some(l) => format!(", limit {l} bytes"),
                    None => String::new(),
                }
            ),
        }
    }

    /// Gives back the slot of a copy that failed, for the next copy.
    pub fn release(&self, slot: StorageSlot, len: u64) {
        let len = len.next_multiple_of(SECTOR_SIZE);
        let mut alloc = self.alloc.lock().unwrap();
        alloc.used -= len;
        alloc.free.push((len, slot));
    }

    fn take_free(&self, alloc: &mut Allocator, len: u64) -> Option<StorageSlot> {
        let i = alloc.free.iter().position(|&(l, _)| l >= len)?;
        let (held, slot) = alloc.free.swap_remove(i);
        alloc.used += held;
        Some(slot)
    }

    /// The next slot in order, and whether its extent reads as zeroes.
    fn take_from_extents(&self, alloc: &mut Allocator, len: u64) -> Option<(StorageSlot, bool)> {
        let extents = self.extents.read().unwrap();
        while let Some(extent) = extents.get(alloc.extent) {
            if extent.len - alloc.next >= len {
                let slot = StorageSlot::new(alloc.extent, alloc.next / SECTOR_SIZE)
                    .expect("extents are capped in number and length");
                alloc.next += len;
                alloc.used += len;
                return Some((slot, extent.zeroed));
            }
            alloc.used += extent.len - alloc.next;
            alloc.extent += 1;
            alloc.next = 0;
        }
        None
    }

    /// Whether a chunk of `len` bytes can still be stored: there is room for
    /// it, or the storage is growing or can grow by it.
    pub fn can_hold(&self, len: u64) -> bool {
        let len = len.next_multiple_of(SECTOR_SIZE);
        let alloc = self.alloc.lock().unwrap();
        if self.has_room(&alloc, len) {
            return true;
        }
        let extents = self.extents.read().unwrap().len();
        self.growable.is_some()
            && (alloc.growth_running && alloc.growing >= len
                || extents < self.max_extents
                    && self
                        .limit
                        .is_none_or(|l| l.saturating_sub(alloc.total + alloc.growing) >= len))
    }

    /// Waits while a growth is in flight and no slot of `len` bytes is
    /// free. The take calls it before it holds any write, so that the
    /// first copies after it find room instead of waiting for a fallocate
    /// (the wait moves from the writers to the take command).
    pub fn wait_for_room(&self, len: u64) {
        let len = len.next_multiple_of(SECTOR_SIZE);
        let mut alloc = self.alloc.lock().unwrap();
        while alloc.growth_running && !self.has_room(&alloc, len) {
            alloc = self.space.wait(alloc).unwrap();
        }
    }

    /// Whether a slot of `len` bytes (a multiple of a sector) can be handed
    /// out now: a free one, or room in the current or a later extent.
    fn has_room(&self, alloc: &Allocator, len: u64) -> bool {
        if alloc.free.iter().any(|&(l, _)| l >= len) {
            return true;
        }
        let extents = self.extents.read().unwrap();
        extents
            .iter()
            .enumerate()
            .skip(alloc.extent)
            .any(|(i, e)| e.len - if i == alloc.extent { alloc.next } else { 0 } >= len)
    }

    /// Starts growing the file by one step (less at the limit) on a growth
    /// thread; when it cannot (not growable, at the limit or the extent
    /// cap), queues `no_space` once. True when a growth was started. Called
    /// with no growth in flight.
    fn grow_or_report(self: &Arc<Self>, alloc: &mut Allocator, need: u64) -> bool {
        debug_assert!(!alloc.growth_running);
        if let Some(want) = self.growth_step(alloc, need) {
            alloc.growth_running = true;
            alloc.growing = want;
            alloc.growths += 1;
            let storage = self.clone();
            let spawned = thread::Builder::new()
                .name("blksnap-grow".into())
                .spawn(move || {
                    // Writers needing room wait for this growth.
                    crate::mark_io_flusher("blksnap-grow");
                    storage.grow(want, need)
                });
            match spawned {
                Ok(handle) => {
                    alloc.growth_thread = Some(handle);
                    return true;
                }
                Err(e) => {
                    alloc.growth_running = false;
                    alloc.growing = 0;
                    tracing::warn!(storage = %self.label, error = %e, "difference storage cannot grow: no growth thread");
                }
            }
        }
        self.report_no_space(alloc);
        false
    }

    /// Queues `no_space` for a step, once until storage is added.
    fn report_no_space(&self, alloc: &mut Allocator) {
        if !alloc.no_space_reported {
            alloc.no_space_reported = true;
            self.events.push(Event::NoSpace {
                requested_sectors: self.step / SECTOR_SIZE,
            });
        }
    }

    /// How much the next growth asks for: a step, less at the limit; `None`
    /// when that would not hold `need` bytes or the storage cannot grow.
    fn growth_step(&self, alloc: &Allocator, need: u64) -> Option<u64> {
        self.growable.as_ref()?;
        if self.extents.read().unwrap().len() >= self.max_extents {
            return None;
        }
        let room = self
            .limit
            .map_or(u64::MAX, |l| l.saturating_sub(alloc.total + alloc.growing));
        let want = self.step.min(room) / SECTOR_SIZE * SECTOR_SIZE;
        (want > 0 && want >= need).then_some(want)
    }

    /// The growth thread: grows by `want` bytes (see [`Self::grow_step`]),
    /// then by more steps while free space is still below half a step
    /// (allocations went on meanwhile), and wakes the allocations waiting,
    /// also when nothing was added (they report no space then) or the
    /// storage closed.
    fn grow(self: Arc<Self>, mut want: u64, need: u64) {
        loop {
            let (grown, failure, closed) = self.grow_step(want, need);
            let mut alloc = self.alloc.lock().unwrap();
            alloc.growing = 0;
            if grown == 0 {
                alloc.growth_failures += 1;
            }
            let mut again = None;
            if !closed {
                if let Some(e) = failure.filter(|_| grown == 0) {
                    tracing::warn!(storage = %self.label, error = %e, "difference storage cannot grow");
                    self.report_no_space(&mut alloc);
                } else if grown < want {
                    // The filesystem is nearly full: ask for storage elsewhere now.
                    tracing::warn!(storage = %self.label, grew = grown, wanted = want, "difference storage filesystem is full: grew by less than a step");
                    self.events.push(Event::NoSpace {
                        requested_sectors: (want - grown) / SECTOR_SIZE,
                    });
                } else if alloc.total - alloc.used < self.step / 2 {
                    // What the allocation that took free space below the
                    // mark while this growth ran would have started.
                    // A growth ahead of any need (`need` 0, at the
                    // create) that stops at the limit reports nothing:
                    // the first allocation below the mark does.
                    again = self.growth_step(&alloc, need);
                    if again.is_none() && need > 0 {
                        self.report_no_space(&mut alloc);
                    }
                }
            }
            self.space.notify_all();
            match again {
                Some(next) => {
                    alloc.growing = next;
                    alloc.growths += 1;
                    want = next;
                }
                None => {
                    alloc.growth_running = false;
                    return;
                }
            }
        }
    }

    /// Fallocates `want` bytes at the end of the file in pieces, without
    /// the allocator lock, and publishes each piece under it, waking the
    /// allocations that wait. A full filesystem may still hold less: a piece
    /// is halved down to `need` bytes before giving up. Nothing is published
    /// into a closed storage (the space goes back to the filesystem when the
    /// storage is dropped). Returns the bytes added, the error that stopped
    /// it early, and whether the storage was closed.
    fn grow_step(&self, want: u64, need: u64) -> (u64, Option<Error>, bool) {
        let growable = self.growable.as_ref().expect("only growable storage grows");
        // Held for the whole step: the file's length is only ours to move.
        let mut len = growable.len.lock().unwrap();
        let mut piece = GROW_PIECE.min(want);
        let mut grown = 0;
        // The extent this step extends, once its first piece is in.
        let mut extent = None;
        while grown < want {
            if !*self.open.read().unwrap() {
                // Closed while waiting for the file or between pieces.
                return (grown, None, true);
            }
            let by = piece.min(want - grown);
            let started = Instant::now();
            match rustix::fs::fallocate(growable.device.file(), FallocateFlags::empty(), *len, by) {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::NOSPC && by / 2 >= need.max(SECTOR_SIZE) => {
                    piece = (by / 2).next_multiple_of(SECTOR_SIZE);
                    continue;
                }
                Err(e) => {
                    let e = Error::io(
                        format!(
                            "cannot grow difference storage {} by {by} bytes",
                            growable.device.path().display()
                        ),
                        e.into(),
                    );
                    return (grown, Some(e), false);
                }
            }
            let offset = *len;
            *len += by;
            let mut alloc = self.alloc.lock().unwrap();
            if !*self.open.read().unwrap() {
                return (grown, None, true);
            }
            let mut extents = self.extents.write().unwrap();
            match self.publish_piece(&mut alloc, &mut extents, extent, offset, by) {
                Ok(index) => extent = Some(index),
                Err(e) => return (grown, Some(e), false),
            }
            alloc.growing -= by;
            grown += by;
            tracing::debug!(storage = %self.label, offset, by, "difference storage grew");
            let room = alloc.total - alloc.used;
            drop(extents);
            drop(alloc);
            if grown < want && room >= self.step / 4 {
                pause_for_writers(started.elapsed());
            }
        }
        (grown, None, false)
    }

    /// Adds one grown piece at `offset`: extends this growth's extent when
    /// the piece follows it, is the last extent and the allocator has not
    /// moved past it; otherwise a new extent. Returns the extent's index.
    fn publish_piece(
        &self,
        alloc: &mut Allocator,
        extents: &mut Vec<StorageExtent>,
        extent: Option<usize>,
        offset: u64,
        by: u64,
    ) -> Result<usize> {
        let device = self.growable.as_ref().expect("growable").device.clone();
        if let Some(i) = extent.filter(|&i| i + 1 == extents.len() && alloc.extent <= i) {
            let e = &mut extents[i];
            if e.offset + e.len == offset && e.len + by <= MAX_EXTENT_SECTORS * SECTOR_SIZE {
                e.len += by;
                alloc.total += by;
                alloc.no_space_reported = false;
                alloc.starved = false;
                self.space.notify_all();
                return Ok(i);
            }
        }
        self.push_extent_locked(alloc, extents, device, offset, by, true)?;
        Ok(extents.len() - 1)
    }

    fn locate(&self, slot: StorageSlot, offset_in_chunk: u64) -> (Arc<dyn BlockDevice>, u64) {
        let extents = self.extents.read().unwrap();
        let extent = &extents[slot.extent()];
        (
            extent.device.clone(),
            extent.offset + slot.sector() * SECTOR_SIZE + offset_in_chunk,
        )
    }

    fn check_open(&self) -> Result<()> {
        if *self.open.read().unwrap() {
            Ok(())
        } else {
            Err(self.closed())
        }
    }

    fn closed(&self) -> Error {
        Error::NotFound(format!(
            "difference storage of snapshot {} (the snapshot was destroyed)",
            self.label
        ))
    }

    /// Fences the storage: waits for the writes in flight, and every later
    /// write or allocation fails. Called by the snapshot's destroy, so that
    /// nothing lands in storage (maybe appended ranges of someone else's
    /// device) after the destroy returned.
    ///
    /// A growth in flight stops after its current piece, publishing nothing;
    /// close waits for its thread to end, so that the thread's hold on the
    /// storage is gone and the storage (and the space it grew) goes with the
    /// snapshot's last reference, not some time later.
    pub fn close(&self) {
        *self.open.write().unwrap() = false;
        // Wake allocations waiting for storage: there will be none.
        let growth = {
            let mut alloc = self.alloc.lock().unwrap();
            self.space.notify_all();
            alloc.growth_thread.take()
        };
        if let Some(growth) = growth {
            if growth.join().is_err() {
                tracing::error!(storage = %self.label, "difference storage growth thread panicked");
            }
        }
    }

    pub fn write(&self, slot: StorageSlot, buf: &[u8], offset_in_chunk: u64) -> Result<()> {
        let open = self.open.read().unwrap();
        if !*open {
            return Err(self.closed());
        }
        let (device, at) = self.locate(slot, offset_in_chunk);
        device.write_at(buf, at).map_err(|e| {
            Error::io(
                format!(
                    "difference storage of snapshot {}: write of {} bytes at {at} on {device:?}",
                    self.label,
                    buf.len()
                ),
                e,
            )
        })
    }

    /// Copies `len` bytes at `origin_offset` of `origin` into the slot
    /// inside the kernel ([`BlockDevice::copy_to`]), fenced like
    /// [`Self::write`]. `None` when the origin and this slot's extent cannot
    /// copy that way; otherwise how many bytes from the start of the chunk
    /// were copied, which may be fewer than `len` (none on a failure): the
    /// caller writes the rest.
    pub fn copy_from(
        &self,
        slot: StorageSlot,
        origin: &dyn BlockDevice,
        origin_offset: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        let open = self.open.read().unwrap();
        if !*open {
            return Err(self.closed());
        }
        let (device, at) = self.locate(slot, 0);
        match origin.copy_to(origin_offset, &*device, at, len) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(None),
            Err(e) => {
                // The copy through user space that follows reports the
                // error if it is real.
                tracing::debug!(storage = %self.label, error = %e, "in-kernel copy failed");
                Ok(Some(0))
            }
        }
    }

    pub fn read(&self, slot: StorageSlot, buf: &mut [u8], offset_in_chunk: u64) -> Result<()> {
        let (device, at) = self.locate(slot, offset_in_chunk);
        device.read_at(buf, at).map_err(|e| {
            Error::io(
                format!(
                    "difference storage of snapshot {}: read of {} bytes at {at}",
                    self.label,
                    buf.len()
                ),
                e,
            )
        })
    }

    pub fn stats(&self) -> StorageStats {
        let alloc = self.alloc.lock().unwrap();
        StorageStats {
            total: alloc.total,
            used: alloc.used,
            limit: self.limit,
            extents: self.extents.read().unwrap().len(),
        }
    }
}

/// How many extents a run of `len` bytes takes (a slot's sector has 42 bits).
fn extent_pieces(len: u64) -> usize {
    len.div_ceil(MAX_EXTENT_SECTORS * SECTOR_SIZE) as usize
}

/// Refuses ranges that overlap each other or storage already on `device`.
fn check_no_overlap(
    label: &str,
    extents: &[StorageExtent],
    device: &Arc<dyn BlockDevice>,
    ranges: &[SectorRange],
) -> Result<()> {
    let same = |other: &Arc<dyn BlockDevice>| match (device.identity(), other.identity()) {
        (Some(a), Some(b)) => a == b,
        _ => Arc::ptr_eq(device, other),
    };
    let mut taken: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| same(&e.device))
        .map(|e| (e.offset, e.offset + e.len))
        .collect();
    for r in ranges {
        let (start, end) = (r.byte_offset(), r.byte_offset() + r.byte_len());
        if taken.iter().any(|&(s, e)| start < e && s < end) {
            return Err(Error::InvalidArgument(format!(
                "sector range {}:{} overlaps storage already given to snapshot {label}",
                r.start, r.count
            )));
        }
        taken.push((start, end));
    }
    Ok(())
}

impl GrowableFile {
    fn new(device: FileDevice) -> Self {
        let original_len = device.size();
        let was_empty = !crate::device::holds_data(device.file());
        Self {
            device: Arc::new(device),
            original_len,
            was_empty,
            len: Mutex::new(original_len),
        }
    }
}

impl Drop for DiffStorage {
    fn drop(&mut self) {
        // Give back what we grew; an O_TMPFILE goes with its last descriptor.
        if let Some(g) = &self.growable {
            if let Err(e) = g.device.file().set_len(g.original_len) {
                tracing::warn!(path = %g.device.path().display(), error = %e, "cannot shrink difference storage back");
            }
            // A file given empty (as the original tool's scripts make it,
            // `fallocate --length`) is given back empty: none of the
            // origin's old blocks stay in it, and the next snapshot may use
            // it again without `overwrite`. A file given with content keeps
            // what we did not overwrite. Where holes cannot be punched the
            // copies stay.
            let punch =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            if g.was_empty && g.original_len > 0 {
                if let Err(e) = rustix::fs::fallocate(g.device.file(), punch, 0, g.original_len) {
                    tracing::warn!(path = %g.device.path().display(), error = %e, "cannot clear the difference storage given back");
                }
            }
        }
    }
}

fn open_tmpfile(dir: &Path) -> Result<File> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::RUSR | Mode::WUSR,
    )
    .map_err(|e| {
        Error::io(
            format!("cannot create a temporary file in {}", dir.display()),
            e.into(),
        )
    })?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Growth obeys the extent cap like appends do: before, `grow` skipped
    /// the check, so a long-lived storage grown in small steps passed 2^20
    /// extents and its slots aliased extent 0 in the chunk map.
    #[test]
    fn growth_stops_at_the_extent_cap() {
        let dir = tempfile::tempdir().unwrap();
        let events = Arc::new(EventQueue::default());
        let mut storage = DiffStorage::new(
            "capped".into(),
            &StorageSpec::Path(dir.path().to_path_buf()),
            None,
            4096,
            &HashSet::new(),
            events.clone(),
        )
        .unwrap();
        storage.max_extents = 3;
        let storage = Arc::new(storage);
        for i in 0..3 {
            let (slot, _) = storage.allocate(4096, None).unwrap();
            assert_eq!(slot.extent(), i);
        }
        let err = storage.allocate(4096, None).unwrap_err();
        assert_eq!(
            err.errno(),
            rustix::io::Errno::NOSPC.raw_os_error(),
            "{err}"
        );
        assert_eq!(storage.stats().extents, 3);
        assert!(!storage.can_hold(4096));
        // Appends obey the same cap.
        let device: Arc<dyn BlockDevice> = Arc::new(crate::MemDevice::new(1 << 20));
        let err = storage
            .append_ranges(device, &[SectorRange::new(0, 8)], 4096)
            .unwrap_err();
        assert_eq!(
            err.errno(),
            rustix::io::Errno::NOSPC.raw_os_error(),
            "{err}"
        );
    }

    /// A failed copy gives its slot back; a closed storage takes no writes.
    #[test]
    fn released_slots_are_reused_and_closed_storage_refuses_writes() {
        let device: Arc<dyn BlockDevice> = Arc::new(crate::MemDevice::new(8192));
        let storage = Arc::new(
            DiffStorage::new(
                "fenced".into(),
                &StorageSpec::Device(device),
                None,
                4096,
                &HashSet::new(),
                Arc::new(EventQueue::default()),
            )
            .unwrap(),
        );
        let (first, _) = storage.allocate(4096, None).unwrap();
        storage.release(first, 4096);
        assert_eq!(storage.allocate(4096, None).unwrap().0, first);
        let (second, _) = storage.allocate(4096, None).unwrap();
        assert_ne!(second, first);
        storage.write(second, &[1; 512], 0).unwrap();
        storage.close();
        assert!(matches!(
            storage.write(second, &[1; 512], 0),
            Err(Error::NotFound(_))
        ));
        assert!(storage.allocate(512, None).is_err());
    }
    const STEP: u64 = 1 << 20;
    const CHUNK: u64 = 64 << 10;

    /// A storage over a fresh regular file in `dir`, growing by [`STEP`].
    fn file_storage(dir: &Path, limit: Option<u64>) -> (Arc<DiffStorage>, Arc<EventQueue>) {
        let path = dir.join("storage.bin");
        File::create(&path).unwrap();
        let events = Arc::new(EventQueue::default());
        let storage = DiffStorage::new(
            "growing".into(),
            &StorageSpec::Path(path),
            limit,
            STEP,
            &HashSet::new(),
            events.clone(),
        )
        .unwrap();
        (Arc::new(storage), events)
    }

    fn counters(storage: &DiffStorage) -> (u64, u64) {
        let alloc = storage.alloc.lock().unwrap();
        (alloc.growths, alloc.growth_waits)
    }

    fn drain(events: &EventQueue) -> Vec<Event> {
        std::iter::from_fn(|| events.wait(Duration::ZERO).ok().flatten()).collect()
    }

    /// Issue 12: the allocation that takes free space below half a step
    /// starts the growth; it completes with no allocation asking for it,
    /// so the writers after it find room and never wait. Only the very
    /// first allocation (an empty file) waits.
    #[test]
    fn growth_runs_ahead_of_need() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, events) = file_storage(dir.path(), None);
        storage.allocate(CHUNK, None).unwrap();
        assert_eq!(counters(&storage), (1, 1), "the empty file: grown on need");
        storage.wait_growth();
        assert_eq!(storage.stats().total, STEP);
        // 8 chunks fill half a step; the 9th takes free space below it.
        for _ in 1..8 {
            storage.allocate(CHUNK, None).unwrap();
        }
        storage.wait_growth();
        assert_eq!(storage.stats().total, STEP, "at the mark, not below");
        storage.allocate(CHUNK, None).unwrap();
        storage.wait_growth();
        let st = storage.stats();
        assert_eq!((st.total, st.used, st.extents), (2 * STEP, 9 * CHUNK, 2));
        assert_eq!(counters(&storage), (2, 1), "grown once more, nobody waited");
        // Many steps on, still no allocation waits for growth.
        for _ in 9..(10 * STEP / CHUNK) {
            storage.allocate(CHUNK, None).unwrap();
            storage.wait_growth();
            let st = storage.stats();
            assert!(st.total - st.used >= STEP / 2, "{st:?}");
        }
        assert_eq!(counters(&storage), (11, 1));
        assert_eq!(storage.stats().extents, 11, "one extent per step");
        assert!(drain(&events).is_empty());
    }

    /// Grown ahead at creation, and room waited for (as the take does):
    /// the first allocation finds room and waits for no fallocate. Where the storage cannot grow (limit 0) nothing
    /// starts and nothing is reported; one that holds half a step free
    /// does not grow.
    #[test]
    fn grow_ahead_makes_room_before_the_first_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, events) = file_storage(dir.path(), None);
        storage.grow_ahead();
        storage.wait_for_room(CHUNK);
        assert!(storage.can_hold(CHUNK) && storage.stats().total >= CHUNK);
        storage.wait_growth();
        assert_eq!(storage.stats().total, STEP);
        assert_eq!(counters(&storage), (1, 0));
        storage.allocate(CHUNK, None).unwrap();
        assert_eq!(counters(&storage), (1, 0), "the allocation did not wait");
        storage.grow_ahead();
        storage.wait_growth();
        assert_eq!((storage.stats().total, counters(&storage)), (STEP, (1, 0)));
        assert!(drain(&events).is_empty());

        let other = tempfile::tempdir().unwrap();
        let (fixed, events) = file_storage(other.path(), Some(0));
        fixed.grow_ahead();
        fixed.wait_growth();
        assert_eq!((fixed.stats().total, counters(&fixed)), (0, (0, 0)));
        assert!(drain(&events).is_empty(), "no no_space before a need");

        // A limit below half a step: grown to it, and no_space only once an
        // allocation takes free space below the mark, as without growth
        // ahead.
        let third = tempfile::tempdir().unwrap();
        let (capped, events) = file_storage(third.path(), Some(STEP / 4));
        capped.grow_ahead();
        capped.wait_growth();
        assert_eq!(capped.stats().total, STEP / 4);
        assert!(drain(&events).is_empty(), "no no_space before a need");
        capped.allocate(CHUNK, None).unwrap();
        capped.wait_growth();
        assert!(matches!(drain(&events)[..], [Event::NoSpace { .. }]));
    }

    /// Only grown space handed out for the first time reads as zeroes: not
    /// the slot of a failed copy given back, nor a file's initial length.
    #[test]
    fn only_fresh_grown_slots_read_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let (grown, _) = file_storage(dir.path(), None);
        let (slot, zeroed) = grown.allocate(CHUNK, None).unwrap();
        assert!(zeroed, "fresh grown space");
        grown.release(slot, CHUNK);
        assert_eq!(grown.allocate(CHUNK, None).unwrap(), (slot, false));
        assert!(grown.allocate(CHUNK, None).unwrap().1, "the next fresh one");

        let other = tempfile::tempdir().unwrap();
        let path = other.path().join("storage.bin");
        std::fs::write(&path, vec![0xAB; CHUNK as usize]).unwrap();
        let given = Arc::new(
            DiffStorage::new(
                "given".into(),
                &StorageSpec::Path(path),
                None,
                STEP,
                &HashSet::new(),
                Arc::new(EventQueue::default()),
            )
            .unwrap(),
        );
        assert!(
            !given.allocate(CHUNK, None).unwrap().1,
            "the file's own bytes"
        );
        assert!(given.allocate(CHUNK, None).unwrap().1, "grown past them");
    }

    /// A step longer than a piece is fallocated piece by piece, and the
    /// pieces make one extent: one per step, as before pieces.
    #[test]
    fn a_step_grows_in_pieces_into_one_extent() {
        let dir = tempfile::tempdir().unwrap();
        let step = 2 * GROW_PIECE + GROW_PIECE / 2;
        let storage = Arc::new(
            DiffStorage::new(
                "pieces".into(),
                &StorageSpec::Path(dir.path().to_path_buf()),
                None,
                step,
                &HashSet::new(),
                Arc::new(EventQueue::default()),
            )
            .unwrap(),
        );
        storage.allocate(CHUNK, None).unwrap();
        storage.wait_growth();
        let st = storage.stats();
        assert_eq!((st.total, st.extents), (step, 1), "{st:?}");
        let len = grown_file_len(&storage);
        assert_eq!(len, step);
    }

    /// The length of the storage's growable file now.
    fn grown_file_len(storage: &DiffStorage) -> u64 {
        let growable = storage.growable.as_ref().expect("a growable storage");
        growable.device.file().metadata().unwrap().len()
    }

    /// Growth in the background stops exactly at the limit (a last short
    /// step), reports no_space once when it cannot go on, and allocations
    /// past it fail with ENOSPC.
    #[test]
    fn background_growth_respects_the_limit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 2 * STEP + STEP / 2;
        let (storage, events) = file_storage(dir.path(), Some(limit));
        let mut slots = 0;
        let err = loop {
            match storage.allocate(CHUNK, None) {
                Ok(_) => slots += 1,
                Err(e) => break e,
            }
            let st = storage.stats();
            assert!(st.total <= limit, "{st:?}");
        };
        assert_eq!(err.errno(), rustix::io::Errno::NOSPC.raw_os_error());
        assert_eq!(slots, limit / CHUNK);
        storage.wait_growth();
        assert_eq!(storage.stats().total, limit);
        let len = grown_file_len(&storage);
        assert_eq!(len, limit, "the file grew exactly to the limit");
        assert_eq!(
            drain(&events),
            vec![Event::NoSpace {
                requested_sectors: STEP / SECTOR_SIZE
            }],
            "no_space once"
        );
        assert!(!storage.can_hold(CHUNK));
    }

    /// A storage closed while a growth waits to run publishes nothing and
    /// grows nothing; close returns once the growth thread is gone, so the
    /// last reference shrinks the file back at once.
    #[test]
    fn close_during_growth_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _events) = file_storage(dir.path(), None);
        storage.allocate(CHUNK, None).unwrap();
        storage.wait_growth();
        let file = storage.growable.as_ref().unwrap().device.clone();
        // Hold the file's length: the next growth thread stops there.
        let held = storage.growable.as_ref().unwrap().len.lock().unwrap();
        for _ in 1..9 {
            storage.allocate(CHUNK, None).unwrap();
        }
        assert!(storage.alloc.lock().unwrap().growth_running);
        std::thread::scope(|s| {
            let closer = s.spawn(|| storage.close());
            while *storage.open.read().unwrap() {
                std::thread::yield_now();
            }
            drop(held);
            closer.join().unwrap();
        });
        let st = storage.stats();
        assert_eq!((st.total, st.extents), (STEP, 1), "nothing published");
        assert!(!storage.alloc.lock().unwrap().growth_running);
        assert_eq!(file.file().metadata().unwrap().len(), STEP, "nothing grown");
        assert!(matches!(
            storage.allocate(CHUNK, None),
            Err(Error::NotFound(_))
        ));
        assert_eq!(Arc::strong_count(&storage), 1, "the growth thread let go");
        drop(storage);
        assert_eq!(file.file().metadata().unwrap().len(), 0, "shrunk back");
    }
}
