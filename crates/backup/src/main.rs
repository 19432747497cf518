//! `blksnap-backup`: consistent full and incremental backups of devices
//! tracked by blksnapd into a content-addressed repository, and `list`,
//! `verify`, `restore`, `serve` and `prune`. A client of the daemon: the control protocol
//! for snapshots and change maps, NBD for the image data. See
//! docs/backup.md.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blksnap_backup::create::{self, ImageSource, Tracking};
use blksnap_backup::repo::{Manifest, Repository, FORMAT};
use blksnap_backup::restore;
use blksnap_backup::serve::BackupExports;
use blksnap_client::Client;
use blksnap_nbd::client::{NbdAddress, NbdClient};
use blksnap_nbd::{
    check_tcp_exposure, tls_from_options, unix_uri, NbdServer, NbdSettings, NbdTlsClient, TlsMode,
};
use blksnap_proto::SnapshotCreateArgs;
use clap::{Parser, Subcommand};
use serde_json::json;

/// Full and incremental backups of blksnapd's tracked devices, verify and
/// restore.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Options {
    /// The repository (a directory; created by the first backup).
    #[arg(long, global = true, env = "BLKSNAP_REPO")]
    repo: Option<PathBuf>,
    /// blksnapd's control socket.
    #[arg(
        long,
        global = true,
        env = "BLKSNAP_CONTROL",
        default_value = "/run/blksnap/control.sock"
    )]
    control: PathBuf,
    /// One JSON object per line (progress, then the result) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Back up devices from one snapshot of all of them: incremental where
    /// the change map allows it, else full.
    Create {
        /// A tracked device (name or path); several for one consistent
        /// backup of all.
        #[arg(long = "device", required = true, num_args = 1..)]
        devices: Vec<String>,
        /// Where the snapshot's difference storage goes (a directory or
        /// file, absolute). Default: the repository's tmp/.
        #[arg(long)]
        storage: Option<PathBuf>,
        /// Largest size of the difference storage (K/M/G suffixes).
        #[arg(long)]
        limit: Option<String>,
        /// Read the images over NBD on TCP at HOST:PORT (blksnapd
        /// --nbd-tcp) instead of the daemon's Unix socket, e.g. from
        /// another host (with the control socket forwarded).
        #[arg(long, value_name = "HOST:PORT")]
        nbd_tcp: Option<String>,
        /// Read the images over TLS (for a blksnapd with --nbd-tls), with
        /// the credentials in DIR: ca-cert.pem (the CA of the daemon's
        /// certificate), and client-cert.pem with client-key.pem when the
        /// daemon checks clients (the layout of qemu's tls-creds-x509).
        #[arg(long, value_name = "DIR")]
        nbd_tls_certificates: Option<PathBuf>,
        /// NBD connections per device.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=16))]
        connections: u8,
    },
    /// The backups in the repository, oldest first.
    List,
    /// Re-read and check every chunk of a backup (default: of all).
    Verify {
        #[arg(long)]
        id: Option<String>,
    },
    /// Keep the newest N backups; remove the others and every chunk only
    /// they used (refused while a backup runs).
    Prune {
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        keep_last: u64,
    },
    /// Restore one device of a backup to a new file or an unused block
    /// device.
    Restore {
        #[arg(long)]
        id: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        to: PathBuf,
    },
    /// Serve every device of a backup as a read-only NBD export (the
    /// export name is the device's name) until SIGINT or SIGTERM.
    Serve {
        #[arg(long)]
        id: String,
        /// The Unix socket to listen on (replaced if stale).
        #[arg(long, required_unless_present = "nbd_tcp")]
        nbd_socket: Option<PathBuf>,
        /// A TCP address to listen on as well, HOST:PORT (port 0: any).
        /// Another address than loopback needs `--nbd-tls require`, or
        /// `--nbd-insecure`.
        #[arg(long, value_name = "HOST:PORT")]
        nbd_tcp: Option<String>,
        #[command(flatten)]
        tls: TlsOptions,
    },
}

