//! The control socket server: a Unix stream socket speaking the protocol of
//! `docs/protocol.md`, one thread per client connection, which knows the
//! client's credentials ([`Client`], for [`crate::rights`]).
//!
//! Owns the socket file and its lock file (`<socket>.lock`, flock'ed and
//! holding the daemon's pid) so that a second daemon on the same socket
//! refuses to start. A malformed or oversized request gets an error reply and
//! the connection goes on; nothing one client sends can stop the others,
//! and no other user's clients can keep root out: [`ControlLimits`] caps
//! connections per uid and for non-root users together (root has a pool of
//! its own), and closes connections idle past a timeout.
//! Shutdown ([`ShutdownHandle::shutdown`]) stops accepting (clients still
//! queued get an `ESHUTDOWN` reply), lets every connection finish the
//! request it is in, and removes the socket and lock files. It never goes through a path: it wakes the accept loop by shutting
//! the listening socket itself down, since the socket file may be gone (a
//! cleanup of the run directory) or be another program's by then; for the
//! same reason it removes a file only while it is still the one this daemon
//! created (same device and inode).
//!
//! Callers: `blksnapd`'s main (bind, serve, SIGTERM/SIGINT) and the
//! `shutdown` request of [`Service`], through the stopper it is given.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blksnap_proto::{self as proto, ErrorReply, ReplyMessage, RequestMessage};
use rustix::fs::FlockOperation;

use crate::files::{self, file_id, FileId, RunDir};
use crate::rights::Client;
use crate::service::Service;

/// How long shutdown waits for connections to finish their request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a refusal may take to write (its socket buffer is empty, so it
/// never should).
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What one client may hold of the control server (configuration:
/// `control_max_connections`, `control_max_connections_per_uid`,
/// `control_idle_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// Most connections open at once from users other than root (and the
    /// daemon's own user). Those have a pool of this size of their own, so
    /// other users can never take the slots `blksnap shutdown` needs.
    pub max_connections: usize,
    /// Most connections open at once from one uid other than root.
    pub max_connections_per_uid: usize,
    /// Longest a connection may take to send its next request, counted
    /// from the previous reply (so a request trickled in byte by byte
    /// counts as idle), and to read a reply; `None`: no limit. Connections
    /// that own live auto-destroy snapshots are not timed out while
    /// waiting: closing them would destroy the snapshots.
    pub idle_timeout: Option<Duration>,
}

impl Default for ControlLimits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            max_connections_per_uid: 16,
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// The lock that makes one daemon per control socket: `<socket>.lock`,
/// flock'ed for the daemon's lifetime and holding its pid. Taken before any
/// socket is created, so a second daemon touches none of the first's. The
/// socket's directory and the lock file are made as [`crate::files`] says
/// (no symlinks followed, no other user's files used).
pub struct DaemonLock {
    socket: PathBuf,
    name: String,
    dir: RunDir,
    path: PathBuf,
    file: File,
}

impl DaemonLock {
    /// `group`: the control socket's, for a directory made here (0750).
    pub fn acquire(socket: &Path, group: Option<u32>) -> Result<Self, String> {
        let shown = socket.display();
        let name = socket
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("control socket {shown}: no UTF-8 file name"))?
            .to_string();
        let parent = socket.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = files::ensure_dir(
            parent.unwrap_or(Path::new(".")),
            group,
            "control socket directory",
        )?;
        let lock_name = format!("{name}.lock");
        let path = dir.path().join(&lock_name);
        let mut file = dir.open_lock(&lock_name)?;
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
            name,
            dir,
            path,
            file,
        })
    }
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
    limits: ControlLimits,
    shared: Arc<Shared>,
}

struct Shared {
    stopping: AtomicBool,
    /// The listening socket (a duplicate of the server's descriptor), for
    /// [`ShutdownHandle::shutdown`] to wake the accept loop with.
    listener: UnixListener,
    connections: Mutex<HashMap<u64, UnixStream>>,
    /// Open connections per peer uid.
    per_uid: Mutex<HashMap<u32, usize>>,
}

