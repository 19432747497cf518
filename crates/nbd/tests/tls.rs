//! Issue 13, item 1: TLS on the NBD server, byte by byte. A raw client
//! speaks the handshake in plain text and over rustls, against a server
//! with a certificate from a throw-away CA (openssl, `blksnap_test_support::
//! pki`): FORCEDTLS refuses every option but STARTTLS and ABORT, client
//! certificates are checked against the CA, STARTTLS forgets earlier
//! options, the Unix socket offers TLS without requiring it, and a server
//! without TLS refuses STARTTLS by policy. The real clients (qemu-img,
//! nbdinfo, nbdcopy) are in crates/cli/tests/nbd_tls.rs.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blksnap_engine::device::MemDevice;
use blksnap_engine::{Config, Engine};
use blksnap_nbd::protocol::*;
use blksnap_nbd::{NbdLimits, NbdServer, NbdSettings, NbdTls, TlsMode};
use blksnap_test_support::pki::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const DISK: &str = "disk";
const SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Server {
    server: Arc<NbdServer>,
    tcp: std::net::SocketAddr,
    unix: std::path::PathBuf,
    pki: TestPki,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A server of one 1 MiB device, with TLS in `mode` (none: off), the
    /// client CA checked if `verify`, and `limits`.
    fn start(mode: Option<TlsMode>, verify: bool, limits: NbdLimits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path());
        let engine = Arc::new(Engine::new(Config::default()).unwrap());
        engine.attach(DISK, Arc::new(MemDevice::new(SIZE))).unwrap();
        let tls = mode.map(|mode| {
            NbdTls::load(
                mode,
                &pki.server_cert,
                &pki.server_key,
                verify.then_some(pki.ca.as_path()),
            )
            .unwrap()
        });
        let server = NbdServer::with_limits(engine, NbdSettings { limits, tls });
        let unix = dir.path().join("nbd.sock");
        server.listen_unix(&unix).unwrap();
        let (tcp, _) = server.listen_tcp("127.0.0.1:0").unwrap();
        Server {
            server,
            tcp,
            unix,
            pki,
            _dir: dir,
        }
    }

    fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.tcp).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// A TCP client through STARTTLS and the TLS handshake, presenting the
    /// certificate in `client` (a directory of [`TestPki`]) if it has one.
    fn tls(
        &self,
        client: &Path,
    ) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let mut s = self.tcp();
        hello(&mut s);
        assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
        let mut tls = start_tls(s, client);
        // The handshake's outcome shows at the first exchange.
        tls.flush()?;
        let (kind, _) = try_option(&mut tls, OPT_LIST, &[])?;
        if kind != REP_SERVER {
            return Err(io::Error::other(format!(
                "LIST over TLS answered {kind:#x}"
            )));
        }
        loop {
            if try_reply(&mut tls)?.0 == REP_ACK {
                return Ok(tls);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

fn start_tls(
    s: TcpStream,
    client: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(client.join("ca-cert.pem")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cert = client.join("client-cert.pem");
    let config = if cert.exists() {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&cert).unwrap()],
                PrivateKeyDer::from_pem_file(client.join("client-key.pem")).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let name = ServerName::try_from("localhost").unwrap();
    let session = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(session, s)
}

/// Reads the greeting and answers it (fixed newstyle, no zeroes).
fn hello(s: &mut impl ReadWrite) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)?;
    s.flush()
}

/// One option reply: (type, payload).
fn try_reply(s: &mut impl Read) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut payload = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut payload)?;
    Ok((kind, payload))
}

fn try_option(s: &mut impl ReadWrite, opt: u32, data: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    send_option(s, opt, data)?;
    try_reply(s)
}

fn option(s: &mut impl ReadWrite, opt: u32, data: &[u8]) -> (u32, String) {
    let (kind, payload) = try_option(s, opt, data).unwrap();
    (kind, String::from_utf8_lossy(&payload).into_owned())
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

/// NBD_OPT_GO for `name`: the export's size, or the error reply's type.
fn go(s: &mut impl ReadWrite, name: &str) -> Result<u64, u32> {
    send_option(s, OPT_GO, &go_payload(name)).unwrap();
    let mut size = None;
    loop {
        let (kind, p) = try_reply(s).unwrap();
        match kind {
            REP_INFO if u16::from_be_bytes([p[0], p[1]]) == INFO_EXPORT => {
                size = Some(u64::from_be_bytes(p[2..10].try_into().unwrap()))
            }
            REP_INFO => {}
            REP_ACK => return Ok(size.unwrap()),
            error => return Err(error),
        }
    }
}

/// A write then a read back of `data` at `offset`, with simple replies.
fn round_trip(s: &mut impl ReadWrite, offset: u64, data: &[u8]) {
    let request = |command, cookie, length| Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    // One at a time: replies may come in any order.
    let mut out = request(CMD_WRITE, 1, data.len() as u64).encode().to_vec();
    out.extend_from_slice(data);
    s.write_all(&out).unwrap();
    s.flush().unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply, simple_reply(0, 1), "write reply");
    s.write_all(&request(CMD_READ, 2, data.len() as u64).encode())
        .unwrap();
    s.flush().unwrap();
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply, simple_reply(0, 2), "read reply");
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

