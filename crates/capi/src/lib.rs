//! libblksnap: the C library of blksnapd, the blksnap daemon (user-space
//! snapshots and change-block tracking of block devices and image files).
//!
//! One `struct blksnap_client` is one connection to the daemon's control
//! socket; each function sends one request (readcbtmap: a few) and waits for
//! its reply. The functions follow the commands of the `blksnap` tool:
//! version, attach, detach, list, cbtinfo, readcbtmap, markdirtyblock and
//! snapshot_create, _add, _appendstorage, _take, _destroy, _collect, _info,
//! _waitevent.
//!
//! Errors: every `int` function returns 0 on success and a negative errno
//! value on failure (-EINVAL for a NULL or malformed argument, -ENOENT for an
//! unknown device or snapshot, -EBUSY for a device in a snapshot, ...: the
//! daemon's errno). `blksnap_last_error()` then gives a message naming the
//! device, range or limit involved. Transport and protocol failures
//! (-EPIPE, -ECONNRESET, -EIO, -EPROTO, ...) leave the connection unusable:
//! later calls fail with -ENOTCONN until the client is disconnected and a new
//! one connected. No function ever unwinds a Rust panic into C: an internal
//! error becomes -EIO.
//!
//! Devices are named by their name (no '/') or by their path. Paths (any
//! argument containing a '/') that are relative are made absolute against the
//! caller's working directory before they are sent (lexically: no symlink is
//! resolved and the file need not exist; the daemon resolves symlinks), since
//! the daemon has a working directory of its own. Strings must be UTF-8,
//! except the control socket path.
//!
//! Ids (snapshot ids, CBT generation ids) are UUIDs as 16 bytes in RFC 4122
//! order; `blksnap_id_to_string()` and `blksnap_id_from_string()` convert them
//! to and from the 36-character text form the `blksnap` tool prints.
//!
//! Threads: a client may be used from any thread, but by one thread at a
//! time; give each thread its own client for concurrent requests (a waiting
//! `blksnap_snapshot_waitevent()` holds its client until it returns).
//!
//! Build: `pkg-config --cflags --libs blksnap` (`-lblksnap`).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// The C names of the types are part of the ABI.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::time::Duration;

use ::blksnap_client::{
    Client, Error as ClientError, Event, OnCopyError, Range, SnapshotCreateArgs,
};
use blksnap_proto::{Request, RequestMessage};
use uuid::Uuid;

// ---- constants ----

/// Bytes of an id (snapshot id, CBT generation id): a UUID.
pub const BLKSNAP_ID_SIZE: usize = 16;
/// Bytes of an id's text form (8-4-4-4-12 hex digits) with its NUL.
pub const BLKSNAP_ID_STRING_SIZE: usize = 37;
/// Size of the buffers for device names: the longest name (255 bytes) and
/// its NUL.
pub const BLKSNAP_NAME_MAX: usize = 256;
/// Size of the path fields of the structures, NUL included.
pub const BLKSNAP_PATH_MAX: usize = 4096;
/// Bytes of a sector: ranges count 512-byte sectors.
pub const BLKSNAP_SECTOR_SIZE: u64 = 512;
/// The control protocol version this library speaks.
pub const BLKSNAP_PROTOCOL_VERSION: u32 = 1;

/// `blksnap_event.type`: the timeout passed without an event.
pub const BLKSNAP_EVENT_NONE: i32 = 0;
/// `blksnap_event.type`: the difference storage needs to grow past its limit
/// (`requested_sectors` more sectors); append storage or expect corruption.
pub const BLKSNAP_EVENT_NO_SPACE: i32 = 1;
/// `blksnap_event.type`: the image of `device` became invalid
/// (`errno_value` says why).
pub const BLKSNAP_EVENT_CORRUPTED: i32 = 2;

/// `blksnap_snapshot_options.on_copy_error`: the daemon's configured policy.
pub const BLKSNAP_ON_COPY_ERROR_DEFAULT: i32 = 0;
/// The origin write proceeds when its copy fails; the image becomes corrupted.
pub const BLKSNAP_ON_COPY_ERROR_KEEP_ORIGIN_WRITES: i32 = 1;
/// The origin write fails when its copy fails; the image stays valid.
pub const BLKSNAP_ON_COPY_ERROR_BREAK_ORIGIN_WRITE: i32 = 2;

// ---- types ----

/// A connection to blksnapd (opaque): from `blksnap_connect()`, released by
/// `blksnap_disconnect()`.
pub struct blksnap_client {
    client: Client,
    /// Message of the last failure, returned by `blksnap_last_error()`.
    last_error: CString,
    /// Why the connection can no longer be used, after a transport or
    /// protocol failure or an internal error.
    broken: Option<String>,
}

/// A device's change-tracking parameters (`blksnap_cbtinfo()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnap_cbtinfo {
    /// Bytes of a tracking block (one byte of the change map).
    pub block_size: u32,
    /// Bytes of the device.
    pub device_capacity: u64,
    /// Tracking blocks: bytes of the change map.
    pub block_count: u64,
    /// Generation of the change map; a new one (after a wrap of the change
    /// numbers or an unclean stop) means a full backup.
    pub generation_id: [u8; BLKSNAP_ID_SIZE],
    /// The change number of the readable map: block b changed since backup
    /// N iff map[b] > N (same generation and block size).
    pub changes_number: u8,
    /// The change number that writes are marked with now.
    pub current_number: u8,
}

/// A range of 512-byte sectors.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnap_range {
    /// First sector.
    pub start: u64,
    /// Number of sectors (positive).
    pub count: u64,
}

/// Options of `blksnap_snapshot_create_ex()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnap_snapshot_options {
    /// Largest size of the difference storage in bytes; 0: no limit.
    pub limit: u64,
    /// BLKSNAP_ON_COPY_ERROR_*.
    pub on_copy_error: i32,
    /// Longest a copy before an origin write may take, in milliseconds; 0:
    /// the daemon's setting.
    pub copy_timeout_ms: u64,
}

