//! [`Session`]: the original library's `ISession::Create(devices, storage,
//! limit)`. One call attaches the devices (idempotently), creates their
//! snapshot, gives it its difference storage and takes it; a thread of the
//! session's own, on a connection of its own, gathers the snapshot's events
//! meanwhile; dropping the session destroys the snapshot.
//!
//! Invariants: the snapshot exists exactly as long as the session: a
//! failure inside [`Session::create`] destroys what it created, and the
//! snapshot is created with `auto_destroy`, so that it also goes when the
//! session's process dies. The first error recorded ([`Session::error`])
//! never changes; errors are the events that invalidate an image
//! (`corrupted`: ENOSPC for an overflow, EIO, ETIMEDOUT) and the loss of
//! the snapshot or of the event connection, not `no_space` (a request for
//! more storage, which `corrupted` follows only if none comes) nor
//! `cbt_reset`. A `Session` may be shared between threads: the control
//! connection is behind a mutex, the event thread touches only the shared
//! record.
//!
//! Used by Rust programs and by the C library's `blksnap_session_*`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use blksnap_proto::{Event, ImageInfo, Range, SnapshotCreateArgs, SnapshotInfo};
use uuid::Uuid;

use crate::{Client, Error, Result, TimedEvent};

/// How long one wait of the event thread lasts. Drop does not wait for it:
/// destroying the snapshot ends the wait at once.
const EVENT_WAIT: Duration = Duration::from_secs(1);
/// How much longer than a wait the event connection waits for its reply.
const REPLY_MARGIN: Duration = Duration::from_secs(30);

/// Where a session's difference storage is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionStorage {
    /// A regular file (grown as needed), a directory (an unnamed temporary
    /// file there) or a block device, as `snapshot_create --file`.
    Path(String),
    /// Sector ranges of a block device or file, appended before the take,
    /// as `snapshot_appendstorage`.
    Ranges { device: String, ranges: Vec<Range> },
}

/// What went wrong with a session's snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionError {
    /// When it happened: CLOCK_MONOTONIC in nanoseconds (the event's time;
    /// for a lost connection, when the loss was noticed).
    pub time: i64,
    /// The device whose image is invalid, when the error is about one.
    pub device: Option<String>,
    /// Why: ENOSPC (the storage overflowed), EIO, ETIMEDOUT (a copy timed
    /// out); ENOENT (the snapshot was destroyed by someone else); the
    /// transport's errno for a lost connection.
    pub errno: i32,
    pub message: String,
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the event thread gathered.
#[derive(Debug, Default)]
struct Record {
    events: Vec<TimedEvent>,
    errors: Vec<SessionError>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Set before the snapshot is destroyed: the wait that ends then is no
    /// error.
    stop: AtomicBool,
    record: Mutex<Record>,
}

