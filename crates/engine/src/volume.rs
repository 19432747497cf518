//! A volume is what frontends serve: a tracked device or a snapshot image,
//! addressed by one name space — the device's name, or `snapshot/<device>`
//! for the image of a device whose snapshot is taken. Frontends (NBD, FUSE)
//! and the daemon build and split volume names only here
//! ([`image_name`], [`image_device`]) so they all expose the same set under
//! the same names, and the names a device may not take
//! ([`check_device_name`]) are decided here too. The engine looks volumes up
//! by name ([`crate::Engine::volume`]).

use std::sync::Arc;

use crate::device::{Extent, Zeroing};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::tracked::TrackedDevice;

/// The name prefix of snapshot images.
const IMAGE_PREFIX: &str = "snapshot/";

/// The volume name of a device's snapshot image: `snapshot/<device>`.
pub fn image_name(device: &str) -> String {
    format!("{IMAGE_PREFIX}{device}")
}

/// The device whose image `volume` names, or `None` when `volume` names a
/// device.
pub fn image_device(volume: &str) -> Option<&str> {
    volume.strip_prefix(IMAGE_PREFIX)
}

/// A device name must be usable as a volume name: 1 to 255 characters, no
/// '/', and none of the names the volume name space reserves (`snapshot`
/// holds the images; `.` and `..` are directory entries wherever volumes
/// show as files).
pub(crate) fn check_device_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "device name {name:?} must be 1 to 255 characters without '/'"
        )));
    }
    if [".", "..", IMAGE_PREFIX.trim_end_matches('/')].contains(&name) {
        return Err(Error::InvalidArgument(format!(
            "device name {name:?} is reserved; give another with --name"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub enum Volume {
    Device(Arc<TrackedDevice>),
    Image(Image),
}

impl Volume {
    /// The volume's name: the device name, or `snapshot/<device>`.
    pub fn name(&self) -> String {
        match self {
            Volume::Device(d) => d.name().to_string(),
            Volume::Image(i) => image_name(i.device_name()),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Volume::Device(d) => d.size(),
            Volume::Image(i) => i.size(),
        }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Volume::Device(d) => d.read(buf, offset),
            Volume::Image(i) => i.read(buf, offset),
        }
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Volume::Device(d) => d.write(buf, offset),
            Volume::Image(i) => i.write(buf, offset),
        }
    }

    pub fn flush(&self) -> Result<()> {
        match self {
            Volume::Device(d) => d.flush(),
            Volume::Image(i) => i.flush(),
        }
    }

    /// Discard; the range reads as zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Volume::Device(d) => d.discard(offset, len),
            Volume::Image(i) => i.write_zeroes(offset, len),
        }
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, Zeroing::default())
    }

    /// Write-zeroes as `how` allows. An image writes zeroes into its
    /// storage: never a hole, and never fast (ENOTSUP when only a fast
    /// zeroing is wanted).
    pub fn zero_range(&self, offset: u64, len: u64, how: Zeroing) -> Result<()> {
        match self {
            Volume::Device(d) => d.zero_range(offset, len, how),
            Volume::Image(_) if how.fast_only => Err(Error::io(
                format!(
                    "{}: a fast write-zeroes (zeroing an image writes its storage)",
                    self.name()
                ),
                std::io::Error::from_raw_os_error(rustix::io::Errno::OPNOTSUPP.raw_os_error()),
            )),
            Volume::Image(i) => i.write_zeroes(offset, len),
        }
    }

    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        match self {
            Volume::Device(d) => d.extents(offset, len),
            Volume::Image(i) => i.extents(offset, len),
        }
    }

    /// The logical block size users should see (512 for files).
    pub fn logical_block_size(&self) -> u32 {
        match self {
            Volume::Device(d) => d.logical_block_size(),
            Volume::Image(i) => i.device.logical_block_size(),
        }
    }
}
