//! Claims of docs/blksnap.md and docs/protocol.md about full difference
//! storage and failed copies that had no test, with their effect checked
//! through the data: `snapshot_create --on-copy-error` (both policies) and
//! `--copy-timeout` from the CLI; `no_space` reported once, and again after
//! storage is appended and fills up; an image write on full storage fails
//! with `ENOSPC` and the image stays valid. The I/O goes through the
//! daemon's NBD socket (a minimal client below), so no root is needed.
//!
//! Every snapshot here has exactly one chunk of storage (256 KiB, a range
//! of a file appended before the take) and `--storage-wait 0`: the second
//! chunk to copy finds the storage full.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use blksnap_test_support::Pattern;
use common::Daemon;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 256 * KIB;
const SIZE: u64 = 4 * MIB;
const ENOSPC: u32 = 28;

/// A minimal NBD client: fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple
/// replies, one request at a time.
struct Nbd {
    stream: UnixStream,
    size: u64,
    cookie: u64,
}

impl Nbd {
    fn connect(socket: &Path, export: &str) -> Self {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
        let no_zeroes = u16::from_be_bytes([hello[16], hello[17]]) & 2 != 0;
        assert!(no_zeroes, "the server offers NO_ZEROES");
        // FIXED_NEWSTYLE | NO_ZEROES
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut option = b"IHAVEOPT".to_vec();
        option.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
        option.extend_from_slice(&(export.len() as u32).to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        stream.write_all(&option).unwrap();
        let mut export_info = [0u8; 10];
        stream.read_exact(&mut export_info).unwrap();
        let size = u64::from_be_bytes(export_info[..8].try_into().unwrap());
        Self {
            stream,
            size,
            cookie: 0,
        }
    }

    /// Sends one request; returns the reply's error (0: success).
    fn request(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        self.cookie += 1;
        let mut request = Vec::with_capacity(28 + data.len());
        request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&kind.to_be_bytes());
        request.extend_from_slice(&self.cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&len.to_be_bytes());
        request.extend_from_slice(data);
        self.stream.write_all(&request).unwrap();
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], 0x6744_6698u32.to_be_bytes(), "simple reply");
        assert_eq!(reply[8..], self.cookie.to_be_bytes());
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    }

    /// Writes `data` at `offset`; returns the NBD error (0: written).
    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(1, offset, data.len() as u32, data)
    }

    fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let error = self.request(0, offset, len as u32, &[]);
        assert_eq!(error, 0, "NBD read at {offset} failed");
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).unwrap();
        data
    }
}

/// A daemon with device `a.img` (4 MiB of pattern A) and a snapshot of it
/// (created with the extra `create` options, `--storage-wait 0` unless
/// given) taken with one chunk of storage: the first 512 sectors of
/// `store.img`. Returns (daemon, snapshot id, content A).
fn one_chunk_snapshot(create: &[&str]) -> (Daemon, String, Vec<u8>) {
    let d = Daemon::start();
    let a = Pattern::RandomFill.bytes(0xA, SIZE);
    std::fs::write(d.path("a.img"), &a).unwrap();
    d.ok(&["attach", "--device", "a.img"]);
    let store = d.image("store.img", 4 * MIB);
    let mut args = vec!["snapshot_create", "--device", "a.img"];
    if !create.contains(&"--storage-wait") {
        args.extend(["--storage-wait", "0"]);
    }
    args.extend(create);
    let id = d.ok(&args).trim().to_string();
    d.ok(&[
        "snapshot_appendstorage",
        "--id",
        &id,
        "--device",
        store.to_str().unwrap(),
        "--range",
        "0:512",
    ]);
    d.ok(&["snapshot_take", "--id", &id]);
    (d, id, a)
}

/// `snapshot_info` of the snapshot of `a.img` (the one snapshot there is).
fn info(d: &Daemon) -> Value {
    serde_json::from_str(&d.ok(&["snapshot_info", "--device", "a.img", "--json"])).unwrap()
}

fn error_code(d: &Daemon) -> i64 {
    info(d)["images"][0]["error_code"].as_i64().unwrap()
}

/// The next event of snapshot `id` within `ms`, its lines after the
/// original's `result=` and `time=` (checked), `event=none` if none.
fn event(d: &Daemon, id: &str, ms: u64) -> String {
    let out = d.ok(&[
        "snapshot_waitevent",
        "--id",
        id,
        "--timeout",
        &ms.to_string(),
    ]);
    common::event_lines(&out)
        .into_iter()
        .map(|l| format!("{l}\n"))
        .collect()
}