/// A connection's place in [`Shared::per_uid`], given back on drop.
struct Slot {
    shared: Arc<Shared>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_uid = self.shared.per_uid.lock().unwrap();
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
    }
}

/// Root and the daemon's own user: they can stop the daemon anyway, and
/// must always be able to reach it.
fn privileged(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

impl Shared {
    /// A slot for a connection of `uid`, or why there is none.
    fn take_slot(self: &Arc<Self>, uid: u32, limits: &ControlLimits) -> Result<Slot, String> {
        let mut per_uid = self.per_uid.lock().unwrap();
        let pool: usize = per_uid
            .iter()
            .filter(|(u, _)| privileged(**u) == privileged(uid))
            .map(|(_, n)| n)
            .sum();
        let mine = per_uid.get(&uid).copied().unwrap_or(0);
        if pool >= limits.max_connections {
            return Err(format!(
                "too many control connections (maximum {})",
                limits.max_connections
            ));
        }
        if !privileged(uid) && mine >= limits.max_connections_per_uid {
            return Err(format!(
                "too many control connections from uid {uid} (maximum {}, control_max_connections_per_uid)",
                limits.max_connections_per_uid
            ));
        }
        *per_uid.entry(uid).or_insert(0) += 1;
        Ok(Slot {
            shared: self.clone(),
            uid,
        })
    }
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

impl ControlServer {
    /// Creates the socket under a lock taken with [`DaemonLock::acquire`]:
    /// mode 0600, or 0660 owned by `group` when one is given, whatever the
    /// umask (see [`crate::files`]); a stale socket file is replaced.
    pub fn bind(
        lock: DaemonLock,
        group: Option<u32>,
        limits: ControlLimits,
        service: Arc<Service>,
    ) -> Result<Self, String> {
        let path = lock.socket.clone();
        // We hold the lock: a socket file left here is stale.
        let (listener, socket_file) = lock.dir.bind_socket(&lock.name, group, "control socket")?;
        let socket_file = Some(socket_file);
        let wake = listener
            .try_clone()
            .map_err(|e| format!("cannot duplicate the control socket: {e}"))?;
        Ok(Self {
            path,
            socket_file,
            listener,
            lock,
            service,
            limits,
            shared: Arc::new(Shared {
                stopping: AtomicBool::new(false),
                listener: wake,
                connections: Mutex::new(HashMap::new()),
                per_uid: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts clients until shutdown, then refuses the ones still
    /// queued (an `ESHUTDOWN` error reply, then close), waits (bounded)
    /// for the requests in flight and removes the socket and lock files
    /// (those that are still ours).
    pub fn serve(self) {
        tracing::info!(socket = %self.path.display(), "control socket ready");
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        loop {
            let accepted = self.listener.accept();
            if self.shared.stopping.load(Ordering::SeqCst) {
                if let Ok((stream, _)) = accepted {
                    refuse_stopping(stream);
                }
                break;
            }
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            // Unix sockets always carry the peer's credentials.
            let uid = rustix::net::sockopt::socket_peercred(&stream)
                .map(|c| c.uid.as_raw())
                .unwrap_or(u32::MAX);
            let slot = match self.shared.take_slot(uid, &self.limits) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::warn!(uid, "control connection refused: {why}");
                    refuse(stream, libc::EAGAIN, why);
                    continue;
                }
            };
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(clone) = stream.try_clone() {
                self.shared.connections.lock().unwrap().insert(id, clone);
                // A shutdown that went over the connections just before
                // this one was listed: its read side is shut here instead.
                if self.shared.stopping.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(Shutdown::Read);
                }
            }
            let (service, shared, limits) =
                (self.service.clone(), self.shared.clone(), self.limits);
            let spawned = std::thread::Builder::new()
                .name(format!("control-{id}"))
                .spawn(move || {
                    let _slot = slot;
                    if let Err(e) = serve_connection(&service, stream, &limits) {
                        tracing::debug!(connection = id, uid, error = %e, "control connection ended");
                    }
                    shared.connections.lock().unwrap().remove(&id);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start a connection thread"),
            }
        }
        // New clients are refused from here on (ECONNREFUSED); the ones
        // that connected before are still queued: they get a reply, not a
        // connection that hangs until the process exits.
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        if self.listener.set_nonblocking(true).is_ok() {
            while let Ok((stream, _)) = self.listener.accept() {
                refuse_stopping(stream);
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

/// An error reply to a client that is not served, then close.
fn refuse(mut stream: UnixStream, errno: i32, why: String) {
    let _ = stream.set_write_timeout(Some(REFUSAL_WRITE_TIMEOUT));
    let _ = proto::write_message(&mut stream, &error_reply(None, ErrorReply::new(errno, why)));
}

fn refuse_stopping(stream: UnixStream) {
    tracing::debug!("control connection refused: stopping");
    refuse(
        stream,
        libc::ESHUTDOWN,
        "blksnapd is stopping: no new requests".into(),
    );
}

/// The reading side of a connection: every read waits at most until the
/// deadline (the idle timeout for the request being read).
struct TimedReader {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for TimedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(left)
            }
        };
        self.stream.set_read_timeout(timeout)?;
        match self.stream.read(buf) {
            // A read timeout shows as EAGAIN.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            other => other,
        }
    }
}

/// Answers one client's requests, in order, until it hangs up or stays
/// idle longer than `limits.idle_timeout` (then it gets an `ETIMEDOUT`
/// error reply and is closed). The paths they name are opened with the
/// rights of the client's credentials, read once off the connection (as
/// they were when it connected).
fn serve_connection(
    service: &Service,
    stream: UnixStream,
    limits: &ControlLimits,
) -> io::Result<()> {
    let client = Client::of_peer(&stream)?;
    tracing::debug!(
        uid = client.uid,
        gid = client.gid,
        pid = client.pid,
        "control client"
    );
    /// Destroys the connection's auto-destroy snapshots however it ends.
    struct Owned<'a>(&'a Service, Vec<uuid::Uuid>);
    impl Drop for Owned<'_> {
        fn drop(&mut self) {
            self.0.destroy_owned(&self.1);
        }
    }
    let mut owned = Owned(service, Vec::new());
    let mut writer = stream.try_clone()?;
    // A client that does not read its replies holds no thread for longer.
    writer.set_write_timeout(limits.idle_timeout)?;
    let mut reader = BufReader::new(TimedReader {
        stream,
        deadline: None,
    });
    loop {
        let timeout = limits.idle_timeout.filter(|_| !service.any_alive(&owned.1));
        reader.get_mut().deadline = timeout.map(|t| Instant::now() + t);
        let line = match proto::read_line(&mut reader, proto::MAX_REQUEST_BYTES) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let idle = timeout.unwrap_or_default();
                let message = format!(
                    "idle for {} ms: connection closed (control_idle_timeout_ms)",
                    idle.as_millis()
                );
                let _ = proto::write_message(
                    &mut writer,
                    &error_reply(None, ErrorReply::new(libc::ETIMEDOUT, message)),
                );
                return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
            }
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
                match service.handle_owned(&client, message.request, &mut owned.1) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn server(dir: &Path, limits: ControlLimits) -> (ControlServer, PathBuf) {
        let socket = dir.join("run/c.sock");
        let lock = DaemonLock::acquire(&socket, None).unwrap();
        let engine = Arc::new(blksnap_engine::Engine::new(Default::default()).unwrap());
        let service = Arc::new(Service::new(engine, None));
        (
            ControlServer::bind(lock, None, limits, service).unwrap(),
            socket,
        )
    }

    fn reply(stream: &UnixStream) -> serde_json::Value {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// Issue 14 (7b): clients still queued when the server stops get an
    /// error reply and a close, not a connection that hangs until the
    /// process exits; clients connecting after the stop are refused.
    #[test]
    fn clients_queued_at_a_stop_get_eshutdown_and_later_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (server, socket) = server(tmp.path(), ControlLimits::default());
        // Queued: nothing accepts yet.
        let queued: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&socket).unwrap())
            .collect();
        server.shutdown_handle().shutdown();
        let late = UnixStream::connect(&socket).unwrap_err();
        assert_eq!(late.raw_os_error(), Some(libc::ECONNREFUSED), "{late}");
        let serving = std::thread::spawn(move || server.serve());
        for stream in &queued {
            let r = reply(stream);
            assert_eq!(r["ok"], false, "{r}");
            assert_eq!(r["error"]["errno"], libc::ESHUTDOWN, "{r}");
            let mut rest = Vec::new();
            (&*stream).read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "more after the refusal: {rest:?}");
        }
        serving.join().unwrap();
        assert!(!socket.exists(), "socket left behind");
    }

    /// Issue 14 (7a): each uid other than root's gets at most its share,
    /// all of them together at most the pool, and root a pool of its own.
    #[test]
    fn slots_per_uid_and_a_pool_of_roots_own() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = ControlLimits {
            max_connections: 3,
            max_connections_per_uid: 2,
            idle_timeout: None,
        };
        let (server, _) = server(tmp.path(), limits);
        let shared = server.shared.clone();
        let a: Vec<Slot> = (0..2)
            .map(|_| shared.take_slot(1001, &limits).unwrap())
            .collect();
        let err = shared.take_slot(1001, &limits).err().unwrap();
        assert!(
            err.contains("from uid 1001") && err.contains("maximum 2"),
            "{err}"
        );
        let b = shared.take_slot(1002, &limits).unwrap();
        let err = shared.take_slot(1003, &limits).err().unwrap();
        assert_eq!(err, "too many control connections (maximum 3)");
        // Root is not counted in the others' pool, nor held to a share.
        let root: Vec<Slot> = (0..3)
            .map(|_| shared.take_slot(0, &limits).unwrap())
            .collect();
        assert!(
            shared.take_slot(0, &limits).is_err(),
            "root's own pool is bounded too"
        );
        drop(a);
        shared.take_slot(1003, &limits).unwrap();
        drop((b, root));
        assert!(
            shared.per_uid.lock().unwrap().is_empty(),
            "every slot given back"
        );
    }

    /// Issue 14 (7a): an idle connection gets ETIMEDOUT and is closed; a
    /// request trickled in slower than the timeout is idle too.
    #[test]
    fn idle_connections_are_closed_after_the_idle_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = ControlLimits {
            idle_timeout: Some(Duration::from_millis(300)),
            ..ControlLimits::default()
        };
        let (server, socket) = server(tmp.path(), limits);
        let stop = server.shutdown_handle();
        let serving = std::thread::spawn(move || server.serve());
        let started = Instant::now();
        let idle = UnixStream::connect(&socket).unwrap();
        let mut trickle = UnixStream::connect(&socket).unwrap();
        let mut busy = UnixStream::connect(&socket).unwrap();
        let request = b"{\"id\":1,\"command\":\"version\"}\n";
        for (i, byte) in request.iter().enumerate() {
            if i % 4 == 0 {
                std::thread::sleep(Duration::from_millis(100));
                // Requests in time keep a connection open.
                busy.write_all(request).unwrap();
                assert_eq!(reply(&busy)["ok"], true);
            }
            if trickle.write_all(&[*byte]).is_err() {
                break;
            }
        }
        for stream in [&idle, &trickle] {
            let r = reply(stream);
            assert_eq!(r["error"]["errno"], libc::ETIMEDOUT, "{r}");
            assert!(r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("control_idle_timeout_ms"));
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
        busy.write_all(request).unwrap();
        assert_eq!(reply(&busy)["ok"], true);
        stop.shutdown();
        serving.join().unwrap();
    }
}
