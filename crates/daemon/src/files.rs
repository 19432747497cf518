//! The files the daemon creates outside its state directory, made so that
//! no symlink or other user's file can redirect them: the run directories
//! (those of the control socket, its lock file and the NBD socket), the
//! FUSE directory, the lock file and the two Unix sockets.
//!
//! Invariants, for every path handled here:
//! - every existing directory on the way (the path made absolute, each
//!   component checked with lstat) belongs to root or to the daemon's user
//!   and is not writable by other users unless sticky (`/tmp`); a symlink
//!   on the way must belong to root or the daemon's user (`/var/run`), and
//!   the directory itself must not be one. So no other user can swap a
//!   file or directory under the daemon between a check and its use;
//! - directories the daemon creates get mode 0700, or 0750 and the group
//!   of the socket that lives there, set through their descriptor;
//!   directories that exist are used as they are (not chmodded);
//! - a socket is bound in a fresh private 0700 directory, given its mode
//!   and group there (no dependence on the umask, never visible with
//!   another mode), then renamed into place, atomically replacing a stale
//!   one; fchmod on a socket's descriptor would not reach the bound file;
//! - the lock file is opened with `O_NOFOLLOW` and refused unless it is a
//!   regular file of the daemon's user with one link; its mode is set
//!   through its descriptor.
//!
//! Errors name the path and, for a foreign owner, the owner. Callers:
//! `blksnapd`'s main (directories, NBD socket), [`crate::control`] (lock
//! file, control socket).

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::fs::{AtFlags, Gid, Mode, OFlags};

/// Names a file across renames: (device, inode).
pub type FileId = (u64, u64);

pub fn file_id(meta: &Metadata) -> FileId {
    (meta.dev(), meta.ino())
}

/// A group's number, from a number or a name in `/etc/group`; `what`
/// names the setting in the error ("control group").
pub fn group_id(group: &str, what: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("{what} {group:?} does not exist"))
}

