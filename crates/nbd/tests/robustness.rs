//! Robustness of the NBD server against bad and hostile input: an engine and
//! an `NbdServer` in this process, on a Unix socket in a temporary
//! directory, and a minimal raw NBD client written here (fixed newstyle with
//! NO_ZEROES, STRUCTURED_REPLY or EXTENDED_HEADERS, SET_META_CONTEXT, GO;
//! simple, structured and extended replies) that misbehaves on purpose. Connections that only have to
//! behave (the survivors and the health checks) use the crate's
//! [`NbdClient`] instead, so that they cannot misbehave by accident.
//!
//! Every case asserts the protocol's answer (an error reply, an option error,
//! or the connection closed) and afterwards that the server still serves:
//! a connection opened before the bad one still reads back its data, a new
//! connection reads back every acknowledged write, the bad connections are
//! gone from the server, and no server thread panicked.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use blksnap_engine::{
    BlockDevice, Config, Engine, FileDevice, MemDevice, SnapshotOptions, StorageSpec,
};
use blksnap_nbd::protocol::*;
use blksnap_nbd::{NbdAddress, NbdClient, NbdServer};
use blksnap_test_support::Pattern;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, TestRunner};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK: &str = "disk";
/// Longest wait for any one answer of the server.
const TIMEOUT: Duration = Duration::from_secs(10);
/// `NBD_REP_ERR_*` replies have the top bit set.
const REP_ERR_BIT: u32 = 1 << 31;

// ---------------------------------------------------------------------------
// Panics in server threads (named "nbd-…") fail the tests.

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn watch_server_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if thread::current()
                .name()
                .is_some_and(|n| n.starts_with("nbd-"))
            {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

fn assert_no_server_panic() {
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "a server thread panicked (see the output above)"
    );
}

// ---------------------------------------------------------------------------
// Byte helpers.

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
    b
}

/// Asserts that the server closes the connection without sending anything
/// more (end of stream, or a reset when it left our bytes unread).
fn assert_closed(s: &mut UnixStream, what: &str) {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "{what}: expected the connection closed, got {n} more bytes: {:02x?}",
            &buf[..n]
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected the connection closed, got: {e}"),
    }
}

/// Reads everything until the server closes; panics if it does not.
fn read_until_closed(s: &mut UnixStream, what: &str) -> Vec<u8> {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the server did not close the connection: {e}"),
    }
    out
}

// ---------------------------------------------------------------------------
// Handshake.

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect to the NBD socket");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads the server's greeting; returns its handshake flags.
fn read_hello(s: &mut UnixStream) -> u16 {
    let b = read_n(s, 18);
    assert_eq!(be64(&b, 0), NBDMAGIC);
    assert_eq!(be64(&b, 8), IHAVEOPT);
    let flags = be16(&b, 16);
    assert_ne!(flags & FLAG_FIXED_NEWSTYLE, 0);
    assert_ne!(flags & FLAG_NO_ZEROES, 0);
    flags
}

