//! The FUSE filesystem: a root directory with one file per tracked device
//! and a `snapshot/` directory with one file per snapshot image, each file
//! the size of its volume. Reads and writes go to the engine; fsync flushes;
//! fallocate punch-hole and zero-range become discard and write-zeroes.
//! Files are opened in direct-I/O mode so the page cache never holds stale
//! data (the same volumes are served over NBD) and loop devices can use
//! direct I/O on them; that direct I/O is asynchronous (`FUSE_ASYNC_DIO`),
//! so a loop device's queued requests reach the daemon together. Inode
//! numbers are handed out per name and stay stable while the daemon runs.
//!
//! Volumes do not stall each other. A FUSE thread runs an I/O request
//! (read, write, fsync, fallocate) itself only while another FUSE thread is
//! left to read requests (`INLINE_MAX` of them run requests at most); past
//! that, it queues the request on its volume's [`Lane`], whose workers run
//! it and reply. So a volume whose I/O blocks (a copy-on-write to a
//! difference storage that stops answering) ties up at most `INLINE_MAX`
//! FUSE threads and its own lane; the last FUSE thread still reads the
//! other volumes' requests and hands them to their lanes. Running requests
//! on the FUSE thread while it can keeps the common case free of a thread
//! hand-off, which costs about as much daemon CPU as the request itself
//! (docs/performance.md). In the kernel, asynchronous direct I/O requests
//! are "background" requests, capped per FUSE connection
//! (`max_background`): past it, every file's requests wait, so the cap is
//! set far above what the stalled loop devices of a few volumes can have in
//! flight.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::lane::Lane;
use blksnap_engine::volume::{image_device, image_name};
use blksnap_engine::{Engine, Volume};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};

const ROOT: u64 = 1;
const SNAPSHOT_DIR: u64 = 2;
const SNAPSHOT_DIR_NAME: &str = "snapshot";
/// Attributes may change (volumes come and go): keep kernel caching short.
const TTL: Duration = Duration::from_secs(1);
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
/// Worker threads of one volume's lane: its requests run at once.
pub const LANE_WORKERS: usize = 4;
/// FUSE threads that may run an I/O request themselves at one time: all
/// but one of them (`crate::FUSE_THREADS`), which keeps reading.
const INLINE_MAX: usize = crate::FUSE_THREADS - 1;
/// A lane's worker ends after this long without a request.
const LANE_IDLE: Duration = Duration::from_secs(10);
/// Background requests in flight over the connection (the kernel's cap;
/// fuser asks for 16 by default, the kernel's own is 12). A loop device
/// queues up to 128 requests (the loop module's `hw_queue_depth`), each at
/// most 2 FUSE requests: 4096 holds the full queues of 16 stalled loop
/// devices with room to spare for the others.
pub const MAX_BACKGROUND: u16 = 4096;

thread_local! {
    /// The read buffer of a FUSE thread or lane worker, as large as its
    /// largest read so far (at most `max_write`, 1 MiB).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub struct VolumeFs {
    engine: Arc<Engine>,
    inodes: Mutex<Inodes>,
    open: RwLock<OpenFiles>,
    /// FUSE threads running an I/O request now (at most `INLINE_MAX`).
    inline: AtomicUsize,
    next_handle: AtomicU64,
    started: SystemTime,
}

/// Open files: the volume is resolved once at open, so the I/O path never
/// takes the engine's registry lock. Invariant: a lane is in `lanes` while
/// a handle holds it, so every open file of a volume shares one lane.
#[derive(Default)]
struct OpenFiles {
    handles: HashMap<u64, Handle>,
    lanes: HashMap<String, Arc<Lane>>,
}

struct InlineTurn<'a>(&'a AtomicUsize);

impl Drop for InlineTurn<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone)]
struct Handle {
    volume: Volume,
    lane: Arc<Lane>,
}

#[derive(Default)]
struct Inodes {
    by_name: HashMap<String, u64>,
    by_ino: HashMap<u64, String>,
}