/// A tracked device (`blksnap_list()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnap_device_info {
    /// The device's name.
    pub name: [c_char; BLKSNAP_NAME_MAX],
    /// Its origin path (symlinks resolved); empty when it has none.
    pub path: [c_char; BLKSNAP_PATH_MAX],
    /// Bytes of the device.
    pub size: u64,
    /// Whether the device is in a snapshot, then `snapshot_id` is that
    /// snapshot's id (else zeroes).
    pub in_snapshot: bool,
    pub snapshot_id: [u8; BLKSNAP_ID_SIZE],
}

/// A device's snapshot image and its snapshot (`blksnap_snapshot_info()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnap_image_info {
    /// 0 while the image is valid, else the errno that invalidated it.
    pub error_code: i32,
    /// Bytes of the image (0 before the take).
    pub size: u64,
    /// Bytes of a copy-on-write chunk (0 before the take).
    pub chunk_size: u64,
    /// Whether the snapshot is taken (the image exists).
    pub taken: bool,
    /// Devices in the snapshot.
    pub device_count: u32,
    /// Bytes of difference storage in use, in all, and its limit (0: none).
    pub storage_used: u64,
    pub storage_total: u64,
    pub storage_limit: u64,
    /// Where a frontend serves the image (a path or URI); empty when none
    /// does.
    pub image: [c_char; BLKSNAP_PATH_MAX],
}

/// A snapshot event (`blksnap_snapshot_waitevent()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnap_event {
    /// BLKSNAP_EVENT_NONE, _NO_SPACE or _CORRUPTED.
    pub r#type: i32,
    /// NO_SPACE: sectors the storage needed.
    pub requested_sectors: u64,
    /// CORRUPTED: the errno that invalidated the image.
    pub errno_value: i32,
    /// CORRUPTED: the device whose image it is.
    pub device: [c_char; BLKSNAP_NAME_MAX],
}

// ---- failures ----

/// Why a call failed: a positive errno value and a message.
struct Failure {
    errno: i32,
    message: String,
    /// The connection is no longer usable.
    fatal: bool,
}

type Outcome<T = ()> = Result<T, Failure>;

impl Failure {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
            fatal: false,
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(libc::EINVAL, message)
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let errno = e.errno();
        Self {
            // Never report success or a positive value for a failure.
            errno: if errno > 0 { errno } else { libc::EIO },
            fatal: !matches!(e, ClientError::Remote(_)),
            message: e.to_string(),
        }
    }
}

/// A C string of `message` (interior NULs would cut it short: replaced).
fn c_message(message: String) -> CString {
    CString::new(message).unwrap_or_else(|e| {
        let bytes: Vec<u8> = e
            .into_vec()
            .into_iter()
            .map(|b| if b == 0 { b'?' } else { b })
            .collect();
        CString::new(bytes).unwrap_or_default()
    })
}

fn panic_failure(what: &str) -> Failure {
    Failure {
        errno: libc::EIO,
        message: format!("internal error in libblksnap during {what}"),
        fatal: true,
    }
}

thread_local! {
    /// Message of this thread's last failed `blksnap_connect()`.
    static CONNECT_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records the message of a failed connect (without ever panicking, even
/// while the thread's storage is being torn down).
fn set_connect_error(message: String) {
    let message = c_message(message);
    let _ = CONNECT_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = message;
        }
    });
}

/// Runs one call of the API on client `c`: rejects a NULL or broken client,
/// catches panics, records the failure's message and turns the outcome into
/// 0 or a negative errno value.
///
/// # Safety
/// `c` is NULL or a live pointer from `blksnap_connect()` that no other
/// thread uses during the call.
unsafe fn with_client(
    c: *mut blksnap_client,
    what: &str,
    body: impl FnOnce(&mut Client) -> Outcome,
) -> c_int {
    // SAFETY: by this function's contract `c` is NULL or points to a live
    // client used by this thread alone, so a unique reference is sound.
    let Some(handle) = (unsafe { c.as_mut() }) else {
        return -libc::EINVAL;
    };
    let failure = if let Some(reason) = &handle.broken {
        Failure::new(
            libc::ENOTCONN,
            format!("the connection to blksnapd is unusable after an earlier failure ({reason}); disconnect and connect again"),
        )
    } else {
        match catch_unwind(AssertUnwindSafe(|| body(&mut handle.client))) {
            Ok(Ok(())) => return 0,
            Ok(Err(failure)) => failure,
            Err(_) => panic_failure(what),
        }
    };
    let message = format!("{what}: {}", failure.message);
    if failure.fatal {
        handle.broken = Some(failure.message);
    }
    handle.last_error = c_message(message);
    -failure.errno
}

// ---- arguments ----

/// A required string argument.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that lives through the call.
unsafe fn arg_str<'a>(ptr: *const c_char, what: &str) -> Outcome<&'a str> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by this function's contract.
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str()
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// An optional string argument (NULL: none).
///
/// # Safety
/// As [`arg_str`].
unsafe fn opt_str<'a>(ptr: *const c_char, what: &str) -> Outcome<Option<&'a str>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL; the caller guarantees the rest.
    unsafe { arg_str(ptr, what) }.map(Some)
}

/// A path sent to the daemon: relative ones are made absolute against this
/// process's working directory (lexically; the file need not exist).
fn absolute_path(path: &str, what: &str) -> Outcome<String> {
    if path.is_empty() {
        return Err(invalid(format!("{what} is an empty path")));
    }
    if Path::new(path).is_absolute() {
        return Ok(path.to_string());
    }
    let absolute = std::path::absolute(path).map_err(|e| {
        Failure::new(
            e.raw_os_error().unwrap_or(libc::EINVAL),
            format!("{what} {path}: {e}"),
        )
    })?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| invalid(format!("{what} {path}: the working directory is not UTF-8")))
}

