//! A small synchronous NBD client: fixed newstyle handshake with
//! structured replies, metadata contexts and `NBD_OPT_GO`, then one request
//! in flight at a time (a caller wanting parallelism opens several
//! clients). Made for reading snapshot images and their allocation and
//! dirty bitmaps; it talks to any conforming server, not only ours.
//!
//! Everything the server sends is checked (magics, cookies, lengths, chunk
//! offsets against the request, coverage of a read). A violation is an
//! [`io::ErrorKind::InvalidData`] error naming what was wrong, and it leaves
//! the client unusable (the stream may be out of step): later calls fail
//! with [`io::ErrorKind::NotConnected`]. An error the server *reports* for a
//! request (an error chunk or a simple reply's error) is returned as
//! [`io::Error::from_raw_os_error`] of its errno, with the server's message
//! in [`NbdClient::last_error_message`], and the client stays usable.
//! Allocations are bounded by the request sizes the caller chose, never by
//! lengths the server claims.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::*;
use crate::Conn;

/// The IANA port of NBD, used when a `nbd://` URI gives none.
pub const DEFAULT_PORT: u16 = 10809;

// Protocol values protocol.rs does not have (our server never sends them).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const REP_ERR_POLICY: u32 = (1 << 31) | 2;
const REP_ERR_PLATFORM: u32 = (1 << 31) | 4;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) | 8;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// Longest string the protocol allows (export and context names).
const MAX_STRING: usize = 4096;
/// Largest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest error chunk accepted: the fixed fields, a message of up to
/// 64 KiB (its length is 16 bits) and some trailing fields.
const MAX_ERROR_CHUNK: u32 = 6 + 0xffff + 64;
/// Longest range asked in one BLOCK_STATUS request (lengths are 32-bit;
/// kept a multiple of the largest minimum block size, 64 KiB).
const MAX_STATUS_REQUEST: u64 = 0xffff_0000;
/// Most descriptors of one context kept from one reply: the rest of a
/// longer chunk is skipped and asked for again, so memory stays bounded
/// however many descriptors a server sends.
const MAX_DESCRIPTORS_KEPT: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Addresses.

/// Where an export is: parsed from `nbd+unix:///EXPORT?socket=PATH` or
/// `nbd://HOST[:PORT]/EXPORT` (port default 10809; the export name
/// percent-decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix {
        socket: PathBuf,
        export: String,
    },
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
}

impl NbdAddress {
    /// Parses an NBD URI. The export name is the path after the first `/`
    /// (empty for the default export), percent-decoded; `socket=` is
    /// percent-decoded too. TLS schemes (`nbds…`) and vsock are not
    /// supported. Unknown query parameters are ignored.
    pub fn parse(uri: &str) -> io::Result<Self> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad NBD URI {uri:?}: {why}"),
            )
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        if rest.contains('#') {
            return Err(bad(
                "a fragment (#) has no meaning here; write a '#' in a name as %23",
            ));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = String::from_utf8(percent_decode(path).map_err(|w| bad(&w))?)
            .map_err(|_| bad("the export name is not UTF-8"))?;
        if export.len() > MAX_STRING || export.contains('\0') {
            return Err(bad("the export name is over 4096 bytes or holds a NUL"));
        }
        let mut socket: Option<Vec<u8>> = None;
        for param in query.into_iter().flat_map(|q| q.split('&')) {
            if param.is_empty() {
                continue;
            }
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = percent_decode(key).map_err(|w| bad(&w))?;
            let value = percent_decode(value).map_err(|w| bad(&w))?;
            if key == b"socket" && socket.replace(value).is_some() {
                return Err(bad("socket= given twice"));
            }
        }
        match scheme.to_ascii_lowercase().as_str() {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "a Unix socket URI has no host: nbd+unix:///EXPORT?socket=PATH",
                    ));
                }
                let socket = socket
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| bad("missing socket=PATH"))?;
                Ok(NbdAddress::Unix {
                    socket: PathBuf::from(OsString::from_vec(socket)),
                    export,
                })
            }
            "nbd" => {
                if socket.is_some() {
                    return Err(bad("socket= belongs to nbd+unix:// URIs"));
                }
                let (host, port) = parse_authority(authority).map_err(|w| bad(&w))?;
                Ok(NbdAddress::Tcp { host, port, export })
            }
            "nbds" | "nbds+unix" | "nbds+vsock" => Err(bad("TLS (nbds) is not supported")),
            "nbd+vsock" => Err(bad("vsock is not supported")),
            _ => Err(bad("unknown scheme: expected nbd or nbd+unix")),
        }
    }

    pub fn export(&self) -> &str {
        match self {
            NbdAddress::Unix { export, .. } | NbdAddress::Tcp { export, .. } => export,
        }
    }
}

/// The URI, percent-encoded so that [`NbdAddress::parse`] gives it back.
impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Unix { socket, export } => write!(
                f,
                "nbd+unix:///{}?socket={}",
                percent_encode(export.as_bytes()),
                percent_encode(socket.as_os_str().as_bytes())
            ),
            NbdAddress::Tcp { host, port, export } => {
                let export = percent_encode(export.as_bytes());
                if host.contains(':') {
                    write!(f, "nbd://[{host}]:{port}/{export}")
                } else {
                    write!(f, "nbd://{host}:{port}/{export}")
                }
            }
        }
    }
}

