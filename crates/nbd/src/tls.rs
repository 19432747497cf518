//! TLS for NBD: the server's settings ([`NbdTls`]: mode, certificate, key,
//! optional client CA), the client's ([`NbdTlsClient`]), and the stream a
//! connection switches to after `NBD_OPT_STARTTLS` ([`TlsStream`]), the
//! same on both sides.
//!
//! A connection's reader and its reply writer run on different threads,
//! as on plain sockets. They share one rustls session under a mutex but
//! never hold it while blocked on the socket: the reader waits for bytes
//! with the lock released and feeds them to the session after; the writer
//! encrypts under the lock and sends after releasing it. Records leave in
//! the order they were sealed because sending is serialised by a second
//! lock, taken before the session's and held until the bytes are out; the
//! reader never sends (what the session wants to send after reading, such
//! as a key update, goes out with the next reply).
//!
//! Called by the server (`server.rs`) after negotiation acknowledged
//! STARTTLS, and by the client (`client.rs`) after its STARTTLS was; the
//! settings are built by the daemon and the backup tool.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

use crate::Conn;

/// Whether clients get TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused (`NBD_REP_ERR_POLICY`).
    #[default]
    Off,
    /// TLS offered; a client may also go on in plain text.
    On,
    /// TLS required (the protocol's FORCEDTLS mode): before STARTTLS every
    /// option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD`,
    /// and `NBD_OPT_EXPORT_NAME` hangs up, so no downgrade is possible.
    Require,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            other => Err(format!("TLS mode {other:?} is not one of off, on, require")),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// The server's TLS settings: a mode other than off, and the rustls
/// configuration built from the certificate files.
#[derive(Clone)]
pub struct NbdTls {
    mode: TlsMode,
    config: Arc<ServerConfig>,
    verifies_clients: bool,
}

impl fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdTls")
            .field("mode", &self.mode)
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

impl NbdTls {
    /// Loads the server certificate chain `cert` and its private key `key`
    /// (PEM files). With `client_ca` (PEM, one or more certificates), only
    /// clients presenting a certificate signed by one of them get in.
    pub fn load(
        mode: TlsMode,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<NbdTls, String> {
        if mode == TlsMode::Off {
            return Err("TLS mode off needs no certificate: leave the TLS files out".into());
        }
        let chain = pem_certificates(cert, "TLS certificate")?;
        let private = private_key(key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = trust_roots(ca, "TLS client CA")?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, private).map_err(|e| {
            format!(
                "TLS certificate {} and key {} do not go together: {e}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(NbdTls {
            mode,
            config: Arc::new(config),
            verifies_clients: client_ca.is_some(),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether clients must present a certificate from the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    /// Runs the server side of the TLS handshake on `inner` (within its
    /// I/O timeout) and returns the encrypted stream.
    pub(crate) fn accept<S: Conn>(&self, mut inner: S) -> io::Result<TlsStream<S>> {
        let mut session = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        while session.is_handshaking() {
            session.complete_io(&mut inner)?;
        }
        // Bytes after the handshake (the session ticket) go now: the client
        // may wait for them before it sends its next option.
        while session.wants_write() {
            session.write_tls(&mut inner)?;
        }
        tracing::debug!(
            version = ?session.protocol_version(),
            client_certificate = session.peer_certificates().is_some(),
            "NBD client on TLS"
        );
        Ok(TlsStream::new(
            inner,
            Arc::new(Shared::new(Connection::Server(session))),
        ))
    }
}

/// A client's TLS settings, from a directory laid out as qemu's
/// `tls-creds-x509` and libnbd's `tls-certificates` read it: `ca-cert.pem`
/// (the CA the server's certificate must come from), and, when the server
/// asks for one, `client-cert.pem` with `client-key.pem`.
#[derive(Clone)]
pub struct NbdTlsClient {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for NbdTlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdTlsClient").finish_non_exhaustive()
    }
}

impl NbdTlsClient {
    pub fn from_dir(dir: &Path) -> Result<NbdTlsClient, String> {
        let roots = trust_roots(&dir.join("ca-cert.pem"), "TLS CA")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let config = match (cert.exists(), key.exists()) {
            (false, false) => builder.with_no_client_auth(),
            (true, true) => {
                let chain = pem_certificates(&cert, "TLS certificate")?;
                let private = private_key(&key)?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    format!(
                        "TLS certificate {} and key {}: {e}",
                        cert.display(),
                        key.display()
                    )
                })?
            }
            _ => {
                return Err(format!(
                    "{}: client-cert.pem and client-key.pem go together, and one is missing",
                    dir.display()
                ))
            }
        };
        Ok(NbdTlsClient {
            config: Arc::new(config),
        })
    }

    /// Runs the client side of the TLS handshake on `inner` with the server
    /// `host`, whose certificate must name it.
    pub(crate) fn connect<S: Conn>(&self, mut inner: S, host: &str) -> io::Result<TlsStream<S>> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} cannot be checked against a certificate: {e}"),
            )
        })?;
        let mut session =
            ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
        while session.is_handshaking() {
            session.complete_io(&mut inner)?;
        }
        Ok(TlsStream::new(
            inner,
            Arc::new(Shared::new(Connection::Client(session))),
        ))
    }
}

/// Every certificate of the PEM file `path` (`what` names it in errors);
/// a file with none is an error too.
fn pem_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let failed = |e: rustls::pki_types::pem::Error| format!("{what} {}: {e}", path.display());
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(failed)?
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    if certificates.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certificates)
}

