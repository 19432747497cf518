//! The session: the opaque handle `blksnapu_session` (the client crate's
//! `Session`, the original library's `ISession`), `blksnap_session_create()`,
//! `blksnap_session_free()` and the accessors `blksnap_session_id()`,
//! `blksnap_session_image()` and `blksnap_session_error()`.
//!
//! Invariants: a handle is made by `Box::into_raw` in
//! `blksnap_session_create()` and freed once, by `blksnap_session_free()`,
//! which destroys the snapshot; the accessors only read (the session is
//! `Sync`: its event thread and its connections are its own), so they may
//! be called from any thread at once. A failed create leaves no snapshot
//! and reports like a failed connect (`blksnap_last_error(NULL)`).
//!
//! Called from C.

use std::ffi::{c_char, c_int, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;

use ::blksnap_client::{Session, SessionStorage};

use crate::args::{arg_slice, arg_str, device_key, opt_out, opt_str, out_ptr, put_field, OutBuf};
use crate::connection::set_connect_error;
use crate::failure::{guarded, invalid, status, Failure, Outcome};
use crate::types::{
    blksnapu_range, blksnapu_session_error, BLKSNAP_ID_SIZE, BLKSNAP_MESSAGE_MAX, BLKSNAP_NAME_MAX,
};

/// A taken snapshot of some devices (opaque): from
/// `blksnap_session_create()`, destroyed and released by
/// `blksnap_session_free()`.
pub struct blksnapu_session {
    session: Session,
}

/// The original library's `ISession::Create(devices, storage, limit)`:
/// connects to blksnapd at `control_path` (NULL: `$BLKSNAP_CONTROL`, else
/// `/run/blksnap/control.sock`), attaches the `n_devices` `devices` (paths;
/// already attached ones are fine; a name must be attached already),
/// creates their snapshot, gives it its difference storage and takes it.
/// The storage: with `n_ranges` 0, `storage` is a regular file (grown as
/// needed), a directory or a block device; else `ranges` are sector ranges
/// of the block device or file `storage`, appended before the take.
/// `limit`: largest size of the storage in bytes, 0 for none. A thread of
/// the session, on a connection of its own, gathers the snapshot's events
/// until `blksnap_session_free()` (see `blksnap_session_error()`).
///
/// Returns the session, or NULL with `*err` (when `err` is not NULL) set to
/// a negative errno value and `blksnap_last_error(NULL)` to its message (per
/// thread); no snapshot is left then (the devices attached stay attached).
/// `*err` is 0 on success. Relative paths are made absolute against the
/// working directory.
///
/// # Safety
/// `control_path` NULL or NUL-terminated; `devices` readable for
/// `n_devices` NUL-terminated strings; `storage` NUL-terminated; `ranges`
/// readable for `n_ranges` elements (may be NULL when `n_ranges` is 0);
/// `err` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_session_create(
    control_path: *const c_char,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    ranges: *const blksnapu_range,
    n_ranges: usize,
    limit: u64,
    err: *mut c_int,
) -> *mut blksnapu_session {
    let outcome = guarded("blksnap_session_create", || -> Outcome<Session> {
        let control = if control_path.is_null() {
            ::blksnap_client::default_control_path()
        } else {
            // SAFETY: non-NULL and NUL-terminated by the caller's contract.
            let bytes = unsafe { CStr::from_ptr(control_path) }.to_bytes();
            PathBuf::from(OsStr::from_bytes(bytes))
        };
        // SAFETY: `devices` has `n_devices` elements, `storage` is
        // NUL-terminated, `ranges` has `n_ranges` elements (contract).
        let (list, storage, ranges) = unsafe {
            (
                arg_slice(devices, n_devices, "devices")?,
                opt_str(storage, "storage")?,
                arg_slice(ranges, n_ranges, "ranges")?,
            )
        };
        let storage = storage.ok_or_else(|| invalid("storage is NULL: a session needs one"))?;
        let mut keys = Vec::with_capacity(list.len());
        for (i, &d) in list.iter().enumerate() {
            // SAFETY: every element is NULL or NUL-terminated (contract).
            keys.push(device_key(unsafe {
                arg_str(d, &format!("devices[{i}]"))?
            })?);
        }
        let storage = if ranges.is_empty() {
            SessionStorage::Path(storage.to_string())
        } else {
            SessionStorage::Ranges {
                device: storage.to_string(),
                ranges: crate::args::ranges(ranges),
            }
        };
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(Session::create(
            &control,
            &keys,
            storage,
            (limit > 0).then_some(limit),
        )?)
    });
    let (result, code) = match outcome {
        Ok(session) => (Box::into_raw(Box::new(blksnapu_session { session })), 0),
        Err(failure) => {
            set_connect_error(format!("blksnap_session_create: {}", failure.message));
            (ptr::null_mut(), -failure.errno)
        }
    };
    // SAFETY: `err` is NULL or points to a writable int (contract).
    if let Ok(Some(err)) = unsafe { opt_out(err, "err") } {
        err.put(code);
    }
    result
}

