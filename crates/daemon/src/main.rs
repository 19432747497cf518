//! `blksnapd`: the blksnap daemon. Owns the engine (tracked devices,
//! snapshots), serves the control socket, and stops cleanly on SIGTERM or
//! SIGINT: no new requests, requests in flight finished, origins flushed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use blksnap_daemon::config::DaemonConfig;
use blksnap_daemon::control::{ControlServer, DaemonLock};
use blksnap_daemon::files;
use blksnap_daemon::service::Service;
use blksnap_daemon::state::Persistence;
use blksnap_engine::Engine;
use blksnap_fuse::LocalDevices;
use blksnap_nbd::{check_tcp_exposure, tls_from_options, NbdServer, NbdSettings, NbdTls, TlsMode};
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The blksnap daemon: change tracking and snapshots of block devices.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Options {
    /// Control socket path.
    #[arg(
        long,
        env = "BLKSNAP_CONTROL",
        default_value = "/run/blksnap/control.sock"
    )]
    control: PathBuf,
    /// Directory for the daemon's persistent state: the attached devices and
    /// their change maps, attached again at every start (created 0700).
    #[arg(long, default_value = "/var/lib/blksnap")]
    state_dir: PathBuf,
    /// Configuration file (TOML); every key is optional, unknown keys are an
    /// error. See docs/blksnapd.md.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NBD server Unix socket: every tracked device and snapshot image is an
    /// export there. Default: `nbd.sock` beside the control socket.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this TCP address (ADDR:PORT). Another address than
    /// loopback needs `--nbd-tls require`, or `--nbd-insecure`.
    #[arg(long)]
    nbd_tcp: Option<String>,
    /// TLS for NBD clients on TCP: off, on (offered), or require (nothing
    /// but STARTTLS before TLS). Default: require when a certificate is
    /// given, else off. On the Unix socket TLS is offered, never required.
    #[arg(long, value_name = "MODE")]
    nbd_tls: Option<TlsMode>,
    /// The NBD server's certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_cert: Option<PathBuf>,
    /// The private key of --nbd-tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_key: Option<PathBuf>,
    /// Only NBD clients with a certificate from this CA (PEM) get in.
    #[arg(long, value_name = "PEM")]
    nbd_tls_ca: Option<PathBuf>,
    /// Serve --nbd-tcp on another address than loopback without TLS
    /// required: only on a network where every host is trusted.
    #[arg(long)]
    nbd_insecure: bool,
    /// Mount the FUSE frontend here: one file per tracked device and per
    /// snapshot image (under snapshot/), which loop devices turn into local
    /// block devices. Needs root (or FUSE permissions) and /dev/fuse.
    #[arg(long)]
    fuse_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log that cannot be written (stderr's reader gone, journald
        // restarted) is lost, not fatal: the default reports it with
        // eprintln!, which panics on that same broken stderr, in whatever
        // thread logged: the signal thread then died and SIGTERM no longer
        // stopped the daemon.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLKSNAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let options = Options::parse();
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blksnapd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: Options) -> Result<(), String> {
    let config = match &options.config {
        Some(path) => DaemonConfig::load(path)?,
        None => DaemonConfig::default(),
    };
    let persistence = Arc::new(Persistence::open(
        &options.state_dir,
        config.cbt_persistence,
    )?);
    let engine = Arc::new(Engine::new(config.engine.clone()).map_err(|e| e.to_string())?);
    // Signals are caught from before the sockets exist: a stop asked for
    // during start-up is still a clean stop.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let nbd_tls = nbd_tls(&options, &config)?;
    if let Some(addr) = &options.nbd_tcp {
        let insecure = options.nbd_insecure || config.nbd_tcp_allow_remote;
        check_tcp_exposure(addr, nbd_tls.as_ref(), insecure)?;
    }
    let nbd_tcp = options.nbd_tcp.clone();
    let nbd_socket = options
        .nbd_socket
        .clone()
        .unwrap_or_else(|| options.control.with_file_name("nbd.sock"));
    let control_group = group(&config.control_group, "control group")?;
    let nbd_group = group(
        &config.nbd_socket_group,
        "NBD socket group (nbd_socket_group)",
    )?;
    let (control_dir_group, nbd_dir_group) =
        run_dir_groups(&options.control, control_group, &nbd_socket, nbd_group)?;
    // The lock first, so a second daemon touches none of our sockets or
    // mounts; the control socket last, so a client that can connect finds
    // every frontend ready.
    let lock = DaemonLock::acquire(&options.control, control_dir_group)?;
    // First of all that touches our devices (before leftover loop devices
    // are detached, before the FUSE directory is unmounted): a daemon that
    // died mid-take left its filesystems frozen, and nothing else thaws
    // them. After the lock, so a daemon still running keeps its freezes.
    if let Some(dir) = &options.fuse_dir {
        blksnap_daemon::freeze::thaw_leftovers(dir);
    }
    persistence.start_heartbeat(engine.clone());
    let nbd = NbdServer::with_limits(
        engine.clone(),
        NbdSettings {
            limits: config.nbd_limits(),
            tls: nbd_tls,
        },
    );
    let mut service = Service::new(engine.clone(), Some(nbd_socket.clone()))
        .with_persistence(persistence)
        .with_freeze_timeout(config.freeze_timeout());
    let local = match &options.fuse_dir {
        Some(dir) => {
            // What an earlier daemon on this directory left behind, before
            // our FUSE mount replaces its dead one: its frozen filesystems
            // were thawed above (or their unmount would hang); now its loop
            // devices are detached (the mounted ones only marked to go at
            // their unmount). Before the stale mount is unmounted: while it
            // is still on `dir`, the kernel names their files under `dir`.
            blksnap_fuse::release_leftovers(dir);
            LocalDevices::unmount_stale(dir);
            // Its files are root's only: no group has anything to find.
            files::ensure_dir(dir, None, "FUSE directory")?;
            let local = LocalDevices::mount(engine.clone(), dir)
                .map_err(|e| format!("cannot mount the FUSE frontend on {}: {e}", dir.display()))?;
            // Storage inside our own FUSE files would write into ourselves.
            if let Ok(meta) = std::fs::metadata(dir) {
                use std::os::unix::fs::MetadataExt;
                engine.add_served_identity(blksnap_engine::DeviceIdentity::Block {
                    rdev: meta.dev(),
                });
            }
            service = service.with_local_devices(
                local.clone(),
                config.attach_loop,
                config.freeze_on_take,
            );
            Some(local)
        }
        None if config.attach_loop => {
            return Err("attach_loop = true needs --fuse-dir".into());
        }
        None => None,
    };
    // Every recorded device is back, with its loop device, before a client
    // can reach it over NBD or the control socket.
    service.restore_devices();
    let (nbd_dir, nbd_name) = split_socket_path(&nbd_socket, "NBD socket")?;
    let (listener, file) = files::ensure_dir(nbd_dir, nbd_dir_group, "NBD socket directory")?
        .bind_socket(nbd_name, nbd_group, "NBD socket")?;
    nbd.serve_unix(listener, &nbd_socket, Some(file))
        .map_err(|e| format!("cannot serve NBD on {}: {e}", nbd_socket.display()))?;
    if let Some(addr) = &nbd_tcp {
        nbd.listen_tcp(addr)
            .map_err(|e| format!("cannot serve NBD on {addr}: {e}"))?;
    }
    let service = Arc::new(service);
    let server = ControlServer::bind(
        lock,
        control_group,
        config.control_limits(),
        service.clone(),
    )?;
    let stopper = server.shutdown_handle();
    let stop = stopper.clone();
    service.set_stopper(move || stop.shutdown());
    let watcher = service.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                // No configuration reload yet: a hangup must not kill us.
                tracing::info!("SIGHUP ignored (there is nothing to reload)");
                continue;
            }
            // Decided under claims of every loop device, held until they
            // are released at the stop: none can be mounted meanwhile.
            if let Err(busy) = watcher.claim_for_stop(false) {
                // Dropping a mounted device would fail its filesystem.
                tracing::error!(
                    signal,
                    "not stopping: loop devices in use: {}; unmount them, or run `blksnap shutdown --force`",
                    busy.join(", ")
                );
                continue;
            }
            tracing::info!(signal, "stopping");
            watcher.begin_stop();
            stopper.shutdown();
            break;
        }
    });
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "blksnapd started");
    notify_ready();
    server.serve();
    // Nothing of ours stays frozen once we are gone (begun at the stop
    // request; this waits for thaws, and for freezes still in the kernel).
    service.wait_thawed();
    nbd.shutdown();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while nbd.connection_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Writes sent through a loop device (and, after a forced stop, still
    // held by a filesystem mounted on it) reach their origin before the
    // origins are flushed: flushed after, they would be lost.
    if let Some(local) = &local {
        blksnap_daemon::freeze::sync_filesystems_on(&local.loop_rdevs());
        local.flush_loops();
    }
    // Detaching devices too (a forced stop): what their loop devices wrote
    // reaches their origins before the FUSE mount goes; the loop devices
    // themselves go when their filesystems are unmounted.
    let detaching = local
        .as_ref()
        .map(|l| l.detaching_devices())
        .unwrap_or_default();
    for device in engine.devices().iter().chain(&detaching) {
        if let Err(e) = device.flush() {
            tracing::error!(device = device.name(), error = %e, "flush at stop failed");
        }
    }
    drop(detaching);
    if let Some(local) = local {
        if service.forced_stop() {
            tracing::warn!(busy = ?service.forced_busy(), "forced stop: loop devices detached while in use");
        }
        local.shutdown();
    }
    // Nothing writes any more: the final change maps.
    service.save_all();
    tracing::info!("blksnapd stopped");
    Ok(())
}

