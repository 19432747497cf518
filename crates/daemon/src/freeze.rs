//! Filesystem freeze around a snapshot take, and the guarantee that no
//! freeze of ours outlives the take, the freeze deadline, the daemon's stop
//! or (at the next start) the daemon itself.
//!
//! Owns: finding the filesystems on our loop devices ([`filesystems_on`],
//! from mountinfo: by the superblock's device number, and by the mount
//! source, which is what names the device of a btrfs, whose superblock has
//! an anonymous device number; every device of a multi-device btrfs
//! counts), freezing each superblock once however many mount points it has
//! (bind mounts, btrfs subvolumes), and thawing ([`Freezer`]).
//!
//! Invariants:
//! - Every FIFREEZE we issue is recorded in the [`Freezer`] before it is
//!   issued, so a stop or the deadline finds it even while the ioctl is
//!   still in the kernel (it is thawed as soon as it returns).
//! - A filesystem is frozen only through a descriptor whose mount, read
//!   back from mountinfo by the descriptor's own mount id, is on our device:
//!   the descriptor pins that mount, so an unmount or mount racing with us
//!   cannot make us freeze another filesystem.
//! - A take's freeze ends at the earliest of: the end of the take, its
//!   deadline (`freeze_timeout_ms`, from the first FIFREEZE), the start of
//!   the daemon's stop. A filesystem thawed before the take ended is not in
//!   the take's `frozen` list, and a warning says its image may be
//!   crash-consistent only.
//!
//! Callers: [`crate::service::Service`] (take and stop), `blksnapd`'s main
//! ([`thaw_leftovers`] at start, [`sync_filesystems_on`] at stop).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};

const FIFREEZE: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 119);
const FITHAW: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 120);

/// How often the stop repeats that it is still waiting for a freeze ioctl.
const STOP_WAIT_REPORT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// mountinfo

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Unique among the mounts that exist (reused only once one is gone).
    pub id: u64,
    /// The superblock's device number (`st_dev`): anonymous (major 0) for
    /// btrfs, overlayfs, tmpfs...
    pub sb_dev: (u32, u32),
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source: the device path for block filesystems.
    pub source: String,
}

