//! The commands on the daemon and its tracked devices: `blksnap_version()`,
//! `blksnap_attach()`, `blksnap_detach()`, `blksnap_list()` and change
//! tracking (`blksnapu_cbtinfo()`, `blksnap_readcbtmap()`,
//! `blksnap_markdirtyblock()`).
//!
//! Invariants: each function is one `call` on its client: arguments are
//! checked (in the order of the parameters, mostly) before the request is
//! sent, and the caller's memory is written only after the reply came;
//! where the reply does not fit (-ERANGE, -EOVERFLOW) what fits is written
//! first. `unsafe` here is only the step from the C pointers to the checked
//! handles of `args`, under each function's `# Safety` contract.
//!
//! Called from C.

use std::ffi::{c_char, c_int};

use blksnap_proto::Request;

use crate::args::{
    absolute_path, arg_device, arg_slice, arg_str, check_out, check_request_size, device_key,
    opt_out, opt_str, out_ptr, put_count, put_field, OutBuf,
};
use crate::connection::{blksnapu_client, call};
use crate::failure::invalid;
use crate::types::{
    blksnapu_cbtinfo, blksnapu_device_info, blksnapu_range, BLKSNAP_ID_SIZE, BLKSNAP_NAME_MAX,
    BLKSNAP_PATH_MAX, BLKSNAP_REASON_MAX,
};

/// The daemon's version: its text (NUL-terminated) into `buf` of `len`
/// bytes (-ERANGE when too small), its protocol version into `*protocol`
/// (when not NULL).
///
/// # Safety
/// `c` as for every call (NULL or live, one thread at a time); `buf` is
/// writable for `len` bytes; `protocol` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_version(
    c: *mut blksnapu_client,
    buf: *mut c_char,
    len: usize,
    protocol: *mut u32,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_version", |client| {
        // SAFETY: `buf` has `len` writable bytes, `protocol` is NULL or
        // writable (contract).
        let (out, protocol) = unsafe {
            (
                OutBuf::new(buf.cast(), len, "buf")?,
                opt_out(protocol, "protocol")?,
            )
        };
        let v = client.version()?;
        out.put_str(&v.version, "the version")?;
        if let Some(p) = protocol {
            p.put(v.protocol);
        }
        Ok(())
    })
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
    c: *mut blksnapu_client,
    path: *const c_char,
    name: *const c_char,
    name_out: *mut c_char,
    len: usize,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_attach", |client| {
        // SAFETY: strings as this function's contract.
        let (path, name) = unsafe { (arg_str(path, "path")?, opt_str(name, "name")?) };
        let path = absolute_path(path, "path")?;
        if !name_out.is_null() && len < BLKSNAP_NAME_MAX {
            return Err(invalid(format!(
                "name_out has {len} bytes, fewer than BLKSNAP_NAME_MAX ({BLKSNAP_NAME_MAX})"
            )));
        }
        // SAFETY: `name_out` is NULL or has `len` writable bytes (contract).
        let out = unsafe { OutBuf::new(name_out.cast(), len, "name_out")? };
        let info = client.attach(&path, name)?;
        if !name_out.is_null() {
            out.put_str(&info.name, "the device name")?;
        }
        Ok(())
    })
}

/// As `blksnap_attach()`, but succeeds when `path` is attached already
/// (under `name`, when it is not NULL): `*already` (when not NULL) is then
/// true, else false. The original tool's "Already was attached". One
/// request: the daemon decides, so no attach or detach can slip in between.
/// -EEXIST: `path` is attached under another name than `name`, or `name`
/// is taken by another device.
///
/// # Safety
/// As `blksnap_attach()`; `already` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_attach_idempotent(
    c: *mut blksnapu_client,
    path: *const c_char,
    name: *const c_char,
    name_out: *mut c_char,
    len: usize,
    already: *mut bool,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(
        unsafe { c.as_mut() },
        "blksnap_attach_idempotent",
        |client| {
            // SAFETY: strings and `already` as this function's contract.
            let (path, name, already) = unsafe {
                (
                    arg_str(path, "path")?,
                    opt_str(name, "name")?,
                    opt_out(already, "already")?,
                )
            };
            let path = absolute_path(path, "path")?;
            if !name_out.is_null() && len < BLKSNAP_NAME_MAX {
                return Err(invalid(format!(
                    "name_out has {len} bytes, fewer than BLKSNAP_NAME_MAX ({BLKSNAP_NAME_MAX})"
                )));
            }
            // SAFETY: `name_out` is NULL or has `len` writable bytes (contract).
            let out = unsafe { OutBuf::new(name_out.cast(), len, "name_out")? };
            let info = client.attach_idempotent(&path, name)?;
            if !name_out.is_null() {
                out.put_str(&info.name, "the device name")?;
            }
            if let Some(already) = already {
                already.put(info.already_attached);
            }
            Ok(())
        },
    )
}

