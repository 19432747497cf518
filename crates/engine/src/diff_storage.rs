//! The difference storage of one snapshot ([`DiffStorage`]): where the old
//! content of copied chunks lives, shared by all the snapshot's devices.
//!
//! The storage is a list of extents (a device or file, an offset, a length),
//! filled in order; a chunk is always stored inside one extent, so the tail of
//! an extent too short for the next chunk is left unused. Extents come from:
//! a regular file that grows by `diff_storage_minimum` steps (fallocate)
//! whenever free space falls to half a step, up to the snapshot's limit; an
//! unnamed O_TMPFILE in a directory (grows the same way, vanishes with the
//! storage); a whole block device (fixed); and sector ranges appended at any
//! time, also after the take. When growth is needed and impossible, a
//! `no_space` event asks for more (once until storage is appended).
//!
//! Not durable on purpose: a non-persistent snapshot does not survive a crash,
//! so nothing here is fsynced. Called by the copy-on-write path
//! ([`crate::snapshot`]) and by the engine when a snapshot is created or
//! storage is appended.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustix::fs::{FallocateFlags, Mode, OFlags};

use crate::device::{BlockDevice, DeviceIdentity, FileDevice};
use crate::error::{Error, Result};
use crate::events::{Event, EventQueue};
use crate::{SectorRange, SECTOR_SIZE};

/// Where a snapshot's difference storage starts out.
#[derive(Debug, Clone)]
pub enum StorageSpec {
    /// By what the path is: a regular file (used whole, then grown), a
    /// directory (an unnamed temporary file there, grown), or a block device
    /// (used whole, fixed size).
    Path(PathBuf),
    /// Nothing yet: sector ranges are appended later.
    Empty,
    /// A whole device object, fixed size (tests, benchmarks).
    Device(Arc<dyn BlockDevice>),
}

/// Where one chunk lives: an extent and a sector offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSlot {
    pub extent: u32,
    pub sector: u64,
}

const SLOT_SECTOR_BITS: u32 = 42;

impl StorageSlot {
    /// Packs into 62 bits: 20 bits of extent index, 42 of sector (2 PiB).
    pub fn encode(self) -> u64 {
        (self.extent as u64) << SLOT_SECTOR_BITS | self.sector
    }
    pub fn decode(word: u64) -> Self {
        Self {
            extent: (word >> SLOT_SECTOR_BITS) as u32,
            sector: word & ((1 << SLOT_SECTOR_BITS) - 1),
        }
    }
}

const MAX_EXTENTS: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageStats {
    /// Bytes of storage available in all extents.
    pub total: u64,
    /// Bytes handed out to chunks (and extent tails skipped).
    pub used: u64,
    pub limit: Option<u64>,
    pub extents: usize,
}

#[derive(Debug)]
struct StorageExtent {
    device: Arc<dyn BlockDevice>,
    offset: u64,
    len: u64,
}

#[derive(Debug, Default)]
struct Allocator {
    extent: usize,
    next: u64,
    total: u64,
    used: u64,
    no_space_reported: bool,
}

/// A file the storage grows by fallocate.
#[derive(Debug)]
struct GrowableFile {
    device: Arc<FileDevice>,
    /// The file's length when we got it; restored when the storage goes.
    original_len: u64,
    len: Mutex<u64>,
}

