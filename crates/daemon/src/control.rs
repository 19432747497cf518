//! The control socket server: a Unix stream socket speaking the protocol of
//! `docs/protocol.md`, one thread per client connection.
//!
//! Owns the socket file and its lock file (`<socket>.lock`, flock'ed and
//! holding the daemon's pid) so that a second daemon on the same socket
//! refuses to start. A malformed or oversized request gets an error reply and
//! the connection goes on; nothing one client sends can stop the others.
//! Shutdown ([`ShutdownHandle::shutdown`]) stops accepting, lets every
//! connection finish the request it is in, and removes the socket and lock
//! files. It never goes through a path: it wakes the accept loop by shutting
//! the listening socket itself down, since the socket file may be gone (a
//! cleanup of the run directory) or be another program's by then; for the
//! same reason it removes a file only while it is still the one this daemon
//! created (same device and inode).
//!
//! Callers: `blksnapd`'s main (bind, serve, SIGTERM/SIGINT) and the
//! `shutdown` request of [`Service`], through the stopper it is given.

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blksnap_proto::{self as proto, ErrorReply, ReplyMessage, RequestMessage};
use rustix::fs::FlockOperation;

use crate::service::Service;

/// More concurrent clients than this are turned away with EAGAIN.
const MAX_CONNECTIONS: usize = 128;
/// How long shutdown waits for connections to finish their request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The lock that makes one daemon per control socket: `<socket>.lock`,
/// flock'ed for the daemon's lifetime and holding its pid. Taken before any
/// socket is created, so a second daemon touches none of the first's.
pub struct DaemonLock {
    socket: PathBuf,
    path: PathBuf,
    file: File,
}

impl DaemonLock {
    pub fn acquire(socket: &Path) -> Result<Self, String> {
        let shown = socket.display();
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let path = PathBuf::from(format!("{shown}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
        if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(format!(
                "another blksnapd (pid {}) is already serving {shown}",
                pid.trim()
            ));
        }
        file.set_len(0)
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(|e| format!("cannot write lock file: {e}"))?;
        Ok(Self {
            socket: socket.to_path_buf(),
            path,
            file,
        })
    }
}

/// Names a file across renames and unlinks: (device, inode).
type FileId = (u64, u64);

fn file_id(meta: &Metadata) -> FileId {
    (meta.dev(), meta.ino())
}

/// Removes `path` if it is still the file `ours` names. After a cleanup
/// removed ours, the path may hold another program's file (a daemon
/// started since), which is not ours to remove. A replacement between the
/// check and the unlink is still possible; there is no unlink by inode.
fn remove_own(path: &Path, ours: Option<FileId>) {
    let current = std::fs::symlink_metadata(path).ok().map(|m| file_id(&m));
    if ours.is_some() && current == ours {
        let _ = std::fs::remove_file(path);
    }
}

pub struct ControlServer {
    path: PathBuf,
    /// The socket file as bound (`None` if it could not be stat'ed): only
    /// that file is removed at the end.
    socket_file: Option<FileId>,
    listener: UnixListener,
    lock: DaemonLock,
    service: Arc<Service>,
    shared: Arc<Shared>,
}

struct Shared {
    stopping: AtomicBool,
    /// The listening socket (a duplicate of the server's descriptor), for
    /// [`ShutdownHandle::shutdown`] to wake the accept loop with.
    listener: UnixListener,
    connections: Mutex<HashMap<u64, UnixStream>>,
}

/// Stops a running [`ControlServer`] from another thread (a signal handler
/// thread).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Readers waiting for a next request see end of stream; one in the
        // middle of a request still sends its reply.
        for stream in self.shared.connections.lock().unwrap().values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        // Wake the accept loop through the socket, not its path: the file
        // may be gone, or be another program's socket by now. On Linux,
        // shutting a listening socket down makes a blocked accept fail
        // (EINVAL, and the loop sees `stopping`) and refuses new clients.
        if let Err(e) = rustix::net::shutdown(&self.shared.listener, rustix::net::Shutdown::Both) {
            tracing::error!(error = %e, "cannot shut the control socket down: the stop may hang");
        }
    }
}

fn group_id(group: &str) -> Result<u32, String> {
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
        .ok_or_else(|| format!("control group {group:?} does not exist"))
}

