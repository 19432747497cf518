//! The daemon's configuration file (TOML): the engine's tunables (the keys of
//! [`blksnap_engine::Config`], read by the engine's own serde support, so a
//! new tunable is added in the engine only) plus the daemon's own settings.
//! Unknown keys are an error, so a typo never silently leaves a default in
//! force. Sizes take K/M/G suffixes.

use std::path::Path;

use blksnap_engine::Config;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Every engine tunable of DESIGN.md, under the engine's key names.
    #[serde(flatten)]
    pub engine: Config,
    /// Group (name or number) allowed to use the control socket; without
    /// one the socket is root-only (mode 0600).
    pub control_group: Option<String>,
    /// Control connections open at once from users other than root (root
    /// has as many of its own), and from one such uid.
    pub control_max_connections: usize,
    pub control_max_connections_per_uid: usize,
    /// Longest a control connection may stay idle between requests, in
    /// ms; 0: no limit.
    pub control_idle_timeout_ms: u64,
    /// Group (name or number) allowed to use the NBD Unix socket (mode
    /// 0660); without one it is root-only (mode 0600).
    pub nbd_socket_group: Option<String>,
    /// Allow `--nbd-tcp` on an address other than loopback without TLS
    /// required (as `--nbd-insecure`): only for trusted networks.
    pub nbd_tcp_allow_remote: bool,
    /// TLS for NBD (`off`, `on`, `require`) and its files, as the
    /// `--nbd-tls*` options, which win over these.
    pub nbd_tls: Option<String>,
    pub nbd_tls_cert: Option<std::path::PathBuf>,
    pub nbd_tls_key: Option<std::path::PathBuf>,
    pub nbd_tls_ca: Option<std::path::PathBuf>,
    /// Longest an NBD client may take from connecting to choosing an
    /// export, in ms; 0: no limit.
    pub nbd_handshake_timeout_ms: u64,
    /// Most NBD connections open at once (handshakes included), in all
    /// and from one TCP client address.
    pub nbd_max_connections: usize,
    pub nbd_max_connections_per_client: usize,
    /// Most bytes of NBD write payload read and not yet written, per
    /// connection and over all connections.
    pub nbd_max_queued_write_bytes_per_connection: u64,
    pub nbd_max_queued_write_bytes: u64,
    /// Most NBD worker threads over all connections (each connection's
    /// reader not counted).
    pub nbd_max_worker_threads: usize,
    /// Longest an NBD client may pause inside a request or leave replies
    /// unread, in ms; 0: no limit.
    pub nbd_stall_timeout_ms: u64,
    /// Give every attached device (and its snapshot image) a loop device,
    /// unless the attach request says otherwise. Needs `--fuse-dir`.
    pub attach_loop: bool,
    /// Freeze (FIFREEZE) filesystems mounted on our loop devices around a
    /// snapshot take.
    pub freeze_on_take: bool,
    /// Longest a take keeps filesystems frozen, in ms, counted from its
    /// first FIFREEZE; then they are thawed even if the take goes on.
    /// 0: until the take ends.
    pub freeze_timeout_ms: u64,
    /// How change maps persist, for devices attached without
    /// `--cbt-persistence`: `clean-stop` or `write-ahead`.
    pub cbt_persistence: blksnap_proto::CbtPersistence,
}

/// The default of `freeze_timeout_ms`: far beyond a take (milliseconds),
/// short enough for writers to wait it out.
pub const DEFAULT_FREEZE_TIMEOUT_MS: u64 = 5_000;

/// Keys whose values are sizes: bytes, or a string with a K/M/G suffix.
const SIZE_KEYS: &[&str] = &[
    "diff_storage_minimum",
    "nbd_max_queued_write_bytes_per_connection",
    "nbd_max_queued_write_bytes",
];

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            engine: Config::default(),
            control_group: None,
            control_max_connections: 128,
            control_max_connections_per_uid: 16,
            control_idle_timeout_ms: 60_000,
            nbd_socket_group: None,
            nbd_tcp_allow_remote: false,
            nbd_tls: None,
            nbd_tls_cert: None,
            nbd_tls_key: None,
            nbd_tls_ca: None,
            nbd_handshake_timeout_ms: 10_000,
            nbd_max_connections: 1024,
            nbd_max_connections_per_client: 64,
            nbd_max_queued_write_bytes_per_connection: 64 << 20,
            nbd_max_queued_write_bytes: 1 << 30,
            nbd_max_worker_threads: 256,
            nbd_stall_timeout_ms: 60_000,
            attach_loop: false,
            freeze_on_take: true,
            freeze_timeout_ms: DEFAULT_FREEZE_TIMEOUT_MS,
            cbt_persistence: blksnap_proto::CbtPersistence::CleanStop,
        }
    }
}

