//! The daemon's configuration file (TOML): every engine tunable of DESIGN.md
//! with its default, plus the daemon's own settings. Unknown keys are an
//! error, so a typo never silently leaves a default in force.

use std::path::Path;
use std::time::Duration;

use blksnap_engine::{Config, CopyErrorPolicy};
use blksnap_proto::OnCopyError;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub tracking_block_minimum_shift: u32,
    pub tracking_block_maximum_shift: u32,
    pub tracking_block_maximum_count: u64,
    pub chunk_minimum_shift: u32,
    pub chunk_maximum_shift: u32,
    pub chunk_maximum_count: u64,
    /// Growth step of file-backed difference storages; bytes, or a string
    /// with a K/M/G suffix.
    #[serde(deserialize_with = "size")]
    pub diff_storage_minimum: u64,
    pub on_copy_error: OnCopyError,
    /// 0: no copy timeout.
    pub copy_timeout_ms: u64,
    /// Group (name or number) allowed to use the control socket; without
    /// one the socket is root-only (mode 0600).
    pub control_group: Option<String>,
    /// Allow `--nbd-tcp` on an address other than loopback. NBD has no
    /// authentication here: only for trusted networks.
    pub nbd_tcp_allow_remote: bool,
    /// Give every attached device (and its snapshot image) a loop device,
    /// unless the attach request says otherwise. Needs `--fuse-dir`.
    pub attach_loop: bool,
    /// Freeze (FIFREEZE) filesystems mounted on our loop devices around a
    /// snapshot take.
    pub freeze_on_take: bool,
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(b) => Ok(b),
        Size::Text(t) => blksnap_proto::parse_size(&t).map_err(serde::de::Error::custom),
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let c = Config::default();
        Self {
            tracking_block_minimum_shift: c.tracking_block_minimum_shift,
            tracking_block_maximum_shift: c.tracking_block_maximum_shift,
            tracking_block_maximum_count: c.tracking_block_maximum_count,
            chunk_minimum_shift: c.chunk_minimum_shift,
            chunk_maximum_shift: c.chunk_maximum_shift,
            chunk_maximum_count: c.chunk_maximum_count,
            diff_storage_minimum: c.diff_storage_minimum,
            on_copy_error: OnCopyError::KeepOriginWrites,
            copy_timeout_ms: 0,
            control_group: None,
            nbd_tcp_allow_remote: false,
            attach_loop: false,
            freeze_on_take: true,
        }
    }
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config
            .engine_config()
            .validate()
            .map_err(|e| e.to_string())?;
        Ok(config)
    }

    pub fn engine_config(&self) -> Config {
        Config {
            tracking_block_minimum_shift: self.tracking_block_minimum_shift,
            tracking_block_maximum_shift: self.tracking_block_maximum_shift,
            tracking_block_maximum_count: self.tracking_block_maximum_count,
            chunk_minimum_shift: self.chunk_minimum_shift,
            chunk_maximum_shift: self.chunk_maximum_shift,
            chunk_maximum_count: self.chunk_maximum_count,
            diff_storage_minimum: self.diff_storage_minimum,
            on_copy_error: policy(self.on_copy_error),
            copy_timeout: (self.copy_timeout_ms > 0)
                .then(|| Duration::from_millis(self.copy_timeout_ms)),
        }
    }
}

pub fn policy(p: OnCopyError) -> CopyErrorPolicy {
    match p {
        OnCopyError::KeepOriginWrites => CopyErrorPolicy::KeepOriginWrites,
        OnCopyError::BreakOriginWrite => CopyErrorPolicy::BreakOriginWrite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_engine() {
        let c = DaemonConfig::parse("").unwrap();
        assert_eq!(c.engine_config(), Config::default());
    }

    #[test]
    fn sizes_policies_and_unknown_keys() {
        let c = DaemonConfig::parse(
            "diff_storage_minimum = \"256M\"\non_copy_error = \"break-origin-write\"\ncopy_timeout_ms = 500\ncontrol_group = \"disk\"\n",
        )
        .unwrap();
        assert_eq!(c.diff_storage_minimum, 256 << 20);
        assert_eq!(
            c.engine_config().copy_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            c.engine_config().on_copy_error,
            CopyErrorPolicy::BreakOriginWrite
        );
        let err = DaemonConfig::parse("chunk_minimum_shfit = 18").unwrap_err();
        assert!(err.contains("chunk_minimum_shfit"), "{err}");
        let err = DaemonConfig::parse("chunk_minimum_shift = 40").unwrap_err();
        assert!(err.contains("chunk"), "{err}");
        assert!(DaemonConfig::parse("diff_storage_minimum = \"lots\"").is_err());
    }
}
