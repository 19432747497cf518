//! The control service: turns protocol requests into engine calls and engine
//! results into protocol replies. Owns no I/O; the control server
//! ([`crate::control`]) calls [`Service::handle`] for every request, from as
//! many connection threads as there are clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blksnap_engine::{Engine, SectorRange, SnapshotOptions, StorageSpec};
use blksnap_proto as proto;
use proto::{ErrorReply, Request};
use serde::Serialize;
use uuid::Uuid;

/// Longest `snapshot_waitevent` timeout: a day.
const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

pub struct Service {
    engine: Arc<Engine>,
    /// The NBD server's Unix socket, for the URIs in replies.
    nbd_socket: Option<PathBuf>,
}

fn engine_error(e: blksnap_engine::Error) -> ErrorReply {
    ErrorReply::new(e.errno(), e.to_string())
}

fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(22, message)
}

fn json(value: impl Serialize) -> Result<serde_json::Value, ErrorReply> {
    serde_json::to_value(value)
        .map_err(|e| ErrorReply::new(5, format!("cannot encode the reply: {e}")))
}

/// Paths come from clients with another working directory: only absolute
/// ones mean the same thing here.
fn absolute<'a>(path: &'a str, what: &str) -> Result<&'a Path, ErrorReply> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(invalid(format!("{what} path {path:?} must be absolute")))
    }
}

/// A device key is a name or an absolute path: a relative path would be
/// resolved against the daemon's working directory, not the client's.
fn check_device_keys(request: &Request) -> Result<(), ErrorReply> {
    let key = match request {
        Request::Detach(a) | Request::Cbtinfo(a) => Some(&a.device),
        Request::Readcbtmap(a) => Some(&a.device),
        Request::Markdirtyblock(a) => Some(&a.device),
        Request::SnapshotAdd(a) => Some(&a.device),
        Request::SnapshotInfo(a) => a.device.as_ref(),
        _ => None,
    };
    let create_keys = match request {
        Request::SnapshotCreate(a) => a.devices.as_slice(),
        _ => &[],
    };
    for k in key.into_iter().chain(create_keys) {
        if k.contains('/') && !k.starts_with('/') {
            return Err(invalid(format!(
                "device {k:?} must be a name or an absolute path"
            )));
        }
    }
    Ok(())
}

fn ranges(ranges: &[proto::Range]) -> Vec<SectorRange> {
    ranges
        .iter()
        .map(|r| SectorRange::new(r.start, r.count))
        .collect()
}

impl Service {
    pub fn new(engine: Arc<Engine>, nbd_socket: Option<PathBuf>) -> Self {
        Self { engine, nbd_socket }
    }

