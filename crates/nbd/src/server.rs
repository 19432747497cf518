//! The NBD server ([`NbdServer`]): listeners, connections and their
//! lifetime, over an [`ExportSource`]: the engine's volumes (feature
//! `engine`) or anything else that implements it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::export::ExportSource;
use crate::negotiate::{self, Outcome, Session, TlsState};
use crate::pipeline::WorkerPermits;
use crate::tls::{NbdTls, TlsMode};
use crate::transmission::PayloadBudget;

/// A stream the server can serve on.
pub trait Conn: Read + Write + Send + 'static {
    fn try_clone_conn(&self) -> io::Result<Self>
    where
        Self: Sized;
    fn shutdown_conn(&self, how: Shutdown);
    /// Timeout of every read and write (`None`: wait forever).
    fn set_io_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Whether a read finds bytes now or within `timeout` (or the end of
    /// the stream, or an error): false when the peer stayed quiet.
    fn readable_within(&self, timeout: Duration) -> io::Result<bool>;
    /// Ends the session above the socket (TLS's close_notify), before the
    /// socket is closed.
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn set_io_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
    fn readable_within(&self, timeout: Duration) -> io::Result<bool> {
        readable_within(self, timeout)
    }
}

impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn set_io_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
    fn readable_within(&self, timeout: Duration) -> io::Result<bool> {
        readable_within(self, timeout)
    }
}

/// `poll(POLLIN)` on a socket for at most `timeout`; a hang-up or an error
/// counts as readable (the read that follows reports it).
fn readable_within(socket: &impl std::os::fd::AsFd, timeout: Duration) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(socket, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&timeout)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Longest a client may take from connecting to choosing an export
    /// (`None`: no limit); then the connection is closed. Default 10 s,
    /// as qemu-nbd's handshake limit.
    pub handshake_timeout: Option<Duration>,
    /// Most connections open at once, handshakes included; one more is
    /// closed at once, before the greeting. Default 1024.
    pub max_connections: usize,
    /// Most connections open at once from one TCP client address; one more
    /// is closed before the greeting. Unix socket clients are held to
    /// `max_connections` only. Default 64.
    pub max_connections_per_client: usize,
    /// Most bytes of write payload one connection may have read but not
    /// yet written; past it the connection stops reading until writes
    /// finish. At least one write (32 MiB) fits. Default 64 MiB.
    pub max_queued_write_bytes_per_connection: u64,
    /// The same over all connections. Default 1 GiB.
    pub max_queued_write_bytes: u64,
    /// Longest a client in transmission may pause inside a request (half a
    /// header, or a write payload not all sent) or leave replies unread;
    /// then the connection is closed and what it held (payload budget, a
    /// worker blocked on the socket) is given back. Waiting between
    /// requests has no limit. `None`: no limit. Default 60 s.
    pub stall_timeout: Option<Duration>,
    /// Most threads, over the server, that run requests besides each
    /// connection's own reader (at most 4 per connection, started when its
    /// requests overlap, ended after 2 s idle). A connection that gets none
    /// runs its requests one at a time on its reader. Default 256.
    pub max_worker_threads: usize,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            handshake_timeout: Some(Duration::from_secs(10)),
            max_connections: 1024,
            max_connections_per_client: 64,
            max_queued_write_bytes_per_connection: 64 << 20,
            max_queued_write_bytes: 1 << 30,
            max_worker_threads: 256,
            stall_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// What a server is built with: its limits and, optionally, TLS.
#[derive(Debug, Clone, Default)]
pub struct NbdSettings {
    pub limits: NbdLimits,
    /// TLS for TCP clients as its mode says; on the Unix socket, whose
    /// file mode guards it, TLS is offered but never required.
    pub tls: Option<NbdTls>,
}

impl From<NbdLimits> for NbdSettings {
    fn from(limits: NbdLimits) -> Self {
        NbdSettings { limits, tls: None }
    }
}

/// A listening socket as [`NbdServer::shutdown`] needs it: a duplicate of
/// its descriptor to shut down, and for a Unix socket the file to remove.
///
/// The duplicate is typed as a stream because std offers shutdown(2) only on
/// stream types; the call is the same on a listening socket, where Linux
/// makes a blocked accept fail (EINVAL) and refuses new connections.
enum Listening {
    Unix {
        socket: UnixStream,
        /// The socket file as bound, as (path, device, inode): `None` if
        /// it could not be stat'ed, and then it is left alone.
        file: Option<(PathBuf, u64, u64)>,
    },
    Tcp(TcpStream),
}