/// A device key: a name (no '/') passes through, a path is made absolute.
fn device_key(device: &str) -> Outcome<String> {
    if device.contains('/') {
        absolute_path(device, "device")
    } else if device.is_empty() {
        Err(invalid("device is empty"))
    } else {
        Ok(device.to_string())
    }
}

/// A required 16-byte id argument.
///
/// # Safety
/// `ptr` is NULL or points to 16 readable bytes.
unsafe fn arg_id(ptr: *const u8, what: &str) -> Outcome<Uuid> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    let mut bytes = [0u8; BLKSNAP_ID_SIZE];
    // SAFETY: `ptr` is non-NULL with 16 readable bytes by this function's
    // contract; `bytes` is a distinct local array of 16 bytes.
    unsafe { ptr::copy_nonoverlapping(ptr, bytes.as_mut_ptr(), BLKSNAP_ID_SIZE) };
    Ok(Uuid::from_bytes(bytes))
}

/// An array argument of `n` elements (`ptr` may be NULL when `n` is 0).
///
/// # Safety
/// `ptr` is NULL or points to `n` initialized elements that live through the
/// call and that nothing writes meanwhile.
unsafe fn arg_slice<'a, T>(ptr: *const T, n: usize, what: &str) -> Outcome<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL but its count is {n}")));
    }
    if !ptr.is_aligned()
        || n.checked_mul(size_of::<T>())
            .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(invalid(format!(
            "{what} is misaligned or too large ({n} elements)"
        )));
    }
    // SAFETY: non-NULL, aligned, not larger than isize::MAX bytes (checked
    // above), `n` initialized elements not written during the call (this
    // function's contract).
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// A required pointer to one output value.
fn out_ptr<T>(ptr: *mut T, what: &str) -> Outcome<NonNull<T>> {
    match NonNull::new(ptr) {
        Some(p) if ptr.is_aligned() => Ok(p),
        Some(_) => Err(invalid(format!("{what} is misaligned"))),
        None => Err(invalid(format!("{what} is NULL"))),
    }
}

/// An optional pointer to one output value (NULL: not wanted).
fn opt_out<T>(ptr: *mut T, what: &str) -> Outcome<Option<NonNull<T>>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        out_ptr(ptr, what).map(Some)
    }
}

/// Stores `value` through a pointer checked by [`out_ptr`].
///
/// # Safety
/// `out` points to writable memory for a `T` that nothing else accesses
/// during the call.
unsafe fn store<T>(out: NonNull<T>, value: T) {
    // SAFETY: non-NULL and aligned (checked by `out_ptr`), writable and
    // unaliased by this function's contract; `write` reads nothing there,
    // so uninitialized memory is fine.
    unsafe { out.as_ptr().write(value) }
}

/// An output byte buffer of `len` bytes (`ptr` may be NULL when `len` is 0).
struct OutBuf {
    ptr: *mut u8,
    len: usize,
}

impl OutBuf {
    fn new(ptr: *mut u8, len: usize, what: &str) -> Outcome<Self> {
        if ptr.is_null() && len > 0 {
            return Err(invalid(format!("{what} is NULL but its length is {len}")));
        }
        Ok(Self { ptr, len })
    }

    /// Copies `bytes` (at most `len` of them) to the start of the buffer.
    ///
    /// # Safety
    /// The buffer's `len` bytes are writable and nothing else accesses them
    /// during the call.
    unsafe fn fill(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.len);
        if n > 0 {
            // SAFETY: `ptr` is non-NULL (len > 0) with `len >= n` writable
            // bytes (this function's contract); `bytes` is Rust memory,
            // distinct from the caller's buffer.
            unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, n) };
        }
    }

    /// Stores `text` and its NUL; -ERANGE when it does not fit.
    ///
    /// # Safety
    /// As [`OutBuf::fill`].
    unsafe fn put_str(&self, text: &str, what: &str) -> Outcome {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(0);
        if bytes.len() > self.len {
            return Err(Failure::new(
                libc::ERANGE,
                format!(
                    "{what} needs {} bytes, the buffer has {}",
                    bytes.len(),
                    self.len
                ),
            ));
        }
        // SAFETY: passed on from the caller.
        unsafe { self.fill(&bytes) };
        Ok(())
    }
}

/// Copies `text` into a fixed C string field, NUL-terminated; false when it
/// was cut short.
fn put_field<const N: usize>(field: &mut [c_char; N], text: &str) -> bool {
    let bytes = text.as_bytes();
    let n = bytes.len().min(N.saturating_sub(1));
    for (dst, &src) in field.iter_mut().zip(&bytes[..n]) {
        *dst = src as c_char;
    }
    if let Some(nul) = field.get_mut(n) {
        *nul = 0;
    }
    n == bytes.len()
}

fn ranges(ranges: &[blksnap_range]) -> Vec<Range> {
    ranges
        .iter()
        .map(|r| Range {
            start: r.start,
            count: r.count,
        })
        .collect()
}

/// The daemon reads requests of at most `MAX_REQUEST_BYTES` and cannot tell
/// which request an oversized one was: refuse them here, with -E2BIG.
fn check_request_size(request: Request) -> Outcome {
    let message = RequestMessage {
        id: Some(u64::MAX),
        request,
    };
    let len = serde_json::to_vec(&message)
        .map_err(|e| invalid(e.to_string()))?
        .len()
        + 1;
    if len > blksnap_proto::MAX_REQUEST_BYTES {
        return Err(Failure::new(
            libc::E2BIG,
            format!(
                "the request would be {len} bytes, over the daemon's limit of {}: split it into several calls",
                blksnap_proto::MAX_REQUEST_BYTES
            ),
        ));
    }
    Ok(())
}

// ---- connection ----