/// Sends NBD_CMD_DISC.
fn disconnect(s: &mut impl Write) {
    let disc = Request {
        flags: 0,
        command: CMD_DISC,
        cookie: 9,
        offset: 0,
        length: 0,
    };
    s.write_all(&disc.encode()).unwrap();
    s.flush().unwrap();
}

fn assert_closed(s: &mut impl Read, what: &str) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "{what}: got {} bytes, not a close",
            rest.len()
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
            ),
            "{what}: {e}"
        ),
    }
}

#[test]
fn require_refuses_every_option_but_starttls_and_abort_before_tls() {
    let server = Server::start(Some(TlsMode::Require), true, NbdLimits::default());
    let mut s = server.tcp();
    hello(&mut s);
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, go_payload(DISK)),
        (OPT_GO, go_payload(DISK)),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_LIST_META_CONTEXT, Vec::new()),
        (99, Vec::new()),
        // Too big to be read: still the same refusal, not a different one.
        (OPT_INFO, vec![0; 70_000]),
    ] {
        let (kind, text) = option(&mut s, opt, &data);
        assert_eq!(kind, REP_ERR_TLS_REQD, "option {opt} before TLS: {text}");
        assert!(text.contains("requires TLS"), "{text}");
    }
    assert_eq!(option(&mut s, OPT_STARTTLS, b"x").0, REP_ERR_INVALID);
    assert_eq!(option(&mut s, OPT_ABORT, &[]).0, REP_ACK);

    // EXPORT_NAME has no error reply: the server hangs up.
    let mut s = server.tcp();
    hello(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, DISK.as_bytes()).unwrap();
    assert_closed(&mut s, "EXPORT_NAME without TLS");
}

