//! [`Journal`]: the engine's [`ChangeJournal`] for one device, keeping the
//! device's files in the state dir true to what was acknowledged.
//!
//! - Every mode: a save at detach or clean stop ends with `<id>.clean`,
//!   made durably; the first save of an attach removes it durably before
//!   the device takes a write (so no runtime write ever has to succeed for
//!   a crash to be detected). No `.clean` at start means the daemon
//!   stopped without saving: the maps on disk are stale.
//! - Write-ahead mode: every change is also appended to `<id>.journal`
//!   before it is visible, and a write waits until the changes it relies on
//!   are on disk. Concurrent waiters share one `fdatasync` (group commit):
//!   whoever finds no sync running syncs everything appended so far, the
//!   others wait for it.
//!
//! A journal that cannot write (full disk, I/O error) never fails a write:
//! it removes the saved state and the journal, so the next start begins a
//! new generation (`record-corrupt`) instead of trusting an incomplete map;
//! if even that fails, the missing `.clean` still makes it `unclean-stop`
//! in clean-stop mode (in write-ahead mode the journal is then short, which
//! is the one case this cannot catch: a state filesystem that fails both a
//! write and an unlink).
//!
//! Invariants: `durable <= appended`; records are written in ticket order
//! (both under `wal`). Callers: the engine's change tracker (record, wait,
//! under the device's write gate) and [`super::StateDir::save`] (with the
//! device's writes held).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use blksnap_engine::{CbtState, Change, ChangeJournal};
use blksnap_proto::CbtPersistence;

use super::format;
use super::DeviceFiles;

#[derive(Debug)]
pub struct Journal {
    device: String,
    mode: CbtPersistence,
    pub(super) files: DeviceFiles,
    /// Set by the first save: before it nothing is promised (the device is
    /// not recorded yet) and the save itself holds every change so far.
    begun: AtomicBool,
    /// Bytes of the saved state, for the checkpoint rule.
    state_len: AtomicU64,
    /// The files were given up after a write error.
    broken: AtomicBool,
    /// Write-ahead: the journal file and where the next record goes.
    wal: Mutex<Option<(Arc<File>, u64)>>,
    appended: AtomicU64,
    durable: AtomicU64,
    /// Write-ahead: written since the last heartbeat; and whether the
    /// heartbeat still owes a look after the writes stopped.
    written: AtomicBool,
    quiet_due: AtomicBool,
    /// Whether a group commit is running.
    syncing: Mutex<bool>,
    synced: Condvar,
}

impl Journal {
    pub(super) fn new(device: &str, mode: CbtPersistence, files: DeviceFiles) -> Self {
        Self {
            device: device.to_string(),
            mode,
            files,
            begun: AtomicBool::new(false),
            state_len: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            wal: Mutex::new(None),
            appended: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            written: AtomicBool::new(false),
            quiet_due: AtomicBool::new(false),
            syncing: Mutex::new(false),
            synced: Condvar::new(),
        }
    }

    pub fn mode(&self) -> CbtPersistence {
        self.mode
    }

    /// What the engine's tracker is given: this journal in write-ahead
    /// mode; nothing in clean-stop mode, where no write has anything to
    /// record (the clean mark is removed before the device takes writes),
    /// so the write path stays as without persistence.
    pub fn engine_hook(self: &Arc<Self>) -> Option<Arc<dyn ChangeJournal>> {
        (self.mode == CbtPersistence::WriteAhead).then(|| self.clone() as Arc<dyn ChangeJournal>)
    }

    /// Whether the heartbeat should look at the device now: it was written
    /// since the last look, or has gone quiet since (one last look).
    pub fn heartbeat_due(&self) -> bool {
        if self.written.swap(false, Ordering::Relaxed) {
            self.quiet_due.store(true, Ordering::Relaxed);
            true
        } else {
            self.quiet_due.swap(false, Ordering::Relaxed)
        }
    }