fn parse_authority(authority: &str) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user information (@) is not supported".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '[' in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ']' in the host")?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address needs brackets: nbd://[::1]:10809/EXPORT".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The stream.

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// After STARTTLS, over one of the others.
    Tls(Box<crate::tls::TlsStream<Stream>>),
}

impl Stream {
    fn open(address: &NbdAddress, timeout: Option<Duration>) -> io::Result<Stream> {
        let stream = match address {
            NbdAddress::Unix { socket, .. } => {
                Stream::Unix(UnixStream::connect(socket).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot connect to NBD socket {}: {e}", socket.display()),
                    )
                })?)
            }
            NbdAddress::Tcp { host, port, .. } => {
                let fail = |e: io::Error| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot connect to NBD server {host}:{port}: {e}"),
                    )
                };
                let mut last = None;
                let mut connected = None;
                for addr in (host.as_str(), *port).to_socket_addrs().map_err(fail)? {
                    let attempt = match timeout {
                        Some(t) => TcpStream::connect_timeout(&addr, t),
                        None => TcpStream::connect(addr),
                    };
                    match attempt {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = connected.ok_or_else(|| {
                    fail(last.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "no address for the host")
                    }))
                })?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        stream.set_timeout(timeout)?;
        Ok(stream)
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(Box::new(s.try_clone_conn()?)),
        })
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Stream::Tls(s) => s.set_io_timeout(t),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Tls(s) => {
                s.shutdown_conn(how);
                Ok(())
            }
        };
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Unix(_) => "Unix",
            Stream::Tcp(_) => "Tcp",
            Stream::Tls(_) => "Tls",
        })
    }
}

/// What the TLS stream needs of the socket under it.
impl Conn for Stream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self, how: Shutdown) {
        self.shutdown(how)
    }
    fn set_io_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(timeout)
    }
    fn readable_within(&self, timeout: Duration) -> io::Result<bool> {
        match self {
            Stream::Unix(s) => s.readable_within(timeout),
            Stream::Tcp(s) => s.readable_within(timeout),
            Stream::Tls(s) => s.readable_within(timeout),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD protocol violation by the server: {}", message.into()),
    )
}

/// Reads exactly `buf.len()` bytes, naming `what` if the server hangs up.
fn read_full(r: &mut impl Read, buf: &mut [u8], what: &str) -> io::Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the NBD server closed the connection while sending {what}"),
            )
        } else {
            io::Error::new(e.kind(), format!("reading {what} from the NBD server: {e}"))
        }
    })
}

fn read_array<const N: usize>(r: &mut impl Read, what: &str) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    read_full(r, &mut b, what)?;
    Ok(b)
}

fn skip(r: &mut impl Read, n: u64, what: &str) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got != n {
        return read_full(r, &mut [0u8; 1], what);
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------------------
// Handshake.

fn rep_error_name(kind: u32) -> Option<&'static str> {
    Some(match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not supported on the server's platform",
        REP_ERR_TLS_REQD => "TLS required (this client does not do TLS)",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size constraints required",
        REP_ERR_TOO_BIG => "too big",
        _ => return None,
    })
}

/// The error for an `NBD_REP_ERR_*` reply to `option`.
fn option_error(option: u32, kind: u32, data: &[u8], export: &str) -> io::Error {
    let message = String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]);
    let detail = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    if kind == REP_ERR_UNKNOWN {
        return io::Error::new(
            io::ErrorKind::NotFound,
            format!("NBD export {export:?} not found on the server{detail}"),
        );
    }
    let io_kind = match kind {
        REP_ERR_UNSUP | REP_ERR_PLATFORM | REP_ERR_TLS_REQD => io::ErrorKind::Unsupported,
        REP_ERR_POLICY => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    let name = rep_error_name(kind).map_or_else(|| format!("error {kind:#x}"), str::to_string);
    io::Error::new(
        io_kind,
        format!(
            "the NBD server refused NBD_OPT_{} for export {export:?}: {name}{detail}",
            option_name(option)
        ),
    )
}

/// What the handshake settled.
struct Negotiated {
    size: u64,
    flags: u16,
    structured: bool,
    block_size: Option<(u32, u32, u32)>,
    contexts: Vec<(String, u32)>,
}

struct Handshake<'a> {
    r: &'a mut BufReader<Stream>,
    w: &'a mut Stream,
    export: &'a str,
}

