//! A tracked device ([`TrackedDevice`]): the filter every user write passes
//! through. It validates the range, runs the copy-before-write of the
//! device's snapshot (if one is taken), marks the change tracker, then does
//! the write on the origin unchanged.
//!
//! The write gate is a read-write lock around the device's current snapshot:
//! every write-type request holds it shared from the copy-before-write to the
//! end of the origin write; a snapshot take or destroy holds it exclusively,
//! which holds new writes and drains in-flight ones. Reads do not take it.
//! In front of the gate, a door ([`Door`]): a take or destroy of several
//! devices closes every door first, so that, while it takes the gates one
//! after another, it waits only for the writes that were in flight when it
//! began, not for new ones coming on the devices whose gate it has not
//! taken yet (their writers would wait that much longer). The door is only
//! for latency; the gate alone makes the take atomic.
//! Frontends call the data methods; the engine calls the gate methods.
//!
//! A device leaves the engine in one of two ways ([`DeviceMode`]): detached, after
//! which every request through a handle still held fails; or released to
//! pass-through, for a device whose loop device is still mounted (the
//! original tool's detach: the filter goes, the device stays usable).
//! Invariant of pass-through: the device is in no registry and no snapshot
//! (the engine refuses it while it is in one, and nothing can find it to
//! add it again), so its writes reach the origin with no copy-before-write
//! and no change tracking; only handles taken before the release reach it,
//! and its origin closes with the last of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cbt::ChangeTracker;
use crate::device::{BlockDevice, Extent, Zeroing};
use crate::error::{Error, Result};
use crate::snapshot::DeviceSnapshot;
use crate::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use crate::sync::{Condvar, Mutex, RwLock, RwLockWriteGuard};

/// Where new writes wait while a take or destroy holds several devices:
/// one atomic load on the write path while open.
#[derive(Debug, Default)]
pub(crate) struct Door {
    closed: AtomicBool,
    /// Closes counted, so that overlapping holders (a take and a detach)
    /// each open only their own.
    closes: Mutex<usize>,
    opened: Condvar,
}

impl Door {
    /// Waits while the door is closed.
    fn pass(&self) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut closes = self.closes.lock().unwrap();
        while *closes > 0 {
            closes = self.opened.wait(closes).unwrap();
        }
    }

    fn close(&self) {
        let mut closes = self.closes.lock().unwrap();
        *closes += 1;
        self.closed.store(true, Ordering::Release);
    }

    fn open(&self) {
        let mut closes = self.closes.lock().unwrap();
        *closes -= 1;
        if *closes == 0 {
            self.closed.store(false, Ordering::Release);
            self.opened.notify_all();
        }
    }
}

/// The doors of some devices, closed; opened again when dropped (after
/// the gates taken behind them are let go: drop this last).
pub(crate) struct ClosedDoors<'a> {
    devices: Vec<&'a TrackedDevice>,
}

impl<'a> ClosedDoors<'a> {
    pub(crate) fn close(devices: impl IntoIterator<Item = &'a TrackedDevice>) -> Self {
        let devices: Vec<_> = devices.into_iter().collect();
        for d in &devices {
            d.door.close();
        }
        ClosedDoors { devices }
    }
}

impl Drop for ClosedDoors<'_> {
    fn drop(&mut self) {
        for d in &self.devices {
            d.door.open();
        }
    }
}

#[derive(Debug)]
pub struct TrackedDevice {
    name: String,
    path: Option<PathBuf>,
    origin: Arc<dyn BlockDevice>,
    cbt: ChangeTracker,
    gate: RwLock<Option<Arc<DeviceSnapshot>>>,
    door: Door,
    /// A [`DeviceMode`], set when the device leaves the engine: writes read it
    /// under the gate, which the detach then drains, so once the detach
    /// returns no write is tracked (or, detached, done) any more.
    mode: AtomicU8,
}

/// What a device's handles do: track (in the engine), fail (detached), or
/// pass straight through to the origin (released with its loop device in
/// use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeviceMode {
    Tracked = 0,
    Detached = 1,
    PassThrough = 2,
}

pub(crate) type HeldWrites<'a> = RwLockWriteGuard<'a, Option<Arc<DeviceSnapshot>>>;