/// A connection past the greeting, with FIXED_NEWSTYLE | NO_ZEROES sent.
fn greeted(socket: &Path) -> UnixStream {
    let mut s = connect(socket);
    read_hello(&mut s);
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn option_bytes(option: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    s.write_all(&option_bytes(option, data.len() as u32, data))
        .unwrap();
}

#[derive(Debug)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

fn read_opt_reply(s: &mut UnixStream) -> OptReply {
    let h = read_n(s, 20);
    assert_eq!(be64(&h, 0), REPLY_MAGIC, "option reply magic");
    let len = be32(&h, 16) as usize;
    OptReply {
        option: be32(&h, 8),
        kind: be32(&h, 12),
        data: read_n(s, len),
    }
}

/// Sends one option and expects a single reply of type `kind` to it.
fn expect_opt_reply(s: &mut UnixStream, option: u32, data: &[u8], kind: u32) -> OptReply {
    send_option(s, option, data);
    let r = read_opt_reply(s);
    assert_eq!(r.option, option, "reply to option {option}: {r:?}");
    assert_eq!(
        r.kind,
        kind,
        "reply to option {option}: type {:#x}, expected {kind:#x} ({})",
        r.kind,
        String::from_utf8_lossy(&r.data)
    );
    r
}

fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Sends INFO or GO for `name`: `Ok((size, transmission flags))` after the
/// ACK, `Err(reply type)` on an error reply.
fn info_or_go(s: &mut UnixStream, option: u32, name: &str) -> Result<(u64, u16), u32> {
    send_option(s, option, &go_payload(name, &[INFO_NAME, INFO_DESCRIPTION]));
    let mut export = None;
    loop {
        let r = read_opt_reply(s);
        assert_eq!(r.option, option);
        match r.kind {
            REP_INFO => {
                if be16(&r.data, 0) == INFO_EXPORT {
                    assert_eq!(r.data.len(), 12);
                    export = Some((be64(&r.data, 2), be16(&r.data, 10)));
                }
            }
            REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT before the ACK")),
            kind if kind & REP_ERR_BIT != 0 => return Err(kind),
            kind => panic!("unexpected reply {kind:#x} to INFO/GO"),
        }
    }
}

/// SET_META_CONTEXT: the selected contexts, id -> name.
fn set_meta_context(s: &mut UnixStream, export: &str, queries: &[&str]) -> HashMap<u32, String> {
    send_option(s, OPT_SET_META_CONTEXT, &meta_payload(export, queries));
    let mut contexts = HashMap::new();
    loop {
        let r = read_opt_reply(s);
        assert_eq!(r.option, OPT_SET_META_CONTEXT);
        match r.kind {
            REP_META_CONTEXT => {
                let name = String::from_utf8(r.data[4..].to_vec()).unwrap();
                assert!(queries.contains(&name.as_str()), "unasked context {name}");
                assert!(contexts.insert(be32(&r.data, 0), name).is_none());
            }
            REP_ACK => return contexts,
            kind => panic!("SET_META_CONTEXT failed: {kind:#x}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Transmission.

#[derive(Debug, Clone, PartialEq)]
enum Chunk {
    None,
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Hole {
        offset: u64,
        len: u32,
    },
    Status {
        id: u32,
        descriptors: Vec<(u32, u32)>,
    },
    /// BLOCK_STATUS_EXT (extended headers): 64-bit lengths and flags.
    StatusExt {
        id: u32,
        descriptors: Vec<(u64, u64)>,
    },
    Error {
        errno: u32,
        message: String,
    },
}

fn parse_chunk(kind: u16, p: &[u8]) -> Chunk {
    match kind {
        REPLY_TYPE_NONE => {
            assert!(p.is_empty(), "NONE chunk with a payload");
            Chunk::None
        }
        REPLY_TYPE_OFFSET_DATA => {
            assert!(p.len() > 8, "OFFSET_DATA chunk without data");
            Chunk::Data {
                offset: be64(p, 0),
                data: p[8..].to_vec(),
            }
        }
        REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(p.len(), 12, "OFFSET_HOLE chunk length");
            Chunk::Hole {
                offset: be64(p, 0),
                len: be32(p, 8),
            }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert!(
                p.len() >= 12 && (p.len() - 4) % 8 == 0,
                "BLOCK_STATUS length"
            );
            Chunk::Status {
                id: be32(p, 0),
                descriptors: p[4..].chunks(8).map(|d| (be32(d, 0), be32(d, 4))).collect(),
            }
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            assert!(
                p.len() >= 24 && (p.len() - 8) % 16 == 0,
                "BLOCK_STATUS_EXT length"
            );
            let descriptors: Vec<_> = p[8..]
                .chunks(16)
                .map(|d| (be64(d, 0), be64(d, 8)))
                .collect();
            assert_eq!(
                be32(p, 4) as usize,
                descriptors.len(),
                "BLOCK_STATUS_EXT descriptor count"
            );
            Chunk::StatusExt {
                id: be32(p, 0),
                descriptors,
            }
        }
        REPLY_TYPE_ERROR => {
            assert!(p.len() >= 6, "ERROR chunk length");
            let len = be16(p, 4) as usize;
            assert_eq!(p.len(), 6 + len, "ERROR chunk message length");
            Chunk::Error {
                errno: be32(p, 0),
                message: String::from_utf8_lossy(&p[6..]).into_owned(),
            }
        }
        other => panic!("unknown structured reply chunk type {other}"),
    }
}

/// One whole reply: a simple reply, or all the chunks of a structured one.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    /// 0 on success; the simple reply's error or the first error chunk's.
    error: u32,
    /// Data of a simple read reply.
    data: Vec<u8>,
    /// `(flags, chunk)` of a structured reply, in arrival order.
    chunks: Vec<(u16, Chunk)>,
    /// The offset in each extended chunk header (the request's, says the
    /// spec).
    offsets: Vec<u64>,
}

struct RawClient {
    s: UnixStream,
    /// Replies in chunks: structured replies or extended headers.
    structured: bool,
    /// Extended headers: 32-byte requests, extended reply chunks.
    extended: bool,
    size: u64,
    flags: u16,
    /// Selected metadata contexts: id -> name.
    contexts: HashMap<u32, String>,
    /// Replies whose last chunk has not come yet, by cookie.
    partial: HashMap<u64, Reply>,
    next_cookie: u64,
}

impl RawClient {
    fn open(socket: &Path, export: &str, structured: bool, queries: &[&str]) -> RawClient {
        Self::negotiate(greeted(socket), export, structured, queries)
    }

    /// Finishes a handshake on a greeted connection.
    fn negotiate(mut s: UnixStream, export: &str, structured: bool, queries: &[&str]) -> RawClient {
        if structured {
            expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
        }
        let contexts = if queries.is_empty() {
            HashMap::new()
        } else {
            set_meta_context(&mut s, export, queries)
        };
        Self::go(s, export, structured, contexts)
    }

    /// A connection with extended headers (and no STRUCTURED_REPLY).
    fn open_extended(socket: &Path, export: &str, queries: &[&str]) -> RawClient {
        let mut s = greeted(socket);
        expect_opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[], REP_ACK);
        let contexts = if queries.is_empty() {
            HashMap::new()
        } else {
            set_meta_context(&mut s, export, queries)
        };
        Self::go(s, export, true, contexts).extended()
    }

    /// From now on, requests and replies in extended headers.
    fn extended(mut self) -> RawClient {
        self.extended = true;
        self
    }

    /// Sends GO and enters transmission.
    fn go(
        mut s: UnixStream,
        export: &str,
        structured: bool,
        contexts: HashMap<u32, String>,
    ) -> RawClient {
        let (size, flags) = info_or_go(&mut s, OPT_GO, export)
            .unwrap_or_else(|e| panic!("GO {export} failed: {e:#x}"));
        assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
        assert_eq!(flags & TFLAG_SEND_DF != 0, structured);
        RawClient {
            s,
            structured,
            extended: false,
            size,
            flags,
            contexts,
            partial: HashMap::new(),
            next_cookie: 1,
        }
    }

    fn send(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut b = if self.extended {
            request.encode_extended().to_vec()
        } else {
            request.encode().to_vec()
        };
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// The next whole reply; `read_len` tells a simple reply's data length
    /// from its cookie (a simple reply does not say).
    fn reply(&mut self, read_len: &dyn Fn(u64) -> usize) -> Reply {
        loop {
            let magic = be32(&read_n(&mut self.s, 4), 0);
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = read_n(&mut self.s, 12);
                    let (error, cookie) = (be32(&h, 0), be64(&h, 4));
                    let n = read_len(cookie);
                    assert!(
                        !(self.structured && n > 0),
                        "simple reply to a read on a structured connection"
                    );
                    assert!(!self.extended, "simple reply with extended headers");
                    let data = if error == 0 {
                        read_n(&mut self.s, n)
                    } else {
                        Vec::new()
                    };
                    return Reply {
                        cookie,
                        error,
                        data,
                        chunks: Vec::new(),
                        offsets: Vec::new(),
                    };
                }
                STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                    let extended = magic == EXTENDED_REPLY_MAGIC;
                    assert!(self.structured, "a reply chunk without structured replies");
                    assert_eq!(
                        extended, self.extended,
                        "reply magic {magic:#x} on a connection with extended headers {}",
                        self.extended
                    );
                    let (flags, kind, cookie, offset, len) = if extended {
                        let h = read_n(&mut self.s, 28);
                        let len = be64(&h, 20);
                        assert!(len <= u32::MAX as u64, "a chunk of {len} bytes");
                        let offset = Some(be64(&h, 12));
                        (be16(&h, 0), be16(&h, 2), be64(&h, 4), offset, len)
                    } else {
                        let h = read_n(&mut self.s, 16);
                        let len = be32(&h, 12).into();
                        (be16(&h, 0), be16(&h, 2), be64(&h, 4), None, len)
                    };
                    let payload = read_n(&mut self.s, len as usize);
                    let chunk = parse_chunk(kind, &payload);
                    let wide = matches!(chunk, Chunk::StatusExt { .. });
                    let narrow = matches!(chunk, Chunk::Status { .. });
                    assert!(
                        !(wide && !extended || narrow && extended),
                        "block status chunk type {kind} with extended headers {extended}"
                    );
                    let partial = self.partial.entry(cookie).or_insert_with(|| Reply {
                        cookie,
                        error: 0,
                        data: Vec::new(),
                        chunks: Vec::new(),
                        offsets: Vec::new(),
                    });
                    partial.chunks.push((flags, chunk));
                    partial.offsets.extend(offset);
                    if flags & REPLY_FLAG_DONE != 0 {
                        let mut reply = self.partial.remove(&cookie).unwrap();
                        reply.error = reply
                            .chunks
                            .iter()
                            .find_map(|(_, c)| match c {
                                Chunk::Error { errno, .. } => Some(*errno),
                                _ => None,
                            })
                            .unwrap_or(0);
                        return reply;
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie.wrapping_mul(0x1000_0001)
    }

    /// Sends one request and waits for its reply.
    fn request(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.cookie();
        self.send(flags, command, cookie, offset, length, payload);
        let n = if command == CMD_READ {
            length as usize
        } else {
            0
        };
        let r = self.reply(&|_| n);
        assert_eq!(r.cookie, cookie, "reply for another request");
        if self.extended {
            assert_eq!(
                r.offsets,
                vec![offset; r.chunks.len()],
                "chunk header offsets"
            );
        }
        r
    }

    /// The error of a request that must fail.
    fn errno(&mut self, flags: u16, command: u16, offset: u64, length: u64, payload: &[u8]) -> u32 {
        let r = self.request(flags, command, offset, length, payload);
        assert_ne!(
            r.error, 0,
            "command {command} flags {flags:#x} at {offset}+{length} should have failed"
        );
        if self.structured {
            assert_eq!(r.chunks.len(), 1, "an error reply is one chunk: {r:?}");
            assert_eq!(r.chunks[0].0, REPLY_FLAG_DONE);
        }
        r.error
    }

    fn try_read(&mut self, flags: u16, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let r = self.request(flags, CMD_READ, offset, len as u64, &[]);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(assemble(&r, self.structured, offset, len))
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        self.try_read(0, offset, len)
            .unwrap_or_else(|e| panic!("read {offset}+{len} failed: {e}"))
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let flags = if self.extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let r = self.request(flags, CMD_WRITE, offset, data.len() as u64, data);
        assert_eq!(r.error, 0, "write {offset}+{} failed", data.len());
    }

    /// Soft disconnect; the server closes.
    fn disconnect(mut self) {
        let cookie = self.cookie();
        self.send(0, CMD_DISC, cookie, 0, 0, &[]);
        assert_closed(&mut self.s, "after NBD_CMD_DISC");
    }
}

/// The data of a successful read reply, checking that structured chunks
/// cover the request exactly once, with DONE on the last chunk only.
fn assemble(r: &Reply, structured: bool, offset: u64, len: usize) -> Vec<u8> {
    assert_eq!(r.error, 0);
    if !structured {
        assert_eq!(r.data.len(), len);
        return r.data.clone();
    }
    let mut buf = vec![0xa5u8; len];
    let mut covered = vec![false; len];
    let last = r.chunks.len() - 1;
    for (i, (flags, chunk)) in r.chunks.iter().enumerate() {
        assert_eq!(
            flags & REPLY_FLAG_DONE != 0,
            i == last,
            "DONE must be on the last chunk only"
        );
        let (start, n, data) = match chunk {
            Chunk::Data { offset, data } => (*offset, data.len(), Some(data)),
            Chunk::Hole { offset, len } => {
                assert!(*len > 0, "empty hole");
                (*offset, *len as usize, None)
            }
            Chunk::None => {
                assert!(len == 0 && i == last, "NONE chunk in a read of {len}");
                continue;
            }
            other => panic!("unexpected chunk in a read reply: {other:?}"),
        };
        assert!(
            start >= offset && start + n as u64 <= offset + len as u64,
            "chunk {start}+{n} outside the read {offset}+{len}"
        );
        let at = (start - offset) as usize;
        assert!(
            covered[at..at + n].iter().all(|c| !c),
            "chunks overlap at {start}"
        );
        covered[at..at + n].fill(true);
        match data {
            Some(d) => buf[at..at + n].copy_from_slice(d),
            None => buf[at..at + n].fill(0),
        }
    }
    assert!(covered.iter().all(|&c| c), "chunks do not cover the read");
    buf
}

/// Block status chunks by context id, checking one chunk per context and
/// DONE on the last.
fn status_chunks(r: &Reply) -> HashMap<u32, Vec<(u32, u32)>> {
    chunks_by_context(r, |chunk| match chunk {
        Chunk::Status { id, descriptors } => Some((*id, descriptors.clone())),
        _ => None,
    })
}

/// [`status_chunks`] of a reply with extended headers (BLOCK_STATUS_EXT).
fn status_ext_chunks(r: &Reply) -> HashMap<u32, Vec<(u64, u64)>> {
    chunks_by_context(r, |chunk| match chunk {
        Chunk::StatusExt { id, descriptors } => Some((*id, descriptors.clone())),
        _ => None,
    })
}

fn chunks_by_context<T>(r: &Reply, status: impl Fn(&Chunk) -> Option<(u32, T)>) -> HashMap<u32, T> {
    assert_eq!(r.error, 0, "block status failed: {r:?}");
    let mut out = HashMap::new();
    let last = r.chunks.len() - 1;
    for (i, (flags, chunk)) in r.chunks.iter().enumerate() {
        assert_eq!(flags & REPLY_FLAG_DONE != 0, i == last);
        let Some((id, descriptors)) = status(chunk) else {
            panic!("unexpected chunk in a block status reply: {chunk:?}");
        };
        assert!(
            out.insert(id, descriptors).is_none(),
            "two chunks for context {id}"
        );
    }
    out
}

// ---------------------------------------------------------------------------
// The server under test.

/// An engine tracking a device `disk` (in memory, unless said otherwise),
/// served on a Unix socket in a temporary directory.
struct Fixture<D = MemDevice> {
    dir: tempfile::TempDir,
    socket: PathBuf,
    engine: Arc<Engine>,
    server: Arc<NbdServer>,
    disk: Arc<D>,
}

impl Fixture {
    /// `disk` is a memory device of `size` bytes.
    fn new(size: u64) -> Fixture {
        Fixture::serving(tempfile::tempdir().unwrap(), MemDevice::new(size))
    }
}

impl Fixture<FileDevice> {
    /// `disk` is a sparse file of `size` bytes in the fixture's directory:
    /// exports far larger than memory, holes and all.
    fn sparse_file(size: u64) -> Fixture<FileDevice> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let device = FileDevice::open(&path).unwrap();
        Fixture::serving(dir, device)
    }
}

impl<D: BlockDevice + 'static> Fixture<D> {
    fn serving(dir: tempfile::TempDir, disk: D) -> Fixture<D> {
        watch_server_panics();
        let engine = Arc::new(Engine::new(Config::default()).unwrap());
        let disk = Arc::new(disk);
        engine.attach(DISK, disk.clone()).unwrap();
        let server = NbdServer::new(engine.clone());
        let socket = dir.path().join("nbd.sock");
        server.listen_unix(&socket).unwrap();
        Fixture {
            dir,
            socket,
            engine,
            server,
            disk,
        }
    }

    fn raw_client(&self, structured: bool) -> RawClient {
        RawClient::open(&self.socket, DISK, structured, &[])
    }

    /// A well-behaved connection to `export`.
    fn nbd_client(&self, export: &str) -> NbdClient {
        let address = NbdAddress::Unix {
            socket: self.socket.clone(),
            export: export.to_string(),
        };
        let c = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT))
            .unwrap_or_else(|e| panic!("connecting to {export}: {e}"));
        // RawClient::go checks these of every connection it opens; the
        // connections opened here must not skip that check.
        assert!(c.structured_replies(), "{export}: no structured replies");
        assert_ne!(c.transmission_flags() & TFLAG_SEND_DF, 0, "{export}: no DF");
        c
    }

    /// A connection to `export` that has written `data` at `offset`: opened
    /// before the bad connections, its data must outlive them.
    fn survivor(&self, export: &str, offset: u64, data: &[u8]) -> NbdClient {
        let mut c = self.nbd_client(export);
        c.write_at(data, offset)
            .unwrap_or_else(|e| panic!("survivor write {offset}+{}: {e}", data.len()));
        c
    }

    /// The usual survivor: it has written 4 KiB (pattern 1) at 0 of the
    /// disk; and what it wrote.
    fn survivor_with_data(&self) -> (NbdClient, Vec<u8>) {
        let data = Pattern::XorShift.bytes(1, 4096);
        (self.survivor(DISK, 0, &data), data)
    }

    /// Waits until the server has exactly `n` connections (the bad ones
    /// closed on its side too).
    fn wait_connections(&self, n: usize) {
        let start = Instant::now();
        while self.server.connection_count() != n {
            assert!(
                start.elapsed() < TIMEOUT,
                "the server still has {} connections, expected {n}",
                self.server.connection_count()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The server still serves: the survivor (opened before the bad
    /// connections) and a new connection read back every acknowledged
    /// write, the bad connections are gone, no server thread panicked.
    fn check_healthy(&self, survivor: &mut NbdClient, acked: &[(u64, Vec<u8>)], live: usize) {
        for (offset, data) in acked {
            assert_eq!(
                &read_back(survivor, *offset, data.len()),
                data,
                "survivor at {offset}"
            );
        }
        self.wait_connections(live);
        let mut fresh = self.nbd_client(DISK);
        for (offset, data) in acked {
            assert_eq!(
                &read_back(&mut fresh, *offset, data.len()),
                data,
                "new client at {offset}"
            );
        }
        fresh.disconnect().unwrap();
        // NbdClient does not wait for the server to close after
        // NBD_CMD_DISC; the server's count tells that it did.
        self.wait_connections(live);
        assert_no_server_panic();
    }

    /// Every connection is gone (closed on the server's side too) and no
    /// server thread panicked.
    fn check_all_closed(&self) {
        self.wait_connections(0);
        assert_no_server_panic();
    }
}

fn read_back(c: &mut NbdClient, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    c.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {offset}+{len} of {}: {e}", c.export()));
    buf
}

impl<D> Drop for Fixture<D> {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Bad requests.

#[test]
fn bad_requests_get_protocol_errors() {
    // Larger than the maximum payload, so an oversized read is in range.
    let size = 40 * MIB;
    let fx = Fixture::new(size);
    let mine = Pattern::XorShift.bytes(1, 8192);
    let mut survivor = fx.survivor(DISK, 0, &mine);
    let mut acked = vec![(0, mine)];
    for structured in [false, true] {
        let mut c = fx.raw_client(structured);
        assert_eq!(c.size, size);
        let at = MIB + if structured { 64 * KIB } else { 0 };
        let data = Pattern::XorShift.bytes(2 + structured as u64, 4096);
        c.write(at, &data);
        acked.push((at, data.clone()));

        // Beyond the end: reads EINVAL, writes ENOSPC (payload consumed).
        assert_eq!(c.errno(0, CMD_READ, size - 512, 1024, &[]), EINVAL);
        assert_eq!(c.errno(0, CMD_READ, size, 1, &[]), EINVAL);
        assert_eq!(c.errno(0, CMD_READ, u64::MAX, 1, &[]), EINVAL);
        assert_eq!(c.errno(0, CMD_WRITE, size - 512, 1024, &[7; 1024]), ENOSPC);
        assert_eq!(c.errno(0, CMD_WRITE, size, 1, &[7]), ENOSPC);
        assert_eq!(c.errno(0, CMD_TRIM, size - 512, 1024, &[]), EINVAL);
        assert_eq!(c.errno(0, CMD_WRITE_ZEROES, size, 512, &[]), EINVAL);
        assert_eq!(c.errno(0, CMD_CACHE, size, 512, &[]), EINVAL);

        // offset + length overflowing u64.
        let wrap = u64::MAX - 100;
        assert_eq!(c.errno(0, CMD_READ, wrap, 4096, &[]), EINVAL);
        assert_eq!(c.errno(0, CMD_WRITE, wrap, 4096, &[9; 4096]), ENOSPC);
        assert_eq!(c.errno(0, CMD_TRIM, wrap, u32::MAX.into(), &[]), EINVAL);
        assert_eq!(
            c.errno(0, CMD_WRITE_ZEROES, wrap, u32::MAX.into(), &[]),
            EINVAL
        );
        assert_eq!(c.errno(0, CMD_CACHE, wrap, u32::MAX.into(), &[]), EINVAL);
        assert_eq!(
            c.errno(0, CMD_BLOCK_STATUS, wrap, u32::MAX.into(), &[]),
            EINVAL
        );

        // Over the maximum payload: EINVAL, or EOVERFLOW with structured
        // replies.
        let over = if structured { EOVERFLOW } else { EINVAL };
        assert_eq!(
            c.errno(0, CMD_READ, 0, u64::from(MAX_PAYLOAD) + 1, &[]),
            over
        );

        // Unknown command types and flags.
        assert_eq!(c.errno(0, 99, 0, 512, &[]), EINVAL);
        assert_eq!(c.errno(0, 99, 0, 0, &[]), EINVAL);
        assert_eq!(c.errno(0, u16::MAX, 0, 0, &[]), EINVAL);
        assert_eq!(c.errno(1 << 7, CMD_READ, 0, 512, &[]), EINVAL);
        assert_eq!(c.errno(1 << 15, CMD_FLUSH, 0, 0, &[]), EINVAL);
        // A write with an unknown flag is refused and not applied.
        assert_eq!(
            c.errno(
                1 << 12,
                CMD_WRITE,
                at,
                4096,
                &Pattern::XorShift.bytes(99, 4096)
            ),
            EINVAL
        );

        // Block status without structured replies or without a context.
        assert_eq!(c.errno(0, CMD_BLOCK_STATUS, 0, 4096, &[]), EINVAL);
        assert_eq!(
            c.errno(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 4096, &[]),
            EINVAL
        );

        // The connection is still in step and its data intact.
        assert_eq!(c.read(at, 4096), data);
        assert_eq!(c.request(0, CMD_FLUSH, 0, 0, &[]).error, 0);
        c.disconnect();
    }

    // With a context: block status beyond the end or of zero length.
    let mut c = RawClient::open(&fx.socket, DISK, true, &["base:allocation"]);
    assert_eq!(c.contexts.len(), 1);
    assert_eq!(c.errno(0, CMD_BLOCK_STATUS, size, 512, &[]), EINVAL);
    assert_eq!(c.errno(0, CMD_BLOCK_STATUS, size - 512, 1024, &[]), EINVAL);
    assert_eq!(c.errno(0, CMD_BLOCK_STATUS, 0, 0, &[]), EINVAL);
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    let chunks = status_chunks(&r);
    let total: u64 = chunks
        .values()
        .next()
        .unwrap()
        .iter()
        .map(|d| d.0 as u64)
        .sum();
    assert_eq!(total, 4096);
    c.disconnect();

    fx.check_healthy(&mut survivor, &acked, 1);
}

#[test]
fn oversized_write_header_and_bad_magic_disconnect() {
    let fx = Fixture::new(4 * MIB);
    let (mut survivor, mine) = fx.survivor_with_data();
    let mut acked = vec![(0, mine)];
    for (i, structured) in [false, true].into_iter().enumerate() {
        let mut bad = fx.raw_client(structured);
        let at = MIB + i as u64 * 64 * KIB;
        let data = Pattern::XorShift.bytes(10 + i as u64, 64 * KIB);
        bad.write(at, &data);
        acked.push((at, data));
        // A write announcing 32 MiB + 1: the server hangs up, no reply.
        bad.send(
            0,
            CMD_WRITE,
            5,
            at,
            u64::from(MAX_PAYLOAD) + 1,
            &[0xee; 4096],
        );
        assert_closed(&mut bad.s, "write over the maximum payload");
        fx.check_healthy(&mut survivor, &acked, 1);
    }
    // A request with a bad magic: the stream cannot be trusted, hang up.
    let mut bad = fx.raw_client(false);
    let mut header = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    header[0] ^= 0x80;
    bad.s.write_all(&header).unwrap();
    assert_closed(&mut bad.s, "request with a bad magic");
    fx.check_healthy(&mut survivor, &acked, 1);
}

#[test]
fn client_vanishing_mid_write_loses_nothing_acknowledged() {
    let fx = Fixture::new(4 * MIB);
    let mine = Pattern::XorShift.bytes(1, 4096);
    let mut survivor = fx.survivor(DISK, 3 * MIB, &mine);
    let at = MIB;
    let before = Pattern::XorShift.bytes(2, 64 * KIB);
    for structured in [false, true] {
        let mut c = fx.raw_client(structured);
        c.write(at, &before);
        // A WRITE header and half its payload, then gone.
        let half = Pattern::XorShift.bytes(3, 32 * KIB);
        c.send(0, CMD_WRITE, 77, at, 64 * KIB, &half);
        drop(c);
        fx.wait_connections(1);
        // A FUA write whose payload never completes, closing only our side
        // for writing: no reply may come for it.
        let mut c = fx.raw_client(structured);
        c.send(CMD_FLAG_FUA, CMD_WRITE, 78, at, 64 * KIB, &half);
        c.s.shutdown(Shutdown::Write).unwrap();
        let rest = read_until_closed(&mut c.s, "half a write, then EOF");
        assert!(
            rest.is_empty(),
            "reply to a write never completed: {rest:02x?}"
        );
    }
    fx.check_healthy(&mut survivor, &[(3 * MIB, mine), (at, before)], 1);
}

// ---------------------------------------------------------------------------
// Handshake.

type BadHandshake = Box<dyn Fn(&mut UnixStream)>;

#[test]
fn broken_handshakes_disconnect() {
    let fx = Fixture::new(4 * MIB);
    let (mut survivor, mine) = fx.survivor_with_data();
    let acked = vec![(0, mine)];
    let ok_flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();
    let garbage = Pattern::XorShift.bytes(7, 64);
    let cases: Vec<(&str, BadHandshake)> = vec![
        (
            "unknown client flag",
            Box::new(|s| s.write_all(&(1u32 << 2).to_be_bytes()).unwrap()),
        ),
        (
            "all client flags",
            Box::new(|s| s.write_all(&u32::MAX.to_be_bytes()).unwrap()),
        ),
        (
            "garbage instead of the client flags",
            Box::new({
                let mut g = garbage.clone();
                g[0] = 0xde;
                move |s| s.write_all(&g).unwrap()
            }),
        ),
        (
            "wrong option magic",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                let mut o = option_bytes(OPT_GO, 0, &[]);
                o[7] ^= 1;
                s.write_all(&o).unwrap();
            }),
        ),
        (
            "garbage after the client flags",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                s.write_all(&garbage).unwrap();
            }),
        ),
        (
            "option length 4 GiB - 1",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                s.write_all(&option_bytes(OPT_GO, u32::MAX, &[0; 100]))
                    .unwrap();
            }),
        ),
        (
            "option length 16 MiB",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                s.write_all(&option_bytes(OPT_LIST, 16 << 20, &[])).unwrap();
            }),
        ),
        (
            "truncated option payload",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                let p = go_payload(DISK, &[]);
                s.write_all(&option_bytes(OPT_GO, p.len() as u32, &p[..5]))
                    .unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            }),
        ),
        (
            "truncated option header",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                s.write_all(&option_bytes(OPT_GO, 0, &[])[..10]).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            }),
        ),
        (
            "truncated client flags",
            Box::new(|s| {
                s.write_all(&[0, 0]).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            }),
        ),
        (
            "EXPORT_NAME of an unknown export",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                s.write_all(&option_bytes(OPT_EXPORT_NAME, 4, b"nope"))
                    .unwrap();
            }),
        ),
        (
            "EXPORT_NAME of an image that is not taken",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                let name = format!("snapshot/{DISK}");
                s.write_all(&option_bytes(
                    OPT_EXPORT_NAME,
                    name.len() as u32,
                    name.as_bytes(),
                ))
                .unwrap();
            }),
        ),
        (
            "EXPORT_NAME that is not UTF-8",
            Box::new(move |s| {
                s.write_all(&ok_flags).unwrap();
                s.write_all(&option_bytes(OPT_EXPORT_NAME, 4, &[0x64, 0x69, 0xff, 0x6b]))
                    .unwrap();
            }),
        ),
    ];
    for (what, misbehave) in &cases {
        let mut s = connect(&fx.socket);
        read_hello(&mut s);
        misbehave(&mut s);
        assert_closed(&mut s, what);
        fx.check_healthy(&mut survivor, &acked, 1);
    }

    // Clients hanging up at every step of the handshake.
    drop(connect(&fx.socket));
    let mut s = connect(&fx.socket);
    read_hello(&mut s);
    drop(s);
    drop(greeted(&fx.socket));
    let mut s = greeted(&fx.socket);
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
    drop(s);
    let mut s = greeted(&fx.socket);
    let p = go_payload(DISK, &[]);
    s.write_all(&option_bytes(OPT_GO, p.len() as u32, &p[..3]))
        .unwrap();
    drop(s);
    fx.check_healthy(&mut survivor, &acked, 1);

    // ABORT: acknowledged, then closed.
    let mut s = greeted(&fx.socket);
    expect_opt_reply(&mut s, OPT_ABORT, &[], REP_ACK);
    assert_closed(&mut s, "after ABORT");
    fx.check_healthy(&mut survivor, &acked, 1);
}