impl Listening {
    fn stop(&self) {
        let (shut, kind) = match self {
            Listening::Unix { socket, .. } => (socket.shutdown(Shutdown::Both), "Unix"),
            Listening::Tcp(socket) => (socket.shutdown(Shutdown::Both), "TCP"),
        };
        if let Err(e) = shut {
            tracing::error!(error = %e, "cannot shut the NBD {kind} listener down: its accept loop may not end");
        }
        if let Listening::Unix {
            file: Some((path, dev, ino)),
            ..
        } = self
        {
            // Only our own file: after a cleanup removed it, the path may be
            // another server's socket. (A replacement between this check and
            // the unlink is still possible; there is no unlink by inode.)
            let still_ours =
                std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (*dev, *ino));
            if still_ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A pause after a failed accept (out of descriptors, say), so a failure
/// that repeats does not spin a core and flood the log.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// An open client connection, as the server keeps track of it.
struct Connection {
    /// Shuts down one direction of its socket.
    close: Box<dyn Fn(Shutdown) + Send>,
    /// The TCP client's address (`None` on the Unix socket).
    client: Option<IpAddr>,
}

pub struct NbdServer {
    source: Arc<dyn ExportSource>,
    limits: NbdLimits,
    tls: Option<NbdTls>,
    queued_writes: Arc<PayloadBudget>,
    workers: Arc<WorkerPermits>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Connection>>,
    listening: Mutex<Vec<Listening>>,
}

/// The URI a client uses for export `name` on the Unix socket `socket`,
/// percent-encoded (a space or `?` in the path, `#` in a name), as
/// [`crate::NbdAddress::parse`] and libnbd read it back.
pub fn unix_uri(socket: &Path, name: &str) -> String {
    crate::NbdAddress::Unix {
        socket: socket.to_path_buf(),
        export: name.to_string(),
    }
    .to_string()
}

impl NbdServer {
    /// A server of every volume of `engine`.
    #[cfg(feature = "engine")]
    pub fn new(engine: Arc<blksnap_engine::Engine>) -> Arc<Self> {
        Self::serving(Arc::new(crate::engine_export::EngineExports(engine)))
    }

    /// A server of every volume of `engine`, with `settings` (or just
    /// limits).
    #[cfg(feature = "engine")]
    pub fn with_limits(
        engine: Arc<blksnap_engine::Engine>,
        settings: impl Into<NbdSettings>,
    ) -> Arc<Self> {
        Self::serving_with(
            Arc::new(crate::engine_export::EngineExports(engine)),
            settings,
        )
    }

    /// A server of the exports `source` names, with the default limits.
    pub fn serving(source: Arc<dyn ExportSource>) -> Arc<Self> {
        Self::serving_with(source, NbdLimits::default())
    }

    /// A server of the exports `source` names, with `settings` (or just
    /// limits).
    pub fn serving_with(
        source: Arc<dyn ExportSource>,
        settings: impl Into<NbdSettings>,
    ) -> Arc<Self> {
        let NbdSettings { limits, tls } = settings.into();
        Arc::new(Self {
            source,
            limits,
            tls,
            queued_writes: PayloadBudget::new(limits.max_queued_write_bytes),
            workers: WorkerPermits::new(limits.max_worker_threads),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            listening: Mutex::new(Vec::new()),
        })
    }

    /// Creates the Unix socket (replacing a stale one) and serves it on a
    /// new thread. Its mode comes from the umask; a caller that needs
    /// another binds the socket itself and hands it to [`Self::serve_unix`].
    pub fn listen_unix(self: &Arc<Self>, path: &Path) -> io::Result<JoinHandle<()>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        // Right after the bind, so it is the file we created (the socket's
        // own descriptor cannot tell: fstat shows the socket, not the file).
        let file = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        self.serve_unix(listener, path, file)
    }

    /// Serves a bound Unix socket on a new thread. `path` is where it is
    /// bound and `file` the socket file there as (device, inode): at
    /// shutdown that file, and only that one, is removed.
    pub fn serve_unix(
        self: &Arc<Self>,
        listener: UnixListener,
        path: &Path,
        file: Option<(u64, u64)>,
    ) -> io::Result<JoinHandle<()>> {
        let file = file.map(|(dev, ino)| (path.to_path_buf(), dev, ino));
        let socket = UnixStream::from(OwnedFd::from(listener.try_clone()?));
        self.add_listening(Listening::Unix { socket, file });
        tracing::info!(socket = %path.display(), "NBD server listening");
        let this = self.clone();
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if this.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match stream {
                        Ok(s) => this.spawn_connection(s, None),
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            std::thread::sleep(ACCEPT_RETRY);
                        }
                    }
                }
            })
    }

    /// Listens on a TCP address and serves it on a new thread; returns the
    /// bound address (port 0 picks a free one).
    pub fn listen_tcp(self: &Arc<Self>, addr: &str) -> io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let socket = TcpStream::from(OwnedFd::from(listener.try_clone()?));
        self.add_listening(Listening::Tcp(socket));
        tracing::info!(address = %local, "NBD server listening");
        let this = self.clone();
        let handle = std::thread::Builder::new()
            .name("nbd-accept-tcp".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if this.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match stream {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let client = s.peer_addr().ok().map(|a| a.ip());
                            this.spawn_connection(s, client)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            std::thread::sleep(ACCEPT_RETRY);
                        }
                    }
                }
            })?;
        Ok((local, handle))
    }

    /// Registers a listener for [`Self::shutdown`]; one added after the
    /// shutdown is stopped at once, so its accept loop ends too.
    fn add_listening(&self, listening: Listening) {
        let mut all = self.listening.lock().unwrap();
        if self.stopping.load(Ordering::SeqCst) {
            listening.stop();
        } else {
            all.push(listening);
        }
    }

    /// Whether a new connection from `client` (TCP) or the Unix socket
    /// (`None`) would pass a connection cap; the reason if not.
    fn over_cap(&self, open: &HashMap<u64, Connection>, client: Option<IpAddr>) -> Option<String> {
        if open.len() >= self.limits.max_connections {
            return Some(format!(
                "too many open connections (limit {})",
                self.limits.max_connections
            ));
        }
        let ip = client?;
        let from_client = open.values().filter(|c| c.client == Some(ip)).count();
        if from_client >= self.limits.max_connections_per_client {
            return Some(format!(
                "too many open connections from {ip} (limit {})",
                self.limits.max_connections_per_client
            ));
        }
        None
    }

    fn spawn_connection<S: Conn>(self: &Arc<Self>, stream: S, client: Option<IpAddr>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone_conn() {
            let mut connections = self.connections.lock().unwrap();
            if let Some(why) = self.over_cap(&connections, client) {
                tracing::warn!(client = ?client, "NBD connection refused: {why}");
                return;
            }
            // Checked under the lock that shutdown takes after setting
            // `stopping`: a connection accepted as the server stops is
            // either in the map when shutdown closes them all, or sees
            // `stopping` here; it never serves on after the shutdown.
            if self.stopping.load(Ordering::SeqCst) {
                clone.shutdown_conn(Shutdown::Read);
            }
            let close = Box::new(move |how| clone.shutdown_conn(how));
            connections.insert(id, Connection { close, client });
        }
        // TCP clients get TLS as configured; Unix socket clients, whom the
        // socket file's mode already admits, may use it but need not.
        let tls = match (&self.tls, client) {
            (None, _) => TlsState::Unavailable,
            (Some(t), Some(_)) if t.mode() == TlsMode::Require => TlsState::Required,
            (Some(_), _) => TlsState::Offered,
        };
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-{id}"))
            .spawn(move || {
                crate::mark_io_flusher("nbd-connection");
                if let Err(e) = this.serve(stream, tls) {
                    tracing::info!(connection = id, error = %e, "NBD connection ended");
                }
                this.connections.lock().unwrap().remove(&id);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an NBD connection thread");
        }
    }

    fn serve<S: Conn>(&self, mut stream: S, tls: TlsState) -> io::Result<()> {
        // A client that connects and says nothing (or too slowly) must not
        // hold a connection and its thread forever.
        stream.set_io_timeout(self.limits.handshake_timeout)?;
        let no_zeroes = negotiate::greet(&mut stream)?;
        match negotiate::haggle(&mut stream, &*self.source, tls, no_zeroes)? {
            Outcome::Leave => Ok(()),
            Outcome::Export(session) => self.transmit(stream, session),
            Outcome::StartTls => {
                let settings = self
                    .tls
                    .as_ref()
                    .expect("STARTTLS is accepted only with TLS");
                let mut stream = settings.accept(stream)?;
                match negotiate::haggle(&mut stream, &*self.source, TlsState::Active, no_zeroes)? {
                    Outcome::Export(session) => self.transmit(stream, session),
                    Outcome::Leave | Outcome::StartTls => stream.close(),
                }
            }
        }
    }

    fn transmit<S: Conn>(&self, stream: S, session: Session) -> io::Result<()> {
        // Between requests a client may stay quiet for ever; inside one
        // (or with replies left unread) only this long.
        stream.set_io_timeout(self.limits.stall_timeout)?;
        tracing::debug!(
            size = session.export.size(),
            structured = session.structured,
            extended = session.extended,
            "NBD client in transmission"
        );
        crate::transmission::transmit(
            stream,
            session,
            self.limits.max_queued_write_bytes_per_connection,
            &self.queued_writes,
            self.workers.clone(),
        )
    }

    /// Bytes of write payload read from clients and not yet written.
    pub fn queued_write_bytes(&self) -> u64 {
        self.queued_writes.used()
    }

    /// Threads running requests now, over every connection (each
    /// connection's reader not counted).
    pub fn worker_threads(&self) -> usize {
        self.workers.used()
    }

    /// Number of open client connections.
    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Stops accepting; every connection stops reading requests, finishes
    /// and answers the ones it has, then closes.
    pub fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        for connection in self.connections.lock().unwrap().values() {
            (connection.close)(Shutdown::Read);
        }
        // Dropped once stopped: the accept loop closes its own descriptor
        // as it ends, and nothing then holds the socket (or its TCP port).
        for listening in std::mem::take(&mut *self.listening.lock().unwrap()) {
            listening.stop();
        }
    }
}

