//! The control service: turns protocol requests into engine calls and engine
//! results into protocol replies. Owns no I/O; the control server
//! ([`crate::control`]) calls [`Service::handle`] for every request, from as
//! many connection threads as there are clients.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blksnap_engine::{
    DeviceIdentity, Engine, SectorRange, SnapshotOptions, StorageSpec, IMAGE_PREFIX,
};
use blksnap_fuse::LocalDevices;
use blksnap_proto as proto;
use proto::{ErrorReply, Request};

use crate::control::ShutdownHandle;
use serde::Serialize;
use uuid::Uuid;

/// Longest `snapshot_waitevent` timeout: a day.
const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

pub struct Service {
    engine: Arc<Engine>,
    /// The NBD server's Unix socket, for the URIs in replies.
    nbd_socket: Option<PathBuf>,
    /// The FUSE + loop frontend, when the daemon has one.
    local: Option<Arc<LocalDevices>>,
    attach_loop: bool,
    freeze_on_take: bool,
    stopper: OnceLock<ShutdownHandle>,
    forced_stop: AtomicBool,
}

fn engine_error(e: blksnap_engine::Error) -> ErrorReply {
    ErrorReply::new(e.errno(), e.to_string())
}

fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(22, message)
}

fn json(value: impl Serialize) -> Result<serde_json::Value, ErrorReply> {
    serde_json::to_value(value)
        .map_err(|e| ErrorReply::new(5, format!("cannot encode the reply: {e}")))
}

/// Paths come from clients with another working directory: only absolute
/// ones mean the same thing here.
fn absolute<'a>(path: &'a str, what: &str) -> Result<&'a Path, ErrorReply> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(invalid(format!("{what} path {path:?} must be absolute")))
    }
}

/// The device keys (name or path) a request carries, for checking and
/// resolving them.
fn device_keys(request: &mut Request) -> Vec<&mut String> {
    match request {
        Request::Detach(a) | Request::Cbtinfo(a) => vec![&mut a.device],
        Request::Readcbtmap(a) => vec![&mut a.device],
        Request::Markdirtyblock(a) => vec![&mut a.device],
        Request::SnapshotAdd(a) => vec![&mut a.device],
        Request::SnapshotInfo(a) => a.device.iter_mut().collect(),
        Request::SnapshotCreate(a) => a.devices.iter_mut().collect(),
        _ => Vec::new(),
    }
}

fn ranges(ranges: &[proto::Range]) -> Vec<SectorRange> {
    ranges
        .iter()
        .map(|r| SectorRange::new(r.start, r.count))
        .collect()
}

impl Service {
    pub fn new(engine: Arc<Engine>, nbd_socket: Option<PathBuf>) -> Self {
        Self {
            engine,
            nbd_socket,
            local: None,
            attach_loop: false,
            freeze_on_take: true,
            stopper: OnceLock::new(),
            forced_stop: AtomicBool::new(false),
        }
    }

    /// Serves volumes as local block devices too: loop devices by default
    /// on attach when `attach_loop`; filesystems on them frozen at take when
    /// `freeze_on_take`.
    pub fn with_local_devices(
        mut self,
        local: Arc<LocalDevices>,
        attach_loop: bool,
        freeze_on_take: bool,
    ) -> Self {
        self.local = Some(local);
        self.attach_loop = attach_loop;
        self.freeze_on_take = freeze_on_take;
        self
    }

    /// How the `shutdown` command stops the daemon.
    pub fn set_stopper(&self, stopper: ShutdownHandle) {
        let _ = self.stopper.set(stopper);
    }

    /// Whether the stop was forced over busy loop devices.
    pub fn forced_stop(&self) -> bool {
        self.forced_stop.load(Ordering::SeqCst)
    }

