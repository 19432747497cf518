//! Filesystem freeze around a snapshot take: every filesystem mounted on one
//! of our loop devices is frozen (FIFREEZE) before the engine holds writes,
//! so the image is a clean filesystem, and thawed right after. A filesystem
//! that cannot be frozen is reported; the take still happens.

use std::fs::File;
use std::path::PathBuf;

use rustix::ioctl::{opcode, Opcode};

const FIFREEZE: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 119);
const FITHAW: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 120);

/// Mount points of filesystems on block device `rdev`, from mountinfo.
pub fn mounts_on(rdev: u64) -> Vec<PathBuf> {
    let wanted = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?;
            (fields.get(2) == Some(&wanted.as_str())).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let n = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ioctl_int(file: &File, code: Opcode) -> rustix::io::Result<()> {
    let mut arg: std::ffi::c_int = 0;
    match code {
        FIFREEZE => {
            // SAFETY: FIFREEZE takes a pointer to an int it ignores; `arg` is
            // valid for the call.
            unsafe {
                rustix::ioctl::ioctl(file, rustix::ioctl::Updater::<FIFREEZE, _>::new(&mut arg))
            }
        }
        _ => {
            // SAFETY: FITHAW likewise takes a pointer to an ignored int.
            unsafe {
                rustix::ioctl::ioctl(file, rustix::ioctl::Updater::<FITHAW, _>::new(&mut arg))
            }
        }
    }
}

/// Filesystems frozen now; thawed when dropped.
pub struct Frozen {
    mounts: Vec<(PathBuf, File)>,
}

impl Frozen {
    /// Freezes each mount point; returns what was frozen and one warning
    /// per mount point that could not be.
    pub fn freeze(mount_points: &[PathBuf]) -> (Self, Vec<String>) {
        let mut mounts = Vec::new();
        let mut warnings = Vec::new();
        for mp in mount_points {
            let frozen = File::open(mp).map_err(|e| e.to_string()).and_then(|f| {
                ioctl_int(&f, FIFREEZE)
                    .map(|_| f)
                    .map_err(|e| e.to_string())
            });
            match frozen {
                Ok(f) => {
                    tracing::info!(mount = %mp.display(), "filesystem frozen for the take");
                    mounts.push((mp.clone(), f));
                }
                Err(e) => {
                    let w = format!(
                        "cannot freeze the filesystem at {}: {e}; taking the snapshot anyway",
                        mp.display()
                    );
                    tracing::warn!("{w}");
                    warnings.push(w);
                }
            }
        }
        (Self { mounts }, warnings)
    }

    pub fn mount_points(&self) -> Vec<String> {
        self.mounts
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (mp, f) in &self.mounts {
            match ioctl_int(f, FITHAW) {
                Ok(()) => tracing::info!(mount = %mp.display(), "filesystem thawed"),
                Err(e) => {
                    tracing::error!(mount = %mp.display(), error = %e, "cannot thaw filesystem")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
