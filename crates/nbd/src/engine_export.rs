//! The engine as an [`ExportSource`]: every tracked device (read-write,
//! export name = the device name) and every snapshot image
//! (`snapshot/<device>`, read-write into the difference storage, with the
//! change map frozen at the take). Behind the feature `engine`.

use std::sync::Arc;

use blksnap_engine::{Engine, Volume, Zeroing};

use crate::export::{ChangeMap, Export, ExportError, ExportResult, ExportSource, ZeroFlags};
use crate::protocol::MAX_PAYLOAD;

/// Every volume of an engine, by its volume name.
pub struct EngineExports(pub Arc<Engine>);

impl ExportSource for EngineExports {
    fn names(&self) -> Vec<String> {
        self.0.volume_names()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0
            .volume(name)
            .map(|volume| Arc::new(VolumeExport(volume)) as Arc<dyn Export>)
    }
}

struct VolumeExport(Volume);

fn export_error(e: blksnap_engine::Error) -> ExportError {
    tracing::debug!(error = %e, "NBD request failed");
    ExportError::new(e.errno(), e.to_string())
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn description(&self) -> String {
        match &self.0 {
            Volume::Device(d) => format!("blksnap tracked device {}", d.name()),
            Volume::Image(i) => format!("blksnap snapshot image of {}", i.device_name()),
        }
    }

    /// A chunk for images (whole-chunk copies), the device's minimum I/O
    /// size otherwise, rounded up to a power of two (the NBD spec requires
    /// one) and kept within 4 KiB..=`MAX_PAYLOAD`.
    fn preferred_block(&self) -> u32 {
        match &self.0 {
            // MAX_PAYLOAD is a power of two, so clamping first keeps the
            // rounded size within it (and clear of u32 overflow).
            Volume::Device(d) => d.min_io_size().clamp(4096, MAX_PAYLOAD).next_power_of_two(),
            Volume::Image(i) => i.chunk_size().min(MAX_PAYLOAD as u64) as u32,
        }
    }

    /// On devices write-zeroes is a fallocate where the filesystem or
    /// device has one (else the device refuses FAST_ZERO); on images it
    /// writes the storage.
    fn fast_zero(&self) -> bool {
        matches!(self.0, Volume::Device(_))
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> ExportResult<()> {
        self.0.read(buf, offset).map_err(export_error)
    }

    fn write(&self, data: &[u8], offset: u64) -> ExportResult<()> {
        self.0.write(data, offset).map_err(export_error)
    }

    fn flush(&self) -> ExportResult<()> {
        self.0.flush().map_err(export_error)
    }

    fn discard(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.0.discard(offset, len).map_err(export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, how: ZeroFlags) -> ExportResult<()> {
        let how = Zeroing {
            keep_allocated: how.no_hole,
            fast_only: how.fast,
        };
        self.0.zero_range(offset, len, how).map_err(export_error)
    }

    /// Holes of the origin read as zeroes; copied chunks are data.
    fn allocation(&self, offset: u64, len: u64) -> ExportResult<Vec<(u64, bool)>> {
        Ok(self
            .0
            .extents(offset, len)
            .map_err(export_error)?
            .into_iter()
            .map(|e| (e.len, e.zero))
            .collect())
    }

    fn instance(&self) -> Option<u64> {
        match &self.0 {
            Volume::Device(_) => None,
            Volume::Image(image) => Some(image.snapshot_instance()),
        }
    }

    fn change_map(&self) -> Option<ChangeMap> {
        let Volume::Image(image) = &self.0 else {
            return None;
        };
        let tracker = image.change_tracker();
        let info = tracker.info();
        Some(ChangeMap {
            map: Arc::new(tracker.readable_map()),
            block_size: info.block_size as u64,
            changes_number: info.changes_number,
        })
    }
}
