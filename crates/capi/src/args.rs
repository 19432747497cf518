//! The C arguments of the calls: turning raw pointers into Rust values
//! (strings, ids, arrays, device keys and absolute paths) and the caller's
//! output memory into writable handles ([`Out`], [`OutBuf`]), plus the
//! conversions shared by several requests (ranges, the request size limit).
//!
//! Invariants: nothing is read or written through a NULL or misaligned
//! pointer: every pointer is checked first, and its failure (-EINVAL) names
//! the argument. The `unsafe fn`s here take on the entry point's contract for
//! the pointer they are given (what it points to, for how long); after that,
//! [`Out::put`], [`OutBuf::fill`] and [`OutBuf::put_str`] are safe, so that
//! storing a reply needs no `unsafe` of its own. Strings must be UTF-8;
//! relative paths are made absolute lexically, against this process's
//! working directory.
//!
//! Called by the entry points in `connection`, `device`, `snapshot` and
//! `ids`, inside the body they give to `call` (or `guarded`), so that a bad
//! argument is reported like any other failure.

use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::{self, NonNull};

use ::blksnap_client::Range;
use blksnap_proto::{Request, RequestMessage};
use uuid::Uuid;

use crate::failure::{invalid, Failure, Outcome};
use crate::types::{blksnapu_range, BLKSNAP_ID_SIZE};

/// A required string argument.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that lives through the call.
pub(crate) unsafe fn arg_str<'a>(ptr: *const c_char, what: &str) -> Outcome<&'a str> {
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
pub(crate) unsafe fn opt_str<'a>(ptr: *const c_char, what: &str) -> Outcome<Option<&'a str>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL; the caller guarantees the rest.
    unsafe { arg_str(ptr, what) }.map(Some)
}

/// A path sent to the daemon: relative ones are made absolute against this
/// process's working directory (lexically; the file need not exist).
pub(crate) fn absolute_path(path: &str, what: &str) -> Outcome<String> {
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
pub(crate) fn device_key(device: &str) -> Outcome<String> {
    if device.contains('/') {
        absolute_path(device, "device")
    } else if device.is_empty() {
        Err(invalid("device is empty"))
    } else {
        Ok(device.to_string())
    }
}

/// A required device argument, as a device key ([`device_key`]).
///
/// # Safety
/// As [`arg_str`].
pub(crate) unsafe fn arg_device(ptr: *const c_char) -> Outcome<String> {
    // SAFETY: passed on from the caller.
    device_key(unsafe { arg_str(ptr, "device")? })
}

/// A required 16-byte id argument.
///
/// # Safety
/// `ptr` is NULL or points to 16 readable bytes.
pub(crate) unsafe fn arg_id(ptr: *const u8, what: &str) -> Outcome<Uuid> {
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
pub(crate) unsafe fn arg_slice<'a, T>(ptr: *const T, n: usize, what: &str) -> Outcome<&'a [T]> {
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

/// Caller memory for one output value, checked non-NULL and aligned and
/// vouched writable for the call: made by [`out_ptr`] and [`opt_out`] alone.
pub(crate) struct Out<'a, T> {
    ptr: NonNull<T>,
    _call: PhantomData<&'a mut T>,
}

impl<T> Out<'_, T> {
    /// Stores `value`; what was there is neither read nor dropped (it may be
    /// uninitialized).
    pub(crate) fn put(self, value: T) {
        // SAFETY: non-NULL and aligned (checked by `check_out`), writable and
        // unaliased for the call (the contract of `out_ptr`); `write` reads
        // nothing there, so uninitialized memory is fine.
        unsafe { self.ptr.as_ptr().write(value) }
    }
}

/// Checks a pointer to output memory: non-NULL and aligned.
pub(crate) fn check_out<T>(ptr: *mut T, what: &str) -> Outcome<NonNull<T>> {
    match NonNull::new(ptr) {
        Some(p) if ptr.is_aligned() => Ok(p),
        Some(_) => Err(invalid(format!("{what} is misaligned"))),
        None => Err(invalid(format!("{what} is NULL"))),
    }
}

/// A required pointer to one output value.
///
/// # Safety
/// `ptr` is NULL or writable for a `T` that nothing else accesses while the
/// result lives.
pub(crate) unsafe fn out_ptr<'a, T>(ptr: *mut T, what: &str) -> Outcome<Out<'a, T>> {
    check_out(ptr, what).map(|ptr| Out {
        ptr,
        _call: PhantomData,
    })
}

/// An optional pointer to one output value (NULL: not wanted).
///
/// # Safety
/// As [`out_ptr`].
pub(crate) unsafe fn opt_out<'a, T>(ptr: *mut T, what: &str) -> Outcome<Option<Out<'a, T>>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: passed on from the caller.
        unsafe { out_ptr(ptr, what) }.map(Some)
    }
}

/// Stores the number `n` of items into `count` (when wanted), then fails
/// with -EOVERFLOW and `message` when the caller had room for only `cap`.
pub(crate) fn put_count(
    count: Option<Out<'_, usize>>,
    n: usize,
    cap: usize,
    message: impl FnOnce() -> String,
) -> Outcome {
    if let Some(count) = count {
        count.put(n);
    }
    if n > cap {
        return Err(Failure::new(libc::EOVERFLOW, message()));
    }
    Ok(())
}

/// An output byte buffer of `len` bytes (`ptr` may be NULL when `len` is 0),
/// vouched writable for the call.
pub(crate) struct OutBuf<'a> {
    ptr: *mut u8,
    len: usize,
    _call: PhantomData<&'a mut [u8]>,
}

impl OutBuf<'_> {
    /// # Safety
    /// `ptr` is NULL or has `len` writable bytes that nothing else accesses
    /// while the result lives.
    pub(crate) unsafe fn new(ptr: *mut u8, len: usize, what: &str) -> Outcome<Self> {
        if ptr.is_null() && len > 0 {
            return Err(invalid(format!("{what} is NULL but its length is {len}")));
        }
        Ok(Self {
            ptr,
            len,
            _call: PhantomData,
        })
    }

    /// Copies `bytes` (at most `len` of them) to the start of the buffer.
    pub(crate) fn fill(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.len);
        if n > 0 {
            // SAFETY: `ptr` is non-NULL (len > 0, checked by `new`) with
            // `len >= n` writable bytes (the contract of `new`); `bytes` is
            // Rust memory, distinct from the caller's buffer.
            unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, n) };
        }
    }

    /// Stores `text` and its NUL; -ERANGE when it does not fit.
    pub(crate) fn put_str(&self, text: &str, what: &str) -> Outcome {
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
        self.fill(&bytes);
        Ok(())
    }
}

/// Copies `text` into a fixed C string field, NUL-terminated; false when it
/// was cut short.
pub(crate) fn put_field<const N: usize>(field: &mut [c_char; N], text: &str) -> bool {
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

pub(crate) fn ranges(ranges: &[blksnapu_range]) -> Vec<Range> {
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
pub(crate) fn check_request_size(request: Request) -> Outcome {
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

#[cfg(test)]
mod tests {
    use super::*;

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
