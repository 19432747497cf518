//! Loop devices over our FUSE files: `/dev/loopN` block devices that the
//! kernel backs with a file, configured in one `LOOP_CONFIGURE` ioctl (free
//! device from `/dev/loop-control`, direct I/O, logical block size).
//! Owned by [`crate::LocalDevices`]; a loop device is detached when its
//! [`LoopDevice`] is dropped (lazily, if it is still open elsewhere).

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
    /// opener. Probed with an exclusive open, which the kernel refuses then.
    pub fn in_use(&self) -> bool {
        match OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
            .open(&self.path)
        {
            Ok(_) => false,
            Err(e) => e.raw_os_error() == Some(Errno::BUSY.raw_os_error()),
        }
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
            lo_flags: if direct_io { LO_FLAGS_DIRECT_IO } else { 0 },
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
    fn drop(&mut self) {
        // SAFETY: LOOP_CLR_FD takes no argument. The kernel detaches at once,
        // or when the last user closes the device.
        let cleared = unsafe {
            rustix::ioctl::ioctl(&self.device, rustix::ioctl::NoArg::<LOOP_CLR_FD>::new())
        };
        if let Err(e) = cleared {
            tracing::warn!(device = %self.path.display(), error = %e, "cannot detach loop device");
        }
    }
}
