//! The blksnap control protocol, version 1 (specified in `docs/protocol.md`):
//! request and reply messages, their framing (one JSON object per line over a
//! Unix stream socket), the error reply with errno names, and the parsers
//! shared by the CLI and the daemon (sizes with K/M/G suffixes, sector
//! ranges). Used by the daemon and by the client crates; knows nothing of the
//! engine, except for the daemon's conversions behind the `engine` feature
//! (`from_engine.rs`).

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod errno;
#[cfg(feature = "engine")]
mod from_engine;
pub use errno::{errno_from_name, errno_name};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the daemon reads, newline included.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Most bytes of change map one `readcbtmap` request returns.
pub const MAX_CBT_MAP_READ: u64 = 512 << 10;

/// A sector range (512-byte sectors), `S:C` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub start: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceArgs {
    /// The device's name or its origin path.
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachArgs {
    /// Path of the block device or image file to track.
    pub device: String,
    /// Name to give it; default: the path's file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Also create a loop device over the device's FUSE file; absent: the
    /// daemon's `attach_loop` setting.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_device: Option<bool>,
    /// How the device's change maps persist; absent: the daemon's
    /// `cbt_persistence` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_persistence: Option<CbtPersistence>,
    /// Succeed when the path is already attached as asked (under `name`,
    /// if given; with a loop device, if `loop` is true): the reply then
    /// says `already_attached`. The original tool's "Already was attached".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exist_ok: bool,
}

/// How a device's change maps survive the daemon (docs/blksnapd.md,
/// "Persistence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CbtPersistence {
    /// Saved at every clean stop and detach; a crash starts a new
    /// generation (`unclean-stop`).
    #[default]
    CleanStop,
    /// Also every first write to a block under the current change number
    /// is durable before it is acknowledged: a crash keeps the generation.
    WriteAhead,
}

impl CbtPersistence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CleanStop => "clean-stop",
            Self::WriteAhead => "write-ahead",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownArgs {
    /// Stop even when loop devices are in use (mounted): they are flushed
    /// and detached lazily, and their users get I/O errors.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadCbtMapArgs {
    pub device: String,
    /// First block to return.
    #[serde(default)]
    pub offset: u64,
    /// Blocks to return, at most [`MAX_CBT_MAP_READ`].
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkDirtyArgs {
    pub device: String,
    pub ranges: Vec<Range>,
}

/// What to do when the copy before an origin write fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCopyError {
    /// The origin write proceeds; the image becomes corrupted (default).
    KeepOriginWrites,
    /// The origin write fails; the image stays valid.
    BreakOriginWrite,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateArgs {
    /// A regular file, a directory or a block device; absent: sector ranges
    /// are appended later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// Largest size of the difference storage, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Devices to add at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_copy_error: Option<OnCopyError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_timeout_ms: Option<u64>,
    /// How long a copy waits for storage to be appended when the storage is
    /// full (after the `no_space` event); 0: not at all. Absent: the
    /// daemon's `storage_wait_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_wait_ms: Option<u64>,
    /// Destroy the snapshot when the control connection that created it
    /// closes (a backup that dies leaves no snapshot behind).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_destroy: bool,
    /// A `storage` that is a regular file with content may be used (its
    /// content is lost); without it such a file is refused (EEXIST).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotIdArgs {
    pub id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDeviceArgs {
    pub id: Uuid,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendStorageArgs {
    pub id: Uuid,
    /// Block device or file whose sectors are given.
    pub device: String,
    pub ranges: Vec<Range>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfoArgs {
    /// A device of the snapshot (name or path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Or the snapshot's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitEventArgs {
    pub id: Uuid,
    pub timeout_ms: u64,
}

/// Every request of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "command",
    content = "args",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Request {
    Version,
    Shutdown(ShutdownArgs),
    Attach(AttachArgs),
    Detach(DeviceArgs),
    List,
    Cbtinfo(DeviceArgs),
    Readcbtmap(ReadCbtMapArgs),
    Markdirtyblock(MarkDirtyArgs),
    SnapshotCreate(SnapshotCreateArgs),
    SnapshotAdd(SnapshotDeviceArgs),
    SnapshotAppendstorage(AppendStorageArgs),
    SnapshotTake(SnapshotIdArgs),
    SnapshotDestroy(SnapshotIdArgs),
    SnapshotCollect,
    SnapshotInfo(SnapshotInfoArgs),
    SnapshotWaitevent(WaitEventArgs),
}

/// A request on the wire: the request plus an optional id the reply echoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(flatten)]
    pub request: Request,
}

impl RequestMessage {
    /// Parses a request line strictly: only `id`, `command` and `args` at
    /// the top level; `"args": {}` is accepted for commands without
    /// arguments.
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(line).map_err(|e| e.to_string())?;
        if let Some(key) = object
            .keys()
            .find(|k| !["id", "command", "args"].contains(&k.as_str()))
        {
            return Err(format!(
                "unknown field `{key}`, expected `id`, `command` or `args`"
            ));
        }
        let command = object
            .get("command")
            .and_then(|c| c.as_str())
            .unwrap_or_default();
        let unit = ["version", "list", "snapshot_collect"].contains(&command);
        if unit
            && object
                .get("args")
                .is_some_and(|a| a.as_object().is_some_and(|o| o.is_empty()))
        {
            object.remove("args");
        }
        serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| e.to_string())
    }
}

/// Why a request failed: an errno value, its name, and a message naming the
/// device, range or limit involved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub errno: i32,
    pub name: String,
    pub message: String,
}

