//! Direct I/O for a [`super::FileDevice`] whose page cache is bypassed
//! (`origin_cache = "none"`, like qemu's `cache=none`): a loop device over
//! our FUSE file caches the same data in its own page cache, and a guest or
//! a database that does its own caching wants none in between.
//!
//! [`DirectIo`] owns a second descriptor of the device's file, opened with
//! `O_DIRECT`, and the alignments direct I/O needs there (`statx`
//! `STATX_DIOALIGN`). Invariant: only I/O whose offset and length are
//! multiples of the offset alignment goes through it ([`DirectIo::covers`]);
//! the rest (a 512-byte NBD request on a file with 4 KiB direct I/O, the
//! short last block of a file) goes through the page cache of the buffered
//! descriptor, which the kernel keeps coherent with direct I/O (a direct read
//! writes back dirty cached pages first, a direct write drops them).
//! Memory that is not aligned as direct I/O wants goes through a bounce
//! buffer of the calling thread. Called by `FileDevice` only.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use rustix::fs::{AtFlags, StatxFlags};

/// Bounce buffers up to this size are kept by their thread; larger ones
/// (rare: a copy of a chunk above 1 MiB) are made per call.
const KEPT_BOUNCE: usize = 1 << 20;

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug)]
pub(crate) struct DirectIo {
    file: File,
    mem_align: usize,
    offset_align: u64,
}

impl DirectIo {
    /// Opens `file` again with `O_DIRECT` (through its descriptor's magic
    /// link: the same inode, whatever a path names now). `logical_block` is
    /// the device's, used where the kernel reports no alignment (a block
    /// device on an old kernel).
    pub(crate) fn open(file: &File, is_block: bool, logical_block: u32) -> io::Result<Self> {
        let (mem_align, offset_align) = alignment(file, is_block, logical_block)?;
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::CLOEXEC).bits() as i32)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        Ok(Self {
            file: direct,
            mem_align,
            offset_align,
        })
    }

    /// Whether `[offset, offset+len)` may go through direct I/O.
    pub(crate) fn covers(&self, offset: u64, len: usize) -> bool {
        len > 0 && offset % self.offset_align == 0 && len as u64 % self.offset_align == 0
    }

    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr()) {
            return self.file.read_exact_at(buf, offset);
        }
        self.with_bounce(buf.len(), |bounce| {
            self.file.read_exact_at(bounce, offset)?;
            buf.copy_from_slice(bounce);
            Ok(())
        })
    }

    pub(crate) fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr()) {
            return self.file.write_all_at(buf, offset);
        }
        self.with_bounce(buf.len(), |bounce| {
            bounce.copy_from_slice(buf);
            self.file.write_all_at(bounce, offset)
        })
    }

    fn aligned(&self, ptr: *const u8) -> bool {
        ptr.align_offset(self.mem_align) == 0
    }

    /// Runs `f` on `len` bytes of memory aligned for direct I/O.
    fn with_bounce<T>(&self, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        let aligned = |v: &mut Vec<u8>| -> std::ops::Range<usize> {
            if v.len() < len + self.mem_align {
                v.resize(len + self.mem_align, 0);
            }
            let start = v.as_ptr().align_offset(self.mem_align);
            start..start + len
        };
        if len > KEPT_BOUNCE {
            let mut v = Vec::new();
            let range = aligned(&mut v);
            return f(&mut v[range]);
        }
        BOUNCE.with_borrow_mut(|v| {
            let range = aligned(v);
            f(&mut v[range])
        })
    }
}

/// (memory, offset) alignment of direct I/O on `file`. An error where the
/// file's filesystem has no direct I/O.
fn alignment(file: &File, is_block: bool, logical_block: u32) -> io::Result<(usize, u64)> {
    let st = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)?;
    if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN) {
        if st.stx_dio_offset_align == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "its filesystem has no direct I/O",
            ));
        }
        return Ok((
            st.stx_dio_mem_align.max(1) as usize,
            st.stx_dio_offset_align as u64,
        ));
    }
    // Not reported (an old kernel, a filesystem that does not say): the
    // device's logical block for a block device, a page for a file, both
    // safe for offset and memory.
    let align = if is_block {
        logical_block.max(512)
    } else {
        4096
    };
    Ok((align as usize, align as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_flags(file: &File) -> u32 {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        u32::from_str_radix(flags, 8).unwrap()
    }

    #[test]
    fn aligned_and_unaligned_memory_both_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("origin");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let direct = DirectIo::open(&file, false, 1).unwrap();
        assert_ne!(
            open_flags(&direct.file) & rustix::fs::OFlags::DIRECT.bits(),
            0,
            "the second descriptor is not O_DIRECT"
        );
        let unit = direct.offset_align as usize;
        assert!(direct.covers(0, unit) && direct.covers(unit as u64, 2 * unit));
        assert!(!direct.covers(1, unit) && !direct.covers(0, unit + 1) && !direct.covers(0, 0));
        // One byte past an aligned start: never aligned memory.
        let mut backing = vec![0u8; 3 * unit + direct.mem_align + 1];
        let start = backing.as_ptr().align_offset(direct.mem_align.max(2)) + 1;
        let data: Vec<u8> = (0..2 * unit).map(|i| (i % 251) as u8).collect();
        backing[start..start + data.len()].copy_from_slice(&data);
        direct
            .write(&backing[start..start + data.len()], unit as u64)
            .unwrap();
        let mut plain = vec![0u8; data.len()];
        file.read_exact_at(&mut plain, unit as u64).unwrap();
        assert!(plain == data, "a bounced write missed the file");
        let mut back = vec![0u8; 4 * unit];
        let mut read_start = back.as_ptr().align_offset(direct.mem_align.max(2)) + 1;
        read_start = read_start.min(back.len() - data.len());
        direct
            .read(&mut back[read_start..read_start + data.len()], unit as u64)
            .unwrap();
        assert!(back[read_start..read_start + data.len()] == data[..]);
        // A write through the page cache is seen by a direct read.
        file.write_all_at(&[7u8; 16], 0).unwrap();
        let mut first = vec![0u8; unit];
        direct.read(&mut first, 0).unwrap();
        assert_eq!(&first[..16], &[7u8; 16]);
        assert_eq!(first[16], 0);
    }
}
