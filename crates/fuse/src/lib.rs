//! Local block devices for blksnap, where the kernel has no NBD client or
//! ublk: a FUSE filesystem ([`fs`]) shows every tracked device and snapshot
//! image as a file, and a loop device over such a file is a real
//! `/dev/loopN` to mount a filesystem on. Translates FUSE into engine calls
//! and nothing else; the daemon decides which volumes get a loop device.
//!
//! [`LocalDevices`] owns the mount and the loop devices. Invariant: a loop
//! device exists only while its volume does; detach and destroy remove them
//! first. No lock of it is held while a FUSE file is opened or a loop device
//! configured: those are requests to our own FUSE threads, and a volume whose
//! I/O stalls must not hold up the loop devices of the others.

pub mod fs;
mod lane;
mod loopdev;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use blksnap_engine::volume::image_name;
use blksnap_engine::Engine;
use fuser::{BackgroundSession, Config, MountOption, SessionACL};

pub use loopdev::LoopDevice;

/// FUSE threads: all but one may run I/O requests themselves, the rest go
/// to their volume's lane (`fs.rs`, `lane.rs`).
const FUSE_THREADS: usize = 4;

pub struct LocalDevices {
    engine: Arc<Engine>,
    mountpoint: PathBuf,
    session: Mutex<Option<BackgroundSession>>,
    loops: Mutex<Loops>,
    /// Signalled when an attach outside the lock ends.
    attached: Condvar,
}

#[derive(Default)]
struct Loops {
    devices: HashMap<String, LoopDevice>,
    /// Volumes whose loop device is being attached, outside the lock.
    attaching: HashSet<String>,
}

impl LocalDevices {
    /// Lazily unmounts whatever is mounted on `dir`, never through a
    /// symlink (one could point at any mount). A mount left by a daemon
    /// that died is still listed by the kernel, and the directory cannot
    /// even be stat'ed until it is gone: so this comes before any check of
    /// `dir`, and [`Self::mount`] after such checks.
    pub fn unmount_stale(dir: &Path) {
        let flags = rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW;
        if rustix::mount::unmount(dir, flags).is_ok() {
            tracing::warn!(dir = %dir.display(), "unmounted what was mounted on the FUSE directory");
        }
    }

    /// Mounts the volume filesystem on `dir`, an existing directory the
    /// caller has checked (after [`Self::unmount_stale`]).
    pub fn mount(engine: Arc<Engine>, dir: &Path) -> io::Result<Arc<Self>> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("blksnap".into()),
            MountOption::Subtype("blksnap".into()),
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::RootAndOwner;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        // The FUSE threads inherit the IO_FLUSHER state of the thread that
        // starts the session: one of our own, so that no other thread of
        // the daemon gets it.
        let volumes = fs::VolumeFs::new(engine.clone());
        let session = std::thread::scope(|s| {
            s.spawn(|| {
                blksnap_engine::mark_io_flusher("fuser");
                fuser::spawn_mount(volumes, dir, &config)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("FUSE mount thread panicked")))
        })?;
        tracing::info!(dir = %dir.display(), "FUSE volumes mounted");
        Ok(Arc::new(Self {
            engine,
            mountpoint: dir.to_path_buf(),
            session: Mutex::new(Some(session)),
            loops: Mutex::new(Loops::default()),
            attached: Condvar::new(),
        }))
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The FUSE file of a volume.
    pub fn file(&self, volume: &str) -> PathBuf {
        self.mountpoint.join(volume)
    }