#[test]
fn oversized_export_name_disconnects() {
    // EXPORT_NAME cannot be answered with an error: a server that cannot
    // satisfy it must terminate the session (proto.md, "Termination of the
    // session during option haggling").
    let fx = Fixture::new(4 * MIB);
    let mut s = greeted(&fx.socket);
    let name = vec![b'x'; 100 << 10];
    // The server may close as soon as it has read the length, before the
    // 100 KiB are written: a failed write (EPIPE) is that close.
    let _ = s.write_all(&option_bytes(OPT_EXPORT_NAME, name.len() as u32, &name));
    assert_closed(&mut s, "EXPORT_NAME over the option limit");
    fx.check_all_closed();
}

#[test]
fn handshake_errors_let_the_handshake_continue() {
    let fx = Fixture::new(4 * MIB);
    let (mut survivor, mine) = fx.survivor_with_data();

    let mut s = greeted(&fx.socket);
    // Unknown options.
    expect_opt_reply(&mut s, 42, &[], REP_ERR_UNSUP);
    expect_opt_reply(&mut s, 42, &Pattern::XorShift.bytes(3, 100), REP_ERR_UNSUP);
    expect_opt_reply(&mut s, u32::MAX, &[1, 2, 3], REP_ERR_UNSUP);
    // Unknown exports.
    expect_opt_reply(&mut s, OPT_GO, &go_payload("nope", &[]), REP_ERR_UNKNOWN);
    expect_opt_reply(&mut s, OPT_INFO, &go_payload("nope", &[]), REP_ERR_UNKNOWN);
    expect_opt_reply(
        &mut s,
        OPT_GO,
        &go_payload("snapshot/disk", &[]),
        REP_ERR_UNKNOWN,
    );
    // Malformed GO and INFO payloads.
    let good = go_payload(DISK, &[INFO_NAME]);
    let mut name_too_long = good.clone();
    name_too_long[3] = 200;
    let mut extra_byte = good.clone();
    extra_byte.push(0);
    let mut count_too_big = good.clone();
    let at = 4 + DISK.len();
    count_too_big[at..at + 2].copy_from_slice(&5u16.to_be_bytes());
    let mut not_utf8 = go_payload("d\u{7f}sk", &[]);
    not_utf8[5] = 0xff;
    for (option, payload) in [
        (OPT_GO, vec![]),
        (OPT_GO, vec![0, 0]),
        (OPT_GO, good[..good.len() - 1].to_vec()),
        (OPT_GO, name_too_long),
        (OPT_INFO, extra_byte),
        (OPT_GO, count_too_big),
        (OPT_GO, not_utf8),
    ] {
        expect_opt_reply(&mut s, option, &payload, REP_ERR_INVALID);
    }
    // Metadata contexts need structured replies first.
    expect_opt_reply(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_payload(DISK, &["base:allocation"]),
        REP_ERR_INVALID,
    );
    // Options with a payload where none is allowed.
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[0], REP_ERR_INVALID);
    expect_opt_reply(&mut s, OPT_LIST, &[0], REP_ERR_INVALID);
    // An option over the 64 KiB limit (but not absurdly large): refused,
    // its payload skipped.
    expect_opt_reply(
        &mut s,
        42,
        &Pattern::XorShift.bytes(4, 64 * KIB + 1),
        REP_ERR_TOO_BIG,
    );
    // The handshake is still in step: INFO and LIST work.
    let (size, _) = info_or_go(&mut s, OPT_INFO, DISK).unwrap();
    assert_eq!(size, 4 * MIB);
    send_option(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = read_opt_reply(&mut s);
        match r.kind {
            REP_SERVER => names.push(String::from_utf8(r.data[4..].to_vec()).unwrap()),
            REP_ACK => break,
            kind => panic!("LIST reply {kind:#x}"),
        }
    }
    assert_eq!(names, vec![DISK.to_string()]);
    // Structured replies, once only; then malformed and unknown contexts.
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ERR_INVALID);
    let mut meta = meta_payload(DISK, &["base:allocation"]);
    meta.pop();
    expect_opt_reply(&mut s, OPT_SET_META_CONTEXT, &meta, REP_ERR_INVALID);
    expect_opt_reply(
        &mut s,
        OPT_LIST_META_CONTEXT,
        &meta_payload("nope", &[]),
        REP_ERR_UNKNOWN,
    );
    // A query count far beyond the payload.
    let mut huge = meta_payload(DISK, &[]);
    let at = huge.len() - 4;
    huge[at..].copy_from_slice(&u32::MAX.to_be_bytes());
    huge.extend_from_slice(&[0, 0, 0, 1, b'x']);
    expect_opt_reply(&mut s, OPT_SET_META_CONTEXT, &huge, REP_ERR_INVALID);
    expect_opt_reply(&mut s, OPT_LIST_META_CONTEXT, &huge, REP_ERR_INVALID);
    // Contexts that do not exist (no dirty bitmaps on a device) are simply
    // not selected.
    let none = set_meta_context(&mut s, DISK, &["qemu:dirty-bitmap:since-0", "nope:nothing"]);
    assert!(none.is_empty(), "{none:?}");
    let contexts = set_meta_context(&mut s, DISK, &["base:allocation"]);
    assert_eq!(contexts.len(), 1);
    // And finally GO works, with the context, and the data is there.
    let mut c = RawClient::go(s, DISK, true, contexts);
    assert_eq!(c.read(0, 4096), mine);
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(status_chunks(&r).len(), 1);
    c.disconnect();

    // EXPORT_NAME without NO_ZEROES: size, flags and 124 zeroes.
    let mut s = connect(&fx.socket);
    read_hello(&mut s);
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    send_option(&mut s, OPT_EXPORT_NAME, DISK.as_bytes());
    let b = read_n(&mut s, 8 + 2 + 124);
    assert_eq!(be64(&b, 0), 4 * MIB);
    assert!(b[10..].iter().all(|&x| x == 0));
    let mut c = RawClient {
        s,
        structured: false,
        extended: false,
        size: 4 * MIB,
        flags: be16(&b, 8),
        contexts: HashMap::new(),
        partial: HashMap::new(),
        next_cookie: 1,
    };
    assert_ne!(c.flags & TFLAG_HAS_FLAGS, 0);
    assert_eq!(c.read(0, 4096), mine);
    c.disconnect();

    fx.check_healthy(&mut survivor, &[(0, mine)], 1);
}

