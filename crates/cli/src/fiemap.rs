//! Resolves a file to the sector ranges it occupies on its block device
//! (FS_IOC_FIEMAP), for `markdirtyblock --file`: the original tool's way to
//! mark a file's blocks changed so the next incremental backup includes it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use blksnap_proto::Range;

const EXTENTS_PER_CALL: usize = 256;
/// `_IOWR('f', 11, struct fiemap)`; struct fiemap is 32 bytes.
const FS_IOC_FIEMAP: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<[u8; 32]>(b'f', 11);
const FIEMAP_FLAG_SYNC: u32 = 1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents whose place on the device is unknown or not block-aligned.
const FIEMAP_EXTENT_UNMOVABLE: u32 = 0x2 | 0x4 | 0x8 | 0x100 | 0x200;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// The device under `path`'s filesystem (its `st_dev`) and the sector
/// ranges the file's data occupies on it, merged where adjacent.
pub fn file_ranges(path: &Path) -> Result<(u64, Vec<Range>), String> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
    let device = file
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?
        .dev();
    let mut ranges: Vec<Range> = Vec::new();
    let mut start = 0u64;
    loop {
        let mut map = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: FS_IOC_FIEMAP reads the 32-byte header and writes at most
        // `extent_count` extents after it; `Fiemap` is that layout, repr(C),
        // with room for exactly `extent_count` extents.
        unsafe {
            rustix::ioctl::ioctl(
                &file,
                rustix::ioctl::Updater::<FS_IOC_FIEMAP, Fiemap>::new(&mut map),
            )
        }
        .map_err(|e| format!("cannot map the extents of {shown} (FIEMAP): {e}"))?;
        let extents = &map.extents[..map.mapped_extents as usize];
        for extent in extents {
            if extent.flags & FIEMAP_EXTENT_UNMOVABLE != 0 {
                return Err(format!(
                    "{shown} has data at no fixed place on the device (inline, encoded or unknown extent at offset {})",
                    extent.logical
                ));
            }
            let first = extent.physical / 512;
            let end = (extent.physical + extent.length).div_ceil(512);
            match ranges.last_mut() {
                Some(last) if last.start + last.count == first => last.count += end - first,
                _ => ranges.push(Range {
                    start: first,
                    count: end - first,
                }),
            }
        }
        match extents.last() {
            Some(last) if last.flags & FIEMAP_EXTENT_LAST == 0 => {
                start = last.logical + last.length
            }
            _ => return Ok((device, ranges)),
        }
    }
}