/// Connects to blksnapd's control socket `control_path`; NULL:
/// `$BLKSNAP_CONTROL`, else `/run/blksnap/control.sock`.
///
/// Returns the client, or NULL with `*err` (when `err` is not NULL) set to a
/// negative errno value (-ENOENT: no socket there, -ECONNREFUSED: no daemon,
/// -EACCES: no permission); `blksnap_last_error(NULL)` then gives the
/// message (per thread). `*err` is 0 on success.
///
/// # Safety
/// `control_path` is NULL or a NUL-terminated string; `err` is NULL or
/// points to a writable int.
#[no_mangle]
pub unsafe extern "C" fn blksnap_connect(
    control_path: *const c_char,
    err: *mut c_int,
) -> *mut blksnap_client {
    let outcome = catch_unwind(|| -> Outcome<Client> {
        let path = if control_path.is_null() {
            ::blksnap_client::default_control_path()
        } else {
            // SAFETY: non-NULL and NUL-terminated by the caller's contract.
            let bytes = unsafe { CStr::from_ptr(control_path) }.to_bytes();
            PathBuf::from(OsStr::from_bytes(bytes))
        };
        Ok(Client::connect(&path)?)
    });
    let (result, code) = match outcome {
        Ok(Ok(client)) => {
            let handle = Box::new(blksnap_client {
                client,
                last_error: CString::default(),
                broken: None,
            });
            (Box::into_raw(handle), 0)
        }
        Ok(Err(failure)) => {
            let errno = failure.errno;
            set_connect_error(format!("blksnap_connect: {}", failure.message));
            (ptr::null_mut(), -errno)
        }
        Err(_) => {
            set_connect_error(panic_failure("blksnap_connect").message);
            (ptr::null_mut(), -libc::EIO)
        }
    };
    if let Ok(Some(err)) = opt_out(err, "err") {
        // SAFETY: `err` is non-NULL and aligned (checked) and writable by
        // the caller's contract.
        unsafe { store(err, code) };
    }
    result
}

/// Closes the connection and frees the client. NULL is ignored.
///
/// # Safety
/// `c` is NULL or a pointer from `blksnap_connect()` not yet disconnected;
/// it is invalid afterwards, as are the strings `blksnap_last_error()`
/// returned for it.
#[no_mangle]
pub unsafe extern "C" fn blksnap_disconnect(c: *mut blksnap_client) {
    if c.is_null() {
        return;
    }
    // SAFETY: `c` came from `Box::into_raw` in `blksnap_connect` and is
    // released once, by the caller's contract.
    let handle = unsafe { Box::from_raw(c) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(handle)));
}

/// The message of the last failed call on `c` ("" before any failure;
/// successful calls leave it as it was). With NULL: the message of this
/// thread's last failed `blksnap_connect()`. The string belongs to the
/// library: valid until the next call on the same client (or the next
/// `blksnap_connect()` in this thread, for NULL).
///
/// # Safety
/// `c` is NULL or a live pointer from `blksnap_connect()`.
#[no_mangle]
pub unsafe extern "C" fn blksnap_last_error(c: *const blksnap_client) -> *const c_char {
    // SAFETY: `c` is NULL or points to a live client (caller's contract);
    // only a shared reference is made.
    match unsafe { c.as_ref() } {
        Some(handle) => handle.last_error.as_ptr(),
        // The CString's buffer stays where it is until the next failed
        // connect in this thread replaces it.
        None => CONNECT_ERROR
            .try_with(|e| e.try_borrow().map(|m| m.as_ptr()).ok())
            .ok()
            .flatten()
            .unwrap_or(c"".as_ptr()),
    }
}

/// This library's version (a static string).
#[no_mangle]
pub extern "C" fn blksnap_library_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

// ---- commands ----

/// The daemon's version: its text (NUL-terminated) into `buf` of `len`
/// bytes (-ERANGE when too small), its protocol version into `*protocol`
/// (when not NULL).
///
/// # Safety
/// `c` as for every call (NULL or live, one thread at a time); `buf` is
/// writable for `len` bytes; `protocol` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_version(
    c: *mut blksnap_client,
    buf: *mut c_char,
    len: usize,
    protocol: *mut u32,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        let out = OutBuf::new(buf.cast(), len, "buf")?;
        let protocol = opt_out(protocol, "protocol")?;
        let v = client.version()?;
        // SAFETY: `buf` has `len` writable bytes (caller's contract).
        unsafe { out.put_str(&v.version, "the version")? };
        if let Some(p) = protocol {
            // SAFETY: checked non-NULL and aligned; writable by contract.
            unsafe { store(p, v.protocol) };
        }
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_version", body) }
}

/// Starts tracking the block device or image file at `path` (opened
/// exclusively by the daemon) under `name` (NULL: the path's file name).
/// A relative `path` is made absolute against the working directory. The
/// device's name goes to `name_out` (NULL: not wanted), which must then
/// have at least BLKSNAP_NAME_MAX bytes (`len`), else -EINVAL before
/// anything is done. Errors: -ENOENT (no such file), -EEXIST (already
/// tracked, or the name is taken), -EINVAL (bad name, empty device).
///
/// # Safety
/// `c` as for every call; `path` and `name` NUL-terminated (`name` may be
/// NULL); `name_out` NULL or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_attach(
    c: *mut blksnap_client,
    path: *const c_char,
    name: *const c_char,
    name_out: *mut c_char,
    len: usize,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: strings as this function's contract.
        let (path, name) = unsafe { (arg_str(path, "path")?, opt_str(name, "name")?) };
        let path = absolute_path(path, "path")?;
        if !name_out.is_null() && len < BLKSNAP_NAME_MAX {
            return Err(invalid(format!(
                "name_out has {len} bytes, fewer than BLKSNAP_NAME_MAX ({BLKSNAP_NAME_MAX})"
            )));
        }
        let out = OutBuf::new(name_out.cast(), len, "name_out")?;
        let info = client.attach(&path, name)?;
        if !name_out.is_null() {
            // SAFETY: `name_out` has `len` writable bytes (contract).
            unsafe { out.put_str(&info.name, "the device name")? };
        }
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_attach", body) }
}

