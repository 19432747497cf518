//! Claims of docs/nbd.md that had no test, each checked through a real
//! blksnapd and stock NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy):
//! TRIM and WRITE_ZEROES on a device export under a snapshot (copy-on-write
//! and change tracking), FAST_ZERO on an image (ENOTSUP), detach under an
//! open connection, image writes, and `base:allocation` of an image extent
//! by extent. Outside CI a missing tool skips its test loudly, in CI
//! (CI=true) it fails.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::nbd_tools::{have, map, random_device, read_all};
use common::Daemon;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// Tracking block size of small devices (docs/protocol.md, DESIGN §2).
const BLOCK: u64 = 64 * KIB;
/// Default copy-on-write chunk size.
const CHUNK: u64 = 256 * KIB;

/// qemu-io with one command on `uri`; returns stdout and stderr together.
/// qemu-io exits 0 even when the command fails: callers check the text.
fn qemu_io(uri: &str, command: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-d", "unmap", "-c", command, uri])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// qemu-io with a command that must succeed (no "failed" in its output).
fn qemu_io_ok(uri: &str, command: &str) {
    let text = qemu_io(uri, command);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {command:?} on {uri}: {text}"
    );
}

/// The tracking blocks that `ranges` (offset, length) touch, sorted.
fn blocks_of(ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out: Vec<u64> = ranges
        .iter()
        .flat_map(|&(at, len)| at / BLOCK..(at + len).div_ceil(BLOCK))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The blocks a dirty-bitmap map marks dirty, checking that its extents
/// tile `[0, size)`.
fn dirty_in_map(extents: &[(u64, u64, u32)], size: u64) -> Vec<u64> {
    let mut pos = 0;
    let mut out = Vec::new();
    for &(at, len, kind) in extents {
        assert_eq!(at, pos, "extents not contiguous: {extents:?}");
        assert!(kind <= 1, "dirty bitmap type {kind}: {extents:?}");
        if kind == 1 {
            assert_eq!(at % BLOCK, 0, "dirty extent off a block boundary");
            out.extend(at / BLOCK..(at + len).div_ceil(BLOCK));
        }
        pos = at + len;
    }
    assert_eq!(pos, size, "extents do not cover the export: {extents:?}");
    out
}

/// The blocks whose byte in `readcbtmap` is above `since`.
fn dirty_in_cbt(d: &Daemon, device: &str, since: u8) -> Vec<u64> {
    let file = d.path("cbt.map");
    d.ok(&[
        "readcbtmap",
        "--device",
        device,
        "--file",
        file.to_str().unwrap(),
    ]);
    std::fs::read(&file)
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > since)
        .map(|(b, _)| b as u64)
        .collect()
}

fn zero(data: &mut [u8], at: u64, len: u64) {
    data[at as usize..(at + len) as usize].fill(0);
}

#[test]
fn trim_and_write_zeroes_on_a_device_copy_before_write_and_are_tracked() {
    if !(have("qemu-io") && have("nbdcopy") && have("nbdinfo")) {
        return;
    }
    let size = 16 * MIB;
    let d = Daemon::start();
    let before = random_device(&d, "t.img", size, 11);
    let first = d.snapshot("t.img");
    let dev = d.uri("t.img");
    // Chunk-aligned and unaligned ranges, one across a chunk boundary.
    let trims = [(MIB, CHUNK), (5 * MIB + 1000, 70_000)];
    let zeroes = [(9 * MIB, 128 * KIB), (13 * MIB - 5000, 10_000)];
    for (at, len) in trims {
        qemu_io_ok(&dev, &format!("discard {at} {len}"));
    }
    for (at, len) in zeroes {
        qemu_io_ok(&dev, &format!("write -z {at} {len}"));
    }
    // The device reads zeroes there, the rest unchanged.
    let mut expected = before.clone();
    for &(at, len) in trims.iter().chain(&zeroes) {
        zero(&mut expected, at, len);
    }
    assert!(
        read_all(&d, &dev) == expected,
        "the device after TRIM/WRITE_ZEROES"
    );
    assert!(std::fs::read(d.path("t.img")).unwrap() == expected);
    // Copy-on-write: the image still reads as the take's data.
    assert!(
        read_all(&d, &d.uri("snapshot/t.img")) == before,
        "the image moved with TRIM/WRITE_ZEROES on its device"
    );
    assert_eq!(
        d.ok(&[
            "snapshot_info",
            "--device",
            "t.img",
            "--field",
            "error_code"
        ]),
        "0\n"
    );
    // Change tracking: the next snapshot's map has exactly those blocks.
    d.ok(&["snapshot_destroy", "--id", &first]);
    let second = d.snapshot("t.img");
    let written: Vec<(u64, u64)> = trims.iter().chain(&zeroes).copied().collect();
    let want = blocks_of(&written);
    assert_eq!(dirty_in_cbt(&d, "t.img", 1), want, "readcbtmap");
    assert_eq!(
        dirty_in_map(
            &map(&d.uri("snapshot/t.img"), "qemu:dirty-bitmap:since-1"),
            size
        ),
        want,
        "NBD dirty bitmap since-1"
    );
    d.ok(&["snapshot_destroy", "--id", &second]);
}