fn chunk(data: &[u8], index: u64) -> &[u8] {
    &data[(index * CHUNK) as usize..((index + 1) * CHUNK) as usize]
}

#[test]
fn on_copy_error_keep_origin_writes_corrupts_the_image() {
    let (d, id, a) = one_chunk_snapshot(&["--on-copy-error", "keep-origin-writes"]);
    let b = Pattern::RandomFill.bytes(0xB, SIZE);
    let mut origin = Nbd::connect(&d.nbd, "a.img");
    assert_eq!(origin.size, SIZE);
    assert_eq!(origin.write(0, chunk(&b, 0)), 0);
    assert_eq!(error_code(&d), 0);
    // The second chunk's copy fails (storage full): the write goes through.
    assert_eq!(origin.write(CHUNK, chunk(&b, 1)), 0);
    assert_eq!(origin.read(0, 2 * CHUNK), b[..2 * CHUNK as usize]);
    assert_eq!(error_code(&d), ENOSPC as i64, "{}", info(&d));
    // The text output has the original's sign: -ENOSPC, first line.
    let negative = format!("-{ENOSPC}");
    assert_eq!(
        d.ok(&[
            "snapshot_info",
            "--device",
            "a.img",
            "--field",
            "error_code"
        ]),
        format!("{negative}\n")
    );
    assert_eq!(
        d.ok(&["snapshot_info", "-d", "a.img"]).lines().next(),
        Some(format!("error_code={negative}").as_str())
    );
    assert!(event(&d, &id, 5000).starts_with("event=no_space\n"));
    assert_eq!(
        event(&d, &id, 5000),
        "event=corrupted\ndevice=a.img\nerrno=28\nerror=ENOSPC\n"
    );
    // A corrupted image fails its reads; the origin is unharmed.
    let mut image = Nbd::connect(&d.nbd, "snapshot/a.img");
    assert_ne!(image.request(0, 0, CHUNK as u32, &[]), 0, "image read");
    assert_eq!(
        origin.read(2 * CHUNK, SIZE - 2 * CHUNK),
        a[2 * CHUNK as usize..]
    );
}

#[test]
fn on_copy_error_break_origin_write_keeps_the_image() {
    let (d, id, a) = one_chunk_snapshot(&["--on-copy-error", "break-origin-write"]);
    let b = Pattern::RandomFill.bytes(0xB, SIZE);
    let mut origin = Nbd::connect(&d.nbd, "a.img");
    assert_eq!(origin.write(0, chunk(&b, 0)), 0);
    // The second chunk's copy fails: the origin write fails, with ENOSPC,
    // and changes nothing; the image stays valid and as taken.
    assert_eq!(origin.write(CHUNK, chunk(&b, 1)), ENOSPC);
    assert_eq!(origin.read(CHUNK, CHUNK), chunk(&a, 1));
    assert_eq!(origin.read(0, CHUNK), chunk(&b, 0));
    assert_eq!(error_code(&d), 0, "{}", info(&d));
    let mut image = Nbd::connect(&d.nbd, "snapshot/a.img");
    assert_eq!(image.read(0, SIZE), a);
    assert!(event(&d, &id, 5000).starts_with("event=no_space\n"));
    assert_eq!(event(&d, &id, 200), "event=none\n", "no corrupted event");
}

#[test]
fn copy_timeout_fails_a_copy_that_waits_too_long() {
    // The copy waits for storage (up to 20 s); the copy timeout (300 ms)
    // ends the origin write's wait first: a failed copy, ETIMEDOUT, under
    // keep-origin-writes.
    let (d, id, _a) = one_chunk_snapshot(&[
        "--copy-timeout",
        "300",
        "--storage-wait",
        "20000",
        "--on-copy-error",
        "keep-origin-writes",
    ]);
    let b = Pattern::RandomFill.bytes(0xB, SIZE);
    let mut origin = Nbd::connect(&d.nbd, "a.img");
    assert_eq!(origin.write(0, chunk(&b, 0)), 0);
    let started = Instant::now();
    assert_eq!(origin.write(CHUNK, chunk(&b, 1)), 0);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the write waited {took:?}: the copy timeout did not end it"
    );
    assert_eq!(error_code(&d), 110, "ETIMEDOUT: {}", info(&d));
    assert!(event(&d, &id, 5000).starts_with("event=no_space\n"));
    assert_eq!(
        event(&d, &id, 5000),
        "event=corrupted\ndevice=a.img\nerrno=110\nerror=ETIMEDOUT\n"
    );
    assert_eq!(origin.read(CHUNK, CHUNK), chunk(&b, 1));
}

