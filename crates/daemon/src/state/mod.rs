//! The daemon's persistent state (`--state-dir`): which devices are
//! attached and their change maps, so that tracking survives restarts.
//!
//! Layout, all under `<state-dir>/devices/` (mode 0700, never a symlink,
//! every file opened without following symlinks), one record per device
//! under a random id:
//! - `<id>.json`: the record ([`DeviceRecord`]): name, path, loop choice,
//!   persistence mode, identity and fingerprint at the last save, and
//!   whether the device is to be attached again at start;
//! - `<id>.cbt`: the saved tracking state ([`format`]), with a checksum;
//! - `<id>.journal`: write-ahead mode, the changes since that state;
//! - `<id>.clean`: made by the save at detach and clean stop, removed
//!   before the device takes a write again: without it at start, the
//!   daemon stopped uncleanly;
//! - `<id>.seen`: write-ahead mode, what the heartbeat last saw of the
//!   device ([`Seen`]), to tell our own last writes from later ones after
//!   a crash.
//!
//! Every file is replaced atomically: temp file, fsync, rename, fsync dir.
//!
//! [`Persistence`] decides, at every attach, how tracking starts (restored,
//! or a new generation with its reason) and saves at detach and stop.
//! Callers: `main` (restore at start, save at stop) and the service
//! (attach, detach, list).

mod format;
mod identity;
mod journal;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blksnap_engine::{CbtState, GenerationReason, TrackedDevice, TrackingStart};
use blksnap_proto::{CbtPersistence, MissingDevice};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use identity::{Fingerprint, Identity};
pub use journal::Journal;

/// The record of one device, as `<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub version: u32,
    pub name: String,
    pub path: PathBuf,
    #[serde(rename = "loop")]
    pub loop_device: bool,
    pub cbt_persistence: CbtPersistence,
    pub identity: Identity,
    /// At the last save of the maps.
    pub fingerprint: Fingerprint,
    /// Attach again at start (false after a detach: the maps are kept for
    /// a later attach of the same device).
    pub attached: bool,
}

const RECORD_VERSION: u32 = 1;

/// The files of one record.
#[derive(Debug, Clone)]
pub(crate) struct DeviceFiles {
    dir: PathBuf,
    id: Uuid,
}

impl DeviceFiles {
    fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.id))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Replaces `<id>.<ext>` with `bytes`: temp file, fsync, rename, fsync
    /// the directory.
    pub(crate) fn write_atomic(&self, ext: &str, bytes: &[u8]) -> io::Result<()> {
        self.replace(ext, bytes, true)?;
        self.sync_dir()
    }

    /// Replaces `<id>.<ext>` by a rename, without fsync.
    fn write_unsynced(&self, ext: &str, bytes: &[u8]) -> io::Result<()> {
        self.replace(ext, bytes, false)
    }

    /// Writes `bytes` to `.<id>.<ext>.tmp` (fsynced when `sync`) and renames
    /// it over `<id>.<ext>`.
    fn replace(&self, ext: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{}.{ext}.tmp", self.id));
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, self.path(ext))
    }

    pub(crate) fn create_durably(&self, ext: &str) -> io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path(ext))?;
        file.sync_all()?;
        self.sync_dir()
    }

    pub(crate) fn remove(&self, ext: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(ext)) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn open_existing(&self, ext: &str) -> io::Result<File> {
        journal::open_nofollow(&self.path(ext), true)
    }

    fn read(&self, ext: &str) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        journal::open_nofollow(&self.path(ext), false)?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn exists(&self, ext: &str) -> bool {
        std::fs::symlink_metadata(self.path(ext)).is_ok()
    }
}

/// What the heartbeat last saw of a write-ahead device (`<id>.seen`): its
/// fingerprint and when. After a crash, the maps are trusted only if the
/// device is as seen then, or (a regular file) was changed no later than a
/// heartbeat after it: by our own last writes, not by someone after the
/// crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    fingerprint: Fingerprint,
    at_ns: i64,
}

