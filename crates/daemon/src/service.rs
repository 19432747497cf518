//! The control service: turns protocol requests into engine calls and engine
//! results into protocol replies, one method per request. Owns no I/O; the
//! control server ([`crate::control`]) calls [`Service::handle`] for every
//! request, from as many connection threads as there are clients. Engine
//! results and errors reach the wire through the `From` impls of
//! `blksnap_proto` (its `engine` feature); only the replies that name our
//! frontends (loop devices, NBD URIs) are built here.
//!
//! Loop devices: a detach, destroy or stop decides that a loop device is
//! free and releases it in one step, under an exclusive open of it
//! ([`blksnap_fuse::Claim`]); anything but a successful claim counts as in
//! use. A detach whose loop device is in use does what the original tool's
//! does for a mounted device: tracking stops at once (maps saved, device out
//! of the engine, so no snapshot can include it), and the loop device goes
//! on serving the origin, untracked, until its last user closes it; the
//! device is *detaching* until then (listed, and its name and path refused
//! to `attach`). A destroy whose image loop device is in use does what the
//! original does for a mounted image: the snapshot goes at once, and the
//! loop device stays, failing every I/O, until its last user closes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blksnap_engine::volume::{image_device, image_name};
use blksnap_engine::{DeviceIdentity, Engine, SectorRange, SnapshotOptions, StorageSpec};
use blksnap_fuse::LocalDevices;

use crate::rights::{self, Client};
use crate::state::Persistence;
use blksnap_proto as proto;
use proto::{ErrorReply, Request};

use serde::Serialize;
use uuid::Uuid;

/// Longest `snapshot_waitevent` timeout: a day.
const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

/// What the `shutdown` command calls to stop the daemon.
pub type Stopper = Box<dyn Fn() + Send + Sync>;

type Reply<T> = Result<T, ErrorReply>;

pub struct Service {
    engine: Arc<Engine>,
    /// The NBD server's Unix socket, for the URIs in replies.
    nbd_socket: Option<PathBuf>,
    /// The FUSE + loop frontend, when the daemon has one.
    local: Option<Arc<LocalDevices>>,
    attach_loop: bool,
    freeze_on_take: bool,
    /// Every freeze of a take, for its deadline and the stop to end.
    freezer: crate::freeze::Freezer,
    stopper: OnceLock<Stopper>,
    forced_stop: AtomicBool,
    /// What a forced stop found in use.
    forced_busy: std::sync::Mutex<Vec<String>>,
    /// The state dir, when the daemon persists tracking.
    persistence: Option<Arc<Persistence>>,
}

fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(libc::EINVAL, message)
}

fn busy(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(libc::EBUSY, message)
}

fn json(value: impl Serialize) -> Reply<serde_json::Value> {
    serde_json::to_value(value)
        .map_err(|e| ErrorReply::new(libc::EIO, format!("cannot encode the reply: {e}")))
}

