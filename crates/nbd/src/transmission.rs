//! The transmission phase: requests are read in order, one at a time, by
//! whichever of the connection's threads holds its reader
//! ([`crate::pipeline`]: followers are started when requests overlap,
//! capped over the server); the thread that read a request runs it on the
//! export and replies as it finishes — so replies may come out of order,
//! as NBD allows (the cookie matches them). Replies are written whole under one
//! lock. A bad request gets an error reply; a broken stream (bad magic, a
//! write payload over the maximum) ends the connection; either way nothing
//! acknowledged is lost, because a reply is only sent after the engine call
//! returned.
//!
//! Requests and replies come in the framing the handshake chose: compact
//! requests with simple or structured replies, or extended headers (32-byte
//! requests and reply chunks with 64-bit lengths) — see [`Framing`].

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::export::{self, Context, Export, ExportError, ZeroFlags};
use crate::negotiate::Session;
use crate::pipeline::{Next, Pipeline, PipelineLimits, WorkerPermits};
use crate::protocol::*;
use crate::Conn;

/// Followers per connection at most: with the connection's own thread,
/// requests in flight at once.
const WORKERS: usize = 4;
/// A follower that waits this long for the reader, or holds it without a
/// request coming, ends (and is started again when requests overlap
/// again).
const WORKER_IDLE: Duration = Duration::from_secs(2);
/// Zero runs at least this long go out as hole chunks in structured reads.
const HOLE_UNIT: usize = 64 << 10;
/// Most descriptors in one block status chunk.
const MAX_DESCRIPTORS: usize = 8192;
/// Longest descriptor in a compact block status chunk: its lengths are
/// 32-bit, and a power of two keeps the pieces of a longer extent aligned.
const COMPACT_MAX_EXTENT: u64 = 1 << 30;

/// How a connection frames its replies (and, with extended headers, its
/// requests), as the handshake chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Simple replies only (nothing negotiated).
    Simple,
    /// Structured reply chunks, 20-byte headers.
    Structured,
    /// Extended reply chunks, 32-byte headers with the request's offset
    /// and a 64-bit length; requests are 32 bytes too.
    Extended,
}

impl Framing {
    fn of(session: &Session) -> Framing {
        if session.extended {
            Framing::Extended
        } else if session.structured {
            Framing::Structured
        } else {
            Framing::Simple
        }
    }
}

struct Job {
    request: Request,
    payload: Vec<u8>,
    /// The payload's share of the connection's and the server's budgets,
    /// given back when the job is done.
    _leases: Option<(Lease, Lease)>,
}

/// Bytes of write payload read from clients but not yet written: a bound
/// on the memory clients can make the server hold. A reader that would go
/// past it waits (and stops reading its socket: back-pressure) until
/// workers finish writes and give bytes back.
pub struct PayloadBudget {
    limit: u64,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    used: u64,
    /// Readers waiting for bytes: a release wakes them only when there
    /// are some (a wake is a futex call on every write otherwise).
    waiting: usize,
}

impl PayloadBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(PayloadBudget {
            limit,
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.state.lock().unwrap().used
    }

    /// Waits until `n` bytes fit, and takes them. A request larger than
    /// the whole budget takes all of it (it waits for everything else), so
    /// that it is delayed, never refused.
    fn acquire(self: &Arc<Self>, n: u64) -> Lease {
        let n = n.min(self.limit);
        let mut state = self.state.lock().unwrap();
        while state.used + n > self.limit {
            state.waiting += 1;
            state = self.freed.wait(state).unwrap();
            state.waiting -= 1;
        }
        state.used += n;
        Lease {
            budget: self.clone(),
            n,
        }
    }
}

/// Bytes taken from a [`PayloadBudget`], given back when dropped.
struct Lease {
    budget: Arc<PayloadBudget>,
    n: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().unwrap();
        state.used -= self.n;
        if state.waiting > 0 {
            self.budget.freed.notify_all();
        }
    }
}

type Writer<S> = Arc<Mutex<BufWriter<S>>>;