/// Parses mountinfo; lines it cannot read are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            // Optional fields (shared:N ...) end at the lone "-".
            let dash = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            let (major, minor) = fields.get(2)?.split_once(':')?;
            Some(Mount {
                id: fields.first()?.parse().ok()?,
                sb_dev: (major.parse().ok()?, minor.parse().ok()?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: unescape(fields.get(dash + 1)?),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

fn read_mountinfo() -> Vec<Mount> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let n = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn split_dev(rdev: u64) -> (u32, u32) {
    (rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

/// A filesystem (one superblock) on our devices, with every mount point it
/// has in our mount namespace, first mounted first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    pub sb_dev: (u32, u32),
    pub mounts: Vec<(u64, PathBuf)>,
}

/// The superblocks mounted from one of `devices` (device numbers), found
/// in `mounts`: by the superblock's device number, or by the mount source
/// (`source_rdev` resolves a source to a device number) being one of
/// `devices` or another device of a btrfs that has one of them
/// (`btrfs_sets`: the device numbers of each btrfs).
pub fn select(
    mounts: &[Mount],
    devices: &[u64],
    btrfs_sets: &[Vec<u64>],
    source_rdev: impl Fn(&str) -> Option<u64>,
) -> Vec<Filesystem> {
    let wanted: HashSet<(u32, u32)> = devices.iter().map(|&d| split_dev(d)).collect();
    let mut sources: HashSet<u64> = devices.iter().copied().collect();
    for set in btrfs_sets {
        if set.iter().any(|d| devices.contains(d)) {
            sources.extend(set);
        }
    }
    let mut found: BTreeMap<(u32, u32), Filesystem> = BTreeMap::new();
    let mut order = Vec::new();
    for m in mounts {
        let on_ours = wanted.contains(&m.sb_dev)
            || (m.source.starts_with("/dev/")
                && source_rdev(&m.source).is_some_and(|r| sources.contains(&r)));
        if !on_ours {
            continue;
        }
        found
            .entry(m.sb_dev)
            .or_insert_with(|| {
                order.push(m.sb_dev);
                Filesystem {
                    sb_dev: m.sb_dev,
                    mounts: Vec::new(),
                }
            })
            .mounts
            .push((m.id, m.mount_point.clone()));
    }
    order
        .into_iter()
        .filter_map(|dev| found.remove(&dev))
        .collect()
}

/// The device numbers of every btrfs's devices, from
/// `/sys/fs/btrfs/<fsid>/devices/<name>` (each a link to the block device).
fn btrfs_device_sets() -> Vec<Vec<u64>> {
    let Ok(filesystems) = std::fs::read_dir("/sys/fs/btrfs") else {
        return Vec::new();
    };
    filesystems
        .flatten()
        .filter_map(|fs| {
            let devices = std::fs::read_dir(fs.path().join("devices")).ok()?;
            let set: Vec<u64> = devices
                .flatten()
                .filter_map(|d| sysfs_dev(&d.path().join("dev")))
                .collect();
            (!set.is_empty()).then_some(set)
        })
        .collect()
}

/// A sysfs `dev` file ("major:minor") as a device number.
fn sysfs_dev(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(rustix::fs::makedev(
        major.parse().ok()?,
        minor.parse().ok()?,
    ))
}

/// The device number of a block device path.
fn block_rdev(path: &str) -> Option<u64> {
    let stat = rustix::fs::stat(path).ok()?;
    (rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::BlockDevice)
        .then_some(stat.st_rdev)
}

/// Filesystems mounted (in our mount namespace) on block devices `devices`.
pub fn filesystems_on(devices: &[u64]) -> Vec<Filesystem> {
    if devices.is_empty() {
        return Vec::new();
    }
    select(&read_mountinfo(), devices, &btrfs_device_sets(), block_rdev)
}

/// Opens a mount point of `fs` and checks, through the descriptor, that it
/// is that filesystem: the descriptor's mount (by its id, which the
/// descriptor keeps from being reused) is in mountinfo on `fs`'s
/// superblock. The first mount point that passes wins. Errors say why none
/// did.
fn open_verified(fs: &Filesystem) -> Result<(PathBuf, File), String> {
    let mut why = Vec::new();
    for (_, mount_point) in &fs.mounts {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(mount_point)
        {
            Ok(f) => f,
            Err(e) => {
                why.push(format!("{}: {e}", mount_point.display()));
                continue;
            }
        };
        let mnt_id = match rustix::fs::statx(
            &file,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::MNT_ID,
        ) {
            Ok(st) => st.stx_mnt_id,
            Err(e) => {
                why.push(format!("{}: statx: {e}", mount_point.display()));
                continue;
            }
        };
        let now = read_mountinfo();
        match now.iter().find(|m| m.id == mnt_id) {
            Some(m) if m.sb_dev == fs.sb_dev => return Ok((mount_point.clone(), file)),
            Some(m) => why.push(format!(
                "{} is now another filesystem ({} {})",
                mount_point.display(),
                m.fstype,
                m.source
            )),
            None => why.push(format!("{} is no longer mounted", mount_point.display())),
        }
    }
    Err(why.join("; "))
}

fn ioctl_int(file: &File, code: Opcode) -> rustix::io::Result<()> {
    let mut arg: std::ffi::c_int = 0;
    match code {
        FIFREEZE => {
            // SAFETY: FIFREEZE takes a pointer to an int it ignores; `arg` is
            // valid for the call.
            unsafe {
                rustix::ioctl::ioctl(file, rustix::ioctl::Updater::<FIFREEZE, _>::new(&mut arg))
            }
        }
        _ => {
            // SAFETY: FITHAW likewise takes a pointer to an ignored int.
            unsafe {
                rustix::ioctl::ioctl(file, rustix::ioctl::Updater::<FITHAW, _>::new(&mut arg))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The freezer

/// Why a filesystem was thawed before its take ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Early {
    Deadline,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// FIFREEZE issued and not returned yet.
    Freezing,
    Frozen,
    /// FITHAW issued and not returned yet.
    Thawing,
    /// Thawed, or never frozen.
    Done,
}

struct Entry {
    mount_point: PathBuf,
    file: Arc<File>,
    phase: Phase,
    /// Set when the deadline or the stop came first.
    early: Option<Early>,
    /// Frozen at some point (FIFREEZE succeeded).
    was_frozen: bool,
}

#[derive(Default)]
struct TakeState {
    entries: Vec<Entry>,
    /// The deadline or the stop came: nothing more is frozen for this take.
    ended: Option<Early>,
    /// The take ended normally (its own thaw began).
    finished: bool,
}

#[derive(Default)]
struct State {
    stopping: bool,
    next: u64,
    takes: HashMap<u64, TakeState>,
}

impl State {
    fn busy(&self) -> Vec<PathBuf> {
        self.takes
            .values()
            .flat_map(|t| &t.entries)
            .filter(|e| matches!(e.phase, Phase::Freezing | Phase::Frozen | Phase::Thawing))
            .map(|e| e.mount_point.clone())
            .collect()
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the take `id` ended early (`why`): its frozen filesystems are
    /// set thawing and returned, to be thawed with [`Self::thaw`]; the ones
    /// still freezing are thawed by their freezer when FIFREEZE returns.
    fn end_early(state: &mut State, id: u64, why: Early) -> Vec<(u64, usize, Arc<File>)> {
        let Some(take) = state.takes.get_mut(&id) else {
            return Vec::new();
        };
        if take.finished {
            return Vec::new();
        }
        take.ended.get_or_insert(why);
        let mut to_thaw = Vec::new();
        for (i, e) in take.entries.iter_mut().enumerate() {
            match e.phase {
                Phase::Frozen => {
                    e.phase = Phase::Thawing;
                    e.early = Some(why);
                    to_thaw.push((id, i, e.file.clone()));
                }
                Phase::Freezing => {
                    e.early.get_or_insert(why);
                }
                Phase::Thawing | Phase::Done => {}
            }
        }
        to_thaw
    }

    /// FITHAW outside the lock (it writes the superblock on ext4, which
    /// may take a while), then marks each entry done.
    fn thaw(&self, entries: Vec<(u64, usize, Arc<File>)>) {
        for (id, i, file) in entries {
            let result = ioctl_int(&file, FITHAW);
            let mut state = self.lock();
            if let Some(e) = state.takes.get_mut(&id).and_then(|t| t.entries.get_mut(i)) {
                match result {
                    Ok(()) => {
                        tracing::info!(mount = %e.mount_point.display(), early = ?e.early, "filesystem thawed")
                    }
                    Err(err) => {
                        tracing::error!(mount = %e.mount_point.display(), error = %err, "cannot thaw filesystem")
                    }
                }
                e.phase = Phase::Done;
            }
            drop(state);
            self.changed.notify_all();
        }
    }
}

/// Every freeze the daemon holds; shared by the takes and the stop.
pub struct Freezer {
    /// `None`: no deadline (the freeze still ends with the take).
    timeout: Option<Duration>,
    inner: Arc<Inner>,
}

impl Freezer {
    pub fn new(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            inner: Arc::default(),
        }
    }

    /// Freezes `filesystems` for one take, each once, and starts the
    /// take's deadline. Filesystems that cannot be frozen get a warning in
    /// the result of [`Freeze::thaw`].
    pub fn freeze(&self, filesystems: &[Filesystem]) -> Freeze {
        let mut warnings = Vec::new();
        let id = {
            let mut state = self.inner.lock();
            state.next += 1;
            let id = state.next;
            let mut take = TakeState::default();
            if state.stopping {
                take.ended = Some(Early::Stop);
            }
            state.takes.insert(id, take);
            id
        };
        let mut freeze = Freeze {
            id,
            inner: self.inner.clone(),
            timeout: self.timeout,
            warnings: Vec::new(),
            done: None,
        };
        if filesystems.is_empty() {
            return freeze;
        }
        if let Some(timeout) = self.timeout {
            let inner = self.inner.clone();
            let started = Instant::now();
            let spawned = std::thread::Builder::new()
                .name("freeze-deadline".into())
                .spawn(move || deadline(&inner, id, started + timeout));
            if let Err(e) = spawned {
                // No watchdog, no freeze: a freeze must never outlive us.
                let w = format!(
                    "cannot start the freeze deadline ({e}): taking the snapshot without freezing"
                );
                tracing::error!("{w}");
                self.inner.lock().takes.get_mut(&id).unwrap().ended = Some(Early::Deadline);
                warnings.push(w);
            }
        }
        for fs in filesystems {
            let first = fs.mounts[0].1.display().to_string();
            let ended = self.inner.lock().takes[&id].ended;
            if let Some(why) = ended {
                warnings.push(format!(
                    "the filesystem at {first} was not frozen: {}; its image may be crash-consistent only",
                    self.reason(why)
                ));
                continue;
            }
            let (mount_point, file) = match open_verified(fs) {
                Ok(found) => found,
                Err(why) => {
                    let w = format!(
                        "cannot freeze the filesystem at {first}: {why}; taking the snapshot anyway"
                    );
                    tracing::warn!("{w}");
                    warnings.push(w);
                    continue;
                }
            };
            let file = Arc::new(file);
            let index = {
                let mut state = self.inner.lock();
                let take = state.takes.get_mut(&id).unwrap();
                take.entries.push(Entry {
                    mount_point: mount_point.clone(),
                    file: file.clone(),
                    phase: Phase::Freezing,
                    early: take.ended,
                    was_frozen: false,
                });
                take.entries.len() - 1
            };
            let result = ioctl_int(&file, FIFREEZE);
            let mut state = self.inner.lock();
            let e = &mut state.takes.get_mut(&id).unwrap().entries[index];
            match result {
                Ok(()) => {
                    e.was_frozen = true;
                    tracing::info!(mount = %mount_point.display(), "filesystem frozen for the take");
                    if e.early.is_some() {
                        // The deadline or the stop came while FIFREEZE ran.
                        e.phase = Phase::Thawing;
                        drop(state);
                        self.inner.thaw(vec![(id, index, file)]);
                    } else {
                        e.phase = Phase::Frozen;
                    }
                }
                Err(err) => {
                    e.phase = Phase::Done;
                    e.early = None;
                    drop(state);
                    self.inner.changed.notify_all();
                    let w = format!(
                        "cannot freeze the filesystem at {}: {err}; taking the snapshot anyway",
                        mount_point.display()
                    );
                    tracing::warn!("{w}");
                    warnings.push(w);
                }
            }
        }
        freeze.warnings = warnings;
        freeze
    }

    fn reason(&self, why: Early) -> String {
        reason(self.timeout, why)
    }

    /// The stop begins: nothing is frozen any more, and what is frozen is
    /// thawed now, on a thread of its own (FITHAW may wait for I/O). See
    /// [`Self::wait_thawed`].
    pub fn begin_stop(&self) {
        let to_thaw = {
            let mut state = self.inner.lock();
            if state.stopping {
                return;
            }
            state.stopping = true;
            let ids: Vec<u64> = state.takes.keys().copied().collect();
            ids.into_iter()
                .flat_map(|id| Inner::end_early(&mut state, id, Early::Stop))
                .collect::<Vec<_>>()
        };
        if to_thaw.is_empty() {
            return;
        }
        tracing::warn!(
            count = to_thaw.len(),
            "stopping: thawing the filesystems frozen for a take in progress"
        );
        let inner = self.inner.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("freeze-stop".into())
            .spawn({
                let to_thaw = to_thaw.clone();
                move || inner.thaw(to_thaw)
            })
        {
            tracing::error!(error = %e, "cannot start a thread to thaw: thawing here");
            self.inner.thaw(to_thaw);
        }
    }

    /// Begins the stop if not yet begun and waits until no filesystem is
    /// frozen, freezing or thawing. Waits as long as that takes: a FIFREEZE
    /// or FITHAW still in the kernel waits for I/O on our own devices,
    /// which only this process serves, so exiting would leave it (and the
    /// filesystem) hanging for good; it is reported every 10 s.
    pub fn wait_thawed(&self) {
        self.begin_stop();
        let mut state = self.inner.lock();
        loop {
            let busy = state.busy();
            if busy.is_empty() {
                return;
            }
            tracing::error!(
                mounts = ?busy,
                "stop waits for a freeze or thaw of these filesystems to return (their device's I/O is stuck)"
            );
            state = self
                .inner
                .changed
                .wait_timeout(state, STOP_WAIT_REPORT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn reason(timeout: Option<Duration>, why: Early) -> String {
    match why {
        Early::Deadline => format!(
            "the freeze deadline (freeze_timeout_ms = {}) passed before the take finished",
            timeout.map_or(0, |t| t.as_millis())
        ),
        Early::Stop => "the daemon is stopping".to_string(),
    }
}

/// The deadline of take `id`: thaws it then, unless it ended first.
fn deadline(inner: &Inner, id: u64, at: Instant) {
    let mut state = inner.lock();
    loop {
        match state.takes.get(&id) {
            Some(t) if !t.finished => {}
            _ => return,
        }
        let now = Instant::now();
        if now >= at {
            break;
        }
        state = inner
            .changed
            .wait_timeout(state, at - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let to_thaw = Inner::end_early(&mut state, id, Early::Deadline);
    drop(state);
    if !to_thaw.is_empty() {
        tracing::warn!(
            count = to_thaw.len(),
            "freeze deadline passed before the take finished: thawing"
        );
    }
    inner.thaw(to_thaw);
}

/// One take's freeze; [`Freeze::thaw`] (or drop) ends it.
pub struct Freeze {
    id: u64,
    inner: Arc<Inner>,
    timeout: Option<Duration>,
    warnings: Vec<String>,
    done: Option<(Vec<String>, Vec<String>)>,
}

impl Freeze {
    /// Ends the freeze once the take is over: thaws what is still frozen,
    /// waits for thaws in flight (the deadline's, the stop's), and returns
    /// the mount points that stayed frozen through the take and the
    /// warnings (also for each filesystem thawed before the take ended).
    pub fn thaw(mut self) -> (Vec<String>, Vec<String>) {
        self.end()
    }

    fn end(&mut self) -> (Vec<String>, Vec<String>) {
        if let Some(done) = &self.done {
            return done.clone();
        }
        let to_thaw: Vec<_> = {
            let mut state = self.inner.lock();
            let take = state.takes.get_mut(&self.id).expect("a live take");
            take.finished = true;
            take.entries
                .iter_mut()
                .enumerate()
                .filter(|(_, e)| e.phase == Phase::Frozen)
                .map(|(i, e)| {
                    e.phase = Phase::Thawing;
                    (self.id, i, e.file.clone())
                })
                .collect()
        };
        self.inner.changed.notify_all();
        self.inner.thaw(to_thaw);
        let mut state = self.inner.lock();
        while state.takes[&self.id]
            .entries
            .iter()
            .any(|e| e.phase != Phase::Done)
        {
            state = self
                .inner
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let take = state.takes.remove(&self.id).expect("a live take");
        drop(state);
        self.inner.changed.notify_all();
        let mut frozen = Vec::new();
        let mut warnings = std::mem::take(&mut self.warnings);
        for e in take.entries.into_iter().filter(|e| e.was_frozen) {
            match e.early {
                None => frozen.push(e.mount_point.display().to_string()),
                Some(why) => warnings.push(format!(
                    "the filesystem at {} was thawed before the take: {}; its image may be crash-consistent only",
                    e.mount_point.display(),
                    reason(self.timeout, why)
                )),
            }
        }
        self.done = Some((frozen, warnings));
        self.done.clone().unwrap()
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        self.end();
    }
}

// ---------------------------------------------------------------------------
// Start and stop

/// The loop devices whose backing file is under `fuse_dir`, as (device
/// name, device number), from `/sys/block/loop*/loop/backing_file`.
pub fn loops_backed_under(fuse_dir: &Path) -> Vec<(String, u64)> {
    let dir = if fuse_dir.is_absolute() {
        fuse_dir.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(fuse_dir)
    };
    let Ok(blocks) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    blocks
        .flatten()
        .filter_map(|b| {
            let name = b.file_name().into_string().ok()?;
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(b.path().join("loop/backing_file")).ok()?;
            let backing = Path::new(backing.trim_end_matches('\n'));
            if !backing.starts_with(&dir) {
                return None;
            }
            Some((format!("/dev/{name}"), sysfs_dev(&b.path().join("dev"))?))
        })
        .collect()
}

/// At start, before anything else touches them (before leftover loop
/// devices are detached and the FUSE directory is unmounted): thaws every
/// filesystem on a loop device over a file in `fuse_dir`, which only an
/// earlier daemon that died can have left (frozen, maybe, mid-take).
/// Returns the mount points thawed.
pub fn thaw_leftovers(fuse_dir: &Path) -> Vec<PathBuf> {
    let loops = loops_backed_under(fuse_dir);
    let rdevs: Vec<u64> = loops.iter().map(|(_, r)| *r).collect();
    let mut thawed = Vec::new();
    for fs in filesystems_on(&rdevs) {
        let (mount_point, file) = match open_verified(&fs) {
            Ok(found) => found,
            Err(why) => {
                tracing::warn!(%why, "cannot check a filesystem on a leftover loop device for a freeze");
                continue;
            }
        };
        match ioctl_int(&file, FITHAW) {
            Ok(()) => {
                tracing::warn!(mount = %mount_point.display(), "thawed a filesystem left frozen on a loop device of an earlier blksnapd");
                thawed.push(mount_point);
            }
            // Not frozen.
            Err(Errno::INVAL) => {}
            Err(e) => {
                tracing::error!(mount = %mount_point.display(), error = %e, "cannot thaw a filesystem on a loop device of an earlier blksnapd")
            }
        }
    }
    thawed
}

/// At stop, before the origins are flushed: writes a filesystem mounted
/// on one of `devices` still holds (a forced stop) go down to the device.
pub fn sync_filesystems_on(devices: &[u64]) {
    for fs in filesystems_on(devices) {
        match open_verified(&fs).and_then(|(mp, f)| {
            rustix::fs::syncfs(&f).map_err(|e| format!("{}: syncfs: {e}", mp.display()))
        }) {
            Ok(()) => {}
            Err(why) => tracing::error!(%why, "cannot flush a filesystem on a loop device at stop"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
31 22 7:3 / /mnt/a rw,relatime shared:12 - ext4 /dev/loop3 rw
32 22 7:3 /sub /srv/bind\\040point rw,relatime shared:12 - ext4 /dev/loop3 rw
40 22 0:45 / /mnt/b rw,relatime shared:20 - btrfs /dev/loop4 rw,space_cache=v2,subvolid=5,subvol=/
41 22 0:45 /vol /mnt/b\\134vol rw,relatime - btrfs /dev/loop4 rw,subvolid=256,subvol=/vol
50 22 0:46 / /mnt/multi rw,relatime - btrfs /dev/loop5 rw
60 22 0:50 / /tmp rw - tmpfs tmpfs rw
61 22 7:9 / /mnt/other rw - xfs /dev/loop9 rw
garbage line
";

    fn dev(major: u32, minor: u32) -> u64 {
        rustix::fs::makedev(major, minor)
    }

    fn by_name(source: &str) -> Option<u64> {
        source
            .strip_prefix("/dev/loop")
            .and_then(|n| n.parse().ok())
            .map(|n| dev(7, n))
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/short\04"), r"/short\04");
    }

    #[test]
    fn mountinfo_fields() {
        let m = parse_mountinfo(INFO);
        assert_eq!(m.len(), 8, "the garbage line is skipped: {m:?}");
        assert_eq!(m[2].id, 32);
        assert_eq!(m[2].sb_dev, (7, 3));
        assert_eq!(m[2].mount_point, PathBuf::from("/srv/bind point"));
        assert_eq!(m[2].source, "/dev/loop3");
        assert_eq!(m[4].mount_point, PathBuf::from("/mnt/b\\vol"));
        assert_eq!(m[4].fstype, "btrfs");
        // No optional fields before the "-".
        assert_eq!(m[6].fstype, "tmpfs");
    }

    #[test]
    fn bind_mounts_are_one_filesystem() {
        let found = select(&parse_mountinfo(INFO), &[dev(7, 3)], &[], by_name);
        assert_eq!(
            found,
            vec![Filesystem {
                sb_dev: (7, 3),
                mounts: vec![
                    (31, PathBuf::from("/mnt/a")),
                    (32, PathBuf::from("/srv/bind point"))
                ],
            }]
        );
    }

    #[test]
    fn btrfs_by_source_and_device_list() {
        let mounts = parse_mountinfo(INFO);
        // Anonymous superblock device: found by the mount source.
        let found = select(&mounts, &[dev(7, 4)], &[], by_name);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].sb_dev, (0, 45));
        assert_eq!(found[0].mounts.len(), 2);
        // A btrfs over loop5 and loop6, mounted by loop5: ours through
        // loop6 too.
        let sets = vec![vec![dev(7, 5), dev(7, 6)]];
        let found = select(&mounts, &[dev(7, 6)], &sets, by_name);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].mounts, vec![(50, PathBuf::from("/mnt/multi"))]);
        // Nothing of another device, nor of sources that are no device.
        assert!(select(&mounts, &[dev(7, 8)], &sets, by_name).is_empty());
        let all = select(&mounts, &[dev(7, 3), dev(7, 4), dev(7, 9)], &[], by_name);
        let devs: Vec<_> = all.iter().map(|f| f.sb_dev).collect();
        assert_eq!(devs, vec![(7, 3), (0, 45), (7, 9)]);
    }

    #[test]
    fn an_empty_freeze_ends_at_once() {
        let freezer = Freezer::new(Some(Duration::from_millis(10)));
        let (frozen, warnings) = freezer.freeze(&[]).thaw();
        assert!(frozen.is_empty() && warnings.is_empty());
        freezer.wait_thawed();
    }

    #[test]
    fn no_freeze_after_the_stop_began() {
        let freezer = Freezer::new(None);
        freezer.begin_stop();
        let fs = Filesystem {
            sb_dev: (7, 99),
            mounts: vec![(1, PathBuf::from("/nonexistent/mount"))],
        };
        let (frozen, warnings) = freezer.freeze(&[fs]).thaw();
        assert!(frozen.is_empty());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("was not frozen: the daemon is stopping")
                && warnings[0].contains("crash-consistent only"),
            "{warnings:?}"
        );
    }
}
