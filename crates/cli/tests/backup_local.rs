//! blksnap-backup end to end on local block devices: `blksnapd --fuse-dir`,
//! devices attached with loop devices, ext4 made and mounted on them, files
//! written between backups and while a backup runs. The daemon freezes the
//! mounted filesystems at the take; every restored point must be the
//! device at its take, pass `fsck.ext4 -n -f`, and mount read-only with
//! the files of its round.
//!
//! The device at its take is read from its loop device (direct I/O) right
//! after the backup, with nothing writing in between. One thing did write:
//! the thaw after the take (`ext4_unfreeze` commits the superblock again,
//! setting the needs-recovery flag and updating the write time, the
//! kilobytes written and the checksum). So those superblock fields are the
//! only bytes allowed to differ, and the restored image must show the
//! frozen state (no needs-recovery flag) where the device shows the thawed
//! one ([`assert_equal_to_take`]).
//!
//! Needs root, /dev/fuse, /dev/loop-control and the tools in [`TOOLS`].
//! Without them each test prints a loud `SKIPPED: <test>: <reason>` line and
//! passes, unless the environment variable CI is set: then it fails.
//!
//! Safety, as in local.rs: every test owns an [`Env`] whose Drop (also on
//! panic) stops the test's writer threads first (they are dropped before
//! the Env), unmounts every mount point the test made (`umount`, then
//! `umount -l`), detaches its own loop devices (`losetup -d`) and stops the
//! daemon with `blksnap shutdown --force`; a wedged daemon gets its FUSE
//! connection aborted before it is killed. A watchdog unmounts lazily and
//! aborts the FUSE connection if a test runs far too long. Every external
//! command runs under `timeout`.

mod common;
#[path = "common/local_tools.rs"]
mod local_tools;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blksnap_test_support::{is_root, sparse_file, Pattern};
use common::{wait_until, Daemon};
use local_tools::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Longest any external command may run (seconds, for `timeout`).
const COMMAND_TIMEOUT: &str = "120";
/// A test still running after this is wedged: the watchdog unblocks it.
const WATCHDOG: Duration = Duration::from_secs(400);
/// Tools every test needs (found in PATH or an sbin directory).
const TOOLS: &[&str] = &[
    "timeout",
    "losetup",
    "mount",
    "umount",
    "mkfs.ext4",
    "fsck.ext4",
    "sync",
    "dd",
    "kill",
    "nbdfuse",
];

// ---------------------------------------------------------------------------
// External commands, all under `timeout`.

/// Whether the test can run here; prints a loud SKIPPED line when it cannot
/// (and fails when CI is set: there the tests must run).
fn ready(test: &str) -> bool {
    let missing_tool = TOOLS.iter().find(|t| which(t).is_none());
    let reason = if !is_root() {
        Some("needs root".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("no /dev/loop-control (loop module)".to_string())
    } else {
        missing_tool.map(|t| format!("{t} not found"))
    };
    let Some(reason) = reason else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: {reason}; CI is set, so the local-device backup tests must run \
             (as root, with /dev/fuse, losetup, mkfs.ext4 and fsck.ext4)"
        );
    }
    loud(&format!(
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         SKIPPED: {test}: {reason}\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    ));
    false
}

// ---------------------------------------------------------------------------
// The test environment: a daemon with a FUSE frontend, a repository, and
// everything the test mounted or attached, cleaned up in Drop.

struct Env {
    test: &'static str,
    work: PathBuf,
    fuse_dir: PathBuf,
    control: PathBuf,
    log: PathBuf,
    repo: PathBuf,
    pid: u32,
    held: Arc<Mutex<Held>>,
    done: Arc<AtomicBool>,
    started: Instant,
    daemon: Option<Daemon>,
    _tmp: tempfile::TempDir,
}