    /// Creates a loop device over the volume's file (direct I/O, the
    /// volume's logical block size) and returns its path.
    pub fn attach_loop(&self, volume: &str) -> io::Result<PathBuf> {
        let v = self.engine.volume(volume).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no volume {volume}"))
        })?;
        let mut loops = self.loops.lock().unwrap();
        // One attach per volume at a time; a second one waits for it and
        // returns its device.
        while loops.attaching.contains(volume) {
            loops = self.attached.wait(loops).unwrap();
        }
        if let Some(existing) = loops.devices.get(volume) {
            return Ok(existing.path().to_path_buf());
        }
        loops.attaching.insert(volume.to_string());
        drop(loops);
        // Opening the FUSE file and configuring the loop device are
        // requests to our own FUSE threads: not under the lock.
        let attached = LoopDevice::attach(&self.file(volume), v.logical_block_size());
        let mut loops = self.loops.lock().unwrap();
        loops.attaching.remove(volume);
        self.attached.notify_all();
        let device = attached?;
        let path = device.path().to_path_buf();
        tracing::info!(volume, device = %path.display(), direct_io = device.direct_io(), "loop device attached");
        loops.devices.insert(volume.to_string(), device);
        Ok(path)
    }

    pub fn loop_path(&self, volume: &str) -> Option<PathBuf> {
        self.loops
            .lock()
            .unwrap()
            .devices
            .get(volume)
            .map(|l| l.path().to_path_buf())
    }

    /// The device number of a volume's loop device.
    pub fn loop_rdev(&self, volume: &str) -> Option<u64> {
        self.loops
            .lock()
            .unwrap()
            .devices
            .get(volume)
            .and_then(|l| l.rdev().ok())
    }

    /// The device numbers of every loop device.
    pub fn loop_rdevs(&self) -> Vec<u64> {
        self.loops
            .lock()
            .unwrap()
            .devices
            .values()
            .filter_map(|l| l.rdev().ok())
            .collect()
    }

    /// Writes every loop device holds (its page cache, its queue) go down
    /// to our files, so to the engine; errors are logged.
    pub fn flush_loops(&self) {
        for (volume, device) in self.loops.lock().unwrap().devices.iter() {
            if let Err(e) = device.flush() {
                tracing::error!(volume, device = %device.path().display(), error = %e, "cannot flush the loop device");
            }
        }
    }

    /// The volume served by the loop device at `path`.
    pub fn volume_of_loop(&self, path: &Path) -> Option<String> {
        self.loops
            .lock()
            .unwrap()
            .devices
            .iter()
            .find(|(_, l)| l.path() == path)
            .map(|(v, _)| v.clone())
    }

    /// Whether the volume's loop device is held (mounted, opened
    /// exclusively).
    pub fn loop_in_use(&self, volume: &str) -> bool {
        self.loops
            .lock()
            .unwrap()
            .devices
            .get(volume)
            .is_some_and(|l| l.in_use())
    }

    /// Removes the volume's loop device (lazily if something still holds
    /// it). Returns whether there was one.
    pub fn detach_loop(&self, volume: &str) -> bool {
        let mut loops = self.loops.lock().unwrap();
        // An attach under way would add the device after this: wait for it.
        while loops.attaching.contains(volume) {
            loops = self.attached.wait(loops).unwrap();
        }
        let removed = loops.devices.remove(volume);
        // Detached (LOOP_CLR_FD) outside the lock.
        drop(loops);
        if let Some(device) = &removed {
            tracing::info!(volume, device = %device.path().display(), "loop device detached");
        }
        removed.is_some()
    }

    /// Loop devices in use, as (volume, loop path).
    pub fn busy(&self) -> Vec<(String, PathBuf)> {
        self.loops
            .lock()
            .unwrap()
            .devices
            .iter()
            .filter(|(_, l)| l.in_use())
            .map(|(v, l)| (v.clone(), l.path().to_path_buf()))
            .collect()
    }

    /// Loop devices of a device and of its image.
    pub fn volumes_of_device(device: &str) -> [String; 2] {
        [device.to_string(), image_name(device)]
    }

    /// Detaches every loop device and unmounts the filesystem.
    pub fn shutdown(&self) {
        // Detached outside the lock.
        let devices = std::mem::take(&mut self.loops.lock().unwrap().devices);
        drop(devices);
        if let Some(session) = self.session.lock().unwrap().take() {
            drop(session);
            // Still mounted (a forced stop with files open): detach it lazily
            // so the next start is not blocked by a dead mount.
            let flags = rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW;
            match rustix::mount::unmount(&self.mountpoint, flags) {
                Ok(()) => {
                    tracing::warn!(dir = %self.mountpoint.display(), "FUSE volumes still in use: unmounted lazily")
                }
                Err(_) => {
                    tracing::info!(dir = %self.mountpoint.display(), "FUSE volumes unmounted")
                }
            }
        }
    }
}

impl Drop for LocalDevices {
    fn drop(&mut self) {
        self.shutdown();
    }
}