impl ErrorReply {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            name: errno_name(errno).to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.name)
    }
}

/// A reply on the wire: `ok` with the command's result, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReply>,
}

// ---- results ----

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub protocol: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub size: u64,
    /// The snapshot the device is in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Uuid>,
    /// The NBD URI of the device's export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    /// The loop device serving it locally, if any.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_device: Option<String>,
    /// In an `attach` reply with `exist_ok`: the device was attached
    /// already, nothing was done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub already_attached: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtInfo {
    pub block_size: u32,
    pub device_capacity: u64,
    pub block_count: u64,
    pub generation_id: Uuid,
    pub changes_number: u8,
    pub current_number: u8,
    /// Why the generation began: `attached`, `restored`, `unclean-stop`,
    /// `changed-while-detached`, `unverifiable`, `wrap`, `record-corrupt`.
    #[serde(default)]
    pub generation_reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtMapPart {
    pub offset: u64,
    pub block_count: u64,
    /// The map bytes from `offset`, base64 (standard alphabet, padded).
    pub data: String,
}

impl CbtMapPart {
    pub fn encode(offset: u64, block_count: u64, bytes: &[u8]) -> Self {
        use base64::Engine as _;
        Self {
            offset,
            block_count,
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    pub fn decode(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| format!("bad change map data: {e}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotId {
    pub id: Uuid,
}

/// What a take did around the engine's take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeResult {
    /// Filesystems frozen (FIFREEZE) during the take.
    #[serde(default)]
    pub frozen: Vec<String>,
    /// Problems that did not stop the take (a filesystem that could not be
    /// frozen, an image loop device that could not be made).
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIds {
    pub ids: Vec<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageInfo {
    pub total: u64,
    pub used: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    pub extents: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub device: String,
    pub size: u64,
    pub chunk_size: u64,
    /// 0 while the image is valid, else the errno that invalidated it.
    pub error_code: i32,
    /// The local block device serving the image, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The NBD URI of the image's export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: Uuid,
    /// When asked by device: that device's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_device: Option<String>,
    pub devices: Vec<String>,
    pub taken: bool,
    pub storage: StorageInfo,
    pub images: Vec<ImageInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResult {
    pub devices: Vec<DeviceInfo>,
    pub snapshots: Vec<SnapshotInfo>,
    /// Devices recorded in the state dir that could not be attached again
    /// at start; each stays recorded until it is detached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingDevice>,
    /// Devices detached while their loop device was in use: no longer
    /// tracked, their loop device still serves them, untracked, until its
    /// last user closes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detaching: Vec<DetachingDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachingDevice {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The loop device that still serves it.
    #[serde(rename = "loop")]
    pub loop_device: String,
}

/// The result of `detach`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachResult {
    /// The device's loop device, when it was in use: it stays, untracked,
    /// until its last user closes it (the device is listed as detaching
    /// until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detaching: Option<String>,
}

/// The result of `snapshot_destroy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyResult {
    /// Image loop devices that were in use (mounted) at the destroy: each
    /// stays until its last user closes it, and I/O on it fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images_in_use: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingDevice {
    pub name: String,
    pub path: String,
    /// Why it was not attached (path gone, identity changed, ...).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    NoSpace {
        requested_sectors: u64,
    },
    Corrupted {
        device: String,
        errno: i32,
    },
    /// This take began a new change-tracking generation of `device`
    /// (`reason` as in `generation_reason`): back it up in full.
    CbtReset {
        device: String,
        reason: String,
    },
}

impl Event {
    /// The device the event is about; `None` for `no_space`, which is
    /// about the snapshot's difference storage, shared by its devices.
    pub fn device(&self) -> Option<&str> {
        match self {
            Event::NoSpace { .. } => None,
            Event::Corrupted { device, .. } | Event::CbtReset { device, .. } => Some(device),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitEventResult {
    /// None when the timeout passed without an event.
    pub event: Option<Event>,
    /// When the event happened (was queued): CLOCK_MONOTONIC in
    /// nanoseconds, the clock of the original's `time_label`. Absent
    /// without an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

// ---- framing ----

/// Reads one line of at most `max` bytes (newline included). `Ok(None)` at
/// a clean end of stream. A longer line is consumed up to its newline and
/// reported as `InvalidData`, so the stream stays in step.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if line.is_empty() && !too_long {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended inside a message",
            ));
        }
        let (part, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = part.len();
        if !too_long {
            if line.len() + n > max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(part);
            }
        }
        reader.consume(n);
        if done {
            if too_long {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("message longer than {max} bytes"),
                ));
            }
            line.pop();
            return Ok(Some(line));
        }
    }
}

