//! The data of the C ABI: the `BLKSNAP_*` constants and the `#[repr(C)]`
//! structures that the functions fill in or read (the opaque
//! `blksnapu_client` lives in `connection`, `blksnapu_session` in
//! `session`).
//!
//! Every type is named `blksnapu_*` ("u" for user space): the kernel's
//! uapi header <linux/blksnap.h> of the original blksnap defines `struct
//! blksnap_cbtinfo`, `blksnap_version`, `blksnap_snapshot_create`, ... with
//! other layouts, and a program of the original may include both headers.
//! One prefix for all our types, not just for today's clashes, so that no
//! later uapi struct can clash either. Functions and constants keep
//! `blksnap_` and `BLKSNAP_`: the uapi header declares no functions, and
//! none of its macros or enumerators is one of our names (tested by
//! tests/uapi_names.c).
//!
//! Invariants: every item here is part of the ABI and appears in blksnap.h
//! as written (names, field order, types, doc comments); changing one is an
//! ABI change. `BLKSNAP_PROTOCOL_VERSION` equals the protocol crate's
//! version and `BLKSNAP_ID_STRING_SIZE` the length of a hyphenated UUID and
//! its NUL (tested below).
//!
//! Used by the command modules (`device`, `snapshot`, `ids`), which convert
//! the client crate's replies into these structures, and by `args`.

use std::ffi::c_char;

/// Bytes of an id (snapshot id, CBT generation id): a UUID.
pub const BLKSNAP_ID_SIZE: usize = 16;
/// Bytes of an id's text form (8-4-4-4-12 hex digits) with its NUL.
pub const BLKSNAP_ID_STRING_SIZE: usize = 37;
/// Size of the buffers for device names: the longest name (255 bytes) and
/// its NUL.
pub const BLKSNAP_NAME_MAX: usize = 256;
/// Size of `blksnapu_cbtinfo.generation_reason`, NUL included.
pub const BLKSNAP_REASON_MAX: usize = 32;
/// Size of the path fields of the structures, NUL included.
pub const BLKSNAP_PATH_MAX: usize = 4096;
/// Bytes of a sector: ranges count 512-byte sectors.
pub const BLKSNAP_SECTOR_SIZE: u64 = 512;
/// The control protocol version this library speaks.
pub const BLKSNAP_PROTOCOL_VERSION: u32 = 1;
/// Size of `blksnapu_session_error.message`, NUL included.
pub const BLKSNAP_MESSAGE_MAX: usize = 512;

/// `blksnapu_event.type`: the timeout passed without an event.
pub const BLKSNAP_EVENT_NONE: i32 = 0;
/// `blksnapu_event.type`: the difference storage needs to grow past its limit
/// (`requested_sectors` more sectors); append storage or expect corruption.
pub const BLKSNAP_EVENT_NO_SPACE: i32 = 1;
/// `blksnapu_event.type`: the image of `device` became invalid
/// (`errno_value` says why).
pub const BLKSNAP_EVENT_CORRUPTED: i32 = 2;
/// `blksnapu_event.type`: the take began a new change-tracking generation of
/// `device` (its reason is `generation_reason` in `blksnap cbtinfo`): back
/// it up in full.
pub const BLKSNAP_EVENT_CBT_RESET: i32 = 3;

/// `blksnapu_snapshot_options.on_copy_error`: the daemon's configured policy.
pub const BLKSNAP_ON_COPY_ERROR_DEFAULT: i32 = 0;
/// The origin write proceeds when its copy fails; the image becomes corrupted.
pub const BLKSNAP_ON_COPY_ERROR_KEEP_ORIGIN_WRITES: i32 = 1;
/// The origin write fails when its copy fails; the image stays valid.
pub const BLKSNAP_ON_COPY_ERROR_BREAK_ORIGIN_WRITE: i32 = 2;

/// `blksnap_snapshot_create_flags()`: a storage that is a regular file with
/// content may be used (its content is lost).
pub const BLKSNAP_SNAPSHOT_OVERWRITE: u32 = 1;

/// A device's change-tracking parameters (`blksnap_cbtinfo()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnapu_cbtinfo {
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
    /// Why the generation began, NUL-terminated: "attached", "restored",
    /// "unclean-stop", "changed-while-detached", "unverifiable", "wrap" or
    /// "record-corrupt". Anything but "restored" means a full backup.
    pub generation_reason: [c_char; BLKSNAP_REASON_MAX],
}

/// A range of 512-byte sectors.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnapu_range {
    /// First sector.
    pub start: u64,
    /// Number of sectors (positive).
    pub count: u64,
}

/// Options of `blksnap_snapshot_create_ex()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnapu_snapshot_options {
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
pub struct blksnapu_device_info {
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
pub struct blksnapu_image_info {
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
pub struct blksnapu_event {
    /// BLKSNAP_EVENT_NONE, _NO_SPACE, _CORRUPTED or _CBT_RESET.
    pub r#type: i32,
    /// When the event happened: CLOCK_MONOTONIC in nanoseconds (the clock
    /// of the original's `time_label`); 0 for BLKSNAP_EVENT_NONE.
    pub time_ns: i64,
    /// NO_SPACE: sectors the storage needed.
    pub requested_sectors: u64,
    /// CORRUPTED: the errno that invalidated the image.
    pub errno_value: i32,
    /// CORRUPTED, CBT_RESET: the device the event is about ("" for
    /// NO_SPACE: the storage is the snapshot's, shared by its devices).
    pub device: [c_char; BLKSNAP_NAME_MAX],
}

/// The first error of a session (`blksnap_session_error()`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blksnapu_session_error {
    /// Why: ENOSPC (the difference storage overflowed), EIO, ETIMEDOUT (a
    /// copy timed out): the image of `device` is invalid; ENOENT: the
    /// snapshot was destroyed by someone else; another errno: the
    /// session's event connection was lost. 0: no error.
    pub errno_value: i32,
    /// When it happened: CLOCK_MONOTONIC in nanoseconds.
    pub time_ns: i64,
    /// The device whose image is invalid; "" when the error is not about
    /// one device.
    pub device: [c_char; BLKSNAP_NAME_MAX],
    /// A message naming the device and the cause, NUL-terminated (cut to
    /// fit).
    pub message: [c_char; BLKSNAP_MESSAGE_MAX],
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn protocol_version_matches() {
        assert_eq!(BLKSNAP_PROTOCOL_VERSION, blksnap_proto::PROTOCOL_VERSION);
        assert_eq!(
            BLKSNAP_ID_STRING_SIZE,
            Uuid::nil().hyphenated().to_string().len() + 1
        );
    }
}
