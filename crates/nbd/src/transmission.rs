//! The transmission phase: requests are read in order by the connection's
//! reader and handed to its workers ([`crate::pipeline`]: started when
//! requests overlap, capped over the server), which run them on the export
//! and reply as each finishes — so replies may come out of order, as NBD
//! allows (the cookie matches them). Replies are written whole under one
//! lock. A bad request gets an error reply; a broken stream (bad magic, a
//! write payload over the maximum) ends the connection; either way nothing
//! acknowledged is lost, because a reply is only sent after the engine call
//! returned.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::export::{self, Context, Export, ExportError, ZeroFlags};
use crate::negotiate::Session;
use crate::pipeline::{Pipeline, PipelineLimits, WorkerPermits};
use crate::protocol::*;
use crate::Conn;

/// Workers per connection at most: requests in flight at once.
const WORKERS: usize = 4;
/// Requests read ahead of the workers before the reader waits.
const QUEUE: usize = 64;
/// A worker without a request for this long ends (and is started again
/// when requests overlap again).
const WORKER_IDLE: Duration = Duration::from_secs(2);
/// Zero runs at least this long go out as hole chunks in structured reads.
const HOLE_UNIT: usize = 64 << 10;
/// Most descriptors in one block status chunk.
const MAX_DESCRIPTORS: usize = 8192;

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
    let budgets = (PayloadBudget::new(connection_limit), server.clone());
    let writer: Writer<S> = Arc::new(Mutex::new(BufWriter::with_capacity(
        256 << 10,
        stream.try_clone_conn()?,
    )));
    let session = Arc::new(session);
    let pipeline = {
        let writer = writer.clone();
        let limits = PipelineLimits {
            max_workers: WORKERS,
            depth: QUEUE,
            idle_timeout: WORKER_IDLE,
        };
        Pipeline::new(move |job| answer(&session, &writer, job), permits, limits)
    };
    let mut reader = BufReader::with_capacity(256 << 10, stream);
    let mut counts = [0u64; COMMAND_NAMES.len() + 1];
    let result = read_requests(&mut reader, &budgets, |job| {
        counts[(job.request.command as usize).min(COMMAND_NAMES.len())] += 1;
        pipeline.submit(job)
    });
    pipeline.close();
    // Every reply is out: end the session above the socket (TLS).
    if let Ok(mut w) = writer.lock() {
        let _ = w.flush().and_then(|_| w.get_mut().close());
    }
    let summary: Vec<String> = counts
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, n)| format!("{}={n}", COMMAND_NAMES.get(i).unwrap_or(&"other")))
        .collect();
    tracing::debug!(commands = %summary.join(" "), "NBD connection done");
    result
}

fn read_requests(
    reader: &mut impl Read,
    (connection, server): &(Arc<PayloadBudget>, Arc<PayloadBudget>),
    mut submit: impl FnMut(Job) -> bool,
) -> io::Result<()> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(request) = Request::parse(&header) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request with a bad magic",
            ));
        };
        let mut payload = Vec::new();
        let mut leases = None;
        match request.command {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if request.length > MAX_PAYLOAD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "write of {} bytes is over the maximum {MAX_PAYLOAD}",
                            request.length
                        ),
                    ));
                }
                let n = u64::from(request.length);
                // Connection first, then server, always in that order.
                leases = Some((connection.acquire(n), server.acquire(n)));
                // Filled as it arrives: a client that stalls halfway holds
                // only what it sent (the untouched capacity is not memory).
                payload.reserve_exact(n as usize);
                let got = Read::by_ref(reader).take(n).read_to_end(&mut payload)?;
                if got as u64 != n {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            _ => {}
        }
        if !submit(Job {
            request,
            payload,
            _leases: leases,
        }) {
            return Ok(());
        }
    }
}

/// Runs one request and sends its reply; false once the reply cannot be
/// sent (the client is gone).
fn answer<S: Write>(session: &Session, writer: &Writer<S>, job: Job) -> bool {
    let cookie = job.request.cookie;
    let reply = handle(session, job);
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    let sent = reply
        .send(&mut *w, session.structured, cookie)
        .and_then(|_| w.flush());
    if let Err(e) = sent {
        tracing::debug!(error = %e, "NBD reply not sent: client gone");
        return false;
    }
    true
}