/// How often the heartbeat looks at write-ahead devices.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// A change to a file this long after the last heartbeat cannot be ours.
const SEEN_WINDOW_NS: i64 = 2 * HEARTBEAT.as_nanos() as i64 + 500_000_000;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Seen {
    fn now(fingerprint: Fingerprint) -> Self {
        Self {
            fingerprint,
            at_ns: now_ns(),
        }
    }

    fn explains(&self, now: &Fingerprint) -> bool {
        if now == &self.fingerprint {
            return true;
        }
        match (now.times, self.fingerprint.times) {
            (Some(t), Some(seen)) => {
                // Later than what was seen (a clock set back after a power
                // loss must not make a foreign write look old enough), and
                // no later than our own last writes can explain.
                now.size == self.fingerprint.size
                    && t.latest_ns() >= seen.latest_ns()
                    && t.latest_ns() <= self.at_ns + SEEN_WINDOW_NS
            }
            _ => false,
        }
    }
}

/// How one attach starts, decided from the record and the device.
struct Plan {
    start: Option<CbtState>,
    reason: GenerationReason,
    why: String,
}

#[derive(Debug)]
struct Tracked {
    id: Uuid,
    record: DeviceRecord,
    journal: Arc<Journal>,
}

/// The state dir and what the daemon knows of its records.
#[derive(Debug)]
pub struct Persistence {
    dir: PathBuf,
    default_mode: CbtPersistence,
    /// Attached devices, by name.
    tracked: Mutex<HashMap<String, Tracked>>,
    /// Records that could not be attached again at start, by name.
    missing: Mutex<HashMap<String, (Uuid, MissingDevice)>>,
    /// Attaches and detaches one at a time: a record is looked up, used
    /// and written without another attach of the same device in between.
    serial: Mutex<()>,
    /// `.seen` files are written by one thread at a time (they share a
    /// temporary name); never held with `serial` wanted.
    seen_lock: Mutex<()>,
}

