//! Loop devices over our FUSE files: `/dev/loopN` block devices that the
//! kernel backs with a file, configured in one `LOOP_CONFIGURE` ioctl (free
//! device from `/dev/loop-control`, direct I/O, logical block size,
//! autoclear). Owned by [`crate::LocalDevices`].
//!
//! Invariants:
//! - every loop device is made with `LO_FLAGS_AUTOCLEAR`, and the kernel
//!   clears it when its last opener closes it. We hold it open as long as
//!   its [`LoopDevice`] lives, so it stays while we serve it; when the
//!   daemon dies, the kernel closes our descriptor and the device goes at
//!   once, or when whatever still holds it (a mount) lets go: a loop device
//!   never stays bound to the file of a dead FUSE mount with nobody on it;
//! - nothing decides that a loop device is free and then releases it in two
//!   steps: a [`Claim`] (an `O_EXCL` open, which the kernel refuses while
//!   the device is mounted or claimed by anyone else, and which keeps
//!   anyone from mounting it while held) is taken first, and the release
//!   ([`LoopDevice::release`]) happens under it;
//! - loop devices left by an earlier daemon over files under our FUSE
//!   directory are released at start ([`release_leftovers`]).
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};

const LOOP_CTL_GET_FREE: Opcode = opcode::none(0x4C, 0x82);
const LOOP_CONFIGURE: Opcode = opcode::none(0x4C, 0x0A);
const LOOP_CLR_FD: Opcode = opcode::none(0x4C, 0x01);
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `LOOP_CTL_GET_FREE`, whose result is the ioctl's return value.
struct GetFree;

// SAFETY: the opcode takes no argument (null pointer) and returns an int.
unsafe impl rustix::ioctl::Ioctl for GetFree {
    type Output = i32;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }
    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<i32> {
        Ok(out)
    }
}

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    device: File,
    direct_io: bool,
    /// Released under a claim already: nothing more to do at drop.
    released: bool,
}

/// An exclusive (`O_EXCL`) open of a loop device: proof that nothing has it
/// mounted or claimed, and, while held, that nothing can.
#[derive(Debug)]
pub struct Claim {
    file: File,
}

/// Why a loop device could not be claimed: in use (`EBUSY`: mounted, or
/// claimed by another program), or any other error, which counts as in use
/// too, since nothing then shows that it is free.
#[derive(Debug)]
pub struct InUse {
    pub path: PathBuf,
    pub error: io::Error,
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.error.raw_os_error() == Some(Errno::BUSY.raw_os_error()) {
            write!(f, "{} is in use (mounted?)", self.path.display())
        } else {
            write!(
                f,
                "{} cannot be opened exclusively ({}), so it counts as in use",
                self.path.display(),
                self.error
            )
        }
    }
}

/// Opens `path` exclusively.
fn claim_path(path: &Path) -> Result<Claim, InUse> {
    OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::EXCL | rustix::fs::OFlags::CLOEXEC).bits() as i32)
        .open(path)
        .map(|file| Claim { file })
        .map_err(|error| InUse {
            path: path.to_path_buf(),
            error,
        })
}

/// `LOOP_CLR_FD`: the kernel detaches the device at once, or, while other
/// openers hold it, when the last of them closes it.
fn clear(device: &File) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument.
    unsafe { rustix::ioctl::ioctl(device, rustix::ioctl::NoArg::<LOOP_CLR_FD>::new()) }
}

