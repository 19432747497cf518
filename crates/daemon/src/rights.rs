//! Who a control client is ([`Client`], read off its connection) and the
//! opening of the paths it names with its rights, not the daemon's.
//!
//! blksnapd runs as root; a member of `control_group` is not. Every file or
//! device a client names (difference storage, appended storage, a device to
//! attach) is opened here, in the connection's thread, with that thread's
//! filesystem uid and gid and its supplementary groups switched to the
//! client's for the open only ([`AsClient`]): the kernel then checks the
//! access, symlinks, mount options and LSMs included, exactly as for the
//! client's own open. The open file goes to the engine, which never resolves
//! the path again. Root clients open as the daemon does.
//!
//! Invariants: the switch is per thread (`setfsuid`, `setfsgid` and the raw
//! `setgroups` syscall; never glibc's `setgroups`, which changes every
//! thread) and is undone before [`AsClient`] goes, whatever the open did; a
//! thread that cannot get its own identity back stops the daemon rather
//! than serve on with a client's. Only the open runs switched: loop
//! devices, the state dir and FUSE stay the daemon's.
//!
//! Callers: the control server ([`crate::control`], [`Client::of_peer`]
//! per connection) and the service's request handlers ([`open_rw`],
//! [`open_storage`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use blksnap_proto::ErrorReply;
use rustix::fs::OFlags;
use rustix::process::{Gid, Uid};

