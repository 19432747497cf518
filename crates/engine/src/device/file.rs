//! A regular file or block device as a [`BlockDevice`].
//!
//! Opened exclusively so nothing can write around the engine: block devices
//! with O_EXCL (the kernel refuses a second exclusive opener and mounted
//! devices), regular files with a non-blocking `flock(LOCK_EX)`.
//!
//! Copies between two regular files go through `copy_file_range(2)`
//! ([`BlockDevice::copy_to`]): a reflink where the filesystem shares extents
//! (btrfs), an in-kernel page-cache copy elsewhere on one filesystem (ext4),
//! except from files on xfs, where sharing the extent makes the copy slower
//! (see [`kernel_copy_pays`]).
//!
//! An origin may bypass the page cache ([`FileDevice::bypass_page_cache`],
//! `origin_cache = "none"`): its aligned reads and writes then go through
//! direct I/O ([`super::direct`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FileType, FlockOperation};
use rustix::io::Errno;

use super::direct::DirectIo;
use super::{push_extent, BlockDevice, DeviceIdentity, Extent, Zeroing};
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    is_block: bool,
    logical_block: u32,
    min_io: u32,
    identity: DeviceIdentity,
    /// Whether [`BlockDevice::copy_to`] tries `copy_file_range(2)`.
    kernel_copy: bool,
    /// Set when the page cache is bypassed.
    direct: Option<DirectIo>,
}

/// `XFS_SUPER_MAGIC`, the `f_type` of `statfs(2)` on xfs.
const XFS_SUPER_MAGIC: u64 = 0x5846_5342;

/// Whether copying out of `file` with `copy_file_range(2)` beats a copy
/// through user space, by measurement (docs/performance.md, "How a first
/// write copies"). Not on xfs: there the kernel shares the chunk's extents,
/// and xfs, which otherwise overwrites in place, must then break the sharing
/// on the origin's next write (a CoW allocation and a remap): first writes
/// ran at 0.15-0.3 of the copy through a buffer. btrfs writes out of place
/// anyway, so sharing is pure gain there (4-7x); ext4 copies in the kernel
/// at parity or a little better.
fn kernel_copy_pays(file: &File) -> bool {
    match rustix::fs::fstatfs(file) {
        #[allow(clippy::unnecessary_cast)] // f_type's type differs by target
        Ok(st) => st.f_type as u64 != XFS_SUPER_MAGIC,
        Err(_) => false,
    }
}

/// `BLKIOMIN`: `_IO(0x12, 120)`, the device's minimum I/O size.
const BLKIOMIN: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 120);