impl Handshake<'_> {
    fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.w.write_all(&b)
    }

    /// The next reply to `option`: (reply type, payload).
    fn reply(&mut self, option: u32) -> io::Result<(u32, Vec<u8>)> {
        let what = format!("the reply to NBD_OPT_{}", option_name(option));
        let h: [u8; 20] = read_array(self.r, &what)?;
        if be64(&h, 0) != REPLY_MAGIC {
            return Err(invalid(format!(
                "{what} has magic {:#x}, expected {REPLY_MAGIC:#x}",
                be64(&h, 0)
            )));
        }
        let (replied, kind, len) = (be32(&h, 8), be32(&h, 12), be32(&h, 16));
        if replied != option {
            return Err(invalid(format!(
                "a reply to option {replied} ({}) while NBD_OPT_{} was pending",
                option_name(replied),
                option_name(option)
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(invalid(format!(
                "{what} claims {len} bytes of payload (at most {MAX_OPTION_REPLY} accepted)"
            )));
        }
        let mut data = vec![0u8; len as usize];
        read_full(self.r, &mut data, &what)?;
        if kind == REP_ERR_TLS_REQD {
            // Nothing will succeed in plain text: say so, not what failed.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the NBD server requires TLS ({}): connect with TLS credentials",
                    String::from_utf8_lossy(&data)
                ),
            ));
        }
        Ok((kind, data))
    }

    fn ack_payload(option: u32, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return Err(invalid(format!(
                "an ACK to NBD_OPT_{} with {} bytes of payload",
                option_name(option),
                data.len()
            )));
        }
        Ok(())
    }

    /// The greeting and the client's flags.
    fn greet(&mut self) -> io::Result<()> {
        let hello: [u8; 18] = read_array(self.r, "its greeting")?;
        if be64(&hello, 0) != NBDMAGIC {
            return Err(invalid(format!(
                "greeting magic {:#x}: not an NBD server",
                be64(&hello, 0)
            )));
        }
        match be64(&hello, 8) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the NBD server uses oldstyle negotiation, which this client does not support",
                ))
            }
            other => return Err(invalid(format!("greeting with magic {other:#x}"))),
        }
        let server_flags = be16(&hello, 16);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD server does not offer fixed newstyle negotiation",
            ));
        }
        let mut client_flags = CLIENT_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_NO_ZEROES;
        }
        self.w.write_all(&client_flags.to_be_bytes())
    }

    /// NBD_OPT_STARTTLS, which must be acknowledged: a client that wants
    /// TLS does not go on in plain text.
    fn start_tls(&mut self) -> io::Result<()> {
        self.send_option(OPT_STARTTLS, &[])?;
        match self.reply(OPT_STARTTLS)? {
            (REP_ACK, data) => Self::ack_payload(OPT_STARTTLS, &data),
            (kind, data) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the NBD server refused TLS (reply type {kind:#x}: {})",
                    String::from_utf8_lossy(&data)
                ),
            )),
        }
    }

    /// Option haggling up to GO.
    fn run(&mut self, contexts: &[&str]) -> io::Result<Negotiated> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let structured = match self.reply(OPT_STRUCTURED_REPLY)? {
            (REP_ACK, data) => {
                Self::ack_payload(OPT_STRUCTURED_REPLY, &data)?;
                true
            }
            (kind, _) if kind & (1 << 31) != 0 => false,
            (kind, _) => {
                return Err(invalid(format!(
                    "reply type {kind} to NBD_OPT_STRUCTURED_REPLY"
                )))
            }
        };

        let mut queries: Vec<&str> = Vec::new();
        for &c in contexts {
            if c.is_empty() || c.len() > MAX_STRING || c.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad metadata context name {c:?}"),
                ));
            }
            if !queries.contains(&c) {
                queries.push(c);
            }
        }
        let selected = if queries.is_empty() {
            Vec::new()
        } else if !structured {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD server does not do structured replies, which metadata contexts need",
            ));
        } else {
            self.set_meta_context(&queries)?
        };

        let mut go = (self.export.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(self.export.as_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &go)?;
        let mut export = None;
        let mut block_size = None;
        loop {
            match self.reply(OPT_GO)? {
                (REP_INFO, data) => {
                    if data.len() < 2 {
                        return Err(invalid("an NBD_REP_INFO without its type"));
                    }
                    match be16(&data, 0) {
                        INFO_EXPORT => {
                            if data.len() != 12 {
                                return Err(invalid(format!(
                                    "NBD_INFO_EXPORT of {} bytes, expected 12",
                                    data.len()
                                )));
                            }
                            export = Some((be64(&data, 2), be16(&data, 10)));
                        }
                        INFO_BLOCK_SIZE => {
                            if data.len() != 14 {
                                return Err(invalid(format!(
                                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                                    data.len()
                                )));
                            }
                            let sizes = (be32(&data, 2), be32(&data, 6), be32(&data, 10));
                            check_block_size(sizes)?;
                            block_size = Some(sizes);
                        }
                        // Name, description, and kinds we do not know.
                        _ => {}
                    }
                }
                (REP_ACK, data) => {
                    Self::ack_payload(OPT_GO, &data)?;
                    break;
                }
                (REP_ERR_UNSUP, _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the NBD server does not support NBD_OPT_GO",
                    ))
                }
                (kind, data) if kind & (1 << 31) != 0 => {
                    return Err(option_error(OPT_GO, kind, &data, self.export))
                }
                (kind, _) => return Err(invalid(format!("reply type {kind} to NBD_OPT_GO"))),
            }
        }
        let (size, flags) =
            export.ok_or_else(|| invalid("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
        if flags & TFLAG_HAS_FLAGS == 0 {
            return Err(invalid(format!(
                "transmission flags {flags:#x} without NBD_FLAG_HAS_FLAGS"
            )));
        }
        Ok(Negotiated {
            size,
            flags,
            structured,
            block_size,
            contexts: selected,
        })
    }

    /// SET_META_CONTEXT for `queries`: every one must be granted.
    fn set_meta_context(&mut self, queries: &[&str]) -> io::Result<Vec<(String, u32)>> {
        let mut p = (self.export.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(self.export.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        self.send_option(OPT_SET_META_CONTEXT, &p)?;
        let mut granted: Vec<(String, u32)> = Vec::new();
        loop {
            match self.reply(OPT_SET_META_CONTEXT)? {
                (REP_META_CONTEXT, data) => {
                    if data.len() < 5 {
                        return Err(invalid("an NBD_REP_META_CONTEXT without a name"));
                    }
                    let id = be32(&data, 0);
                    let name = String::from_utf8(data[4..].to_vec())
                        .map_err(|_| invalid("a metadata context name that is not UTF-8"))?;
                    if !queries.contains(&name.as_str()) {
                        return Err(invalid(format!(
                            "selected metadata context {name:?}, which was not asked for"
                        )));
                    }
                    if granted.iter().any(|(n, i)| *n == name || *i == id) {
                        return Err(invalid(format!(
                            "metadata context {name:?} (id {id}) selected twice or with an id \
                             already given"
                        )));
                    }
                    granted.push((name, id));
                }
                (REP_ACK, data) => {
                    Self::ack_payload(OPT_SET_META_CONTEXT, &data)?;
                    break;
                }
                (kind, data) if kind & (1 << 31) != 0 => {
                    return Err(option_error(OPT_SET_META_CONTEXT, kind, &data, self.export))
                }
                (kind, _) => {
                    return Err(invalid(format!(
                        "reply type {kind} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
        let missing: Vec<&str> = queries
            .iter()
            .copied()
            .filter(|q| !granted.iter().any(|(n, _)| n == q))
            .collect();
        if !missing.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "NBD export {:?} does not offer metadata context{} {}",
                    self.export,
                    if missing.len() > 1 { "s" } else { "" },
                    missing
                        .iter()
                        .map(|m| format!("{m:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(granted)
    }
}

fn check_block_size((min, preferred, max): (u32, u32, u32)) -> io::Result<()> {
    let ok = min.is_power_of_two()
        && min <= 64 << 10
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min
        && (max == u32::MAX || max % min == 0);
    if !ok {
        return Err(invalid(format!(
            "block sizes minimum {min}, preferred {preferred}, maximum {max}: the minimum and \
             preferred must be powers of two (minimum at most 64 KiB, preferred at least the \
             minimum), the maximum a multiple of the minimum"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The client.

/// An error the server reported for one request.
struct ServerError {
    errno: u32,
    message: String,
}

/// A request's outcome: `Err` (outer) breaks the connection, `Ok(Err)` is
/// the server's error reply.
type Outcome<T> = io::Result<Result<T, ServerError>>;

enum Header {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, length: u32 },
}

/// Disjoint byte ranges of a read covered so far.
#[derive(Default)]
struct Coverage {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Adds `[start, start+len)`; false if it overlaps what is there.
    fn add(&mut self, start: u64, len: u64) -> bool {
        let end = start + len;
        let before = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        let after = self.ranges.range(start..).next().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| e > start) || after.is_some_and(|(s, _)| s < end) {
            return false;
        }
        let (mut s, mut e) = (start, end);
        if let Some((bs, _)) = before.filter(|&(_, be)| be == start) {
            self.ranges.remove(&bs);
            s = bs;
        }
        if let Some((as_, ae)) = after.filter(|&(as_, _)| as_ == end) {
            self.ranges.remove(&as_);
            e = ae;
        }
        self.ranges.insert(s, e);
        self.total += len;
        true
    }
}

pub struct NbdClient {
    reader: BufReader<Stream>,
    writer: Stream,
    export: String,
    size: u64,
    flags: u16,
    structured: bool,
    block_size: Option<(u32, u32, u32)>,
    max_payload: u32,
    /// Selected metadata contexts: (name, id), in the order asked.
    contexts: Vec<(String, u32)>,
    next_cookie: u64,
    /// Why the connection can no longer be used.
    broken: Option<String>,
    last_error: Option<String>,
    disconnected: bool,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("structured", &self.structured)
            .field("block_size", &self.block_size)
            .field("contexts", &self.contexts)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Fixed newstyle handshake, NO_ZEROES, NBD_OPT_STRUCTURED_REPLY,
    /// NBD_OPT_SET_META_CONTEXT for `contexts` (error if the server does
    /// not grant every one), NBD_OPT_GO (with NBD_INFO_BLOCK_SIZE request).
    pub fn connect(address: &NbdAddress, contexts: &[&str]) -> io::Result<NbdClient> {
        Self::connect_timeout(address, contexts, None)
    }

    /// [`Self::connect`] with a timeout on the connect and on every read
    /// and write of the socket (also after the handshake; see
    /// [`Self::set_timeout`]).
    pub fn connect_timeout(
        address: &NbdAddress,
        contexts: &[&str],
        timeout: Option<Duration>,
    ) -> io::Result<NbdClient> {
        Self::connect_with(address, contexts, timeout, None)
    }

    /// [`Self::connect_timeout`], with TLS (`NBD_OPT_STARTTLS` first, and
    /// the server's certificate checked) when `tls` is given.
    pub fn connect_with(
        address: &NbdAddress,
        contexts: &[&str],
        timeout: Option<Duration>,
        tls: Option<&crate::NbdTlsClient>,
    ) -> io::Result<NbdClient> {
        let export = address.export().to_string();
        if export.len() > MAX_STRING || export.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad NBD export name {export:?}"),
            ));
        }
        let mut writer = Stream::open(address, timeout)?;
        let mut reader = BufReader::with_capacity(256 << 10, writer.try_clone()?);
        let mut handshake = Handshake {
            r: &mut reader,
            w: &mut writer,
            export: &export,
        };
        let greeted = handshake.greet();
        let negotiated = match (greeted, tls) {
            (Err(e), _) => Err(e),
            (Ok(()), None) => handshake.run(contexts),
            (Ok(()), Some(tls)) => match handshake.start_tls() {
                Err(e) => Err(e),
                Ok(()) => {
                    let host = match address {
                        NbdAddress::Tcp { host, .. } => host.as_str(),
                        NbdAddress::Unix { .. } => "localhost",
                    };
                    // Nothing past the ACK is buffered: the server speaks
                    // again only after the client's TLS hello.
                    let plain = writer.try_clone()?;
                    writer = Stream::Tls(Box::new(tls.connect(plain, host)?));
                    reader = BufReader::with_capacity(256 << 10, writer.try_clone()?);
                    Handshake {
                        r: &mut reader,
                        w: &mut writer,
                        export: &export,
                    }
                    .run(contexts)
                }
            },
        };
        let n = match negotiated {
            Ok(n) => n,
            Err(e) => {
                // A soft disconnect where the stream is still in step; the
                // server may close without answering the ABORT.
                if e.kind() != io::ErrorKind::InvalidData {
                    let mut abort = IHAVEOPT.to_be_bytes().to_vec();
                    abort.extend_from_slice(&OPT_ABORT.to_be_bytes());
                    abort.extend_from_slice(&0u32.to_be_bytes());
                    let _ = writer.write_all(&abort);
                }
                writer.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        let max_payload = match n.block_size {
            Some((_, _, max)) if max != u32::MAX => max,
            _ => MAX_PAYLOAD,
        };
        tracing::debug!(
            export = %export,
            size = n.size,
            flags = n.flags,
            structured = n.structured,
            max_payload,
            "NBD client connected"
        );
        Ok(NbdClient {
            reader,
            writer,
            export,
            size: n.size,
            flags: n.flags,
            structured: n.structured,
            block_size: n.block_size,
            max_payload,
            contexts: n.contexts,
            next_cookie: 0,
            broken: None,
            last_error: None,
            disconnected: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// Max payload the server accepts (from NBD_INFO_BLOCK_SIZE, else 32 MiB).
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The transmission flags (`TFLAG_*` in [`crate::protocol`]).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether structured replies were negotiated (without them, block
    /// status is unavailable and reads come as simple replies).
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The server's (minimum, preferred, maximum) block sizes, if it sent
    /// them.
    pub fn block_size(&self) -> Option<(u32, u32, u32)> {
        self.block_size
    }

    /// The selected metadata contexts as (name, id).
    pub fn contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// The message of the last error the server reported for a request
    /// (empty without structured replies, which carry none).
    pub fn last_error_message(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Sets the timeout of every later read and write of the socket; a
    /// timeout in the middle of a reply leaves the client unusable.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.writer.set_timeout(timeout)
    }

    /// Reads buf.len() bytes at offset (split into requests of at most
    /// max_payload), assembling structured reply chunks (OFFSET_DATA,
    /// OFFSET_HOLE as zeros) and failing on ERROR chunks with the server's
    /// errno as io::Error::from_raw_os_error.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.usable()?;
        check_range(offset, buf.len())?;
        let step = self.max_payload as usize;
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            let outcome = self.read_request(piece, at);
            self.finish(outcome)?;
        }
        Ok(())
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.usable()?;
        check_range(offset, buf.len())?;
        if self.read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("NBD export {:?} is read-only", self.export),
            ));
        }
        let step = self.max_payload as usize;
        for (i, piece) in buf.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            let outcome = self.plain_request(CMD_WRITE, at, piece.len() as u32, piece);
            self.finish(outcome)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.usable()?;
        if self.flags & TFLAG_SEND_FLUSH == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("NBD export {:?} does not support flush", self.export),
            ));
        }
        let outcome = self.plain_request(CMD_FLUSH, 0, 0, &[]);
        self.finish(outcome)
    }

    /// BLOCK_STATUS for [offset, offset+len) (the client issues as many
    /// requests as it takes to cover the whole range): the extents of
    /// `context` as (length, flags), contiguous from offset, covering
    /// exactly the range (the last one clipped; where the server stops
    /// short, it is asked again from where it stopped). Neighbours with the
    /// same flags are merged.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<(u64, u32)>> {
        self.usable()?;
        let id = self
            .contexts
            .iter()
            .find(|(n, _)| n == context)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "metadata context {context:?} was not selected on this connection \
                         (selected: {:?})",
                        self.contexts.iter().map(|(n, _)| n).collect::<Vec<_>>()
                    ),
                )
            })?;
        let end = offset.checked_add(len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} overflows"),
            )
        })?;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(MAX_STATUS_REQUEST);
            let outcome = self.status_request(id, context, pos, ask);
            for (l, flags) in self.finish(outcome)? {
                match out.last_mut() {
                    Some(last) if last.1 == flags => last.0 += l,
                    _ => out.push((l, flags)),
                }
                pos += l;
            }
        }
        Ok(out)
    }

    /// NBD_CMD_DISC and close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.disconnected = true;
        if let Some(why) = &self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("NBD connection unusable after an earlier failure: {why}"),
            ));
        }
        let sent = self.send_request(CMD_DISC, 0, 0, &[]).map(|_| ());
        self.writer.shutdown(Shutdown::Both);
        sent
    }

    // -- requests ---------------------------------------------------------

    fn usable(&self) -> io::Result<()> {
        match &self.broken {
            Some(why) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("NBD connection unusable after an earlier failure: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Turns an outcome into the caller's result, marking the connection
    /// broken on anything but an error reply.
    fn finish<T>(&mut self, outcome: Outcome<T>) -> io::Result<T> {
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(errno = e.errno, message = %e.message, "NBD request failed");
                self.last_error = Some(e.message);
                if e.errno == ESHUTDOWN {
                    // The protocol wants a soft disconnect now.
                    let _ = self.send_request(CMD_DISC, 0, 0, &[]);
                    self.broken = Some("the server is shutting down (ESHUTDOWN)".into());
                    self.writer.shutdown(Shutdown::Both);
                }
                Err(io::Error::from_raw_os_error(e.errno as i32))
            }
            Err(e) => {
                self.broken = Some(e.to_string());
                self.writer.shutdown(Shutdown::Both);
                Err(e)
            }
        }
    }

    fn send_request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let request = Request {
            flags: 0,
            command,
            cookie: self.next_cookie,
            offset,
            length: length.into(),
        };
        if payload.is_empty() {
            self.writer.write_all(&request.encode())?;
        } else if payload.len() <= 64 << 10 {
            let mut b = Vec::with_capacity(REQUEST_LEN + payload.len());
            b.extend_from_slice(&request.encode());
            b.extend_from_slice(payload);
            self.writer.write_all(&b)?;
        } else {
            self.writer.write_all(&request.encode())?;
            self.writer.write_all(payload)?;
        }
        Ok(self.next_cookie)
    }

    /// The next reply header, which must be for `cookie`.
    fn header(&mut self, cookie: u64, what: &str) -> io::Result<Header> {
        let magic = u32::from_be_bytes(read_array(&mut self.reader, what)?);
        let (header, got) = match magic {
            SIMPLE_REPLY_MAGIC => {
                let h: [u8; 12] = read_array(&mut self.reader, what)?;
                (Header::Simple { error: be32(&h, 0) }, be64(&h, 4))
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let h: [u8; 16] = read_array(&mut self.reader, what)?;
                (
                    Header::Chunk {
                        flags: be16(&h, 0),
                        kind: be16(&h, 2),
                        length: be32(&h, 12),
                    },
                    be64(&h, 4),
                )
            }
            STRUCTURED_REPLY_MAGIC => {
                return Err(invalid(format!(
                    "a structured reply chunk in {what} though structured replies were not \
                     negotiated"
                )))
            }
            other => {
                return Err(invalid(format!(
                    "{what} has magic {other:#010x}, expected a simple ({SIMPLE_REPLY_MAGIC:#x}) \
                     or structured ({STRUCTURED_REPLY_MAGIC:#x}) reply"
                )))
            }
        };
        if got != cookie {
            return Err(invalid(format!(
                "{what} has cookie {got:#x}, but the request in flight has cookie {cookie:#x}"
            )));
        }
        Ok(header)
    }

    /// Reads an error chunk's payload (any type with bit 15 set).
    /// `range` is the request's, for ERROR_OFFSET.
    fn error_chunk(
        &mut self,
        kind: u16,
        length: u32,
        range: (u64, u64),
        what: &str,
    ) -> io::Result<ServerError> {
        if !(6..=MAX_ERROR_CHUNK).contains(&length) {
            return Err(invalid(format!(
                "an error chunk (type {kind:#x}) of {length} bytes in {what}"
            )));
        }
        let mut p = vec![0u8; length as usize];
        read_full(&mut self.reader, &mut p, what)?;
        let (errno, message_len) = (be32(&p, 0), be16(&p, 4) as usize);
        if 6 + message_len > p.len() {
            return Err(invalid(format!(
                "an error chunk whose {message_len}-byte message does not fit its {length} bytes"
            )));
        }
        if errno == 0 {
            return Err(invalid(format!("an error chunk with error 0 in {what}")));
        }
        let extra = p.len() - 6 - message_len;
        match kind {
            REPLY_TYPE_ERROR if extra != 0 => {
                return Err(invalid(format!(
                    "an ERROR chunk with {extra} bytes after its message"
                )))
            }
            REPLY_TYPE_ERROR_OFFSET => {
                if extra != 8 {
                    return Err(invalid(format!(
                        "an ERROR_OFFSET chunk with {extra} bytes after its message, expected 8"
                    )));
                }
                let at = be64(&p, 6 + message_len);
                if at < range.0 || at - range.0 >= range.1.max(1) {
                    return Err(invalid(format!(
                        "an ERROR_OFFSET at {at}, outside the request {}+{}",
                        range.0, range.1
                    )));
                }
            }
            _ => {}
        }
        Ok(ServerError {
            errno,
            message: String::from_utf8_lossy(&p[6..6 + message_len]).into_owned(),
        })
    }

    fn read_request(&mut self, buf: &mut [u8], offset: u64) -> Outcome<()> {
        let len = buf.len() as u64;
        let what = format!("the reply to READ {offset}+{len}");
        let cookie = self.send_request(CMD_READ, offset, len as u32, &[])?;
        if !self.structured {
            return match self.header(cookie, &what)? {
                Header::Simple { error: 0 } => {
                    read_full(&mut self.reader, buf, &what)?;
                    Ok(Ok(()))
                }
                Header::Simple { error } => Ok(Err(ServerError {
                    errno: error,
                    message: String::new(),
                })),
                // header() refuses chunks without structured replies.
                Header::Chunk { .. } => Err(invalid(format!("a structured chunk as {what}"))),
            };
        }
        let mut covered = Coverage::default();
        let mut error = None;
        loop {
            let (flags, kind, length) = match self.header(cookie, &what)? {
                Header::Chunk {
                    flags,
                    kind,
                    length,
                } => (flags, kind, length),
                Header::Simple { .. } => {
                    return Err(invalid(format!(
                        "a simple reply as {what}, on a connection with structured replies"
                    )))
                }
            };
            let done = flags & REPLY_FLAG_DONE != 0;
            match kind {
                REPLY_TYPE_NONE => none_chunk(length, done, &what)?,
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let (at, n) = if kind == REPLY_TYPE_OFFSET_DATA {
                        if length < 9 || u64::from(length) - 8 > len {
                            return Err(invalid(format!(
                                "an OFFSET_DATA chunk of {length} bytes in {what}"
                            )));
                        }
                        let at = u64::from_be_bytes(read_array(&mut self.reader, &what)?);
                        (at, u64::from(length) - 8)
                    } else {
                        if length != 12 {
                            return Err(invalid(format!(
                                "an OFFSET_HOLE chunk of {length} bytes (expected 12) in {what}"
                            )));
                        }
                        let p: [u8; 12] = read_array(&mut self.reader, &what)?;
                        let n = u64::from(be32(&p, 8));
                        if n == 0 {
                            return Err(invalid(format!("an empty OFFSET_HOLE in {what}")));
                        }
                        (be64(&p, 0), n)
                    };
                    let start = at
                        .checked_sub(offset)
                        .filter(|s| s.checked_add(n).is_some_and(|e| e <= len))
                        .ok_or_else(|| {
                            invalid(format!(
                                "a chunk for {at}+{n}, outside the READ {offset}+{len}"
                            ))
                        })?;
                    if !covered.add(start, n) {
                        return Err(invalid(format!("chunks overlap at {at}+{n} in {what}")));
                    }
                    let piece = &mut buf[start as usize..(start + n) as usize];
                    if kind == REPLY_TYPE_OFFSET_DATA {
                        read_full(&mut self.reader, piece, &what)?;
                    } else {
                        piece.fill(0);
                    }
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.error_chunk(k, length, (offset, len), &what)?;
                    error.get_or_insert(e);
                }
                other => {
                    return Err(invalid(format!(
                        "a chunk of type {other} in {what} (expected OFFSET_DATA, OFFSET_HOLE, \
                         NONE or an error)"
                    )))
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = error {
            return Ok(Err(e));
        }
        if covered.total != len {
            return Err(invalid(format!(
                "{what} ended after covering {} of {len} bytes",
                covered.total
            )));
        }
        Ok(Ok(()))
    }

    /// A command answered by success or an error only (WRITE, FLUSH).
    fn plain_request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Outcome<()> {
        let name = COMMAND_NAMES.get(command as usize).unwrap_or(&"command");
        let what = format!("the reply to {name} {offset}+{length}");
        let cookie = self.send_request(command, offset, length, payload)?;
        let mut error = None;
        let mut chunks = 0;
        loop {
            match self.header(cookie, &what)? {
                Header::Simple { error: e } if chunks == 0 => {
                    return Ok(if e == 0 {
                        Ok(())
                    } else {
                        Err(ServerError {
                            errno: e,
                            message: String::new(),
                        })
                    })
                }
                Header::Simple { .. } => {
                    return Err(invalid(format!(
                        "a simple reply in the middle of the structured {what}"
                    )))
                }
                Header::Chunk {
                    flags,
                    kind,
                    length,
                } => {
                    chunks += 1;
                    let done = flags & REPLY_FLAG_DONE != 0;
                    match kind {
                        REPLY_TYPE_NONE => none_chunk(length, done, &what)?,
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let e = self.error_chunk(k, length, (offset, length as u64), &what)?;
                            error.get_or_insert(e);
                        }
                        other => {
                            return Err(invalid(format!(
                                "a chunk of type {other} in {what} (expected NONE or an error)"
                            )))
                        }
                    }
                    if done {
                        return Ok(error.map_or(Ok(()), Err));
                    }
                }
            }
        }
    }

    /// One BLOCK_STATUS request for [pos, pos+ask): the descriptors of
    /// context `id`, non-empty, contiguous from pos, clipped to ask.
    fn status_request(
        &mut self,
        id: u32,
        context: &str,
        pos: u64,
        ask: u64,
    ) -> Outcome<Vec<(u64, u32)>> {
        let what = format!("the reply to BLOCK_STATUS {pos}+{ask}");
        let cookie = self.send_request(CMD_BLOCK_STATUS, pos, ask as u32, &[])?;
        let mut mine: Option<Vec<(u64, u32)>> = None;
        let mut seen = HashSet::new();
        let mut error = None;
        let mut chunks = 0;
        loop {
            let (flags, kind, length) = match self.header(cookie, &what)? {
                Header::Simple { error: e } if chunks == 0 && e != 0 => {
                    return Ok(Err(ServerError {
                        errno: e,
                        message: String::new(),
                    }))
                }
                Header::Simple { .. } => {
                    return Err(invalid(format!(
                        "a simple reply without an error as {what}"
                    )))
                }
                Header::Chunk {
                    flags,
                    kind,
                    length,
                } => (flags, kind, length),
            };
            chunks += 1;
            let done = flags & REPLY_FLAG_DONE != 0;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if length < 12 || (length - 4) % 8 != 0 {
                        return Err(invalid(format!(
                            "a BLOCK_STATUS chunk of {length} bytes (not 4 + a positive multiple \
                             of 8) in {what}"
                        )));
                    }
                    let chunk_id = u32::from_be_bytes(read_array(&mut self.reader, &what)?);
                    let Some((name, _)) = self.contexts.iter().find(|(_, i)| *i == chunk_id) else {
                        return Err(invalid(format!(
                            "block status for context id {chunk_id}, which was not selected, in \
                             {what}"
                        )));
                    };
                    if !seen.insert(chunk_id) {
                        return Err(invalid(format!(
                            "two BLOCK_STATUS chunks for context {name:?} in {what}"
                        )));
                    }
                    let count = (length - 4) / 8;
                    if chunk_id != id {
                        skip(&mut self.reader, u64::from(length) - 4, &what)?;
                    } else {
                        mine = Some(self.descriptors(count, ask, context, &what)?);
                    }
                }
                REPLY_TYPE_NONE => none_chunk(length, done, &what)?,
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.error_chunk(k, length, (pos, ask), &what)?;
                    error.get_or_insert(e);
                }
                other => {
                    return Err(invalid(format!(
                        "a chunk of type {other} in {what} (expected BLOCK_STATUS, NONE or an \
                         error)"
                    )))
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = error {
            return Ok(Err(e));
        }
        mine.map(Ok)
            .ok_or_else(|| invalid(format!("no block status for context {context:?} in {what}")))
    }

    /// Reads `count` descriptors of a chunk for a request of `ask` bytes:
    /// those kept, clipped to the request.
    fn descriptors(
        &mut self,
        count: u32,
        ask: u64,
        context: &str,
        what: &str,
    ) -> io::Result<Vec<(u64, u32)>> {
        let mut list = Vec::new();
        let mut covered = 0u64;
        for i in 0..count {
            if covered >= ask {
                return Err(invalid(format!(
                    "descriptors of context {context:?} past the end of the request in {what}"
                )));
            }
            if list.len() >= MAX_DESCRIPTORS_KEPT {
                // Asked again from `covered`.
                skip(&mut self.reader, u64::from(count - i) * 8, what)?;
                break;
            }
            let d: [u8; 8] = read_array(&mut self.reader, what)?;
            let (l, flags) = (u64::from(be32(&d, 0)), be32(&d, 4));
            if l == 0 {
                return Err(invalid(format!(
                    "a descriptor of length 0 for context {context:?} in {what}"
                )));
            }
            let l = l.min(ask - covered);
            list.push((l, flags));
            covered += l;
        }
        Ok(list)
    }
}

fn none_chunk(length: u32, done: bool, what: &str) -> io::Result<()> {
    if length != 0 {
        return Err(invalid(format!(
            "a NONE chunk with {length} bytes in {what}"
        )));
    }
    if !done {
        return Err(invalid(format!(
            "a NONE chunk without the DONE flag in {what}"
        )));
    }
    Ok(())
}

fn check_range(offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(_) => Ok(()),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} overflows"),
        )),
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if !self.disconnected && self.broken.is_none() {
            let _ = self.send_request(CMD_DISC, 0, 0, &[]);
            self.writer.shutdown(Shutdown::Both);
        }
    }
}
