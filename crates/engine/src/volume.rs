//! A volume is what frontends serve: a tracked device or a snapshot image,
//! addressed by one name space — the device's name, or `snapshot/<device>`
//! for the image of a device whose snapshot is taken. Frontends (NBD, FUSE)
//! resolve names here so they all expose the same set under the same names.

use std::sync::Arc;

use crate::device::Extent;
use crate::engine::Engine;
use crate::error::Result;
use crate::image::Image;
use crate::tracked::TrackedDevice;

/// The name prefix of snapshot images.
pub const IMAGE_PREFIX: &str = "snapshot/";

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
            Volume::Image(i) => format!("{IMAGE_PREFIX}{}", i.device_name()),
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
        match self {
            Volume::Device(d) => d.write_zeroes(offset, len),
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
            Volume::Device(d) => d.origin().logical_block_size(),
            Volume::Image(i) => i.device.origin().logical_block_size(),
        }
    }
}

impl Engine {
    /// The volume called `name`, if it exists now.
    pub fn volume(&self, name: &str) -> Option<Volume> {
        if let Some(device) = name.strip_prefix(IMAGE_PREFIX) {
            let image = self.image(device).ok()?;
            return (image.device_name() == device).then_some(Volume::Image(image));
        }
        let device = self.device(name).ok()?;
        (device.name() == name).then_some(Volume::Device(device))
    }

    /// Every volume's name: each device, then its image when taken.
    pub fn volume_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for device in self.devices() {
            names.push(device.name().to_string());
            if self.image(device.name()).is_ok() {
                names.push(format!("{IMAGE_PREFIX}{}", device.name()));
            }
        }
        names
    }
}
