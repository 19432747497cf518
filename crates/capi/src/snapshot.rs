//! The snapshot commands: `blksnap_snapshot_create()`, `_create_ex()` and
//! `_create_flags()`,
//! `_add()`, `_appendstorage()`, `_take()`, `_destroy()`, `_collect()`,
//! `_info()` and `_waitevent()`.
//!
//! Invariants: each function is one `call` on its client: arguments are
//! checked before the request is sent (a snapshot_create that fails here
//! leaves nothing behind in the daemon), and the caller's memory is written
//! only after the reply came; where the reply does not fit (-ERANGE,
//! -EOVERFLOW) what fits is written first. `unsafe` here is only the step
//! from the C pointers to the checked handles of `args`, under each
//! function's `# Safety` contract.
//!
//! Called from C.

use std::ffi::{c_char, c_int};
use std::time::Duration;

use ::blksnap_client::{Event, OnCopyError, SnapshotCreateArgs};
use blksnap_proto::Request;

use crate::args::{
    absolute_path, arg_device, arg_id, arg_slice, arg_str, check_request_size, device_key, opt_out,
    opt_str, out_ptr, put_count, put_field, OutBuf,
};
use crate::connection::{blksnapu_client, call};
use crate::failure::{invalid, Failure};
use crate::types::{
    blksnapu_event, blksnapu_image_info, blksnapu_range, blksnapu_snapshot_options,
    BLKSNAP_EVENT_CBT_RESET, BLKSNAP_EVENT_CORRUPTED, BLKSNAP_EVENT_NONE, BLKSNAP_EVENT_NO_SPACE,
    BLKSNAP_ID_SIZE, BLKSNAP_NAME_MAX, BLKSNAP_ON_COPY_ERROR_BREAK_ORIGIN_WRITE,
    BLKSNAP_ON_COPY_ERROR_DEFAULT, BLKSNAP_ON_COPY_ERROR_KEEP_ORIGIN_WRITES, BLKSNAP_PATH_MAX,
    BLKSNAP_SNAPSHOT_OVERWRITE,
};

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
    c: *mut blksnapu_client,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    limit: u64,
    id_out: *mut u8,
) -> c_int {
    let options = blksnapu_snapshot_options {
        limit,
        on_copy_error: BLKSNAP_ON_COPY_ERROR_DEFAULT,
        copy_timeout_ms: 0,
    };
    // SAFETY: passed on from this function's contract; `options` is a local.
    unsafe {
        create(
            c,
            "blksnap_snapshot_create",
            devices,
            n_devices,
            storage,
            &options,
            0,
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
    c: *mut blksnapu_client,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    options: *const blksnapu_snapshot_options,
    id_out: *mut u8,
) -> c_int {
    // SAFETY: passed on from this function's contract.
    unsafe {
        create(
            c,
            "blksnap_snapshot_create_ex",
            devices,
            n_devices,
            storage,
            options,
            0,
            id_out,
        )
    }
}

/// As `blksnap_snapshot_create_ex()`, with `flags`, an OR of
/// `BLKSNAP_SNAPSHOT_*` (0: as `blksnap_snapshot_create_ex()`).
/// `BLKSNAP_SNAPSHOT_OVERWRITE`: a `storage` that is a regular file with
/// content may be used, its content lost; without it such a file is refused
/// with -EEXIST. Unknown flags: -EINVAL.
///
/// # Safety
/// As `blksnap_snapshot_create_ex()`.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_create_flags(
    c: *mut blksnapu_client,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    options: *const blksnapu_snapshot_options,
    flags: u32,
    id_out: *mut u8,
) -> c_int {
    // SAFETY: passed on from this function's contract.
    unsafe {
        create(
            c,
            "blksnap_snapshot_create_flags",
            devices,
            n_devices,
            storage,
            options,
            flags,
            id_out,
        )
    }
}

/// `blksnap_snapshot_create()`, `_create_ex()` and `_create_flags()`;
/// `what` names the one called.
///
/// # Safety
/// As `blksnap_snapshot_create_ex()`.
// The C function's seven arguments, and which one it is.
#[allow(clippy::too_many_arguments)]
unsafe fn create(
    c: *mut blksnapu_client,
    what: &str,
    devices: *const *const c_char,
    n_devices: usize,
    storage: *const c_char,
    options: *const blksnapu_snapshot_options,
    flags: u32,
    id_out: *mut u8,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, what, |client| {
        if !options.is_aligned() {
            return Err(invalid("options is misaligned"));
        }
        if flags & !BLKSNAP_SNAPSHOT_OVERWRITE != 0 {
            return Err(invalid(format!(
                "flags {flags:#x} has bits none of BLKSNAP_SNAPSHOT_* ({BLKSNAP_SNAPSHOT_OVERWRITE:#x})"
            )));
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
        let options = options.copied().unwrap_or(blksnapu_snapshot_options {
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
        // SAFETY: `id_out` has 16 writable bytes (contract).
        let out = unsafe { OutBuf::new(id_out, BLKSNAP_ID_SIZE, "id_out")? };
        let args = SnapshotCreateArgs {
            storage: storage.map(|s| absolute_path(s, "storage")).transpose()?,
            limit: (options.limit > 0).then_some(options.limit),
            devices: names,
            on_copy_error,
            copy_timeout_ms: (options.copy_timeout_ms > 0).then_some(options.copy_timeout_ms),
            storage_wait_ms: None,
            auto_destroy: false,
            overwrite: flags & BLKSNAP_SNAPSHOT_OVERWRITE != 0,
        };
        check_request_size(Request::SnapshotCreate(args.clone()))?;
        let id = client.snapshot_create(args)?;
        out.fill(id.as_bytes());
        Ok(())
    })
}

/// Adds `device` (name or path) to snapshot `id` (not taken yet). -EBUSY:
/// the device is in another snapshot; -EPERM: the snapshot is taken.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes; `device`
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_add(
    c: *mut blksnapu_client,
    id: *const u8,
    device: *const c_char,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_snapshot_add", |client| {
        // SAFETY: `id` has 16 bytes, `device` is NUL-terminated (contract).
        let (id, device) = unsafe { (arg_id(id, "id")?, arg_device(device)?) };
        Ok(client.snapshot_add(id, &device)?)
    })
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
    c: *mut blksnapu_client,
    id: *const u8,
    device: *const c_char,
    ranges: *const blksnapu_range,
    n: usize,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(
        unsafe { c.as_mut() },
        "blksnap_snapshot_appendstorage",
        |client| {
            // SAFETY: as this function's contract.
            let (id, device, list) = unsafe {
                (
                    arg_id(id, "id")?,
                    arg_str(device, "device")?,
                    arg_slice(ranges, n, "ranges")?,
                )
            };
            let device = absolute_path(device, "device")?;
            let list = crate::args::ranges(list);
            check_request_size(Request::SnapshotAppendstorage(
                blksnap_proto::AppendStorageArgs {
                    id,
                    device: device.clone(),
                    ranges: list.clone(),
                },
            ))?;
            Ok(client.snapshot_append_storage(id, &device, &list)?)
        },
    )
}

/// Takes snapshot `id`: atomically over all its devices. -ENOENT: no such
/// snapshot; -EPERM: already taken; -EINVAL: it has no devices.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_take(c: *mut blksnapu_client, id: *const u8) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_snapshot_take", |client| {
        // SAFETY: `id` has 16 readable bytes (contract).
        let id = unsafe { arg_id(id, "id")? };
        client.snapshot_take(id)?;
        Ok(())
    })
}

