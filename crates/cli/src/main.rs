//! `blksnap`: the command-line tool. Every command is one or a few requests
//! to `blksnapd` over its control socket, through `blksnap-client`. The
//! options and the default output are the original blksnap tool's (its
//! short options and spellings as aliases of ours; its lines first, ours
//! after them), so scripts written for it run unchanged; every command
//! prints its whole result as JSON with `--json`. Exit status, as the
//! original's: 0 success (`--help` and `--version` too), 1 any failure, bad
//! usage included (one line on stderr naming the problem from the daemon
//! or this tool; clap's usage message for bad usage).

mod fiemap;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use blksnap_client::{
    Client, Event, OnCopyError, Range, SnapshotCreateArgs, SnapshotInfo, TimedEvent,
};
use blksnap_proto::{errno_name, parse_range, parse_size};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use uuid::Uuid;

/// Drive blksnapd: change-block tracking and copy-on-write snapshots of
/// block devices and image files.
#[derive(Parser, Debug)]
#[command(name = "blksnap", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// blksnapd's control socket.
    #[arg(long, global = true, env = "BLKSNAP_CONTROL", default_value = blksnap_client::DEFAULT_CONTROL)]
    control: PathBuf,
    /// Print the result as JSON (our richer output; the default output is
    /// the original tool's).
    #[arg(short = 'j', long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the daemon's version and protocol version.
    #[command(name = "version")]
    Version,
    /// Start tracking a block device or image file (opened exclusively);
    /// prints `Attached successfully`, or `Already was attached` (status 0)
    /// for a file attached already.
    #[command(name = "attach")]
    Attach {
        /// Path of the block device or image file.
        #[arg(short = 'd', long)]
        device: PathBuf,
        /// Name for the device (default: the path's file name).
        #[arg(long)]
        name: Option<String>,
        /// Also create a loop device over the device's FUSE file (needs
        /// blksnapd --fuse-dir); prints its path. Images get one at take.
        #[arg(long = "loop", conflicts_with = "no_loop")]
        loop_device: bool,
        /// No loop device, even if the daemon's attach_loop is set.
        #[arg(long)]
        no_loop: bool,
        /// How the change maps persist: clean-stop (saved at stop and
        /// detach; a crash starts a new generation) or write-ahead (a crash
        /// keeps the generation). Default: the daemon's cbt_persistence.
        #[arg(long, value_parser = ["clean-stop", "write-ahead"])]
        cbt_persistence: Option<String>,
    },
    /// Stop the daemon; refused while loop devices are in use (mounted).
    #[command(name = "shutdown")]
    Shutdown {
        /// Stop anyway: busy loop devices are flushed and detached.
        #[arg(long)]
        force: bool,
    },
    /// Stop tracking a device (refused while it is in a snapshot). A loop
    /// device of it still mounted goes on serving it, untracked, until it
    /// is unmounted (`list` shows the device as detaching until then).
    #[command(name = "detach")]
    Detach {
        /// Device name or path.
        #[arg(short = 'd', long)]
        device: String,
    },
    /// List tracked devices and snapshots.
    #[command(name = "list")]
    List,
    /// Print a device's change-tracking parameters.
    #[command(name = "cbtinfo")]
    Cbtinfo {
        /// Device name or path.
        #[arg(short = 'd', long)]
        device: String,
    },
    /// Write a device's readable change map (one byte per block) to a file.
    #[command(name = "readcbtmap")]
    Readcbtmap {
        /// Device name or path.
        #[arg(short = 'd', long)]
        device: String,
        /// File to write the map to.
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Mark sector ranges, or the blocks of a file, as changed.
    #[command(name = "markdirtyblock")]
    Markdirtyblock {
        /// Device name or path. Without it, `--file` names the device: the
        /// attached device whose loop device (or block device) holds the
        /// file's filesystem.
        #[arg(short = 'd', long, required_unless_present = "file")]
        device: Option<String>,
        /// Sector range START:COUNT (512-byte sectors); several after one
        /// flag, or the flag repeated. Also spelt --ranges.
        #[arg(short = 'r', long, visible_alias = "ranges", value_parser = parse_range, num_args = 1.., required_unless_present = "file")]
        range: Vec<Range>,
        /// A file on a filesystem on the device: its extents (FIEMAP).
        #[arg(short = 'f', long, conflicts_with = "range")]
        file: Option<PathBuf>,
    },
    /// Create a snapshot with its difference storage; prints its id.
    #[command(name = "snapshot_create")]
    SnapshotCreate {
        /// Device to include (name or path): several after one flag
        /// (`--device a b`), or the flag repeated.
        #[arg(short = 'd', long, num_args = 1..)]
        device: Vec<String>,
        /// Difference storage: a regular file (grown as needed), a
        /// directory (a temporary file there) or a block device. Without it,
        /// storage is added with snapshot_appendstorage.
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// Largest size of the difference storage (N, NK, NM, NG, NT).
        #[arg(short = 'l', long, value_parser = parse_size)]
        limit: Option<u64>,
        /// What a failed copy does to the origin write.
        #[arg(long, value_enum)]
        on_copy_error: Option<CopyErrorArg>,
        /// Longest a copy before an origin write may take, in milliseconds.
        #[arg(long)]
        copy_timeout: Option<u64>,
        /// How long a write that needs a copy waits for storage to be
        /// appended when the storage is full, after the no_space event, in
        /// milliseconds (0: not at all). Default: the daemon's
        /// storage_wait_ms (5000).
        #[arg(long, value_name = "MS")]
        storage_wait: Option<u64>,
        /// Use --file even when it is a regular file with content, which is
        /// lost (without it such a file is refused; an empty file, a
        /// directory or a block device needs no --overwrite).
        #[arg(long)]
        overwrite: bool,
    },
    /// Add a device to a snapshot that is not taken yet.
    #[command(name = "snapshot_add")]
    SnapshotAdd {
        /// Snapshot id.
        #[arg(short = 'i', long)]
        id: Uuid,
        /// Device name or path.
        #[arg(short = 'd', long)]
        device: String,
    },
    /// Give a snapshot more difference storage: sector ranges of a block
    /// device or file (also after the take).
    #[command(name = "snapshot_appendstorage")]
    SnapshotAppendstorage {
        /// Snapshot id.
        #[arg(short = 'i', long)]
        id: Uuid,
        /// Block device or file the ranges are on.
        #[arg(short = 'd', long)]
        device: PathBuf,
        /// Sector range START:COUNT; several after one flag, or the flag
        /// repeated. Also spelt --ranges.
        #[arg(short = 'r', long, visible_alias = "ranges", value_parser = parse_range, num_args = 1.., required = true)]
        range: Vec<Range>,
    },
    /// Take the snapshot: atomically over all its devices.
    #[command(name = "snapshot_take")]
    SnapshotTake {
        /// Snapshot id.
        #[arg(short = 'i', long)]
        id: Uuid,
    },
    /// Destroy a snapshot: images go, storage is released, tracking goes on.
    #[command(name = "snapshot_destroy")]
    SnapshotDestroy {
        /// Snapshot id.
        #[arg(short = 'i', long)]
        id: Uuid,
    },
    /// Print the id of every snapshot (`ID ` lines, then an empty line).
    #[command(name = "snapshot_collect")]
    SnapshotCollect,
    /// Print the snapshot image of a device and its state (`error_code=`,
    /// negative, and `image=` first).
    #[command(name = "snapshot_info")]
    SnapshotInfo {
        /// Device name or path.
        #[arg(short = 'd', long)]
        device: String,
        /// Print only this field's value.
        #[arg(short = 'f', long, value_enum)]
        field: Option<Field>,
    },
    /// Wait for a snapshot's next event (no_space, corrupted, cbt_reset):
    /// prints `result=ok|timeout|not found`, then `time=` and `event=`.
    #[command(name = "snapshot_waitevent")]
    SnapshotWaitevent {
        /// Snapshot id.
        #[arg(short = 'i', long)]
        id: Uuid,
        /// Milliseconds to wait.
        #[arg(short = 't', long)]
        timeout: u64,
    },
    /// Print a snapshot's events until it is destroyed or corrupted (both
    /// end with status 0).
    #[command(name = "snapshot_watcher")]
    SnapshotWatcher {
        /// Snapshot id.
        #[arg(short = 'i', long)]
        id: Uuid,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CopyErrorArg {
    KeepOriginWrites,
    BreakOriginWrite,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Field {
    Image,
    #[value(name = "error_code")]
    ErrorCode,
    Nbd,
}

/// A failure: the message, and the exit status.
struct Failure(String, u8);

impl From<blksnap_client::Error> for Failure {
    fn from(e: blksnap_client::Error) -> Self {
        match e {
            blksnap_client::Error::Remote(r) => Failure(format!("{} ({})", r.message, r.name), 1),
            other => Failure(other.to_string(), 1),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Asked-for help and version are a success; every usage error
            // is a failure, status 1 as the original tool's (not clap's 2).
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(1),
            };
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            eprintln!("blksnap: {message}");
            ExitCode::from(code)
        }
    }
}

/// `--device` takes a name or a path. A path (it has a '/', or names an
/// existing file here) is sent absolute with symlinks resolved, so it means
/// the same file whatever the daemon's working directory; a name passes
/// through.
fn device_key(device: &str) -> String {
    if device.contains('/') || Path::new(device).exists() {
        std::fs::canonicalize(device)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| device.to_string())
    } else {
        device.to_string()
    }
}

/// The attached device holding the filesystem of a file on device `rdev`:
/// the one whose loop device is `rdev`, or that is itself the block device
/// `rdev`. What the original finds through the block device's filter.
fn device_of_file(client: &mut Client, file: &Path, rdev: u64) -> Result<String, Failure> {
    let block_rdev = |path: &str| {
        std::fs::metadata(path)
            .ok()
            .filter(|m| m.file_type().is_block_device())
            .map(|m| m.rdev())
    };
    let list = client.list()?;
    let found = list.devices.iter().find(|d| {
        let on_loop = d.loop_device.as_deref().and_then(block_rdev) == Some(rdev);
        on_loop || d.path.as_deref().and_then(block_rdev) == Some(rdev)
    });
    match found {
        Some(d) => Ok(d.name.clone()),
        None => Err(Failure(
            format!(
                "{} is on block device {}:{}, which is no attached device nor its loop device: \
                 attach the device with --loop and mount its loop device, or name it with --device",
                file.display(),
                rustix::fs::major(rdev),
                rustix::fs::minor(rdev)
            ),
            1,
        )),
    }
}

fn absolute(path: &Path, what: &str) -> Result<String, Failure> {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .map_err(|e| Failure(format!("{what} {}: {e}", path.display()), 1))
}

fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string(value).expect("results serialize")
    );
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let mut client = Client::connect(&cli.control)?;
    let json = cli.json;
    match &cli.command {
        Command::Version => {
            let v = client.version()?;
            if json {
                print_json(&v);
            } else {
                println!("{}", v.version);
            }
        }
        Command::Attach {
            device,
            name,
            loop_device,
            no_loop,
            cbt_persistence,
        } => {
            let want_loop = match (loop_device, no_loop) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let cbt_persistence = cbt_persistence.as_deref().map(|m| match m {
                "write-ahead" => blksnap_proto::CbtPersistence::WriteAhead,
                _ => blksnap_proto::CbtPersistence::CleanStop,
            });
            let path = absolute(device, "device")?;
            // The daemon says whether the same file was attached already as
            // asked (the original's "Already was attached", status 0).
            let info = client.attach_with_args(blksnap_proto::AttachArgs {
                device: path.clone(),
                name: name.clone(),
                loop_device: want_loop,
                cbt_persistence,
                exist_ok: true,
            })?;
            let already = info.already_attached;
            if json {
                print_json(&info);
            } else {
                println!(
                    "{}",
                    if already {
                        "Already was attached"
                    } else {
                        "Attached successfully"
                    }
                );
                println!("device={}", info.name);
                if let Some(uri) = &info.nbd {
                    println!("nbd={uri}");
                }
                if let Some(path) = &info.loop_device {
                    println!("loop={path}");
                }
            }
        }
        Command::Detach { device } => {
            let result = client.detach_device(&device_key(device))?;
            if let Some(path) = &result.detaching {
                eprintln!(
                    "blksnap: warning: {device}: tracking stopped, but its loop device {path} \
                     is in use: it serves the device, untracked, until its last user closes it \
                     (`list` shows the device as detaching until then)"
                );
            }
            if json {
                print_json(&result);
            }
        }
        Command::List => {
            let list = client.list()?;
            if json {
                print_json(&list);
            } else {
                for d in &list.devices {
                    println!(
                        "device={} size={} path={} snapshot={}",
                        d.name,
                        d.size,
                        d.path.as_deref().unwrap_or("-"),
                        d.snapshot.map_or("-".into(), |s| s.to_string())
                    );
                }
                for m in &list.missing {
                    println!("missing={} path={} reason={}", m.name, m.path, m.reason);
                }
                for d in &list.detaching {
                    println!(
                        "detaching={} path={} loop={}",
                        d.name,
                        d.path.as_deref().unwrap_or("-"),
                        d.loop_device
                    );
                }
                for s in &list.snapshots {
                    println!(
                        "snapshot={} taken={} devices={} storage_used={} storage_total={}",
                        s.id,
                        s.taken,
                        s.devices.join(","),
                        s.storage.used,
                        s.storage.total
                    );
                }
            }
        }
        Command::Cbtinfo { device } => {
            let i = client.cbtinfo(&device_key(device))?;
            if json {
                print_json(&i);
            } else {
                println!("block_size={}", i.block_size);
                println!("device_capacity={}", i.device_capacity);
                println!("block_count={}", i.block_count);
                println!("generation_id={}", i.generation_id);
                println!("changes_number={}", i.changes_number);
                println!("generation_reason={}", i.generation_reason);
            }
        }
        Command::Readcbtmap { device, file } => {
            let map = client.read_cbt_map(&device_key(device))?;
            std::fs::write(file, &map)
                .map_err(|e| Failure(format!("cannot write {}: {e}", file.display()), 1))?;
            if json {
                print_json(&serde_json::json!({ "file": file, "block_count": map.len() }));
            }
        }
        Command::Markdirtyblock {
            device,
            range,
            file,
        } => {
            let (key, ranges) = match file {
                Some(f) => {
                    let (rdev, ranges) = fiemap::file_ranges(f).map_err(|m| Failure(m, 1))?;
                    let key = match device {
                        Some(d) => device_key(d),
                        None => device_of_file(&mut client, f, rdev)?,
                    };
                    if !json {
                        // The original's lines: the file's device, then one
                        // line per range (ours merged where adjacent).
                        let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
                        println!("device path: '/dev/block/{major}:{minor}'");
                        for r in &ranges {
                            println!("allocate range: ofs={} cnt={}", r.start, r.count);
                        }
                    }
                    (key, ranges)
                }
                None => (
                    device_key(device.as_deref().unwrap_or_default()),
                    range.clone(),
                ),
            };
            client.mark_dirty(&key, &ranges)?;
            if json {
                print_json(&serde_json::json!({ "device": key, "ranges": ranges }));
            }
        }
        Command::SnapshotCreate {
            device,
            file,
            limit,
            on_copy_error,
            copy_timeout,
            storage_wait,
            overwrite,
        } => {
            let storage = file
                .as_deref()
                .map(|f| absolute(f, "difference storage"))
                .transpose()?;
            let id = client.snapshot_create(SnapshotCreateArgs {
                storage,
                limit: *limit,
                devices: device.iter().map(|d| device_key(d)).collect(),
                on_copy_error: on_copy_error.map(|p| match p {
                    CopyErrorArg::KeepOriginWrites => OnCopyError::KeepOriginWrites,
                    CopyErrorArg::BreakOriginWrite => OnCopyError::BreakOriginWrite,
                }),
                copy_timeout_ms: *copy_timeout,
                storage_wait_ms: *storage_wait,
                auto_destroy: false,
                overwrite: *overwrite,
            })?;
            if json {
                print_json(&serde_json::json!({ "id": id }));
            } else {
                println!("{id}");
            }
        }
        Command::SnapshotAdd { id, device } => {
            client.snapshot_add(*id, &device_key(device))?;
            empty(json);
        }
        Command::SnapshotAppendstorage { id, device, range } => {
            client.snapshot_append_storage(*id, &absolute(device, "storage device")?, range)?;
            empty(json);
        }
        Command::SnapshotTake { id } => {
            let result = client.snapshot_take(*id)?;
            for warning in &result.warnings {
                eprintln!("blksnap: warning: {warning}");
            }
            if json {
                print_json(&result);
            }
        }
        Command::Shutdown { force } => {
            client.shutdown(*force)?;
            empty(json);
        }
        Command::SnapshotDestroy { id } => {
            let result = client.snapshot_destroy(*id)?;
            for path in &result.images_in_use {
                eprintln!(
                    "blksnap: warning: the image loop device {path} is in use (mounted?): \
                     it stays until its last user closes it, and I/O on it fails"
                );
            }
            if json {
                print_json(&result);
            }
        }
        Command::SnapshotCollect => {
            let ids = client.snapshot_collect()?;
            if json {
                print_json(&serde_json::json!({ "ids": ids }));
            } else {
                // The original's lines: each id followed by a space, then
                // an empty line.
                for id in ids {
                    println!("{id} ");
                }
                println!();
            }
        }
        Command::SnapshotInfo { device, field } => {
            let info = client.snapshot_info_of_device(&device_key(device))?;
            snapshot_info(&info, *field, json)?;
        }
        Command::SnapshotWaitevent { id, timeout } => {
            let waited = client.snapshot_wait_event_timed(*id, Duration::from_millis(*timeout));
            // The original's answers when there is no event: an unknown
            // snapshot and an interrupted wait are results, not failures.
            let result = match &waited {
                Err(blksnap_client::Error::Remote(e)) if e.name == "ENOENT" => Some("not found"),
                Err(blksnap_client::Error::Remote(e)) if e.name == "EINTR" => Some("interrupted"),
                _ => None,
            };
            if let Some(result) = result {
                if json {
                    print_json(&serde_json::json!({ "event": null, "result": result }));
                } else {
                    println!("result={result}");
                }
                return Ok(());
            }
            let event = waited?;
            if json {
                match event {
                    None => print_json(&serde_json::json!({ "event": null })),
                    Some(TimedEvent { time, event }) => {
                        print_json(&serde_json::json!({ "event": event, "time": time }))
                    }
                }
            } else {
                match &event {
                    None => println!("result=timeout"),
                    Some(timed) => {
                        println!("result=ok");
                        println!("time={}", timed.time);
                        print_event(&timed.event);
                    }
                }
            }
        }
        Command::SnapshotWatcher { id } => {
            // An unknown id is an error, not a snapshot that went away.
            client.snapshot_info(*id)?;
            watch(&mut client, *id, json)?;
        }
    }
    Ok(())
}