/// Paths come from clients with another working directory: only absolute
/// ones mean the same thing here.
fn absolute<'a>(path: &'a str, what: &str) -> Reply<&'a Path> {
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
            freezer: crate::freeze::Freezer::new(Some(Duration::from_millis(
                crate::config::DEFAULT_FREEZE_TIMEOUT_MS,
            ))),
            stopper: OnceLock::new(),
            forced_stop: AtomicBool::new(false),
            forced_busy: std::sync::Mutex::new(Vec::new()),
            persistence: None,
        }
    }

    /// Records attached devices and their change maps in the state dir.
    pub fn with_persistence(mut self, persistence: Arc<Persistence>) -> Self {
        self.persistence = Some(persistence);
        self
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

    /// The longest a take keeps filesystems frozen (`None`: until the take
    /// ends, however long).
    pub fn with_freeze_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.freezer = crate::freeze::Freezer::new(timeout);
        self
    }

    /// The stop begins: what a take froze is thawed now (in the
    /// background), and nothing is frozen any more.
    pub fn begin_stop(&self) {
        self.freezer.begin_stop();
    }

    /// Before the daemon exits: waits until nothing of ours is frozen.
    pub fn wait_thawed(&self) {
        self.freezer.wait_thawed();
    }

    /// How the `shutdown` command stops the daemon (the control server's
    /// stop, given once it exists).
    pub fn set_stopper(&self, stopper: impl Fn() + Send + Sync + 'static) {
        let _ = self.stopper.set(Box::new(stopper));
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

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Answers one request of a control connection; the snapshots it
    /// creates with `auto_destroy` are added to `owned`, which the
    /// connection hands to [`Service::destroy_owned`] when it closes.
    pub fn handle_owned(
        &self,
        client: &Client,
        request: Request,
        owned: &mut Vec<Uuid>,
    ) -> Reply<serde_json::Value> {
        let auto_destroy = matches!(&request, Request::SnapshotCreate(a) if a.auto_destroy);
        let reply = self.handle(client, request)?;
        if auto_destroy {
            if let Some(id) = reply
                .get("id")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
            {
                owned.push(id);
            }
        }
        Ok(reply)
    }

    /// Whether one of these snapshots still exists.
    pub fn any_alive(&self, ids: &[Uuid]) -> bool {
        ids.iter().any(|id| self.engine.snapshot_info(id).is_ok())
    }

    /// The connection that created these snapshots closed: they go too
    /// (the ones already destroyed are skipped).
    pub fn destroy_owned(&self, owned: &[Uuid]) {
        for id in owned {
            if self.engine.snapshot_info(id).is_err() {
                continue;
            }
            match self.snapshot_destroy(id) {
                Ok(_) => {
                    tracing::info!(snapshot = %id, "snapshot destroyed with the connection that owned it")
                }
                Err(e) => {
                    tracing::error!(snapshot = %id, error = %e.message, "cannot destroy the snapshot of a closed connection")
                }
            }
        }
    }

    /// Answers one request of `client`, whose rights open the paths it
    /// names ([`crate::rights`]).
    pub fn handle(&self, client: &Client, mut request: Request) -> Reply<serde_json::Value> {
        self.prune_detaching();
        for key in device_keys(&mut request) {
            self.resolve_key(key)?;
            self.check_not_detaching(key)?;
        }
        match request {
            Request::Version => json(self.version()),
            Request::Attach(a) => json(self.attach(client, a)?),
            Request::Detach(a) => json(self.detach(&a.device)?),
            Request::Shutdown(a) => json(self.shutdown(a.force)?),
            Request::List => json(self.list()?),
            Request::Cbtinfo(a) => json(self.cbtinfo(&a.device)?),
            Request::Readcbtmap(a) => json(self.readcbtmap(a)?),
            Request::Markdirtyblock(a) => json(self.markdirtyblock(a)?),
            Request::SnapshotCreate(a) => json(self.snapshot_create(client, a)?),
            Request::SnapshotAdd(a) => json(self.snapshot_add(client, a)?),
            Request::SnapshotAppendstorage(a) => json(self.snapshot_appendstorage(client, a)?),
            Request::SnapshotTake(a) => json(self.snapshot_take(&a.id)?),
            Request::SnapshotDestroy(a) => json(self.snapshot_destroy(&a.id)?),
            Request::SnapshotCollect => json(self.snapshot_collect()),
            Request::SnapshotInfo(a) => json(self.snapshot_info_request(a)?),
            Request::SnapshotWaitevent(a) => json(self.snapshot_waitevent(a)?),
        }
    }

    // ---- one method per request ----

    fn version(&self) -> proto::VersionInfo {
        proto::VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: proto::PROTOCOL_VERSION,
        }
    }

    fn attach(&self, client: &Client, a: proto::AttachArgs) -> Reply<proto::DeviceInfo> {
        let path = absolute(&a.device, "device")?;
        let want_loop = a.loop_device.unwrap_or(self.attach_loop);
        // Opened first, with the client's rights: an attach that finds the
        // device attached already still needs them.
        let file = rights::open_rw(client, path, "device")?;
        if let Some(info) = self.attached_as_asked(&a)? {
            return Ok(info);
        }
        match self.attach_device(
            file,
            path,
            a.name.as_deref(),
            want_loop,
            a.cbt_persistence,
            false,
        ) {
            Ok(name) => self.device_info(&name),
            // A concurrent attach of the same path came first.
            Err(e) if e.errno == libc::EEXIST => self.attached_as_asked(&a)?.ok_or(e),
            Err(e) => Err(e),
        }
    }

    /// With `exist_ok`: the device attached from `a.device` (by its path,
    /// symlinks resolved), when it is what `a` asks for (the name, if
    /// given; a loop device, if asked for), marked `already_attached`.
    fn attached_as_asked(&self, a: &proto::AttachArgs) -> Reply<Option<proto::DeviceInfo>> {
        if !a.exist_ok {
            return Ok(None);
        }
        let Ok(device) = self.engine.device(&a.device) else {
            return Ok(None);
        };
        let Ok(mut info) = self.device_info(device.name()) else {
            return Ok(None); // detached meanwhile
        };
        let as_asked = a.name.as_deref().is_none_or(|n| n == info.name)
            && (a.loop_device != Some(true) || info.loop_device.is_some());
        info.already_attached = true;
        Ok(as_asked.then_some(info))
    }

    /// Attaches `file`, open at `path` (with its loop device when
    /// `want_loop`), starting its tracking from the state dir's record when
    /// there is one; at start (`restoring`) a recorded device that is gone
    /// or another one is not attached. All or nothing. Returns the device's
    /// name.
    fn attach_device(
        &self,
        file: std::fs::File,
        path: &Path,
        name: Option<&str>,
        want_loop: bool,
        mode: Option<proto::CbtPersistence>,
        restoring: bool,
    ) -> Reply<String> {
        self.check_attach_not_detaching(path, name)?;
        let name = match name {
            Some(n) => {
                blksnap_engine::volume::check_device_name(n)?;
                n.to_string()
            }
            None => blksnap_engine::volume::default_device_name(path)?,
        };
        // Recorded as the device's path: where the file is, not where a
        // symlink named may point by now.
        let path = &rights::opened_path(&file, path);
        let Some(persistence) = &self.persistence else {
            let device =
                self.engine
                    .attach_file_with(file, path, Some(&name), Default::default())?;
            self.finish_attach(device.name(), want_loop)?;
            return Ok(device.name().to_string());
        };
        let mut prepared = persistence
            .prepare(path, &name, mode, restoring)
            .map_err(|why| ErrorReply::new(libc::ENODEV, format!("{name}: {why}")))?;
        let start = std::mem::take(&mut prepared.start);
        let restoring_state = start.restore.is_some();
        // A second try needs the file again: the first attach consumed it.
        let spare = if restoring_state {
            file.try_clone().ok()
        } else {
            None
        };
        let device = match self.engine.attach_file_with(file, path, Some(&name), start) {
            Err(blksnap_engine::Error::InvalidArgument(why)) if restoring_state => {
                tracing::error!(device = %name, %why, "saved change maps refused (record-corrupt)");
                let file = spare.ok_or_else(|| {
                    ErrorReply::new(libc::EIO, format!("cannot open {} again", path.display()))
                })?;
                self.engine
                    .attach_file_with(file, path, Some(&name), prepared.corrupt_start())?
            }
            other => other?,
        };
        self.finish_attach(device.name(), want_loop)?;
        if let Err(why) = persistence.attached(prepared, &self.engine, &device, want_loop) {
            self.remove_loop(device.name());
            let _ = self.engine.detach(device.name());
            return Err(ErrorReply::new(libc::EIO, why));
        }
        Ok(name)
    }

    /// The loop device asked for, or no attach at all.
    fn finish_attach(&self, name: &str, want_loop: bool) -> Reply<()> {
        if want_loop {
            if let Err(err) = self.add_loop(name) {
                // All or nothing: no device attached without the loop device
                // that was asked for.
                let _ = self.engine.detach(name);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Attaches every device the state dir records, before any client can
    /// connect; the ones that cannot be are listed as missing.
    pub fn restore_devices(&self) {
        let Some(persistence) = &self.persistence else {
            return;
        };
        for (name, path, want_loop) in persistence.recorded_devices() {
            // As root: the client that attached it had the right to.
            let attached = rights::open_recorded(&path).and_then(|file| {
                self.attach_device(file, &path, Some(&name), want_loop, None, true)
            });
            match attached {
                Ok(_) => tracing::info!(device = %name, path = %path.display(), "re-attached"),
                Err(e) => {
                    tracing::error!(device = %name, path = %path.display(), error = %e.message, "not re-attached");
                    persistence.report_missing(&name, &path, &e.message);
                }
            }
        }
    }

    /// At stop, after the frontends: every device stops and its change maps
    /// are saved.
    pub fn save_all(&self) {
        let devices = self.engine.close_all();
        if let Some(persistence) = &self.persistence {
            for device in devices {
                persistence.save(&device, true);
            }
        }
    }

    fn detach(&self, key: &str) -> Reply<proto::DetachResult> {
        let name = match self.engine.device(key) {
            Ok(device) => device.name().to_string(),
            Err(e) => {
                let forgot = self
                    .persistence
                    .as_ref()
                    .is_some_and(|p| p.forget_missing(key));
                return if forgot {
                    Ok(proto::DetachResult::default())
                } else {
                    Err(e.into())
                };
            }
        };
        // Decided and done under the claim: nothing mounts the loop device
        // between the check and its release.
        let claim = match self.local.as_ref().and_then(|l| l.claim_loop(&name)) {
            Some(Err(in_use)) => return self.detach_in_use(&name, &in_use),
            Some(Ok(claim)) => Some(claim),
            None => None,
        };
        // The engine refuses a device in a snapshot; only a detached device
        // loses its (unused) loop device.
        let device = self.engine.device(&name)?;
        let detached = self.engine.detach(&name);
        // Out of the engine (a failed flush included): its writes have
        // drained, so its final maps are saved whatever the flush said.
        if detached.is_ok() || self.engine.device(&name).is_err() {
            self.remove_loop_claimed(&name, claim);
            if let Some(persistence) = &self.persistence {
                persistence.save(&device, false);
            }
        }
        detached?;
        Ok(proto::DetachResult::default())
    }

    /// Detach of a device whose loop device is in use: the device leaves
    /// the engine in pass-through, its maps are saved (their fingerprint
    /// taken before any untracked write, so a later attach sees those
    /// writes as changes made while detached), and its loop device stays
    /// until its last user closes it.
    fn detach_in_use(
        &self,
        name: &str,
        in_use: &blksnap_fuse::InUse,
    ) -> Reply<proto::DetachResult> {
        let local = self.local.as_ref().expect("the claim came from it");
        let device = self.engine.device(name)?;
        let released = self.engine.detach_to_pass_through(name);
        let mut loop_path = None;
        // Out of the engine (a failed flush included): serving untracked.
        if released.is_ok() || self.engine.device(name).is_err() {
            if let Some(persistence) = &self.persistence {
                persistence.save(&device, false);
            }
            loop_path = local.keep_detaching(&device);
            tracing::info!(device = name, why = %in_use, "detached with its loop device in use");
        }
        released?;
        Ok(proto::DetachResult {
            detaching: loop_path.map(|p| p.display().to_string()),
        })
    }

    fn shutdown(&self, force: bool) -> Reply<proto::Empty> {
        let stopper = self.stopper.get().ok_or_else(|| {
            ErrorReply::new(
                libc::EOPNOTSUPP,
                "this daemon cannot be stopped over its socket",
            )
        })?;
        self.claim_for_stop(force).map_err(|busy_devices| {
            busy(format!(
                "loop devices in use: {}; unmount them or use --force",
                busy_devices.join(", ")
            ))
        })?;
        self.forced_stop.store(force, Ordering::SeqCst);
        tracing::info!(force, "stop requested over the control socket");
        // Before anything else: a take in progress may hold filesystems
        // frozen, and the stop waits up to 10 s for requests in flight.
        self.freezer.begin_stop();
        stopper();
        Ok(proto::Empty {})
    }

    /// Decides a stop (`shutdown`, SIGTERM): claims every loop device,
    /// held until the frontends stop, so none can be mounted meanwhile.
    /// Refused with the busy ones ("volume (/dev/loopN)"), unless `force`;
    /// a forced stop keeps them for [`Service::forced_busy`].
    pub fn claim_for_stop(&self, force: bool) -> Result<(), Vec<String>> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let shown = |busy: Vec<(String, PathBuf)>| -> Vec<String> {
            busy.into_iter()
                .map(|(v, p)| format!("{v} ({})", p.display()))
                .collect()
        };
        let busy = local.claim_for_stop(force).map_err(shown)?;
        *self.forced_busy.lock().unwrap() = shown(busy);
        Ok(())
    }

    /// The loop devices in use that a forced stop could not claim.
    pub fn forced_busy(&self) -> Vec<String> {
        self.forced_busy.lock().unwrap().clone()
    }

    fn list(&self) -> Reply<proto::ListResult> {
        let devices = self
            .engine
            .devices()
            .iter()
            .map(|d| self.device_info(d.name()))
            .collect::<Reply<_>>()?;
        let snapshots = self
            .engine
            .snapshot_collect()
            .iter()
            .filter_map(|id| self.snapshot_info(id).ok())
            .collect();
        let missing = self
            .persistence
            .as_ref()
            .map(|p| p.missing())
            .unwrap_or_default();
        let detaching = self
            .local
            .as_ref()
            .map(|l| l.detaching())
            .unwrap_or_default()
            .into_iter()
            .map(|d| proto::DetachingDevice {
                name: d.name,
                path: d.path.map(|p| p.display().to_string()),
                loop_device: d.loop_path.display().to_string(),
            })
            .collect();
        Ok(proto::ListResult {
            devices,
            snapshots,
            missing,
            detaching,
        })
    }

    fn cbtinfo(&self, key: &str) -> Reply<proto::CbtInfo> {
        Ok(self.engine.cbt_info(key)?.into())
    }

    fn readcbtmap(&self, a: proto::ReadCbtMapArgs) -> Reply<proto::CbtMapPart> {
        if a.length > proto::MAX_CBT_MAP_READ {
            return Err(invalid(format!(
                "readcbtmap length {} is over the maximum of {} blocks per request",
                a.length,
                proto::MAX_CBT_MAP_READ
            )));
        }
        let map = self.engine.read_cbt_map(&a.device)?;
        let count = map.len() as u64;
        if a.offset > count {
            return Err(invalid(format!(
                "readcbtmap offset {} is beyond the {count} blocks of {}",
                a.offset, a.device
            )));
        }
        let end = a.offset.saturating_add(a.length).min(count);
        Ok(proto::CbtMapPart::encode(
            a.offset,
            count,
            &map[a.offset as usize..end as usize],
        ))
    }

    fn markdirtyblock(&self, a: proto::MarkDirtyArgs) -> Reply<proto::Empty> {
        self.engine.mark_dirty(&a.device, &ranges(&a.ranges))?;
        Ok(proto::Empty {})
    }

    fn snapshot_create(
        &self,
        client: &Client,
        a: proto::SnapshotCreateArgs,
    ) -> Reply<proto::SnapshotId> {
        let e = &self.engine;
        let storage = match &a.storage {
            Some(path) => {
                let path = absolute(path, "difference storage")?;
                StorageSpec::File {
                    file: Arc::new(rights::open_storage(client, path, a.overwrite)?),
                    path: path.to_path_buf(),
                }
            }
            None => StorageSpec::Empty,
        };
        let options = SnapshotOptions {
            limit: a.limit,
            on_copy_error: a.on_copy_error.map(Into::into),
            copy_timeout: a
                .copy_timeout_ms
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis),
            storage_wait: a.storage_wait_ms.map(Duration::from_millis),
        };
        let id = e.snapshot_create(storage, options)?;
        let mut attached = Vec::new();
        for device in &a.devices {
            if let Err(err) = self.add_attaching(client, &id, device, &mut attached) {
                // All or nothing: a create that names a bad device leaves no
                // half-made snapshot behind, nor devices it attached.
                let _ = e.snapshot_destroy(&id);
                for name in &attached {
                    self.detach_attached(name);
                }
                return Err(err);
            }
        }
        Ok(proto::SnapshotId { id })
    }

    fn snapshot_add(&self, client: &Client, a: proto::SnapshotDeviceArgs) -> Reply<proto::Empty> {
        let mut attached = Vec::new();
        self.add_attaching(client, &a.id, &a.device, &mut attached)?;
        Ok(proto::Empty {})
    }

    /// Adds a device to a snapshot, attaching it first when it is a path
    /// not attached yet, as the original's snapshot_create and
    /// snapshot_add do; what it attached is pushed on `attached`, for the
    /// caller to undo. The add failing undoes the attach itself.
    fn add_attaching(
        &self,
        client: &Client,
        id: &Uuid,
        key: &str,
        attached: &mut Vec<String>,
    ) -> Reply<()> {
        let e = &self.engine;
        let attach_first = key.starts_with('/') && e.device(key).is_err();
        if !attach_first {
            return Ok(e.snapshot_add(id, key)?);
        }
        let path = Path::new(key);
        let file = rights::open_rw(client, path, "device")?;
        let name = self
            .attach_device(file, path, None, self.attach_loop, None, false)
            .map_err(|err| {
                if err.errno == libc::EBUSY {
                    busy(format!(
                        "{}; a mounted device cannot be attached: unmount it, attach it with \
                         `blksnap attach --device {key} --loop`, and mount its loop device instead",
                        err.message
                    ))
                } else {
                    err
                }
            })?;
        tracing::info!(device = %name, snapshot = %id, "attached to be added to the snapshot");
        if let Err(err) = e.snapshot_add(id, &name) {
            self.detach_attached(&name);
            return Err(err.into());
        }
        attached.push(name);
        Ok(())
    }

    /// Undoes an attach made for a snapshot that then failed.
    fn detach_attached(&self, name: &str) {
        if let Err(err) = self.detach(name) {
            tracing::error!(device = %name, error = %err.message, "cannot detach a device attached for a failed snapshot");
        }
    }

    fn snapshot_appendstorage(
        &self,
        client: &Client,
        a: proto::AppendStorageArgs,
    ) -> Reply<proto::Empty> {
        let path = absolute(&a.device, "storage device")?;
        // The snapshot first: an unknown id opens nothing.
        self.engine.snapshot_info(&a.id)?;
        let file = rights::open_rw(client, path, "storage device")?;
        self.engine
            .snapshot_append_storage_file(&a.id, file, path, &ranges(&a.ranges))?;
        Ok(proto::Empty {})
    }

    /// Freezes filesystems on the devices' loop devices, takes, thaws, and
    /// gives each image a loop device where its device has one. The freeze
    /// ends with the take, or earlier at its deadline or the stop (see
    /// [`crate::freeze`]); the result says which filesystems stayed frozen.
    fn snapshot_take(&self, id: &Uuid) -> Reply<proto::TakeResult> {
        let info = self.engine.snapshot_info(id)?;
        let devices = &info.devices;
        let mut filesystems = Vec::new();
        if let (Some(local), true) = (&self.local, self.freeze_on_take) {
            let rdevs: Vec<u64> = devices.iter().filter_map(|d| local.loop_rdev(d)).collect();
            filesystems = crate::freeze::filesystems_on(&rdevs);
        }
        // A storage that cannot hold one chunk is refused by the engine's
        // take (ENOSPC), after which the filesystems are thawed at once.
        let freeze = self.freezer.freeze(&filesystems);
        let taken = self.engine.snapshot_take(id);
        let (frozen, mut warnings) = freeze.thaw();
        taken?;
        if let Some(local) = &self.local {
            for d in devices.iter().filter(|d| local.loop_path(d).is_some()) {
                if let Err(err) = self.add_loop(&image_name(d)) {
                    warnings.push(err.message);
                }
            }
        }
        Ok(proto::TakeResult { frozen, warnings })
    }

    /// Destroys the snapshot and releases its images' loop devices. One in
    /// use (a mounted image) does not stop the destroy, as in the original
    /// tool: it stays until its last user closes it (autoclear), and I/O on
    /// it fails from the destroy on, since its FUSE handle holds an image
    /// that refuses every call once destroyed.
    fn snapshot_destroy(&self, id: &Uuid) -> Reply<proto::DestroyResult> {
        let images: Vec<String> = self
            .engine
            .snapshot_info(id)?
            .devices
            .iter()
            .map(|d| image_name(d))
            .collect();
        // The free image loop devices are claimed, so that none can be
        // mounted between the check and the release.
        let mut claims = Vec::new();
        let mut in_use = Vec::new();
        if let Some(local) = &self.local {
            for image in &images {
                match local.claim_loop(image) {
                    Some(Ok(claim)) => claims.push((image, claim)),
                    Some(Err(why)) => in_use.push((image, why)),
                    None => {}
                }
            }
        }
        for (image, claim) in claims {
            self.remove_loop_claimed(image, Some(claim));
        }
        self.engine.snapshot_destroy(id)?;
        let mut result = proto::DestroyResult::default();
        for (image, why) in in_use {
            tracing::warn!(snapshot = %id, volume = %image, why = %why, "image loop device in use at the destroy: it stays until its last user closes it, and I/O on it fails");
            self.remove_loop_claimed(image, None);
            result.images_in_use.push(why.path.display().to_string());
        }
        Ok(result)
    }

    fn snapshot_collect(&self) -> proto::SnapshotIds {
        proto::SnapshotIds {
            ids: self.engine.snapshot_collect(),
        }
    }

    fn snapshot_info_request(&self, a: proto::SnapshotInfoArgs) -> Reply<proto::SnapshotInfo> {
        let (id, for_device) = match (a.id, a.device) {
            (Some(id), None) => (id, None),
            (None, Some(device)) => {
                let name = self.engine.device(&device)?.name().to_string();
                let id = self.engine.snapshot_of(&device)?.ok_or_else(|| {
                    ErrorReply::new(libc::ENOENT, format!("device {name} is in no snapshot"))
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
        Ok(info)
    }

    fn snapshot_waitevent(&self, a: proto::WaitEventArgs) -> Reply<proto::WaitEventResult> {
        if a.timeout_ms > MAX_WAIT_MS {
            return Err(invalid(format!(
                "timeout {} ms is over the maximum of {MAX_WAIT_MS} ms",
                a.timeout_ms
            )));
        }
        let event = self
            .engine
            .snapshot_wait_event_timed(&a.id, Duration::from_millis(a.timeout_ms))?;
        Ok(proto::WaitEventResult {
            time: event.as_ref().map(|(time, _)| *time),
            event: event.map(|(_, event)| event.into()),
        })
    }

    // ---- replies that name our frontends ----

    fn device_info(&self, key: &str) -> Reply<proto::DeviceInfo> {
        let device = self.engine.device(key)?;
        Ok(proto::DeviceInfo {
            name: device.name().to_string(),
            path: device.path().map(|p| p.display().to_string()),
            size: device.size(),
            snapshot: self.engine.snapshot_of(key)?,
            nbd: self.nbd_uri(device.name()),
            loop_device: self.loop_path(device.name()),
            already_attached: false,
        })
    }

    fn snapshot_info(&self, id: &Uuid) -> Reply<proto::SnapshotInfo> {
        let i = self.engine.snapshot_info(id)?;
        Ok(proto::SnapshotInfo {
            id: i.id,
            for_device: None,
            devices: i.devices,
            taken: i.taken,
            storage: i.storage.into(),
            images: i
                .images
                .into_iter()
                .map(|im| {
                    let volume = image_name(&im.device);
                    proto::ImageInfo {
                        image: self.loop_path(&volume),
                        nbd: self.nbd_uri(&volume),
                        device: im.device,
                        size: im.size,
                        chunk_size: im.chunk_size,
                        error_code: im.error_code,
                    }
                })
                .collect(),
        })
    }

    fn nbd_uri(&self, export: &str) -> Option<String> {
        self.nbd_socket
            .as_deref()
            .map(|socket| blksnap_nbd::unix_uri(socket, export))
    }

    // ---- loop devices ----

    fn loop_path(&self, volume: &str) -> Option<String> {
        self.local
            .as_ref()?
            .loop_path(volume)
            .map(|p| p.display().to_string())
    }

    /// Gives a volume a loop device and marks it served (no storage there).
    fn add_loop(&self, volume: &str) -> Reply<String> {
        let local = self.local.as_ref().ok_or_else(|| {
            invalid("loop devices need the FUSE frontend: start blksnapd with --fuse-dir")
        })?;
        let path = local.attach_loop(volume).map_err(|e| {
            let busy = e.kind() == std::io::ErrorKind::ResourceBusy;
            ErrorReply::new(
                e.raw_os_error()
                    .unwrap_or(if busy { libc::EBUSY } else { libc::EIO }),
                format!("cannot create a loop device for {volume}: {e}"),
            )
        })?;
        if let Some(rdev) = local.loop_rdev(volume) {
            self.engine
                .add_served_identity(DeviceIdentity::Block { rdev });
        }
        Ok(path.display().to_string())
    }

    /// Removes a loop device that was just made (a failed attach).
    fn remove_loop(&self, volume: &str) {
        self.remove_loop_claimed(volume, None);
    }

    /// Removes a volume's loop device, under its claim when there is one.
    fn remove_loop_claimed(&self, volume: &str, claim: Option<blksnap_fuse::Claim>) {
        if let Some(local) = &self.local {
            if let Some(rdev) = local.loop_rdev(volume) {
                self.engine
                    .remove_served_identity(DeviceIdentity::Block { rdev });
            }
            match claim {
                Some(claim) => local.release_loop(volume, claim),
                None => local.detach_loop(volume),
            };
        }
    }

    /// Forgets the detaching devices whose loop device is gone; storage may
    /// go on their loop devices' numbers again.
    fn prune_detaching(&self) {
        if let Some(local) = &self.local {
            for (_, rdev) in local.prune_detaching() {
                if let Some(rdev) = rdev {
                    self.engine
                        .remove_served_identity(DeviceIdentity::Block { rdev });
                }
            }
        }
    }

    /// A key that names a detaching device (and no tracked one): it is no
    /// longer tracked, so nothing but `list` knows it.
    fn check_not_detaching(&self, key: &str) -> Reply<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        if self.engine.device(key).is_ok() {
            return Ok(());
        }
        match local.detaching_named(key) {
            Some(d) => Err(ErrorReply::new(
                libc::ENOENT,
                format!(
                    "device {} is detached: it is no longer tracked and cannot be in a snapshot \
                     (its loop device {} serves it, untracked, until it is unmounted)",
                    d.name,
                    d.loop_path.display()
                ),
            )),
            None => Ok(()),
        }
    }

    /// A new attach of a detaching device, or under its name, waits for its
    /// loop device to go.
    fn check_attach_not_detaching(&self, path: &Path, name: Option<&str>) -> Reply<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let name = name
            .map(str::to_string)
            .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()));
        let found = local
            .detaching_named(&path.display().to_string())
            .or_else(|| name.and_then(|n| local.detaching_named(&n)));
        match found {
            Some(d) => Err(busy(format!(
                "device {} ({}) is still detaching: its loop device {} is in use; \
                 unmount it, then attach again",
                d.name,
                d.path
                    .as_deref()
                    .map_or("no path".into(), |p| p.display().to_string()),
                d.loop_path.display()
            ))),
            None => Ok(()),
        }
    }

    /// A key naming one of our loop devices means its device.
    fn resolve_key(&self, key: &mut String) -> Reply<()> {
        if key.contains('/') && !key.starts_with('/') {
            return Err(invalid(format!(
                "device {key:?} must be a name or an absolute path"
            )));
        }
        if let Some(local) = &self.local {
            if let Some(volume) = local.volume_of_loop(Path::new(key.as_str())) {
                if image_device(&volume).is_some() {
                    return Err(invalid(format!(
                        "{key} is a snapshot image, not a tracked device"
                    )));
                }
                *key = volume;
            }
        }
        Ok(())
    }
}