/// Stops tracking `device` (name or path). -ENOENT: not tracked; -EBUSY: it
/// is in a snapshot (destroy the snapshot first).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn blksnap_detach(c: *mut blksnap_client, device: *const c_char) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `device` NUL-terminated (contract).
        let device = device_key(unsafe { arg_str(device, "device")? })?;
        Ok(client.detach(&device)?)
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_detach", body) }
}

/// The tracked devices: up to `cap` of them into `out[]`, their number into
/// `*count` (when not NULL). -EOVERFLOW when there are more than `cap`
/// (`out` then holds the first `cap`); `out` may be NULL when `cap` is 0,
/// to ask for the count.
///
/// # Safety
/// `c` as for every call; `out` writable for `cap` elements; `count` NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_list(
    c: *mut blksnap_client,
    out: *mut blksnap_device_info,
    cap: usize,
    count: *mut usize,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        if cap > 0 {
            out_ptr(out, "out")?;
        }
        let count = opt_out(count, "count")?;
        let list = client.list()?;
        for (i, d) in list.devices.iter().take(cap).enumerate() {
            let mut info = blksnap_device_info {
                name: [0; BLKSNAP_NAME_MAX],
                path: [0; BLKSNAP_PATH_MAX],
                size: d.size,
                in_snapshot: d.snapshot.is_some(),
                snapshot_id: d.snapshot.map_or([0; BLKSNAP_ID_SIZE], |s| s.into_bytes()),
            };
            put_field(&mut info.name, &d.name);
            put_field(&mut info.path, d.path.as_deref().unwrap_or(""));
            // SAFETY: `out` is non-NULL and aligned (checked) with `cap`
            // writable elements (contract), and i < cap.
            unsafe { out.add(i).write(info) };
        }
        if let Some(count) = count {
            // SAFETY: checked non-NULL and aligned; writable by contract.
            unsafe { store(count, list.devices.len()) };
        }
        if list.devices.len() > cap {
            return Err(Failure::new(
                libc::EOVERFLOW,
                format!("{} devices, room for {cap}", list.devices.len()),
            ));
        }
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_list", body) }
}

/// The change-tracking parameters of `device` (name or path).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_cbtinfo(
    c: *mut blksnap_client,
    device: *const c_char,
    out: *mut blksnap_cbtinfo,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `device` NUL-terminated (contract).
        let device = device_key(unsafe { arg_str(device, "device")? })?;
        let out = out_ptr(out, "out")?;
        let i = client.cbtinfo(&device)?;
        let info = blksnap_cbtinfo {
            block_size: i.block_size,
            device_capacity: i.device_capacity,
            block_count: i.block_count,
            generation_id: i.generation_id.into_bytes(),
            changes_number: i.changes_number,
            current_number: i.current_number,
        };
        // SAFETY: checked non-NULL and aligned; writable by contract.
        unsafe { store(out, info) };
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_cbtinfo", body) }
}

/// The readable change map of `device` (one byte per tracking block, the
/// change number of the block's last change; frozen between snapshot takes):
/// up to `len` bytes into `buf`, the full block count into `*block_count`
/// (when not NULL). -EOVERFLOW when the map is longer than `len` (`buf` then
/// holds its first `len` bytes); `buf` may be NULL when `len` is 0, to ask
/// for the count (`blksnap_cbtinfo()` gives it too).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `buf` writable for `len`
/// bytes; `block_count` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_readcbtmap(
    c: *mut blksnap_client,
    device: *const c_char,
    buf: *mut u8,
    len: usize,
    block_count: *mut usize,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `device` NUL-terminated (contract).
        let device = device_key(unsafe { arg_str(device, "device")? })?;
        let out = OutBuf::new(buf, len, "buf")?;
        let block_count = opt_out(block_count, "block_count")?;
        let map = client.read_cbt_map(&device)?;
        // SAFETY: `buf` has `len` writable bytes (contract).
        unsafe { out.fill(&map) };
        if let Some(count) = block_count {
            // SAFETY: checked non-NULL and aligned; writable by contract.
            unsafe { store(count, map.len()) };
        }
        if map.len() > len {
            return Err(Failure::new(
                libc::EOVERFLOW,
                format!(
                    "the change map of {device} has {} blocks, the buffer {len} bytes",
                    map.len()
                ),
            ));
        }
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_readcbtmap", body) }
}

/// Marks `n` sector ranges of `device` (name or path) as changed, so the
/// next incremental backup includes them. -EINVAL: a range outside the
/// device; -E2BIG: too many ranges for one request (some ten thousand; split
/// them over several calls).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `ranges` readable for
/// `n` elements (may be NULL when `n` is 0).
#[no_mangle]
pub unsafe extern "C" fn blksnap_markdirtyblock(
    c: *mut blksnap_client,
    device: *const c_char,
    ranges: *const blksnap_range,
    n: usize,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `device` NUL-terminated, `ranges` has `n` elements
        // (contract).
        let (device, list) =
            unsafe { (arg_str(device, "device")?, arg_slice(ranges, n, "ranges")?) };
        let device = device_key(device)?;
        let list = self::ranges(list);
        check_request_size(Request::Markdirtyblock(blksnap_proto::MarkDirtyArgs {
            device: device.clone(),
            ranges: list.clone(),
        }))?;
        Ok(client.mark_dirty(&device, &list)?)
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_markdirtyblock", body) }
}