#[test]
fn tls_serves_a_client_with_a_certificate_from_the_ca() {
    let server = Server::start(Some(TlsMode::Require), true, NbdLimits::default());
    let mut tls = server.tls(&server.pki.client_dir).unwrap();
    assert_eq!(
        option(&mut tls, OPT_STARTTLS, &[]).0,
        REP_ERR_INVALID,
        "STARTTLS once TLS is on"
    );
    assert_eq!(go(&mut tls, DISK), Ok(SIZE));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    round_trip(&mut tls, 4096, &data);
    disconnect(&mut tls);
    // A soft disconnect ends the TLS session cleanly: close_notify, then
    // the close (rustls reports a close without it as UnexpectedEof).
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn clients_without_a_certificate_from_the_ca_are_refused() {
    let server = Server::start(Some(TlsMode::Require), true, NbdLimits::default());
    for (dir, who) in [
        (&server.pki.anonymous_dir, "no client certificate"),
        (&server.pki.stranger_dir, "a certificate from another CA"),
    ] {
        let refused = server.tls(dir);
        assert!(refused.is_err(), "a client with {who} got in");
    }
    // Without a CA to check against, a client needs no certificate.
    let open = Server::start(Some(TlsMode::Require), false, NbdLimits::default());
    let mut tls = open.tls(&open.pki.anonymous_dir).unwrap();
    assert_eq!(go(&mut tls, DISK), Ok(SIZE));
    // The refusals cost the first server nothing.
    let mut tls = server.tls(&server.pki.client_dir).unwrap();
    assert_eq!(go(&mut tls, DISK), Ok(SIZE));
    round_trip(&mut tls, 0, b"still serving");
}

/// STARTTLS forgets what was negotiated before it (the spec: nothing of
/// the plain-text part may be kept), and `on` lets plain clients through.
#[test]
fn starttls_forgets_earlier_options_and_on_allows_plain_text() {
    let server = Server::start(Some(TlsMode::On), true, NbdLimits::default());
    let mut plain = server.tcp();
    hello(&mut plain);
    assert_eq!(go(&mut plain, DISK), Ok(SIZE));
    round_trip(&mut plain, 0, b"plain text allowed");

    let mut s = server.tcp();
    hello(&mut s);
    assert_eq!(option(&mut s, OPT_STRUCTURED_REPLY, &[]).0, REP_ACK);
    assert_eq!(option(&mut s, OPT_STARTTLS, &[]).0, REP_ACK);
    let mut tls = start_tls(s, &server.pki.client_dir);
    let mut meta = (DISK.len() as u32).to_be_bytes().to_vec();
    meta.extend_from_slice(DISK.as_bytes());
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    let (kind, text) = option(&mut tls, OPT_SET_META_CONTEXT, &meta);
    assert_eq!(
        kind, REP_ERR_INVALID,
        "structured replies survived STARTTLS: {text}"
    );
    assert_eq!(option(&mut tls, OPT_STRUCTURED_REPLY, &[]).0, REP_ACK);
    assert_eq!(
        option(&mut tls, OPT_SET_META_CONTEXT, &meta).0,
        REP_META_CONTEXT
    );
}

/// The Unix socket, guarded by its file mode, offers TLS under `require`
/// but does not force it.
#[test]
fn the_unix_socket_offers_tls_without_requiring_it() {
    let server = Server::start(Some(TlsMode::Require), true, NbdLimits::default());
    let mut plain = UnixStream::connect(&server.unix).unwrap();
    plain.set_read_timeout(Some(TIMEOUT)).unwrap();
    hello(&mut plain);
    assert_eq!(go(&mut plain, DISK), Ok(SIZE));
    round_trip(&mut plain, 512, b"local client");
}

#[test]
fn a_server_without_tls_refuses_starttls_by_policy() {
    let server = Server::start(None, false, NbdLimits::default());
    let mut s = server.tcp();
    hello(&mut s);
    let (kind, text) = option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(kind, REP_ERR_POLICY, "{text}");
    assert!(text.contains("not configured for TLS"), "{text}");
    assert_eq!(go(&mut s, DISK), Ok(SIZE));
    round_trip(&mut s, 0, b"plain");
}

/// Issue 13, item 3: the cap per client address. Two TCP connections
/// from 127.0.0.1 are served, the third is closed before the greeting,
/// while Unix socket clients are counted against the total only; a place
/// freed is taken again.
#[test]
fn connections_per_client_address_are_capped() {
    let limits = NbdLimits {
        max_connections_per_client: 2,
        ..NbdLimits::default()
    };
    let server = Server::start(None, false, limits);
    let open = |s: &Server| {
        let mut c = s.tcp();
        hello(&mut c);
        assert_eq!(go(&mut c, DISK), Ok(SIZE));
        c
    };
    let (a, _b) = (open(&server), open(&server));
    let mut third = server.tcp();
    assert_closed(&mut third, "a third connection from one address");
    let unix: Vec<UnixStream> = (0..3)
        .map(|_| {
            let mut u = UnixStream::connect(&server.unix).unwrap();
            u.set_read_timeout(Some(TIMEOUT)).unwrap();
            hello(&mut u);
            assert_eq!(go(&mut u, DISK), Ok(SIZE));
            u
        })
        .collect();
    drop(a);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while server.server.connection_count() != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed connection still counts"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut again = open(&server);
    round_trip(&mut again, 0, b"a freed place");
    drop(unix);
}

/// Our own client (the backup tool's) over TLS: STARTTLS first, the
/// server's certificate checked against the CA of its directory, its own
/// certificate presented; pipelined reads and writes through the shared
/// session. Without a certificate it is refused, and a server without TLS
/// makes it fail rather than go on in plain text.
#[test]
fn our_client_reads_and_writes_over_tls() {
    use blksnap_nbd::{NbdAddress, NbdClient, NbdTlsClient};
    let server = Server::start(Some(TlsMode::Require), true, NbdLimits::default());
    let address = NbdAddress::Tcp {
        host: "localhost".into(),
        port: server.tcp.port(),
        export: DISK.into(),
    };
    let tls = NbdTlsClient::from_dir(&server.pki.client_dir).unwrap();
    let mut c =
        NbdClient::connect_with(&address, &["base:allocation"], Some(TIMEOUT), Some(&tls)).unwrap();
    let data: Vec<u8> = (0..SIZE as usize / 2).map(|i| (i % 253) as u8).collect();
    c.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(&mut back, 4096).unwrap();
    assert!(back == data, "read back over TLS differs");
    drop(c);

    let anonymous = NbdTlsClient::from_dir(&server.pki.anonymous_dir).unwrap();
    let refused = NbdClient::connect_with(&address, &[], Some(TIMEOUT), Some(&anonymous));
    assert!(refused.is_err(), "a client without a certificate got in");
    let plain = Server::start(None, false, NbdLimits::default());
    let address = NbdAddress::Tcp {
        host: "localhost".into(),
        port: plain.tcp.port(),
        export: DISK.into(),
    };
    let err = NbdClient::connect_with(&address, &[], Some(TIMEOUT), Some(&tls)).unwrap_err();
    assert!(err.to_string().contains("refused TLS"), "{err}");
}