impl Env {
    /// A daemon with `--fuse-dir <work>/dev`; `None` (after a loud skip)
    /// when the test cannot run here.
    fn start_if_ready(test: &'static str) -> Option<Self> {
        if !ready(test) {
            return None;
        }
        // Built before the daemon starts: the watchdog's clock and the
        // command timeouts then only cover the test itself.
        common::blksnap_backup();
        let tmp = tempfile::Builder::new()
            .prefix("blksnap-backup-local-")
            .tempdir()
            .unwrap();
        let work = tmp.path().canonicalize().unwrap();
        let fuse_dir = work.join("dev");
        let daemon = Daemon::start_with(&["--fuse-dir", s(&fuse_dir)]);
        let held = Arc::new(Mutex::new(Held::default()));
        let done = Arc::new(AtomicBool::new(false));
        {
            let (held, done, fuse_dir) = (held.clone(), done.clone(), fuse_dir.clone());
            std::thread::spawn(move || watchdog(test, held, done, fuse_dir));
        }
        Some(Self {
            test,
            control: daemon.control.clone(),
            log: daemon.path("daemon.log"),
            pid: daemon.pid(),
            repo: work.join("repo"),
            work,
            fuse_dir,
            held,
            done,
            started: Instant::now(),
            daemon: Some(daemon),
            _tmp: tmp,
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The daemon's log, without the per-request FUSE lines.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("fuser::request"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The daemon's "frozen for the take" lines for mount point `mp`.
    fn freezes_of(&self, mp: &Path) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("filesystem frozen for the take") && l.contains(s(mp)))
            .count()
    }

    /// Runs `blksnap`, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = command(env!("CARGO_BIN_EXE_blksnap"))
            .args(args)
            .env("BLKSNAP_CONTROL", &self.control)
            .current_dir("/")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "blksnap {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `blksnap-backup --json --repo R --control C ARGS`: asserts success
    /// and a final `"ok": true` line; returns that line.
    fn backup(&self, args: &[&str]) -> Value {
        let tool = common::blksnap_backup();
        let out = command(s(&tool))
            .arg("--json")
            .arg("--repo")
            .arg(&self.repo)
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .current_dir("/")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout
            .lines()
            .last()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .unwrap_or(Value::Null);
        assert!(
            out.status.success() && last["ok"] == true,
            "blksnap-backup {args:?} failed ({}): {stdout}{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        last
    }

    /// `blksnap-backup create --device D ...`; the result.
    fn create(&self, devices: &[&str]) -> Value {
        let mut args = vec!["create"];
        for d in devices {
            args.extend(["--device", d]);
        }
        self.backup(&args)
    }

    /// `blksnap-backup restore` of `device` of backup `id` to a new file in
    /// the work directory; returns its path.
    fn restore(&self, id: &str, device: &str) -> PathBuf {
        let to = self.work.join(format!("restored-{id}-{device}"));
        self.backup(&["restore", "--id", id, "--device", device, "--to", s(&to)]);
        to
    }

    /// A sparse file of `size` bytes in the work directory.
    fn file(&self, name: &str, size: u64) -> PathBuf {
        sparse_file(&self.work, name, size)
    }

    fn dir(&self, name: &str) -> PathBuf {
        let path = self.work.join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// `blksnap attach --device FILE --loop`: (device name, loop device).
    fn attach_loop(&self, file: &Path) -> (String, String) {
        let out = self.ok(&["attach", "--device", s(file), "--loop"]);
        let field = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {out:?}"))
                .to_string()
        };
        let (name, device) = (field("device="), field("loop="));
        assert!(device.starts_with("/dev/loop"), "{out}");
        self.held()
            .daemon_loops
            .push((device.clone(), name.clone()));
        (name, device)
    }

    /// A device of `size` bytes attached with a loop device, ext4 on it
    /// (no lazy initialization: no background writes after mount), mounted
    /// on `<work>/<name>`. Returns (device name, loop device, mount point).
    fn ext4_device(&self, name: &str, size: u64) -> (String, String, PathBuf) {
        let (dev, dev_loop) = self.attach_loop(&self.file(&format!("{name}.img"), size));
        run_ok(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &dev_loop,
            ],
        );
        let mp = self.mount(&dev_loop, name, &[]);
        (dev, dev_loop, mp)
    }

    /// Mounts `device` on `<work>/<name>`, which the Drop guard unmounts.
    fn mount(&self, device: &str, name: &str, options: &[&str]) -> PathBuf {
        let mount_point = self.dir(name);
        self.held().mounts.push(mount_point.clone());
        let mut args: Vec<&str> = options.to_vec();
        args.extend([device, s(&mount_point)]);
        let out = run("mount", &args);
        assert!(
            out.status.success(),
            "mount {options:?} {device} {}: {}\ndaemon log:\n{}",
            mount_point.display(),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        mount_point
    }

    fn umount(&self, mount_point: &Path) {
        run_ok("umount", &[s(mount_point)]);
        self.held().mounts.retain(|m| m != mount_point);
    }

    /// `losetup -r -f --show FILE`: a read-only loop device, detached by
    /// the Drop guard if still there.
    fn losetup_ro(&self, file: &Path) -> String {
        let device = run_ok("losetup", &["-r", "-f", "--show", s(file)])
            .trim()
            .to_string();
        assert!(device.starts_with("/dev/loop"), "{device}");
        self.held().loops.push(device.clone());
        device
    }

    fn losetup_detach(&self, device: &str) {
        run_ok("losetup", &["-d", device]);
        self.held().loops.retain(|l| l != device);
    }

    /// Mounts the restored image `file` read-only (read-only loop device,
    /// `-o ro`) on `<work>/<name>`, runs `check` on the mount point, then
    /// unmounts and detaches.
    fn with_restored_mounted(&self, file: &Path, name: &str, check: impl FnOnce(&Path)) {
        let device = self.losetup_ro(file);
        let mp = self.mount(&device, name, &["-t", "ext4", "-o", "ro"]);
        check(&mp);
        self.umount(&mp);
        self.losetup_detach(&device);
    }
}

/// `blksnap-backup serve` of one backup, with an `nbdfuse` file per
/// export; all stopped (and unmounted) when dropped, test failed or not.
struct ServedBackup {
    serve: std::process::Child,
    fuse: Vec<(std::process::Child, PathBuf)>,
    socket: PathBuf,
}

impl ServedBackup {
    fn start(env: &Env, id: &str) -> ServedBackup {
        let socket = env.work.join("served.sock");
        let mut serve = command(s(&common::blksnap_backup()))
            .arg("--json")
            .arg("--repo")
            .arg(&env.repo)
            .args(["serve", "--id", id, "--nbd-socket", s(&socket)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(serve.stdout.as_mut().unwrap()),
            &mut first,
        )
        .unwrap();
        assert!(first.contains("\"serving\""), "serve said {first:?}");
        ServedBackup {
            serve,
            fuse: Vec::new(),
            socket,
        }
    }

    /// Export `name` as a read-only file through `nbdfuse`.
    fn as_file(&mut self, env: &Env, name: &str) -> PathBuf {
        let dir = env.work.join(format!("nbdfuse-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let uri = format!("nbd+unix:///{name}?socket={}", self.socket.display());
        let child = command("nbdfuse")
            .args(["-r", s(&dir), &uri])
            .spawn()
            .unwrap();
        self.fuse.push((child, dir.clone()));
        let file = dir.join("nbd");
        assert!(
            wait_until(Duration::from_secs(20), || is_mounted(&dir)
                && file.exists()),
            "nbdfuse did not mount {uri} on {}",
            dir.display()
        );
        file
    }
}

/// SIGTERM, then waits; never panics (the child may be gone already).
/// Each child runs under `timeout`, which passes SIGTERM on to it (a
/// SIGKILL would stop only `timeout` and orphan the program).
fn terminate(child: &mut std::process::Child) {
    let _ = try_run("kill", &["-TERM", &child.id().to_string()]);
    let _ = child.wait();
}

impl Drop for ServedBackup {
    fn drop(&mut self) {
        for (mut child, dir) in self.fuse.drain(..) {
            unmount(&dir);
            terminate(&mut child);
        }
        terminate(&mut self.serve);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let held = std::mem::take(&mut *self.held());
        release(
            self.test,
            held,
            &self.fuse_dir,
            &self.work,
            &self.control,
            self.pid,
            self.daemon.take(),
        );
        self.done.store(true, Ordering::SeqCst);
        eprintln!("{}: {:.1?}", self.test, self.started.elapsed());
    }
}

// ---------------------------------------------------------------------------
// Files, device contents, checks.

/// Relative path -> content.
type Tree = BTreeMap<String, Vec<u8>>;

/// Writes `content` to `dir/rel` (parents made), then fsyncs it.
fn write_synced(dir: &Path, rel: &str, content: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(content)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

/// Every regular file under `dir` (lost+found left out), with its content.
fn read_tree(dir: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, tree: &mut Tree) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if rel == "lost+found" {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                walk(root, &path, tree);
            } else {
                assert!(kind.is_file(), "{}: not a regular file", path.display());
                let content = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                tree.insert(rel, content);
            }
        }
    }
    let mut tree = Tree::new();
    walk(dir, dir, &mut tree);
    tree
}

/// `dir` holds exactly the files of `want`, each with its content.
fn assert_tree(dir: &Path, want: &Tree, what: &str) {
    let got = read_tree(dir);
    let names = |t: &Tree| t.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(names(&got), names(want), "{what}: the files");
    for (name, content) in want {
        assert!(
            &got[name] == content,
            "{what}: {name} has {} bytes that differ from the {} written",
            got[name].len(),
            content.len()
        );
    }
}

/// The whole of `device` copied to `to` with direct I/O (`dd
/// iflag=direct`: past the block device's page cache, which the
/// filesystem's data writes do not go through).
fn read_device(device: &str, to: &Path) {
    run_ok(
        "dd",
        &[
            &format!("if={device}"),
            &format!("of={}", s(to)),
            "bs=1M",
            "iflag=direct",
            "conv=sparse",
            "status=none",
        ],
    );
}

/// Up to 16 ranges (start..end) where `a` and `b` differ, merged when less
/// than 4 KiB apart.
fn differing_ranges(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for i in (0..a.len().min(b.len())).filter(|&i| a[i] != b[i]) {
        let full = ranges.len() == 16;
        match ranges.last_mut() {
            Some(last) if i < last.1 + 4096 => last.1 = i + 1,
            _ if full => break,
            _ => ranges.push((i, i + 1)),
        }
    }
    ranges
}

/// The ext4 superblock: 1024 bytes at byte 1024 of the device.
const SB: usize = 1024;
/// Superblock fields (offset, length) that the thaw after the take
/// rewrites: `ext4_unfreeze` commits the superblock again, which updates
/// the write time (`s_wtime`, `s_wtime_hi`), the kilobytes written
/// (`s_kbytes_written`) and the checksum (`s_checksum`).
const SB_REWRITTEN_AT_THAW: [(usize, usize); 4] = [(0x30, 4), (0x178, 8), (0x274, 1), (0x3fc, 4)];
/// `s_feature_incompat`'s byte with `EXT4_FEATURE_INCOMPAT_RECOVER` (0x4):
/// cleared by the freeze (journal flushed), set again by the thaw.
const SB_NEEDS_RECOVERY: (usize, u8) = (0x60, 0x04);
/// `s_feature_ro_compat`'s byte with `EXT4_FEATURE_RO_COMPAT_ORPHAN_PRESENT`
/// (0x10000): the freeze may clear it, the thaw sets it again.
const SB_ORPHAN_PRESENT: (usize, u8) = (0x66, 0x01);

/// `restored` is `taken`, the device read right after the backup: equal
/// byte for byte but for the ext4 superblock fields that the thaw after
/// the take rewrote ([`SB_REWRITTEN_AT_THAW`], the needs-recovery and
/// orphan-present flags). The restored superblock has no needs-recovery
/// flag (the take saw the filesystem frozen, its journal flushed) and the
/// device after the thaw has it (mounted read-write).
fn assert_equal_to_take(restored: &[u8], taken: &[u8], what: &str) {
    assert_eq!(restored.len(), taken.len(), "{what}: size");
    let diff: Vec<(usize, usize)> = differing_ranges(&restored[..SB], &taken[..SB])
        .into_iter()
        .chain(
            differing_ranges(&restored[2 * SB..], &taken[2 * SB..])
                .into_iter()
                .map(|(a, b)| (a + 2 * SB, b + 2 * SB)),
        )
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: the restored image differs from the device at its take at {diff:x?}"
    );
    let (mut got, mut want) = (restored[SB..2 * SB].to_vec(), taken[SB..2 * SB].to_vec());
    assert_eq!(
        got[SB_NEEDS_RECOVERY.0] & SB_NEEDS_RECOVERY.1,
        0,
        "{what}: the restored ext4 needs recovery: not frozen at the take"
    );
    assert_ne!(
        want[SB_NEEDS_RECOVERY.0] & SB_NEEDS_RECOVERY.1,
        0,
        "{what}: the mounted ext4 after the backup has no needs-recovery flag"
    );
    for sb in [&mut got, &mut want] {
        for (at, len) in SB_REWRITTEN_AT_THAW {
            sb[at..at + len].fill(0);
        }
        sb[SB_NEEDS_RECOVERY.0] &= !SB_NEEDS_RECOVERY.1;
        sb[SB_ORPHAN_PRESENT.0] &= !SB_ORPHAN_PRESENT.1;
    }
    let diff: Vec<(usize, u8, u8)> = (0..SB)
        .filter(|&i| got[i] != want[i])
        .map(|i| (i, got[i], want[i]))
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: the restored ext4 superblock differs from the device's beyond what \
         the thaw rewrites, at (offset, restored, device) {diff:x?}"
    );
}

/// `fsck.ext4 -n -f FILE` exits 0: the filesystem is clean.
fn assert_fsck_clean(file: &Path, what: &str) {
    let out = run("fsck.ext4", &["-n", "-f", s(file)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: fsck.ext4 -n -f {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The device result of `name` in a `create` result.
fn device_result<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {result}"))
}

fn id_of(result: &Value) -> String {
    result["id"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// 1. Two ext4 devices, a full backup and three incrementals, every point
//    restored, equal to the device at its take, fsck-clean and mountable.

/// Round `round` of the device with index `d`, mounted on `mp`: new files
/// in `r<round>/`,
/// and from the second round on, one earlier file rewritten and one
/// deleted. Each file is written and fsynced; `tree` follows.
fn write_round(mp: &Path, d: u64, round: u64, tree: &mut Tree) {
    let seed = (d + 1) * 1000 + round * 10;
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..6u64 {
        let rel = format!("r{round}/f-{i}");
        let len = rng.u64(1..=512 * 1024);
        let content = Pattern::RandomFill.bytes(seed + i, len);
        write_synced(mp, &rel, &content);
        tree.insert(rel, content);
    }
    if round > 0 {
        let names: Vec<String> = tree
            .keys()
            .filter(|k| !k.starts_with(&format!("r{round}/")))
            .cloned()
            .collect();
        let rewrite = names[rng.usize(..names.len())].clone();
        let content = Pattern::RandomFill.bytes(seed + 100, rng.u64(1..=256 * 1024));
        write_synced(mp, &rewrite, &content);
        tree.insert(rewrite.clone(), content);
        let delete = names
            .iter()
            .find(|n| **n != rewrite)
            .expect("two earlier files")
            .clone();
        std::fs::remove_file(mp.join(&delete)).unwrap();
        tree.remove(&delete);
    }
}

#[test]
fn full_and_incremental_backups_of_two_mounted_ext4_devices_restore_every_point() {
    const TEST: &str =
        "full_and_incremental_backups_of_two_mounted_ext4_devices_restore_every_point";
    let Some(env) = Env::start_if_ready(TEST) else {
        return;
    };
    let devices = [
        env.ext4_device("a", 64 * MIB),
        env.ext4_device("b", 48 * MIB),
    ];
    assert_eq!(
        devices.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["a.img", "b.img"]
    );
    let names: Vec<&str> = devices.iter().map(|d| d.0.as_str()).collect();
    let mut trees = [Tree::new(), Tree::new()];
    // Per round: the backup's id, and per device the tree written and the
    // device's content at the take.
    let mut points: Vec<(String, Vec<(Tree, PathBuf)>)> = Vec::new();
    for round in 0..4u64 {
        for (d, (_, _, mp)) in devices.iter().enumerate() {
            write_round(mp, d as u64, round, &mut trees[d]);
            run_ok("sync", &["-f", s(mp)]);
        }
        run_ok("sync", &[]);
        let freezes: Vec<usize> = devices.iter().map(|d| env.freezes_of(&d.2)).collect();
        let result = env.create(&names);
        // Nothing writes to the devices from here to the reads below (the
        // thaw's superblock write came before: see assert_equal_to_take).
        let id = id_of(&result);
        let mut recorded = Vec::new();
        for (d, (name, dev_loop, mp)) in devices.iter().enumerate() {
            let dev = device_result(&result, name);
            let want = if round == 0 { "full" } else { "incremental" };
            assert_eq!(dev["mode"], want, "round {round}, {name}: {result}");
            if round == 0 {
                assert!(
                    dev["reason"]
                        .as_str()
                        .unwrap()
                        .contains("no earlier backup"),
                    "{result}"
                );
            } else {
                // Only the chunks written since are read: not all of them.
                let chunks = dev["size"].as_u64().unwrap().div_ceil(4 * MIB);
                assert!(
                    dev["stats"]["chunks_reused"].as_u64().unwrap() > 0,
                    "round {round}, {name}: no chunk reused: {result}"
                );
                assert!(
                    dev["stats"]["bytes_read"].as_u64().unwrap() < chunks * 4 * MIB,
                    "{result}"
                );
            }
            assert_eq!(
                env.freezes_of(mp),
                freezes[d] + 1,
                "round {round}: {} frozen once for the take:\n{}",
                mp.display(),
                env.log_tail()
            );
            let file = env.work.join(format!("taken-{round}-{name}"));
            read_device(dev_loop, &file);
            recorded.push((trees[d].clone(), file));
        }
        points.push((id, recorded));
    }
    assert_eq!(env.ok(&["snapshot_collect"]).trim(), "", "snapshots left");
    let list = env.backup(&["list"]);
    let listed: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    let ids: Vec<&str> = points.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(listed, ids, "{list}");
    env.backup(&["verify"]);

    for (round, (id, recorded)) in points.iter().enumerate() {
        for (name, (tree, taken)) in names.iter().zip(recorded) {
            let what = format!("round {round}, {name} (backup {id})");
            let restored = env.restore(id, name);
            let (got, want) = (
                std::fs::read(&restored).unwrap(),
                std::fs::read(taken).unwrap(),
            );
            assert_eq!(got.len(), want.len(), "{what}: size");
            assert_equal_to_take(&got, &want, &what);
            assert_fsck_clean(&restored, &what);
            env.with_restored_mounted(&restored, &format!("restored-{round}-{name}"), |mp| {
                assert_tree(mp, tree, &what)
            });
            std::fs::remove_file(&restored).unwrap();
        }
    }

    // The last point without a restore: served over NBD, seen as a file
    // through nbdfuse, loop-mounted read-only, with the files of its take.
    let (id, recorded) = points.last().unwrap();
    let mut served = ServedBackup::start(&env, id);
    for (name, (tree, _)) in names.iter().zip(recorded) {
        let file = served.as_file(&env, name);
        let what = format!("{name} of backup {id}, served");
        env.with_restored_mounted(&file, &format!("served-{name}"), |mp| {
            assert_tree(mp, tree, &what)
        });
    }
    drop(served);
}

// ---------------------------------------------------------------------------
// 2. A writer creating files on the mounted ext4 while backups run.

/// The content of the writer's file `i`: 1 byte to 32 KiB, from `i`.
fn writer_content(i: u64) -> Vec<u8> {
    Pattern::RandomFill.bytes(50_000 + i, 1 + (i * 104_729) % (32 * 1024))
}

/// A thread that creates files in `dir` one after the other until stopped:
/// file `i` is written as `.tmp-<i>`, fsynced, then renamed to `w-<i>`;
/// `completed` has every `i` whose rename returned. Stopped (and joined)
/// on drop, before the [`Env`] declared ahead of it unmounts.
struct Writer {
    stop: Arc<AtomicBool>,
    completed: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

/// Enough for a long backup, well within the filesystem's space.
const WRITER_MAX_FILES: u64 = 3000;

impl Writer {
    fn start(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, completed) = (stop.clone(), completed.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    if i == WRITER_MAX_FILES {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let (tmp, done) = (dir.join(format!(".tmp-{i}")), dir.join(format!("w-{i}")));
                    let write = || -> std::io::Result<()> {
                        let mut f = std::fs::File::create(&tmp)?;
                        f.write_all(&writer_content(i))?;
                        f.sync_all()?;
                        std::fs::rename(&tmp, &done)
                    };
                    write().map_err(|e| format!("writer, file {i}: {e}"))?;
                    completed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(i);
                    i += 1;
                }
                Ok(())
            })
        };
        Self {
            stop,
            completed,
            thread: Some(thread),
        }
    }

    /// How many files are complete.
    fn count(&self) -> u64 {
        self.completed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }

    /// Waits (bounded) until more than `n` files are complete.
    fn wait_past(&mut self, n: u64) {
        assert!(
            wait_until(Duration::from_secs(60), || self.count() > n
                || self.thread.as_ref().is_some_and(|t| t.is_finished())),
            "the writer made no progress past {n} files"
        );
        assert!(self.count() > n, "the writer stopped: {:?}", self.finish());
    }

    /// Stops the writer; its error, if it had one.
    fn finish(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err("writer panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Checks the writer's directory `dir` in a restored image of a backup
/// whose `create` started when `before` files were complete and ended when
/// `after` were: the files present are `w-0 ..= w-<n-1>` for some n from
/// `before` to `after + 1` (the take is one point in time; a rename may
/// have returned without being counted yet), each with its whole content,
/// and at most one `.tmp-<n>`, holding a prefix of its content. Returns n.
fn check_writer_files(dir: &Path, before: u64, after: u64, what: &str) -> u64 {
    let tree = read_tree(dir);
    let mut done = BTreeSet::new();
    let mut tmp = Vec::new();
    for (name, content) in &tree {
        if let Some(i) = name.strip_prefix("w-") {
            let i: u64 = i.parse().unwrap();
            assert!(
                *content == writer_content(i),
                "{what}: {name}: {} bytes, not its content",
                content.len()
            );
            done.insert(i);
        } else if let Some(i) = name.strip_prefix(".tmp-") {
            let i: u64 = i.parse().unwrap();
            let full = writer_content(i);
            assert!(
                full.starts_with(content),
                "{what}: {name}: {} bytes, not a prefix of its {} bytes",
                content.len(),
                full.len()
            );
            tmp.push(i);
        } else {
            panic!("{what}: unexpected file {name}");
        }
    }
    let n = done.len() as u64;
    assert_eq!(
        done,
        (0..n).collect::<BTreeSet<_>>(),
        "{what}: the completed files are not w-0 to w-{}",
        n.saturating_sub(1)
    );
    assert!(
        n >= before,
        "{what}: {n} files, but {before} were complete before the backup started"
    );
    assert!(
        n <= after + 1,
        "{what}: {n} files, but only {after} were complete when the backup ended"
    );
    assert!(
        tmp.is_empty() || tmp == [n],
        "{what}: temporary files {tmp:?} with {n} complete"
    );
    n
}

#[test]
fn backups_while_a_writer_creates_files_restore_consistent_filesystems() {
    const TEST: &str = "backups_while_a_writer_creates_files_restore_consistent_filesystems";
    let Some(env) = Env::start_if_ready(TEST) else {
        return;
    };
    let (name, dev_loop, mp) = env.ext4_device("c", 128 * MIB);
    let mut base = Tree::new();
    for i in 0..8u64 {
        let content = Pattern::RandomFill.bytes(7000 + i, 1 + i * 100_000);
        write_synced(&mp, &format!("base/f-{i}"), &content);
        base.insert(format!("f-{i}"), content);
    }
    run_ok("sync", &["-f", s(&mp)]);

    let mut writer = Writer::start(mp.join("w"));
    writer.wait_past(20);
    // Per backup: (result, files complete before its create started,
    // files complete when it ended).
    let mut backups = Vec::new();
    for _ in 0..2 {
        let freezes = env.freezes_of(&mp);
        let before = writer.count();
        let result = env.create(&[&name]);
        let after = writer.count();
        assert_eq!(
            env.freezes_of(&mp),
            freezes + 1,
            "{} frozen once for the take:\n{}",
            mp.display(),
            env.log_tail()
        );
        assert!(
            after > before,
            "no file completed while the backup ran ({before} before and after): \
             the writer did not run during it"
        );
        backups.push((result, before, after));
        writer.wait_past(after + 20);
    }
    writer.finish().unwrap();
    let written = writer.count();
    assert_eq!(
        backups
            .iter()
            .map(|(r, _, _)| device_result(r, &name)["mode"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["full", "incremental"]
    );
    assert_eq!(env.ok(&["snapshot_collect"]).trim(), "", "snapshots left");
    env.backup(&["verify"]);

    let mut present = Vec::new();
    for (k, (result, before, after)) in backups.iter().enumerate() {
        let id = id_of(result);
        let what = format!("backup {k} ({id}), files {before} before, {after} after");
        let restored = env.restore(&id, &name);
        assert_eq!(
            std::fs::metadata(&restored).unwrap().len(),
            128 * MIB,
            "{what}: size"
        );
        assert_fsck_clean(&restored, &what);
        env.with_restored_mounted(&restored, &format!("restored-{k}"), |r| {
            assert_tree(&r.join("base"), &base, &what);
            present.push(check_writer_files(&r.join("w"), *before, *after, &what));
        });
        std::fs::remove_file(&restored).unwrap();
    }
    eprintln!(
        "{TEST}: files complete before/after each backup {:?}, in its image {present:?}, \
         {written} in all",
        backups.iter().map(|(_, b, a)| (b, a)).collect::<Vec<_>>()
    );
    // The origin has every file, complete.
    env.umount(&mp);
    let mp = env.mount(&dev_loop, "c", &[]);
    assert_tree(&mp.join("base"), &base, "the origin");
    let n = check_writer_files(&mp.join("w"), written, written, "the origin");
    assert_eq!(n, written);
}