fn errno(e: &blksnap_engine::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl VolumeFs {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            inodes: Mutex::new(Inodes::default()),
            open: RwLock::new(OpenFiles::default()),
            inline: AtomicUsize::new(0),
            next_handle: AtomicU64::new(1),
            started: SystemTime::now(),
        }
    }

    fn ino(&self, name: &str) -> u64 {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(&ino) = inodes.by_name.get(name) {
            return ino;
        }
        let ino = 3 + inodes.by_name.len() as u64;
        inodes.by_name.insert(name.to_string(), ino);
        inodes.by_ino.insert(ino, name.to_string());
        ino
    }

    fn volume(&self, ino: u64) -> Option<Volume> {
        let name = self.inodes.lock().unwrap().by_ino.get(&ino).cloned()?;
        self.engine.volume(&name)
    }

    fn handle(&self, fh: FileHandle) -> Option<Handle> {
        self.open.read().unwrap().handles.get(&fh.0).cloned()
    }

    /// A turn to run an I/O request on this FUSE thread, if fewer than
    /// `INLINE_MAX` FUSE threads run one; given back when dropped.
    fn inline_turn(&self) -> Option<InlineTurn<'_>> {
        self.inline
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < INLINE_MAX).then_some(n + 1)
            })
            .ok()
            .map(|_| InlineTurn(&self.inline))
    }

    /// Runs `job` here if this FUSE thread may (see the module's comment),
    /// else on the volume's lane.
    fn dispatch(&self, lane: &Arc<Lane>, job: impl FnOnce() + Send + 'static) {
        match self.inline_turn() {
            Some(_turn) => job(),
            None => lane.submit(Box::new(job)),
        }
    }

    fn dir_attr(&self, ino: u64) -> FileAttr {
        self.attr(ino, FileType::Directory, 0, 0o755)
    }

    fn file_attr(&self, ino: u64, volume: &Volume) -> FileAttr {
        self.attr(ino, FileType::RegularFile, volume.size(), 0o600)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Names listed in a directory: devices in the root, images in
    /// `snapshot/`.
    fn entries(&self, dir: u64) -> Vec<(u64, FileType, String)> {
        let names = self.engine.volume_names();
        let mut out = Vec::new();
        for name in names {
            match (dir, image_device(&name)) {
                (ROOT, None) => out.push((self.ino(&name), FileType::RegularFile, name.clone())),
                (SNAPSHOT_DIR, Some(device)) => {
                    out.push((self.ino(&name), FileType::RegularFile, device.to_string()))
                }
                _ => {}
            }
        }
        if dir == ROOT {
            out.push((SNAPSHOT_DIR, FileType::Directory, SNAPSHOT_DIR_NAME.into()));
        }
        out
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests: up to 1 MiB per read or write.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // A loop device with direct I/O submits its requests as async
        // kiocbs from one worker thread. Without FUSE_ASYNC_DIO the kernel
        // serves each of them synchronously, so the loop device keeps one
        // request in flight whatever its queue depth.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::warn!("kernel without FUSE_ASYNC_DIO: direct I/O one request at a time");
        }
        // Those requests count against max_background; at the cap, new
        // ones of every file wait until one is answered. A stalled volume
        // must not be able to fill it (see the module's comment).
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        if parent.0 == ROOT && name == SNAPSHOT_DIR_NAME {
            return reply.entry(&TTL, &self.dir_attr(SNAPSHOT_DIR), Generation(0));
        }
        let full = match parent.0 {
            ROOT => name.to_string(),
            SNAPSHOT_DIR => image_name(name),
            _ => return reply.error(Errno::ENOENT),
        };
        match self.engine.volume(&full) {
            Some(volume) => {
                let ino = self.ino(&full);
                reply.entry(&TTL, &self.file_attr(ino, &volume), Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            ROOT | SNAPSHOT_DIR => reply.attr(&TTL, &self.dir_attr(ino.0)),
            i => match self.volume(i) {
                Some(v) => reply.attr(&TTL, &self.file_attr(i, &v)),
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.volume(ino.0) {
            Some(volume) => {
                let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
                let mut open = self.open.write().unwrap();
                let name = volume.name();
                let lane = open
                    .lanes
                    .entry(name.clone())
                    .or_insert_with(|| Lane::new(&name, LANE_WORKERS, LANE_IDLE))
                    .clone();
                open.handles.insert(fh, Handle { volume, lane });
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut open = self.open.write().unwrap();
        if let Some(gone) = open.handles.remove(&fh.0) {
            let shared = open
                .handles
                .values()
                .any(|h| Arc::ptr_eq(&h.lane, &gone.lane));
            if !shared {
                // Its workers end on their own once idle.
                open.lanes.remove(&gone.volume.name());
            }
        }
        drop(open);
        reply.ok()
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(Handle { volume, lane }) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        // Reads past the end are short, as on a file.
        let len = (size as u64).min(volume.size().saturating_sub(offset)) as usize;
        self.dispatch(&lane, move || {
            READ_BUF.with_borrow_mut(|buf| {
                // One buffer per thread, zeroed once when it grows: no
                // allocation and no memset of up to 1 MiB per read.
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                let buf = &mut buf[..len];
                match volume.read(buf, offset) {
                    Ok(()) => reply.data(buf),
                    Err(e) => {
                        tracing::debug!(volume = %volume.name(), error = %e, "FUSE read failed");
                        reply.error(errno(&e))
                    }
                }
            })
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(Handle { volume, lane }) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > volume.size())
        {
            // A block device does not grow.
            return reply.error(Errno::ENOSPC);
        }
        let write = move |volume: &Volume, data: &[u8], reply: ReplyWrite| match volume
            .write(data, offset)
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::debug!(volume = %volume.name(), error = %e, "FUSE write failed");
                reply.error(errno(&e))
            }
        };
        if let Some(_turn) = self.inline_turn() {
            return write(&volume, data, reply);
        }
        // The data is in this FUSE thread's request buffer, which it reuses
        // for the next request as soon as this returns.
        let data = data.to_vec();
        lane.submit(Box::new(move || write(&volume, &data, reply)))
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called at every close: data is written through already.
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(Handle { volume, lane }) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        self.dispatch(&lane, move || match volume.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(Handle { volume, lane }) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        if offset
            .checked_add(length)
            .is_none_or(|end| end > volume.size())
        {
            return reply.error(if mode & FALLOC_FL_KEEP_SIZE != 0 {
                Errno::EINVAL
            } else {
                Errno::EOPNOTSUPP
            });
        }
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0 {
            return if mode & !FALLOC_FL_KEEP_SIZE == 0 {
                // Plain preallocation inside the volume: nothing to do.
                reply.ok()
            } else {
                reply.error(Errno::EOPNOTSUPP)
            };
        }
        self.dispatch(&lane, move || {
            let result = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
                volume.discard(offset, length)
            } else {
                // ZERO_RANGE leaves the range allocated: no hole.
                let how = blksnap_engine::Zeroing {
                    keep_allocated: true,
                    fast_only: false,
                };
                volume.zero_range(offset, length, how)
            };
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT && ino.0 != SNAPSHOT_DIR {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ino.0, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        entries.extend(self.entries(ino.0));
        for (i, (entry_ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry_ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }
}