    /// Loop devices in use, as "volume (/dev/loopN)".
    pub fn busy_devices(&self) -> Vec<String> {
        self.local
            .as_ref()
            .map(|l| {
                l.busy()
                    .into_iter()
                    .map(|(v, p)| format!("{v} ({})", p.display()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn loop_path(&self, volume: &str) -> Option<String> {
        self.local
            .as_ref()?
            .loop_path(volume)
            .map(|p| p.display().to_string())
    }

    /// Gives a volume a loop device and marks it served (no storage there).
    fn add_loop(&self, volume: &str) -> Result<String, ErrorReply> {
        let local = self.local.as_ref().ok_or_else(|| {
            invalid("loop devices need the FUSE frontend: start blksnapd with --fuse-dir")
        })?;
        let path = local.attach_loop(volume).map_err(|e| {
            ErrorReply::new(
                e.raw_os_error().unwrap_or(5),
                format!("cannot create a loop device for {volume}: {e}"),
            )
        })?;
        if let Some(rdev) = local.loop_rdev(volume) {
            self.engine
                .add_served_identity(DeviceIdentity::Block { rdev });
        }
        Ok(path.display().to_string())
    }

    fn remove_loop(&self, volume: &str) {
        if let Some(local) = &self.local {
            if let Some(rdev) = local.loop_rdev(volume) {
                self.engine
                    .remove_served_identity(DeviceIdentity::Block { rdev });
            }
            local.detach_loop(volume);
        }
    }

    /// A key naming one of our loop devices means its device.
    fn resolve_key(&self, key: &mut String) -> Result<(), ErrorReply> {
        if key.contains('/') && !key.starts_with('/') {
            return Err(invalid(format!(
                "device {key:?} must be a name or an absolute path"
            )));
        }
        if let Some(local) = &self.local {
            if let Some(volume) = local.volume_of_loop(Path::new(key.as_str())) {
                if volume.starts_with(IMAGE_PREFIX) {
                    return Err(invalid(format!(
                        "{key} is a snapshot image, not a tracked device"
                    )));
                }
                *key = volume;
            }
        }
        Ok(())
    }

    fn nbd_uri(&self, export: &str) -> Option<String> {
        self.nbd_socket
            .as_deref()
            .map(|socket| blksnap_nbd::unix_uri(socket, export))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn handle(&self, mut request: Request) -> Result<serde_json::Value, ErrorReply> {
        for key in device_keys(&mut request) {
            self.resolve_key(key)?;
        }
        let e = &self.engine;
        match request {
            Request::Version => json(proto::VersionInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: proto::PROTOCOL_VERSION,
            }),
            Request::Attach(a) => {
                let path = absolute(&a.device, "device")?;
                let device = e
                    .attach_path(path, a.name.as_deref())
                    .map_err(engine_error)?;
                if a.loop_device.unwrap_or(self.attach_loop) {
                    if let Err(err) = self.add_loop(device.name()) {
                        // All or nothing: no device attached without the
                        // loop device that was asked for.
                        let _ = e.detach(device.name());
                        return Err(err);
                    }
                }
                json(self.device_info(device.name())?)
            }
            Request::Detach(a) => {
                let device = e.device(&a.device).map_err(engine_error)?;
                let name = device.name().to_string();
                if let Some(local) = &self.local {
                    if local.loop_in_use(&name) {
                        let path = self.loop_path(&name).unwrap_or_default();
                        return Err(ErrorReply::new(
                            16,
                            format!("device {name} is busy: its loop device {path} is in use (mounted?); unmount it first"),
                        ));
                    }
                }
                // The engine refuses a device in a snapshot; only a detached
                // device loses its (unused) loop device.
                e.detach(&name).map_err(engine_error)?;
                self.remove_loop(&name);
                json(proto::Empty {})
            }
            Request::Shutdown(a) => {
                let busy = self.busy_devices();
                if !busy.is_empty() && !a.force {
                    return Err(ErrorReply::new(
                        16,
                        format!(
                            "loop devices in use: {}; unmount them or use --force",
                            busy.join(", ")
                        ),
                    ));
                }
                self.forced_stop.store(a.force, Ordering::SeqCst);
                let stopper = self.stopper.get().ok_or_else(|| {
                    ErrorReply::new(95, "this daemon cannot be stopped over its socket")
                })?;
                tracing::info!(force = a.force, busy = ?busy, "stop requested over the control socket");
                stopper.shutdown();
                json(proto::Empty {})
            }
            Request::List => {
                let devices = e
                    .devices()
                    .iter()
                    .map(|d| self.device_info(d.name()))
                    .collect::<Result<_, _>>()?;
                let snapshots = e
                    .snapshot_collect()
                    .iter()
                    .filter_map(|id| self.snapshot_info(id).ok())
                    .collect();
                json(proto::ListResult { devices, snapshots })
            }
            Request::Cbtinfo(a) => {
                let i = e.cbt_info(&a.device).map_err(engine_error)?;
                json(proto::CbtInfo {
                    block_size: i.block_size,
                    device_capacity: i.device_capacity,
                    block_count: i.block_count,
                    generation_id: i.generation_id,
                    changes_number: i.changes_number,
                    current_number: i.current_number,
                })
            }
            Request::Readcbtmap(a) => {
                if a.length > proto::MAX_CBT_MAP_READ {
                    return Err(invalid(format!(
                        "readcbtmap length {} is over the maximum of {} blocks per request",
                        a.length,
                        proto::MAX_CBT_MAP_READ
                    )));
                }
                let map = e.read_cbt_map(&a.device).map_err(engine_error)?;
                let count = map.len() as u64;
                if a.offset > count {
                    return Err(invalid(format!(
                        "readcbtmap offset {} is beyond the {count} blocks of {}",
                        a.offset, a.device
                    )));
                }
                let end = a.offset.saturating_add(a.length).min(count);
                json(proto::CbtMapPart::encode(
                    a.offset,
                    count,
                    &map[a.offset as usize..end as usize],
                ))
            }
            Request::Markdirtyblock(a) => {
                e.mark_dirty(&a.device, &ranges(&a.ranges))
                    .map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotCreate(a) => json(proto::SnapshotId {
                id: self.snapshot_create(a)?,
            }),
            Request::SnapshotAdd(a) => {
                e.snapshot_add(&a.id, &a.device).map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotAppendstorage(a) => {
                let path = absolute(&a.device, "storage device")?;
                e.snapshot_append_storage(&a.id, path, &ranges(&a.ranges))
                    .map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotTake(a) => json(self.snapshot_take(&a.id)?),
            Request::SnapshotDestroy(a) => {
                let devices = e.snapshot_info(&a.id).map_err(engine_error)?.devices;
                if let Some(local) = &self.local {
                    let mounted: Vec<String> = devices
                        .iter()
                        .map(|d| format!("{IMAGE_PREFIX}{d}"))
                        .filter(|v| local.loop_in_use(v))
                        .filter_map(|v| self.loop_path(&v))
                        .collect();
                    if !mounted.is_empty() {
                        return Err(ErrorReply::new(
                            16,
                            format!(
                                "snapshot {} is busy: its image loop devices {} are in use (mounted?); unmount them first",
                                a.id,
                                mounted.join(", ")
                            ),
                        ));
                    }
                }
                for d in &devices {
                    self.remove_loop(&format!("{IMAGE_PREFIX}{d}"));
                }
                e.snapshot_destroy(&a.id).map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotCollect => json(proto::SnapshotIds {
                ids: e.snapshot_collect(),
            }),
            Request::SnapshotInfo(a) => {
                let (id, for_device) = match (a.id, a.device) {
                    (Some(id), None) => (id, None),
                    (None, Some(device)) => {
                        let name = e.device(&device).map_err(engine_error)?.name().to_string();
                        let id =
                            e.snapshot_of(&device)
                                .map_err(engine_error)?
                                .ok_or_else(|| {
                                    ErrorReply::new(2, format!("device {name} is in no snapshot"))
                                })?;
                        (id, Some(name))
                    }
                    _ => {
                        return Err(invalid(
                            "snapshot_info takes either a device or a snapshot id",
                        ))
                    }
                };
                let mut info = self.snapshot_info(&id)?;
                info.for_device = for_device;
                json(info)
            }
            Request::SnapshotWaitevent(a) => {
                if a.timeout_ms > MAX_WAIT_MS {
                    return Err(invalid(format!(
                        "timeout {} ms is over the maximum of {MAX_WAIT_MS} ms",
                        a.timeout_ms
                    )));
                }
                let event = e
                    .snapshot_wait_event(&a.id, Duration::from_millis(a.timeout_ms))
                    .map_err(engine_error)?;
                json(proto::WaitEventResult {
                    event: event.map(|ev| match ev {
                        blksnap_engine::Event::NoSpace { requested_sectors } => {
                            proto::Event::NoSpace { requested_sectors }
                        }
                        blksnap_engine::Event::Corrupted { device, errno } => {
                            proto::Event::Corrupted { device, errno }
                        }
                    }),
                })
            }
        }
    }

    fn snapshot_create(&self, a: proto::SnapshotCreateArgs) -> Result<Uuid, ErrorReply> {
        let e = &self.engine;
        let storage = match &a.storage {
            Some(path) => StorageSpec::Path(absolute(path, "difference storage")?.to_path_buf()),
            None => StorageSpec::Empty,
        };
        let options = SnapshotOptions {
            limit: a.limit,
            on_copy_error: a.on_copy_error.map(crate::config::policy),
            copy_timeout: a
                .copy_timeout_ms
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis),
        };
        let id = e.snapshot_create(storage, options).map_err(engine_error)?;
        for device in &a.devices {
            if let Err(err) = e.snapshot_add(&id, device) {
                // All or nothing: a create that names a bad device leaves no
                // half-made snapshot behind.
                let _ = e.snapshot_destroy(&id);
                return Err(engine_error(err));
            }
        }
        Ok(id)
    }

    /// Freezes filesystems on the devices' loop devices, takes, thaws, and
    /// gives each image a loop device where its device has one.
    fn snapshot_take(&self, id: &Uuid) -> Result<proto::TakeResult, ErrorReply> {
        let e = &self.engine;
        let info = e.snapshot_info(id).map_err(engine_error)?;
        let devices = &info.devices;
        let mut mounts = Vec::new();
        if let (Some(local), true) = (&self.local, self.freeze_on_take) {
            for d in devices {
                if let Some(rdev) = local.loop_rdev(d) {
                    mounts.extend(crate::freeze::mounts_on(rdev));
                }
            }
        }
        let (frozen, mut warnings) = crate::freeze::Frozen::freeze(&mounts);
        if info.storage.total == 0 && !info.storage_grows {
            warnings.push(format!(
                "snapshot {id} has no difference storage yet: the first write to one of its devices \
                 corrupts that image unless storage is appended first (snapshot_appendstorage)"
            ));
        }
        let taken = e.snapshot_take(id).map_err(engine_error);
        let frozen_mounts = frozen.mount_points();
        drop(frozen);
        taken?;
        if let Some(local) = &self.local {
            for d in devices.iter().filter(|d| local.loop_path(d).is_some()) {
                if let Err(err) = self.add_loop(&format!("{IMAGE_PREFIX}{d}")) {
                    warnings.push(err.message);
                }
            }
        }
        Ok(proto::TakeResult {
            frozen: frozen_mounts,
            warnings,
        })
    }

    fn device_info(&self, key: &str) -> Result<proto::DeviceInfo, ErrorReply> {
        let device = self.engine.device(key).map_err(engine_error)?;
        Ok(proto::DeviceInfo {
            name: device.name().to_string(),
            path: device.path().map(|p| p.display().to_string()),
            size: device.size(),
            snapshot: self.engine.snapshot_of(key).map_err(engine_error)?,
            nbd: self.nbd_uri(device.name()),
            loop_device: self.loop_path(device.name()),
        })
    }

    fn snapshot_info(&self, id: &Uuid) -> Result<proto::SnapshotInfo, ErrorReply> {
        let i = self.engine.snapshot_info(id).map_err(engine_error)?;
        Ok(proto::SnapshotInfo {
            id: i.id,
            for_device: None,
            devices: i.devices,
            taken: i.taken,
            storage: proto::StorageInfo {
                total: i.storage.total,
                used: i.storage.used,
                limit: i.storage.limit,
                extents: i.storage.extents,
            },
            images: i
                .images
                .into_iter()
                .map(|im| proto::ImageInfo {
                    image: self.loop_path(&format!("{IMAGE_PREFIX}{}", im.device)),
                    nbd: self.nbd_uri(&format!("{IMAGE_PREFIX}{}", im.device)),
                    device: im.device,
                    size: im.size,
                    chunk_size: im.chunk_size,
                    error_code: im.error_code,
                })
                .collect(),
        })
    }
}
