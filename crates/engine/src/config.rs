//! Tunables, with the defaults of DESIGN.md §2. One struct for the engine
//! ([`Config`]) and the per-snapshot overrides ([`SnapshotOptions`]).
//!
//! With the `serde` feature, [`Config`] reads from a configuration file under
//! the key names of docs/blksnapd.md (the daemon embeds it in its own file
//! format, so a new tunable is added here only): every key optional, the
//! copy timeout as `copy_timeout_ms` (0: none), the policy in kebab case.

use std::time::Duration;

use crate::error::{Error, Result};

/// What happens when the copy of a chunk before an origin write fails
/// (difference storage full, I/O error, copy timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum CopyErrorPolicy {
    /// blksnap's rule: the origin write proceeds, the image is marked corrupted.
    #[default]
    KeepOriginWrites,
    /// QEMU's `on-cbw-error=break-guest-write`: the origin write fails, the
    /// image stays valid.
    BreakOriginWrite,
}

/// How origins that are files or block devices are read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum OriginCache {
    /// Through the page cache, like qemu's `cache=writeback`: data read or
    /// written recently is served from memory.
    #[default]
    Writeback,
    /// Direct I/O, like qemu's `cache=none`: no copy of the origin in the
    /// page cache (a loop device over the volume, or the guest, caches it
    /// already). Where the filesystem has no direct I/O, attach fails.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct Config {
    /// Smallest tracking block: 2^16 = 64 KiB.
    pub tracking_block_minimum_shift: u32,
    /// Largest tracking block: 2^26 = 64 MiB.
    pub tracking_block_maximum_shift: u32,
    /// The tracking block doubles while the block count exceeds this.
    pub tracking_block_maximum_count: u64,
    /// Smallest chunk: 2^18 = 256 KiB (or the device's minimum I/O size).
    pub chunk_minimum_shift: u32,
    /// Largest chunk: 2^26 = 64 MiB.
    pub chunk_maximum_shift: u32,
    /// The chunk doubles while the chunk count exceeds this (bounds memory).
    pub chunk_maximum_count: u64,
    /// Growth step of a file-backed difference storage: 1 GiB.
    pub diff_storage_minimum: u64,
    pub on_copy_error: CopyErrorPolicy,
    /// Longest a copy-before-write may take; `None` waits as long as it takes.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "copy_timeout_ms", deserialize_with = "millis_or_none")
    )]
    pub copy_timeout: Option<Duration>,
    /// How long a copy waits for storage to be appended (or to grow) when
    /// the storage is full, after the `no_space` event, before the failure
    /// policy applies; zero does not wait.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "storage_wait_ms", deserialize_with = "millis")
    )]
    pub storage_wait: Duration,
    /// Page cache or direct I/O for origins.
    pub origin_cache: OriginCache,
}

/// A duration in milliseconds.
#[cfg(feature = "serde")]
fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(
        <u64 as serde::Deserialize>::deserialize(d)?,
    ))
}

/// A duration in milliseconds, 0 meaning none.
#[cfg(feature = "serde")]
fn millis_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let ms = <u64 as serde::Deserialize>::deserialize(d)?;
    Ok((ms > 0).then(|| Duration::from_millis(ms)))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tracking_block_minimum_shift: 16,
            tracking_block_maximum_shift: 26,
            tracking_block_maximum_count: 2_097_152,
            chunk_minimum_shift: 18,
            chunk_maximum_shift: 26,
            chunk_maximum_count: 1 << 22,
            diff_storage_minimum: 1 << 30,
            on_copy_error: CopyErrorPolicy::KeepOriginWrites,
            copy_timeout: None,
            storage_wait: Duration::from_secs(5),
            origin_cache: OriginCache::Writeback,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!("config: {what}")))
            }
        };
        check(
            (9..=30).contains(&self.tracking_block_minimum_shift)
                && self.tracking_block_minimum_shift <= self.tracking_block_maximum_shift
                && self.tracking_block_maximum_shift <= 30,
            "tracking block shifts must satisfy 9 <= minimum <= maximum <= 30",
        )?;
        check(
            self.tracking_block_maximum_count > 0,
            "tracking_block_maximum_count must be positive",
        )?;
        check(
            (9..=30).contains(&self.chunk_minimum_shift)
                && self.chunk_minimum_shift <= self.chunk_maximum_shift
                && self.chunk_maximum_shift <= 30,
            "chunk shifts must satisfy 9 <= minimum <= maximum <= 30",
        )?;
        check(
            self.chunk_maximum_count > 0,
            "chunk_maximum_count must be positive",
        )?;
        check(
            self.diff_storage_minimum >= 1 << self.chunk_maximum_shift
                && self.diff_storage_minimum % 512 == 0,
            "diff_storage_minimum must be a multiple of 512 and at least the largest chunk",
        )?;
        Ok(())
    }

    /// Tracking block shift for a device of `capacity` bytes.
    pub fn tracking_block_shift(&self, capacity: u64) -> u32 {
        let mut shift = self.tracking_block_minimum_shift;
        while capacity.div_ceil(1 << shift) > self.tracking_block_maximum_count
            && shift < self.tracking_block_maximum_shift
        {
            shift += 1;
        }
        shift
    }

    /// Chunk shift for a device of `capacity` bytes whose minimum I/O size is
    /// `min_io`.
    pub fn chunk_shift(&self, capacity: u64, min_io: u32) -> u32 {
        let io_shift = min_io.max(1).next_power_of_two().trailing_zeros();
        let mut shift = self
            .chunk_minimum_shift
            .max(io_shift)
            .min(self.chunk_maximum_shift);
        while capacity.div_ceil(1 << shift) > self.chunk_maximum_count
            && shift < self.chunk_maximum_shift
        {
            shift += 1;
        }
        shift
    }
}

/// Per-snapshot settings; `None` takes the engine's [`Config`].
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Largest size the difference storage may grow to, in bytes.
    pub limit: Option<u64>,
    pub on_copy_error: Option<CopyErrorPolicy>,
    pub copy_timeout: Option<Duration>,
    /// Zero: do not wait for storage.
    pub storage_wait: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_block_sizes_follow_design() {
        let c = Config::default();
        assert_eq!(c.tracking_block_shift(128 << 30), 16);
        assert_eq!(c.tracking_block_shift(1 << 40), 19);
        assert_eq!(c.tracking_block_shift((128 << 30) + 1), 17);
        assert_eq!(c.tracking_block_shift(1 << 60), 26);
        assert_eq!(c.tracking_block_shift(4096), 16);
    }

    #[test]
    fn chunk_sizes_follow_design() {
        let c = Config::default();
        assert_eq!(c.chunk_shift(1 << 30, 512), 18);
        assert_eq!(c.chunk_shift(1 << 30, 1 << 20), 20);
        assert_eq!(c.chunk_shift(1 << 40, 4096), 18);
        assert_eq!(c.chunk_shift(4 << 40, 4096), 20);
        assert_eq!(c.chunk_shift(1 << 62, 4096), 26);
    }

    #[test]
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
        let bad = Config {
            chunk_minimum_shift: 27,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }
}