/// `uid N (name)`, the name from `/etc/passwd` when it has one.
fn owner(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)?.parse() == Ok(uid)).then(|| name.to_string())
            })
        });
    match name {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

fn trusted(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Refuses a directory (reached at `path`) that another user owns or may
/// change entries of: writable by others, or by a group other than root's,
/// without the sticky bit.
fn check_dir(what: &str, path: &Path, meta: &Metadata) -> Result<(), String> {
    let shown = path.display();
    if !meta.is_dir() {
        return Err(format!("{what}: {shown} is not a directory"));
    }
    if !trusted(meta.uid()) {
        return Err(format!(
            "{what}: directory {shown} belongs to {}, not to root or this daemon's user: refusing to use it",
            owner(meta.uid())
        ));
    }
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    let writable = mode & 0o002 != 0 || (mode & 0o020 != 0 && meta.gid() != 0);
    if writable && !sticky {
        return Err(format!(
            "{what}: directory {shown} (mode {:04o}) is writable by other users: refusing to use it",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// A directory the daemon has checked (or made), held open.
pub struct RunDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// Makes sure `dir` is a directory the daemon may put its files in (see
/// the module's invariants), creating what is missing with mode 0700, or
/// 0750 owned by `group`. `what` names its use in errors ("control socket
/// directory").
pub fn ensure_dir(dir: &Path, group: Option<u32>, what: &str) -> Result<RunDir, String> {
    let dir = std::path::absolute(dir).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
    let mut prefix = PathBuf::new();
    let components: Vec<Component> = dir.components().collect();
    for (i, component) in components.iter().enumerate() {
        prefix.push(component);
        let last = i + 1 == components.len();
        let meta = match std::fs::symlink_metadata(&prefix) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dir(&prefix, group, what)?;
                continue;
            }
            Err(e) => return Err(format!("{what}: cannot check {}: {e}", prefix.display())),
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&prefix)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            if last {
                return Err(format!(
                    "{what} {} is a symlink (to {target}): the daemon does not follow it; give the real path",
                    prefix.display()
                ));
            }
            if !trusted(meta.uid()) {
                return Err(format!(
                    "{what} {}: {} is a symlink (to {target}) owned by {}: refusing to follow it",
                    dir.display(),
                    prefix.display(),
                    owner(meta.uid())
                ));
            }
            // The link's owner is trusted; what it leads to is checked
            // like any directory.
            let followed = std::fs::metadata(&prefix)
                .map_err(|e| format!("{what}: cannot check {}: {e}", prefix.display()))?;
            check_dir(what, &prefix, &followed)?;
        } else {
            check_dir(what, &prefix, &meta)?;
        }
    }
    let fd = open_dir(&dir).map_err(|e| format!("{what}: cannot open {}: {e}", dir.display()))?;
    // Still the directory checked above: nobody else could have replaced
    // it, but a check that costs one fstat is cheap.
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
    if !trusted(st.st_uid) {
        return Err(format!(
            "{what}: directory {} belongs to {}: refusing to use it",
            dir.display(),
            owner(st.st_uid)
        ));
    }
    Ok(RunDir { path: dir, fd })
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// mkdir, then mode and group through the new directory's descriptor (the
/// umask could have taken bits; the group is not inherited).
fn create_dir(path: &Path, group: Option<u32>, what: &str) -> Result<(), String> {
    let shown = path.display();
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        // Made meanwhile (another daemon starting): checked as found.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path)
                .map_err(|e| format!("{what}: cannot check {shown}: {e}"))?;
            return check_dir(what, path, &meta);
        }
        Err(e) => return Err(format!("cannot create {what} {shown}: {e}")),
    }
    let fd = open_dir(path).map_err(|e| format!("cannot open {what} {shown}: {e}"))?;
    set_mode_and_group(&fd, group, 0o700, 0o750)
        .map_err(|e| format!("cannot set the mode of {what} {shown}: {e}"))?;
    tracing::debug!(dir = %shown, group, "created");
    Ok(())
}

fn set_mode_and_group(
    fd: impl AsFd,
    group: Option<u32>,
    alone: u32,
    shared: u32,
) -> io::Result<()> {
    if let Some(gid) = group {
        rustix::fs::fchown(&fd, None, Some(Gid::from_raw(gid)))?;
    }
    let mode = if group.is_some() { shared } else { alone };
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// Private directories of [`RunDir::bind_socket`] in this process.
static PRIVATE_DIRS: AtomicU32 = AtomicU32::new(0);

impl RunDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating it, mode 0600) the lock file `name` in this
    /// directory, never through a symlink; refuses anything but a regular
    /// file of this daemon's user with one link (a hard link to another
    /// file would get truncated).
    pub fn open_lock(&self, name: &str) -> Result<File, String> {
        let path = self.path.join(name);
        let shown = path.display();
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP => {
                format!("lock file {shown} is a symlink: the daemon does not follow it; remove it")
            }
            e => format!("cannot open lock file {shown}: {e}"),
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| format!("lock file {shown}: {e}"))?;
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if kind != rustix::fs::FileType::RegularFile {
            return Err(format!(
                "lock file {shown} is not a regular file ({kind:?}): remove it"
            ));
        }
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return Err(format!(
                "lock file {shown} belongs to {}, not to this daemon's user: remove it",
                owner(st.st_uid)
            ));
        }
        if st.st_nlink != 1 {
            return Err(format!(
                "lock file {shown} has {} hard links: the daemon would truncate another file; remove it",
                st.st_nlink
            ));
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))
            .map_err(|e| format!("cannot set the mode of lock file {shown}: {e}"))?;
        Ok(File::from(fd))
    }

    /// Creates the Unix socket `name` in this directory with mode 0600, or
    /// 0660 owned by `group`, whatever the umask; a stale file of that name
    /// is replaced. Returns the listener and the socket file as bound.
    pub fn bind_socket(
        &self,
        name: &str,
        group: Option<u32>,
        what: &str,
    ) -> Result<(UnixListener, FileId), String> {
        let path = self.path.join(name);
        let shown = path.display();
        let private_name = format!(
            ".blksnapd.{}.{}",
            std::process::id(),
            PRIVATE_DIRS.fetch_add(1, Ordering::Relaxed)
        );
        let private = self.path.join(&private_name);
        let err = |step: &str, e: &dyn std::fmt::Display| {
            format!(
                "cannot create {what} {shown}: {step} {}: {e}",
                private.display()
            )
        };
        // Left by a crashed daemon that had this pid: its own, so ours.
        let _ = rustix::fs::unlinkat(&self.fd, format!("{private_name}/s"), AtFlags::empty());
        let _ = rustix::fs::unlinkat(&self.fd, private_name.as_str(), AtFlags::REMOVEDIR);
        rustix::fs::mkdirat(&self.fd, private_name.as_str(), Mode::from_raw_mode(0o700))
            .map_err(|e| err("mkdir", &e))?;
        let result = (|| {
            let dir = rustix::fs::openat(
                &self.fd,
                private_name.as_str(),
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| err("open", &e))?;
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700)).map_err(|e| err("chmod", &e))?;
            let listener = UnixListener::bind(private.join("s")).map_err(|e| err("bind in", &e))?;
            // In our 0700 directory nothing but our socket can be at "s".
            if let Some(gid) = group {
                rustix::fs::chownat(
                    &dir,
                    "s",
                    None,
                    Some(Gid::from_raw(gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| format!("cannot give {what} {shown} to group {gid}: {e}"))?;
            }
            let mode = if group.is_some() { 0o660 } else { 0o600 };
            rustix::fs::chmodat(&dir, "s", Mode::from_raw_mode(mode), AtFlags::empty())
                .map_err(|e| format!("cannot set the mode of {what} {shown}: {e}"))?;
            let st = rustix::fs::statat(&dir, "s", AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| err("stat in", &e))?;
            let stale = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok();
            rustix::fs::renameat(&dir, "s", &self.fd, name)
                .map_err(|e| format!("cannot create {what} {shown}: rename into place: {e}"))?;
            if stale {
                tracing::info!(socket = %shown, "removed a stale {what} (replaced by the new one)");
            }
            Ok((listener, (st.st_dev, st.st_ino)))
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, format!("{private_name}/s"), AtFlags::empty());
        }
        let _ = rustix::fs::unlinkat(&self.fd, private_name.as_str(), AtFlags::REMOVEDIR);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode_of(meta: &Metadata) -> u32 {
        meta.permissions().mode() & 0o7777
    }

    fn mode(path: &Path) -> u32 {
        mode_of(&std::fs::symlink_metadata(path).unwrap())
    }

    #[test]
    fn missing_directories_are_made_0700_or_0750_with_the_group() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_dir(&dir, None, "test directory").unwrap();
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        let gid = rustix::process::getegid().as_raw();
        let shared = tmp.path().join("c/d");
        ensure_dir(&shared, Some(gid), "test directory").unwrap();
        assert_eq!(mode(&shared), 0o750);
        assert_eq!(std::fs::metadata(&shared).unwrap().gid(), gid);
        // An existing directory is used as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&dir, None, "test directory").unwrap();
        assert_eq!(mode(&dir), 0o755);
    }

    #[test]
    fn symlinks_and_writable_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        let err = ensure_dir(&link, None, "test directory").err().unwrap();
        assert!(
            err.contains("is a symlink") && err.contains("link"),
            "{err}"
        );
        // A trusted symlink on the way is followed (as /var/run is).
        ensure_dir(&link.join("sub"), None, "test directory").unwrap();
        assert_eq!(mode(&real), 0o755);
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_dir(&open.join("x"), None, "test directory")
            .err()
            .unwrap();
        assert!(
            err.contains("writable by other users") && err.contains("open"),
            "{err}"
        );
        assert!(!open.join("x").exists());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_dir(&open.join("x"), None, "test directory").unwrap();
    }

    #[test]
    fn sockets_get_their_mode_whatever_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ensure_dir(tmp.path(), None, "test directory").unwrap();
        std::fs::write(tmp.path().join("s.sock"), b"stale").unwrap();
        let old = rustix::process::umask(Mode::empty());
        let bound = dir.bind_socket("s.sock", None, "test socket");
        rustix::process::umask(old);
        let (listener, id) = bound.unwrap();
        let path = tmp.path().join("s.sock");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(mode_of(&meta), 0o600);
        assert_eq!(file_id(&meta), id);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        // Nothing left of the private directory.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"]);
        let gid = rustix::process::getegid().as_raw();
        dir.bind_socket("g.sock", Some(gid), "test socket").unwrap();
        assert_eq!(mode(&tmp.path().join("g.sock")), 0o660);
    }

    #[test]
    fn lock_files_through_symlinks_or_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ensure_dir(tmp.path(), None, "test directory").unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        symlink(&target, tmp.path().join("l.lock")).unwrap();
        let err = dir.open_lock("l.lock").err().unwrap();
        assert!(
            err.contains("is a symlink") && err.contains("l.lock"),
            "{err}"
        );
        std::fs::hard_link(&target, tmp.path().join("h.lock")).unwrap();
        let err = dir.open_lock("h.lock").err().unwrap();
        assert!(err.contains("hard links"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(mode(&target), 0o644);
        dir.open_lock("ok.lock").unwrap();
        assert_eq!(mode(&tmp.path().join("ok.lock")), 0o600);
    }
}