// ---------------------------------------------------------------------------
// Pipelining.

#[test]
fn many_requests_in_flight_on_one_connection() {
    let fx = Fixture::new(4 * MIB);
    let (mut survivor, mine) = fx.survivor_with_data();
    let mut acked = vec![(0, mine)];
    const N: usize = 64;
    const BLOCK: usize = 4096;
    for (round, structured) in [false, true].into_iter().enumerate() {
        let mut c = fx.raw_client(structured);
        let reads_at = MIB + round as u64 * MIB / 2;
        let writes_at = reads_at + MIB / 4;
        let before = Pattern::XorShift.bytes(20 + round as u64, (N / 2 * BLOCK) as u64);
        c.write(reads_at, &before);
        // Every request written before any reply is read.
        let mut batch = Vec::new();
        let mut expected: HashMap<u64, (u16, u64, Vec<u8>)> = HashMap::new();
        for i in 0..N {
            let cookie = 0xc0de_0000_0000_0000 ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let k = (i / 2) as u64;
            let (command, offset, data) = if i % 2 == 0 {
                let o = k as usize * BLOCK;
                (CMD_READ, reads_at + o as u64, before[o..o + BLOCK].to_vec())
            } else {
                (
                    CMD_WRITE,
                    writes_at + k * BLOCK as u64,
                    Pattern::XorShift.bytes(100 + i as u64, BLOCK as u64),
                )
            };
            batch.extend_from_slice(
                &Request {
                    flags: 0,
                    command,
                    cookie,
                    offset,
                    length: BLOCK as u64,
                }
                .encode(),
            );
            if command == CMD_WRITE {
                batch.extend_from_slice(&data);
            }
            assert!(expected.insert(cookie, (command, offset, data)).is_none());
        }
        c.s.write_all(&batch).unwrap();
        let lengths: HashMap<u64, usize> = expected
            .iter()
            .map(|(&k, (cmd, _, _))| (k, if *cmd == CMD_READ { BLOCK } else { 0 }))
            .collect();
        let mut seen = HashSet::new();
        for _ in 0..N {
            let r = c.reply(&|cookie| lengths.get(&cookie).copied().unwrap_or(0));
            let (command, offset, data) = expected
                .get(&r.cookie)
                .unwrap_or_else(|| panic!("reply with an unknown cookie {:#x}", r.cookie));
            assert!(
                seen.insert(r.cookie),
                "two replies for cookie {:#x}",
                r.cookie
            );
            assert_eq!(r.error, 0);
            if *command == CMD_READ {
                assert_eq!(&assemble(&r, structured, *offset, BLOCK), data);
            } else if structured {
                assert_eq!(r.chunks, vec![(REPLY_FLAG_DONE, Chunk::None)]);
            }
        }
        assert_eq!(seen.len(), N);
        // No stray reply: the next one is for the next request.
        let r = c.request(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(r.error, 0);
        let written: Vec<u8> = (0..N)
            .filter(|i| i % 2 == 1)
            .flat_map(|i| Pattern::XorShift.bytes(100 + i as u64, BLOCK as u64))
            .collect();
        assert_eq!(c.read(writes_at, written.len()), written);
        acked.push((writes_at, written));
        acked.push((reads_at, before));
        c.disconnect();
    }
    fx.check_healthy(&mut survivor, &acked, 1);
}

#[test]
fn soft_disconnect_answers_requests_in_flight_first() {
    let fx = Fixture::new(4 * MIB);
    fx.disk.set_delay(Duration::from_millis(2));
    for structured in [false, true] {
        let mut c = fx.raw_client(structured);
        let mut batch = Vec::new();
        let mut data = Vec::new();
        for i in 0..16u64 {
            let block = Pattern::XorShift.bytes(200 + i, 4096);
            let request = Request {
                flags: CMD_FLAG_FUA * (i % 2) as u16,
                command: CMD_WRITE,
                cookie: 1000 + i,
                offset: MIB + i * 4096,
                length: 4096,
            };
            batch.extend_from_slice(&request.encode());
            batch.extend_from_slice(&block);
            data.extend_from_slice(&block);
        }
        batch.extend_from_slice(
            &Request {
                flags: 0,
                command: CMD_DISC,
                cookie: 2000,
                offset: 0,
                length: 0,
            }
            .encode(),
        );
        c.s.write_all(&batch).unwrap();
        let mut seen = HashSet::new();
        for _ in 0..16 {
            let r = c.reply(&|_| 0);
            assert_eq!(r.error, 0);
            assert!((1000..1016).contains(&r.cookie) && seen.insert(r.cookie));
        }
        assert_closed(&mut c.s, "after NBD_CMD_DISC");
        assert_eq!(
            fx.disk.contents()[MIB as usize..MIB as usize + data.len()],
            data[..]
        );
    }
    fx.disk.set_delay(Duration::ZERO);
    fx.check_all_closed();
}

#[test]
fn device_errors_become_error_replies() {
    let fx = Fixture::new(4 * MIB);
    let (mut survivor, mine) = fx.survivor_with_data();
    for structured in [false, true] {
        let mut c = fx.raw_client(structured);
        fx.disk.set_fail_reads(true);
        assert_eq!(c.try_read(0, 0, 4096), Err(EIO));
        assert_eq!(c.try_read(CMD_FLAG_DF, 0, 4096), Err(EIO));
        fx.disk.set_fail_reads(false);
        fx.disk.set_fail_writes(true);
        assert_eq!(
            c.errno(0, CMD_WRITE, 0, 4096, &Pattern::XorShift.bytes(5, 4096)),
            EIO
        );
        assert_eq!(c.errno(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 0, 4096, &[]), EIO);
        fx.disk.set_fail_writes(false);
        // The connection is still in step; nothing acknowledged was lost.
        assert_eq!(c.read(0, 4096), mine);
        c.disconnect();
    }
    fx.check_healthy(&mut survivor, &[(0, mine)], 1);
}

// ---------------------------------------------------------------------------
// Structured reads.

#[test]
fn structured_reads_send_holes_and_respect_df() {
    let fx = Fixture::new(4 * MIB);
    let mut c = fx.raw_client(true);
    assert_ne!(c.flags & TFLAG_SEND_DF, 0);
    let head = Pattern::XorShift.bytes(1, 4096);
    let middle = Pattern::XorShift.bytes(2, 10);
    c.write(0, &head);
    c.write(200 * KIB, &middle);
    let len = (320 * KIB + 100) as usize;
    let mut expected = vec![0u8; len];
    expected[..4096].copy_from_slice(&head);
    expected[200 * KIB as usize..200 * KIB as usize + 10].copy_from_slice(&middle);

    for offset in [0u64, 1000] {
        let n = len - offset as usize;
        let r = c.request(0, CMD_READ, offset, n as u64, &[]);
        assert_eq!(assemble(&r, true, offset, n), expected[offset as usize..]);
        let holes: Vec<_> = r
            .chunks
            .iter()
            .filter_map(|(_, ch)| match ch {
                Chunk::Hole { offset, len } => Some((*offset, *len)),
                _ => None,
            })
            .collect();
        assert!(
            !holes.is_empty(),
            "no hole in a read with 64 KiB+ zero runs"
        );
        assert!(holes.iter().all(|&(_, l)| l as u64 >= 64 * KIB));
        // The 128 KiB of zeroes after the first 64 KiB unit are a hole.
        let hole_bytes: u64 = holes.iter().map(|&(_, l)| l as u64).sum();
        assert!(hole_bytes >= 128 * KIB, "holes: {holes:?}");
        assert!(r
            .chunks
            .iter()
            .any(|(_, ch)| matches!(ch, Chunk::Data { .. })));
    }

    // DF: one data chunk with everything.
    let r = c.request(CMD_FLAG_DF, CMD_READ, 0, len as u64, &[]);
    assert_eq!(r.chunks.len(), 1, "DF read in {} chunks", r.chunks.len());
    match &r.chunks[0] {
        (REPLY_FLAG_DONE, Chunk::Data { offset: 0, data }) => assert_eq!(data, &expected),
        other => panic!("DF read reply {other:?}"),
    }
    // All zeroes with DF: still data, not a hole.
    let r = c.request(CMD_FLAG_DF, CMD_READ, 2 * MIB, 256 * KIB, &[]);
    assert!(
        matches!(&r.chunks[..], [(REPLY_FLAG_DONE, Chunk::Data { offset, data })]
            if *offset == 2 * MIB && data.len() == 256 * KIB as usize && data.iter().all(|&b| b == 0))
    );
    // All zeroes without DF: one hole.
    let r = c.request(0, CMD_READ, 2 * MIB, 256 * KIB, &[]);
    assert_eq!(
        r.chunks,
        vec![(
            REPLY_FLAG_DONE,
            Chunk::Hole {
                offset: 2 * MIB,
                len: 256 * KIB as u32
            }
        )]
    );
    // A structured read error is an error chunk, never a simple reply.
    let r = c.request(0, CMD_READ, 4 * MIB, 1, &[]);
    assert!(
        matches!(&r.chunks[..], [(REPLY_FLAG_DONE, Chunk::Error { errno, .. })] if *errno == EINVAL)
    );
    c.disconnect();
    fx.check_all_closed();
}

// ---------------------------------------------------------------------------
// Block status on a snapshot image.

/// Per tracking block, whether a dirty-bitmap context marks it, checking
/// that descriptors cover `[0, len)` exactly along block boundaries.
fn dirty_blocks(descriptors: &[(u32, u32)], block: u64, len: u64) -> Vec<bool> {
    let mut out = vec![false; len.div_ceil(block) as usize];
    let mut pos = 0u64;
    for &(l, flags) in descriptors {
        assert!(l > 0);
        assert_eq!(pos % block, 0, "descriptor not on a block boundary");
        let end = pos + l as u64;
        assert!(end % block == 0 || end == len);
        assert_eq!(flags & !STATE_DIRTY, 0);
        for b in pos / block..end.div_ceil(block) {
            out[b as usize] = flags & STATE_DIRTY != 0;
        }
        pos = end;
    }
    assert_eq!(pos, len, "descriptors do not cover the request");
    out
}

#[test]
fn block_status_of_allocation_and_dirty_bitmaps_on_an_image() {
    let size = 4 * MIB;
    let fx = Fixture::new(size);
    let block = fx.engine.cbt_info(DISK).unwrap().block_size as u64;
    assert_eq!(block, 64 * KIB);
    let blocks = (size / block) as usize;
    let mut dev = fx.nbd_client(DISK);
    // Before the first snapshot: block 0.
    dev.write_at(&Pattern::XorShift.bytes(1, 10), 100).unwrap();
    // A snapshot of the disk, taken, with 16 MiB of memory storage.
    let take = || {
        let storage = StorageSpec::Device(Arc::new(MemDevice::new(16 * MIB)));
        let id = fx
            .engine
            .snapshot_create(storage, SnapshotOptions::default())
            .unwrap();
        fx.engine.snapshot_add(&id, DISK).unwrap();
        fx.engine.snapshot_take(&id).unwrap();
        id
    };
    let first = take();
    // Between the snapshots: blocks 3, 10, 11-12 (one write across the
    // boundary) and the last one.
    let between: [(u64, usize); 4] = [
        (3 * block, block as usize),
        (10 * block + 100, 1),
        (11 * block + 60 * KIB, 8 * KIB as usize),
        (size - 512, 512),
    ];
    for (i, &(at, n)) in between.iter().enumerate() {
        dev.write_at(&Pattern::XorShift.bytes(10 + i as u64, n as u64), at)
            .unwrap();
    }
    fx.engine.snapshot_destroy(&first).unwrap();
    let second = take();
    // Written after the second take: not in the image's maps.
    dev.write_at(&Pattern::XorShift.bytes(30, 4096), 20 * block)
        .unwrap();

    let image = format!("snapshot/{DISK}");
    let queries = [
        "base:allocation",
        "qemu:dirty-bitmap:since-1",
        "qemu:dirty-bitmap:since-0",
        // The image's change number is 2: no bitmap since 2 or later.
        "qemu:dirty-bitmap:since-2",
    ];
    let mut c = RawClient::open(&fx.socket, &image, true, &queries);
    assert_eq!(c.size, size);
    let id = |name: &str| {
        *c.contexts
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .unwrap_or_else(|| panic!("context {name} not selected"))
            .0
    };
    let (alloc, since1, since0) = (
        id("base:allocation"),
        id("qemu:dirty-bitmap:since-1"),
        id("qemu:dirty-bitmap:since-0"),
    );
    assert_eq!(c.contexts.len(), 3, "contexts: {:?}", c.contexts);

    let mut expect1 = vec![false; blocks];
    for b in [3, 10, 11, 12, blocks - 1] {
        expect1[b] = true;
    }
    let mut expect0 = expect1.clone();
    expect0[0] = true;

    let r = c.request(0, CMD_BLOCK_STATUS, 0, size, &[]);
    let status = status_chunks(&r);
    assert_eq!(status.len(), 3);
    assert_eq!(dirty_blocks(&status[&since1], block, size), expect1);
    assert_eq!(dirty_blocks(&status[&since0], block, size), expect0);
    let total: u64 = status[&alloc].iter().map(|d| d.0 as u64).sum();
    assert_eq!(total, size);
    for &(l, flags) in &status[&alloc] {
        assert!(l > 0);
        assert_eq!(flags & !(STATE_HOLE | STATE_ZERO), 0);
    }

    // An unaligned range: dirty up to the end of block 12, then clean.
    let r = c.request(0, CMD_BLOCK_STATUS, 10 * block + 100, 3 * block, &[]);
    let status = status_chunks(&r);
    assert_eq!(
        status[&since1],
        vec![(3 * block as u32 - 100, STATE_DIRTY), (100, 0)]
    );

    // REQ_ONE: exactly one descriptor per context, within the request.
    let r = c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, size, &[]);
    let status = status_chunks(&r);
    assert_eq!(status.len(), 3);
    for descriptors in status.values() {
        assert_eq!(descriptors.len(), 1, "REQ_ONE gave {descriptors:?}");
        assert!(descriptors[0].0 > 0 && descriptors[0].0 as u64 <= size);
    }
    assert_eq!(status[&since1], vec![(3 * block as u32, 0)]);
    assert_eq!(status[&since0], vec![(block as u32, STATE_DIRTY)]);
    let r = c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3 * block + 5, 10, &[]);
    assert_eq!(status_chunks(&r)[&since1], vec![(10, STATE_DIRTY)]);

    // With extended headers: the same descriptors, in BLOCK_STATUS_EXT
    // chunks with 64-bit lengths and flags.
    let mut ext = RawClient::open_extended(&fx.socket, &image, &queries);
    assert_eq!(ext.contexts, c.contexts);
    let compact = status_chunks(&c.request(0, CMD_BLOCK_STATUS, 0, size, &[]));
    let wide = status_ext_chunks(&ext.request(0, CMD_BLOCK_STATUS, 0, size, &[]));
    assert_eq!(wide, widen(compact));
    ext.disconnect();

    // The image reads as the device at the second take.
    assert_eq!(
        c.read(3 * block, block as usize),
        Pattern::XorShift.bytes(10, block)
    );
    assert_eq!(c.read(20 * block, 4096), vec![0; 4096]);
    // A second connection that selected dirty bitmaps only.
    let mut bitmaps = RawClient::open(&fx.socket, &image, true, &["qemu:dirty-bitmap:since-1"]);
    let only = *bitmaps.contexts.keys().next().unwrap();
    // The snapshot destroyed under the connections (docs/nbd.md §5, §9):
    // reads fail with EIO; a BLOCK_STATUS with `base:allocation` among its
    // contexts fails as a whole with EIO (the allocation of a destroyed
    // image is gone), with one error chunk and no status chunk at all.
    fx.engine.snapshot_destroy(&second).unwrap();
    assert_eq!(c.try_read(0, 0, 4096).unwrap_err(), EIO);
    assert_eq!(
        c.errno(0, CMD_BLOCK_STATUS, 0, size, &[]),
        EIO,
        "block status with base:allocation after the destroy"
    );
    // ...and one asking for dirty bitmaps only is still answered, from the
    // copy of the map taken when they were selected.
    let r = bitmaps.request(0, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!(r.error, 0, "dirty bitmap after the destroy: {r:?}");
    let status = status_chunks(&r);
    assert_eq!(status.len(), 1);
    assert_eq!(dirty_blocks(&status[&only], block, size), expect1);
    assert_eq!(bitmaps.try_read(0, 0, 4096).unwrap_err(), EIO);
    bitmaps.disconnect();
    c.disconnect();
    dev.disconnect().unwrap();
    fx.check_all_closed();
}