    fn nbd_uri(&self, export: &str) -> Option<String> {
        self.nbd_socket
            .as_deref()
            .map(|socket| blksnap_nbd::unix_uri(socket, export))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn handle(&self, request: Request) -> Result<serde_json::Value, ErrorReply> {
        check_device_keys(&request)?;
        let e = &self.engine;
        match request {
            Request::Version => json(proto::VersionInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: proto::PROTOCOL_VERSION,
            }),
            Request::Attach(a) => {
                let path = absolute(&a.device, "device")?;
                let device = e
                    .attach_path(path, a.name.as_deref())
                    .map_err(engine_error)?;
                json(self.device_info(device.name())?)
            }
            Request::Detach(a) => {
                e.detach(&a.device).map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::List => {
                let devices = e
                    .devices()
                    .iter()
                    .map(|d| self.device_info(d.name()))
                    .collect::<Result<_, _>>()?;
                let snapshots = e
                    .snapshot_collect()
                    .iter()
                    .filter_map(|id| self.snapshot_info(id).ok())
                    .collect();
                json(proto::ListResult { devices, snapshots })
            }
            Request::Cbtinfo(a) => {
                let i = e.cbt_info(&a.device).map_err(engine_error)?;
                json(proto::CbtInfo {
                    block_size: i.block_size,
                    device_capacity: i.device_capacity,
                    block_count: i.block_count,
                    generation_id: i.generation_id,
                    changes_number: i.changes_number,
                    current_number: i.current_number,
                })
            }
            Request::Readcbtmap(a) => {
                if a.length > proto::MAX_CBT_MAP_READ {
                    return Err(invalid(format!(
                        "readcbtmap length {} is over the maximum of {} blocks per request",
                        a.length,
                        proto::MAX_CBT_MAP_READ
                    )));
                }
                let map = e.read_cbt_map(&a.device).map_err(engine_error)?;
                let count = map.len() as u64;
                if a.offset > count {
                    return Err(invalid(format!(
                        "readcbtmap offset {} is beyond the {count} blocks of {}",
                        a.offset, a.device
                    )));
                }
                let end = a.offset.saturating_add(a.length).min(count);
                json(proto::CbtMapPart::encode(
                    a.offset,
                    count,
                    &map[a.offset as usize..end as usize],
                ))
            }
            Request::Markdirtyblock(a) => {
                e.mark_dirty(&a.device, &ranges(&a.ranges))
                    .map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotCreate(a) => json(proto::SnapshotId {
                id: self.snapshot_create(a)?,
            }),
            Request::SnapshotAdd(a) => {
                e.snapshot_add(&a.id, &a.device).map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotAppendstorage(a) => {
                let path = absolute(&a.device, "storage device")?;
                e.snapshot_append_storage(&a.id, path, &ranges(&a.ranges))
                    .map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotTake(a) => {
                e.snapshot_take(&a.id).map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotDestroy(a) => {
                e.snapshot_destroy(&a.id).map_err(engine_error)?;
                json(proto::Empty {})
            }
            Request::SnapshotCollect => json(proto::SnapshotIds {
                ids: e.snapshot_collect(),
            }),
            Request::SnapshotInfo(a) => {
                let (id, for_device) = match (a.id, a.device) {
                    (Some(id), None) => (id, None),
                    (None, Some(device)) => {
                        let name = e.device(&device).map_err(engine_error)?.name().to_string();
                        let id =
                            e.snapshot_of(&device)
                                .map_err(engine_error)?
                                .ok_or_else(|| {
                                    ErrorReply::new(2, format!("device {name} is in no snapshot"))
                                })?;
                        (id, Some(name))
                    }
                    _ => {
                        return Err(invalid(
                            "snapshot_info takes either a device or a snapshot id",
                        ))
                    }
                };
                let mut info = self.snapshot_info(&id)?;
                info.for_device = for_device;
                json(info)
            }
            Request::SnapshotWaitevent(a) => {
                if a.timeout_ms > MAX_WAIT_MS {
                    return Err(invalid(format!(
                        "timeout {} ms is over the maximum of {MAX_WAIT_MS} ms",
                        a.timeout_ms
                    )));
                }
                let event = e
                    .snapshot_wait_event(&a.id, Duration::from_millis(a.timeout_ms))
                    .map_err(engine_error)?;
                json(proto::WaitEventResult {
                    event: event.map(|ev| match ev {
                        blksnap_engine::Event::NoSpace { requested_sectors } => {
                            proto::Event::NoSpace { requested_sectors }
                        }
                        blksnap_engine::Event::Corrupted { device, errno } => {
                            proto::Event::Corrupted { device, errno }
                        }
                    }),
                })
            }
        }
    }

    fn snapshot_create(&self, a: proto::SnapshotCreateArgs) -> Result<Uuid, ErrorReply> {
        let e = &self.engine;
        let storage = match &a.storage {
            Some(path) => StorageSpec::Path(absolute(path, "difference storage")?.to_path_buf()),
            None => StorageSpec::Empty,
        };
        let options = SnapshotOptions {
            limit: a.limit,
            on_copy_error: a.on_copy_error.map(crate::config::policy),
            copy_timeout: a
                .copy_timeout_ms
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis),
        };
        let id = e.snapshot_create(storage, options).map_err(engine_error)?;
        for device in &a.devices {
            if let Err(err) = e.snapshot_add(&id, device) {
                // All or nothing: a create that names a bad device leaves no
                // half-made snapshot behind.
                let _ = e.snapshot_destroy(&id);
                return Err(engine_error(err));
            }
        }
        Ok(id)
    }

    fn device_info(&self, key: &str) -> Result<proto::DeviceInfo, ErrorReply> {
        let device = self.engine.device(key).map_err(engine_error)?;
        Ok(proto::DeviceInfo {
            name: device.name().to_string(),
            path: device.path().map(|p| p.display().to_string()),
            size: device.size(),
            snapshot: self.engine.snapshot_of(key).map_err(engine_error)?,
            nbd: self.nbd_uri(device.name()),
        })
    }

    fn snapshot_info(&self, id: &Uuid) -> Result<proto::SnapshotInfo, ErrorReply> {
        let i = self.engine.snapshot_info(id).map_err(engine_error)?;
        Ok(proto::SnapshotInfo {
            id: i.id,
            for_device: None,
            devices: i.devices,
            taken: i.taken,
            storage: proto::StorageInfo {
                total: i.storage.total,
                used: i.storage.used,
                limit: i.storage.limit,
                extents: i.storage.extents,
            },
            images: i
                .images
                .into_iter()
                .map(|im| proto::ImageInfo {
                    nbd: self.nbd_uri(&format!("{}{}", blksnap_nbd::IMAGE_PREFIX, im.device)),
                    device: im.device,
                    size: im.size,
                    chunk_size: im.chunk_size,
                    error_code: im.error_code,
                    image: None,
                })
                .collect(),
        })
    }
}