/// The outcome of one request, ready to encode.
enum Reply {
    Done,
    Read {
        offset: u64,
        data: Vec<u8>,
        fragment: bool,
    },
    BlockStatus(Vec<(u32, Vec<(u32, u32)>)>),
    Error {
        errno: u32,
        message: String,
    },
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
    if r.flags & !KNOWN_FLAGS != 0 {
        return error(EINVAL, format!("unknown command flags {:#x}", r.flags));
    }
    let size = export.size();
    let in_range = r
        .offset
        .checked_add(r.length as u64)
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
            if r.length > MAX_PAYLOAD {
                return error(
                    if session.structured {
                        EOVERFLOW
                    } else {
                        EINVAL
                    },
                    "read over the maximum size",
                );
            }
            let mut data = vec![0u8; r.length as usize];
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
        CMD_TRIM => flush_if_fua(export.discard(r.offset, r.length as u64)),
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
            flush_if_fua(export.write_zeroes(r.offset, r.length as u64, how))
        }
        // The engine reads straight from the device: nothing to warm.
        CMD_CACHE => Reply::Done,
        CMD_BLOCK_STATUS => block_status(export, &session.contexts, session.structured, &r),
        other => error(EINVAL, format!("unknown command {other}")),
    }
}

fn block_status(export: &dyn Export, contexts: &[Context], structured: bool, r: &Request) -> Reply {
    if !structured || contexts.is_empty() {
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
    let mut chunks = Vec::new();
    for context in contexts {
        match export::block_status(export, context, r.offset, r.length as u64, max) {
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
    fn send(&self, w: &mut impl Write, structured: bool, cookie: u64) -> io::Result<()> {
        if !structured {
            return match self {
                Reply::Done => w.write_all(&simple_reply(0, cookie)),
                Reply::Read { data, .. } => {
                    w.write_all(&simple_reply(0, cookie))?;
                    w.write_all(data)
                }
                Reply::Error { errno, .. } => w.write_all(&simple_reply(*errno, cookie)),
                Reply::BlockStatus(_) => unreachable!("block status needs structured replies"),
            };
        }
        match self {
            Reply::Done => w.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)),
            Reply::Error { errno, message } => {
                let message = error_text(message).as_bytes();
                w.write_all(&chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    cookie,
                    6 + message.len() as u32,
                ))?;
                w.write_all(&errno.to_be_bytes())?;
                w.write_all(&(message.len() as u16).to_be_bytes())?;
                w.write_all(message)
            }
            Reply::Read { data, .. } if data.is_empty() => {
                w.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
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
                        w.write_all(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12))?;
                        w.write_all(&at.to_be_bytes())?;
                        w.write_all(&((end - start) as u32).to_be_bytes())?;
                    } else {
                        w.write_all(&chunk_header(
                            flags,
                            REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + (end - start) as u32,
                        ))?;
                        w.write_all(&at.to_be_bytes())?;
                        w.write_all(&data[start..end])?;
                    }
                }
                Ok(())
            }
            Reply::BlockStatus(chunks) => {
                let last = chunks.len() - 1;
                for (i, (id, descriptors)) in chunks.iter().enumerate() {
                    let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                    let len = 4 + 8 * descriptors.len() as u32;
                    w.write_all(&chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, len))?;
                    w.write_all(&id.to_be_bytes())?;
                    for (length, state) in descriptors {
                        w.write_all(&length.to_be_bytes())?;
                        w.write_all(&state.to_be_bytes())?;
                    }
                }
                Ok(())
            }
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
        .send(&mut out, true, 7)
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
        read_requests(&mut stream.as_slice(), &budgets, |j| {
            jobs.push(j);
            true
        })
        .unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].payload, b"abc");
        let err = read_requests(&mut [0xffu8; 28].as_slice(), &budgets, |_| true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