/// SET_META_CONTEXT's raw replies: every `NBD_REP_META_CONTEXT` as
/// `(id, name)`, in arrival order, up to the ACK.
fn set_meta_context_replies(
    s: &mut UnixStream,
    export: &str,
    queries: &[&str],
) -> Vec<(u32, String)> {
    send_option(s, OPT_SET_META_CONTEXT, &meta_payload(export, queries));
    let mut replies = Vec::new();
    loop {
        let r = read_opt_reply(s);
        assert_eq!(r.option, OPT_SET_META_CONTEXT);
        match r.kind {
            REP_META_CONTEXT => replies.push((
                be32(&r.data, 0),
                String::from_utf8(r.data[4..].to_vec()).unwrap(),
            )),
            REP_ACK => return replies,
            kind => panic!("SET_META_CONTEXT failed: {kind:#x}"),
        }
    }
}

#[test]
fn repeated_context_names_select_each_context_once() {
    let size = 4 * MIB;
    let fx = Fixture::new(size);
    let storage = StorageSpec::Device(Arc::new(MemDevice::new(16 * MIB)));
    let id = fx
        .engine
        .snapshot_create(storage, SnapshotOptions::default())
        .unwrap();
    fx.engine.snapshot_add(&id, DISK).unwrap();
    fx.engine.snapshot_take(&id).unwrap();
    let image = format!("snapshot/{DISK}");
    let since0 = "qemu:dirty-bitmap:since-0";
    for (export, queries, expected) in [
        (
            DISK,
            vec!["base:allocation", "base:allocation"],
            vec![(1, "base:allocation")],
        ),
        (
            image.as_str(),
            vec![since0, "base:allocation", since0, "base:allocation", since0],
            vec![(256, since0), (1, "base:allocation")],
        ),
    ] {
        let mut s = greeted(&fx.socket);
        expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
        // One reply per distinct context, in the order first asked for.
        let replies = set_meta_context_replies(&mut s, export, &queries);
        let expected: Vec<(u32, String)> =
            expected.iter().map(|&(i, n)| (i, n.to_string())).collect();
        assert_eq!(
            replies, expected,
            "SET_META_CONTEXT {queries:?} on {export}"
        );
        let mut c = RawClient::go(s, export, true, replies.into_iter().collect());
        // BLOCK_STATUS: exactly one chunk per selected context, in the
        // order they were selected.
        for flags in [0, CMD_FLAG_REQ_ONE] {
            let r = c.request(flags, CMD_BLOCK_STATUS, 0, size, &[]);
            assert_eq!(r.error, 0, "block status on {export}: {r:?}");
            let ids: Vec<u32> = r
                .chunks
                .iter()
                .map(|(_, chunk)| match chunk {
                    Chunk::Status { id, .. } => *id,
                    other => panic!("unexpected chunk in a block status reply: {other:?}"),
                })
                .collect();
            let want: Vec<u32> = expected.iter().map(|e| e.0).collect();
            assert_eq!(ids, want, "status chunks on {export} (flags {flags:#x})");
            assert_eq!(status_chunks(&r).len(), expected.len());
        }
        c.disconnect();
    }
    fx.check_all_closed();
}

// ---------------------------------------------------------------------------
// Block sizes.

/// The `NBD_INFO_BLOCK_SIZE` (minimum, preferred, maximum) of `export` in
/// the reply to INFO or GO that asks for no information at all: the server
/// sends it anyway (docs/nbd.md §3), exactly once, before the ACK.
fn block_sizes(socket: &Path, export: &str, option: u32) -> (u32, u32, u32) {
    let mut s = greeted(socket);
    send_option(&mut s, option, &go_payload(export, &[]));
    let mut sizes = None;
    loop {
        let r = read_opt_reply(&mut s);
        assert_eq!(r.option, option);
        match r.kind {
            REP_INFO if be16(&r.data, 0) == INFO_BLOCK_SIZE => {
                assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                let got = (be32(&r.data, 2), be32(&r.data, 6), be32(&r.data, 10));
                assert!(sizes.replace(got).is_none(), "two NBD_INFO_BLOCK_SIZE");
            }
            REP_INFO => {}
            REP_ACK => break,
            kind => panic!("{option} of {export}: reply {kind:#x}"),
        }
    }
    sizes.unwrap_or_else(|| panic!("no NBD_INFO_BLOCK_SIZE for {export}"))
}

#[test]
fn block_sizes_are_what_the_documentation_promises() {
    let fx = Fixture::new(4 * MIB);
    // A device with a minimum I/O size of 1 MiB: chunks of 1 MiB too.
    fx.engine
        .attach(
            "big-io",
            Arc::new(MemDevice::with_min_io(8 * MIB, MIB as u32)),
        )
        .unwrap();
    // A device with a 64 MiB minimum I/O: its chunks are 64 MiB, over the
    // 32 MiB maximum.
    fx.engine
        .attach(
            "huge-io",
            Arc::new(MemDevice::with_min_io(64 * MIB, 64 * MIB as u32)),
        )
        .unwrap();
    // A device with a minimum I/O size that is no power of two: the
    // preferred size is rounded up to one, as the NBD spec requires.
    fx.engine
        .attach(
            "odd-io",
            Arc::new(MemDevice::with_min_io(8 * MIB, 6 * KIB as u32)),
        )
        .unwrap();
    let max = MAX_PAYLOAD;
    assert_eq!(max, 32 << 20);
    for option in [OPT_INFO, OPT_GO] {
        // Device exports: 1, max(4096, BLKIOMIN), 32 MiB.
        assert_eq!(block_sizes(&fx.socket, DISK, option), (1, 4096, max));
        assert_eq!(
            block_sizes(&fx.socket, "big-io", option),
            (1, MIB as u32, max)
        );
        assert_eq!(
            block_sizes(&fx.socket, "odd-io", option),
            (1, 8 * KIB as u32, max)
        );
        // Never over the maximum payload.
        assert_eq!(block_sizes(&fx.socket, "huge-io", option), (1, max, max));
    }
    for (device, storage) in [
        (DISK, 16 * MIB),
        ("big-io", 16 * MIB),
        ("huge-io", 128 * MIB),
    ] {
        let storage = StorageSpec::Device(Arc::new(MemDevice::new(storage)));
        let id = fx
            .engine
            .snapshot_create(storage, SnapshotOptions::default())
            .unwrap();
        fx.engine.snapshot_add(&id, device).unwrap();
        fx.engine.snapshot_take(&id).unwrap();
    }
    for option in [OPT_INFO, OPT_GO] {
        // Image exports: 1, the chunk size (at most 32 MiB), 32 MiB.
        let image = |d: &str| block_sizes(&fx.socket, &format!("snapshot/{d}"), option);
        assert_eq!(image(DISK), (1, 256 * KIB as u32, max));
        assert_eq!(image("big-io"), (1, MIB as u32, max));
        assert_eq!(image("huge-io"), (1, max, max));
    }
    fx.check_all_closed();
}

// ---------------------------------------------------------------------------
// Shutdown.

/// A memory device whose I/O, once the gate is closed, reports that it has
/// arrived and then waits until the gate opens: the readiness handshake
/// that tells a test a request really is inside the engine.
#[derive(Debug)]
struct GatedDevice {
    inner: MemDevice,
    gate: std::sync::Mutex<Gate>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    closed: bool,
    /// I/Os that have arrived since the gate closed.
    arrived: usize,
}