impl Shared {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        // The record stays consistent at every step: a panic elsewhere
        // does not make it unreadable.
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A taken snapshot of some devices, destroyed when dropped.
pub struct Session {
    client: Mutex<Client>,
    id: Uuid,
    /// The devices as given to [`Session::create`] and their names.
    devices: Vec<(String, String)>,
    images: Vec<ImageInfo>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

/// A path made absolute against this process's working directory
/// (lexically): the daemon has a working directory of its own.
fn absolute(path: &str) -> Result<String> {
    let absolute = std::path::absolute(path)?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| Error::Protocol(format!("{path}: the working directory is not UTF-8")))
}

impl Session {
    /// Connects to the daemon at `control`, attaches `devices` (paths;
    /// already attached ones are fine; a name without '/' must be attached
    /// already), creates their snapshot with its difference storage and
    /// `limit` (bytes; `None`: none), takes it and starts gathering its
    /// events. All or nothing: on failure no snapshot is left (the devices
    /// attached stay attached, as the original's).
    pub fn create(
        control: &Path,
        devices: &[&str],
        storage: SessionStorage,
        limit: Option<u64>,
    ) -> Result<Session> {
        let mut client = Client::connect(control)?;
        let mut named = Vec::with_capacity(devices.len());
        for &device in devices {
            let name = if device.contains('/') {
                client.attach_idempotent(&absolute(device)?, None)?.name
            } else {
                device.to_string()
            };
            named.push((device.to_string(), name));
        }
        let (storage_path, ranges) = match storage {
            SessionStorage::Path(path) => (Some(absolute(&path)?), None),
            SessionStorage::Ranges { device, ranges } => (None, Some((absolute(&device)?, ranges))),
        };
        let id = client.snapshot_create(SnapshotCreateArgs {
            storage: storage_path,
            limit,
            devices: named.iter().map(|(_, name)| name.clone()).collect(),
            on_copy_error: None,
            copy_timeout_ms: None,
            storage_wait_ms: None,
            auto_destroy: true,
            // A session never overwrites a file with content.
            overwrite: false,
        })?;
        let mut session = Session {
            client: Mutex::new(client),
            id,
            devices: named,
            images: Vec::new(),
            shared: Arc::new(Shared::default()),
            thread: None,
        };
        // From here on, dropping `session` destroys the snapshot.
        if let Some((device, ranges)) = ranges {
            session
                .lock()
                .snapshot_append_storage(id, &device, &ranges)?;
        }
        let mut events = Client::connect(control)?;
        events.set_timeout(Some(EVENT_WAIT + REPLY_MARGIN))?;
        let shared = session.shared.clone();
        session.thread = Some(
            std::thread::Builder::new()
                .name("blksnap-session".into())
                .spawn(move || gather(events, id, &shared))?,
        );
        session.lock().snapshot_take(id)?;
        let images = session.lock().snapshot_info(id)?.images;
        session.images = images;
        Ok(session)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The snapshot's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The names of the session's devices, in the order given.
    pub fn devices(&self) -> Vec<&str> {
        self.devices.iter().map(|(_, name)| name.as_str()).collect()
    }

    /// The images as they were right after the take.
    pub fn images(&self) -> &[ImageInfo] {
        &self.images
    }

    /// The image of `device`: as given to [`Session::create`], or its name.
    pub fn image(&self, device: &str) -> Option<&ImageInfo> {
        let (_, name) = self
            .devices
            .iter()
            .find(|(given, name)| given == device || name == device)?;
        self.images.iter().find(|i| &i.device == name)
    }

    /// The first error, if any: the original's `GetError()` (which this
    /// does not consume: it stays the first).
    pub fn error(&self) -> Option<SessionError> {
        self.shared.record().errors.first().cloned()
    }

    /// Every error so far, oldest first.
    pub fn errors(&self) -> Vec<SessionError> {
        self.shared.record().errors.clone()
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<TimedEvent> {
        self.shared.record().events.clone()
    }

    /// The snapshot's state now (storage use, images' errors).
    pub fn info(&self) -> Result<SnapshotInfo> {
        self.lock().snapshot_info(self.id)
    }

    /// More difference storage: sector ranges of a block device or file.
    pub fn append_storage(&self, device: &str, ranges: &[Range]) -> Result<()> {
        self.lock()
            .snapshot_append_storage(self.id, &absolute(device)?, ranges)
    }

    /// Destroys the snapshot now and says how that went (dropping a session
    /// does the same, silently).
    pub fn destroy(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            // Nothing to stop: a create that failed before the thread
            // started, or a second call.
            return self.destroy_once();
        };
        self.shared.stop.store(true, Ordering::Release);
        let destroyed = self.destroy_once();
        // The destroy ended the thread's wait; if it failed, the wait ends
        // within EVENT_WAIT (or the connection is gone).
        let _ = thread.join();
        destroyed
    }

    fn destroy_once(&mut self) -> Result<()> {
        if self.id.is_nil() {
            return Ok(());
        }
        let id = std::mem::replace(&mut self.id, Uuid::nil());
        self.lock().snapshot_destroy(id).map(drop)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A destroy that fails here leaves the daemon's auto_destroy, when
        // this session's connection closes right after.
        let _ = self.finish();
    }
}

/// The event thread: records every event of snapshot `id`, and its errors,
/// until the session stops or the snapshot or the connection is gone.
fn gather(mut client: Client, id: Uuid, shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        match client.snapshot_wait_event_timed(id, EVENT_WAIT) {
            Ok(None) => {}
            Ok(Some(timed)) => {
                let mut record = shared.record();
                if let Event::Corrupted { device, errno } = &timed.event {
                    record.errors.push(SessionError {
                        time: timed.time,
                        device: Some(device.clone()),
                        errno: *errno,
                        message: format!(
                            "the snapshot image of {device} is corrupted: {}",
                            std::io::Error::from_raw_os_error(*errno)
                        ),
                    });
                }
                record.events.push(timed);
            }
            Err(e) => {
                if !shared.stop.load(Ordering::Acquire) {
                    let gone = matches!(&e, Error::Remote(r) if r.name == "ENOENT");
                    shared.record().errors.push(SessionError {
                        time: monotonic_ns(),
                        device: None,
                        errno: e.errno(),
                        message: if gone {
                            format!("snapshot {id} was destroyed by someone else: {e}")
                        } else {
                            format!("the events of snapshot {id} are lost: {e}")
                        },
                    });
                }
                return;
            }
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of the events' times.
pub(crate) fn monotonic_ns() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec)
}