#[derive(Debug)]
pub(crate) struct DiffStorage {
    label: String,
    extents: RwLock<Vec<StorageExtent>>,
    alloc: Mutex<Allocator>,
    growable: Option<GrowableFile>,
    limit: Option<u64>,
    step: u64,
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
    let refused = [Some(own), on_filesystem, own.loop_backing_file()]
        .into_iter()
        .flatten()
        .any(|id| served.contains(&id));
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
            growable: None,
            limit,
            step,
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
                    let device = FileDevice::open(path)?;
                    if device.is_block_device() {
                        let len = device.size() / SECTOR_SIZE * SECTOR_SIZE;
                        storage.add_extent(Arc::new(device), 0, len)?;
                    } else {
                        let growable = GrowableFile::new(device);
                        let len = growable.original_len / SECTOR_SIZE * SECTOR_SIZE;
                        *growable.len.lock().unwrap() = len;
                        let dev = growable.device.clone();
                        storage.growable = Some(growable);
                        if len > 0 {
                            storage.add_extent(dev, 0, len)?;
                        }
                    }
                }
            }
        }
        Ok(storage)
    }

    fn add_extent(&self, device: Arc<dyn BlockDevice>, offset: u64, len: u64) -> Result<()> {
        // Lock order everywhere: allocator, then extents.
        let mut alloc = self.alloc.lock().unwrap();
        let mut extents = self.extents.write().unwrap();
        if extents.len() >= MAX_EXTENTS {
            return Err(Error::InvalidArgument(format!(
                "difference storage of snapshot {} already has {MAX_EXTENTS} extents",
                self.label
            )));
        }
        extents.push(StorageExtent {
            device,
            offset,
            len,
        });
        alloc.total += len;
        alloc.no_space_reported = false;
        Ok(())
    }

    /// Appends sector ranges of `device` (a block device or file of any
    /// size), usable at once, also after the take.
    pub fn append_ranges(
        &self,
        device: Arc<dyn BlockDevice>,
        ranges: &[SectorRange],
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
        }
        self.check_no_overlap(&device, ranges)?;
        for r in ranges {
            self.add_extent(device.clone(), r.byte_offset(), r.byte_len())?;
        }
        Ok(())
    }

    fn check_no_overlap(
        &self,
        device: &Arc<dyn BlockDevice>,
        ranges: &[SectorRange],
    ) -> Result<()> {
        let same = |other: &Arc<dyn BlockDevice>| match (device.identity(), other.identity()) {
            (Some(a), Some(b)) => a == b,
            _ => Arc::ptr_eq(device, other),
        };
        let extents = self.extents.read().unwrap();
        let mut taken: Vec<(u64, u64)> = extents
            .iter()
            .filter(|e| same(&e.device))
            .map(|e| (e.offset, e.offset + e.len))
            .collect();
        for r in ranges {
            let (start, end) = (r.byte_offset(), r.byte_offset() + r.byte_len());
            if taken.iter().any(|&(s, e)| start < e && s < end) {
                return Err(Error::InvalidArgument(format!(
                    "sector range {}:{} overlaps storage already given to snapshot {}",
                    r.start, r.count, self.label
                )));
            }
            taken.push((start, end));
        }
        Ok(())
    }

    /// Hands out `len` bytes (rounded up to a sector) inside one extent,
    /// growing the storage first when it must and can.
    pub fn allocate(&self, len: u64) -> Result<StorageSlot> {
        let len = len.next_multiple_of(SECTOR_SIZE);
        loop {
            let mut alloc = self.alloc.lock().unwrap();
            if let Some(slot) = self.take_from_extents(&mut alloc, len) {
                if alloc.total - alloc.used < self.step / 2 {
                    self.grow_or_report(&mut alloc);
                }
                return Ok(slot);
            }
            if !self.grow_or_report(&mut alloc) {
                return Err(Error::NoSpace {
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
                });
            }
        }
    }

    fn take_from_extents(&self, alloc: &mut Allocator, len: u64) -> Option<StorageSlot> {
        let extents = self.extents.read().unwrap();
        while let Some(extent) = extents.get(alloc.extent) {
            if extent.len - alloc.next >= len {
                let slot = StorageSlot {
                    extent: alloc.extent as u32,
                    sector: alloc.next / SECTOR_SIZE,
                };
                alloc.next += len;
                alloc.used += len;
                return Some(slot);
            }
            alloc.used += extent.len - alloc.next;
            alloc.extent += 1;
            alloc.next = 0;
        }
        None
    }

    /// Grows the file by one step (less at the limit); when it cannot, queues
    /// `no_space` once. True when the storage grew.
    fn grow_or_report(&self, alloc: &mut Allocator) -> bool {
        match self.grow(alloc) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(storage = %self.label, error = %e, "difference storage cannot grow")
            }
        }
        if !alloc.no_space_reported {
            alloc.no_space_reported = true;
            self.events.push(Event::NoSpace {
                requested_sectors: self.step / SECTOR_SIZE,
            });
        }
        false
    }

    fn grow(&self, alloc: &mut Allocator) -> Result<bool> {
        let Some(growable) = &self.growable else {
            return Ok(false);
        };
        let room = self
            .limit
            .map_or(u64::MAX, |l| l.saturating_sub(alloc.total));
        let by = self.step.min(room) / SECTOR_SIZE * SECTOR_SIZE;
        if by == 0 {
            return Ok(false);
        }
        let mut len = growable.len.lock().unwrap();
        rustix::fs::fallocate(growable.device.file(), FallocateFlags::empty(), *len, by).map_err(
            |e| {
                Error::io(
                    format!(
                        "cannot grow difference storage {} by {by} bytes",
                        growable.device.path().display()
                    ),
                    e.into(),
                )
            },
        )?;
        let offset = *len;
        *len += by;
        drop(len);
        tracing::debug!(storage = %self.label, offset, by, "difference storage grew");
        let mut extents = self.extents.write().unwrap();
        extents.push(StorageExtent {
            device: growable.device.clone(),
            offset,
            len: by,
        });
        alloc.total += by;
        Ok(true)
    }

    fn locate(&self, slot: StorageSlot, offset_in_chunk: u64) -> (Arc<dyn BlockDevice>, u64) {
        let extents = self.extents.read().unwrap();
        let extent = &extents[slot.extent as usize];
        (
            extent.device.clone(),
            extent.offset + slot.sector * SECTOR_SIZE + offset_in_chunk,
        )
    }

    pub fn write(&self, slot: StorageSlot, buf: &[u8], offset_in_chunk: u64) -> Result<()> {
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

    /// Whether the storage grows by itself when it runs low.
    pub fn grows(&self) -> bool {
        self.growable.is_some()
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

impl GrowableFile {
    fn new(device: FileDevice) -> Self {
        let original_len = device.size();
        Self {
            device: Arc::new(device),
            original_len,
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