/// A connection's incoming side, held by the thread reading a request.
struct Incoming<S> {
    reader: BufReader<S>,
    extended: bool,
    /// The connection's write-payload budget, then the server's.
    budgets: (Arc<PayloadBudget>, Arc<PayloadBudget>),
    /// Requests read, by command (the last slot: unknown ones).
    counts: [u64; COMMAND_NAMES.len() + 1],
}

impl<S: Conn> Incoming<S> {
    /// The next request, the end of the stream, or, with an idle time,
    /// [`Next::Idle`] when no byte of a request came within it.
    fn next(&mut self, idle: Option<Duration>) -> io::Result<Next<Job>> {
        if let Some(idle) = idle {
            if self.reader.buffer().is_empty() && !self.reader.get_ref().readable_within(idle)? {
                return Ok(Next::Idle);
            }
        }
        Ok(
            match read_request(&mut self.reader, self.extended, &self.budgets)? {
                Some(job) => {
                    self.counts[(job.request.command as usize).min(COMMAND_NAMES.len())] += 1;
                    Next::Job(job)
                }
                None => Next::End,
            },
        )
    }
}

/// Serves requests until the client disconnects or the stream breaks,
/// holding at most `connection_limit` bytes of write payload of its own
/// and at most what `server` has left.
pub fn transmit<S: Conn>(
    stream: S,
    session: Session,
    connection_limit: u64,
    server: &Arc<PayloadBudget>,
    permits: Arc<WorkerPermits>,
) -> io::Result<()> {
    let writer: Writer<S> = Arc::new(Mutex::new(BufWriter::with_capacity(
        256 << 10,
        stream.try_clone_conn()?,
    )));
    let incoming = Incoming {
        reader: BufReader::with_capacity(256 << 10, stream),
        extended: session.extended,
        budgets: (PayloadBudget::new(connection_limit), server.clone()),
        counts: [0; COMMAND_NAMES.len() + 1],
    };
    let session = Arc::new(session);
    let limits = PipelineLimits {
        max_workers: WORKERS,
        idle_timeout: WORKER_IDLE,
    };
    let answering = writer.clone();
    let (result, incoming) = Pipeline::serve(
        incoming,
        Incoming::next,
        move |job| answer(&session, &answering, job),
        permits,
        limits,
    );
    // Every reply is out: end the session above the socket (TLS).
    if let Ok(mut w) = writer.lock() {
        let _ = w.flush().and_then(|_| w.get_mut().close());
    }
    let summary: Vec<String> = incoming
        .counts
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, n)| format!("{}={n}", COMMAND_NAMES.get(i).unwrap_or(&"other")))
        .collect();
    tracing::debug!(commands = %summary.join(" "), "NBD connection done");
    result
}

/// Every request of a stream, to its end, each given to `submit` until it
/// says stop.
#[cfg(test)]
fn read_requests(
    reader: &mut impl Read,
    extended: bool,
    budgets: &(Arc<PayloadBudget>, Arc<PayloadBudget>),
    mut submit: impl FnMut(Job) -> bool,
) -> io::Result<()> {
    // A small buffer: payloads come partly from it, partly from the stream.
    let mut reader = BufReader::with_capacity(7, reader);
    while let Some(job) = read_request(&mut reader, extended, budgets)? {
        if !submit(job) {
            break;
        }
    }
    Ok(())
}

