//! A volume is what frontends serve: a tracked device or a snapshot image,
//! addressed by one name space — the device's name, or `snapshot/<device>`
//! for the image of a device whose snapshot is taken. Frontends (NBD, FUSE)
//! and the daemon build and split volume names only here
//! ([`image_name`], [`image_device`]) so they all expose the same set under
//! the same names, and the names a device may take
//! ([`check_device_name`], [`default_device_name`]) are decided here too. The engine looks volumes up
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

/// The longest device name, in bytes (a file name's limit, `NAME_MAX`).
pub const MAX_DEVICE_NAME: usize = 255;

/// A device name is safe wherever a name shows up: 1 to 255 bytes of
/// `[A-Za-z0-9._+-]`, not starting with `-`, and none of the names the
/// volume name space reserves (`snapshot` holds the images; `.` and `..`
/// are directory entries wherever volumes show as files).
///
/// Why so narrow: the name becomes an NBD export name inside a URI (where
/// `?`, `#`, `%` and spaces change its meaning), a FUSE file name (where
/// `/` is a path), a `key=value` line of the CLI (where a newline forges a
/// line) and an argument of tools (where a leading `-` is an option). With
/// `/` out and `snapshot` reserved, no device name equals an image name
/// ([`image_name`], `snapshot/<device>`), nor the directory that holds them.
pub fn check_device_name(name: &str) -> Result<()> {
    let bad = name
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || b"._+-".contains(b)));
    if name.is_empty() || name.len() > MAX_DEVICE_NAME || bad.is_some() {
        let why = match bad {
            Some(b) => format!("{:?} is not allowed", char::from(b)),
            None if name.is_empty() => "it is empty".to_string(),
            None => format!("it is {} bytes long", name.len()),
        };
        return Err(Error::InvalidArgument(format!(
            "device name {name:?} is not allowed ({why}): a name is 1 to {MAX_DEVICE_NAME} bytes of A-Z a-z 0-9 . _ + -"
        )));
    }
    if name.starts_with('-') {
        return Err(Error::InvalidArgument(format!(
            "device name {name:?} is not allowed: it must not start with '-'"
        )));
    }
    if [".", "..", IMAGE_PREFIX.trim_end_matches('/')].contains(&name) {
        return Err(Error::InvalidArgument(format!(
            "device name {name:?} is reserved; give another with --name"
        )));
    }
    Ok(())
}

/// The name a device attached without one gets: the file name of `path`,
/// when it is a valid device name ([`check_device_name`]); otherwise the
/// error says to give one with `--name`.
pub fn default_device_name(path: &std::path::Path) -> Result<String> {
    let shown = path.display();
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!("{shown} has no file name; give a name with --name"))
    })?;
    let name = name.to_str().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "the file name of {shown} is not UTF-8, so it is no device name; give one with --name"
        ))
    })?;
    check_device_name(name).map_err(|e| {
        Error::InvalidArgument(format!(
            "{e}; it is the file name of {shown}: give the device a name with --name"
        ))
    })?;
    Ok(name.to_string())
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