impl ControlServer {
    /// Creates the socket under a lock taken with [`DaemonLock::acquire`]:
    /// mode 0600, or 0660 owned by `group` when one is given.
    pub fn bind(
        lock: DaemonLock,
        group: Option<&str>,
        service: Arc<Service>,
    ) -> Result<Self, String> {
        let path = lock.socket.as_path();
        let shown = path.display();
        // We hold the lock: a socket file left here is stale.
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(socket = %shown, "removed a stale control socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove stale socket {shown}: {e}")),
        }
        let gid = group.map(group_id).transpose()?;
        // No window where the socket is open to others: bind under a umask
        // that leaves only the owner's read and write bits.
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(path);
        rustix::process::umask(old);
        let listener = bound.map_err(|e| format!("cannot create control socket {shown}: {e}"))?;
        // Right after the bind, so it is the file we created. A Unix socket's
        // own descriptor cannot tell (fstat shows the socket, not the file).
        let socket_file = std::fs::symlink_metadata(path).ok().map(|m| file_id(&m));
        let wake = listener
            .try_clone()
            .map_err(|e| format!("cannot duplicate the control socket: {e}"))?;
        if let Some(gid) = gid {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| format!("cannot give {shown} to group {gid}: {e}"))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            socket_file,
            listener,
            lock,
            service,
            shared: Arc::new(Shared {
                stopping: AtomicBool::new(false),
                listener: wake,
                connections: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts clients until shutdown, then waits (bounded) for their
    /// requests in flight and removes the socket and lock files (those that
    /// are still ours).
    pub fn serve(self) {
        tracing::info!(socket = %self.path.display(), "control socket ready");
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for stream in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            if threads.len() >= MAX_CONNECTIONS {
                let mut s = stream;
                let _ = proto::write_message(
                    &mut s,
                    &error_reply(
                        None,
                        ErrorReply::new(
                            libc::EAGAIN,
                            format!("too many control connections (maximum {MAX_CONNECTIONS})"),
                        ),
                    ),
                );
                continue;
            }
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(clone) = stream.try_clone() {
                self.shared.connections.lock().unwrap().insert(id, clone);
            }
            let (service, shared) = (self.service.clone(), self.shared.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("control-{id}"))
                .spawn(move || {
                    if let Err(e) = serve_connection(&service, stream) {
                        tracing::debug!(connection = id, error = %e, "control connection ended");
                    }
                    shared.connections.lock().unwrap().remove(&id);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start a connection thread"),
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        remove_own(&self.path, self.socket_file);
        // Unlinked while still locked (the lock drops with `self`): a daemon
        // starting now fails on our lock or creates a fresh file, so the
        // file unlinked here is never one another daemon holds.
        let lock_file = self.lock.file.metadata().ok().map(|m| file_id(&m));
        remove_own(&self.lock.path, lock_file);
        tracing::info!("control socket closed");
    }
}

fn error_reply(id: Option<u64>, error: ErrorReply) -> ReplyMessage {
    ReplyMessage {
        id,
        ok: false,
        result: None,
        error: Some(error),
    }
}

/// Answers one client's requests, in order, until it hangs up.
fn serve_connection(service: &Service, stream: UnixStream) -> io::Result<()> {
    /// Destroys the connection's auto-destroy snapshots however it ends.
    struct Owned<'a>(&'a Service, Vec<uuid::Uuid>);
    impl Drop for Owned<'_> {
        fn drop(&mut self) {
            self.0.destroy_owned(&self.1);
        }
    }
    let mut owned = Owned(service, Vec::new());
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let line = match proto::read_line(&mut reader, proto::MAX_REQUEST_BYTES) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let message = format!("request too large: {e}");
                proto::write_message(
                    &mut writer,
                    &error_reply(None, ErrorReply::new(libc::EINVAL, message)),
                )?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let reply = match RequestMessage::parse(&line) {
            Ok(message) => {
                tracing::debug!(request = ?message.request, "request");
                match service.handle_owned(message.request, &mut owned.1) {
                    Ok(result) => ReplyMessage {
                        id: message.id,
                        ok: true,
                        result: Some(result),
                        error: None,
                    },
                    Err(error) => {
                        tracing::info!(error = %error, "request failed");
                        error_reply(message.id, error)
                    }
                }
            }
            Err(e) => {
                // Echo the id when the line is JSON with one, so a pipelining
                // client can match the error to its request.
                let id = serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64());
                error_reply(
                    id,
                    ErrorReply::new(libc::EINVAL, format!("malformed request: {e}")),
                )
            }
        };
        proto::write_message(&mut writer, &reply)?;
    }
}