/// The next request with its payload, `None` at the end of the stream
/// (or at `NBD_CMD_DISC`). A write's payload takes its share of both
/// budgets, waiting for it.
fn read_request<R: Read>(
    reader: &mut BufReader<R>,
    extended: bool,
    (connection, server): &(Arc<PayloadBudget>, Arc<PayloadBudget>),
) -> io::Result<Option<Job>> {
    let Some(request) = read_header(reader, extended)? else {
        return Ok(None);
    };
    if request.command == CMD_DISC {
        return Ok(None);
    }
    let mut payload = Vec::new();
    let mut leases = None;
    match payload_length(&request, extended) {
        None => {}
        // Past the header nothing can be trusted: skipping that much
        // would let a client hold a reader for ever.
        Some(n) if n > u64::from(MAX_PAYLOAD) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} payload of {n} bytes is over the maximum {MAX_PAYLOAD}",
                    command_name(request.command)
                ),
            ));
        }
        Some(n) if request.command == CMD_WRITE => {
            // Connection first, then server, always in that order.
            leases = Some((connection.acquire(n), server.acquire(n)));
            // Filled as it arrives: a client that stalls halfway holds
            // only what it sent (the untouched capacity is not memory).
            payload.reserve_exact(n as usize);
            // What the reader has buffered, then the rest straight from
            // the stream: through the buffer, a large payload would be
            // copied twice.
            let buffered = reader.buffer();
            let first = buffered.len().min(n as usize);
            payload.extend_from_slice(&buffered[..first]);
            reader.consume(first);
            let rest = n - first as u64;
            let got = Read::by_ref(reader.get_mut())
                .take(rest)
                .read_to_end(&mut payload)
                .map_err(|e| if timed_out(&e) { stalled() } else { e })?;
            if got as u64 != rest {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        // A payload no command of ours takes: consumed so that the
        // stream stays in step, never held; `handle` refuses it.
        Some(n) => {
            let got = io::copy(&mut Read::by_ref(reader).take(n), &mut io::sink())
                .map_err(|e| if timed_out(&e) { stalled() } else { e })?;
            if got != n {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
    Ok(Some(Job {
        request,
        payload,
        _leases: leases,
    }))
}

/// The next request header, `None` at the end of the stream. The magic is
/// read and checked first, so that a header of the other form (a compact
/// one on an extended connection) ends the connection at once rather than
/// waiting for bytes that are not coming.
fn read_header(reader: &mut impl Read, extended: bool) -> io::Result<Option<Request>> {
    let (len, magic) = if extended {
        (EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC)
    } else {
        (REQUEST_LEN, REQUEST_MAGIC)
    };
    let mut header = [0u8; EXTENDED_REQUEST_LEN];
    if !wait_for_request(reader, &mut header[0])? {
        return Ok(None);
    }
    if !fill(reader, &mut header[1..4])? {
        return Ok(None);
    }
    let got = u32::from_be_bytes(header[..4].try_into().unwrap());
    if got != magic {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request with a bad magic {got:#010x} (expected {magic:#010x})"),
        ));
    }
    if !fill(reader, &mut header[4..len])? {
        return Ok(None);
    }
    Ok(if extended {
        Request::parse_extended(&header)
    } else {
        Request::parse(header[..REQUEST_LEN].try_into().unwrap())
    })
}

/// Whether `e` is the socket's timeout (the connection's stall timeout).
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads the first byte of the next request into `first`, waiting as long
/// as the client stays quiet: between requests the stall timeout does not
/// apply (an idle client is not a stalled one). `false` at the end of the
/// stream.
fn wait_for_request(reader: &mut impl Read, first: &mut u8) -> io::Result<bool> {
    loop {
        match reader.read(std::slice::from_mut(first)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if timed_out(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `read_exact`, but `false` when the stream ends first. A timeout here is
/// a client that stopped inside a request: the connection ends, and what
/// the request held (its payload budget) is given back.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) if timed_out(&e) => Err(stalled()),
        Err(e) => Err(e),
    }
}

fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client stalled inside a request (or left replies unread) past the stall timeout",
    )
}

/// The length of the payload after a request header, if it has one:
/// compact headers carry one with writes only; extended ones with writes
/// and whenever the client sets `PAYLOAD_LEN` (else the length is the
/// command's extent). The spec wants `PAYLOAD_LEN` on every extended write,
/// but qemu (10.0) leaves it off and sends the payload all the same, as
/// qemu's own server expects: a write's length is its payload's either way.
fn payload_length(request: &Request, extended: bool) -> Option<u64> {
    let has_payload =
        request.command == CMD_WRITE || (extended && request.flags & CMD_FLAG_PAYLOAD_LEN != 0);
    has_payload.then_some(request.length)
}

fn command_name(command: u16) -> &'static str {
    COMMAND_NAMES
        .get(command as usize)
        .copied()
        .unwrap_or("unknown command")
}

/// Runs one request and sends its reply; false once the reply cannot be
/// sent (the client is gone).
fn answer<S: Conn>(session: &Session, writer: &Writer<S>, job: Job) -> bool {
    let Request { cookie, offset, .. } = job.request;
    let reply = handle(session, job);
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    let sent = reply
        .send(&mut *w, Framing::of(session), cookie, offset)
        .and_then(|_| w.flush());
    if let Err(e) = sent {
        tracing::debug!(error = %e, "NBD reply not sent: client gone or not reading");
        // The reader may be waiting for a next request that will never
        // come (a client that stopped reading replies): end it too.
        w.get_ref().shutdown_conn(std::net::Shutdown::Both);
        return false;
    }
    true
}

/// The outcome of one request, ready to encode.
enum Reply {
    Done,
    Read {
        offset: u64,
        data: ReadBuffer,
        fragment: bool,
    },
    /// Per selected context: its id and its `(length, flags)` descriptors.
    BlockStatus(Vec<(u32, Vec<(u64, u32)>)>),
    Error {
        errno: u32,
        message: String,
    },
}

/// Most read buffers kept for later reads, over the process, and the
/// largest one kept: at most 64 MiB held while no read needs them.
const KEPT_READ_BUFFERS: usize = 32;
const KEPT_READ_BUFFER_BYTES: usize = 2 << 20;

/// Read buffers given back, for the next reads.
static READ_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The buffer of one read reply: taken from the kept ones, so that a read
/// does not pay to zero (or map) a fresh buffer; given back when dropped.
/// A read fills all of it before it is sent, so nothing of an earlier read
/// can leave in a reply.
struct ReadBuffer {
    /// Its length is the largest read it served; the reply is `..len`.
    bytes: Vec<u8>,
    len: usize,
}

impl ReadBuffer {
    fn new(len: usize) -> ReadBuffer {
        let kept = READ_BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut bytes = kept.unwrap_or_default();
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        ReadBuffer { bytes, len }
    }
}

impl std::ops::Deref for ReadBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::ops::DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        if self.bytes.len() > KEPT_READ_BUFFER_BYTES {
            return;
        }
        let mut kept = READ_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_READ_BUFFERS {
            kept.push(std::mem::take(&mut self.bytes));
        }
    }
}