/// The CA certificates of the PEM file `path`, as the roots a peer's
/// certificate must chain to.
fn trust_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in pem_certificates(path, what)? {
        roots
            .add(c)
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("TLS key {}: {e}", path.display()))
}

/// What the clones of one [`TlsStream`] share.
struct Shared {
    session: Mutex<Connection>,
    /// Held from sealing records until they are on the socket.
    sending: Mutex<()>,
}

impl Shared {
    fn new(session: Connection) -> Self {
        Shared {
            session: Mutex::new(session),
            sending: Mutex::new(()),
        }
    }

    fn session(&self) -> MutexGuard<'_, Connection> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Most bytes of TLS records read from the socket at once.
const INCOMING: usize = 64 << 10;

/// A connection after STARTTLS: plaintext in and out, records on `inner`.
pub struct TlsStream<S> {
    inner: S,
    shared: Arc<Shared>,
    /// Records read from the socket and not yet given to the session.
    incoming: Box<[u8]>,
    start: usize,
    end: usize,
    /// Records sealed for one write, reused.
    outgoing: Vec<u8>,
}

impl<S> TlsStream<S> {
    fn new(inner: S, shared: Arc<Shared>) -> Self {
        TlsStream {
            inner,
            shared,
            incoming: vec![0; INCOMING].into_boxed_slice(),
            start: 0,
            end: 0,
            outgoing: Vec::new(),
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl<S: Read> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut session = self.shared.session();
                match session.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut records = &self.incoming[self.start..self.end];
                    let taken = session.read_tls(&mut records)?;
                    self.start += taken;
                    session.process_new_packets().map_err(tls_error)?;
                    continue;
                }
            }
            // Nothing decrypted and nothing pending: wait for the socket
            // with the session free for the writer.
            let n = self.inner.read(&mut self.incoming)?;
            (self.start, self.end) = (0, n);
            if n == 0 {
                let mut session = self.shared.session();
                session.read_tls(&mut io::empty())?;
                session.process_new_packets().map_err(tls_error)?;
                // A peer that closed without close_notify: the reader
                // reports UnexpectedEof; one that sent it: Ok(0).
                return session.reader().read(buf);
            }
        }
    }
}

impl<S: Write> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _sending = self
            .shared
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = {
            let mut session = self.shared.session();
            let n = session.writer().write(buf)?;
            self.outgoing.clear();
            while session.wants_write() {
                session.write_tls(&mut self.outgoing)?;
            }
            n
        };
        self.inner.write_all(&self.outgoing)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<S: Conn> Conn for TlsStream<S> {
    fn try_clone_conn(&self) -> io::Result<Self> {
        Ok(TlsStream::new(
            self.inner.try_clone_conn()?,
            self.shared.clone(),
        ))
    }

    fn shutdown_conn(&self, how: Shutdown) {
        self.inner.shutdown_conn(how)
    }

    fn set_io_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_io_timeout(timeout)
    }

    /// Records already read from the socket, or plaintext already
    /// decrypted, are there now, whatever the socket says.
    fn readable_within(&self, timeout: Duration) -> io::Result<bool> {
        if self.start < self.end {
            return Ok(true);
        }
        let decrypted = self
            .shared
            .session()
            .process_new_packets()
            .map_err(tls_error)?
            .plaintext_bytes_to_read();
        if decrypted > 0 {
            return Ok(true);
        }
        self.inner.readable_within(timeout)
    }

    fn close(&mut self) -> io::Result<()> {
        let _sending = self
            .shared
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.outgoing.clear();
        {
            let mut session = self.shared.session();
            session.send_close_notify();
            while session.wants_write() {
                session.write_tls(&mut self.outgoing)?;
            }
        }
        self.inner.write_all(&self.outgoing)?;
        self.inner.flush()
    }
}

/// TLS settings from the options every NBD-serving command shares
/// (`--nbd-tls`, `--nbd-tls-cert`, `--nbd-tls-key`, `--nbd-tls-ca`). Without
/// a mode, a certificate means `require` and no certificate means off.
pub fn tls_from_options(
    mode: Option<TlsMode>,
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<NbdTls>, String> {
    let given = cert.is_some() || key.is_some() || client_ca.is_some();
    let mode = mode.unwrap_or(if given {
        TlsMode::Require
    } else {
        TlsMode::Off
    });
    match (mode, cert, key) {
        (TlsMode::Off, ..) if given => Err(
            "--nbd-tls off with TLS files: leave out --nbd-tls-cert, --nbd-tls-key and --nbd-tls-ca, or choose --nbd-tls on|require"
                .into(),
        ),
        (TlsMode::Off, ..) => Ok(None),
        (mode, Some(cert), Some(key)) => NbdTls::load(mode, cert, key, client_ca).map(Some),
        (mode, ..) => Err(format!(
            "--nbd-tls {mode} needs both --nbd-tls-cert and --nbd-tls-key"
        )),
    }
}

/// Refuses to serve NBD on a TCP address other than loopback unless TLS is
/// required there or the user said the network is trusted (`insecure`):
/// without TLS anyone who can reach the port reads and writes the disks.
pub fn check_tcp_exposure(addr: &str, tls: Option<&NbdTls>, insecure: bool) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let resolved: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("--nbd-tcp {addr}: {e}"))?
        .collect();
    let required = tls.is_some_and(|t| t.mode() == TlsMode::Require);
    if !required && !insecure && resolved.iter().any(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--nbd-tcp {addr} is not a loopback address: serve it with --nbd-tls require \
             (and --nbd-tls-cert, --nbd-tls-key), or pass --nbd-insecure if the network is trusted"
        ));
    }
    Ok(())
}
