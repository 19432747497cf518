//! A snapshot image ([`Image`]): the device as it was at the take, plus the
//! image's own writes, which land in the difference storage only and mark the
//! device's change tracker, in the live map and in the readable map of the
//! take (the image differs from the origin there, and a consumer of this
//! snapshot's map must see it).
//! Frontends get one from [`crate::Engine::image`]; it stays usable until the
//! snapshot is destroyed, then every call fails with a clear error.

use std::sync::Arc;

use crate::cbt::ChangeTracker;
use crate::device::Extent;
use crate::error::Result;
use crate::snapshot::DeviceSnapshot;
use crate::tracked::TrackedDevice;

#[derive(Debug, Clone)]
pub struct Image {
    pub(crate) device: Arc<TrackedDevice>,
    pub(crate) device_snapshot: Arc<DeviceSnapshot>,
}

impl Image {
    /// The name of the device this is an image of.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// Which snapshot this is an image of: equal for two images only when
    /// they come from the same snapshot of the same device, never reused
    /// within the process (a new snapshot of the device gets a new one).
    pub fn snapshot_instance(&self) -> u64 {
        self.device_snapshot.id()
    }

    pub fn size(&self) -> u64 {
        self.device_snapshot.size()
    }

    pub fn chunk_size(&self) -> u64 {
        self.device_snapshot.chunk_size()
    }

    /// 0 while the image is valid, else the errno that invalidated it.
    pub fn error_code(&self) -> i32 {
        self.device_snapshot.error_code()
    }

    /// The change tracker of the device: its readable map is frozen at this
    /// image's take for as long as the image exists.
    pub fn change_tracker(&self) -> &ChangeTracker {
        self.device.change_tracker()
    }

    /// Which parts of a range read as zeroes.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.device.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.device_snapshot.image_extents(offset, len)
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.device.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return self.device_snapshot.check_usable();
        }
        self.device_snapshot.read_image(buf, offset)
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.device.check_range(offset, buf.len() as u64)?;
        self.device_snapshot.check_usable()?;
        if buf.is_empty() {
            return Ok(());
        }
        // Marked first: a write that fails part-way may have changed the
        // image already, and an extra mark only costs a block in the next
        // incremental.
        self.device.mark_live_and_readable(offset, buf.len() as u64);
        self.device_snapshot.write_image(buf, offset)
    }

    /// Zeroes a range of the image (discard and write-zeroes alike: the
    /// storage keeps whole chunks, so there is nothing to unmap).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.device.check_range(offset, len)?;
        crate::device::write_zero_pieces(offset, len, |zeroes, at| self.write(zeroes, at))
    }

    /// Image writes are not durable by design (the snapshot does not survive
    /// a crash); flush only reports whether the image is still usable.
    pub fn flush(&self) -> Result<()> {
        self.device_snapshot.check_usable()
    }
}