/// Destroys snapshot `id`: its images go, its storage is released, change
/// tracking goes on. -ENOENT: no such snapshot.
///
/// # Safety
/// `c` as for every call; `id` readable for 16 bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_snapshot_destroy(c: *mut blksnapu_client, id: *const u8) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(
        unsafe { c.as_mut() },
        "blksnap_snapshot_destroy",
        |client| {
            // SAFETY: `id` has 16 readable bytes (contract).
            let id = unsafe { arg_id(id, "id")? };
            client.snapshot_destroy(id)?;
            Ok(())
        },
    )
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
    c: *mut blksnapu_client,
    ids: *mut [u8; BLKSNAP_ID_SIZE],
    cap: usize,
    count: *mut usize,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(
        unsafe { c.as_mut() },
        "blksnap_snapshot_collect",
        |client| {
            let cap_bytes = cap
                .checked_mul(BLKSNAP_ID_SIZE)
                .ok_or_else(|| invalid(format!("cap {cap} is too large")))?;
            // SAFETY: `ids` has `cap` writable ids, `cap_bytes` bytes, `count` is
            // NULL or writable (contract).
            let (out, count) = unsafe {
                (
                    OutBuf::new(ids.cast(), cap_bytes, "ids")?,
                    opt_out(count, "count")?,
                )
            };
            let list = client.snapshot_collect()?;
            let bytes: Vec<u8> = list.iter().flat_map(|id| *id.as_bytes()).collect();
            out.fill(&bytes);
            let n = list.len();
            put_count(count, n, cap, || format!("{n} snapshots, room for {cap}"))
        },
    )
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
    c: *mut blksnapu_client,
    device: *const c_char,
    id_out: *mut u8,
    out: *mut blksnapu_image_info,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(unsafe { c.as_mut() }, "blksnap_snapshot_info", |client| {
        let id_len = if id_out.is_null() { 0 } else { BLKSNAP_ID_SIZE };
        // SAFETY: `device` NUL-terminated, `id_out` NULL (0 bytes) or
        // writable for 16 bytes, `out` writable (contract).
        let (device, id_buf, out) = unsafe {
            (
                arg_device(device)?,
                OutBuf::new(id_out, id_len, "id_out")?,
                out_ptr(out, "out")?,
            )
        };
        let s = client.snapshot_info_of_device(&device)?;
        let for_device = s.for_device.as_deref().unwrap_or_default();
        let image = s.images.iter().find(|i| i.device == for_device);
        let mut info = blksnapu_image_info {
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
        id_buf.fill(s.id.as_bytes());
        out.put(info);
        if !fits {
            return Err(Failure::new(
                libc::ERANGE,
                format!("the image location of {for_device} is longer than BLKSNAP_PATH_MAX"),
            ));
        }
        Ok(())
    })
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
    c: *mut blksnapu_client,
    id: *const u8,
    timeout_ms: u32,
    out: *mut blksnapu_event,
) -> c_int {
    // SAFETY: `c` is NULL or a live client that only this thread uses
    // (this function's contract).
    call(
        unsafe { c.as_mut() },
        "blksnap_snapshot_waitevent",
        |client| {
            // SAFETY: `id` has 16 readable bytes, `out` is writable (contract).
            let (id, out) = unsafe { (arg_id(id, "id")?, out_ptr(out, "out")?) };
            let timed =
                client.snapshot_wait_event_timed(id, Duration::from_millis(timeout_ms.into()))?;
            let mut e = blksnapu_event {
                r#type: BLKSNAP_EVENT_NONE,
                time_ns: timed.as_ref().map_or(0, |t| t.time),
                requested_sectors: 0,
                errno_value: 0,
                device: [0; BLKSNAP_NAME_MAX],
            };
            match timed.map(|t| t.event) {
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
                Some(Event::CbtReset { device, .. }) => {
                    e.r#type = BLKSNAP_EVENT_CBT_RESET;
                    put_field(&mut e.device, &device);
                }
            }
            out.put(e);
            Ok(())
        },
    )
}