fn error(errno: u32, message: impl Into<String>) -> Reply {
    Reply::Error {
        errno,
        message: message.into(),
    }
}

fn export_error(e: ExportError) -> Reply {
    error(wire_error(e.errno), e.message)
}

const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

fn handle(session: &Session, job: Job) -> Reply {
    let Job {
        request: r,
        payload,
        ..
    } = job;
    let export = &*session.export;
    let framing = Framing::of(session);
    let known = match framing {
        Framing::Extended => KNOWN_FLAGS | CMD_FLAG_PAYLOAD_LEN,
        _ => KNOWN_FLAGS,
    };
    if r.flags & !known != 0 {
        return error(EINVAL, format!("unknown command flags {:#x}", r.flags));
    }
    // Only writes take a payload; read_requests consumed any other.
    if r.flags & CMD_FLAG_PAYLOAD_LEN != 0 && r.command != CMD_WRITE {
        return error(
            EINVAL,
            "NBD_CMD_FLAG_PAYLOAD_LEN on a command that takes no payload",
        );
    }
    let size = export.size();
    let in_range = r
        .offset
        .checked_add(r.length)
        .is_some_and(|end| end <= size);
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let flush_if_fua = |result: Result<(), ExportError>| match result.and_then(|_| {
        if fua {
            export.flush()
        } else {
            Ok(())
        }
    }) {
        Ok(()) => Reply::Done,
        Err(e) => export_error(e),
    };
    match r.command {
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if export.read_only() => {
            error(EPERM, "the export is read-only")
        }
        CMD_READ | CMD_CACHE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS if !in_range => {
            error(
                EINVAL,
                format!(
                    "range {}+{} is beyond the export's {size} bytes",
                    r.offset, r.length
                ),
            )
        }
        CMD_WRITE if !in_range => error(
            ENOSPC,
            format!(
                "write of {}+{} is beyond the export's {size} bytes",
                r.offset, r.length
            ),
        ),
        CMD_READ => {
            if r.length > u64::from(MAX_PAYLOAD) {
                return error(
                    if framing == Framing::Simple {
                        EINVAL
                    } else {
                        EOVERFLOW
                    },
                    "read over the maximum size",
                );
            }
            let mut data = ReadBuffer::new(r.length as usize);
            match export.read(&mut data, r.offset) {
                Ok(()) => Reply::Read {
                    offset: r.offset,
                    data,
                    fragment: r.flags & CMD_FLAG_DF == 0,
                },
                Err(e) => export_error(e),
            }
        }
        CMD_WRITE => flush_if_fua(export.write(&payload, r.offset)),
        CMD_FLUSH => flush_if_fua(export.flush()),
        CMD_TRIM => flush_if_fua(export.discard(r.offset, r.length)),
        CMD_WRITE_ZEROES => {
            if r.flags & CMD_FLAG_FAST_ZERO != 0 && !export.fast_zero() {
                return error(
                    ENOTSUP,
                    "write-zeroes is not faster than a write on this export",
                );
            }
            let how = ZeroFlags {
                no_hole: r.flags & CMD_FLAG_NO_HOLE != 0,
                fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            flush_if_fua(export.write_zeroes(r.offset, r.length, how))
        }
        // The engine reads straight from the device: nothing to warm.
        CMD_CACHE => Reply::Done,
        CMD_BLOCK_STATUS => block_status(export, &session.contexts, framing, &r),
        other => error(EINVAL, format!("unknown command {other}")),
    }
}

fn block_status(export: &dyn Export, contexts: &[Context], framing: Framing, r: &Request) -> Reply {
    if framing == Framing::Simple || contexts.is_empty() {
        return error(
            EINVAL,
            "BLOCK_STATUS needs structured replies and a metadata context",
        );
    }
    if r.length == 0 {
        return error(EINVAL, "BLOCK_STATUS of zero length");
    }
    let max = if r.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    // 64-bit descriptors: a clean or unallocated range of any size is one.
    let max_extent = match framing {
        Framing::Extended => u64::MAX,
        _ => COMPACT_MAX_EXTENT,
    };
    let mut chunks = Vec::new();
    for context in contexts {
        match export::block_status(export, context, r.offset, r.length, max, max_extent) {
            Ok(descriptors) => chunks.push((context.id(), descriptors)),
            Err(e) => return export_error(e),
        }
    }
    Reply::BlockStatus(chunks)
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

impl Reply {
    /// Encodes the reply to the request `cookie` at `offset` (which only
    /// extended chunk headers carry).
    fn send(
        &self,
        w: &mut impl Write,
        framing: Framing,
        cookie: u64,
        offset: u64,
    ) -> io::Result<()> {
        let chunks = match framing {
            Framing::Simple => return self.send_simple(w, cookie),
            Framing::Structured => Chunks {
                cookie,
                extended_offset: None,
            },
            Framing::Extended => Chunks {
                cookie,
                extended_offset: Some(offset),
            },
        };
        match self {
            Reply::Done => chunks.header(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
            Reply::Error { errno, message } => {
                let message = error_text(message).as_bytes();
                chunks.header(w, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + message.len())?;
                w.write_all(&errno.to_be_bytes())?;
                w.write_all(&(message.len() as u16).to_be_bytes())?;
                w.write_all(message)
            }
            Reply::Read { data, .. } if data.is_empty() => {
                chunks.header(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
            }
            Reply::Read {
                offset,
                data,
                fragment,
            } => {
                let pieces = read_pieces(data, *fragment);
                let last = pieces.len() - 1;
                for (i, (start, end, hole)) in pieces.into_iter().enumerate() {
                    let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                    let at = offset + start as u64;
                    if hole {
                        chunks.header(w, flags, REPLY_TYPE_OFFSET_HOLE, 12)?;
                        w.write_all(&at.to_be_bytes())?;
                        w.write_all(&((end - start) as u32).to_be_bytes())?;
                    } else {
                        chunks.header(w, flags, REPLY_TYPE_OFFSET_DATA, 8 + (end - start))?;
                        w.write_all(&at.to_be_bytes())?;
                        w.write_all(&data[start..end])?;
                    }
                }
                Ok(())
            }
            Reply::BlockStatus(contexts) => {
                let last = contexts.len() - 1;
                for (i, (id, descriptors)) in contexts.iter().enumerate() {
                    let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                    let n = descriptors.len();
                    if framing == Framing::Extended {
                        chunks.header(w, flags, REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * n)?;
                        w.write_all(&id.to_be_bytes())?;
                        w.write_all(&(n as u32).to_be_bytes())?;
                        for &(length, state) in descriptors {
                            w.write_all(&length.to_be_bytes())?;
                            w.write_all(&u64::from(state).to_be_bytes())?;
                        }
                    } else {
                        chunks.header(w, flags, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n)?;
                        w.write_all(&id.to_be_bytes())?;
                        for &(length, state) in descriptors {
                            let length = u32::try_from(length)
                                .expect("compact descriptors are cut at COMPACT_MAX_EXTENT");
                            w.write_all(&length.to_be_bytes())?;
                            w.write_all(&state.to_be_bytes())?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn send_simple(&self, w: &mut impl Write, cookie: u64) -> io::Result<()> {
        match self {
            Reply::Done => w.write_all(&simple_reply(0, cookie)),
            Reply::Read { data, .. } => {
                w.write_all(&simple_reply(0, cookie))?;
                w.write_all(data)
            }
            Reply::Error { errno, .. } => w.write_all(&simple_reply(*errno, cookie)),
            Reply::BlockStatus(_) => unreachable!("block status needs structured replies"),
        }
    }
}

/// The chunk headers of one reply: structured, or extended (which repeat
/// the request's offset in every chunk).
struct Chunks {
    cookie: u64,
    extended_offset: Option<u64>,
}

impl Chunks {
    /// A chunk header for a payload of `len` bytes (at most a read's
    /// maximum plus its offset: 32 bits are plenty).
    fn header(&self, w: &mut impl Write, flags: u16, kind: u16, len: usize) -> io::Result<()> {
        match self.extended_offset {
            None => w.write_all(&chunk_header(flags, kind, self.cookie, len as u32)),
            Some(offset) => w.write_all(&extended_chunk_header(
                flags,
                kind,
                self.cookie,
                offset,
                len as u64,
            )),
        }
    }
}

/// Most bytes of error text in a reply (the NBD spec's limit).
const MAX_ERROR_TEXT: usize = 4096;

/// `message` cut to [`MAX_ERROR_TEXT`] bytes at a character boundary: the
/// spec requires UTF-8, so a cut must not split a character.
fn error_text(message: &str) -> &str {
    let mut end = message.len().min(MAX_ERROR_TEXT);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Splits a read into `(start, end, is_hole)` pieces: runs of all-zero
/// 64 KiB units become holes when fragmenting is allowed. Never empty.
fn read_pieces(data: &[u8], fragment: bool) -> Vec<(usize, usize, bool)> {
    if !fragment || data.len() < HOLE_UNIT {
        return vec![(0, data.len(), false)];
    }
    let mut pieces: Vec<(usize, usize, bool)> = Vec::new();
    for (i, unit) in data.chunks(HOLE_UNIT).enumerate() {
        let (start, end) = (i * HOLE_UNIT, i * HOLE_UNIT + unit.len());
        let hole = unit.len() == HOLE_UNIT && is_zero(unit);
        match pieces.last_mut() {
            Some(last) if last.2 == hole => last.1 = end,
            _ => pieces.push((start, end, hole)),
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_read_exactly() {
        let mut data = vec![0u8; 5 * HOLE_UNIT + 100];
        data[HOLE_UNIT + 7] = 1;
        data[5 * HOLE_UNIT + 50] = 1;
        let p = read_pieces(&data, true);
        assert_eq!(
            p,
            vec![
                (0, HOLE_UNIT, true),
                (HOLE_UNIT, 2 * HOLE_UNIT, false),
                (2 * HOLE_UNIT, 5 * HOLE_UNIT, true),
                (5 * HOLE_UNIT, 5 * HOLE_UNIT + 100, false)
            ]
        );
        assert_eq!(read_pieces(&data, false), vec![(0, data.len(), false)]);
        assert_eq!(read_pieces(&[], true), vec![(0, 0, false)]);
    }

    #[test]
    fn error_text_is_cut_at_a_character_boundary() {
        let long = format!("{}é and more", "x".repeat(MAX_ERROR_TEXT - 1));
        assert_eq!(error_text(&long), "x".repeat(MAX_ERROR_TEXT - 1));
        assert_eq!(error_text("short é"), "short é");
        let exact = "é".repeat(MAX_ERROR_TEXT / 2 + 10);
        assert_eq!(error_text(&exact).len(), MAX_ERROR_TEXT);
        let mut out = Vec::new();
        Reply::Error {
            errno: EINVAL,
            message: long,
        }
        .send(&mut out, Framing::Structured, 7, 0)
        .unwrap();
        // A 20-byte chunk header, then errno (4) and the text length (2).
        let text = &out[20 + 6..];
        assert_eq!(text.len(), MAX_ERROR_TEXT - 1);
        assert!(std::str::from_utf8(text).is_ok());
    }

    #[test]
    fn request_stream_stops_at_disc_and_rejects_bad_magic() {
        let mut stream = Vec::new();
        let w = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 3,
        };
        stream.extend_from_slice(&w.encode());
        stream.extend_from_slice(b"abc");
        stream.extend_from_slice(
            &Request {
                command: CMD_DISC,
                length: 0,
                ..w
            }
            .encode(),
        );
        stream.extend_from_slice(&[0xff; 28]);
        let mut jobs = Vec::new();
        let budgets = (PayloadBudget::new(1 << 20), PayloadBudget::new(1 << 20));
        read_requests(&mut stream.as_slice(), false, &budgets, |j| {
            jobs.push(j);
            true
        })
        .unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].payload, b"abc");
        let err =
            read_requests(&mut [0xffu8; 28].as_slice(), false, &budgets, |_| true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn extended_stream_is_framed_by_payload_flag_and_writes() {
        let budgets = (PayloadBudget::new(1 << 20), PayloadBudget::new(1 << 20));
        let write = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            command: CMD_WRITE,
            cookie: 1,
            offset: 512,
            length: 3,
        };
        let mut stream = write.encode_extended().to_vec();
        stream.extend_from_slice(b"abc");
        // A write without the flag (as qemu sends them) has its payload too.
        let bare_write = Request {
            flags: 0,
            length: 2,
            ..write
        };
        stream.extend_from_slice(&bare_write.encode_extended());
        stream.extend_from_slice(b"de");
        // A 64-bit effect length: no payload follows.
        let trim = Request {
            flags: 0,
            command: CMD_TRIM,
            length: 5 << 32,
            ..write
        };
        stream.extend_from_slice(&trim.encode_extended());
        // A payload on a command that takes none: skipped, not kept.
        let status = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            command: CMD_BLOCK_STATUS,
            length: 12,
            ..write
        };
        stream.extend_from_slice(&status.encode_extended());
        stream.extend_from_slice(&[0xee; 12]);
        // A compact header: refused from its magic alone, without waiting
        // for the 4 bytes an extended header would have more.
        stream.extend_from_slice(&Request { length: 0, ..trim }.encode());
        let mut jobs = Vec::new();
        let err = read_requests(&mut stream.as_slice(), true, &budgets, |j| {
            jobs.push(j);
            true
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let got: Vec<_> = jobs
            .iter()
            .map(|j| (j.request, j.payload.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (write, b"abc".to_vec()),
                (bare_write, b"de".to_vec()),
                (trim, vec![]),
                (status, vec![])
            ]
        );
        // Only the writes' payloads are held; the skipped one never was.
        assert_eq!(budgets.0.used(), 5);
        drop(jobs);
        assert_eq!(budgets.0.used(), 0);

        // A payload over the maximum, on any command: the stream ends.
        for command in [CMD_WRITE, CMD_READ] {
            let over = Request {
                command,
                length: u64::from(MAX_PAYLOAD) + 1,
                ..write
            };
            let mut submitted = 0;
            let err = read_requests(
                &mut over.encode_extended().as_slice(),
                true,
                &budgets,
                |_| {
                    submitted += 1;
                    true
                },
            )
            .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(submitted, 0);
        }
    }

    /// Splits extended reply chunks: `(flags, type, cookie, offset,
    /// payload)`.
    fn extended_chunks(mut b: &[u8]) -> Vec<(u16, u16, u64, u64, Vec<u8>)> {
        let be = |b: &[u8], at: usize, n: usize| {
            b[at..at + n]
                .iter()
                .fold(0u64, |v, &x| (v << 8) | u64::from(x))
        };
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be(b, 0, 4) as u32, EXTENDED_REPLY_MAGIC);
            let len = be(b, 24, 8) as usize;
            out.push((
                be(b, 4, 2) as u16,
                be(b, 6, 2) as u16,
                be(b, 8, 8),
                be(b, 16, 8),
                b[32..32 + len].to_vec(),
            ));
            b = &b[32 + len..];
        }
        out
    }

    #[test]
    fn extended_replies_are_extended_chunks_with_the_request_offset() {
        let encode = |reply: Reply| {
            let mut out = Vec::new();
            reply.send(&mut out, Framing::Extended, 9, 1 << 33).unwrap();
            extended_chunks(&out)
        };
        assert_eq!(
            encode(Reply::Done),
            vec![(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 1 << 33, vec![])]
        );
        let [(flags, kind, 9, offset, p)] = &encode(error(EOVERFLOW, "too big"))[..] else {
            panic!("an error reply is one chunk");
        };
        assert_eq!(
            (*flags, *kind, *offset),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1 << 33)
        );
        assert_eq!(&p[..6], &[0, 0, 0, 75, 0, 7]);
        assert_eq!(&p[6..], b"too big");

        // A read of data, a hole and data: every header names the request's
        // offset, each payload its own piece's.
        let mut data = ReadBuffer::new(3 * HOLE_UNIT);
        data.fill(0);
        data[0] = 1;
        data[2 * HOLE_UNIT] = 2;
        let chunks = encode(Reply::Read {
            offset: 1 << 33,
            data,
            fragment: true,
        });
        let at = |i: usize| (1u64 << 33) + (i * HOLE_UNIT) as u64;
        let kinds: Vec<_> = chunks.iter().map(|c| (c.0, c.1, c.3)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, REPLY_TYPE_OFFSET_DATA, 1 << 33),
                (0, REPLY_TYPE_OFFSET_HOLE, 1 << 33),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1 << 33),
            ]
        );
        assert_eq!(&chunks[0].4[..8], &at(0).to_be_bytes());
        assert_eq!(chunks[0].4.len(), 8 + HOLE_UNIT);
        let mut hole = at(1).to_be_bytes().to_vec();
        hole.extend_from_slice(&(HOLE_UNIT as u32).to_be_bytes());
        assert_eq!(chunks[1].4, hole);
        assert_eq!(&chunks[2].4[..8], &at(2).to_be_bytes());

        // Block status: one BLOCK_STATUS_EXT chunk per context, with a
        // descriptor count and 64-bit lengths and flags.
        let chunks = encode(Reply::BlockStatus(vec![
            (1, vec![(6 << 30, STATE_HOLE | STATE_ZERO), (512, 0)]),
            (256, vec![(1 << 40, STATE_DIRTY)]),
        ]));
        let mut first = 1u32.to_be_bytes().to_vec();
        first.extend_from_slice(&2u32.to_be_bytes());
        for (length, state) in [(6u64 << 30, 3u64), (512, 0)] {
            first.extend_from_slice(&length.to_be_bytes());
            first.extend_from_slice(&state.to_be_bytes());
        }
        let mut second = 256u32.to_be_bytes().to_vec();
        second.extend_from_slice(&1u32.to_be_bytes());
        second.extend_from_slice(&(1u64 << 40).to_be_bytes());
        second.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(
            chunks,
            vec![
                (0, REPLY_TYPE_BLOCK_STATUS_EXT, 9, 1 << 33, first),
                (
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    9,
                    1 << 33,
                    second
                ),
            ]
        );
    }
}
