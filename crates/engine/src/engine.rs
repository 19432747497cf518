//! The engine ([`Engine`]): the registry of tracked devices and snapshots and
//! the control operations on them (the original tool's command set, without
//! any protocol). The daemon owns one engine; frontends get
//! [`TrackedDevice`] and [`Image`] handles from it and do I/O on them without
//! touching the registry.
//!
//! Invariants: device names are unique; a device is in at most one snapshot;
//! a device in a snapshot cannot be detached (nor released to pass-through,
//! see [`crate::tracked`]); a snapshot's device set is fixed
//! at the take; storage is never placed on a device the engine serves.
//! The registry lock is held across take and destroy (which wait for
//! in-flight writes); the write path never takes it, so this cannot deadlock.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::cbt::{CbtInfo, CbtState, ChangeJournal, ChangeTracker, GenerationReason};
use crate::config::{Config, OriginCache, SnapshotOptions};
use crate::copier::{CopierPool, COPIER_THREADS};
use crate::device::{BlockDevice, DeviceIdentity, FileDevice};
use crate::diff_storage::{
    check_file_not_served, check_not_served, DiffStorage, StorageSpec, StorageStats,
};
use crate::error::{Error, Result};
use crate::events::{Event, EventQueue};
use crate::image::Image;
use crate::snapshot::{CowSettings, DeviceSnapshot};
use crate::sync::{Mutex, MutexGuard};
use crate::tracked::{ClosedDoors, TrackedDevice};
use crate::volume::{check_device_name, default_device_name, image_device, image_name, Volume};
use crate::{SectorRange, SECTOR_SIZE};

#[derive(Debug)]
pub struct Engine {
    config: Config,
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    devices: Vec<Arc<TrackedDevice>>,
    snapshots: BTreeMap<Uuid, Snapshot>,
    /// Identities of devices the frontends expose (e.g. loop devices over
    /// our FUSE files): storage must not live there either.
    served_aliases: HashSet<DeviceIdentity>,
    /// Runs the copies of snapshots with a copy timeout; made at the first
    /// such take.
    copier: Option<Arc<CopierPool>>,
}

/// A device key as given (a name or a path) and, for a path, where it
/// resolves. Resolved before the registry lock is taken: the path may be on
/// our own FUSE mount, whose handlers need that lock.
struct DeviceKey {
    raw: String,
    canonical: Option<std::path::PathBuf>,
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

impl DeviceKey {
    fn new(key: &str) -> Self {
        Self {
            raw: key.to_string(),
            canonical: key
                .contains('/')
                .then(|| std::fs::canonicalize(key).ok())
                .flatten(),
        }
    }
}

#[derive(Debug)]
struct Snapshot {
    devices: Vec<Arc<TrackedDevice>>,
    storage: Arc<DiffStorage>,
    events: Arc<EventQueue>,
    options: SnapshotOptions,
    /// One per device, in the same order, once taken.
    device_snapshots: Vec<Arc<DeviceSnapshot>>,
}

/// What `snapshot_info` reports about one image.
/// How a device's change tracking starts at attach.
#[derive(Debug, Default)]
pub struct TrackingStart {
    /// Go on from this saved state (generation reason `restored`); the
    /// attach is refused when it does not fit the device.
    pub restore: Option<CbtState>,
    /// Without a state: the reason the new generation begins (default
    /// `attached`).
    pub reason: Option<GenerationReason>,
    /// Told of every change from the first write on.
    pub journal: Option<Arc<dyn ChangeJournal>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub device: String,
    pub size: u64,
    pub chunk_size: u64,
    /// 0 while the image is valid, else the errno that invalidated it.
    pub error_code: i32,
    /// Chunks copied to the difference storage so far.
    pub copied_chunks: u64,
    /// Of those, the ones copied wholly inside the kernel
    /// (`copy_file_range(2)`: origin and storage are files on one filesystem).
    pub kernel_copied_chunks: u64,
    /// Of those, the ones that were holes on the origin: kept without a
    /// copy where their storage slot already read as zeroes.
    pub hole_chunks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: Uuid,
    pub devices: Vec<String>,
    pub taken: bool,
    pub storage: StorageStats,
    /// Empty until the take.
    pub images: Vec<ImageInfo>,
}

impl Registry {
    /// A device by name, by the path it was attached with, or by any path
    /// that resolves to the same file (symlinks, `..`).
    fn find(&self, key: &DeviceKey) -> Result<&Arc<TrackedDevice>> {
        self.devices
            .iter()
            .find(|d| {
                d.name() == key.raw
                    || d.path().is_some_and(|p| {
                        p == Path::new(&key.raw) || key.canonical.as_deref() == Some(p)
                    })
            })
            .ok_or_else(|| Error::NotFound(format!("tracked device {}", key.raw)))
    }

