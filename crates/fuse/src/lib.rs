//! Local block devices for blksnap, where the kernel has no NBD client or
//! ublk: a FUSE filesystem ([`fs`]) shows every tracked device and snapshot
//! image as a file, and a loop device over such a file is a real
//! `/dev/loopN` to mount a filesystem on. Translates FUSE into engine calls
//! and nothing else; the daemon decides which volumes get a loop device.
//!
//! [`LocalDevices`] owns the mount and the loop devices. Invariants:
//! - a loop device in `loops` exists only while its volume does; detach and
//!   destroy remove it first, under a [`Claim`] (see [`loopdev`]), so that
//!   nothing can mount it between the check that it is free and its
//!   release;
//! - a device detached while its loop device was in use (mounted) is
//!   *detaching*: the engine released it to pass-through (see
//!   `blksnap_engine::DeviceMode`), the loop device is marked to be cleared
//!   at its last close, and the FUSE handle the loop device holds is then the
//!   only owner of the device object, so its origin closes when the kernel
//!   clears the loop device and releases that handle. We keep a weak
//!   reference only, to list it and to refuse a new attach of the same
//!   device or name meanwhile.
//! - no lock of it is held while a FUSE file is opened or a loop device
//!   configured: those are requests to our own FUSE threads, and a volume
//!   whose I/O stalls must not hold up the loop devices of the others.

pub mod fs;
mod lane;
mod loopdev;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};

use blksnap_engine::volume::image_name;
use blksnap_engine::{Engine, TrackedDevice};
use fuser::{BackgroundSession, Config, MountOption, SessionACL};

pub use loopdev::{release_leftovers, Claim, InUse, Leftovers, LoopDevice};

/// FUSE threads: all but one may run I/O requests themselves, the rest go
/// to their volume's lane (`fs.rs`, `lane.rs`).
const FUSE_THREADS: usize = 4;

pub struct LocalDevices {
    engine: Arc<Engine>,
    mountpoint: PathBuf,
    session: Mutex<Option<BackgroundSession>>,
    loops: Mutex<Loops>,
    detaching: Mutex<Vec<Detaching>>,
    /// Taken when a stop is decided ([`LocalDevices::claim_for_stop`]) and
    /// held until [`LocalDevices::shutdown`] releases the loop devices under
    /// them; while set, no loop device is made.
    stop_claims: Mutex<Option<HashMap<String, Claim>>>,
    /// Signalled when an attach outside the lock ends.
    attached: Condvar,
}

#[derive(Default)]
struct Loops {
    devices: HashMap<String, LoopDevice>,
    /// Volumes whose loop device is being attached, outside the lock.
    attaching: HashSet<String>,
}

/// A loop device in use: (volume, loop device path).
pub type BusyLoop = (String, PathBuf);

/// A device detached while its loop device was in use.
struct Detaching {
    name: String,
    path: Option<PathBuf>,
    loop_path: PathBuf,
    rdev: Option<u64>,
    device: Weak<TrackedDevice>,
}

/// A detaching device, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachingDevice {
    pub name: String,
    pub path: Option<PathBuf>,
    pub loop_path: PathBuf,
}

impl Detaching {
    fn shown(&self) -> DetachingDevice {
        DetachingDevice {
            name: self.name.clone(),
            path: self.path.clone(),
            loop_path: self.loop_path.clone(),
        }
    }

