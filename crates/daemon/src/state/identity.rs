//! Who a device is ([`Identity`]) and whether it is unchanged since we last
//! saved its maps ([`Fingerprint`]), read from the device itself, sysfs and
//! the filesystem it carries. A different identity means the recorded path
//! now names another device (not attached again); a different fingerprint
//! means the same device was written while no daemon tracked it (a new
//! generation, `changed-while-detached`).
//!
//! What is checked:
//! - regular files: device and inode; size, mtime and ctime;
//! - block devices: the serial or WWN from sysfs (a loop device: its
//!   backing file's device and inode; a partition: its disk's, plus the
//!   partition number); size; a loop device's backing file's mtime and
//!   ctime; for ext4, the superblock's `s_wtime`,
//!   `s_mtime`, `s_mnt_count` and `s_kbytes_written`; for xfs, a checksum of
//!   the primary superblock sector (its counters and, on v5, `sb_lsn`).
//!
//! Called by [`super::StateDir`] at every save and restore.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Identity {
    File { dev: u64, ino: u64 },
    Block { serial: Option<String> },
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::File { dev, ino } => write!(f, "file with inode {ino} on device {dev:#x}"),
            Identity::Block { serial: Some(s) } => write!(f, "block device {s}"),
            Identity::Block { serial: None } => write!(f, "block device without a serial"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size: u64,
    /// Regular files: mtime and ctime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<FileTimes>,
    /// Block devices: what the filesystem's superblock says, if we know it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
}

/// A regular file's mtime and ctime, in nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTimes {
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileTimes {
    /// The later of the two.
    pub fn latest_ns(self) -> i64 {
        self.mtime_ns.max(self.ctime_ns)
    }
}

impl Fingerprint {
    /// Whether anything shows that the device is unchanged: file times
    /// (of a file, or of a loop device's backing file) or a known
    /// filesystem. A serial proves which device it is, not that nobody
    /// wrote to it.
    pub fn verifiable(&self) -> bool {
        self.times.is_some() || self.filesystem.is_some()
    }
}

/// The device at `path` now (following symlinks, as attach does).
pub fn probe(path: &Path) -> io::Result<(Identity, Fingerprint)> {
    let meta = std::fs::metadata(path)?;
    if meta.file_type().is_block_device() {
        let file = File::open(path)?;
        let size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))?;
        Ok((
            Identity::Block {
                serial: block_serial(meta.rdev()),
            },
            Fingerprint {
                size,
                times: loop_backing_times(meta.rdev()),
                filesystem: filesystem(&file)?,
            },
        ))
    } else if meta.is_file() {
        Ok((
            Identity::File {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            Fingerprint {
                size: meta.len(),
                times: Some(file_times(&meta)),
                filesystem: None,
            },
        ))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ))
    }
}

fn file_times(meta: &std::fs::Metadata) -> FileTimes {
    FileTimes {
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    }
}

/// A loop device's backing file times: any write through the loop device
/// or to the file changes them.
fn loop_backing_times(rdev: u64) -> Option<FileTimes> {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let backing = read_trimmed(Path::new(&format!(
        "/sys/dev/block/{major}:{minor}/loop/backing_file"
    )))?;
    std::fs::metadata(backing).ok().map(|m| file_times(&m))
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The serial of block device `rdev` from sysfs, where it has one.
fn block_serial(rdev: u64) -> Option<String> {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let (disk, part) = match read_trimmed(&sys.join("partition")) {
        Some(n) => (sys.parent()?.to_path_buf(), Some(n)),
        None => (sys, None),
    };
    let serial = [
        "device/wwid",
        "wwid",
        "device/serial",
        "serial",
        "dm/uuid",
        "md/uuid",
    ]
    .iter()
    .find_map(|f| read_trimmed(&disk.join(f)))
    .or_else(|| {
        // A loop device: the file behind it.
        let backing = read_trimmed(&disk.join("loop/backing_file"))?;
        let meta = std::fs::metadata(backing).ok()?;
        Some(format!("loop-backing:{:#x}:{}", meta.dev(), meta.ino()))
    })?;
    Some(match part {
        Some(n) => format!("{serial}-part{n}"),
        None => serial,
    })
}

/// What a filesystem on the device records of every mount and write.
fn filesystem(file: &File) -> io::Result<Option<String>> {
    let mut sb = vec![0u8; 4096];
    match file.read_exact_at(&mut sb, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(describe_superblock(&sb))
}

/// ext4 or xfs fields from the first 4 KiB of a device.
pub fn describe_superblock(b: &[u8]) -> Option<String> {
    let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    const EXT: usize = 1024;
    if le16(EXT + 0x38) == 0xEF53 {
        return Some(format!(
            "ext4 s_wtime={} s_mtime={} s_mnt_count={} s_kbytes_written={}",
            le32(EXT + 0x30),
            le32(EXT + 0x2C),
            le16(EXT + 0x34),
            le64(EXT + 0x178)
        ));
    }
    if &b[..4] == b"XFSB" {
        return Some(format!(
            "xfs superblock crc32={:08x}",
            crc32fast::hash(&b[..512])
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_change_fingerprint_on_write_and_touch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let (id, fp) = probe(&path).unwrap();
        assert!(matches!(id, Identity::File { .. }));
        assert!(fp.verifiable());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[2], 0).unwrap();
        let (id2, fp2) = probe(&path).unwrap();
        assert_eq!(id, id2);
        assert_ne!(fp, fp2);
    }

    #[test]
    fn superblocks_are_recognised() {
        let mut b = vec![0u8; 4096];
        assert_eq!(describe_superblock(&b), None);
        b[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[1024 + 0x34] = 7;
        let text = describe_superblock(&b).unwrap();
        assert!(text.contains("s_mnt_count=7"), "{text}");
        let mut x = vec![0u8; 4096];
        x[..4].copy_from_slice(b"XFSB");
        assert!(describe_superblock(&x).unwrap().starts_with("xfs"));
    }
}
