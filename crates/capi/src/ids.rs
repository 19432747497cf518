//! The id conversions, which need no client: `blksnap_id_to_string()` and
//! `blksnap_id_from_string()` (16 bytes in RFC 4122 order to and from the
//! 36-character text form the `blksnap` tool prints).
//!
//! Invariants: like every entry point, they never unwind a panic into C
//! (-EIO) and check every pointer first (-EINVAL); having no client, they
//! record no message.
//!
//! Called from C.

use std::ffi::{c_char, c_int};

use uuid::Uuid;

use crate::args::{arg_id, arg_str, OutBuf};
use crate::failure::{guarded, invalid, status};
use crate::types::BLKSNAP_ID_SIZE;

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
    status(guarded("blksnap_id_to_string", || {
        // SAFETY: `id` has 16 readable bytes, `buf` `len` writable bytes
        // (contract).
        let (id, out) = unsafe { (arg_id(id, "id")?, OutBuf::new(buf.cast(), len, "buf")?) };
        out.put_str(&id.hyphenated().to_string(), "an id")
    }))
}

/// Parses the text form of an id (hyphenated, simple, braced or urn form)
/// into `id_out` (16 bytes). -EINVAL when it is not one.
///
/// # Safety
/// `text` NUL-terminated; `id_out` writable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_id_from_string(text: *const c_char, id_out: *mut u8) -> c_int {
    status(guarded("blksnap_id_from_string", || {
        // SAFETY: `text` NUL-terminated (contract).
        let text = unsafe { arg_str(text, "text")? };
        if id_out.is_null() {
            return Err(invalid("id_out is NULL"));
        }
        let id = Uuid::parse_str(text.trim()).map_err(|e| invalid(e.to_string()))?;
        // SAFETY: `id_out` has 16 writable bytes (contract).
        let out = unsafe { OutBuf::new(id_out, BLKSNAP_ID_SIZE, "id_out")? };
        out.fill(id.as_bytes());
        Ok(())
    }))
}