/// Stops tracking `device` (name or path). -ENOENT: not tracked; -EBUSY: it
/// is in a snapshot (destroy the snapshot first).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn blksnap_detach(c: *mut blksnapu_client, device: *const c_char) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_detach", |client| {
        // SAFETY: `device` NUL-terminated (contract).
        let device = unsafe { arg_device(device)? };
        Ok(client.detach(&device)?)
    })
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
    c: *mut blksnapu_client,
    out: *mut blksnapu_device_info,
    cap: usize,
    count: *mut usize,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_list", |client| {
        if cap > 0 {
            check_out(out, "out")?;
        }
        // SAFETY: `count` is NULL or writable (contract).
        let count = unsafe { opt_out(count, "count")? };
        let list = client.list()?;
        for (i, d) in list.devices.iter().take(cap).enumerate() {
            let mut info = blksnapu_device_info {
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
        let n = list.devices.len();
        put_count(count, n, cap, || format!("{n} devices, room for {cap}"))
    })
}

/// The change-tracking parameters of `device` (name or path).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn blksnapu_cbtinfo(
    c: *mut blksnapu_client,
    device: *const c_char,
    out: *mut blksnapu_cbtinfo,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnapu_cbtinfo", |client| {
        // SAFETY: `device` NUL-terminated, `out` writable (contract).
        let (device, out) = unsafe { (arg_device(device)?, out_ptr(out, "out")?) };
        let i = client.cbtinfo(&device)?;
        let mut info = blksnapu_cbtinfo {
            block_size: i.block_size,
            device_capacity: i.device_capacity,
            block_count: i.block_count,
            generation_id: i.generation_id.into_bytes(),
            changes_number: i.changes_number,
            current_number: i.current_number,
            generation_reason: [0; BLKSNAP_REASON_MAX],
        };
        put_field(&mut info.generation_reason, &i.generation_reason);
        out.put(info);
        Ok(())
    })
}

/// The readable change map of `device` (one byte per tracking block, the
/// change number of the block's last change; frozen between snapshot takes):
/// up to `len` bytes into `buf`, the full block count into `*block_count`
/// (when not NULL). -EOVERFLOW when the map is longer than `len` (`buf` then
/// holds its first `len` bytes); `buf` may be NULL when `len` is 0, to ask
/// for the count (`blksnapu_cbtinfo()` gives it too).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `buf` writable for `len`
/// bytes; `block_count` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_readcbtmap(
    c: *mut blksnapu_client,
    device: *const c_char,
    buf: *mut u8,
    len: usize,
    block_count: *mut usize,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_readcbtmap", |client| {
        // SAFETY: `device` NUL-terminated, `buf` has `len` writable bytes,
        // `block_count` is NULL or writable (contract).
        let (device, out, block_count) = unsafe {
            (
                arg_device(device)?,
                OutBuf::new(buf, len, "buf")?,
                opt_out(block_count, "block_count")?,
            )
        };
        let map = client.read_cbt_map(&device)?;
        out.fill(&map);
        let n = map.len();
        put_count(block_count, n, len, || {
            format!("the change map of {device} has {n} blocks, the buffer {len} bytes")
        })
    })
}

/// A window of the readable change map of `device` (as
/// `blksnap_readcbtmap()`): the bytes of blocks `offset` to `offset + len`
/// (fewer where the map ends) into `buf`, their number into `*read` and
/// the map's full block count into `*block_count` (each when not NULL).
/// The original's `ReadCbtMap(offset, length, buffer)`. -EINVAL: `offset`
/// is beyond the map (`offset` equal to the block count reads nothing).
///
/// # Safety
/// `c` as for every call; `device` NUL-terminated; `buf` writable for `len`
/// bytes; `read` and `block_count` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn blksnap_readcbtmap_at(
    c: *mut blksnapu_client,
    device: *const c_char,
    offset: u64,
    buf: *mut u8,
    len: usize,
    read: *mut usize,
    block_count: *mut u64,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_readcbtmap_at", |client| {
        // SAFETY: `device` NUL-terminated, `buf` has `len` writable bytes,
        // `read` and `block_count` are NULL or writable (contract).
        let (device, out, read, block_count) = unsafe {
            (
                arg_device(device)?,
                OutBuf::new(buf, len, "buf")?,
                opt_out(read, "read")?,
                opt_out(block_count, "block_count")?,
            )
        };
        let (window, count) = client.read_cbt_map_range(&device, offset, len as u64)?;
        out.fill(&window);
        if let Some(read) = read {
            read.put(window.len());
        }
        if let Some(block_count) = block_count {
            block_count.put(count);
        }
        Ok(())
    })
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
    c: *mut blksnapu_client,
    device: *const c_char,
    ranges: *const blksnapu_range,
    n: usize,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_markdirtyblock", |client| {
        // SAFETY: `device` NUL-terminated, `ranges` has `n` elements
        // (contract).
        let (device, list) =
            unsafe { (arg_str(device, "device")?, arg_slice(ranges, n, "ranges")?) };
        let device = device_key(device)?;
        let list = crate::args::ranges(list);
        check_request_size(Request::Markdirtyblock(blksnap_proto::MarkDirtyArgs {
            device: device.clone(),
            ranges: list.clone(),
        }))?;
        Ok(client.mark_dirty(&device, &list)?)
    })
}
