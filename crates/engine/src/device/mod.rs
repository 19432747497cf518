//! Positional block I/O: the [`BlockDevice`] trait that tracked origins and
//! difference storages are made of, with a file/block-device implementation
//! ([`FileDevice`]) and an in-memory one for tests ([`MemDevice`]).
//!
//! Implementations do not check ranges: the engine validates every request
//! against [`BlockDevice::size`] before calling them.

mod direct;
mod file;
pub(crate) mod media;
mod memory;

use std::io;
use std::os::fd::BorrowedFd;

pub use file::{holds_data, FileDevice};
pub use memory::MemDevice;

/// One shared buffer of zeroes (in .bss: it costs no memory until read, and
/// then one set of pages for the whole process), for writing zeroes where
/// the device cannot zero a range itself.
static ZEROES: [u8; ZERO_PIECE] = [0; ZERO_PIECE];
const ZERO_PIECE: usize = 1 << 20;

/// Calls `write(zeroes, at)` over `offset..offset + len`, in pieces of at
/// most 1 MiB taken from [`ZEROES`]: zeroing by writing, without a zeroed
/// buffer per call.
pub(crate) fn write_zero_pieces<E>(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<(), E>,
) -> Result<(), E> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(ZERO_PIECE as u64) as usize;
        write(&ZEROES[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Merges adjacent extents of the same kind.
pub fn push_extent(extents: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match extents.last_mut() {
        Some(last) if last.zero == e.zero => last.len += e.len,
        _ => extents.push(e),
    }
}

/// What identifies a device or file on this machine, used to refuse a
/// difference storage placed on a device the engine itself serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceIdentity {
    /// A block device, by its device number.
    Block { rdev: u64 },
    /// A regular file, by the filesystem it lives on and its inode.
    File { dev: u64, ino: u64 },
}

impl DeviceIdentity {
    /// For a loop device, the identity of the file behind it (read from
    /// sysfs); `None` for anything else.
    pub fn loop_backing_file(self) -> Option<DeviceIdentity> {
        let DeviceIdentity::Block { rdev } = self else {
            return None;
        };
        let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        let sys = format!("/sys/dev/block/{major}:{minor}/loop/backing_file");
        let path = std::fs::read_to_string(sys).ok()?;
        let path = path.trim_end_matches('\n');
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(DeviceIdentity::File {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A run of bytes and whether it is known to read as zeroes (a hole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub zero: bool,
}

/// How a write-zeroes may be done (NBD's `NO_HOLE` and `FAST_ZERO`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Zeroing {
    /// The range must stay allocated: no hole may be punched.
    pub keep_allocated: bool,
    /// Only when cheaper than writing zeroes: otherwise fail with
    /// `ENOTSUP` before changing anything.
    pub fast_only: bool,
}

pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Smallest I/O the device handles without read-modify-write.
    fn min_io_size(&self) -> u32 {
        512
    }
    /// Smallest addressable unit (512 for regular files).
    fn logical_block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// Discard; afterwards the range reads as zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Write-zeroes as `how` allows. The default is
    /// [`BlockDevice::write_zeroes`], right for devices whose zeroing never
    /// punches and is never slow (memory); a device that may do either
    /// overrides this.
    fn zero_range(&self, offset: u64, len: u64, how: Zeroing) -> io::Result<()> {
        let _ = how;
        self.write_zeroes(offset, len)
    }
    /// The allocation of `[offset, offset+len)`: consecutive extents that
    /// cover it exactly. `zero` must be true only where the device really
    /// reads zeroes; the default claims nothing.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent { len, zero: false }])
    }
    /// Where the device lives, if it is a real file or block device.
    fn identity(&self) -> Option<DeviceIdentity> {
        None
    }
    /// The open file or block device behind this device, so that another
    /// device can copy to it inside the kernel ([`BlockDevice::copy_to`]);
    /// `None` (the default) for devices that are not one (memory, wrappers).
    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Copies `len` bytes at `offset` to `dst_offset` of `dst` without
    /// passing them through user space, for the copy-on-write of a chunk.
    /// Returns how many bytes were copied from the start of the range:
    /// fewer than `len` when the copy stopped short (the caller copies the
    /// rest itself). An error of kind [`io::ErrorKind::Unsupported`] means
    /// this pair of devices cannot copy this way and nothing was copied; it
    /// is the default.
    fn copy_to(
        &self,
        offset: u64,
        dst: &dyn BlockDevice,
        dst_offset: u64,
        len: u64,
    ) -> io::Result<u64> {
        let _ = (offset, dst, dst_offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
}