impl GatedDevice {
    fn new(size: u64) -> GatedDevice {
        GatedDevice {
            inner: MemDevice::new(size),
            gate: Default::default(),
            changed: Default::default(),
        }
    }

    fn close(&self) {
        *self.gate.lock().unwrap() = Gate {
            closed: true,
            arrived: 0,
        };
    }

    fn open(&self) {
        self.gate.lock().unwrap().closed = false;
        self.changed.notify_all();
    }

    /// Waits (bounded) until `n` I/Os are held at the closed gate.
    fn wait_arrived(&self, n: usize) {
        let (gate, timeout) = self
            .changed
            .wait_timeout_while(self.gate.lock().unwrap(), TIMEOUT, |g| g.arrived < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "only {} of {n} I/Os reached the device",
            gate.arrived
        );
    }

    fn pass(&self) {
        let mut gate = self.gate.lock().unwrap();
        if gate.closed {
            gate.arrived += 1;
            self.changed.notify_all();
            let _open = self.changed.wait_while(gate, |g| g.closed).unwrap();
        }
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.pass();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pass();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.pass();
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.pass();
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn shutdown_answers_in_flight_requests_and_refuses_new_connections() {
    let fx = Fixture::new(4 * MIB);
    let gated = Arc::new(GatedDevice::new(4 * MIB));
    fx.engine.attach("gated", gated.clone()).unwrap();
    let (tcp, _) = fx.server.listen_tcp("127.0.0.1:0").unwrap();
    let data = Pattern::XorShift.bytes(1, 4096);
    let mut c = RawClient::open(&fx.socket, "gated", true, &[]);
    c.write(0, &data);
    let mut simple = RawClient::open(&fx.socket, "gated", false, &[]);
    let mut handshaking = connect(&fx.socket);
    read_hello(&mut handshaking);

    // Both requests held inside the engine, at the device, when the
    // shutdown comes: the device says they have arrived (no sleep).
    gated.close();
    c.send(0, CMD_READ, 0xabc, 0, 4096, &[]);
    simple.send(CMD_FLAG_FUA, CMD_WRITE, 0xdef, 8192, 4096, &data);
    gated.wait_arrived(2);
    fx.server.shutdown();
    gated.open();

    let r = c.reply(&|_| 4096);
    assert_eq!(r.cookie, 0xabc);
    assert_eq!(assemble(&r, true, 0, 4096), data);
    let r = simple.reply(&|_| 0);
    assert_eq!((r.cookie, r.error), (0xdef, 0));
    assert_closed(&mut c.s, "in transmission at shutdown");
    assert_closed(&mut simple.s, "in transmission at shutdown");
    assert_closed(&mut handshaking, "in the handshake at shutdown");
    // The acknowledged FUA write reached the device.
    let mut written = vec![0; 4096];
    gated.inner.read_at(&mut written, 8192).unwrap();
    assert_eq!(written, data);

    // New connections are refused, or closed without a greeting.
    if let Ok(mut s) = UnixStream::connect(&fx.socket) {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut b = [0u8; 18];
        assert!(s.read_exact(&mut b).is_err(), "greeted after shutdown");
    }
    if let Ok(mut s) = TcpStream::connect(tcp) {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut b = [0u8; 18];
        assert!(
            s.read_exact(&mut b).is_err(),
            "greeted over TCP after shutdown"
        );
    }
    fx.check_all_closed();
}

// ---------------------------------------------------------------------------
// Random input.

/// The random tests' server: its 1 MiB disk gets the random input; the
/// survivor, on a second export "spare", has written 4 KiB (pattern 1) at 0.
fn random_fixture() -> (Fixture, NbdClient, Vec<u8>) {
    let fx = Fixture::new(MIB);
    let spare = Arc::new(MemDevice::new(MIB));
    fx.engine.attach("spare", spare).unwrap();
    let mine = Pattern::XorShift.bytes(1, 4096);
    let survivor = fx.survivor("spare", 0, &mine);
    (fx, survivor, mine)
}

/// 256 cases. Failures are saved, as proptest does by default, next to
/// this file (`robustness.proptest-regressions`, to be committed) and
/// replayed first on every run. The runner is built by hand (not with the
/// `proptest!` macro), so the source file is named here: the file
/// persistence finds it relative to the package root.
fn random_runner() -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        source_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/robustness.rs")),
        ..ProptestConfig::default()
    })
}

impl Fixture {
    /// After a random test: the server still serves, and "spare" holds what
    /// the survivor wrote, also read over a new connection.
    fn check_spare(&self, survivor: &mut NbdClient, mine: &[u8]) {
        self.check_healthy(survivor, &[], 1);
        let mut spare = self.nbd_client("spare");
        assert_eq!(read_back(&mut spare, 0, 4096), mine);
    }
}

/// A random test's request header, compact or extended by its length.
fn parse_header(header: &[u8]) -> Option<Request> {
    match header.len() {
        REQUEST_LEN => Request::parse(header.try_into().unwrap()),
        _ => Request::parse_extended(header.try_into().unwrap()),
    }
}

/// How many replies a request header followed by `extra` bytes (then EOF)
/// must get.
fn replies_due(header: &[u8], extra: usize) -> usize {
    let Some(r) = parse_header(header) else {
        return 0;
    };
    let extended = header.len() != REQUEST_LEN;
    let has_payload = r.command == CMD_WRITE || extended && r.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    match r.command {
        CMD_DISC => 0,
        _ if has_payload => {
            usize::from(r.length <= u64::from(MAX_PAYLOAD) && r.length <= extra as u64)
        }
        _ => 1,
    }
}

/// Parses every reply in `out` (the whole stream up to EOF) to `header`.
fn parse_replies(out: &[u8], header: &[u8], structured: bool) -> usize {
    let Some(request) = parse_header(header) else {
        assert!(out.is_empty(), "a reply to a request with a bad magic");
        return 0;
    };
    let extended = header.len() != REQUEST_LEN;
    let (header_len, magic) = if extended {
        (32, EXTENDED_REPLY_MAGIC)
    } else {
        (20, STRUCTURED_REPLY_MAGIC)
    };
    let mut rest = out;
    let mut count = 0;
    while !rest.is_empty() {
        if structured {
            loop {
                assert!(rest.len() >= header_len, "truncated chunk header");
                assert_eq!(be32(rest, 0), magic);
                assert_eq!(be64(rest, 8), request.cookie);
                let (flags, kind) = (be16(rest, 4), be16(rest, 6));
                let len = if extended {
                    assert_eq!(be64(rest, 16), request.offset, "chunk header offset");
                    be64(rest, 24) as usize
                } else {
                    be32(rest, 16) as usize
                };
                assert!(rest.len() >= header_len + len, "truncated chunk");
                parse_chunk(kind, &rest[header_len..header_len + len]);
                rest = &rest[header_len + len..];
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
        } else {
            assert!(rest.len() >= 16, "truncated simple reply");
            assert_eq!(be32(rest, 0), SIMPLE_REPLY_MAGIC);
            assert_eq!(be64(rest, 8), request.cookie);
            let data = if be32(rest, 4) == 0 && request.command == CMD_READ {
                request.length as usize
            } else {
                0
            };
            assert!(rest.len() >= 16 + data, "truncated read data");
            rest = &rest[16 + data..];
        }
        count += 1;
    }
    count
}

/// Request headers, mostly well-formed: compact ones (28 bytes), or
/// extended ones (32 bytes, lengths over 32 bits and `PAYLOAD_LEN` too).
fn header_strategy(size: u64, extended: bool) -> impl Strategy<Value = Vec<u8>> {
    let flags = prop_oneof![Just(0u16), 0u16..64, any::<u16>()];
    let command = prop_oneof![4 => 0u16..10, 1 => any::<u16>()];
    let offset = prop_oneof![
        0..size,
        size - 8192..size + 8192,
        Just(u64::MAX),
        any::<u64>()
    ];
    let widest = if extended { u64::MAX } else { u32::MAX.into() };
    let length = prop_oneof![
        0u64..REQUEST_LEN as u64,
        0u64..8192,
        Just(u64::from(MAX_PAYLOAD)),
        Just(u64::from(MAX_PAYLOAD) + 1),
        0..=widest
    ];
    let len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), len),
        4 => (flags, command, any::<u64>(), offset, length).prop_map(
            move |(flags, command, cookie, offset, length)| {
                let r = Request {
                    flags,
                    command,
                    cookie,
                    offset,
                    length,
                };
                if extended {
                    r.encode_extended().to_vec()
                } else {
                    r.encode().to_vec()
                }
            }
        ),
    ]
}

/// Modes 0-2: simple replies, structured, structured with a context;
/// mode 3: extended headers with a context.
#[test]
fn random_request_headers_never_break_the_server() {
    let (fx, mut survivor, mine) = random_fixture();
    let mut runner = random_runner();
    let strategy = (0u8..4).prop_flat_map(|mode| {
        (
            Just(mode),
            header_strategy(MIB, mode == 3),
            proptest::collection::vec(any::<u8>(), 0..EXTENDED_REQUEST_LEN),
        )
    });
    runner
        .run(&strategy, |(mode, header, extra)| {
            let structured = mode > 0;
            let queries: &[&str] = if mode >= 2 { &["base:allocation"] } else { &[] };
            let mut c = if mode == 3 {
                RawClient::open_extended(&fx.socket, DISK, queries)
            } else {
                RawClient::open(&fx.socket, DISK, structured, queries)
            };
            let mut bytes = header.clone();
            bytes.extend_from_slice(&extra);
            // The server may hang up before taking everything.
            let _ = c.s.write_all(&bytes);
            let _ = c.s.shutdown(Shutdown::Write);
            let out = read_until_closed(&mut c.s, "after a random request");
            let got = parse_replies(&out, &header, structured);
            prop_assert_eq!(got, replies_due(&header, extra.len()));
            prop_assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
            Ok(())
        })
        .unwrap();

    fx.check_spare(&mut survivor, &mine);
}

/// Pieces of a random handshake stream.
#[derive(Debug, Clone)]
enum Piece {
    Option {
        option: u32,
        /// Replaces the true payload length when set.
        len: Option<u32>,
        payload: Vec<u8>,
    },
    Garbage(Vec<u8>),
}

fn piece_strategy() -> impl Strategy<Value = Piece> {
    let option = prop_oneof![8 => 0u32..13, 1 => any::<u32>()];
    let name = prop_oneof![
        Just(String::new()),
        Just(DISK.to_string()),
        Just("snapshot/disk".to_string()),
        "[a-z/]{0,8}"
    ];
    let payload = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (name.clone(), proptest::collection::vec(any::<u16>(), 0..4))
            .prop_map(|(n, infos)| go_payload(&n, &infos)),
        (
            name,
            proptest::collection::vec(
                prop_oneof![
                    Just("base:allocation"),
                    Just("qemu:dirty-bitmap:since-0"),
                    Just("qemu:"),
                    Just("")
                ],
                0..3
            )
        )
            .prop_map(|(n, q)| meta_payload(&n, &q)),
    ];
    let len = prop_oneof![
        8 => Just(None),
        1 => prop_oneof![
            Just(MAX_OPTION_LEN + 1),
            Just(1 << 20),
            Just((1 << 20) + 1),
            Just(u32::MAX),
            0u32..100
        ]
        .prop_map(Some),
    ];
    prop_oneof![
        8 => (option, len, payload).prop_map(|(option, len, payload)| Piece::Option {
            option,
            len,
            payload
        }),
        1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Piece::Garbage),
    ]
}

#[test]
fn random_handshakes_never_break_the_server() {
    let (fx, mut survivor, mine) = random_fixture();
    let mut runner = random_runner();
    let flags = prop_oneof![
        8 => Just(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES),
        1 => Just(CLIENT_FIXED_NEWSTYLE),
        1 => any::<u32>()
    ];
    let strategy = (flags, proptest::collection::vec(piece_strategy(), 0..6));
    runner
        .run(&strategy, |(flags, pieces)| {
            let mut s = connect(&fx.socket);
            read_hello(&mut s);
            let mut bytes = flags.to_be_bytes().to_vec();
            for piece in &pieces {
                match piece {
                    Piece::Option {
                        option,
                        len,
                        payload,
                    } => bytes.extend_from_slice(&option_bytes(
                        *option,
                        len.unwrap_or(payload.len() as u32),
                        payload,
                    )),
                    Piece::Garbage(g) => bytes.extend_from_slice(g),
                }
            }
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(Shutdown::Write);
            // Whatever it answers, the server must end the connection once
            // the client has nothing more to say.
            read_until_closed(&mut s, "after a random handshake");
            prop_assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
            Ok(())
        })
        .unwrap();

    fx.check_spare(&mut survivor, &mine);
}

