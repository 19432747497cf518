//! `blksnapd`: the blksnap daemon. Owns the engine (tracked devices,
//! snapshots), serves the control socket, and stops cleanly on SIGTERM or
//! SIGINT: no new requests, requests in flight finished, origins flushed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blksnap_daemon::config::DaemonConfig;
use blksnap_daemon::control::ControlServer;
use blksnap_daemon::service::Service;
use blksnap_engine::Engine;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};

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
    /// Directory for the daemon's persistent state.
    #[arg(long, default_value = "/var/lib/blksnap")]
    state_dir: PathBuf,
    /// Configuration file (TOML); every key is optional, unknown keys are an
    /// error. See docs/blksnapd.md.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
    std::fs::create_dir_all(&options.state_dir).map_err(|e| {
        format!(
            "cannot create state directory {}: {e}",
            options.state_dir.display()
        )
    })?;
    let engine = Arc::new(Engine::new(config.engine_config()).map_err(|e| e.to_string())?);
    let service = Arc::new(Service::new(engine.clone()));
    let server = ControlServer::bind(&options.control, config.control_group.as_deref(), service)?;
    let stopper = server.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            tracing::info!(signal, "stopping");
            stopper.shutdown();
        }
    });
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "blksnapd started");
    server.serve();
    for device in engine.devices() {
        if let Err(e) = device.flush() {
            tracing::error!(device = device.name(), error = %e, "flush at stop failed");
        }
    }
    tracing::info!("blksnapd stopped");
    Ok(())
}
