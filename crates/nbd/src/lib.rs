//! The NBD frontend: serves every tracked device (read-write, export name =
//! the device name) and every snapshot image (`snapshot/<device>`) of an
//! [`Engine`] over Unix and TCP sockets, with structured replies, block
//! status for `base:allocation`, and the change maps as
//! `qemu:dirty-bitmap:since-N` contexts on images. Translates the protocol
//! into engine calls and nothing else; the daemon owns its lifetime.
//!
//! Each connection gets a thread for the handshake and request reading, and
//! a few workers ([`transmission`]). Shutdown stops accepting and closes the
//! read side of every connection: requests already read still complete and
//! are answered.

mod export;
mod negotiate;
pub mod protocol;
mod transmission;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blksnap_engine::Engine;

/// A stream the server can serve on.
pub trait Conn: Read + Write + Send + 'static {
    fn try_clone_conn(&self) -> io::Result<Self>
    where
        Self: Sized;
    fn shutdown_conn(&self, how: Shutdown);
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// Where the server listens, to wake its accept loop at shutdown.
#[derive(Clone, Debug)]
enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Shuts down one direction of a client connection.
type CloseFn = Box<dyn Fn(Shutdown) + Send>;

pub struct NbdServer {
    engine: Arc<Engine>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, CloseFn>>,
    addresses: Mutex<Vec<Address>>,
}

/// The URI a client uses for export `name` on the Unix socket `socket`.
pub fn unix_uri(socket: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

impl NbdServer {
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        Arc::new(Self {
            engine,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            addresses: Mutex::new(Vec::new()),
        })
    }

    /// Creates the Unix socket (replacing a stale one) and serves it on a
    /// new thread.
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
        self.addresses
            .lock()
            .unwrap()
            .push(Address::Unix(path.to_path_buf()));
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
                        Ok(s) => this.spawn_connection(s),
                        Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                    }
                }
            })
    }

    /// Listens on a TCP address and serves it on a new thread; returns the
    /// bound address (port 0 picks a free one).
    pub fn listen_tcp(self: &Arc<Self>, addr: &str) -> io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        self.addresses.lock().unwrap().push(Address::Tcp(local));
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
                            this.spawn_connection(s)
                        }
                        Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                    }
                }
            })?;
        Ok((local, handle))
    }

    fn spawn_connection<S: Conn>(self: &Arc<Self>, stream: S) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone_conn() {
            self.connections
                .lock()
                .unwrap()
                .insert(id, Box::new(move |how| clone.shutdown_conn(how)));
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-{id}"))
            .spawn(move || {
                if let Err(e) = this.serve(stream) {
                    tracing::info!(connection = id, error = %e, "NBD connection ended");
                }
                this.connections.lock().unwrap().remove(&id);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an NBD connection thread");
        }
    }

    fn serve<S: Conn>(&self, mut stream: S) -> io::Result<()> {
        let Some(session) = negotiate::negotiate(&mut stream, &self.engine)? else {
            return Ok(());
        };
        tracing::debug!(
            size = session.export.size(),
            structured = session.structured,
            "NBD client in transmission"
        );
        transmission::transmit(stream, session)
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
        for close in self.connections.lock().unwrap().values() {
            close(Shutdown::Read);
        }
        for address in self.addresses.lock().unwrap().iter() {
            match address {
                Address::Unix(path) => {
                    let _ = UnixStream::connect(path);
                    let _ = std::fs::remove_file(path);
                }
                Address::Tcp(addr) => {
                    let _ = TcpStream::connect(addr);
                }
            }
        }
    }
}