/// TLS of `serve`, as blksnapd's NBD options.
#[derive(clap::Args, Debug)]
struct TlsOptions {
    /// TLS for clients on TCP: off, on (offered), or require (nothing but
    /// STARTTLS before TLS). Default: require when a certificate is given,
    /// else off. On the Unix socket TLS is offered, never required.
    #[arg(long, value_name = "MODE")]
    nbd_tls: Option<TlsMode>,
    /// The server's certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_cert: Option<PathBuf>,
    /// The private key of --nbd-tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_key: Option<PathBuf>,
    /// Only clients with a certificate from this CA (PEM) get in.
    #[arg(long, value_name = "PEM")]
    nbd_tls_ca: Option<PathBuf>,
    /// Serve --nbd-tcp on another address than loopback without TLS
    /// required: only on a network where every host is trusted.
    #[arg(long)]
    nbd_insecure: bool,
}

/// A failure: its message, and whether the command already printed its
/// JSON result (which then carries the error).
struct Failure {
    message: String,
    printed: bool,
}

fn fail(message: String) -> Failure {
    Failure {
        message,
        printed: false,
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        fail(e.to_string())
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { message, printed }) => {
            if printed {
            } else if options.json {
                println!("{}", json!({"ok": false, "error": message}));
            } else {
                eprintln!("blksnap-backup: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(o: &Options) -> Result<(), Failure> {
    let repo_path = o
        .repo
        .as_deref()
        .ok_or_else(|| fail("no repository: give --repo DIR or set BLKSNAP_REPO".into()))?;
    match &o.command {
        Command::Create {
            devices,
            storage,
            limit,
            nbd_tcp,
            nbd_tls_certificates,
            connections,
        } => create(
            o,
            repo_path,
            devices,
            storage.as_deref(),
            limit.as_deref(),
            ImageReach::from_options(
                nbd_tcp.as_deref(),
                nbd_tls_certificates.as_deref(),
                *connections,
            )?,
        ),
        Command::List => list(o, &Repository::open(repo_path, false)?),
        Command::Prune { keep_last } => {
            let stats = Repository::open(repo_path, false)?.prune(*keep_last as usize)?;
            if o.json {
                println!("{}", json!({"ok": true, "stats": stats}));
            } else {
                println!(
                    "removed {} backups and {} chunks ({} bytes)",
                    stats.backups_removed, stats.chunks_removed, stats.bytes_freed
                );
            }
            Ok(())
        }
        Command::Verify { id } => verify(o, &Repository::open(repo_path, false)?, id.as_deref()),
        Command::Serve {
            id,
            nbd_socket,
            nbd_tcp,
            tls,
        } => serve(
            o,
            Repository::open(repo_path, false)?,
            id,
            nbd_socket.as_deref(),
            nbd_tcp.as_deref(),
            tls,
        ),
        Command::Restore { id, device, to } => {
            let repo = Repository::open(repo_path, false)?;
            let manifest = repo.manifest(id)?;
            let d = manifest
                .devices
                .iter()
                .find(|d| &d.name == device)
                .ok_or_else(|| {
                    fail(format!(
                        "backup {id} has no device {device} (it has {})",
                        names(&manifest)
                    ))
                })?;
            let started = Instant::now();
            let written = restore::restore(&repo, d, to, restore::THREADS)?;
            let seconds = started.elapsed().as_secs_f64();
            if o.json {
                println!(
                    "{}",
                    json!({"ok": true, "id": id, "device": device, "to": to, "bytes_written": written, "seconds": seconds})
                );
            } else {
                println!(
                    "restored {device} of {id} to {} ({written} bytes written, {seconds:.1} s)",
                    to.display()
                );
            }
            Ok(())
        }
    }
}

/// Serves backup `id` until a signal; prints each export's URI first
/// (one JSON object with `--json`), once the sockets accept connections.
fn serve(
    o: &Options,
    repo: Repository,
    id: &str,
    socket: Option<&Path>,
    tcp: Option<&str>,
    tls: &TlsOptions,
) -> Result<(), Failure> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let tls = tls_from_options(
        tls.nbd_tls,
        tls.nbd_tls_cert.as_deref(),
        tls.nbd_tls_key.as_deref(),
        tls.nbd_tls_ca.as_deref(),
    )
    .and_then(|settings| match tcp {
        Some(addr) => {
            check_tcp_exposure(addr, settings.as_ref(), tls.nbd_insecure).map(|_| settings)
        }
        None => Ok(settings),
    })?;
    // A client reading the URI knows to start TLS from its scheme.
    let tcp_scheme = if tls.is_some() { "nbds://" } else { "nbd://" };
    // Shared, as a backup holds it: prune cannot remove what is served.
    // Taken before the manifest is read: a prune between the two could
    // remove that backup and its chunks.
    let _lock = repo.lock(false)?;
    let manifest = repo.manifest(id)?;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let exports = BackupExports::new(std::sync::Arc::new(repo), &manifest);
    let server = NbdServer::serving_with(
        std::sync::Arc::new(exports),
        NbdSettings {
            tls,
            ..NbdSettings::default()
        },
    );
    let mut uris = Vec::new();
    if let Some(socket) = socket {
        server
            .listen_unix(socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        uris.extend(manifest.devices.iter().map(|d| unix_uri(socket, &d.name)));
    }
    if let Some(addr) = tcp {
        let (bound, _) = server
            .listen_tcp(addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        uris.extend(manifest.devices.iter().map(|d| {
            NbdAddress::Tcp {
                host: bound.ip().to_string(),
                port: bound.port(),
                export: d.name.clone(),
            }
            .to_string()
            .replacen("nbd://", tcp_scheme, 1)
        }));
    }
    if o.json {
        println!("{}", json!({"event": "serving", "id": id, "uris": uris}));
    } else {
        println!("serving backup {id} read-only:");
        for uri in &uris {
            println!("{uri}");
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let signal = signals.forever().next();
    server.shutdown();
    if o.json {
        // Whoever read the URIs may be gone: no panic on a closed stdout.
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            json!({"ok": true, "id": id, "signal": signal})
        );
    }
    Ok(())
}

fn names(m: &Manifest) -> String {
    m.devices
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An NBD connection to a snapshot image as a backup source.
struct NbdSource(NbdClient);

impl ImageSource for NbdSource {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn zero_extents(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        const NBD_STATE_ZERO: u32 = 2;
        Ok(self
            .0
            .block_status("base:allocation", offset, len)?
            .into_iter()
            .map(|(l, flags)| (l, flags & NBD_STATE_ZERO != 0))
            .collect())
    }
}

/// `YYYYMMDDTHHMMSSZ` of a time in seconds since the epoch (UTC).
fn utc_stamp(secs: u64) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// How the snapshot images are read: over the daemon's Unix socket or
/// another TCP address, with TLS or not, over how many connections.
struct ImageReach {
    tcp: Option<(String, u16)>,
    tls: Option<NbdTlsClient>,
    connections: u8,
}

impl ImageReach {
    fn from_options(
        tcp: Option<&str>,
        tls: Option<&Path>,
        connections: u8,
    ) -> Result<ImageReach, Failure> {
        let tcp = tcp
            .map(|a| {
                let (host, port) = a
                    .rsplit_once(':')
                    .ok_or_else(|| fail(format!("--nbd-tcp {a}: not HOST:PORT")))?;
                let port: u16 = port
                    .parse()
                    .map_err(|_| fail(format!("--nbd-tcp {a}: bad port")))?;
                Ok::<_, Failure>((host.trim_matches(['[', ']']).to_string(), port))
            })
            .transpose()?;
        let tls = tls
            .map(|dir| {
                NbdTlsClient::from_dir(dir)
                    .map_err(|e| fail(format!("--nbd-tls-certificates: {e}")))
            })
            .transpose()?;
        Ok(ImageReach {
            tcp,
            tls,
            connections,
        })
    }
}

fn create(
    o: &Options,
    repo_path: &Path,
    devices: &[String],
    storage: Option<&Path>,
    limit: Option<&str>,
    reach: ImageReach,
) -> Result<(), Failure> {
    let started = Instant::now();
    let repo = Repository::open(repo_path, true)?;
    // Shared with other backups, never with prune.
    let _lock = repo.lock(false)?;
    let storage = match storage {
        Some(s) => s.to_path_buf(),
        None => std::fs::canonicalize(repo.root())?.join("tmp"),
    };
    let limit = limit.map(blksnap_proto::parse_size).transpose()?;
    let mut client = Client::connect(&o.control)
        .map_err(|e| format!("cannot reach blksnapd at {}: {e}", o.control.display()))?;
    // The snapshot belongs to this connection: if this process dies, the
    // daemon destroys it.
    let id = client.snapshot_create(SnapshotCreateArgs {
        storage: Some(storage.display().to_string()),
        limit,
        devices: devices.to_vec(),
        on_copy_error: None,
        copy_timeout_ms: None,
        storage_wait_ms: None,
        auto_destroy: true,
        overwrite: false,
    })?;
    let taken = client.snapshot_take(id);
    let result = taken.map_err(Failure::from).and_then(|take| {
        for w in &take.warnings {
            eprintln!("blksnap-backup: warning: {w}");
        }
        back_up(o, &repo, &mut client, id, &reach)
    });
    let destroyed = client.snapshot_destroy(id);
    let manifest = result?;
    destroyed?;
    let seconds = started.elapsed().as_secs_f64();
    summary(o, &manifest.0, &manifest.1, seconds);
    Ok(())
}

type Summary = (Manifest, Vec<create::Stats>);

fn back_up(
    o: &Options,
    repo: &Repository,
    client: &mut Client,
    id: uuid::Uuid,
    reach: &ImageReach,
) -> Result<Summary, Failure> {
    let info = client.snapshot_info(id)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let time = now.as_secs();
    // Microseconds in the id: backups made one after the other sort in
    // order (the newest is the base of the next incremental).
    let stamp = utc_stamp(time);
    let mut manifest = Manifest {
        format: FORMAT,
        id: format!(
            "{}.{:06}Z-{}",
            stamp.trim_end_matches('Z'),
            now.subsec_micros(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        time,
        host: host(),
        devices: Vec::new(),
    };
    let mut all_stats = Vec::new();
    let mut new = BTreeSet::new();
    for image in &info.images {
        let cbt = client.cbtinfo(&image.device)?;
        let now = Tracking {
            size: image.size,
            block_size: cbt.block_size,
            generation_id: cbt.generation_id,
            changes_number: cbt.changes_number,
            generation_reason: cbt.generation_reason.clone(),
        };
        let previous = repo.last_backup_of(&image.device);
        let previous = previous.as_ref().map(|(m, i)| &m.devices[*i]);
        let mut plan = create::plan(previous, &now);
        let map = if plan.incremental {
            let map = client.read_cbt_map(&image.device)?;
            // A map that does not cover the device cannot prove the rest
            // unchanged.
            let blocks = now.size.div_ceil(u64::from(now.block_size));
            if map.len() as u64 != blocks {
                plan = create::Plan {
                    incremental: false,
                    reason: format!(
                        "the change map has {} blocks, the device {blocks}",
                        map.len()
                    ),
                };
            }
            plan.incremental.then_some(map)
        } else {
            None
        };
        let uri = image.nbd.as_deref().ok_or_else(|| {
            fail(format!(
                "the daemon serves no NBD export of {}",
                image.device
            ))
        })?;
        let address = match (NbdAddress::parse(uri)?, &reach.tcp) {
            (local, Some((host, port))) => NbdAddress::Tcp {
                host: host.clone(),
                port: *port,
                export: local.export().to_string(),
            },
            (local, None) => local,
        };
        let sources = (0..reach.connections)
            .map(|_| {
                NbdClient::connect_with(&address, &["base:allocation"], None, reach.tls.as_ref())
                    .map(|c| Box::new(NbdSource(c)) as Box<dyn ImageSource>)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("{uri}: {e}"))?;
        if !o.json {
            eprintln!(
                "{}: {} backup ({})",
                image.device,
                if plan.incremental {
                    "incremental"
                } else {
                    "full"
                },
                plan.reason
            );
        }
        let bar = (!o.json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(image.device.clone());
            bar
        });
        let last = Mutex::new(Instant::now() - Duration::from_secs(1));
        let progress = |done: u64, total: u64| {
            if let Some(bar) = &bar {
                bar.set_length(total);
                bar.set_position(done);
                return;
            }
            let mut last = last.lock().unwrap();
            if !o.json || last.elapsed() < Duration::from_millis(500) {
                return;
            }
            *last = Instant::now();
            println!(
                "{}",
                json!({"event": "progress", "device": image.device, "bytes_done": done, "bytes_total": total})
            );
        };
        let (backup, stats, fresh) = create::backup_device(
            repo,
            &image.device,
            &now,
            &plan,
            previous,
            map.as_deref(),
            sources,
            &progress,
        )?;
        if let Some(bar) = bar {
            bar.finish();
        }
        new.extend(fresh);
        manifest.devices.push(backup);
        all_stats.push(stats);
    }
    // Every chunk durable before the manifest that names them.
    repo.sync_chunks(&new)?;
    repo.put_manifest(&manifest)?;
    Ok((manifest, all_stats))
}

fn summary(o: &Options, m: &Manifest, stats: &[create::Stats], seconds: f64) {
    let read: u64 = stats.iter().map(|s| s.bytes_read).sum();
    let stored: u64 = stats.iter().map(|s| s.bytes_stored).sum();
    let new: u64 = stats.iter().map(|s| s.bytes_new).sum();
    if o.json {
        let devices: Vec<_> = m
            .devices
            .iter()
            .zip(stats)
            .map(|(d, s)| json!({"name": d.name, "mode": d.mode, "reason": d.reason, "size": d.size, "stats": s}))
            .collect();
        println!(
            "{}",
            json!({"ok": true, "id": m.id, "bytes_read": read, "bytes_new": new, "bytes_stored": stored, "seconds": seconds, "devices": devices})
        );
        return;
    }
    println!("backup={}", m.id);
    for (d, s) in m.devices.iter().zip(stats) {
        println!(
            "device={} mode={} size={} read={} new={} stored={} deduplicated_chunks={} reused_chunks={} patched_regions={} zero_chunks={}",
            d.name, d.mode, d.size, s.bytes_read, s.bytes_new, s.bytes_stored, s.chunks_deduplicated, s.chunks_reused, s.regions_patched, s.chunks_zero
        );
    }
    println!("read={read} new={new} stored={stored} seconds={seconds:.1}");
}

fn list(o: &Options, repo: &Repository) -> Result<(), Failure> {
    let mut out = Vec::new();
    for id in repo.backup_ids()? {
        match repo.manifest(&id) {
            Ok(m) => {
                if o.json {
                    let devices: Vec<_> = m
                        .devices
                        .iter()
                        .map(|d| json!({"name": d.name, "size": d.size, "mode": d.mode, "generation_id": d.generation_id, "changes_number": d.changes_number}))
                        .collect();
                    out.push(json!({"id": id, "time": m.time, "host": m.host, "devices": devices}));
                } else {
                    for d in &m.devices {
                        println!(
                            "backup={id} device={} size={} mode={} generation_id={} changes_number={}",
                            d.name, d.size, d.mode, d.generation_id, d.changes_number
                        );
                    }
                }
            }
            Err(e) => {
                if o.json {
                    out.push(json!({"id": id, "error": e.to_string()}));
                } else {
                    println!("backup={id} damaged: {e}");
                }
            }
        }
    }
    if o.json {
        println!("{}", json!({"ok": true, "backups": out}));
    }
    Ok(())
}

fn verify(o: &Options, repo: &Repository, id: Option<&str>) -> Result<(), Failure> {
    let ids = match id {
        Some(id) => {
            repo.manifest(id).map(|_| ()).or_else(|e| match e {
                blksnap_backup::repo::RepoError::NoSuchBackup(_) => Err(e),
                _ => Ok(()),
            })?;
            vec![id.to_string()]
        }
        None => repo.backup_ids()?,
    };
    let damage = repo.verify(&ids)?;
    let failed = format!("{} damaged places", damage.len());
    if o.json {
        let mut result = json!({"ok": damage.is_empty(), "backups": ids.len(), "damage": damage});
        if !damage.is_empty() {
            result["error"] = json!(failed);
        }
        println!("{result}");
    } else {
        for d in &damage {
            let range = d.range.map_or(String::new(), |(at, len)| {
                format!(" bytes {at}..{}", at + len)
            });
            println!(
                "damaged: backup={} device={}{range}: {}",
                d.backup,
                d.device.as_deref().unwrap_or("-"),
                d.what
            );
        }
        println!(
            "verified {} backups: {} damaged places",
            ids.len(),
            damage.len()
        );
    }
    match (damage.is_empty(), o.json) {
        (true, _) => Ok(()),
        (false, printed) => Err(Failure {
            message: failed,
            printed,
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_stamps() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(super::utc_stamp(1_796_300_000), "20261203T121320Z");
    }
}