#[test]
fn no_space_again_after_append_and_image_write_on_full_storage() {
    let (d, id, a) = one_chunk_snapshot(&["--on-copy-error", "break-origin-write"]);
    let b = Pattern::RandomFill.bytes(0xB, SIZE);
    let c = Pattern::RandomFill.bytes(0xC, SIZE);
    let mut origin = Nbd::connect(&d.nbd, "a.img");
    let mut image = Nbd::connect(&d.nbd, "snapshot/a.img");
    assert_eq!(origin.write(0, chunk(&b, 0)), 0);
    // Full: no_space, once.
    assert_eq!(origin.write(CHUNK, chunk(&b, 1)), ENOSPC);
    assert_eq!(origin.write(2 * CHUNK, chunk(&b, 2)), ENOSPC);
    assert_eq!(
        event(&d, &id, 5000),
        "event=no_space\nrequested_sectors=2097152\n"
    );
    assert_eq!(
        event(&d, &id, 200),
        "event=none\n",
        "no_space reported twice"
    );

    // An image write to a chunk not copied yet needs storage too: ENOSPC,
    // and the image stays valid, with its data as taken.
    assert_eq!(image.write(3 * CHUNK, chunk(&c, 3)), ENOSPC);
    assert_eq!(error_code(&d), 0, "{}", info(&d));
    assert_eq!(image.read(0, SIZE), a);
    assert_eq!(event(&d, &id, 200), "event=none\n");

    // One more chunk of storage: a write goes on; the next finds the
    // storage full again, and no_space comes again.
    let store = d.path("store.img");
    d.ok(&[
        "snapshot_appendstorage",
        "--id",
        &id,
        "--device",
        store.to_str().unwrap(),
        "--range",
        "512:512",
    ]);
    assert_eq!(origin.write(CHUNK, chunk(&b, 1)), 0);
    assert_eq!(origin.write(2 * CHUNK, chunk(&b, 2)), ENOSPC);
    assert_eq!(
        event(&d, &id, 5000),
        "event=no_space\nrequested_sectors=2097152\n"
    );
    assert_eq!(error_code(&d), 0, "{}", info(&d));
    assert_eq!(image.read(0, SIZE), a, "the image is as taken");
    let mut expected = b[..2 * CHUNK as usize].to_vec();
    expected.extend_from_slice(&a[2 * CHUNK as usize..]);
    assert_eq!(origin.read(0, SIZE), expected);
}

/// `snapshot_watcher` on a snapshot whose storage fills up: the original's
/// messages for `no_space` and then `corrupted`, and status 0 (a script
/// under `bash -e` that waits on it goes on).
#[test]
fn watcher_reports_overflow_as_the_original_and_exits_0() {
    let (d, id, _) = one_chunk_snapshot(&["--on-copy-error", "keep-origin-writes"]);
    let b = Pattern::RandomFill.bytes(0xB, SIZE);
    let mut origin = Nbd::connect(&d.nbd, "a.img");
    assert_eq!(origin.write(0, chunk(&b, 0)), 0);
    assert_eq!(origin.write(CHUNK, chunk(&b, 1)), 0);
    assert_eq!(error_code(&d), ENOSPC as i64, "{}", info(&d));
    // The events wait in the snapshot's queue: the watcher reads both.
    let out = d.cli(&["snapshot_watcher", "-i", &id]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[0], "Start snapshot watcher.");
    let timed = |line: &str| {
        let (time, message) = line.split_once(" - ").unwrap_or(("", ""));
        assert!(time.parse::<u64>().is_ok(), "no time label: {line:?}");
        message.to_string()
    };
    let no_space = timed(lines[1]);
    let mib = no_space
        .strip_prefix("The the difference storage already grow up to ")
        .and_then(|rest| rest.strip_suffix(" MiB. Limit has been reached."))
        .unwrap_or_else(|| panic!("not the no_space message: {no_space:?}"));
    assert!(mib.parse::<u64>().is_ok(), "{no_space:?}");
    assert_eq!(
        timed(lines[2]),
        "The snapshot was corrupted for device [a.img] with error \"No space left on device\"."
    );
    assert_eq!(lines[3], "Snapshot watcher finished");
    // The watcher stopped at the corruption; the snapshot is still there.
    assert_eq!(event(&d, &id, 0), "event=none\n");
    d.ok(&["snapshot_destroy", "--id", &id]);
}