impl FileDevice {
    /// Opens `path` read-write and exclusively. Errors name the path: not
    /// found, busy (mounted, opened exclusively, or locked by another
    /// program), or not a regular file or block device.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(format!("device {shown}")),
            _ => Error::io(format!("cannot stat {shown}"), e),
        })?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_block_device() && !ft.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{shown} is neither a regular file nor a block device"
            )));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if ft.is_block_device() {
            opts.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
        }
        let file = opts.open(path).map_err(|e| busy_or_io(e, &shown))?;
        if ft.is_file() {
            lock_exclusive(&file, &shown)?;
        }
        Self::from_file(file, path)
    }

    /// Makes `file`, opened read-write (and without `O_EXCL`) by the caller,
    /// exclusive as [`Self::open`] does: a block device is opened again
    /// through `/proc/self/fd` with `O_EXCL` (the same device, whatever its
    /// path names by now; refused while mounted or held exclusively), a
    /// regular file is flock'ed. `path` names it in messages. For callers
    /// that open with someone else's rights (the daemon opens client paths
    /// with the client's), so that the engine never resolves the path.
    pub fn exclusive(file: File, path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let st = rustix::fs::fstat(&file)
            .map_err(|e| Error::io(format!("cannot stat {shown}"), e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::BlockDevice => {
                let again = reopen_exclusive(&file).map_err(|e| busy_or_io(e, &shown))?;
                Self::from_file(again, path)
            }
            FileType::RegularFile => {
                lock_exclusive(&file, &shown)?;
                Self::from_file(file, path)
            }
            _ => Err(Error::InvalidArgument(format!(
                "{shown} is neither a regular file nor a block device"
            ))),
        }
    }

    /// Wraps an already-open file (for instance an O_TMPFILE storage); takes
    /// no lock.
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let st = rustix::fs::fstat(&file)
            .map_err(|e| Error::io(format!("cannot stat {shown}"), e.into()))?;
        let is_block = FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice;
        let (size, logical_block, min_io, identity) = if is_block {
            let size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| Error::io(format!("cannot size {shown}"), e.into()))?;
            let lbs = rustix::fs::ioctl_blksszget(&file).unwrap_or(512);
            // SAFETY: BLKIOMIN is a getter ioctl that writes one unsigned int.
            let min_io = unsafe {
                rustix::ioctl::ioctl(
                    &file,
                    rustix::ioctl::Getter::<BLKIOMIN, std::ffi::c_uint>::new(),
                )
            }
            .unwrap_or(lbs);
            let rdev = st.st_rdev;
            (size, lbs, min_io.max(lbs), DeviceIdentity::Block { rdev })
        } else {
            let identity = DeviceIdentity::File {
                dev: st.st_dev,
                ino: st.st_ino,
            };
            (st.st_size as u64, 1, 512, identity)
        };
        // Kernels copy_file_range between regular files only.
        let kernel_copy = !is_block && kernel_copy_pays(&file);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            is_block,
            logical_block,
            min_io,
            identity,
            kernel_copy,
            direct: None,
        })
    }

    /// Bypasses the page cache, as qemu's `cache=none`: reads and writes
    /// whose offset and length are aligned for direct I/O go through an
    /// `O_DIRECT` descriptor of the same file; others, and zeroing, through
    /// the page cache, which the kernel keeps coherent with them. No copy
    /// through `copy_file_range(2)` either: it would fill the page cache.
    /// Fails, naming the device, where its filesystem has no direct I/O.
    pub fn bypass_page_cache(mut self) -> Result<Self> {
        let direct =
            DirectIo::open(&self.file, self.is_block, self.logical_block).map_err(|e| {
                Error::io(
                    format!(
                        "cannot bypass the page cache of {} (origin_cache = \"none\")",
                        self.path.display()
                    ),
                    e,
                )
            })?;
        self.direct = Some(direct);
        self.kernel_copy = false;
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Zeroes `[offset, offset+len)` with `fallocate(mode)` where the
    /// filesystem or device supports it, writing zeroes where it does not.
    /// Block devices only take aligned fallocate ranges: the unaligned head
    /// and tail are written.
    /// Zeroes with `mode` (ZERO_RANGE or PUNCH_HOLE) on the aligned middle,
    /// falling back to a punched hole where `how` allows one, then to
    /// writing zeroes unless `how` wants only a fast zeroing (then ENOTSUP,
    /// before anything is changed). Unaligned edges are written as bytes.
    fn fallocate_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: FallocateFlags,
        how: Zeroing,
    ) -> io::Result<()> {
        let end = offset + len;
        let align = self.logical_block as u64;
        let (mid_start, mid_end) = (offset.next_multiple_of(align), end / align * align);
        if mid_start >= mid_end {
            return self.write_zero_bytes(offset, len);
        }
        let mid_len = mid_end - mid_start;
        let keep = FallocateFlags::KEEP_SIZE;
        let mut attempts = vec![mode | keep];
        if !how.keep_allocated {
            attempts.push(FallocateFlags::PUNCH_HOLE | keep);
        }
        let mut done = false;
        for flags in attempts {
            match rustix::fs::fallocate(&self.file, flags, mid_start, mid_len) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !done {
            if how.fast_only {
                return Err(io::Error::from_raw_os_error(
                    Errno::OPNOTSUPP.raw_os_error(),
                ));
            }
            self.write_zero_bytes(mid_start, mid_len)?;
        }
        self.write_zero_bytes(offset, mid_start - offset)?;
        self.write_zero_bytes(mid_end, end - mid_end)
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        super::write_zero_pieces(offset, len, |zeroes, at| self.file.write_all_at(zeroes, at))
    }
}