impl DaemonConfig {
    /// The control server's limits.
    pub fn control_limits(&self) -> crate::control::ControlLimits {
        crate::control::ControlLimits {
            max_connections: self.control_max_connections,
            max_connections_per_uid: self.control_max_connections_per_uid,
            idle_timeout: (self.control_idle_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.control_idle_timeout_ms)),
        }
    }

    /// The NBD server's limits.
    pub fn nbd_limits(&self) -> blksnap_nbd::NbdLimits {
        blksnap_nbd::NbdLimits {
            handshake_timeout: (self.nbd_handshake_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.nbd_handshake_timeout_ms)),
            max_connections: self.nbd_max_connections,
            max_connections_per_client: self.nbd_max_connections_per_client,
            max_queued_write_bytes_per_connection: self.nbd_max_queued_write_bytes_per_connection,
            max_queued_write_bytes: self.nbd_max_queued_write_bytes,
            max_worker_threads: self.nbd_max_worker_threads,
            stall_timeout: (self.nbd_stall_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.nbd_stall_timeout_ms)),
        }
    }

    /// The freeze deadline, `None` for none.
    pub fn freeze_timeout(&self) -> Option<std::time::Duration> {
        (self.freeze_timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(self.freeze_timeout_ms))
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        // The engine counts bytes; people write "1G".
        for key in SIZE_KEYS {
            if let Some(toml::Value::String(text)) = table.get(*key) {
                let bytes = blksnap_proto::parse_size(text).map_err(|e| format!("{key}: {e}"))?;
                let bytes =
                    i64::try_from(bytes).map_err(|_| format!("{key}: {text} is too large"))?;
                table.insert(key.to_string(), toml::Value::Integer(bytes));
            }
        }
        let config = Self::deserialize(table).map_err(|e| e.to_string())?;
        config.engine.validate().map_err(|e| e.to_string())?;
        if config.control_max_connections == 0 {
            // Root's own pool is this size too: 0 would lock root out.
            return Err("control_max_connections must be at least 1".into());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blksnap_engine::{CopyErrorPolicy, OriginCache};
    use std::time::Duration;

    #[test]
    fn defaults_match_the_engine() {
        let c = DaemonConfig::parse("").unwrap();
        assert_eq!(c.engine, Config::default());
        assert_eq!(c.freeze_timeout(), Some(Duration::from_secs(5)));
        let c = DaemonConfig::parse("freeze_timeout_ms = 0").unwrap();
        assert_eq!(c.freeze_timeout(), None);
    }

    #[test]
    fn sizes_policies_and_unknown_keys() {
        let c = DaemonConfig::parse(
            "diff_storage_minimum = \"256M\"\non_copy_error = \"break-origin-write\"\ncopy_timeout_ms = 500\ncontrol_group = \"disk\"\n",
        )
        .unwrap();
        assert_eq!(c.engine.diff_storage_minimum, 256 << 20);
        assert_eq!(c.engine.copy_timeout, Some(Duration::from_millis(500)));
        assert_eq!(c.engine.on_copy_error, CopyErrorPolicy::BreakOriginWrite);
        assert_eq!(c.engine.origin_cache, OriginCache::Writeback);
        let c = DaemonConfig::parse("origin_cache = \"none\"").unwrap();
        assert_eq!(c.engine.origin_cache, OriginCache::None);
        let err = DaemonConfig::parse("origin_cache = \"direct\"").unwrap_err();
        assert!(
            err.contains("origin_cache") || err.contains("direct"),
            "{err}"
        );
        let err = DaemonConfig::parse("chunk_minimum_shfit = 18").unwrap_err();
        assert!(err.contains("chunk_minimum_shfit"), "{err}");
        let err = DaemonConfig::parse("chunk_minimum_shift = 40").unwrap_err();
        assert!(err.contains("chunk"), "{err}");
        assert!(DaemonConfig::parse("diff_storage_minimum = \"lots\"").is_err());
    }

    #[test]
    fn nbd_tls_and_connection_caps() {
        let c = DaemonConfig::parse(
            "nbd_tls = \"require\"\nnbd_tls_cert = \"/etc/blksnap/c.pem\"\nnbd_tls_key = \"/etc/blksnap/k.pem\"\nnbd_max_connections_per_client = 8\n",
        )
        .unwrap();
        assert_eq!(c.nbd_tls.as_deref(), Some("require"));
        assert_eq!(
            c.nbd_tls_cert.as_deref(),
            Some(Path::new("/etc/blksnap/c.pem"))
        );
        assert_eq!(c.nbd_tls_ca, None);
        assert_eq!(c.nbd_limits().max_connections_per_client, 8);
        assert_eq!(
            DaemonConfig::parse("").unwrap().nbd_limits(),
            blksnap_nbd::NbdLimits::default()
        );
    }

    #[test]
    fn control_limits_and_nbd_socket_group() {
        let c = DaemonConfig::parse("").unwrap();
        assert_eq!(c.control_limits(), crate::control::ControlLimits::default());
        assert_eq!(c.nbd_socket_group, None);
        let c = DaemonConfig::parse(
            "control_max_connections = 4\ncontrol_max_connections_per_uid = 2\ncontrol_idle_timeout_ms = 0\nnbd_socket_group = \"disk\"\n",
        )
        .unwrap();
        let limits = c.control_limits();
        assert_eq!(
            (limits.max_connections, limits.max_connections_per_uid),
            (4, 2)
        );
        assert_eq!(limits.idle_timeout, None);
        assert_eq!(c.nbd_socket_group.as_deref(), Some("disk"));
    }

    #[test]
    fn cbt_persistence_modes() {
        use blksnap_proto::CbtPersistence;
        assert_eq!(
            DaemonConfig::parse("").unwrap().cbt_persistence,
            CbtPersistence::CleanStop
        );
        let c = DaemonConfig::parse("cbt_persistence = \"write-ahead\"").unwrap();
        assert_eq!(c.cbt_persistence, CbtPersistence::WriteAhead);
        let err = DaemonConfig::parse("cbt_persistence = \"sometimes\"").unwrap_err();
        assert!(
            err.contains("sometimes") && err.contains("write-ahead"),
            "{err}"
        );
    }
}