#[test]
fn fast_zero_on_an_image_is_enotsup_and_writes_nothing() {
    if !(have("qemu-io") && have("nbdcopy")) {
        return;
    }
    let d = Daemon::start();
    let before = random_device(&d, "z.img", 8 * MIB, 12);
    let id = d.snapshot("z.img");
    let image = d.uri("snapshot/z.img");
    // qemu-io `write -z -n` is a write-zeroes with NBD_CMD_FLAG_FAST_ZERO.
    let text = qemu_io(&image, &format!("write -z -n {MIB} 64k"));
    assert!(
        text.contains("write failed: Operation not supported"),
        "FAST_ZERO on an image: {text}"
    );
    assert!(read_all(&d, &image) == before, "FAST_ZERO wrote the image");
    assert_eq!(
        d.ok(&[
            "snapshot_info",
            "--device",
            "z.img",
            "--field",
            "error_code"
        ]),
        "0\n"
    );
    // Without the flag it zeroes the image; with it on the device, it
    // zeroes the device.
    qemu_io_ok(&image, &format!("write -z {MIB} 64k"));
    let mut zeroed = before.clone();
    zero(&mut zeroed, MIB, 64 * KIB);
    assert!(read_all(&d, &image) == zeroed);
    qemu_io_ok(&d.uri("z.img"), &format!("write -z -n {} 64k", 2 * MIB));
    let mut device = before.clone();
    zero(&mut device, 2 * MIB, 64 * KIB);
    assert!(std::fs::read(d.path("z.img")).unwrap() == device);
    d.ok(&["snapshot_destroy", "--id", &id]);
}

/// An interactive qemu-io on one NBD connection: commands on stdin, its
/// output lines read through a channel, with a time limit.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl QemuIo {
    fn open(uri: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        QemuIo {
            child,
            stdin,
            lines,
        }
    }

    /// Runs `command`; returns the first output line that has one of
    /// `ends` (what qemu-io prints when the command is over).
    fn run(&mut self, command: &str, ends: &[&str]) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("qemu-io {command:?}: {e}; output {seen:?}"));
            if ends.iter().any(|e| line.contains(e)) {
                return line;
            }
            seen.push(line);
        }
    }

    /// Quits and waits for the exit (whose status is 1 when a command
    /// failed).
    fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        drop(self.stdin);
        self.child.wait().unwrap();
    }
}

