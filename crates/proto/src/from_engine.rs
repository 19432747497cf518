//! Engine → protocol conversions, in one place: the daemon turns every engine
//! result and error into its wire form through these `From` impls (feature
//! `engine`, which only the daemon enables; clients never link the engine).
//! Results that need the daemon's frontends (loop devices, NBD URIs) are built
//! by the daemon itself.

use blksnap_engine as engine;

use crate::{CbtInfo, ErrorReply, Event, OnCopyError, StorageInfo};

impl From<engine::Error> for ErrorReply {
    fn from(e: engine::Error) -> Self {
        ErrorReply::new(e.errno(), e.to_string())
    }
}

impl From<engine::CbtInfo> for CbtInfo {
    fn from(i: engine::CbtInfo) -> Self {
        Self {
            block_size: i.block_size,
            device_capacity: i.device_capacity,
            block_count: i.block_count,
            generation_id: i.generation_id,
            changes_number: i.changes_number,
            current_number: i.current_number,
            generation_reason: i.generation_reason.to_string(),
        }
    }
}

impl From<engine::Event> for Event {
    fn from(e: engine::Event) -> Self {
        match e {
            engine::Event::NoSpace { requested_sectors } => Event::NoSpace { requested_sectors },
            engine::Event::Corrupted { device, errno } => Event::Corrupted { device, errno },
            engine::Event::CbtReset { device, reason } => Event::CbtReset {
                device,
                reason: reason.to_string(),
            },
        }
    }
}

impl From<engine::StorageStats> for StorageInfo {
    fn from(s: engine::StorageStats) -> Self {
        Self {
            total: s.total,
            used: s.used,
            limit: s.limit,
            extents: s.extents,
        }
    }
}

impl From<OnCopyError> for engine::CopyErrorPolicy {
    fn from(p: OnCopyError) -> Self {
        match p {
            OnCopyError::KeepOriginWrites => engine::CopyErrorPolicy::KeepOriginWrites,
            OnCopyError::BreakOriginWrite => engine::CopyErrorPolicy::BreakOriginWrite,
        }
    }
}