/// Prints events, in the original's messages (or as JSON), until the
/// snapshot is destroyed or an image is corrupted; both end the watch with
/// status 0, as the original's.
fn watch(client: &mut Client, id: Uuid, json: bool) -> Result<(), Failure> {
    let say = |line: &str| {
        if !json {
            println!("{line}");
        }
    };
    say("Start snapshot watcher.");
    loop {
        match client.snapshot_wait_event_timed(id, Duration::from_secs(1)) {
            Ok(None) => {}
            Ok(Some(TimedEvent { time, event })) => {
                if json {
                    print_json(&event);
                }
                match &event {
                    Event::Corrupted { device, errno } => {
                        say(&format!(
                            "{time} - The snapshot was corrupted for device [{device}] with error \"{}\".",
                            strerror(*errno)
                        ));
                        break;
                    }
                    Event::NoSpace { requested_sectors } => say(&format!(
                        "{time} - The the difference storage already grow up to {} MiB. Limit has been reached.",
                        requested_sectors / 2048
                    )),
                    Event::CbtReset { device, reason } => say(&format!(
                        "{time} - The change tracking of device [{device}] begins a new generation ({reason})."
                    )),
                }
            }
            Err(blksnap_client::Error::Remote(r)) if r.name == "ENOENT" => {
                say("Snapshot not found");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    say("Snapshot watcher finished");
    Ok(())
}

/// An errno's text as strerror(3) has it ("No space left on device").
fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn empty(json: bool) {
    if json {
        print_json(&serde_json::json!({}));
    }
}

fn print_event(event: &Event) {
    match event {
        Event::NoSpace { requested_sectors } => {
            println!("event=no_space");
            println!("requested_sectors={requested_sectors}");
        }
        Event::Corrupted { device, errno } => {
            println!("event=corrupted");
            println!("device={device}");
            println!("errno={errno}");
            println!("error={}", errno_name(*errno));
        }
        Event::CbtReset { device, reason } => {
            println!("event=cbt_reset");
            println!("device={device}");
            println!("generation_reason={reason}");
        }
    }
}

fn snapshot_info(info: &SnapshotInfo, field: Option<Field>, json: bool) -> Result<(), Failure> {
    let device = info.for_device.as_deref().unwrap_or_default();
    let image = info.images.iter().find(|i| i.device == device);
    if json && field.is_none() {
        print_json(info);
        return Ok(());
    }
    let not_taken = || {
        Failure(
            format!("snapshot {} is not taken yet: no image", info.id),
            1,
        )
    };
    match field {
        // The original's sign: a negative errno (-ENOSPC), 0 for none.
        Some(Field::ErrorCode) => println!("{}", -image.ok_or_else(not_taken)?.error_code),
        Some(f @ (Field::Image | Field::Nbd)) => {
            let image = image.ok_or_else(not_taken)?;
            // `image` is what a script reads the image from: the loop device,
            // else the NBD URI (the original always had a block device).
            let (served, what) = if f == Field::Image {
                (
                    image.image.as_ref().or(image.nbd.as_ref()),
                    "served by neither a loop device (daemon without --fuse-dir, or device attached without --loop) nor NBD (daemon without --nbd-socket or --nbd-tcp)",
                )
            } else {
                (
                    image.nbd.as_ref(),
                    "not served by NBD (daemon without --nbd-socket or --nbd-tcp)",
                )
            };
            let served = served
                .ok_or_else(|| Failure(format!("the image of {} is {what}", image.device), 1))?;
            println!("{served}");
        }
        None => {
            // The original's two lines first (its sign: -errno), ours after.
            println!("error_code={}", -image.map_or(0, |i| i.error_code));
            println!(
                "image={}",
                image.and_then(|i| i.image.as_deref()).unwrap_or("-")
            );
            println!("id={}", info.id);
            println!("taken={}", info.taken);
            println!("device={device}");
            if let Some(image) = image {
                println!("nbd={}", image.nbd.as_deref().unwrap_or("-"));
                println!("chunk_size={}", image.chunk_size);
            }
            println!("storage_used={}", info.storage.used);
            println!("storage_total={}", info.storage.total);
        }
    }
    Ok(())
}