impl LoopDevice {
    /// A free loop device over `backing`, with `block_size` logical blocks,
    /// direct I/O when the backing file allows it.
    pub fn attach(backing: &Path, block_size: u32) -> io::Result<Self> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        let file = OpenOptions::new().read(true).write(true).open(backing)?;
        // Another process may take the free device first: ask again.
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; its result is a
            // device number (GetFree reads nothing through the pointer).
            let number = unsafe { rustix::ioctl::ioctl(&control, GetFree) }?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let device = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
                .open(&path)?;
            for direct_io in [true, false] {
                match configure(&device, &file, block_size, direct_io) {
                    Ok(()) => {
                        return Ok(Self {
                            path,
                            device,
                            direct_io,
                            released: false,
                        })
                    }
                    Err(Errno::BUSY) => break,
                    Err(Errno::INVAL) if direct_io => {
                        tracing::warn!(backing = %backing.display(), "loop device without direct I/O");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(io::Error::other("no free loop device after 16 tries"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Whether something else holds the device: a mount, or an exclusive
    /// opener. For reports only: a decision takes a [`Claim`].
    pub fn in_use(&self) -> bool {
        self.claim().is_err()
    }

    /// The device, opened exclusively.
    pub fn claim(&self) -> Result<Claim, InUse> {
        claim_path(&self.path)
    }

    /// Detaches the device under `claim` (of this device): after our own
    /// descriptor, the claim's is the last one, whose close clears it,
    /// unless a program opened it (without `O_EXCL`) meanwhile: then it goes
    /// when that program closes it.
    pub fn release(mut self, claim: Claim) {
        if let Err(e) = clear(&claim.file) {
            tracing::warn!(device = %self.path.display(), error = %e, "cannot detach loop device");
        }
        self.released = true;
        drop(self);
        drop(claim);
    }

    /// fsync of the block device: its dirty page cache is written and a
    /// flush sent, which the loop driver passes on to the backing file
    /// once the writes queued before it are done.
    pub fn flush(&self) -> io::Result<()> {
        self.device.sync_all()
    }

    /// The device number, to find filesystems mounted on it.
    pub fn rdev(&self) -> io::Result<u64> {
        Ok(rustix::fs::fstat(&self.device)?.st_rdev)
    }
}

fn configure(device: &File, backing: &File, block_size: u32, direct_io: bool) -> Result<(), Errno> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 },
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
    // `LoopConfig` lays out exactly (repr(C)); Setter passes a pointer to it
    // that is valid for the call.
    unsafe {
        rustix::ioctl::ioctl(
            device,
            rustix::ioctl::Setter::<LOOP_CONFIGURE, LoopConfig>::new(config),
        )
    }
}

impl Drop for LoopDevice {
    /// Without a claim (a device in use, or the daemon's stop): the device
    /// goes when its last user closes it.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(e) = clear(&self.device) {
            tracing::warn!(device = %self.path.display(), error = %e, "cannot detach loop device");
        }
    }
}

/// What [`release_leftovers`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Loop devices detached, as (device, backing file).
    pub released: Vec<(PathBuf, String)>,
    /// Loop devices still in use (mounted): marked to go when their last
    /// user closes them.
    pub in_use: Vec<(PathBuf, String)>,
}

/// The file a loop device is bound to, from sysfs, without the
/// ` (deleted)` the kernel adds when its name is gone.
fn backing_file(sys_block: &Path) -> Option<String> {
    let text = std::fs::read_to_string(sys_block.join("loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    Some(text.strip_suffix(" (deleted)").unwrap_or(text).to_string())
}

/// `dir` as the kernel names paths under it (absolute, symlinks resolved),
/// also when it is the dead FUSE mount of a killed daemon, which cannot
/// itself be resolved (ENOTCONN).
fn kernel_path(dir: &Path) -> PathBuf {
    if let Ok(path) = std::fs::canonicalize(dir) {
        return path;
    }
    match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| dir.to_path_buf()),
        _ => dir.to_path_buf(),
    }
}

/// At start, before our FUSE frontend is mounted on `dir`: detaches every
/// loop device bound to a file under `dir`, which only an earlier daemon on
/// that directory made (one that was killed, or a version without
/// autoclear). A free one is claimed and detached; one in use (a
/// filesystem still mounted on it) is marked to go when its last user
/// closes it and reported. Must run while the dead FUSE mount, if any, is
/// still attached to `dir`: once it is unmounted, the kernel names its
/// files relative to it and they cannot be told from others.
pub fn release_leftovers(dir: &Path) -> Leftovers {
    let prefix = kernel_path(dir);
    let mut found = Leftovers::default();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Some(backing) = backing_file(&entry.path()) else {
            continue;
        };
        if !Path::new(&backing).starts_with(&prefix) || Path::new(&backing) == prefix {
            continue;
        }
        let device = PathBuf::from(format!("/dev/{name}"));
        match claim_path(&device) {
            Ok(claim) => match clear(&claim.file) {
                Ok(()) => {
                    tracing::warn!(device = %device.display(), backing, "loop device left by an earlier blksnapd detached");
                    found.released.push((device, backing));
                }
                Err(e) => {
                    tracing::error!(device = %device.display(), backing, error = %e, "cannot detach a loop device left by an earlier blksnapd")
                }
            },
            Err(in_use) => {
                // LOOP_CLR_FD on an open device only marks it to be cleared
                // at its last close.
                let marked = OpenOptions::new()
                    .read(true)
                    .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
                    .open(&device)
                    .map_err(|e| e.to_string())
                    .and_then(|f| clear(&f).map_err(|e| e.to_string()));
                tracing::warn!(
                    device = %device.display(),
                    backing,
                    why = %in_use,
                    marked = ?marked,
                    "loop device left by an earlier blksnapd is still in use: it goes when its last user closes it (unmount it)"
                );
                found.in_use.push((device, backing));
            }
        }
    }
    found
}