/// The `flock(LOCK_EX)` that keeps other cooperating programs off a file.
fn lock_exclusive(file: &File, shown: &str) -> Result<()> {
    rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        if e == Errno::WOULDBLOCK {
            Error::Busy {
                what: shown.to_string(),
                why: "the file is locked by another program".into(),
            }
        } else {
            Error::io(format!("cannot lock {shown}"), e.into())
        }
    })
}

/// The block device open in `file`, opened again read-write with `O_EXCL`.
/// Through the descriptor's magic link: the inode already open, not
/// whatever a path names now.
fn reopen_exclusive(file: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags((rustix::fs::OFlags::EXCL | rustix::fs::OFlags::CLOEXEC).bits() as i32)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Whether a regular file holds written data. Space reserved with
/// `fallocate` and never written, or a hole, is no content: that is how the
/// original tool's scripts make their storage files (`fallocate --length`).
/// Where the filesystem cannot tell (an error other than "no data"), the
/// answer is yes.
pub fn holds_data(file: &File) -> bool {
    !matches!(
        rustix::fs::seek(file, rustix::fs::SeekFrom::Data(0)),
        Err(Errno::NXIO)
    )
}

fn busy_or_io(e: io::Error, shown: &str) -> Error {
    if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) {
        Error::Busy {
            what: shown.to_string(),
            why: "the device is mounted or opened exclusively by another program".into(),
        }
    } else if e.kind() == io::ErrorKind::NotFound {
        Error::NotFound(format!("device {shown}"))
    } else {
        Error::io(format!("cannot open {shown}"), e)
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn min_io_size(&self) -> u32 {
        self.min_io
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block.max(512)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct) if direct.covers(offset, buf.len()) => direct.read(buf, offset),
            _ => self.file.read_exact_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct) if direct.covers(offset, buf.len()) => direct.write(buf, offset),
            _ => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_zeroes(offset, len, FallocateFlags::PUNCH_HOLE, Zeroing::default())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len, Zeroing::default())
    }

    fn zero_range(&self, offset: u64, len: u64, how: Zeroing) -> io::Result<()> {
        self.fallocate_zeroes(offset, len, FallocateFlags::ZERO_RANGE, how)
    }

    fn identity(&self) -> Option<DeviceIdentity> {
        Some(self.identity)
    }

    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    /// `copy_file_range(2)`, repeated until `len` bytes are copied. It reads
    /// through the page cache (or flushes it before sharing extents), so it
    /// sees every write made through this file before the call. Kernels
    /// take regular files only; across filesystems they refuse (EXDEV).
    /// Unsupported for block devices and files on xfs ([`kernel_copy_pays`]).
    /// After some bytes are copied any failure ends the copy short, so the
    /// caller's own copy of the rest reports real I/O errors.
    fn copy_to(
        &self,
        offset: u64,
        dst: &dyn BlockDevice,
        dst_offset: u64,
        len: u64,
    ) -> io::Result<u64> {
        let Some(out) = dst.as_fd() else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        if !self.kernel_copy {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let mut done = 0;
        while done < len {
            let (mut from, mut to) = (offset + done, dst_offset + done);
            let want = usize::try_from(len - done).unwrap_or(usize::MAX);
            match rustix::fs::copy_file_range(&self.file, Some(&mut from), out, Some(&mut to), want)
            {
                // The source ended early.
                Ok(0) => break,
                Ok(n) => done += n as u64,
                Err(Errno::INTR) => continue,
                Err(_) if done > 0 => break,
                Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS | Errno::BADF) => {
                    return Err(io::ErrorKind::Unsupported.into())
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Holes of regular files from SEEK_DATA/SEEK_HOLE; block devices claim
    /// nothing.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        use rustix::fs::SeekFrom;
        let end = offset + len;
        if self.is_block {
            return Ok(vec![Extent { len, zero: false }]);
        }
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d.min(end),
                Err(Errno::NXIO) => end,
                Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => {
                    push_extent(
                        &mut extents,
                        Extent {
                            len: end - pos,
                            zero: false,
                        },
                    );
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            push_extent(
                &mut extents,
                Extent {
                    len: data - pos,
                    zero: true,
                },
            );
            if data >= end {
                break;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h.min(end),
                Err(Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            push_extent(
                &mut extents,
                Extent {
                    len: hole - data,
                    zero: false,
                },
            );
            pos = hole;
        }
        Ok(extents)
    }
}