/// Issue 13, item 4: contexts are selected on the snapshot the image name
/// serves at SET_META_CONTEXT. When the snapshot changes before GO (destroy,
/// a write, a new take), GO is refused, and EXPORT_NAME hangs up: the old
/// map would hide the block written in between. Set again, the contexts
/// describe the new snapshot.
#[test]
fn contexts_set_on_one_snapshot_are_refused_on_the_next() {
    let size = 4 * MIB;
    let fx = Fixture::new(size);
    let block = fx.engine.cbt_info(DISK).unwrap().block_size as u64;
    let take = || {
        let storage = StorageSpec::Device(Arc::new(MemDevice::new(16 * MIB)));
        let id = fx
            .engine
            .snapshot_create(storage, SnapshotOptions::default())
            .unwrap();
        fx.engine.snapshot_add(&id, DISK).unwrap();
        fx.engine.snapshot_take(&id).unwrap();
        id
    };
    let image = format!("snapshot/{DISK}");
    let since0 = ["qemu:dirty-bitmap:since-0"];
    let first = take();
    let selected = || {
        let mut s = greeted(&fx.socket);
        expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
        assert_eq!(set_meta_context(&mut s, &image, &since0).len(), 1);
        s
    };
    let mut go = selected();
    let mut export_name = selected();
    // Unchanged, GO goes through (and the connection is then in
    // transmission: dropped here).
    let mut same = selected();
    assert!(info_or_go(&mut same, OPT_GO, &image).is_ok());
    drop(same);

    fx.engine.snapshot_destroy(&first).unwrap();
    fx.nbd_client(DISK)
        .write_at(&[0x5a; 4096], 5 * block)
        .unwrap();
    let _second = take();

    assert_eq!(
        info_or_go(&mut go, OPT_GO, &image),
        Err(REP_ERR_UNKNOWN),
        "GO with contexts of the destroyed snapshot"
    );
    send_option(&mut export_name, OPT_EXPORT_NAME, image.as_bytes());
    assert_closed(&mut export_name, "EXPORT_NAME with stale contexts");

    // Selected again on the same connection: GO now goes through.
    assert_eq!(set_meta_context(&mut go, &image, &since0).len(), 1);
    assert!(info_or_go(&mut go, OPT_GO, &image).is_ok());
    // The new snapshot's map: the block written in between is dirty since
    // the first take (change number 1).
    let address = NbdAddress::Unix {
        socket: fx.socket.clone(),
        export: image.clone(),
    };
    let since1 = "qemu:dirty-bitmap:since-1";
    let mut c = NbdClient::connect_timeout(&address, &[since1], Some(TIMEOUT)).unwrap();
    let dirty: Vec<(u64, u64)> = c
        .block_status(since1, 0, size)
        .unwrap()
        .into_iter()
        .scan(0u64, |at, (len, flags)| {
            let start = *at;
            *at += len;
            Some((start, len, flags))
        })
        .filter(|&(_, _, flags)| flags & STATE_DIRTY != 0)
        .map(|(start, len, _)| (start, len))
        .collect();
    assert_eq!(dirty, [(5 * block, block)]);
    drop((go, c));
    fx.check_all_closed();
}

/// Issue 13, item 5: a connection to an export that goes away (its
/// snapshot destroyed, its device detached) gets an error naming why, for
/// reads and writes alike, and the server stays up.
#[test]
fn destroyed_and_detached_exports_answer_with_a_clear_error() {
    let fx = Fixture::new(MIB);
    let storage = StorageSpec::Device(Arc::new(MemDevice::new(16 * MIB)));
    let id = fx
        .engine
        .snapshot_create(storage, SnapshotOptions::default())
        .unwrap();
    fx.engine.snapshot_add(&id, DISK).unwrap();
    fx.engine.snapshot_take(&id).unwrap();
    let mut image = fx.nbd_client(&format!("snapshot/{DISK}"));
    let mut device = fx.nbd_client(DISK);
    let mut buf = [0u8; 4096];
    image.read_at(&mut buf, 0).unwrap();
    device.read_at(&mut buf, 0).unwrap();

    fx.engine.snapshot_destroy(&id).unwrap();
    for write in [false, true] {
        let e = if write {
            image.write_at(&buf, 0)
        } else {
            image.read_at(&mut buf, 0)
        };
        assert!(e.is_err(), "I/O on a destroyed snapshot's image succeeded");
        let message = image.last_error_message().unwrap_or_default().to_string();
        assert!(message.contains("destroyed"), "write={write}: {message:?}");
    }
    fx.engine.detach(DISK).unwrap();
    for write in [false, true] {
        let e = if write {
            device.write_at(&buf, 0)
        } else {
            device.read_at(&mut buf, 0)
        };
        assert!(e.is_err(), "I/O on a detached device succeeded");
        let message = device.last_error_message().unwrap_or_default().to_string();
        assert!(message.contains("detached"), "write={write}: {message:?}");
    }
    drop((image, device));
    fx.check_all_closed();
}

/// Issue 13, item 5: `NO_HOLE` never punches a hole, and `FAST_ZERO` is
/// refused (ENOTSUP, nothing changed) where zeroing would mean writing
/// zeroes. On tmpfs, which can punch holes but has no ZERO_RANGE, a device
/// export reaches every one of these paths.
#[test]
fn no_hole_never_punches_and_fast_zero_is_refused_where_zeroing_is_slow() {
    use blksnap_engine::Zeroing;
    use std::os::unix::fs::MetadataExt;
    let skip = |why: &str| {
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("SKIPPED: {why}");
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    };
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        return skip("no tmpfs at /dev/shm: the zeroing paths cannot be reached");
    };
    let path = dir.path().join("disk.img");
    std::fs::write(&path, Pattern::XorShift.bytes(5, 4 * MIB)).unwrap();
    let probe = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let zero_range = rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(&probe, zero_range, 0, 4096).is_ok() {
        return skip("/dev/shm has ZERO_RANGE: no slow zeroing to refuse");
    }
    drop(probe);
    let before = std::fs::read(&path).unwrap();
    // The engine's device alone, then through NBD.
    let device = FileDevice::open(&path).unwrap();
    let fast = Zeroing {
        keep_allocated: true,
        fast_only: true,
    };
    let e = device.zero_range(0, 64 * KIB, fast).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(95), "{e}");
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a refused zeroing changed data"
    );

    let fx = Fixture::serving(dir, device);
    let mut c = fx.raw_client(true);
    let blocks = || std::fs::metadata(&path).unwrap().blocks();
    let allocated = blocks();

    // Fast and without a hole: impossible here, refused, nothing changed.
    let e = c.errno(
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        MIB,
        MIB,
        &[],
    );
    assert_eq!(e, ENOTSUP);
    assert!(c.read(MIB, MIB as usize) == before[MIB as usize..2 * MIB as usize]);
    // Without a hole: zeroes written, still allocated.
    let r = c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, MIB, MIB, &[]);
    assert_eq!(r.error, 0);
    assert!(c.read(MIB, MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(blocks(), allocated, "NO_HOLE punched a hole");
    // May punch: a hole; and a punch is fast, so FAST_ZERO goes through.
    for (flags, at) in [(0, 2 * MIB), (CMD_FLAG_FAST_ZERO, 3 * MIB)] {
        let r = c.request(flags, CMD_WRITE_ZEROES, at, MIB, &[]);
        assert_eq!(r.error, 0, "flags {flags:#x}");
        assert!(c.read(at, MIB as usize).iter().all(|&b| b == 0));
    }
    assert!(
        blocks() <= allocated - 2 * (MIB / 512),
        "zeroing that may punch left {} of {allocated} blocks",
        blocks()
    );
    assert!(
        c.read(0, MIB as usize) == before[..MIB as usize],
        "data outside the zeroed ranges changed"
    );
    c.disconnect();
    fx.check_all_closed();
}

/// Issue 13, item 3 (part): a client that connects and says nothing is
/// closed after the handshake timeout, one that finished its handshake is
/// not; one connection past the cap is closed before the greeting, and a
/// place freed is taken again.
#[test]
fn handshake_timeout_and_connection_cap_hold() {
    use blksnap_nbd::NbdLimits;
    watch_server_panics();
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::new(Config::default()).unwrap());
    engine.attach(DISK, Arc::new(MemDevice::new(MIB))).unwrap();
    let limits = NbdLimits {
        handshake_timeout: Some(Duration::from_millis(300)),
        max_connections: 3,
        ..NbdLimits::default()
    };
    let server = NbdServer::with_limits(engine, limits);
    let socket = dir.path().join("nbd.sock");
    server.listen_unix(&socket).unwrap();
    let address = NbdAddress::Unix {
        socket: socket.clone(),
        export: DISK.to_string(),
    };
    let client = || NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap();

    // Idle after the greeting, and idle halfway through an option: closed.
    let started = Instant::now();
    let mut idle = greeted(&socket);
    let mut halfway = greeted(&socket);
    halfway.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    read_until_closed(&mut idle, "an idle handshake");
    assert_closed(&mut halfway, "a handshake stalled inside an option");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "closed after {waited:?}, the timeout is 300 ms"
    );
    // Past the handshake, no timeout: still served after twice as long.
    let mut a = client();
    thread::sleep(Duration::from_millis(700));
    let mut buf = [0u8; 512];
    a.read_at(&mut buf, 0).unwrap();

    // The cap: three open, the fourth closed before the greeting.
    let (mut b, c) = (client(), client());
    let mut fourth = connect(&socket);
    assert_closed(&mut fourth, "a connection past the cap");
    assert_eq!(server.connection_count(), 3);
    drop(c);
    let deadline = Instant::now() + TIMEOUT;
    while server.connection_count() != 2 {
        assert!(
            Instant::now() < deadline,
            "a closed connection still counts"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let mut d = client();
    d.read_at(&mut buf, 0).unwrap();
    b.read_at(&mut buf, 0).unwrap();
    drop((a, b, d));
    server.shutdown();
    assert_no_server_panic();
}

/// Issue 13, item 3 (part): write payload read but not yet written is
/// bounded per connection and over the server. With the device stalled,
/// clients that keep sending 1 MiB writes make the server stop reading
/// them (back-pressure) at 2 MiB for one connection and 3 MiB in all;
/// when the device goes on, every write is done and acknowledged.
#[test]
fn queued_write_payload_is_bounded_per_connection_and_in_total() {
    use blksnap_nbd::NbdLimits;
    watch_server_panics();
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::new(Config::default()).unwrap());
    let gated = Arc::new(GatedDevice::new(32 * MIB));
    engine.attach("gated", gated.clone()).unwrap();
    let limits = NbdLimits {
        max_queued_write_bytes_per_connection: 2 * MIB,
        max_queued_write_bytes: 3 * MIB,
        ..NbdLimits::default()
    };
    let server = NbdServer::with_limits(engine, limits);
    let socket = dir.path().join("nbd.sock");
    server.listen_unix(&socket).unwrap();
    let writes = 8u64;
    let data = |conn: u64, i: u64| Pattern::XorShift.bytes(100 * conn + i, MIB);
    // Each client sends all its writes without reading a reply, from a
    // thread (its sends block once the server stops reading).
    let send_all = |conn: u64| {
        let c = RawClient::open(&socket, "gated", true, &[]);
        let mut out = c.s.try_clone().unwrap();
        let sender = thread::spawn(move || {
            for i in 0..writes {
                let at = (conn * writes + i) * MIB;
                let mut b = Request {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: i,
                    offset: at,
                    length: MIB,
                }
                .encode()
                .to_vec();
                b.extend_from_slice(&data(conn, i));
                out.write_all(&b).unwrap();
            }
        });
        (c, sender)
    };
    let settled = |want: u64| {
        let deadline = Instant::now() + TIMEOUT;
        while server.queued_write_bytes() != want {
            assert!(
                Instant::now() < deadline,
                "queued write bytes {}, expected {want}",
                server.queued_write_bytes()
            );
            thread::sleep(Duration::from_millis(5));
        }
        // And it stays there: the readers wait, they do not read on.
        thread::sleep(Duration::from_millis(200));
        assert_eq!(server.queued_write_bytes(), want);
    };

    gated.close();
    let (mut first, first_sender) = send_all(0);
    gated.wait_arrived(2);
    settled(2 * MIB);
    let (mut second, second_sender) = send_all(1);
    gated.wait_arrived(3);
    settled(3 * MIB);
    assert!(!first_sender.is_finished() && !second_sender.is_finished());

    gated.open();
    for (c, sender, conn) in [
        (&mut first, first_sender, 0),
        (&mut second, second_sender, 1),
    ] {
        sender.join().unwrap();
        let mut acked = HashSet::new();
        for _ in 0..writes {
            let r = c.reply(&|_| 0);
            assert_eq!(r.error, 0, "write {} of connection {conn}", r.cookie);
            acked.insert(r.cookie);
        }
        assert_eq!(acked.len() as u64, writes);
    }
    assert_eq!(server.queued_write_bytes(), 0);
    let mut check = RawClient::open(&socket, "gated", true, &[]);
    for conn in 0..2 {
        for i in 0..writes {
            let at = (conn * writes + i) * MIB;
            assert!(
                check.read(at, MIB as usize) == data(conn, i),
                "write {i} of {conn}"
            );
        }
    }
    drop((first, second, check));
    server.shutdown();
    assert_no_server_panic();
}