impl Persistence {
    /// Opens (creating it 0700) `<root>/devices`; refuses a state dir that
    /// is a symlink, is not ours, or cannot be written.
    pub fn open(root: &Path, default_mode: CbtPersistence) -> Result<Self, String> {
        let shown = |p: &Path| p.display().to_string();
        for dir in [root.to_path_buf(), root.join("devices")] {
            match std::fs::symlink_metadata(&dir) {
                Ok(meta) => {
                    if !meta.is_dir() {
                        return Err(format!(
                            "state directory {} is not a directory (symlinks are refused)",
                            shown(&dir)
                        ));
                    }
                    if meta.uid() != rustix::process::geteuid().as_raw() {
                        return Err(format!(
                            "state directory {} belongs to uid {}, not to this daemon",
                            shown(&dir),
                            meta.uid()
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&dir)
                        .map_err(|e| {
                            format!("cannot create state directory {}: {e}", shown(&dir))
                        })?;
                }
                Err(e) => return Err(format!("state directory {}: {e}", shown(&dir))),
            }
        }
        let dir = root.join("devices");
        let probe = dir.join(".write-test");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("state directory {} is not writable: {e}", shown(&dir)))?;
        Ok(Self {
            dir,
            default_mode,
            tracked: Mutex::default(),
            missing: Mutex::default(),
            serial: Mutex::new(()),
            seen_lock: Mutex::new(()),
        })
    }

    fn files(&self, id: Uuid) -> DeviceFiles {
        DeviceFiles {
            dir: self.dir.clone(),
            id,
        }
    }

    /// Every record, readable or not (with what is wrong).
    fn records(&self) -> Vec<(Uuid, Result<DeviceRecord, String>)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                continue;
            };
            let record = self
                .files(id)
                .read("json")
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<DeviceRecord>(&b).map_err(|e| e.to_string()))
                .and_then(|r| {
                    if r.version == RECORD_VERSION {
                        Ok(r)
                    } else {
                        Err(format!(
                            "record version {}, this daemon reads {RECORD_VERSION}",
                            r.version
                        ))
                    }
                });
            out.push((id, record));
        }
        out.sort_by_key(|r| r.0);
        out
    }

    fn write_record(&self, id: Uuid, record: &DeviceRecord) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        self.files(id).write_atomic("json", &bytes)
    }

    fn remove_record(&self, id: Uuid) {
        self.missing.lock().unwrap().retain(|_, (m, _)| *m != id);
        let files = self.files(id);
        for ext in ["json", "cbt", "journal", "clean", "seen"] {
            if let Err(e) = files.remove(ext) {
                tracing::warn!(record = %id, error = %e, "cannot remove a state file");
            }
        }
    }

    fn seen(&self, id: Uuid) -> Option<Seen> {
        let bytes = self.files(id).read("seen").ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records what a device looks like now (no fsync: after a power loss
    /// an older view only makes the check stricter).
    fn write_seen(&self, files: &DeviceFiles, path: &Path) {
        let written = identity::probe(path).and_then(|(_, fingerprint)| {
            let bytes = serde_json::to_vec(&Seen::now(fingerprint)).map_err(io::Error::other)?;
            files.write_unsynced("seen", &bytes)
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "heartbeat: cannot record the device");
        }
    }

    /// One heartbeat: every write-ahead device written since the last one,
    /// or gone quiet since, is looked at again.
    /// A journal grown too long is folded into a new saved state (its
    /// device's writes held for that save).
    pub fn heartbeat(&self, engine: &blksnap_engine::Engine) {
        let _seen = self.seen_lock.lock().unwrap();
        let due: Vec<(String, DeviceFiles, PathBuf, Arc<Journal>)> = self
            .tracked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.journal.mode() == CbtPersistence::WriteAhead)
            .map(|(name, t)| {
                (
                    name.clone(),
                    self.files(t.id),
                    t.record.path.clone(),
                    t.journal.clone(),
                )
            })
            .collect();
        for (name, files, path, journal) in due {
            if journal.heartbeat_due() {
                self.write_seen(&files, &path);
            }
            if journal.checkpoint_due() {
                match engine.with_cbt_state(&name, |state| journal.save(&state, false)) {
                    Ok(Ok(())) => tracing::info!(device = %name, "change journal checkpointed"),
                    Ok(Err(e)) => {
                        tracing::error!(device = %name, error = %e, "cannot checkpoint the change journal")
                    }
                    Err(_) => {} // detached meanwhile
                }
            }
        }
    }

    /// Runs [`Persistence::heartbeat`] every [`HEARTBEAT`] for as long as
    /// the daemon runs.
    pub fn start_heartbeat(self: &Arc<Self>, engine: Arc<blksnap_engine::Engine>) {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || loop {
                std::thread::sleep(HEARTBEAT);
                match me.upgrade() {
                    Some(p) => p.heartbeat(&engine),
                    None => break,
                }
            })
            .expect("spawn the heartbeat thread");
    }

    /// The saved state of a record, with its journal replayed in
    /// write-ahead mode.
    fn load(&self, id: Uuid, mode: CbtPersistence) -> Result<CbtState, String> {
        let files = self.files(id);
        let bytes = files
            .read("cbt")
            .map_err(|e| format!("{}: {e}", files.path("cbt").display()))?;
        let (mut state, epoch) = format::decode_state(&bytes)
            .map_err(|e| format!("{}: {e}", files.path("cbt").display()))?;
        if mode == CbtPersistence::WriteAhead && !files.exists("clean") {
            let journal = files
                .read("journal")
                .map_err(|e| format!("{}: {e}", files.path("journal").display()))?;
            let at = |e: String| format!("{}: {e}", files.path("journal").display());
            let journal_epoch = format::decode_journal_header(&journal).map_err(at)?;
            if journal_epoch == epoch {
                let records: Vec<&[u8]> = journal[format::JOURNAL_HEADER..]
                    .chunks(format::RECORD)
                    .collect();
                let mut replayed = 0;
                for (n, record) in records.iter().enumerate() {
                    let Some(change) = format::decode_record(record) else {
                        // Torn records after the last sync were never
                        // acknowledged; a bad record with good ones after it
                        // is damage, not a crash.
                        if records[n + 1..]
                            .iter()
                            .any(|r| format::decode_record(r).is_some())
                        {
                            return Err(at(format!(
                                "record {n} is damaged and valid records follow it"
                            )));
                        }
                        break;
                    };
                    state
                        .apply(&change)
                        .map_err(|e| at(format!("record {n}: {e}")))?;
                    replayed += 1;
                }
                tracing::info!(record = %id, replayed, "change journal replayed");
            }
        }
        Ok(state)
    }

    /// How tracking of `path` starts when `record` (its last save) exists.
    fn plan(&self, id: Uuid, record: &DeviceRecord, path: &Path) -> Result<Plan, String> {
        let (identity, fingerprint) =
            identity::probe(path).map_err(|e| format!("path gone or unreadable: {e}"))?;
        if identity != record.identity {
            return Err(format!(
                "identity changed: recorded {}, found {identity}",
                record.identity
            ));
        }
        let new = |reason, why: String| {
            Ok(Plan {
                start: None,
                reason,
                why,
            })
        };
        let dirty = !self.files(id).exists("clean");
        let write_ahead = record.cbt_persistence == CbtPersistence::WriteAhead;
        if dirty && !write_ahead {
            return new(
                GenerationReason::UncleanStop,
                "the daemon stopped without saving the change maps".into(),
            );
        }
        let state = match self.load(id, record.cbt_persistence) {
            Ok(state) => state,
            Err(e) => return new(GenerationReason::RecordCorrupt, e),
        };
        // After a crash in write-ahead mode the journal is complete, and
        // the device is compared with what the heartbeat last saw of it.
        let (unchanged, against) = if dirty {
            let seen = self.seen(id).unwrap_or(Seen {
                fingerprint: record.fingerprint.clone(),
                at_ns: 0,
            });
            (seen.explains(&fingerprint), format!("{seen:?}"))
        } else {
            (
                fingerprint == record.fingerprint,
                format!("saved with {:?}", record.fingerprint),
            )
        };
        if !unchanged {
            return new(
                GenerationReason::ChangedWhileDetached,
                format!("{against}, found {fingerprint:?}"),
            );
        }
        if !fingerprint.verifiable() {
            return new(
                GenerationReason::Unverifiable,
                "a block device with no known filesystem (and not a loop device): nothing shows it is unchanged"
                    .into(),
            );
        }
        Ok(Plan {
            start: Some(state),
            reason: GenerationReason::Restored,
            why: if dirty {
                "write-ahead journal after an unclean stop".into()
            } else {
                "clean stop, device unchanged".into()
            },
        })
    }

    /// The records to attach again at start: (name, path, loop), in a
    /// stable order. Unreadable ones are reported missing.
    pub fn recorded_devices(&self) -> Vec<(String, PathBuf, bool)> {
        let mut out = Vec::new();
        for (id, record) in self.records() {
            match record {
                Ok(r) if r.attached => {
                    // A name from before names were restricted (or an
                    // edited record) would reach URIs, FUSE paths and CLI
                    // output: listed under the record's id, not attached.
                    match blksnap_engine::volume::check_device_name(&r.name) {
                        Ok(()) => out.push((r.name, r.path, r.loop_device)),
                        Err(e) => {
                            tracing::error!(record = %id, path = %r.path.display(), error = %e, "device not re-attached (record-bad-name); detach {id} removes its record, then attach the device under a valid --name");
                            self.missing.lock().unwrap().insert(
                                id.to_string(),
                                (
                                    id,
                                    MissingDevice {
                                        name: id.to_string(),
                                        path: r.path.display().to_string(),
                                        reason: format!("record-bad-name: {e}"),
                                    },
                                ),
                            );
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(record = %id, error = %e, "unreadable device record (record-corrupt); detach {id} removes it");
                    self.missing.lock().unwrap().insert(
                        id.to_string(),
                        (
                            id,
                            MissingDevice {
                                name: id.to_string(),
                                path: self.files(id).path("json").display().to_string(),
                                reason: format!("record-corrupt: {e}"),
                            },
                        ),
                    );
                }
            }
        }
        out
    }

    /// Before an attach of `path` as `name`: how tracking starts (and the
    /// journal to give the engine). At start (`restoring`), a device that
    /// is gone or another one is reported missing instead (`Err`).
    pub fn prepare(
        &self,
        path: &Path,
        name: &str,
        mode: Option<CbtPersistence>,
        restoring: bool,
    ) -> Result<Prepared<'_>, String> {
        let serial = self.serial.lock().unwrap();
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        // The record of a device attached now is never touched here (the
        // engine refuses a second attach of its name or of itself).
        let in_use: Vec<Uuid> = self
            .tracked
            .lock()
            .unwrap()
            .values()
            .map(|t| t.id)
            .collect();
        let existing = self.records().into_iter().find_map(|(id, r)| match r {
            Ok(r) if !in_use.contains(&id) && (r.name == name || r.path == canonical) => {
                Some((id, r))
            }
            _ => None,
        });
        let (id, plan, old_mode) = match existing {
            Some((id, record)) => match self.plan(id, &record, &canonical) {
                Ok(plan) => {
                    // From here on the device may take writes: its saved
                    // state is no longer the last word until saved again.
                    self.files(id).remove("clean").map_err(|e| {
                        format!(
                            "cannot mark the saved state of {name} in use ({}): {e}",
                            self.files(id).path("clean").display()
                        )
                    })?;
                    (id, plan, Some(record.cbt_persistence))
                }
                Err(why) if restoring => {
                    tracing::error!(device = name, path = %canonical.display(), %why, "recorded device not attached; `blksnap detach --device {name}` forgets it");
                    self.missing.lock().unwrap().insert(
                        name.to_string(),
                        (
                            id,
                            MissingDevice {
                                name: name.to_string(),
                                path: canonical.display().to_string(),
                                reason: why.clone(),
                            },
                        ),
                    );
                    return Err(why);
                }
                // A user attach of what is now another device: a new record.
                Err(why) => {
                    self.remove_record(id);
                    (
                        Uuid::new_v4(),
                        Plan {
                            start: None,
                            reason: GenerationReason::Attached,
                            why,
                        },
                        None,
                    )
                }
            },
            None => (
                Uuid::new_v4(),
                Plan {
                    start: None,
                    reason: GenerationReason::Attached,
                    why: "no saved state".into(),
                },
                None,
            ),
        };
        let fresh = old_mode.is_none();
        let mode = mode.or(old_mode).unwrap_or(self.default_mode);
        tracing::info!(device = name, reason = %plan.reason, why = %plan.why, mode = mode.as_str(), "change tracking starts");
        let journal = Arc::new(Journal::new(name, mode, self.files(id)));
        Ok(Prepared {
            id,
            fresh,
            start: TrackingStart {
                restore: plan.start,
                reason: Some(plan.reason),
                journal: journal.engine_hook(),
            },
            journal,
            _serial: serial,
        })
    }

    /// After the engine attached `device`: its first save (with its writes
    /// held) and its record. Failing that, the attach must be undone.
    pub fn attached(
        &self,
        prepared: Prepared<'_>,
        engine: &blksnap_engine::Engine,
        device: &TrackedDevice,
        loop_device: bool,
    ) -> Result<(), String> {
        let (id, fresh) = (prepared.id, prepared.fresh);
        let done = self.record_attached(prepared, engine, device, loop_device);
        if done.is_err() && fresh {
            // Nothing of a failed first attach stays behind.
            self.remove_record(id);
        }
        done
    }

    fn record_attached(
        &self,
        prepared: Prepared<'_>,
        engine: &blksnap_engine::Engine,
        device: &TrackedDevice,
        loop_device: bool,
    ) -> Result<(), String> {
        let path = device.path().unwrap_or(Path::new("")).to_path_buf();
        let (identity, fingerprint) =
            identity::probe(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let journal = prepared.journal.clone();
        engine
            .with_cbt_state(device.name(), |state| journal.save(&state, false))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot save the change maps of {}: {e}", device.name()))?;
        let record = DeviceRecord {
            version: RECORD_VERSION,
            name: device.name().to_string(),
            path,
            loop_device,
            cbt_persistence: journal.mode(),
            identity,
            fingerprint,
            attached: true,
        };
        self.write_record(prepared.id, &record)
            .map_err(|e| format!("cannot write the record of {}: {e}", device.name()))?;
        if record.cbt_persistence == CbtPersistence::WriteAhead {
            let _seen = self.seen_lock.lock().unwrap();
            self.write_seen(&self.files(prepared.id), &record.path);
        }
        self.missing.lock().unwrap().remove(device.name());
        self.tracked.lock().unwrap().insert(
            device.name().to_string(),
            Tracked {
                id: prepared.id,
                record,
                journal,
            },
        );
        Ok(())
    }

    /// A device left the engine (detach: `keep_attached` false; stop: true)
    /// and its writes drained: its final maps and fingerprint are saved.
    pub fn save(&self, device: &TrackedDevice, keep_attached: bool) {
        let _serial = self.serial.lock().unwrap();
        let Some(mut tracked) = self.tracked.lock().unwrap().remove(device.name()) else {
            return;
        };
        let state = device.change_tracker().state();
        let saved = tracked.journal.save(&state, true).and_then(|()| {
            let (identity, fingerprint) = identity::probe(&tracked.record.path)?;
            tracked.record.identity = identity;
            tracked.record.fingerprint = fingerprint;
            tracked.record.attached = keep_attached;
            self.write_record(tracked.id, &tracked.record)?;
            if tracked.record.cbt_persistence == CbtPersistence::WriteAhead {
                let _seen = self.seen_lock.lock().unwrap();
                self.write_seen(&self.files(tracked.id), &tracked.record.path);
            } else {
                self.files(tracked.id).remove("seen")?;
            }
            Ok(())
        });
        match saved {
            Ok(()) => tracing::info!(device = device.name(), "change maps saved"),
            Err(e) => tracing::error!(
                device = device.name(),
                error = %e,
                "cannot save the change maps: the next start will not trust the saved ones (unclean-stop, or a journal replay in write-ahead mode)"
            ),
        }
    }

    /// A recorded device whose attach at start failed after its checks
    /// (open, loop device, save): listed missing like the others.
    pub fn report_missing(&self, name: &str, path: &Path, reason: &str) {
        let Some((id, _)) = self
            .records()
            .into_iter()
            .find(|(_, r)| r.as_ref().is_ok_and(|r| r.name == name))
        else {
            return;
        };
        self.missing
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert((
                id,
                MissingDevice {
                    name: name.to_string(),
                    path: path.display().to_string(),
                    reason: reason.to_string(),
                },
            ));
    }

    /// A recorded device that could not be attached again, forgotten by a
    /// detach. True when there was one.
    pub fn forget_missing(&self, name: &str) -> bool {
        let _serial = self.serial.lock().unwrap();
        // By name, or by the recorded path (as given, or resolved: the CLI
        // sends the absolute path of an existing file).
        let resolved = std::fs::canonicalize(name).ok();
        let removed = {
            let mut missing = self.missing.lock().unwrap();
            let key = missing
                .iter()
                .find(|(k, (_, m))| {
                    k.as_str() == name
                        || m.path == name
                        || resolved.as_deref() == Some(Path::new(&m.path))
                })
                .map(|(k, _)| k.clone());
            key.and_then(|k| missing.remove(&k))
        };
        match removed {
            Some((id, _)) => {
                self.remove_record(id);
                tracing::info!(device = name, "record of a missing device removed");
                true
            }
            None => false,
        }
    }

    pub fn missing(&self) -> Vec<MissingDevice> {
        let mut out: Vec<_> = self
            .missing
            .lock()
            .unwrap()
            .values()
            .map(|(_, m)| m.clone())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// An attach in preparation; holds attaches of other devices off until
/// [`Persistence::attached`] or its drop.
pub struct Prepared<'a> {
    id: Uuid,
    /// A new record (no files of it existed before this attach).
    fresh: bool,
    pub start: TrackingStart,
    journal: Arc<Journal>,
    _serial: std::sync::MutexGuard<'a, ()>,
}

impl Prepared<'_> {
    /// The start to use when the saved state, checked here, still does not
    /// fit the device (the engine refused it): a new generation.
    pub fn corrupt_start(&self) -> TrackingStart {
        TrackingStart {
            restore: None,
            reason: Some(GenerationReason::RecordCorrupt),
            journal: self.journal.engine_hook(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blksnap_engine::{Config, Engine};

    const SIZE: u64 = 4 << 20;

    fn engine() -> Engine {
        Engine::new(Config::default()).unwrap()
    }

    /// Attaches `path` as the daemon does; returns the device's reason.
    fn attach(
        p: &Persistence,
        e: &Engine,
        path: &Path,
        mode: CbtPersistence,
        restoring: bool,
    ) -> Result<GenerationReason, String> {
        let mut prepared = p.prepare(path, "d", Some(mode), restoring)?;
        let start = std::mem::take(&mut prepared.start);
        let device = e.attach_path_with(path, Some("d"), start).unwrap();
        p.attached(prepared, e, &device, false)?;
        Ok(device.change_tracker().info().generation_reason)
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![0u8; SIZE as usize]).unwrap();
        (dir, path)
    }

    #[test]
    fn clean_stop_restores_and_a_crash_starts_a_new_generation() {
        for mode in [CbtPersistence::CleanStop, CbtPersistence::WriteAhead] {
            let (dir, path) = setup();
            let state = dir.path().join("state");
            let p = Persistence::open(&state, mode).unwrap();
            let e = engine();
            assert_eq!(
                attach(&p, &e, &path, mode, false),
                Ok(GenerationReason::Attached)
            );
            let d = e.device("d").unwrap();
            let clean = p.tracked.lock().unwrap()["d"].journal.files.path("clean");
            assert!(!clean.exists(), "attached: not clean");
            d.write(&[1; 512], 3 << 16).unwrap();
            let before = d.change_tracker().state();
            // A clean stop...
            for device in e.close_all() {
                p.save(&device, true);
            }
            assert!(clean.exists(), "{mode:?}: a clean stop marks it clean");
            drop((d, e, p));
            let p = Persistence::open(&state, mode).unwrap();
            assert_eq!(p.recorded_devices().len(), 1);
            let e = engine();
            assert_eq!(
                attach(&p, &e, &path, mode, true),
                Ok(GenerationReason::Restored)
            );
            let d = e.device("d").unwrap();
            assert_eq!(d.change_tracker().state(), before);
            // ...then a crash after a write to a new block.
            d.write(&[2; 512], 9 << 16).unwrap();
            let live = d.change_tracker().state();
            drop((d, e, p));
            let p = Persistence::open(&state, mode).unwrap();
            let e = engine();
            let reason = attach(&p, &e, &path, mode, true).unwrap();
            let after = e.device("d").unwrap().change_tracker().state();
            match mode {
                CbtPersistence::CleanStop => {
                    assert_eq!(reason, GenerationReason::UncleanStop);
                    assert_ne!(after.generation, before.generation);
                    assert!(after.live.iter().all(|&b| b == 0));
                }
                CbtPersistence::WriteAhead => {
                    assert_eq!(reason, GenerationReason::Restored);
                    assert_eq!(after, live, "the journal holds every acknowledged write");
                    // Another crash after a write, then the file is
                    // changed later than any heartbeat could explain: not
                    // trusted.
                    e.device("d").unwrap().write(&[3; 512], 20 << 16).unwrap();
                    assert!(!clean.exists());
                    drop(e);
                    drop(p);
                    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    f.set_modified(
                        std::time::SystemTime::now() + std::time::Duration::from_secs(60),
                    )
                    .unwrap();
                    drop(f);
                    let p = Persistence::open(&state, mode).unwrap();
                    let e = engine();
                    let e2 = attach(&p, &e, &path, mode, true);
                    assert_eq!(e2, Ok(GenerationReason::ChangedWhileDetached));
                }
            }
        }
    }

    #[test]
    fn a_damaged_journal_record_before_good_ones_is_record_corrupt_a_torn_tail_is_not() {
        for (damage, want) in [
            (0usize, GenerationReason::RecordCorrupt),
            (2, GenerationReason::Restored),
        ] {
            let (dir, path) = setup();
            let state = dir.path().join("state");
            let mode = CbtPersistence::WriteAhead;
            let p = Persistence::open(&state, mode).unwrap();
            let e = engine();
            attach(&p, &e, &path, mode, false).unwrap();
            let journal = p.tracked.lock().unwrap()["d"].journal.files.path("journal");
            let d = e.device("d").unwrap();
            for block in [1u64, 5, 9] {
                d.write(&[1; 512], block << 16).unwrap();
            }
            drop((d, e, p));
            // Damage record `damage` of the three (the last one: a torn tail).
            let mut bytes = std::fs::read(&journal).unwrap();
            assert_eq!(bytes.len(), format::JOURNAL_HEADER + 3 * format::RECORD);
            bytes[format::JOURNAL_HEADER + damage * format::RECORD + 9] ^= 0x40;
            std::fs::write(&journal, &bytes).unwrap();
            let p = Persistence::open(&state, mode).unwrap();
            let e = engine();
            assert_eq!(
                attach(&p, &e, &path, mode, true),
                Ok(want),
                "damage at {damage}"
            );
            if want == GenerationReason::Restored {
                let live = e.device("d").unwrap().change_tracker().state().live;
                assert_eq!(
                    (live[1], live[5], live[9]),
                    (1, 1, 0),
                    "the torn record is dropped"
                );
            }
        }
    }

    #[test]
    fn a_corrupt_saved_state_restarts_with_record_corrupt() {
        let (dir, path) = setup();
        let state = dir.path().join("state");
        let p = Persistence::open(&state, CbtPersistence::CleanStop).unwrap();
        let e = engine();
        attach(&p, &e, &path, CbtPersistence::CleanStop, false).unwrap();
        let cbt = p.tracked.lock().unwrap()["d"].journal.files.path("cbt");
        for device in e.close_all() {
            p.save(&device, true);
        }
        drop(e);
        let mut bytes = std::fs::read(&cbt).unwrap();
        bytes[70] ^= 1;
        std::fs::write(&cbt, &bytes).unwrap();
        let p = Persistence::open(&state, CbtPersistence::CleanStop).unwrap();
        let e = engine();
        assert_eq!(
            attach(&p, &e, &path, CbtPersistence::CleanStop, true),
            Ok(GenerationReason::RecordCorrupt)
        );
    }

    #[test]
    fn a_changed_file_is_changed_while_detached_and_another_one_is_missing() {
        let (dir, path) = setup();
        let state = dir.path().join("state");
        let p = Persistence::open(&state, CbtPersistence::CleanStop).unwrap();
        let e = engine();
        attach(&p, &e, &path, CbtPersistence::CleanStop, false).unwrap();
        p.save(&e.detach("d").unwrap(), false);
        assert!(
            p.recorded_devices().is_empty(),
            "detached: not re-attached at start"
        );
        // Unchanged: a later attach restores it.
        assert_eq!(
            attach(&p, &e, &path, CbtPersistence::CleanStop, false),
            Ok(GenerationReason::Restored)
        );
        p.save(&e.detach("d").unwrap(), false);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(
            attach(&p, &e, &path, CbtPersistence::CleanStop, false),
            Ok(GenerationReason::ChangedWhileDetached)
        );
        p.save(&e.detach("d").unwrap(), true);
        // Another file at the path: at start it is missing, not attached.
        // (Made before the old one goes, so its inode is another.)
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![0u8; SIZE as usize]).unwrap();
        std::fs::rename(&other, &path).unwrap();
        let why = attach(&p, &e, &path, CbtPersistence::CleanStop, true).unwrap_err();
        assert!(why.contains("identity changed"), "{why}");
        assert_eq!(p.missing().len(), 1);
        assert!(p.forget_missing("d"));
        assert!(p.missing().is_empty());
        assert!(p.records().is_empty(), "forgotten for good");
    }

    #[test]
    fn a_state_dir_through_a_symlink_or_not_writable_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = Persistence::open(&link, CbtPersistence::CleanStop).unwrap_err();
        assert!(
            err.contains("symlinks are refused") && err.contains("link"),
            "{err}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = Persistence::open(&file, CbtPersistence::CleanStop).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        let p = Persistence::open(&real, CbtPersistence::CleanStop);
        assert!(p.is_ok());
        let mode = std::fs::metadata(real.join("devices")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