/// Writes one message as a JSON line.
pub fn write_message(writer: &mut impl Write, message: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()
}

// ---- command-line value parsers ----

/// Parses a size in bytes with an optional binary suffix: `4096`, `512K`,
/// `100M`, `2G`, `1T` (also `KiB`, `MiB`, ... and lower case).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let bad =
        || format!("invalid size {text:?}: expected a number with an optional K, M, G or T suffix");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Parses a sector range `START:COUNT` (512-byte sectors, COUNT > 0).
pub fn parse_range(text: &str) -> Result<Range, String> {
    let bad = || format!("invalid sector range {text:?}: expected START:COUNT in 512-byte sectors");
    let (start, count) = text.split_once(':').ok_or_else(bad)?;
    let range = Range {
        start: start.trim().parse().map_err(|_| bad())?,
        count: count.trim().parse().map_err(|_| bad())?,
    };
    if range.count == 0 {
        return Err(format!(
            "invalid sector range {text:?}: COUNT must be positive"
        ));
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("100m"), Ok(100 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "G",
            "1X",
            "-1",
            "1.5G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0:8"), Ok(Range { start: 0, count: 8 }));
        for bad in ["0", "0:0", "a:1", "1:b", ":"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_wire_format() {
        let m = RequestMessage {
            id: Some(7),
            request: Request::SnapshotTake(SnapshotIdArgs { id: Uuid::nil() }),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"id":7,"command":"snapshot_take","args":{"id":"00000000-0000-0000-0000-000000000000"}}"#
        );
        assert_eq!(serde_json::from_str::<RequestMessage>(&text).unwrap(), m);
        let v: RequestMessage = serde_json::from_str(r#"{"command":"version"}"#).unwrap();
        assert_eq!(v.request, Request::Version);
        assert!(serde_json::from_str::<RequestMessage>(
            r#"{"command":"attach","args":{"device":"x","bogus":1}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<RequestMessage>(r#"{"command":"nope"}"#).is_err());
        assert!(RequestMessage::parse(br#"{"ID":1,"command":"version"}"#)
            .unwrap_err()
            .contains("ID"));
        assert_eq!(
            RequestMessage::parse(br#"{"command":"list","args":{}}"#)
                .unwrap()
                .request,
            Request::List
        );
        assert!(RequestMessage::parse(br#"{"command":"detach","args":{}}"#).is_err());
    }

    #[test]
    fn framing_skips_oversized_lines() {
        let data = format!("{}\nshort\n", "x".repeat(100));
        let mut reader = io::BufReader::with_capacity(16, data.as_bytes());
        let err = read_line(&mut reader, 50).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(read_line(&mut reader, 50).unwrap(), Some(b"short".to_vec()));
        assert_eq!(read_line(&mut reader, 50).unwrap(), None);
    }
}