impl TrackedDevice {
    pub(crate) fn new(
        name: String,
        path: Option<PathBuf>,
        origin: Arc<dyn BlockDevice>,
        cbt: ChangeTracker,
    ) -> Self {
        Self {
            name,
            path,
            origin,
            cbt,
            gate: RwLock::new(None),
            door: Door::default(),
            mode: AtomicU8::new(DeviceMode::Tracked as u8),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The origin's path, when it was attached by path.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn size(&self) -> u64 {
        self.origin.size()
    }

    pub fn min_io_size(&self) -> u32 {
        self.origin.min_io_size()
    }

    /// The logical block size users should see (512 for files).
    pub fn logical_block_size(&self) -> u32 {
        self.origin.logical_block_size()
    }

    /// The origin behind the filter: for the engine only, since a write
    /// through it would bypass copy-on-write and change tracking.
    pub(crate) fn origin(&self) -> &Arc<dyn BlockDevice> {
        &self.origin
    }

    pub fn change_tracker(&self) -> &ChangeTracker {
        &self.cbt
    }

    /// Fails every later request, and waits for the writes in flight: once
    /// this returns, nothing more reaches the origin through us.
    pub(crate) fn mark_detached(&self) {
        self.leave(DeviceMode::Detached);
    }

    /// Stops tracking but goes on serving: later writes go to the origin
    /// as they are. Waits for the writes in flight, so that once this
    /// returns the change maps are final. Only for a device in no snapshot.
    pub(crate) fn mark_pass_through(&self) {
        self.leave(DeviceMode::PassThrough);
    }

    /// Set under the gate held exclusively: a write sees one mode from its
    /// check to its end, so none is left untracked before the maps are final.
    fn leave(&self, mode: DeviceMode) {
        let _held = self.hold_writes();
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn mode(&self) -> DeviceMode {
        match self.mode.load(Ordering::Relaxed) {
            0 => DeviceMode::Tracked,
            1 => DeviceMode::Detached,
            _ => DeviceMode::PassThrough,
        }
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.mode() == DeviceMode::Detached {
            return Err(Error::NotFound(format!(
                "tracked device {} (it was detached)",
                self.name
            )));
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                device: self.name.clone(),
                offset,
                len,
                size,
            }),
        }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.origin.read_at(buf, offset).map_err(|e| {
            Error::io(
                format!("{}: read of {} bytes at {offset}", self.name, buf.len()),
                e,
            )
        })
    }

    /// Which parts of a range are holes (read as zeroes) on the origin.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        self.origin.extents(offset, len).map_err(|e| {
            Error::io(
                format!("{}: allocation of {len} bytes at {offset}", self.name),
                e,
            )
        })
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.filtered_write(offset, buf.len() as u64, "write", || {
            self.origin.write_at(buf, offset)
        })
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.filtered_write(offset, len, "discard", || self.origin.discard(offset, len))
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, Zeroing::default())
    }

    /// Write-zeroes as `how` allows (see [`Zeroing`]). A refused fast
    /// zeroing leaves the data as it was; its range may still be marked
    /// changed, which only makes the next incremental read it.
    pub fn zero_range(&self, offset: u64, len: u64, how: Zeroing) -> Result<()> {
        self.filtered_write(offset, len, "write-zeroes", || {
            self.origin.zero_range(offset, len, how)
        })
    }

    pub fn flush(&self) -> Result<()> {
        self.origin
            .flush()
            .map_err(|e| Error::io(format!("{}: flush", self.name), e))
    }

    /// The filter: copy-before-write, change tracking, then the origin write.
    fn filtered_write(
        &self,
        offset: u64,
        len: u64,
        what: &str,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<()> {
        self.door.pass();
        let snapshot = self.gate.read().unwrap();
        // Under the gate: a detach that returned has drained every write
        // that passed this check.
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Pass-through: in no snapshot (the gate holds none) and tracked by
        // nobody; its maps were saved at the release.
        if self.mode() == DeviceMode::Tracked {
            if let Some(snapshot) = snapshot.as_ref() {
                snapshot.before_origin_write(offset, len)?;
            }
            self.cbt.mark(offset, len);
        }
        op().map_err(|e| {
            Error::io(
                format!("{}: {what} of {len} bytes at {offset}", self.name),
                e,
            )
        })
    }

    /// Marks ranges that an image write or a mark-dirty changes, in the
    /// live map and in the readable map of the last take (as the original's
    /// `cbt_map_set_both` does for both), under the gate, so the mark cannot
    /// straddle a take.
    pub(crate) fn mark_live_and_readable(&self, offset: u64, len: u64) {
        let _held = self.gate.read().unwrap();
        self.cbt.mark_live_and_readable(offset, len);
    }

    /// Holds new writes and waits for in-flight ones to finish.
    pub(crate) fn hold_writes(&self) -> HeldWrites<'_> {
        self.gate.write().unwrap()
    }
}