#[cfg(test)]
mod uri_tests {
    use super::*;

    #[test]
    fn unix_uris_are_percent_encoded_and_read_back() {
        let socket = Path::new("/run/my sockets/nbd?#%.sock");
        let uri = unix_uri(socket, "snapshot/disk #1");
        assert_eq!(
            uri,
            "nbd+unix:///snapshot/disk%20%231?socket=/run/my%20sockets/nbd%3F%23%25.sock"
        );
        let back = crate::NbdAddress::parse(&uri).unwrap();
        assert_eq!(back.export(), "snapshot/disk #1");
        assert!(matches!(back, crate::NbdAddress::Unix { socket: s, .. } if s == socket));
    }
}

#[cfg(all(test, feature = "engine"))]
mod tests {
    use super::*;
    use blksnap_engine::{Config, Engine};
    use std::time::Instant;

    /// Issue 12: shutdown ends both accept loops though the Unix socket
    /// file was removed, and neither connects to nor removes the socket
    /// another server has put at its path since.
    #[test]
    fn shutdown_ends_the_accept_loops_without_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let server = NbdServer::new(Arc::new(Engine::new(Config::default()).unwrap()));
        let path = dir.path().join("nbd.sock");
        let unix = server.listen_unix(&path).unwrap();
        let (tcp_addr, tcp) = server.listen_tcp("127.0.0.1:0").unwrap();
        std::fs::remove_file(&path).unwrap();
        let stand_in = UnixListener::bind(&path).unwrap();
        stand_in.set_nonblocking(true).unwrap();

        server.shutdown();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(unix.is_finished() && tcp.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "accept loops still running 10 s after shutdown (Unix finished: {}, TCP finished: {})",
                unix.is_finished(),
                tcp.is_finished()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(path.exists(), "shutdown removed a socket file not its own");
        assert!(
            stand_in.accept().is_err(),
            "shutdown connected to another server's socket"
        );
        assert!(
            TcpStream::connect(tcp_addr).is_err(),
            "TCP still accepts after shutdown"
        );
    }
}
