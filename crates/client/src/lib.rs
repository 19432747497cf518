//! Typed Rust client of the blksnap control protocol (`docs/protocol.md`):
//! one [`Client`] is one connection to `blksnapd`'s control socket; each
//! method sends one request and waits for its reply. [`Session`] is the
//! original library's `ISession`: a taken snapshot of some devices, its
//! events gathered on a thread of its own, destroyed when dropped. Used by
//! the `blksnap` CLI and the C library; speaks the protocol and nothing
//! else.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blksnap_proto::{self as proto, ErrorReply, ReplyMessage, Request, RequestMessage};
use serde::de::DeserializeOwned;
use uuid::Uuid;

mod session;

pub use proto::{
    CbtInfo, DeviceInfo, Event, ImageInfo, ListResult, OnCopyError, Range, SnapshotCreateArgs,
    SnapshotInfo, TakeResult, VersionInfo,
};
pub use session::{Session, SessionError, SessionStorage};

/// An event with the time it happened: CLOCK_MONOTONIC in nanoseconds (the
/// clock of the original's `time_label`), as the daemon stamped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedEvent {
    pub time: i64,
    pub event: Event,
}

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_CONTROL: &str = "/run/blksnap/control.sock";

/// The control socket: `$BLKSNAP_CONTROL`, else [`DEFAULT_CONTROL`].
pub fn default_control_path() -> PathBuf {
    std::env::var_os("BLKSNAP_CONTROL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to blksnapd at {path}: {source} (is the daemon running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to blksnapd lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected reply from blksnapd: {0}")]
    Protocol(String),
    #[error("{0}")]
    Remote(ErrorReply),
}