/// Destroys the session's snapshot (its images go; change tracking goes
/// on and the devices stay attached), stops its event thread and frees the
/// session. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a pointer from `blksnap_session_create()` not yet freed,
/// which no other thread uses any more; it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn blksnap_session_free(s: *mut blksnapu_session) {
    if s.is_null() {
        return;
    }
    // SAFETY: `s` came from `Box::into_raw` in `blksnap_session_create` and
    // is released once, by the caller's contract.
    let handle = unsafe { Box::from_raw(s) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(handle)));
}

/// The id of the session's snapshot into `id_out` (16 bytes).
///
/// # Safety
/// `s` NULL or a live session; `id_out` writable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_session_id(s: *const blksnapu_session, id_out: *mut u8) -> c_int {
    status(guarded("blksnap_session_id", || {
        // SAFETY: `s` is NULL or a live session (contract); only read.
        let s = unsafe { s.as_ref() }.ok_or_else(|| invalid("s is NULL"))?;
        if id_out.is_null() {
            return Err(invalid("id_out is NULL"));
        }
        // SAFETY: `id_out` has 16 writable bytes (contract).
        let out = unsafe { OutBuf::new(id_out, BLKSNAP_ID_SIZE, "id_out")? };
        out.fill(s.session.id().as_bytes());
        Ok(())
    }))
}

/// Where the image of `device` (as given to `blksnap_session_create()`, or
/// its name) is served, NUL-terminated into `buf` of `len` bytes: its local
/// block device when it has one, else its NBD URI
/// (`nbd+unix:///snapshot%2F<name>?socket=...`). -ENOENT: `device` is not
/// in the session; -ENODEV: no frontend serves the image; -ERANGE: `len` is
/// too small.
///
/// # Safety
/// `s` NULL or a live session; `device` NUL-terminated; `buf` writable for
/// `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_session_image(
    s: *const blksnapu_session,
    device: *const c_char,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    status(guarded("blksnap_session_image", || {
        // SAFETY: `s` is NULL or a live session (contract); only read.
        let s = unsafe { s.as_ref() }.ok_or_else(|| invalid("s is NULL"))?;
        // SAFETY: `device` NUL-terminated, `buf` has `len` writable bytes
        // (contract).
        let (device, out) = unsafe {
            (
                arg_str(device, "device")?,
                OutBuf::new(buf.cast(), len, "buf")?,
            )
        };
        let key = device_key(device)?;
        let image = s
            .session
            .image(&key)
            .ok_or_else(|| Failure::new(libc::ENOENT, format!("{device} is not in the session")))?;
        let location = image
            .image
            .as_deref()
            .or(image.nbd.as_deref())
            .ok_or_else(|| {
                Failure::new(
                    libc::ENODEV,
                    format!("no frontend serves the image of {device}"),
                )
            })?;
        out.put_str(location, "the image location")
    }))
}

/// The session's first error (the original's `GetError()`, which this
/// does not consume) into `*out`: returns 1 when there is one, 0 when there
/// is none (`out->errno_value` is then 0), -EINVAL for NULL.
///
/// # Safety
/// `s` NULL or a live session; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_session_error(
    s: *const blksnapu_session,
    out: *mut blksnapu_session_error,
) -> c_int {
    let mut found = false;
    let rc = status(guarded("blksnap_session_error", || {
        // SAFETY: `s` is NULL or a live session (contract); only read.
        let s = unsafe { s.as_ref() }.ok_or_else(|| invalid("s is NULL"))?;
        // SAFETY: `out` is writable (contract).
        let out = unsafe { out_ptr(out, "out")? };
        let mut e = blksnapu_session_error {
            errno_value: 0,
            time_ns: 0,
            device: [0; BLKSNAP_NAME_MAX],
            message: [0; BLKSNAP_MESSAGE_MAX],
        };
        if let Some(error) = s.session.error() {
            found = true;
            // Never 0 for an error.
            e.errno_value = if error.errno > 0 {
                error.errno
            } else {
                libc::EIO
            };
            e.time_ns = error.time;
            put_field(&mut e.device, error.device.as_deref().unwrap_or(""));
            put_field(&mut e.message, &error.message);
        }
        out.put(e);
        Ok(())
    }));
    match rc {
        0 => c_int::from(found),
        rc => rc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_arguments() {
        let mut err = 0;
        // SAFETY: NULL and valid pointers are what is under test.
        unsafe {
            let dir = tempfile::tempdir().unwrap();
            let path =
                std::ffi::CString::new(dir.path().join("s.sock").display().to_string()).unwrap();
            let s = blksnap_session_create(
                path.as_ptr(),
                ptr::null(),
                0,
                ptr::null(),
                ptr::null(),
                0,
                0,
                &mut err,
            );
            assert!(s.is_null());
            assert_eq!(err, -libc::EINVAL);
            let message = CStr::from_ptr(crate::blksnap_last_error(ptr::null()));
            assert!(message.to_str().unwrap().contains("storage"), "{message:?}");
            assert_eq!(
                blksnap_session_id(ptr::null(), ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(
                blksnap_session_error(ptr::null(), ptr::null_mut()),
                -libc::EINVAL
            );
            blksnap_session_free(ptr::null_mut());
        }
    }
}