    /// Still open: some handle (the loop device's) holds the device.
    fn open(&self) -> bool {
        self.device.strong_count() > 0
    }
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
            detaching: Mutex::new(Vec::new()),
            stop_claims: Mutex::new(None),
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
        if self.stop_claims.lock().unwrap().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the daemon is stopping",
            ));
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

    /// The volume's loop device, opened exclusively; `None` without one.
    pub fn claim_loop(&self, volume: &str) -> Option<Result<Claim, InUse>> {
        self.loops
            .lock()
            .unwrap()
            .devices
            .get(volume)
            .map(LoopDevice::claim)
    }

    /// Removes the volume's loop device under `claim` (from
    /// [`LocalDevices::claim_loop`]): it is gone when this returns, unless
    /// a program opened it (without `O_EXCL`) meanwhile. Returns whether
    /// there was one.
    pub fn release_loop(&self, volume: &str, claim: Claim) -> bool {
        let removed = self.loops.lock().unwrap().devices.remove(volume);
        match removed {
            Some(device) => {
                tracing::info!(volume, device = %device.path().display(), "loop device detached");
                device.release(claim);
                true
            }
            None => false,
        }
    }

    /// Removes the volume's loop device without a claim (it was just made,
    /// or is known to be unused): it goes when its last user closes it.
    /// Returns whether there was one.
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

    /// `device` left the engine, released to pass-through, while its loop
    /// device was in use: the loop device stays, marked to be cleared at
    /// its last close, and the device is listed as detaching until then.
    /// Returns the loop device's path.
    pub fn keep_detaching(&self, device: &Arc<TrackedDevice>) -> Option<PathBuf> {
        let name = device.name();
        let removed = self.loops.lock().unwrap().devices.remove(name)?;
        let loop_path = removed.path().to_path_buf();
        let rdev = removed.rdev().ok();
        self.detaching.lock().unwrap().push(Detaching {
            name: name.to_string(),
            path: device.path().map(Path::to_path_buf),
            loop_path: loop_path.clone(),
            rdev,
            device: Arc::downgrade(device),
        });
        drop(removed);
        tracing::info!(volume = name, device = %loop_path.display(), "device detaching: its loop device is in use and stays, untracked, until its last user closes it");
        Some(loop_path)
    }

    /// Detaching devices still open.
    pub fn detaching(&self) -> Vec<DetachingDevice> {
        self.detaching
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.open())
            .map(Detaching::shown)
            .collect()
    }

    /// The device objects of the detaching devices, to flush them at stop.
    pub fn detaching_devices(&self) -> Vec<Arc<TrackedDevice>> {
        self.detaching
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| d.device.upgrade())
            .collect()
    }

    /// Forgets the detaching devices whose loop device is gone (and so
    /// their origin closed). Returns them, with the device numbers of their
    /// loop devices that no loop device of ours has taken since (to stop
    /// refusing storage there).
    pub fn prune_detaching(&self) -> Vec<(DetachingDevice, Option<u64>)> {
        let mut gone = Vec::new();
        self.detaching.lock().unwrap().retain(|d| {
            if d.open() {
                return true;
            }
            gone.push((d.shown(), d.rdev));
            false
        });
        if gone.is_empty() {
            return gone;
        }
        let taken = self.loop_rdevs();
        for (d, rdev) in &mut gone {
            if rdev.is_some_and(|r| taken.contains(&r)) {
                *rdev = None;
            }
            tracing::info!(volume = d.name, device = %d.loop_path.display(), "detaching device released: its loop device is gone and its origin closed");
        }
        gone
    }

    /// The detaching device that `key` names: its name, its origin's path
    /// (as given or resolved) or its loop device's path.
    pub fn detaching_named(&self, key: &str) -> Option<DetachingDevice> {
        let path = Path::new(key);
        let resolved = key
            .starts_with('/')
            .then(|| std::fs::canonicalize(path).ok())
            .flatten();
        self.detaching
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.open())
            .find(|d| {
                d.name == key
                    || d.loop_path == path
                    || d.path
                        .as_deref()
                        .is_some_and(|p| p == path || resolved.as_deref() == Some(p))
            })
            .map(Detaching::shown)
    }

    /// Loop devices in use, as (volume, loop path): the mounted ones, and
    /// those of detaching devices.
    pub fn busy(&self) -> Vec<BusyLoop> {
        let mut busy: Vec<_> = self
            .loops
            .lock()
            .unwrap()
            .devices
            .iter()
            .filter(|(_, l)| l.in_use())
            .map(|(v, l)| (v.clone(), l.path().to_path_buf()))
            .collect();
        busy.extend(
            self.detaching()
                .into_iter()
                .map(|d| (format!("{} (detaching)", d.name), d.loop_path)),
        );
        busy
    }

    /// Decides a stop: claims every loop device, so that none can be
    /// mounted from now on, and holds the claims until
    /// [`LocalDevices::shutdown`]. Refused, with the loop devices in use,
    /// when one cannot be claimed or a device is detaching, unless `force`;
    /// a forced stop returns them. After this, no loop device is made.
    pub fn claim_for_stop(&self, force: bool) -> Result<Vec<BusyLoop>, Vec<BusyLoop>> {
        let loops = self.loops.lock().unwrap();
        let mut claims = HashMap::new();
        let mut busy = Vec::new();
        for (volume, device) in loops.devices.iter() {
            match device.claim() {
                Ok(claim) => {
                    claims.insert(volume.clone(), claim);
                }
                Err(_) => busy.push((volume.clone(), device.path().to_path_buf())),
            }
        }
        drop(loops);
        busy.extend(
            self.detaching()
                .into_iter()
                .map(|d| (format!("{} (detaching)", d.name), d.loop_path)),
        );
        if !busy.is_empty() && !force {
            return Err(busy);
        }
        *self.stop_claims.lock().unwrap() = Some(claims);
        Ok(busy)
    }

    /// Loop devices of a device and of its image.
    pub fn volumes_of_device(device: &str) -> [String; 2] {
        [device.to_string(), image_name(device)]
    }

    /// Detaches every loop device (the claimed ones at once, the others
    /// when their last user closes them) and unmounts the filesystem. The
    /// loop devices of detaching devices, and those a forced stop could not
    /// claim, are still bound to their FUSE files then; they go when their
    /// filesystem is unmounted (I/O on them fails once we are gone).
    pub fn shutdown(&self) {
        let mut claims = self.stop_claims.lock().unwrap().take().unwrap_or_default();
        let loops: Vec<_> = self.loops.lock().unwrap().devices.drain().collect();
        for (volume, device) in loops {
            match claims.remove(&volume) {
                Some(claim) => device.release(claim),
                None => drop(device),
            }
        }
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