/// A group setting as a number.
fn group(setting: &Option<String>, what: &str) -> Result<Option<u32>, String> {
    setting
        .as_deref()
        .map(|g| files::group_id(g, what))
        .transpose()
}

/// A socket path's directory (`.` for a bare name) and file name.
fn split_socket_path<'a>(path: &'a Path, what: &str) -> Result<(&'a Path, &'a str), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{what} {}: no UTF-8 file name", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    Ok((dir.unwrap_or(Path::new(".")), name))
}

/// The groups the directories of the control socket and of the NBD socket
/// get if the daemon creates them: each socket's group, or for a directory
/// they share, the one group set. Two different groups there cannot be:
/// one of them could not reach its socket.
fn run_dir_groups(
    control: &Path,
    control_group: Option<u32>,
    nbd: &Path,
    nbd_group: Option<u32>,
) -> Result<(Option<u32>, Option<u32>), String> {
    let dir = |p: &Path| {
        std::path::absolute(p)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
    };
    if dir(control).is_none() || dir(control) != dir(nbd) {
        return Ok((control_group, nbd_group));
    }
    match (control_group, nbd_group) {
        (Some(c), Some(n)) if c != n => {
            let dir = dir(nbd).unwrap_or_default();
            if std::fs::symlink_metadata(&dir).is_err() {
                return Err(format!(
                    "the control socket and the NBD socket share the directory {}, which the daemon would create for one group, but control_group ({c}) and nbd_socket_group ({n}) differ: create the directory yourself or give the NBD socket another one (--nbd-socket)",
                    dir.display()
                ));
            }
            Ok((Some(c), Some(n)))
        }
        (c, n) => Ok((c.or(n), c.or(n))),
    }
}

