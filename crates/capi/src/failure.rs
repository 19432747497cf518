//! How a call fails: [`Failure`] (a positive errno value, a message and
//! whether it broke the connection), its conversion from the client crate's
//! errors, panic containment ([`guarded`]) and the C result of an outcome
//! ([`status`]).
//!
//! Invariants: a failure's errno is always positive, so that the value
//! returned to C is negative, never 0; only transport, protocol and internal
//! errors are fatal (the daemon's own refusals are not); no panic leaves
//! [`guarded`].
//!
//! Used by every other module: `args` builds failures for bad arguments,
//! `connection` records them on the client, the command modules return them.

use std::ffi::{c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use ::blksnap_client::Error as ClientError;

/// Why a call failed: a positive errno value and a message.
pub(crate) struct Failure {
    pub(crate) errno: i32,
    pub(crate) message: String,
    /// The connection is no longer usable.
    pub(crate) fatal: bool,
}

pub(crate) type Outcome<T = ()> = Result<T, Failure>;

impl Failure {
    pub(crate) fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
            fatal: false,
        }
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> Failure {
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
pub(crate) fn c_message(message: String) -> CString {
    CString::new(message).unwrap_or_else(|e| {
        let bytes: Vec<u8> = e
            .into_vec()
            .into_iter()
            .map(|b| if b == 0 { b'?' } else { b })
            .collect();
        CString::new(bytes).unwrap_or_default()
    })
}

pub(crate) fn panic_failure(what: &str) -> Failure {
    Failure {
        errno: libc::EIO,
        message: format!("internal error in libblksnap during {what}"),
        fatal: true,
    }
}

/// Runs `body`; a panic in it becomes the internal error of `what` (-EIO,
/// fatal) instead of unwinding into C.
pub(crate) fn guarded<T>(what: &str, body: impl FnOnce() -> Outcome<T>) -> Outcome<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| Err(panic_failure(what)))
}

/// The C result of an outcome: 0, or the failure's negative errno value.
pub(crate) fn status(outcome: Outcome) -> c_int {
    match outcome {
        Ok(()) => 0,
        Err(failure) => -failure.errno,
    }
}