/// Creates a snapshot of `n_devices` devices (names or paths; more can be
/// added with `blksnap_snapshot_add()` before the take) with its difference
/// storage `storage`: a regular file (grown as needed), a directory (an
/// unnamed temporary file there) or a block device; NULL: none yet, append
/// ranges with `blksnap_snapshot_appendstorage()`. A relative `storage` is
/// made absolute against the working directory. `limit`: largest size of
/// the storage in bytes, 0 for none. The new id goes to `id_out` (16
/// bytes). All or nothing: on failure no snapshot is left.
///
/// # Safety
/// `c` as for every call; `devices` readable for `n_devices` NUL-terminated
/// strings (may be NULL when `n_devices` is 0); `storage` NULL or
/// NUL-terminated; `id_out` writable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_create(
    c: *mut blksnap_client,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    limit: u64,
    id_out: *mut u8,
) -> c_int {
    let options = blksnap_snapshot_options {
        limit,
        on_copy_error: BLKSNAP_ON_COPY_ERROR_DEFAULT,
        copy_timeout_ms: 0,
    };
    // SAFETY: passed on from this function's contract; `options` is a local.
    unsafe {
        snapshot_create(
            c,
            "blksnap_snapshot_create",
            devices,
            n_devices,
            storage,
            &options,
            id_out,
        )
    }
}

/// As `blksnap_snapshot_create()`, with options (NULL: the defaults, as
/// `blksnap_snapshot_create()` with limit 0).
///
/// # Safety
/// As `blksnap_snapshot_create()`; `options` NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_create_ex(
    c: *mut blksnap_client,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    options: *const blksnap_snapshot_options,
    id_out: *mut u8,
) -> c_int {
    // SAFETY: passed on from this function's contract.
    unsafe {
        snapshot_create(
            c,
            "blksnap_snapshot_create_ex",
            devices,
            n_devices,
            storage,
            options,
            id_out,
        )
    }
}

/// # Safety
/// As `blksnap_snapshot_create_ex()`.
unsafe fn snapshot_create(
    c: *mut blksnap_client,
    what: &str,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    options: *const blksnap_snapshot_options,
    id_out: *mut u8,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        if !options.is_aligned() {
            return Err(invalid("options is misaligned"));
        }
        // SAFETY: `devices` has `n_devices` elements, `storage` is NULL
        // or NUL-terminated, `options` NULL or readable (contract) and
        // aligned (checked).
        let (list, storage, options) = unsafe {
            (
                arg_slice(devices, n_devices, "devices")?,
                opt_str(storage, "storage")?,
                options.as_ref(),
            )
        };
        let options = options.copied().unwrap_or(blksnap_snapshot_options {
            limit: 0,
            on_copy_error: BLKSNAP_ON_COPY_ERROR_DEFAULT,
            copy_timeout_ms: 0,
        });
        let mut names = Vec::with_capacity(list.len());
        for (i, &d) in list.iter().enumerate() {
            // SAFETY: every element is NULL or NUL-terminated (contract).
            names.push(device_key(unsafe {
                arg_str(d, &format!("devices[{i}]"))?
            })?);
        }
        let on_copy_error = match options.on_copy_error {
            BLKSNAP_ON_COPY_ERROR_DEFAULT => None,
            BLKSNAP_ON_COPY_ERROR_KEEP_ORIGIN_WRITES => Some(OnCopyError::KeepOriginWrites),
            BLKSNAP_ON_COPY_ERROR_BREAK_ORIGIN_WRITE => Some(OnCopyError::BreakOriginWrite),
            other => {
                return Err(invalid(format!(
                    "on_copy_error {other} is none of BLKSNAP_ON_COPY_ERROR_*"
                )))
            }
        };
        if id_out.is_null() {
            return Err(invalid("id_out is NULL"));
        }
        let out = OutBuf::new(id_out, BLKSNAP_ID_SIZE, "id_out")?;
        let args = SnapshotCreateArgs {
            storage: storage.map(|s| absolute_path(s, "storage")).transpose()?,
            limit: (options.limit > 0).then_some(options.limit),
            devices: names,
            on_copy_error,
            copy_timeout_ms: (options.copy_timeout_ms > 0).then_some(options.copy_timeout_ms),
        };
        check_request_size(Request::SnapshotCreate(args.clone()))?;
        let id = client.snapshot_create(args)?;
        // SAFETY: `id_out` has 16 writable bytes (contract).
        unsafe { out.fill(id.as_bytes()) };
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, what, body) }
}

/// Adds `device` (name or path) to snapshot `id` (not taken yet). -EBUSY:
/// the device is in another snapshot; -EPERM: the snapshot is taken.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes; `device`
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_add(
    c: *mut blksnap_client,
    id: *const u8,
    device: *const c_char,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `id` has 16 bytes, `device` is NUL-terminated (contract).
        let (id, device) = unsafe { (arg_id(id, "id")?, arg_str(device, "device")?) };
        Ok(client.snapshot_add(id, &device_key(device)?)?)
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_add", body) }
}

/// Gives snapshot `id` more difference storage: `n` sector ranges of the
/// block device or file `device` (a path; relative ones are made absolute),
/// before or after the take.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes; `device`
/// NUL-terminated; `ranges` readable for `n` elements.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_appendstorage(
    c: *mut blksnap_client,
    id: *const u8,
    device: *const c_char,
    ranges: *const blksnap_range,
    n: usize,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: as this function's contract.
        let (id, device, list) = unsafe {
            (
                arg_id(id, "id")?,
                arg_str(device, "device")?,
                arg_slice(ranges, n, "ranges")?,
            )
        };
        let device = absolute_path(device, "device")?;
        let list = self::ranges(list);
        check_request_size(Request::SnapshotAppendstorage(
            blksnap_proto::AppendStorageArgs {
                id,
                device: device.clone(),
                ranges: list.clone(),
            },
        ))?;
        Ok(client.snapshot_append_storage(id, &device, &list)?)
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_appendstorage", body) }
}

/// Takes snapshot `id`: atomically over all its devices. -ENOENT: no such
/// snapshot; -EPERM: already taken; -EINVAL: it has no devices.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_take(c: *mut blksnap_client, id: *const u8) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `id` has 16 readable bytes (contract).
        let id = unsafe { arg_id(id, "id")? };
        client.snapshot_take(id)?;
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_take", body) }
}

/// Destroys snapshot `id`: its images go, its storage is released, change
/// tracking goes on. -ENOENT: no such snapshot.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_destroy(c: *mut blksnap_client, id: *const u8) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `id` has 16 readable bytes (contract).
        let id = unsafe { arg_id(id, "id")? };
        Ok(client.snapshot_destroy(id)?)
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_destroy", body) }
}