// ---------------------------------------------------------------------------
// Extended headers.

const GIB: u64 = 1 << 30;

/// Compact block status descriptors as extended ones.
fn widen(chunks: HashMap<u32, Vec<(u32, u32)>>) -> HashMap<u32, Vec<(u64, u64)>> {
    chunks
        .into_iter()
        .map(|(id, d)| {
            (
                id,
                d.into_iter().map(|(l, f)| (l.into(), f.into())).collect(),
            )
        })
        .collect()
}

#[test]
fn extended_headers_frame_every_request_and_reply_in_32_bytes() {
    // Larger than the maximum payload, so an oversized read is in range.
    let size = 40 * MIB;
    let fx = Fixture::new(size);
    let (mut survivor, mine) = fx.survivor_with_data();
    let mut c = RawClient::open_extended(&fx.socket, DISK, &[]);
    assert_eq!(c.size, size);
    let data = Pattern::XorShift.bytes(2, 4096);
    c.write(MIB, &data);
    let mut acked = vec![(0, mine), (MIB, data.clone())];
    // A read across it: hole, data, hole; every chunk header carries the
    // request's offset (RawClient::request checks).
    let (at, len) = (MIB - 128 * KIB, 256 * KIB);
    let r = c.request(0, CMD_READ, at, len, &[]);
    let mut expected = vec![0u8; len as usize];
    expected[128 * KIB as usize..][..4096].copy_from_slice(&data);
    assert_eq!(assemble(&r, true, at, len as usize), expected);
    assert!(r
        .chunks
        .iter()
        .any(|(_, ch)| matches!(ch, Chunk::Hole { .. })));
    // Replies without data are NONE chunks, never simple replies.
    for command in [CMD_FLUSH, CMD_CACHE] {
        let r = c.request(CMD_FLAG_FUA, command, 0, 4096, &[]);
        assert_eq!(r.chunks, vec![(REPLY_FLAG_DONE, Chunk::None)], "{command}");
    }

    // A read over the maximum: EOVERFLOW in an extended error chunk.
    let over = u64::from(MAX_PAYLOAD) + 1;
    assert_eq!(c.errno(0, CMD_READ, 0, over, &[]), EOVERFLOW);
    // 64-bit lengths are taken whole, not cut to 32 bits (4 GiB + 4 KiB
    // would be a fine 4 KiB request).
    for command in [CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
        assert_eq!(c.errno(0, command, 0, (1 << 32) + 4096, &[]), EINVAL);
    }
    // A write without PAYLOAD_LEN (qemu's) still has its payload.
    let bare = Pattern::XorShift.bytes(3, 4096);
    assert_eq!(c.request(0, CMD_WRITE, 2 * MIB, 4096, &bare).error, 0);
    acked.push((2 * MIB, bare));
    // A payload on a command that takes none: consumed, and refused.
    assert_eq!(
        c.errno(CMD_FLAG_PAYLOAD_LEN, CMD_READ, MIB, 16, &[0xee; 16]),
        EINVAL
    );
    assert_eq!(
        c.errno(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, 12, &[0xee; 12]),
        EINVAL
    );
    assert_eq!(c.errno(1 << 6, CMD_READ, 0, 512, &[]), EINVAL);
    // No context selected: no block status.
    assert_eq!(c.errno(0, CMD_BLOCK_STATUS, 0, 4096, &[]), EINVAL);
    // Still in step, data intact; it stays open through what follows.
    assert_eq!(c.read(MIB, 4096), data);

    // A write announcing more than the maximum payload (in 64 bits, or
    // just one byte over): the server hangs up, no reply.
    for length in [1 << 60, over] {
        let mut bad = RawClient::open_extended(&fx.socket, DISK, &[]);
        bad.send(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 5, 0, length, &[0xee; 4096]);
        assert_closed(&mut bad.s, "write over the maximum payload");
        fx.check_healthy(&mut survivor, &acked, 2);
    }
    // A compact request where extended ones were agreed: a bad magic, so
    // the stream cannot be trusted; closed at once, not after 4 more bytes.
    let mut bad = RawClient::open_extended(&fx.socket, DISK, &[]);
    let compact = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    bad.s.write_all(&compact.encode()).unwrap();
    assert_closed(&mut bad.s, "a compact request with extended headers");
    fx.check_healthy(&mut survivor, &acked, 2);
    assert_eq!(c.read(0, 4096), acked[0].1);
    c.disconnect();
    fx.check_healthy(&mut survivor, &acked, 1);
}

#[test]
fn extended_headers_negotiate_as_the_spec_says() {
    let fx = Fixture::new(4 * MIB);
    let (mut survivor, mine) = fx.survivor_with_data();

    // EXTENDED_HEADERS takes no data and is said once; after it,
    // STRUCTURED_REPLY is refused with the error made for that.
    let mut s = greeted(&fx.socket);
    expect_opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[0], REP_ERR_INVALID);
    expect_opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[], REP_ACK);
    expect_opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[], REP_ERR_INVALID);
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);
    // It is enough for metadata contexts, and DF is offered.
    let contexts = set_meta_context(&mut s, DISK, &["base:allocation"]);
    let mut c = RawClient::go(s, DISK, true, contexts).extended();
    assert_eq!(c.read(0, 4096), mine);
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    let status = status_ext_chunks(&r);
    let total: u64 = status.values().next().unwrap().iter().map(|d| d.0).sum();
    assert_eq!(total, 4096);
    c.disconnect();

    // STRUCTURED_REPLY first is allowed, and EXTENDED_HEADERS then wins:
    // the replies are extended chunks (RawClient refuses any other).
    let mut s = greeted(&fx.socket);
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK);
    expect_opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[], REP_ACK);
    let mut c = RawClient::go(s, DISK, true, HashMap::new()).extended();
    assert_eq!(c.read(0, 4096), mine);
    assert_eq!(c.errno(0, CMD_READ, 4 * MIB, 1, &[]), EINVAL);
    c.disconnect();

    // The block size limits keep their 32-bit form (the spec gives no
    // other): the maximum payload is still 32 MiB.
    let mut s = greeted(&fx.socket);
    expect_opt_reply(&mut s, OPT_EXTENDED_HEADERS, &[], REP_ACK);
    send_option(&mut s, OPT_INFO, &go_payload(DISK, &[INFO_BLOCK_SIZE]));
    let mut max = None;
    loop {
        let r = read_opt_reply(&mut s);
        match r.kind {
            REP_INFO if be16(&r.data, 0) == INFO_BLOCK_SIZE => {
                assert_eq!(r.data.len(), 14);
                max = Some(be32(&r.data, 10));
            }
            REP_INFO => {}
            REP_ACK => break,
            kind => panic!("INFO after EXTENDED_HEADERS: {kind:#x}"),
        }
    }
    assert_eq!(max, Some(MAX_PAYLOAD));
    // EXPORT_NAME is forbidden once extended headers are on, and it has no
    // error reply: the server hangs up.
    send_option(&mut s, OPT_EXPORT_NAME, DISK.as_bytes());
    assert_closed(&mut s, "EXPORT_NAME after EXTENDED_HEADERS");

    fx.check_healthy(&mut survivor, &[(0, mine)], 1);
}

/// On a 9 GiB sparse file, with extended headers: block status describes a
/// hole of more than 4 GiB in one descriptor (a compact connection sees
/// the same extents in pieces of at most 1 GiB), REQ_ONE keeps to the
/// request, and WRITE_ZEROES and TRIM of more than 4 GiB are one request
/// each.
#[test]
fn extended_headers_reach_past_4_gib_in_one_request() {
    use std::os::unix::fs::MetadataExt;
    let size = 9 * GIB;
    let fx = Fixture::sparse_file(size);
    let path = fx.dir.path().join("disk.img");
    let queries = ["base:allocation"];
    let mut c = RawClient::open_extended(&fx.socket, DISK, &queries);
    let alloc = *c.contexts.keys().next().unwrap();
    let (head, tail) = (MIB, 8 * GIB);
    let head_data = Pattern::XorShift.bytes(1, 64 * KIB);
    let tail_data = Pattern::XorShift.bytes(2, 64 * KIB);
    c.write(head, &head_data);
    c.write(tail, &tail_data);
    assert_eq!(c.read(tail, 64 * KIB as usize), tail_data);
    let hole = STATE_HOLE | STATE_ZERO;

    let descriptors = |c: &mut RawClient, flags: u16, offset: u64, len: u64| {
        let r = c.request(flags, CMD_BLOCK_STATUS, offset, len, &[]);
        let mut status = status_ext_chunks(&r);
        assert_eq!(status.len(), 1);
        let d = status.remove(&alloc).unwrap();
        assert!(d.iter().all(|&(l, f)| l > 0 && f & !u64::from(hole) == 0));
        d
    };
    // The whole export: the two writes are data, and what lies between
    // them is one hole (what the filesystem allocates around a write may
    // vary, so only that much is certain).
    let all = descriptors(&mut c, 0, 0, size);
    assert_eq!(all.iter().map(|d| d.0).sum::<u64>(), size);
    let extent_at = |d: &[(u64, u64)], at: u64| {
        let mut pos = 0;
        *d.iter()
            .find(|&&(l, _)| {
                pos += l;
                pos > at
            })
            .unwrap()
    };
    assert_eq!(extent_at(&all, head).1, 0);
    assert_eq!(extent_at(&all, tail).1, 0);
    let between = extent_at(&all, 4 * GIB);
    assert!(
        between.0 > 7 * GIB && between.1 == u64::from(hole),
        "the hole between the writes: {all:?}"
    );
    // A compact connection: the same extents, none over 1 GiB.
    let mut compact = RawClient::open(&fx.socket, DISK, true, &queries);
    let len = 4 * GIB - 4096;
    let pieces = status_chunks(&compact.request(0, CMD_BLOCK_STATUS, 0, len, &[]));
    let pieces = widen(pieces).remove(&alloc).unwrap();
    assert!(pieces.iter().all(|d| d.0 <= GIB), "{pieces:?}");
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (l, f) in pieces {
        match merged.last_mut() {
            Some(last) if last.1 == f => last.0 += l,
            _ => merged.push((l, f)),
        }
    }
    assert_eq!(merged, descriptors(&mut c, 0, 0, len));
    compact.disconnect();
    // REQ_ONE: one descriptor, within the request, though over 4 GiB.
    assert_eq!(
        descriptors(&mut c, CMD_FLAG_REQ_ONE, 2 * MIB, 6 * GIB),
        vec![(6 * GIB, u64::from(hole))]
    );

    // WRITE_ZEROES of 6 GiB over the first write, in one request.
    let r = c.request(0, CMD_WRITE_ZEROES, 0, 6 * GIB, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert!(c.read(head, 64 * KIB as usize).iter().all(|&b| b == 0));
    assert_eq!(c.read(tail, 64 * KIB as usize), tail_data);
    // TRIM of the first 8 GiB, in one request: all of it one hole, the
    // file's blocks given back, the second write still there.
    let r = c.request(0, CMD_TRIM, 0, tail, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    let all = descriptors(&mut c, 0, 0, size);
    assert_eq!(all[0], (tail, u64::from(hole)), "{all:?}");
    assert_eq!(extent_at(&all, tail).1, 0);
    assert!(
        std::fs::metadata(&path).unwrap().blocks() * 512 < 8 * MIB,
        "the trim left {} blocks allocated",
        std::fs::metadata(&path).unwrap().blocks()
    );
    assert_eq!(c.read(tail, 64 * KIB as usize), tail_data);

    // Dirty bitmaps too: on the image, what the trim and the writes
    // touched (the first 8 GiB and a little) is one dirty descriptor.
    let storage = StorageSpec::Device(Arc::new(MemDevice::new(16 * MIB)));
    let options = SnapshotOptions::default();
    let id = fx.engine.snapshot_create(storage, options).unwrap();
    fx.engine.snapshot_add(&id, DISK).unwrap();
    fx.engine.snapshot_take(&id).unwrap();
    let image = format!("snapshot/{DISK}");
    let since0 = "qemu:dirty-bitmap:since-0";
    let mut bitmap = RawClient::open_extended(&fx.socket, &image, &[since0]);
    let r = bitmap.request(0, CMD_BLOCK_STATUS, 0, size, &[]);
    let status = status_ext_chunks(&r);
    let dirty = &status[bitmap.contexts.keys().next().unwrap()];
    assert_eq!(dirty.len(), 2, "{dirty:?}");
    assert!(dirty[0].0 > tail && dirty[0].1 == u64::from(STATE_DIRTY));
    assert_eq!((dirty[0].0 + dirty[1].0, dirty[1].1), (size, 0));
    bitmap.disconnect();
    c.disconnect();
    fx.check_all_closed();
}
