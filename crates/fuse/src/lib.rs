//! Local block devices for blksnap, where the kernel has no NBD client or
//! ublk: a FUSE filesystem ([`fs`]) shows every tracked device and snapshot
//! image as a file, and a loop device over such a file is a real
//! `/dev/loopN` to mount a filesystem on. Translates FUSE into engine calls
//! and nothing else; the daemon decides which volumes get a loop device.
//!
//! [`LocalDevices`] owns the mount and the loop devices. Invariant: a loop
//! device exists only while its volume does; detach and destroy remove them
//! first.

pub mod fs;
mod loopdev;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blksnap_engine::volume::image_name;
use blksnap_engine::Engine;
use fuser::{BackgroundSession, Config, MountOption, SessionACL};

pub use loopdev::LoopDevice;

/// FUSE worker threads: requests served at once.
const FUSE_THREADS: usize = 4;

pub struct LocalDevices {
    engine: Arc<Engine>,
    mountpoint: PathBuf,
    session: Mutex<Option<BackgroundSession>>,
    loops: Mutex<HashMap<String, LoopDevice>>,
}

impl LocalDevices {
    /// Mounts the volume filesystem on `dir` (created if missing).
    pub fn mount(engine: Arc<Engine>, dir: &Path) -> io::Result<Arc<Self>> {
        // A mount left by a daemon that died: the kernel still lists it, and
        // the directory cannot even be stat'ed until it is gone.
        let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
        std::fs::create_dir_all(dir)?;
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
        let session = fuser::spawn_mount(fs::VolumeFs::new(engine.clone()), dir, &config)?;
        tracing::info!(dir = %dir.display(), "FUSE volumes mounted");
        Ok(Arc::new(Self {
            engine,
            mountpoint: dir.to_path_buf(),
            session: Mutex::new(Some(session)),
            loops: Mutex::new(HashMap::new()),
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
        if let Some(existing) = loops.get(volume) {
            return Ok(existing.path().to_path_buf());
        }
        let device = LoopDevice::attach(&self.file(volume), v.logical_block_size())?;
        let path = device.path().to_path_buf();
        tracing::info!(volume, device = %path.display(), direct_io = device.direct_io(), "loop device attached");
        loops.insert(volume.to_string(), device);
        Ok(path)
    }

    pub fn loop_path(&self, volume: &str) -> Option<PathBuf> {
        self.loops
            .lock()
            .unwrap()
            .get(volume)
            .map(|l| l.path().to_path_buf())
    }

    /// The device number of a volume's loop device.
    pub fn loop_rdev(&self, volume: &str) -> Option<u64> {
        self.loops
            .lock()
            .unwrap()
            .get(volume)
            .and_then(|l| l.rdev().ok())
    }

    /// The device numbers of every loop device.
    pub fn loop_rdevs(&self) -> Vec<u64> {
        self.loops
            .lock()
            .unwrap()
            .values()
            .filter_map(|l| l.rdev().ok())
            .collect()
    }

    /// Writes every loop device holds (its page cache, its queue) go down
    /// to our files, so to the engine; errors are logged.
    pub fn flush_loops(&self) {
        for (volume, device) in self.loops.lock().unwrap().iter() {
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
            .get(volume)
            .is_some_and(|l| l.in_use())
    }

    /// Removes the volume's loop device (lazily if something still holds
    /// it). Returns whether there was one.
    pub fn detach_loop(&self, volume: &str) -> bool {
        let removed = self.loops.lock().unwrap().remove(volume);
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
        self.loops.lock().unwrap().clear();
        if let Some(session) = self.session.lock().unwrap().take() {
            drop(session);
            // Still mounted (a forced stop with files open): detach it lazily
            // so the next start is not blocked by a dead mount.
            match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH) {
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