/// The ids of every snapshot: up to `cap` into `ids`, their number into
/// `*count` (when not NULL). -EOVERFLOW when there are more than `cap`
/// (`ids` then holds the first `cap`); `ids` may be NULL when `cap` is 0.
///
/// # Safety
/// `c` as for every call; `ids` writable for `cap` ids; `count` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_collect(
    c: *mut blksnap_client,
    ids: *mut [u8; BLKSNAP_ID_SIZE],
    cap: usize,
    count: *mut usize,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        let cap_bytes = cap
            .checked_mul(BLKSNAP_ID_SIZE)
            .ok_or_else(|| invalid(format!("cap {cap} is too large")))?;
        let out = OutBuf::new(ids.cast(), cap_bytes, "ids")?;
        let count = opt_out(count, "count")?;
        let list = client.snapshot_collect()?;
        let bytes: Vec<u8> = list.iter().flat_map(|id| *id.as_bytes()).collect();
        // SAFETY: `ids` has `cap` writable ids, `cap_bytes` bytes
        // (contract).
        unsafe { out.fill(&bytes) };
        if let Some(count) = count {
            // SAFETY: checked non-NULL and aligned; writable by contract.
            unsafe { store(count, list.len()) };
        }
        if list.len() > cap {
            return Err(Failure::new(
                libc::EOVERFLOW,
                format!("{} snapshots, room for {cap}", list.len()),
            ));
        }
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_collect", body) }
}

/// The snapshot that `device` (name or path) is in: its id into `id_out`
/// (16 bytes; NULL: not wanted) and the state of the device's image and of
/// the snapshot into `*out`. -ENOENT: the device is not tracked or is in no
/// snapshot. -ERANGE (everything else filled in) when the image's location
/// does not fit `out->image`.
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `id_out` NULL or
/// writable for 16 bytes; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_info(
    c: *mut blksnap_client,
    device: *const c_char,
    id_out: *mut u8,
    out: *mut blksnap_image_info,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `device` NUL-terminated (contract).
        let device = device_key(unsafe { arg_str(device, "device")? })?;
        let id_buf = OutBuf::new(
            id_out,
            if id_out.is_null() { 0 } else { BLKSNAP_ID_SIZE },
            "id_out",
        )?;
        let out = out_ptr(out, "out")?;
        let s = client.snapshot_info_of_device(&device)?;
        let for_device = s.for_device.as_deref().unwrap_or_default();
        let image = s.images.iter().find(|i| i.device == for_device);
        let mut info = blksnap_image_info {
            error_code: image.map_or(0, |i| i.error_code),
            size: image.map_or(0, |i| i.size),
            chunk_size: image.map_or(0, |i| i.chunk_size),
            taken: s.taken,
            device_count: u32::try_from(s.devices.len()).unwrap_or(u32::MAX),
            storage_used: s.storage.used,
            storage_total: s.storage.total,
            storage_limit: s.storage.limit.unwrap_or(0),
            image: [0; BLKSNAP_PATH_MAX],
        };
        let location = image.and_then(|i| i.image.as_deref()).unwrap_or("");
        let fits = put_field(&mut info.image, location);
        // SAFETY: `id_out` is NULL (0 bytes) or has 16 writable bytes;
        // `out` checked non-NULL and aligned, writable (contract).
        unsafe {
            id_buf.fill(s.id.as_bytes());
            store(out, info);
        }
        if !fits {
            return Err(Failure::new(
                libc::ERANGE,
                format!("the image location of {for_device} is longer than BLKSNAP_PATH_MAX"),
            ));
        }
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_info", body) }
}

/// Waits up to `timeout_ms` milliseconds for the next event of snapshot
/// `id` and stores it in `*out` (type BLKSNAP_EVENT_NONE when none came).
/// -ENOENT: no such snapshot, or it was destroyed while waiting; -EINVAL:
/// timeout over a day.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_waitevent(
    c: *mut blksnap_client,
    id: *const u8,
    timeout_ms: u32,
    out: *mut blksnap_event,
) -> c_int {
    let body = |client: &mut Client| -> Outcome {
        // SAFETY: `id` has 16 readable bytes (contract).
        let id = unsafe { arg_id(id, "id")? };
        let out = out_ptr(out, "out")?;
        let event = client.snapshot_wait_event(id, Duration::from_millis(timeout_ms.into()))?;
        let mut e = blksnap_event {
            r#type: BLKSNAP_EVENT_NONE,
            requested_sectors: 0,
            errno_value: 0,
            device: [0; BLKSNAP_NAME_MAX],
        };
        match event {
            None => {}
            Some(Event::NoSpace { requested_sectors }) => {
                e.r#type = BLKSNAP_EVENT_NO_SPACE;
                e.requested_sectors = requested_sectors;
            }
            Some(Event::Corrupted { device, errno }) => {
                e.r#type = BLKSNAP_EVENT_CORRUPTED;
                e.errno_value = errno;
                // Device names are at most 255 bytes: this always fits.
                put_field(&mut e.device, &device);
            }
        }
        // SAFETY: checked non-NULL and aligned; writable by contract.
        unsafe { store(out, e) };
        Ok(())
    };
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    unsafe { with_client(c, "blksnap_snapshot_waitevent", body) }
}

// ---- ids ----

/// Writes the text form of `id` (16 bytes), e.g.
/// "0b5c9a4e-2a57-4b8e-9f3c-5d7e1a2b3c4d", with its NUL into `buf` of `len`
/// bytes: -ERANGE when `len` < BLKSNAP_ID_STRING_SIZE, -EINVAL for NULL.
///
/// # Safety
/// `id` readable for 16 bytes; `buf` writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_id_to_string(
    id: *const u8,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    let outcome = catch_unwind(|| -> Outcome {
        // SAFETY: `id` has 16 readable bytes (contract).
        let id = unsafe { arg_id(id, "id")? };
        let out = OutBuf::new(buf.cast(), len, "buf")?;
        let text = id.hyphenated().to_string();
        // SAFETY: `buf` has `len` writable bytes (contract).
        unsafe { out.put_str(&text, "an id") }
    });
    match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(failure)) => -failure.errno,
        Err(_) => -libc::EIO,
    }
}