    /// Writes `state` as the device's saved state (a new epoch) and starts
    /// an empty journal for it; `clean` (detach, stop: nothing writes any
    /// more) then marks it clean, else (attach, checkpoint) the clean mark
    /// is removed first. Called with the device's writes held (or
    /// drained), so `state` is every change.
    pub fn save(&self, state: &CbtState, clean: bool) -> io::Result<()> {
        let mut wal = self.wal.lock().unwrap();
        if !clean {
            self.files.remove("clean")?;
        }
        let epoch = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap());
        let bytes = format::encode_state(state, epoch);
        self.state_len.store(bytes.len() as u64, Ordering::Relaxed);
        self.files.write_atomic("cbt", &bytes)?;
        *wal = None;
        match self.mode {
            CbtPersistence::WriteAhead => {
                self.files
                    .write_atomic("journal", &format::encode_journal_header(epoch))?;
                let file = self.files.open_existing("journal")?;
                *wal = Some((Arc::new(file), format::JOURNAL_HEADER as u64));
            }
            CbtPersistence::CleanStop => self.files.remove("journal")?,
        }
        let done = self.appended.load(Ordering::SeqCst);
        self.durable.fetch_max(done, Ordering::SeqCst);
        drop(wal);
        if clean {
            self.files.create_durably("clean")?;
        }
        self.broken.store(false, Ordering::SeqCst);
        self.begun.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the journal has grown past four saved states (and 1 MiB):
    /// time to fold it into a new saved state.
    pub fn checkpoint_due(&self) -> bool {
        let len = self.wal.lock().unwrap().as_ref().map_or(0, |(_, at)| *at);
        len > 4 * self.state_len.load(Ordering::Relaxed) + (1 << 20)
    }

    /// After a write error: the files can no longer be trusted, so none is
    /// left that a restart could trust. Waiters are released.
    fn give_up(&self, what: &str, error: &io::Error) {
        if self.broken.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(
            device = %self.device,
            error = %error,
            "{what}: its change tracking will restart (record-corrupt) at the next start unless a clean stop saves it"
        );
        for ext in ["cbt", "journal"] {
            if let Err(e) = self.files.remove(ext) {
                tracing::error!(device = %self.device, error = %e, "cannot remove the saved state either");
            }
        }
        self.durable.store(u64::MAX, Ordering::SeqCst);
        let _guard = self.syncing.lock().unwrap();
        self.synced.notify_all();
    }

    /// One fdatasync for every record appended so far, shared by every
    /// waiter that arrives meanwhile.
    fn commit(&self, target: u64) {
        let mut syncing = self.syncing.lock().unwrap();
        loop {
            if self.durable.load(Ordering::SeqCst) >= target {
                return;
            }
            if *syncing {
                syncing = self.synced.wait(syncing).unwrap();
                continue;
            }
            *syncing = true;
            drop(syncing);
            let (file, upto) = {
                let wal = self.wal.lock().unwrap();
                (
                    wal.as_ref().map(|(f, _)| f.clone()),
                    self.appended.load(Ordering::SeqCst),
                )
            };
            if let Some(file) = file {
                match file.sync_data() {
                    Ok(()) => {
                        self.durable.fetch_max(upto, Ordering::SeqCst);
                    }
                    Err(e) => self.give_up("cannot sync the change journal", &e),
                }
            } else {
                self.durable.fetch_max(upto, Ordering::SeqCst);
            }
            syncing = self.syncing.lock().unwrap();
            *syncing = false;
            self.synced.notify_all();
        }
    }
}

/// The engine's hook, in write-ahead mode only ([`Journal::engine_hook`]).
impl ChangeJournal for Journal {
    fn record(&self, change: Change) -> u64 {
        if !self.begun.load(Ordering::SeqCst) {
            return 0;
        }
        let mut wal = self.wal.lock().unwrap();
        let Some((file, offset)) = wal.as_mut() else {
            return 0;
        };
        if let Err(e) = file.write_all_at(&format::encode_record(&change), *offset) {
            drop(wal);
            self.give_up("cannot append to the change journal", &e);
            return 0;
        }
        *offset += format::RECORD as u64;
        self.appended.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn wait(&self, ticket: Option<u64>) {
        if !self.begun.load(Ordering::SeqCst) {
            return;
        }
        // A load first: the store only once per heartbeat.
        if !self.written.load(Ordering::Relaxed) {
            self.written.store(true, Ordering::Relaxed);
        }
        let target = ticket.unwrap_or_else(|| self.appended.load(Ordering::SeqCst));
        if self.durable.load(Ordering::SeqCst) < target {
            self.commit(target);
        }
    }
}

/// Opens a file of ours for appending records, never through a symlink.
pub(super) fn open_nofollow(path: &PathBuf, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}
