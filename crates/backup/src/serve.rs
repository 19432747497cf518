//! A backup's devices as read-only NBD exports ([`BackupExports`]): a point
//! in time that `qemu-img convert`, `nbdcopy`, a loop device on `nbdfuse`
//! or a VM can use without restoring it first.
//!
//! Invariants: what a client reads is exactly what `restore` would write:
//! the manifest's regions, every chunk checked against its hash as it is
//! read (a damaged chunk is a read error naming the device's byte range,
//! never wrong data). Nothing is ever written. Decoded regions are kept in
//! a small per-device cache, so that the small sequential reads of a
//! client do not each decompress a 4 MiB region.
//!
//! Callers: `main` (the `serve` command), which holds the repository's
//! shared lock while serving, so that prune cannot remove what is served.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use blksnap_nbd::protocol::MAX_PAYLOAD;
use blksnap_nbd::{Export, ExportError, ExportResult, ExportSource, ZeroFlags};

use crate::repo::{DeviceBackup, Manifest, Repository};

/// Decoded regions kept per device.
const CACHED_REGIONS: usize = 8;

/// Every device of one backup, by its name.
pub struct BackupExports {
    devices: Vec<Arc<DeviceExport>>,
}

impl BackupExports {
    pub fn new(repo: Arc<Repository>, manifest: &Manifest) -> BackupExports {
        let devices = manifest
            .devices
            .iter()
            .map(|d| {
                Arc::new(DeviceExport {
                    repo: repo.clone(),
                    backup: manifest.id.clone(),
                    device: d.clone(),
                    cache: Mutex::new(VecDeque::new()),
                })
            })
            .collect();
        BackupExports { devices }
    }
}

impl ExportSource for BackupExports {
    fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.device.name.clone()).collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.devices
            .iter()
            .find(|d| d.device.name == name)
            .map(|d| d.clone() as Arc<dyn Export>)
    }
}

struct DeviceExport {
    repo: Arc<Repository>,
    backup: String,
    device: DeviceBackup,
    /// Most recently used last.
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

fn read_only() -> ExportError {
    ExportError::new(libc::EPERM, "a backup is served read-only")
}

impl DeviceExport {
    /// Region `i`'s data, from the cache or decoded (and then cached).
    fn region(&self, i: usize) -> ExportResult<Arc<Vec<u8>>> {
        {
            let mut cache = self.cache.lock().unwrap();
            if let Some(k) = cache.iter().position(|(r, _)| *r == i) {
                let hit = cache.remove(k).expect("found");
                let data = hit.1.clone();
                cache.push_back(hit);
                return Ok(data);
            }
        }
        let mut data = Vec::new();
        self.device
            .read_region(&self.repo, i, &mut data)
            .map_err(|e| ExportError::new(libc::EIO, e.to_string()))?;
        let data = Arc::new(data);
        let mut cache = self.cache.lock().unwrap();
        if !cache.iter().any(|(r, _)| *r == i) {
            if cache.len() == CACHED_REGIONS {
                cache.pop_front();
            }
            cache.push_back((i, data.clone()));
        }
        Ok(data)
    }
}

impl Export for DeviceExport {
    fn size(&self) -> u64 {
        self.device.size
    }

    fn description(&self) -> String {
        format!(
            "blksnap-backup {} of {} (read-only)",
            self.backup, self.device.name
        )
    }

    fn preferred_block(&self) -> u32 {
        let region = self.device.chunk_size.min(u64::from(MAX_PAYLOAD)) as u32;
        region.clamp(4096, MAX_PAYLOAD).next_power_of_two()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> ExportResult<()> {
        let cs = self.device.chunk_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let i = (at / cs) as usize;
            let within = (at - i as u64 * cs) as usize;
            let n = (buf.len() - done).min((self.device.region_len(i) as usize) - within);
            let piece = &mut buf[done..done + n];
            if self.device.region_is_hole(i) {
                piece.fill(0);
            } else {
                piece.copy_from_slice(&self.region(i)?[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, _: &[u8], _: u64) -> ExportResult<()> {
        Err(read_only())
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    fn discard(&self, _: u64, _: u64) -> ExportResult<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> ExportResult<()> {
        Err(read_only())
    }

    /// Regions recorded as zeroes are holes; all else is data.
    fn allocation(&self, offset: u64, len: u64) -> ExportResult<Vec<(u64, bool)>> {
        let cs = self.device.chunk_size;
        let end = offset + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let i = (at / cs) as usize;
            let region_end = (i as u64 * cs + self.device.region_len(i)).min(end);
            let zero = self.device.region_is_hole(i);
            match out.last_mut() {
                Some(last) if last.1 == zero => last.0 += region_end - at,
                _ => out.push((region_end - at, zero)),
            }
            at = region_end;
        }
        Ok(out)
    }
}
