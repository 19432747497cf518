//! libblksnap: the C library of blksnapd, the blksnap daemon (user-space
//! snapshots and change-block tracking of block devices and image files).
//!
//! One `struct blksnapu_client` is one connection to the daemon's control
//! socket; each function sends one request (readcbtmap: a few) and waits for
//! its reply. The functions follow the commands of the `blksnap` tool:
//! version, attach, detach, list, cbtinfo, readcbtmap, markdirtyblock and
//! snapshot_create, _add, _appendstorage, _take, _destroy, _collect, _info,
//! _waitevent. `blksnap_attach_idempotent()` is the tool's attach that says
//! "Already was attached"; `blksnap_readcbtmap_at()` reads a window of the
//! change map.
//!
//! Sessions: one `struct blksnapu_session` is the original library's
//! `ISession`: `blksnap_session_create()` attaches the devices, creates
//! their snapshot, gives it its storage and takes it in one call; a thread
//! of the session gathers its events (`blksnap_session_error()` gives the
//! first corruption or loss); `blksnap_session_free()` destroys it.
//!
//! Names: every type is `struct blksnapu_*`, so that this header and the
//! kernel's <linux/blksnap.h> of the original blksnap (which defines
//! `struct blksnap_cbtinfo`, `struct blksnap_version`, ... of other
//! layouts) can be included together; functions are `blksnap_*`, constants
//! `BLKSNAP_*`, none of them a name of that header.
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
//! `blksnap_snapshot_waitevent()` holds its client until it returns). A
//! session's functions may be called from any thread at once (it holds
//! connections of its own), except `blksnap_session_free()`.
//!
//! Build: `pkg-config --cflags --libs blksnap` (`-lblksnap`).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// The C names of the types are part of the ABI.
#![allow(non_camel_case_types)]

// The modules, in the order cbindgen reads them and blksnap.h lists their
// functions: keep it (blank lines keep rustfmt from sorting them).

// The BLKSNAP_* constants and the #[repr(C)] structures.
mod types;

// Failure (errno and message), panic containment.
mod failure;

// C arguments to Rust values, caller memory to writable handles.
mod args;

// The client handle; connect, disconnect, last_error; `call`.
mod connection;

// version, attach, detach, list and the change-tracking commands.
mod device;

// The snapshot_* commands.
mod snapshot;

// Ids to and from text.
mod ids;

// The session: snapshot create, storage, take and events in one handle.
mod session;

pub use connection::*;
pub use device::*;
pub use ids::*;
pub use session::*;
pub use snapshot::*;
pub use types::*;

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, CStr};
    use std::ptr;

    use super::*;

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
}