/// Parses the text form of an id (hyphenated, simple, braced or urn form)
/// into `id_out` (16 bytes). -EINVAL when it is not one.
///
/// # Safety
/// `text` NUL-terminated; `id_out` writable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_id_from_string(text: *const c_char, id_out: *mut u8) -> c_int {
    let outcome = catch_unwind(|| -> Outcome {
        // SAFETY: `text` NUL-terminated (contract).
        let text = unsafe { arg_str(text, "text")? };
        if id_out.is_null() {
            return Err(invalid("id_out is NULL"));
        }
        let id = Uuid::parse_str(text.trim()).map_err(|e| invalid(e.to_string()))?;
        let out = OutBuf::new(id_out, BLKSNAP_ID_SIZE, "id_out")?;
        // SAFETY: `id_out` has 16 writable bytes (contract).
        unsafe { out.fill(id.as_bytes()) };
        Ok(())
    });
    match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(failure)) => -failure.errno,
        Err(_) => -libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_version_matches() {
        assert_eq!(BLKSNAP_PROTOCOL_VERSION, blksnap_proto::PROTOCOL_VERSION);
        assert_eq!(
            BLKSNAP_ID_STRING_SIZE,
            Uuid::nil().hyphenated().to_string().len() + 1
        );
    }

    #[test]
    fn fields_are_cut_and_terminated() {
        let mut field = [1 as c_char; 4];
        assert!(put_field(&mut field, "ab"));
        assert_eq!(field[..3], [b'a' as c_char, b'b' as c_char, 0]);
        assert!(!put_field(&mut field, "abcdef"));
        assert_eq!(field, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
    }

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(device_key("disk").ok().as_deref(), Some("disk"));
        assert_eq!(device_key("/x/y").ok().as_deref(), Some("/x/y"));
        assert_eq!(
            device_key("./a/b").ok(),
            Some(cwd.join("a/b").display().to_string())
        );
        assert_eq!(
            absolute_path("img", "path").ok(),
            Some(cwd.join("img").display().to_string())
        );
        assert!(absolute_path("", "path").is_err());
        assert!(device_key("").is_err());
    }

    #[test]
    fn null_arguments_are_einval() {
        // SAFETY: NULL clients and pointers are what is under test.
        unsafe {
            assert_eq!(
                blksnap_detach(ptr::null_mut(), c"x".as_ptr()),
                -libc::EINVAL
            );
            assert_eq!(
                blksnap_id_to_string(ptr::null(), ptr::null_mut(), 0),
                -libc::EINVAL
            );
            let mut id = [0u8; 16];
            assert_eq!(
                blksnap_id_from_string(c"nope".as_ptr(), id.as_mut_ptr()),
                -libc::EINVAL
            );
            let text = c"0b5c9a4e-2a57-4b8e-9f3c-5d7e1a2b3c4d";
            assert_eq!(blksnap_id_from_string(text.as_ptr(), id.as_mut_ptr()), 0);
            let mut buf = [0 as c_char; BLKSNAP_ID_STRING_SIZE];
            assert_eq!(
                blksnap_id_to_string(id.as_ptr(), buf.as_mut_ptr(), buf.len() - 1),
                -libc::ERANGE
            );
            assert_eq!(
                blksnap_id_to_string(id.as_ptr(), buf.as_mut_ptr(), buf.len()),
                0
            );
            assert_eq!(CStr::from_ptr(buf.as_ptr()), text);
            blksnap_disconnect(ptr::null_mut());
        }
    }

    #[test]
    fn connect_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = CString::new(dir.path().join("none.sock").display().to_string()).unwrap();
        let mut err = 0;
        // SAFETY: valid strings and out-pointer.
        unsafe {
            let c = blksnap_connect(path.as_ptr(), &mut err);
            assert!(c.is_null());
            assert_eq!(err, -libc::ENOENT);
            let message = CStr::from_ptr(blksnap_last_error(ptr::null()))
                .to_str()
                .unwrap();
            assert!(message.contains("none.sock"), "{message}");
        }
    }

    #[test]
    fn a_broken_connection_stays_broken() {
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A "daemon" that answers every request with a line that is not JSON.
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                if line.is_err() || writer.write_all(b"not json\n").is_err() {
                    break;
                }
            }
        });
        let path = CString::new(path.display().to_string()).unwrap();
        let mut buf = [0 as c_char; 64];
        // SAFETY: valid strings, buffers and a client from blksnap_connect.
        unsafe {
            let mut err = 1;
            let c = blksnap_connect(path.as_ptr(), &mut err);
            assert!(!c.is_null() && err == 0);
            let mut version = |c| blksnap_version(c, buf.as_mut_ptr(), buf.len(), ptr::null_mut());
            assert_eq!(version(c), -libc::EPROTO);
            assert_eq!(version(c), -libc::ENOTCONN);
            let message = CStr::from_ptr(blksnap_last_error(c)).to_str().unwrap();
            assert!(
                message.starts_with("blksnap_version: the connection"),
                "{message}"
            );
            blksnap_disconnect(c);
        }
        server.join().unwrap();
    }

    #[test]
    fn oversized_requests_are_refused() {
        let ranges = vec![
            Range {
                start: u64::MAX,
                count: u64::MAX
            };
            20_000
        ];
        let request = Request::Markdirtyblock(blksnap_proto::MarkDirtyArgs {
            device: "d".into(),
            ranges,
        });
        assert_eq!(
            check_request_size(request).err().map(|f| f.errno),
            Some(libc::E2BIG)
        );
    }
}