impl Error {
    /// The errno value of the failure (EIO for transport and protocol errors).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Remote(e) => e.errno,
            Error::Connect { source, .. } | Error::Io(source) => source.raw_os_error().unwrap_or(5),
            Error::Protocol(_) => 71,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest reply line accepted: far above any real reply (a change-map part
/// is at most 512 KiB of base64), small enough that a broken peer cannot
/// exhaust memory.
const MAX_REPLY_BYTES: usize = 16 << 20;

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// Gives up on a reply after `timeout` (None: wait for ever, the
    /// default). `snapshot_wait_event` needs a timeout longer than its own.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.writer.set_read_timeout(timeout)?;
        self.writer.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Sends a request and returns the raw result of its reply.
    pub fn call(&mut self, request: Request) -> Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        let sent = proto::write_message(
            &mut self.writer,
            &RequestMessage {
                id: Some(id),
                request,
            },
        );
        // A daemon that refuses the connection (too many connections, a
        // stop, an idle timeout) replies and closes, so the write can fail
        // with its reason already waiting to be read.
        let line = match sent {
            Ok(()) => proto::read_line(&mut self.reader, MAX_REPLY_BYTES)?,
            Err(e) => match proto::read_line(&mut self.reader, MAX_REPLY_BYTES) {
                Ok(Some(line)) => Some(line),
                _ => return Err(e.into()),
            },
        };
        let line = line.ok_or_else(|| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "blksnapd closed the connection",
            ))
        })?;
        let reply: ReplyMessage =
            serde_json::from_slice(&line).map_err(|e| Error::Protocol(e.to_string()))?;
        // An error reply without an id answers a request the daemon could
        // not read (too large, too many connections): it is ours.
        let anonymous_error = reply.id.is_none() && !reply.ok;
        if reply.id != Some(id) && !anonymous_error {
            return Err(Error::Protocol(format!(
                "reply to request {:?}, expected {id}",
                reply.id
            )));
        }
        match (reply.ok, reply.result, reply.error) {
            (true, Some(result), None) => Ok(result),
            (false, None, Some(error)) => Err(Error::Remote(error)),
            _ => Err(Error::Protocol(
                "a reply must carry either a result or an error".into(),
            )),
        }
    }

    fn typed<T: DeserializeOwned>(&mut self, request: Request) -> Result<T> {
        let value = self.call(request)?;
        serde_json::from_value(value).map_err(|e| Error::Protocol(e.to_string()))
    }

    fn unit(&mut self, request: Request) -> Result<()> {
        self.typed::<proto::Empty>(request).map(|_| ())
    }

    pub fn version(&mut self) -> Result<VersionInfo> {
        self.typed(Request::Version)
    }

    /// Starts tracking a block device or image file (an absolute path).
    pub fn attach(&mut self, device: &str, name: Option<&str>) -> Result<DeviceInfo> {
        self.attach_with_loop(device, name, None)
    }

    /// Like [`Client::attach`]; `loop_device` asks for (or refuses) a loop
    /// device over the device's FUSE file, `None` leaves it to the daemon.
    pub fn attach_with_loop(
        &mut self,
        device: &str,
        name: Option<&str>,
        loop_device: Option<bool>,
    ) -> Result<DeviceInfo> {
        self.attach_with_args(proto::AttachArgs {
            device: device.into(),
            name: name.map(Into::into),
            loop_device,
            cbt_persistence: None,
            exist_ok: false,
        })
    }

    /// Attaches `device` (an absolute path) under `name`, or succeeds when
    /// it is attached already under that name (any name, when `None`):
    /// then the result's `already_attached` is true. One request: the
    /// daemon decides, so a concurrent attach or detach cannot slip between
    /// a refusal and a look-up.
    pub fn attach_idempotent(&mut self, device: &str, name: Option<&str>) -> Result<DeviceInfo> {
        self.attach_with_args(proto::AttachArgs {
            device: device.into(),
            name: name.map(Into::into),
            loop_device: None,
            cbt_persistence: None,
            exist_ok: true,
        })
    }

    /// Attach with every option of the request.
    pub fn attach_with_args(&mut self, args: proto::AttachArgs) -> Result<DeviceInfo> {
        self.typed(Request::Attach(args))
    }

    /// Asks the daemon to stop; refused (EBUSY) while loop devices are in
    /// use, unless `force`.
    pub fn shutdown(&mut self, force: bool) -> Result<()> {
        self.unit(Request::Shutdown(proto::ShutdownArgs { force }))
    }

    pub fn detach(&mut self, device: &str) -> Result<()> {
        self.detach_device(device).map(|_| ())
    }

    /// Detach, with what the daemon says of a loop device still in use.
    pub fn detach_device(&mut self, device: &str) -> Result<proto::DetachResult> {
        self.typed(Request::Detach(proto::DeviceArgs {
            device: device.into(),
        }))
    }

    pub fn list(&mut self) -> Result<ListResult> {
        self.typed(Request::List)
    }

    pub fn cbtinfo(&mut self, device: &str) -> Result<CbtInfo> {
        self.typed(Request::Cbtinfo(proto::DeviceArgs {
            device: device.into(),
        }))
    }

    /// The whole readable change map, one byte per tracking block.
    pub fn read_cbt_map(&mut self, device: &str) -> Result<Vec<u8>> {
        let mut map = Vec::new();
        loop {
            let part: proto::CbtMapPart =
                self.typed(Request::Readcbtmap(proto::ReadCbtMapArgs {
                    device: device.into(),
                    offset: map.len() as u64,
                    length: proto::MAX_CBT_MAP_READ,
                }))?;
            let bytes = part.decode().map_err(Error::Protocol)?;
            if bytes.is_empty() && (map.len() as u64) < part.block_count {
                return Err(Error::Protocol("empty change map part".into()));
            }
            map.extend_from_slice(&bytes);
            if map.len() as u64 >= part.block_count {
                return Ok(map);
            }
        }
    }

    /// A window of the readable change map: up to `length` bytes from
    /// block `offset` (fewer where the map ends), and the map's full block
    /// count. An `offset` beyond the map is EINVAL. The original's
    /// `ReadCbtMap(offset, length, buffer)`.
    pub fn read_cbt_map_range(
        &mut self,
        device: &str,
        offset: u64,
        length: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let mut window = Vec::new();
        loop {
            let want = (length - window.len() as u64).min(proto::MAX_CBT_MAP_READ);
            let part: proto::CbtMapPart =
                self.typed(Request::Readcbtmap(proto::ReadCbtMapArgs {
                    device: device.into(),
                    offset: offset + window.len() as u64,
                    length: want,
                }))?;
            let bytes = part.decode().map_err(Error::Protocol)?;
            if bytes.len() as u64 > want {
                return Err(Error::Protocol(format!(
                    "{} bytes of change map, {want} asked for",
                    bytes.len()
                )));
            }
            window.extend_from_slice(&bytes);
            let at = offset + window.len() as u64;
            if window.len() as u64 == length || at >= part.block_count {
                return Ok((window, part.block_count));
            }
            if bytes.is_empty() {
                return Err(Error::Protocol("empty change map part".into()));
            }
        }
    }

    pub fn mark_dirty(&mut self, device: &str, ranges: &[Range]) -> Result<()> {
        self.unit(Request::Markdirtyblock(proto::MarkDirtyArgs {
            device: device.into(),
            ranges: ranges.to_vec(),
        }))
    }

    pub fn snapshot_create(&mut self, args: SnapshotCreateArgs) -> Result<Uuid> {
        self.typed::<proto::SnapshotId>(Request::SnapshotCreate(args))
            .map(|r| r.id)
    }

    pub fn snapshot_add(&mut self, id: Uuid, device: &str) -> Result<()> {
        self.unit(Request::SnapshotAdd(proto::SnapshotDeviceArgs {
            id,
            device: device.into(),
        }))
    }

    pub fn snapshot_append_storage(
        &mut self,
        id: Uuid,
        device: &str,
        ranges: &[Range],
    ) -> Result<()> {
        self.unit(Request::SnapshotAppendstorage(proto::AppendStorageArgs {
            id,
            device: device.into(),
            ranges: ranges.to_vec(),
        }))
    }

    /// Takes the snapshot; the result names the filesystems frozen around
    /// the take and any warnings.
    pub fn snapshot_take(&mut self, id: Uuid) -> Result<proto::TakeResult> {
        self.typed(Request::SnapshotTake(proto::SnapshotIdArgs { id }))
    }

    /// Destroys the snapshot; the result names the image loop devices that
    /// were in use (mounted), which stay, failing every I/O, until their
    /// last user closes them.
    pub fn snapshot_destroy(&mut self, id: Uuid) -> Result<proto::DestroyResult> {
        self.typed(Request::SnapshotDestroy(proto::SnapshotIdArgs { id }))
    }

    pub fn snapshot_collect(&mut self) -> Result<Vec<Uuid>> {
        self.typed::<proto::SnapshotIds>(Request::SnapshotCollect)
            .map(|r| r.ids)
    }

    /// The snapshot `device` is in.
    pub fn snapshot_info_of_device(&mut self, device: &str) -> Result<SnapshotInfo> {
        self.typed(Request::SnapshotInfo(proto::SnapshotInfoArgs {
            device: Some(device.into()),
            id: None,
        }))
    }

    pub fn snapshot_info(&mut self, id: Uuid) -> Result<SnapshotInfo> {
        self.typed(Request::SnapshotInfo(proto::SnapshotInfoArgs {
            device: None,
            id: Some(id),
        }))
    }

    /// The snapshot's next event; `None` when `timeout` passed without one.
    pub fn snapshot_wait_event(&mut self, id: Uuid, timeout: Duration) -> Result<Option<Event>> {
        Ok(self
            .snapshot_wait_event_timed(id, timeout)?
            .map(|e| e.event))
    }

    /// As [`Client::snapshot_wait_event`], with the time the event happened.
    pub fn snapshot_wait_event_timed(
        &mut self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<Option<TimedEvent>> {
        let reply = self.typed::<proto::WaitEventResult>(Request::SnapshotWaitevent(
            proto::WaitEventArgs {
                id,
                timeout_ms: timeout.as_millis() as u64,
            },
        ))?;
        match (reply.event, reply.time) {
            (None, _) => Ok(None),
            (Some(event), Some(time)) => Ok(Some(TimedEvent { time, event })),
            (Some(_), None) => Err(Error::Protocol(
                "an event without its time (a daemon older than this client?)".into(),
            )),
        }
    }
}