    fn snapshot(&self, id: &Uuid) -> Result<&Snapshot> {
        self.snapshots
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))
    }

    fn copier(&mut self) -> Arc<CopierPool> {
        self.copier
            .get_or_insert_with(|| Arc::new(CopierPool::new(COPIER_THREADS)))
            .clone()
    }

    fn snapshot_of(&self, device: &Arc<TrackedDevice>) -> Option<(&Uuid, &Snapshot)> {
        self.snapshots
            .iter()
            .find(|(_, s)| s.devices.iter().any(|d| Arc::ptr_eq(d, device)))
    }

    /// The identities we serve, without the files behind loop devices:
    /// cheap, no I/O, so it can run under the registry lock.
    fn served_identities(&self) -> HashSet<DeviceIdentity> {
        let mut served = self.served_aliases.clone();
        served.extend(self.devices.iter().filter_map(|d| d.origin().identity()));
        served
    }
}

/// What a file open at `meta` is, as [`BlockDevice::identity`] says it.
fn identity_of(meta: &std::fs::Metadata) -> DeviceIdentity {
    use std::os::unix::fs::MetadataExt;
    if meta.file_type().is_block_device() {
        DeviceIdentity::Block { rdev: meta.rdev() }
    } else {
        DeviceIdentity::File {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Adds the backing files of served loop devices. Reads sysfs and stats
/// files that may live on our own FUSE mount, whose handlers take the
/// registry lock: never call it with the lock held.
fn with_loop_backing(mut served: HashSet<DeviceIdentity>) -> HashSet<DeviceIdentity> {
    let backing: Vec<_> = served
        .iter()
        .copied()
        .filter_map(DeviceIdentity::loop_backing_file)
        .collect();
    served.extend(backing);
    served
}

impl Engine {
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            registry: Mutex::new(Registry::default()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap()
    }

    /// Starts tracking `origin` under `name`.
    pub fn attach(&self, name: &str, origin: Arc<dyn BlockDevice>) -> Result<Arc<TrackedDevice>> {
        self.attach_inner(name, None, origin, TrackingStart::default())
    }

    /// Opens `path` (regular file or block device) exclusively and tracks it;
    /// its name is `name`, or else the path's file name.
    pub fn attach_path(&self, path: &Path, name: Option<&str>) -> Result<Arc<TrackedDevice>> {
        self.attach_path_with(path, name, TrackingStart::default())
    }

    /// Attaches by path, with change tracking starting as `start` says
    /// (a restored state, or a new generation for a reason, and a journal).
    pub fn attach_path_with(
        &self,
        path: &Path,
        name: Option<&str>,
        start: TrackingStart,
    ) -> Result<Arc<TrackedDevice>> {
        let shown = path.display().to_string();
        let key = DeviceKey::new(&shown);
        if let Ok(existing) = self.registry().find(&key) {
            return Err(Error::AlreadyExists(format!(
                "tracked device {} for {shown}",
                existing.name()
            )));
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => default_device_name(path)?,
        };
        // A device we serve (our own FUSE file or loop device) would be
        // tracked through itself.
        if let Err(Error::InvalidArgument(_)) = check_not_served(path, &self.served()) {
            return Err(Error::InvalidArgument(format!(
                "{shown} is served by this daemon; attach the original device instead"
            )));
        }
        let device = self.origin_device(FileDevice::open(path)?)?;
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.attach_inner(&name, Some(&canonical), Arc::new(device), start)
    }

    /// Attaches `file`, opened read-write (without `O_EXCL`) by the caller,
    /// who checked the right to: the daemon opens a client's path with the
    /// client's rights. The engine makes it exclusive
    /// ([`FileDevice::exclusive`]) and never resolves `path`, which is the
    /// path the file was opened at (symlinks resolved), recorded as the
    /// device's. Its name is `name`, or else the path's file name.
    pub fn attach_file_with(
        &self,
        file: std::fs::File,
        path: &Path,
        name: Option<&str>,
        start: TrackingStart,
    ) -> Result<Arc<TrackedDevice>> {
        let shown = path.display().to_string();
        let name = match name {
            Some(n) => n.to_string(),
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| Error::InvalidArgument(format!("{shown} has no file name")))?,
        };
        // As attach_path_with: the same path is EEXIST; the same file under
        // another path (a hard link) is served, so EINVAL, below.
        if let Some(existing) = self
            .registry()
            .devices
            .iter()
            .find(|d| d.path() == Some(path))
        {
            return Err(Error::AlreadyExists(format!(
                "tracked device {} for {shown}",
                existing.name()
            )));
        }
        if let Err(Error::InvalidArgument(_)) = check_file_not_served(&file, path, &self.served()) {
            return Err(Error::InvalidArgument(format!(
                "{shown} is served by this daemon; attach the original device instead"
            )));
        }
        let device = self.origin_device(FileDevice::exclusive(file, path)?)?;
        self.attach_inner(&name, Some(path), Arc::new(device), start)
    }

    /// An origin opened from a path or file, with the page cache mode of
    /// the configuration (`origin_cache`).
    fn origin_device(&self, device: FileDevice) -> Result<FileDevice> {
        match self.config.origin_cache {
            OriginCache::Writeback => Ok(device),
            OriginCache::None => device.bypass_page_cache(),
        }
    }

    fn attach_inner(
        &self,
        name: &str,
        path: Option<&Path>,
        origin: Arc<dyn BlockDevice>,
        start: TrackingStart,
    ) -> Result<Arc<TrackedDevice>> {
        check_device_name(name)?;
        if origin.size() == 0 {
            return Err(Error::InvalidArgument(format!(
                "device {name} is empty (0 bytes)"
            )));
        }
        let mut registry = self.registry();
        if let Some(existing) = registry.devices.iter().find(|d| d.name() == name) {
            return Err(Error::AlreadyExists(format!(
                "a tracked device named {name} ({})",
                existing
                    .path()
                    .map_or("in memory".into(), |p| p.display().to_string())
            )));
        }
        if let Some(identity) = origin.identity() {
            if let Some(existing) = registry
                .devices
                .iter()
                .find(|d| d.origin().identity() == Some(identity))
            {
                return Err(Error::AlreadyExists(format!(
                    "the device is already attached as {}",
                    existing.name()
                )));
            }
        }
        let cbt = match start.restore {
            Some(state) => {
                ChangeTracker::restore(origin.size(), &self.config, state).map_err(|why| {
                    Error::InvalidArgument(format!(
                        "the saved change tracking state of {name} does not fit: {why}"
                    ))
                })?
            }
            None => ChangeTracker::new(
                origin.size(),
                &self.config,
                start.reason.unwrap_or(GenerationReason::Attached),
            ),
        }
        .with_journal(start.journal);
        let device = Arc::new(TrackedDevice::new(
            name.to_string(),
            path.map(Path::to_path_buf),
            origin,
            cbt,
        ));
        registry.devices.push(device.clone());
        tracing::info!(device = name, size = device.size(), "attached");
        Ok(device)
    }

    /// Stops tracking; refused while the device is in a snapshot.
    /// Returns the device, whose writes have drained, so that its final
    /// tracking state can be saved.
    pub fn detach(&self, key: &str) -> Result<Arc<TrackedDevice>> {
        self.detach_as(key, false)
    }

    /// Stops tracking, as [`Engine::detach`], but the handles still held
    /// (a loop device that is still mounted) go on reading and writing the
    /// origin, untracked; the origin closes with the last of them. Refused,
    /// as a detach, while the device is in a snapshot.
    pub fn detach_to_pass_through(&self, key: &str) -> Result<Arc<TrackedDevice>> {
        self.detach_as(key, true)
    }

    fn detach_as(&self, key: &str, pass_through: bool) -> Result<Arc<TrackedDevice>> {
        let key = DeviceKey::new(key);
        let mut registry = self.registry();
        let device = registry.find(&key)?.clone();
        if let Some((id, _)) = registry.snapshot_of(&device) {
            return Err(Error::Busy {
                what: format!("device {}", device.name()),
                why: format!("it is in snapshot {id}; destroy the snapshot first"),
            });
        }
        registry.devices.retain(|d| !Arc::ptr_eq(d, &device));
        drop(registry);
        if pass_through {
            device.mark_pass_through();
        } else {
            device.mark_detached();
        }
        device.flush()?;
        tracing::info!(device = device.name(), pass_through, "detached");
        Ok(device)
    }

    pub fn device(&self, key: &str) -> Result<Arc<TrackedDevice>> {
        let key = DeviceKey::new(key);
        self.registry().find(&key).cloned()
    }

    pub fn devices(&self) -> Vec<Arc<TrackedDevice>> {
        self.registry().devices.clone()
    }

    /// Everything we serve, loop backing files included. Takes the registry
    /// lock only to copy the identities.
    fn served(&self) -> HashSet<DeviceIdentity> {
        let identities = self.registry().served_identities();
        with_loop_backing(identities)
    }

    /// Registers another identity under which the frontends serve a device,
    /// so storage is refused there too.
    pub fn add_served_identity(&self, identity: DeviceIdentity) {
        self.registry().served_aliases.insert(identity);
    }

    pub fn remove_served_identity(&self, identity: DeviceIdentity) {
        self.registry().served_aliases.remove(&identity);
    }

    pub fn cbt_info(&self, key: &str) -> Result<CbtInfo> {
        Ok(self.device(key)?.change_tracker().info())
    }

    pub fn read_cbt_map(&self, key: &str) -> Result<Vec<u8>> {
        Ok(self.device(key)?.change_tracker().readable_map())
    }

    /// Runs `f` on the device's whole tracking state with its writes held,
    /// so that no write changes the maps between the copy and what `f`
    /// makes of it (the daemon writes it to its state dir).
    pub fn with_cbt_state<T>(&self, key: &str, f: impl FnOnce(CbtState) -> T) -> Result<T> {
        let device = self.device(key)?;
        let _held = device.hold_writes();
        Ok(f(device.change_tracker().state()))
    }

    /// For a stop: every device stops taking requests (in-flight writes
    /// drain) and leaves the engine; returned so their final states can be
    /// saved. Snapshots go with them.
    pub fn close_all(&self) -> Vec<Arc<TrackedDevice>> {
        let mut registry = self.registry();
        let ids: Vec<Uuid> = registry.snapshots.keys().copied().collect();
        drop(registry);
        for id in ids {
            let _ = self.snapshot_destroy(&id);
        }
        registry = self.registry();
        let devices = std::mem::take(&mut registry.devices);
        drop(registry);
        for device in &devices {
            device.mark_detached();
        }
        devices
    }

    /// Marks sector ranges changed, so the next incremental backup includes
    /// them: in the live map, and at once in the readable map at the last
    /// take's change number, as the original does, so that a backup made
    /// from the snapshot held now includes them too.
    pub fn mark_dirty(&self, key: &str, ranges: &[SectorRange]) -> Result<()> {
        let device = self.device(key)?;
        for r in ranges {
            let offset = r.start.checked_mul(SECTOR_SIZE);
            let len = r.count.checked_mul(SECTOR_SIZE);
            match (offset, len) {
                (Some(o), Some(l)) => device.check_range(o, l)?,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "sector range {}:{} overflows",
                        r.start, r.count
                    )))
                }
            }
        }
        for r in ranges {
            device.mark_live_and_readable(r.byte_offset(), r.byte_len());
        }
        Ok(())
    }

    /// Creates an empty snapshot with its difference storage.
    pub fn snapshot_create(&self, storage: StorageSpec, options: SnapshotOptions) -> Result<Uuid> {
        if options.limit == Some(0) {
            return Err(Error::InvalidArgument(
                "difference storage limit must be positive".into(),
            ));
        }
        if let StorageSpec::File { file, path } = &storage {
            let meta = file
                .metadata()
                .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
            if meta.file_type().is_block_device() {
                if let Some(other) = self.storage_holder(identity_of(&meta)) {
                    return Err(Error::Busy {
                        what: format!("storage device {}", path.display()),
                        why: format!("it is difference storage of snapshot {other}"),
                    });
                }
            }
        }
        let id = Uuid::new_v4();
        let served = self.served();
        let events = Arc::new(EventQueue::default());
        // Made without the registry lock: opening storage is file I/O.
        let storage = Arc::new(DiffStorage::new(
            id.to_string(),
            &storage,
            options.limit,
            self.config.diff_storage_minimum,
            &served,
            events.clone(),
        )?);
        // Grown from now on, in the background: the first copies after the
        // take would otherwise wait for the first fallocate.
        storage.grow_ahead();
        self.registry().snapshots.insert(
            id,
            Snapshot {
                devices: Vec::new(),
                storage,
                events,
                options,
                device_snapshots: Vec::new(),
            },
        );
        tracing::info!(snapshot = %id, "snapshot created");
        Ok(id)
    }

    pub fn snapshot_add(&self, id: &Uuid, key: &str) -> Result<()> {
        let key = DeviceKey::new(key);
        let mut registry = self.registry();
        let device = registry.find(&key)?.clone();
        registry.snapshot(id)?;
        if let Some((other, _)) = registry.snapshot_of(&device) {
            return Err(if other == id {
                Error::AlreadyExists(format!("device {} in snapshot {id}", device.name()))
            } else {
                Error::Busy {
                    what: format!("device {}", device.name()),
                    why: format!("it is already in snapshot {other}"),
                }
            });
        }
        let snapshot = registry.snapshots.get_mut(id).expect("checked above");
        if !snapshot.device_snapshots.is_empty() {
            return Err(Error::WrongState(format!(
                "snapshot {id} is already taken; devices cannot be added"
            )));
        }
        snapshot.devices.push(device);
        Ok(())
    }

    /// Appends sector ranges of a block device or file (opened shared: it may
    /// be mounted) to the snapshot's storage; usable at once, also after the
    /// take.
    pub fn snapshot_append_storage(
        &self,
        id: &Uuid,
        path: &Path,
        ranges: &[SectorRange],
    ) -> Result<()> {
        self.storage_of(id)?;
        check_not_served(path, &self.served())?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open storage {}", path.display()), e))?;
        self.snapshot_append_storage_file(id, file, path, ranges)
    }

    /// Appends sector ranges of `file`, opened read-write (without
    /// `O_EXCL`) by the caller, who checked the right to; `path` names it
    /// in messages only. A block device is held exclusively: the one this
    /// snapshot's storage holds already is used again, one that another
    /// snapshot or program holds is refused (busy). A regular file is used
    /// as it is (its ranges are the caller's to give).
    pub fn snapshot_append_storage_file(
        &self,
        id: &Uuid,
        file: std::fs::File,
        path: &Path,
        ranges: &[SectorRange],
    ) -> Result<()> {
        let (storage, min_len) = self.storage_of(id)?;
        let shown = path.display().to_string();
        check_file_not_served(&file, path, &self.served())?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {shown}"), e))?;
        let device: Arc<dyn BlockDevice> = if meta.file_type().is_block_device() {
            let identity = identity_of(&meta);
            match storage.held_block_device(identity) {
                Some(held) => held,
                None => {
                    if let Some(other) = self.storage_holder(identity) {
                        return Err(Error::Busy {
                            what: format!("storage device {shown}"),
                            why: format!(
                                "it is difference storage of snapshot {other}; a block device is storage of one snapshot at a time"
                            ),
                        });
                    }
                    Arc::new(FileDevice::exclusive(file, path)?)
                }
            }
        } else {
            Arc::new(FileDevice::from_file(file, path)?)
        };
        storage.append_ranges(device, ranges, min_len)
    }

    /// The snapshot whose storage holds the block device `identity`.
    fn storage_holder(&self, identity: DeviceIdentity) -> Option<Uuid> {
        self.registry()
            .snapshots
            .iter()
            .find(|(_, s)| s.storage.held_block_device(identity).is_some())
            .map(|(id, _)| *id)
    }

    /// Appends ranges of a device object (tests, benchmarks).
    pub fn snapshot_append_storage_device(
        &self,
        id: &Uuid,
        device: Arc<dyn BlockDevice>,
        ranges: &[SectorRange],
    ) -> Result<()> {
        let (storage, min_len) = self.storage_of(id)?;
        storage.append_ranges(device, ranges, min_len)
    }

    /// A snapshot's storage and its chunk size (the largest of its devices'),
    /// the least an appended range must hold.
    fn storage_of(&self, id: &Uuid) -> Result<(Arc<DiffStorage>, u64)> {
        let registry = self.registry();
        let snapshot = registry.snapshot(id)?;
        Ok((snapshot.storage.clone(), self.chunk_size_of(snapshot)))
    }

    fn chunk_shift_of(&self, device: &TrackedDevice) -> u32 {
        self.config.chunk_shift(device.size(), device.min_io_size())
    }

    /// The largest chunk of a snapshot's devices; the smallest chunk the
    /// configuration allows while it has none.
    fn chunk_size_of(&self, snapshot: &Snapshot) -> u64 {
        let shift = snapshot
            .devices
            .iter()
            .map(|d| self.chunk_shift_of(d))
            .max()
            .unwrap_or(self.config.chunk_minimum_shift);
        1 << shift
    }

    /// Takes the snapshot atomically over all its devices: holds new writes on
    /// every device and drains in-flight ones, switches CBT and turns
    /// copy-on-write on for all of them, then lets writes resume. Refused
    /// when the storage can neither hold one chunk nor grow: the first write
    /// would corrupt the image.
    pub fn snapshot_take(&self, id: &Uuid) -> Result<()> {
        // With every door open and without the registry lock: a storage
        // still making its first room (grown from the create on) is waited
        // for here, not by the first writes after the take.
        if let Ok((storage, chunk)) = self.storage_of(id) {
            storage.wait_for_room(chunk);
        }
        let mut registry = self.registry();
        let snapshot = registry.snapshot(id)?;
        if !snapshot.device_snapshots.is_empty() {
            return Err(Error::WrongState(format!("snapshot {id} is already taken")));
        }
        if snapshot.devices.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} has no devices; add one first"
            )));
        }
        let chunk = self.chunk_size_of(snapshot);
        if !snapshot.storage.can_hold(chunk) {
            return Err(Error::NoSpace {
                snapshot: id.to_string(),
                detail: format!(
                    "it can neither hold one chunk of {chunk} bytes nor grow; \
                     append storage first (snapshot_appendstorage, ranges of at least {} sectors)",
                    chunk / SECTOR_SIZE
                ),
            });
        }
        let options = snapshot.options.clone();
        let copy_timeout = options.copy_timeout.or(self.config.copy_timeout);
        let copier = copy_timeout.map(|_| registry.copier());
        let snapshot = registry.snapshot(id)?;
        let device_snapshots: Vec<Arc<DeviceSnapshot>> = snapshot
            .devices
            .iter()
            .map(|d| {
                let settings = CowSettings {
                    chunk_shift: self.chunk_shift_of(d),
                    policy: options.on_copy_error.unwrap_or(self.config.on_copy_error),
                    copy_timeout,
                    storage_wait: options.storage_wait.unwrap_or(self.config.storage_wait),
                    copier: copier.clone(),
                };
                Arc::new(DeviceSnapshot::new(
                    d.name().to_string(),
                    d.origin().clone(),
                    settings,
                    snapshot.storage.clone(),
                    snapshot.events.clone(),
                ))
            })
            .collect();
        let doors = ClosedDoors::close(snapshot.devices.iter().map(|d| &**d));
        let mut held: Vec<_> = snapshot.devices.iter().map(|d| d.hold_writes()).collect();
        let mut resets = Vec::new();
        for ((gate, device), taken) in held
            .iter_mut()
            .zip(&snapshot.devices)
            .zip(&device_snapshots)
        {
            let tracker = device.change_tracker();
            let before = tracker.info();
            tracker.switch();
            let after = tracker.info();
            // The take from which a consumer must make its full backup of a
            // generation that replaced an earlier one (not a first attach)
            // tells the watcher why: the wrap's own take, or the first take
            // of a generation begun at attach (a crash, a change while
            // detached, ...), restarts in between or not.
            let wrapped = after.generation_id != before.generation_id;
            let first_of_attach = before.changes_number == 0
                && !matches!(
                    before.generation_began,
                    GenerationReason::Attached | GenerationReason::Wrap
                );
            if wrapped || first_of_attach {
                resets.push(Event::CbtReset {
                    device: device.name().to_string(),
                    reason: after.generation_began,
                });
            }
            **gate = Some(taken.clone());
        }
        drop(held);
        drop(doors);
        for event in resets {
            snapshot.events.push(event);
        }
        registry
            .snapshots
            .get_mut(id)
            .expect("checked above")
            .device_snapshots = device_snapshots;
        tracing::info!(snapshot = %id, "snapshot taken");
        Ok(())
    }

    /// Removes the images and releases the storage (once the last reader of
    /// an image is done); tracking continues. The images are marked
    /// destroyed before the devices' writes are let go uncopied, so no
    /// image read can return data written after the take; then the storage
    /// is closed (writes in flight finish, copies waiting for room give up,
    /// nothing writes into it afterwards), and only then are the origin
    /// writes in flight drained, which no copy can hold up any more.
    pub fn snapshot_destroy(&self, id: &Uuid) -> Result<()> {
        let mut registry = self.registry();
        let snapshot = registry
            .snapshots
            .remove(id)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))?;
        for taken in &snapshot.device_snapshots {
            taken.mark_destroyed();
        }
        snapshot.storage.close();
        let doors = ClosedDoors::close(snapshot.devices.iter().map(|d| &**d));
        let held: Vec<_> = snapshot.devices.iter().map(|d| d.hold_writes()).collect();
        for mut gate in held {
            *gate = None;
        }
        drop(doors);
        snapshot.events.close();
        tracing::info!(snapshot = %id, "snapshot destroyed");
        Ok(())
    }

    /// Every snapshot's id.
    pub fn snapshot_collect(&self) -> Vec<Uuid> {
        self.registry().snapshots.keys().copied().collect()
    }

    /// Waits until the snapshot's difference storage has no growth in
    /// flight (growth runs in the background, ahead of need), so that its
    /// stats are those of a settled storage: for tests and benchmarks.
    pub fn snapshot_wait_storage_growth(&self, id: &Uuid) -> Result<()> {
        // Not under the registry lock: a growth may take a while.
        let (storage, _) = self.storage_of(id)?;
        storage.wait_growth();
        Ok(())
    }

    pub fn snapshot_info(&self, id: &Uuid) -> Result<SnapshotInfo> {
        let registry = self.registry();
        let snapshot = registry.snapshot(id)?;
        Ok(SnapshotInfo {
            id: *id,
            devices: snapshot
                .devices
                .iter()
                .map(|d| d.name().to_string())
                .collect(),
            taken: !snapshot.device_snapshots.is_empty(),
            storage: snapshot.storage.stats(),
            images: snapshot
                .devices
                .iter()
                .zip(&snapshot.device_snapshots)
                .map(|(d, i)| {
                    let (copied_chunks, kernel_copied_chunks, hole_chunks) = i.copy_counts();
                    ImageInfo {
                        device: d.name().to_string(),
                        size: i.size(),
                        chunk_size: i.chunk_size(),
                        error_code: i.error_code(),
                        copied_chunks,
                        kernel_copied_chunks,
                        hole_chunks,
                    }
                })
                .collect(),
        })
    }

    /// The snapshot a device is in, if any.
    pub fn snapshot_of(&self, key: &str) -> Result<Option<Uuid>> {
        let key = DeviceKey::new(key);
        let registry = self.registry();
        let device = registry.find(&key)?;
        Ok(registry.snapshot_of(device).map(|(id, _)| *id))
    }

    /// The image of a device in its taken snapshot.
    pub fn image(&self, key: &str) -> Result<Image> {
        let key = DeviceKey::new(key);
        let registry = self.registry();
        let device = registry.find(&key)?;
        let (id, snapshot) = registry.snapshot_of(device).ok_or_else(|| {
            Error::NotFound(format!(
                "snapshot image of {key} (the device is in no snapshot)"
            ))
        })?;
        let index = snapshot
            .devices
            .iter()
            .position(|d| Arc::ptr_eq(d, device))
            .expect("snapshot_of found it");
        let device_snapshot = snapshot.device_snapshots.get(index).ok_or_else(|| {
            Error::WrongState(format!(
                "snapshot {id} is not taken yet; it has no image of {key}"
            ))
        })?;
        Ok(Image {
            device: device.clone(),
            device_snapshot: device_snapshot.clone(),
        })
    }

    /// The volume called `name`, if it exists now.
    pub fn volume(&self, name: &str) -> Option<Volume> {
        if let Some(device) = image_device(name) {
            let image = self.image(device).ok()?;
            return (image.device_name() == device).then_some(Volume::Image(image));
        }
        let device = self.device(name).ok()?;
        (device.name() == name).then_some(Volume::Device(device))
    }

    /// Every volume's name: each device, then its image when taken.
    pub fn volume_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for device in self.devices() {
            names.push(device.name().to_string());
            if self.image(device.name()).is_ok() {
                names.push(image_name(device.name()));
            }
        }
        names
    }

    /// The next event of a snapshot, waiting up to `timeout`; `None` when none
    /// came in time.
    pub fn snapshot_wait_event(&self, id: &Uuid, timeout: Duration) -> Result<Option<Event>> {
        Ok(self
            .snapshot_wait_event_timed(id, timeout)?
            .map(|(_, event)| event))
    }

    /// As [`Self::snapshot_wait_event`], with the time the event happened:
    /// CLOCK_MONOTONIC in nanoseconds ([`crate::monotonic_ns`]).
    pub fn snapshot_wait_event_timed(
        &self,
        id: &Uuid,
        timeout: Duration,
    ) -> Result<Option<(i64, Event)>> {
        let events = self.registry().snapshot(id)?.events.clone();
        events
            .wait_timed(timeout)
            .map_err(|()| Error::NotFound(format!("snapshot {id} (destroyed while waiting)")))
    }

    /// Bytes of memory held for change maps and chunk state.
    pub fn footprint(&self) -> usize {
        let registry = self.registry();
        let cbt: usize = registry
            .devices
            .iter()
            .map(|d| 2 * d.change_tracker().block_count() as usize)
            .sum();
        let chunks: usize = registry
            .snapshots
            .values()
            .flat_map(|s| s.device_snapshots.iter())
            .map(|i| i.footprint())
            .sum();
        cbt + chunks
    }
}