#[test]
fn detach_under_an_open_connection_fails_its_requests_cleanly() {
    if !(have("qemu-io") && have("nbdinfo")) {
        return;
    }
    let mut d = Daemon::start();
    let before = random_device(&d, "x.img", 4 * MIB, 13);
    let mut io = QemuIo::open(&d.uri("x.img"));
    let ends = ["wrote ", "read ", "failed"];
    assert!(io.run("write -P 7 0 4k", &ends).contains("wrote 4096/4096"));
    assert!(io.run("read -P 7 0 4k", &ends).contains("read 4096/4096"));
    d.ok(&["detach", "--device", "x.img"]);
    // The export is gone for new connections...
    let out = Command::new("nbdinfo")
        .arg(d.uri("x.img"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nbdinfo of a detached device succeeded"
    );
    // ...and the open connection's requests fail with EIO, one by one,
    // without a crash or a hang (docs/nbd.md §9).
    for command in ["read 0 4k", "write -P 8 8k 4k", "write -z 16k 4k"] {
        let line = io.run(command, &ends);
        assert!(
            line.contains("failed: Input/output error"),
            "{command} after detach: {line}"
        );
    }
    // Nothing reached the origin after the detach.
    let mut expected = before;
    expected[..4096].fill(7);
    assert!(std::fs::read(d.path("x.img")).unwrap() == expected);
    // The origin stays held until the connection closes.
    d.fails(&["attach", "--device", "x.img"], &[]);
    assert!(d.running());
    io.quit();
    let attached = common::wait_until(Duration::from_secs(10), || {
        d.cli(&["attach", "--device", "x.img"]).status.success()
    });
    assert!(
        attached,
        "attach after the last connection closed: {}",
        d.log()
    );
    qemu_io_ok(&d.uri("x.img"), "read -P 7 0 4k");
    assert!(d.running());
}

#[test]
fn image_writes_land_in_the_image_not_the_origin() {
    if !(have("qemu-io") && have("nbdcopy") && have("nbdinfo")) {
        return;
    }
    let size = 8 * MIB;
    let d = Daemon::start();
    let before = random_device(&d, "w.img", size, 14);
    let id = d.snapshot("w.img");
    let image = d.uri("snapshot/w.img");
    let writes = [(0, 4 * KIB), (3 * MIB + 100, 300 * KIB), (size - 1, 1)];
    let mut expected = before.clone();
    for (i, &(at, len)) in writes.iter().enumerate() {
        let pattern = 0x61 + i as u8;
        qemu_io_ok(&image, &format!("write -P {pattern} {at} {len}"));
        qemu_io_ok(&image, &format!("read -P {pattern} {at} {len}"));
        expected[at as usize..(at + len) as usize].fill(pattern);
    }
    assert!(
        read_all(&d, &image) == expected,
        "the image after its writes"
    );
    // The origin is untouched: the file, and the device's export.
    assert!(std::fs::read(d.path("w.img")).unwrap() == before);
    assert!(read_all(&d, &d.uri("w.img")) == before);
    // The image's own dirty bitmap (selected after the writes) has them.
    assert_eq!(
        dirty_in_map(&map(&image, "qemu:dirty-bitmap:since-0"), size),
        blocks_of(&writes)
    );
    d.ok(&["snapshot_destroy", "--id", &id]);
    // ...and so does the next snapshot's map (the live map was marked).
    let next = d.snapshot("w.img");
    assert_eq!(dirty_in_cbt(&d, "w.img", 1), blocks_of(&writes));
    d.ok(&["snapshot_destroy", "--id", &next]);
}

#[test]
fn base_allocation_of_an_image_extent_by_extent() {
    if !(have("qemu-io") && have("nbdinfo")) {
        return;
    }
    let d = Daemon::start();
    // Sparse 16 MiB: a few bytes at 3 MiB (one 4 KiB filesystem block).
    let path = d.image("s.img", 16 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"data", 3 * MIB)
        .unwrap();
    d.ok(&["attach", "--device", "s.img"]);
    qemu_io_ok(&d.uri("s.img"), "write -P 1 0 1M");
    let id = d.snapshot("s.img");
    // Device writes after the take copy their chunks (8 MiB, 15 MiB);
    // image writes too (12 MiB + 1: a write; 10 MiB: write-zeroes, which
    // makes a copied chunk of zeroes, still data).
    qemu_io_ok(&d.uri("s.img"), &format!("write -P 2 {} 4k", 8 * MIB));
    qemu_io_ok(&d.uri("s.img"), &format!("write -P 2 {} 1", 15 * MIB));
    let image = d.uri("snapshot/s.img");
    qemu_io_ok(&image, &format!("write -P 3 {} 1", 12 * MIB + 1));
    qemu_io_ok(&image, &format!("write -z {} 4k", 10 * MIB));
    let (data, hole) = (0, 3);
    assert_eq!(
        map(&image, "base:allocation"),
        [
            (0, MIB, data),
            (MIB, 2 * MIB, hole),
            (3 * MIB, 4 * KIB, data),
            (3 * MIB + 4 * KIB, 5 * MIB - 4 * KIB, hole),
            (8 * MIB, CHUNK, data),
            (8 * MIB + CHUNK, 2 * MIB - CHUNK, hole),
            (10 * MIB, CHUNK, data),
            (10 * MIB + CHUNK, 2 * MIB - CHUNK, hole),
            (12 * MIB, CHUNK, data),
            (12 * MIB + CHUNK, 3 * MIB - CHUNK, hole),
            (15 * MIB, CHUNK, data),
            (15 * MIB + CHUNK, MIB - CHUNK, hole),
        ]
    );
    // The holes read as zeroes and the data as written at the take (or
    // into the image).
    qemu_io_ok(&image, &format!("read -P 0 {} 2M", MIB));
    qemu_io_ok(&image, &format!("read -P 0 {} 4k", 8 * MIB));
    qemu_io_ok(&image, &format!("read -P 3 {} 1", 12 * MIB + 1));
    qemu_io_ok(&image, "read -P 1 0 1M");
    d.ok(&["snapshot_destroy", "--id", &id]);
}