/// Tells systemd (`Type=notify`) that the daemon is ready: every recorded
/// device is attached again, with its loop device, and the sockets are
/// open. Units ordered after blksnapd.service (the mounts of filesystems on
/// our loop devices) start only then. Without `$NOTIFY_SOCKET`, nothing.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr));
    if let Err(e) = sent {
        tracing::warn!(socket = ?path, error = %e, "cannot notify systemd of readiness");
    }
}

/// TLS for NBD from the command line, else from the configuration.
fn nbd_tls(options: &Options, config: &DaemonConfig) -> Result<Option<NbdTls>, String> {
    let mode = match (&options.nbd_tls, &config.nbd_tls) {
        (Some(mode), _) => Some(*mode),
        (None, Some(text)) => Some(text.parse().map_err(|e| format!("nbd_tls: {e}"))?),
        (None, None) => None,
    };
    let or_config = |flag: &Option<PathBuf>, key: &Option<PathBuf>| flag.clone().or(key.clone());
    tls_from_options(
        mode,
        or_config(&options.nbd_tls_cert, &config.nbd_tls_cert).as_deref(),
        or_config(&options.nbd_tls_key, &config.nbd_tls_key).as_deref(),
        or_config(&options.nbd_tls_ca, &config.nbd_tls_ca).as_deref(),
    )
}
