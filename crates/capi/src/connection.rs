//! The connection: the opaque handle `blksnapu_client` (one connection to
//! the daemon's control socket), `blksnap_connect()`, `blksnap_disconnect()`,
//! `blksnap_last_error()`, `blksnap_library_version()`, and [`call`], which
//! every other entry point that takes a client runs its body in.
//!
//! Invariants: a handle is made by `Box::into_raw` in `blksnap_connect()`
//! and freed once, by `blksnap_disconnect()`; once `broken` is set (by a
//! fatal failure) it stays set and every later call fails with -ENOTCONN
//! without touching the connection; `last_error` is replaced only by a
//! failed call, so the pointer `blksnap_last_error()` returned stays valid
//! until the next call on the same client. The handle's fields are private
//! to this module.
//!
//! Called from C, and by the entry points in `device` and `snapshot`
//! (through [`call`]).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;

use ::blksnap_client::Client;

use crate::args::opt_out;
use crate::failure::{c_message, guarded, panic_failure, Failure, Outcome};

/// A connection to blksnapd (opaque): from `blksnap_connect()`, released by
/// `blksnap_disconnect()`.
pub struct blksnapu_client {
    client: Client,
    /// Message of the last failure, returned by `blksnap_last_error()`.
    last_error: CString,
    /// Why the connection can no longer be used, after a transport or
    /// protocol failure or an internal error.
    broken: Option<String>,
}

thread_local! {
    /// Message of this thread's last failed `blksnap_connect()` or
    /// `blksnap_session_create()`.
    static CONNECT_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records the message of a failed connect (without ever panicking, even
/// while the thread's storage is being torn down).
pub(crate) fn set_connect_error(message: String) {
    let message = c_message(message);
    let _ = CONNECT_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = message;
        }
    });
}

/// Runs one call of the API named `what` on client `handle` (None: the
/// caller passed NULL, -EINVAL): refuses a broken client, runs `body`
/// [`guarded`], records the failure's message (and, for a fatal one, that
/// the connection is broken) and turns the outcome into 0 or a negative
/// errno value. Every entry point that takes a client returns through it:
///
/// ```text
/// // SAFETY: `c` is NULL or a live client that only this thread uses
/// // (this function's contract).
/// call(unsafe { c.as_mut() }, "blksnap_detach", |client| { ... })
/// ```
pub(crate) fn call(
    handle: Option<&mut blksnapu_client>,
    what: &str,
    body: impl FnOnce(&mut Client) -> Outcome,
) -> c_int {
    let Some(handle) = handle else {
        return -libc::EINVAL;
    };
    let outcome = match &handle.broken {
        Some(reason) => Err(Failure::new(
            libc::ENOTCONN,
            format!("the connection to blksnapd is unusable after an earlier failure ({reason}); disconnect and connect again"),
        )),
        None => guarded(what, || body(&mut handle.client)),
    };
    let Err(failure) = outcome else {
        return 0;
    };
    let message = format!("{what}: {}", failure.message);
    if failure.fatal {
        handle.broken = Some(failure.message);
    }
    handle.last_error = c_message(message);
    -failure.errno
}

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
) -> *mut blksnapu_client {
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
            let handle = Box::new(blksnapu_client {
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
    // SAFETY: `err` is NULL or points to a writable int (the caller's
    // contract).
    if let Ok(Some(err)) = unsafe { opt_out(err, "err") } {
        err.put(code);
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
pub unsafe extern "C" fn blksnap_disconnect(c: *mut blksnapu_client) {
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
/// thread's last failed `blksnap_connect()` or `blksnap_session_create()`.
/// The string belongs to the library: valid until the next call on the same
/// client (or the next `blksnap_connect()` or `blksnap_session_create()` in
/// this thread, for NULL).
///
/// # Safety
/// `c` is NULL or a live pointer from `blksnap_connect()`.
#[no_mangle]
pub unsafe extern "C" fn blksnap_last_error(c: *const blksnapu_client) -> *const c_char {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::blksnap_version;

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
}