/// The credentials of the process at the other end of a control
/// connection, as the kernel recorded them when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Client {
    /// The daemon itself (requests made in-process, devices re-attached at
    /// start): root's rights.
    pub fn daemon() -> Self {
        Self {
            pid: std::process::id() as i32,
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// The peer of a connected Unix socket: `SO_PEERCRED` and
    /// `SO_PEERGROUPS` (Linux 4.13). Without the latter (an older kernel)
    /// the client has no supplementary groups: fewer rights, never more.
    pub fn of_peer(socket: impl AsFd) -> io::Result<Self> {
        let cred = rustix::net::sockopt::socket_peercred(&socket)?;
        let groups = match peer_groups(&socket) {
            Ok(groups) => groups,
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            pid: cred.pid.as_raw_nonzero().get(),
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            groups,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Runs `open` with this thread's filesystem identity the client's
    /// (nothing switched for root).
    fn run_as<T>(&self, open: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        if self.is_root() {
            return open();
        }
        let _as_client = AsClient::enter(self)?;
        open()
    }
}

/// `SO_PEERGROUPS`, which rustix does not wrap: the groups the peer had
/// when it connected.
fn peer_groups(socket: &impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is writable for `len` bytes, which the kernel
        // updates to what it wrote (or, with ERANGE, to what it needs).
        let rc = unsafe {
            libc::getsockopt(
                socket.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// This thread's filesystem identity switched to a client's until drop.
struct AsClient {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<Gid>,
}

#[derive(Clone, Copy)]
enum FsId {
    Uid,
    Gid,
}

/// Sets this thread's filesystem uid or gid; returns the one before.
/// `setfsuid`/`setfsgid` report no error, so the id is read back (an
/// invalid id, -1, changes nothing and returns the current one).
fn set_fs_id(which: FsId, id: u32) -> io::Result<u32> {
    let set = |id: u32| match which {
        // SAFETY: setfsuid and setfsgid change this thread's filesystem
        // credentials only; no memory is involved.
        FsId::Uid => unsafe { libc::setfsuid(id) },
        // SAFETY: as above.
        FsId::Gid => unsafe { libc::setfsgid(id) },
    };
    let old = set(id) as u32;
    if set(u32::MAX) as u32 != id {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(old)
}

impl AsClient {
    fn enter(client: &Client) -> io::Result<Self> {
        let groups = rustix::process::getgroups()?;
        let theirs: Vec<Gid> = client.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        // Per thread: the raw syscall, not glibc's all-threads setgroups.
        rustix::thread::set_thread_groups(&theirs)?;
        // From here on, drop undoes whatever was switched.
        let mut guard = Self {
            fsuid: Uid::ROOT.as_raw(),
            fsgid: Gid::ROOT.as_raw(),
            groups,
        };
        guard.fsgid = set_fs_id(FsId::Gid, client.gid)?;
        guard.fsuid = set_fs_id(FsId::Uid, client.uid)?;
        Ok(guard)
    }
}

impl Drop for AsClient {
    fn drop(&mut self) {
        // The uid first: it gives root's filesystem capabilities back.
        let restored = set_fs_id(FsId::Uid, self.fsuid)
            .and_then(|_| set_fs_id(FsId::Gid, self.fsgid))
            .and_then(|_| rustix::thread::set_thread_groups(&self.groups).map_err(Into::into));
        if let Err(e) = restored {
            // Serving on with a client's identity in one thread would hand
            // its rights to the next client of that thread, or take ours.
            tracing::error!(error = %e, "cannot restore the daemon's filesystem identity after opening as a client: stopping");
            std::process::abort();
        }
    }
}

/// The reply for a failed open of `path` (`what` it was to be).
fn open_error(client: &Client, what: &str, path: &Path, e: io::Error) -> ErrorReply {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    let shown = path.display();
    let message = match errno {
        libc::EACCES | libc::EPERM if !client.is_root() => format!(
            "{what} {shown}: the client (uid {}) may not open it read-write: {e}",
            client.uid
        ),
        libc::EBUSY => format!(
            "{what} {shown} is busy: it is mounted or held open exclusively by another program"
        ),
        _ => format!("cannot open {what} {shown}: {e}"),
    };
    ErrorReply::new(errno, message)
}

/// Where a file open in this process is: the path it was opened at, with
/// every symlink resolved at the time of the open (not now).
pub fn opened_path(file: &File, fallback: &Path) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| fallback.to_path_buf())
}

fn open_flags(path: &Path, flags: OFlags, mode: u32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(mode)
        .custom_flags((flags | OFlags::CLOEXEC).bits() as i32)
        .open(path)
}

/// Opens `path` read-write with the client's rights: a device to attach
/// or to append storage from. Not `O_EXCL`: the engine holds block devices
/// exclusively itself.
pub fn open_rw(client: &Client, path: &Path, what: &str) -> Result<File, ErrorReply> {
    client
        .run_as(|| open_flags(path, OFlags::empty(), 0))
        .map_err(|e| open_error(client, what, path, e))
}

/// Opens a device the state dir records, at start, as root: its client had
/// the right to when it attached it. The recorded path is the one the file
/// was opened at, symlinks resolved, so no symlink is followed now: one
/// there since (a client's, swapped in for the file it attached) does not
/// lead root elsewhere.
pub fn open_recorded(path: &Path) -> Result<File, ErrorReply> {
    rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        OFlags::RDWR | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::NO_SYMLINKS,
    )
    .map(File::from)
    .map_err(|e| {
        let errno = e.raw_os_error();
        let message = if e == rustix::io::Errno::LOOP {
            format!(
                "recorded device {} is reached through a symlink now, which is not followed at start; attach it again",
                path.display()
            )
        } else {
            format!("cannot open recorded device {}: {}", path.display(), io::Error::from(e))
        };
        ErrorReply::new(errno, message)
    })
}

/// Opens a difference storage path with the client's rights: a regular
/// file or block device read-write, a directory as an unnamed O_TMPFILE
/// there (the client's, on its quota). A regular file with content is
/// refused (EEXIST) unless `overwrite`: what it holds would be lost.
pub fn open_storage(client: &Client, path: &Path, overwrite: bool) -> Result<File, ErrorReply> {
    const WHAT: &str = "difference storage";
    let file = client
        .run_as(|| match open_flags(path, OFlags::empty(), 0) {
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                open_flags(path, OFlags::TMPFILE, 0o600)
            }
            other => other,
        })
        .map_err(|e| open_error(client, WHAT, path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| open_error(client, WHAT, path, e))?;
    // An O_TMPFILE has no link: nobody's content.
    if meta.is_file() && meta.nlink() > 0 && !overwrite && blksnap_engine::holds_data(&file) {
        return Err(ErrorReply::new(
            libc::EEXIST,
            format!(
                "{WHAT} {} is a file with content ({} bytes), which would be lost; \
                 give --overwrite (\"overwrite\": true) to use it anyway",
                path.display(),
                meta.len()
            ),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_credentials_are_ours() {
        let (a, _b) = UnixStream::pair().unwrap();
        let client = Client::of_peer(&a).unwrap();
        assert_eq!(client.uid, rustix::process::geteuid().as_raw());
        assert_eq!(client.gid, rustix::process::getegid().as_raw());
        assert_eq!(client.pid, std::process::id() as i32);
        let mut ours: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut theirs = client.groups.clone();
        ours.sort();
        theirs.sort();
        assert_eq!(theirs, ours);
    }

    /// The switch is undone, an open that failed included, and touches no
    /// other thread.
    #[test]
    fn the_identity_comes_back() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED the_identity_comes_back: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let nobody = Client {
            pid: 1,
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let groups_before = rustix::process::getgroups().unwrap();
        let err = open_rw(&nobody, &secret, "device").unwrap_err();
        assert_eq!(err.errno, libc::EACCES, "{}", err.message);
        assert!(err.message.contains("uid 65534"), "{}", err.message);
        assert!(
            err.message.contains(secret.to_str().unwrap()),
            "{}",
            err.message
        );
        // Root's rights are back in this thread.
        open_rw(&Client::daemon(), &secret, "device").unwrap();
        assert_eq!(set_fs_id(FsId::Uid, 0).unwrap(), 0);
        assert_eq!(set_fs_id(FsId::Gid, 0).unwrap(), 0);
        assert_eq!(rustix::process::getgroups().unwrap(), groups_before);

        // While another thread is switched, this one keeps root's rights.
        let switched = std::sync::Barrier::new(2);
        let checked = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                nobody
                    .run_as(|| {
                        switched.wait();
                        checked.wait();
                        Ok(())
                    })
                    .unwrap()
            });
            switched.wait();
            let ours = open_rw(&Client::daemon(), &secret, "device");
            checked.wait();
            ours.unwrap();
        });
    }

    #[test]
    fn storage_with_content_needs_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full");
        std::fs::write(&full, vec![1u8; 4096]).unwrap();
        let me = Client::daemon();
        let err = open_storage(&me, &full, false).unwrap_err();
        assert_eq!(err.errno, libc::EEXIST);
        assert!(err.message.contains("--overwrite"), "{}", err.message);
        open_storage(&me, &full, true).unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        open_storage(&me, &empty, false).unwrap();
        // Reserved or sparse, never written: nothing to lose.
        let reserved = std::fs::File::create(dir.path().join("reserved")).unwrap();
        rustix::fs::fallocate(&reserved, rustix::fs::FallocateFlags::empty(), 0, 1 << 20).unwrap();
        open_storage(&me, &dir.path().join("reserved"), false).unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 20).unwrap();
        open_storage(&me, &dir.path().join("sparse"), false).unwrap();
        // One written block among the holes is content.
        std::os::unix::fs::FileExt::write_all_at(&sparse, b"x", 700 << 10).unwrap();
        let err = open_storage(&me, &dir.path().join("sparse"), false).unwrap_err();
        assert_eq!(err.errno, libc::EEXIST);
        let tmp = open_storage(&me, dir.path(), false).unwrap();
        assert_eq!(tmp.metadata().unwrap().nlink(), 0);
    }
}
